"""Evaluator: a checkpoint loaded at any layout, and how to score text with it (loss, log-likelihoods, tasks).

The model is the checkpoint's own config at this process's layout (one process, or tp x pp x dp under
torchrun), built by the trainer's builder, its weights restored by checkpoint.weights.load_model_weights
(any saved layout). Everything runs through the pipeline executor's forward-only path, so the
loss equals the trainer's evaluation and task scoring works at any tp and pp: each scored sequence
is one row of a micro-batch, its log-likelihood the masked sum of its per-token losses on the last
stage, summed over the pipeline group so every rank holds every score (data-parallel replicas
share the sequences out and meet in an all-reduce). `megalm eval` (run.py) and the lm_eval adapter
(harness.py) both score through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from megalm.checkpoint.weights import find_checkpoint, load_model_weights, read_metadata
from megalm.config import ConfigError, config_from_dict, validate
from megalm.data.batch import Batch
from megalm.data.dataset import prompt_ids, trained_on_pairs
from megalm.data.pipeline import DataSources, build_sampler, build_sources
from megalm.distributed import ParallelGroups, all_reduce_
from megalm.eval.tasks import DEFAULT_CONTENT_FREE, Example, Scores, TaskError, accuracies, chance, few_shot_prefix

@dataclass
class Evaluator:
    """A loaded checkpoint: its trainer (model chunks, groups, data) and how to score text with it."""

    trainer: object
    checkpoint: Path
    metadata: dict
    batch_size: int
    sources: DataSources  # the train/valid/test splits the trainer was built with

    @property
    def config(self):
        return self.trainer.config

    @property
    def tokenizer(self):
        return self.trainer.tokenizer

    def loss(self, split: str = "valid", batches: Optional[int] = None) -> dict:
        """Mean token loss and perplexity over the first `batches` global batches of a split, as the
        trainer's evaluation computes them (train.eval_batches by default)."""
        source = getattr(self.sources, split)
        if source is None:
            raise ConfigError(f"the {split} split is empty (data.split={self.config.data.split}); choose another --split")
        groups = self.trainer.groups
        self.trainer.valid = build_sampler(self.config, source, groups.dp_rank, groups.dp_size)
        if batches is not None:
            self.config.train.eval_batches = batches
        loss = self.trainer.evaluate()
        tokens = self.config.train.eval_batches * self.config.train.global_batch_size * self.config.model.seq_length
        return {"split": split, "loss": loss, "perplexity": math.exp(min(loss, 700.0)), "batches":
                self.config.train.eval_batches, "tokens": tokens}

    @property
    def pairs(self) -> bool:
        """A model (LM or PrefixLM) fine-tuned on pairs: its contexts end in <sep>, as its training prefixes did."""
        return trained_on_pairs(self.config)

    def context_ids(self, context: list[int]) -> list[int]:
        """The ids a continuation is scored after (loglikelihoods) or generated from (the harness's
        is_greedy): prompt_ids, the rule `megalm generate` encodes its prompts with."""
        return prompt_ids(context, self.tokenizer.sep_id, self.tokenizer.eos_id, self.pairs)

    @torch.no_grad()
    def loglikelihoods(self, requests: Sequence[tuple[list[int], list[int]]]) -> list[float]:
        """log p(continuation | context) for each (context ids, continuation ids), summed over tokens.

        A sequence longer than seq_length + 1 keeps the end of its context. PrefixLM: the context is
        the bidirectional prefix (ending in <sep> for a model fine-tuned on pairs)."""
        from megalm.parallel.pipeline import PipelineExecutor, activation_shape
        from megalm.model.gpt import param_dtype

        config, groups = self.config, self.trainer.groups
        seq, rows = config.model.seq_length, self.batch_size
        executor = PipelineExecutor(
            self.trainer.chunks, groups, "1f1b", 1,
            activation_shape(seq, rows, config.model.hidden_size, groups, config.parallel.sequence_parallel),
            message_dtype=param_dtype(config),
        )
        prefixlm = config.model.family == "prefixlm"
        for context, continuation in requests:  # checked on every rank before any of them starts
            if len(continuation) > seq:
                raise TaskError(
                    f"a choice of {len(continuation)} tokens does not fit in seq_length {seq}; shorten the choices"
                )
        for chunk in self.trainer.chunks:
            chunk.train(False)
        # Each data-parallel replica scores every dp-th sequence; the results meet in one all-reduce.
        mine = list(range(groups.dp_rank, len(requests), groups.dp_size))
        out = torch.zeros(len(requests), dtype=torch.float64, device=groups.device)
        for start in range(0, len(mine), rows):
            indices = mine[start:start + rows]
            group = [requests[i] for i in indices]
            tokens = torch.zeros(rows, seq, dtype=torch.long)
            labels = torch.zeros(rows, seq, dtype=torch.long)
            mask = torch.zeros(rows, seq)
            prefix = torch.ones(rows, dtype=torch.long)
            for row, (context, continuation) in enumerate(group):
                context = self.context_ids(context)[-(seq + 1 - len(continuation)):]
                full = context + continuation
                tokens[row, :len(full) - 1] = torch.tensor(full[:-1])
                labels[row, :len(full) - 1] = torch.tensor(full[1:])
                mask[row, len(context) - 1:len(full) - 1] = 1.0
                prefix[row] = len(context)
            batch = Batch(tokens, labels, mask, prefix if prefixlm else None).to(groups.device)
            sums = torch.zeros(rows, device=groups.device)

            def keep(losses: torch.Tensor, micro: Batch, sums=sums) -> torch.Tensor:
                sums.copy_((losses.float() * micro.loss_mask).sum(dim=1))
                return sums.sum()

            executor.run([batch], keep, forward_only=True)
            out[torch.tensor(indices, device=groups.device)] = -sums[:len(group)].double()
        all_reduce_(out, groups.pp_group)  # only the last stage computed them
        all_reduce_(out, groups.dp_group)
        return out.tolist()

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) so that together they are the tokens of context + continuation
        (a BOS the tokenizer adds belongs to the context, even an empty one)."""
        context_ids = self.tokenizer.encode(context)
        full = self.tokenizer.encode(context + continuation)
        common = 0
        while common < min(len(context_ids), len(full) - 1) and context_ids[common] == full[common]:
            common += 1
        return full[:common], full[common:]

    def score_task(
        self, examples: Sequence[Example], shots: int = 0, content_free: Sequence[str] = DEFAULT_CONTENT_FREE,
        seed: int = 0,
    ) -> dict:
        """Accuracy of the four scorings (sum, mean; uncalibrated, calibrated) and chance."""
        if self.tokenizer is None:
            raise ConfigError(
                f"the checkpoint {self.checkpoint} has no tokenizer (data.tokenizer is unset): tasks are text; "
                f"evaluate a model trained on token files"
            )
        prompts: dict[tuple[str, str], int] = {}  # (context, continuation) -> request index: shared prompts once
        layout = []
        for index, example in enumerate(examples):
            demos = few_shot_prefix(examples, index, shots, seed)
            contexts = [demos + example.prompt()] + [demos + example.prompt(free) for free in content_free]
            layout.append([
                [[prompts.setdefault((context, example.separator + word), len(prompts)) for word in words]
                 for words in example.choices]
                for context in contexts
            ])
        requests = [self.encode_pair(context, continuation) for context, continuation in prompts]
        logliks = self.loglikelihoods(requests)

        def scores(ids: list[list[int]]) -> Scores:
            return Scores([[logliks[i] for i in words] for words in ids],
                          [[len(requests[i][1]) for i in words] for words in ids])

        result = accuracies(
            examples, [scores(entry[0]) for entry in layout], [[scores(e) for e in entry[1:]] for entry in layout]
        )
        result.update(chance=chance(examples), examples=len(examples), shots=shots, sequences=len(requests))
        return result


def load_evaluator(
    source: str | Path, groups: Optional[ParallelGroups] = None, tp: int = 1, pp: int = 1,
    batch_size: int = 16, data_paths: Optional[Sequence[str]] = None, split: Optional[str] = None,
    tokenizer: Optional[str] = None,
) -> Evaluator:
    """The checkpoint `source` names (a checkpoint or run directory), at tp x pp (x dp: the rest of the world)."""
    from megalm.train import build_trainer

    path = find_checkpoint(source, "megalm eval CHECKPOINT")
    config = config_from_dict(read_metadata(path, "megalm eval")["config"], str(path))
    world = groups.topology.world_size if groups is not None else 1
    if world % (tp * pp):
        raise ConfigError(f"--tp {tp} x --pp {pp} does not divide the world size {world}")
    parallel = config.parallel
    parallel.tp, parallel.pp, parallel.dp, parallel.cp = tp, pp, world // (tp * pp), 1  # evaluation holds whole sequences
    parallel.virtual_stages, parallel.pipeline_layers, parallel.zero_stage = 1, None, 0
    parallel.recompute, parallel.recompute_layers, parallel.schedule = "none", None, "1f1b"
    # training-speed options, not the model: evaluation runs plain high-precision linears (docs/generate-eval.md)
    parallel.tp_comm_overlap, parallel.tp_comm_overlap_chunks, config.train.fp8 = False, None, "none"
    config.train.init_from, config.train.engine = None, "megalm"
    config.log.sample_prompts = []
    if data_paths:
        config.data.kind, config.data.paths, config.data.weights = "indexed", list(data_paths), None
    if split is not None:
        config.data.split = split
    if tokenizer is not None:
        config.data.tokenizer = tokenizer
    config.train.micro_batch_size = math.gcd(config.train.micro_batch_size, config.train.global_batch_size // parallel.dp or 1)
    validate(config, world)
    groups = groups or ParallelGroups.single()
    sources = build_sources(config)  # once: the trainer's data and loss()'s splits
    trainer = build_trainer(config, groups, None, sources, training=False)  # its evaluate() is the loss
    path, metadata = load_model_weights(trainer.chunks, groups, path, "megalm eval")
    return Evaluator(trainer, path, metadata, batch_size, sources)
