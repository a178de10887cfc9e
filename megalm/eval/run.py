"""`megalm eval`: load a checkpoint at any layout, then loss/perplexity on token files or task accuracy.

The model is the checkpoint's own config at this process's layout (one process, or tp x pp x dp under
torchrun), built by the trainer's builder, its weights restored by checkpoint.weights.load_model_weights
(any saved layout). Everything runs through the pipeline executor's forward-only path, so the
loss equals the trainer's evaluation and task scoring works at any tp and pp: each scored sequence
is one row of a micro-batch, its log-likelihood the masked sum of its per-token losses on the last
stage, summed over the pipeline group so every rank holds every score (data-parallel replicas
share the sequences out and meet in an all-reduce).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from megalm.checkpoint.weights import find_checkpoint, load_model_weights, read_metadata
from megalm.config import ConfigError, config_from_dict, validate
from megalm.data.batch import Batch
from megalm.data.dataset import pair_prefix
from megalm.data.pipeline import DataSources, build_sampler, build_sources
from megalm.distributed import ParallelGroups, all_reduce_
from megalm.eval.tasks import (
    DEFAULT_CONTENT_FREE, Example, Scores, TaskError, accuracies, chance, few_shot_prefix, load_task,
)

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
        """A PrefixLM fine-tuned on pairs: its contexts end in <sep>, as its training prefixes did."""
        return self.config.model.family == "prefixlm" and self.config.data.kind == "pairs"

    def context_ids(self, context: list[int]) -> list[int]:
        """The ids a continuation is scored after (loglikelihoods) or generated from (the harness's
        is_greedy): the context, then <sep> for a model fine-tuned on pairs; eos for an empty one."""
        ids = pair_prefix(context, self.tokenizer.sep_id) if self.pairs else list(context)
        return ids or [self.tokenizer.eos_id]  # an empty context: the first token is predicted after eos

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
        """(context ids, continuation ids) so that together they are the tokens of context + continuation."""
        context_ids = self.tokenizer.encode(context) if context else []
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
    parallel.tp, parallel.pp, parallel.dp = tp, pp, world // (tp * pp)
    parallel.virtual_stages, parallel.pipeline_layers, parallel.zero_stage = 1, None, 0
    parallel.recompute, parallel.recompute_layers, parallel.schedule = "none", None, "1f1b"
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


def cmd_eval(args: argparse.Namespace) -> int:
    """Load, then report loss/perplexity (--data or --split) and each task's accuracy, one JSON line each."""
    from megalm.distributed import build_parallel_groups, init_distributed, resolve_device
    from megalm.eval.world import NAME as WORLD, SEEN as WORLD_SEEN, world_task
    from megalm.topology import Topology

    tasks = [(name, None if name in (WORLD, WORLD_SEEN) else load_task(name)) for name in args.task]  # bad files: before loading
    harness = _harness_tasks(args) if args.lm_eval_tasks else []
    device = resolve_device(args.device)
    rank, world = init_distributed(device)
    if harness and world > 1:
        raise ConfigError("--lm-eval-tasks runs in one process: run it without torchrun (any saved layout loads)")
    groups = None
    if world > 1:
        if world % (args.tp * args.pp):
            raise ConfigError(f"--tp {args.tp} x --pp {args.pp} does not divide the world size {world}")
        groups = build_parallel_groups(Topology(args.tp, args.pp, world // (args.tp * args.pp)), rank, device)
    elif args.tp * args.pp > 1:
        raise ConfigError(f"--tp {args.tp} --pp {args.pp} needs {args.tp * args.pp} processes: run under torchrun")
    evaluator = load_evaluator(args.checkpoint, groups, args.tp, args.pp, args.batch_size, args.data, args.split,
                               args.tokenizer)
    lines = []
    if args.data or args.split is not None or not (tasks or harness):
        lines.append({"eval": "loss", "checkpoint": str(evaluator.checkpoint), **evaluator.loss(
            args.split_name, args.batches)})
    for name, examples in tasks:
        examples = world_task(args.world_seed, name == WORLD) if examples is None else examples
        if args.limit:
            examples = examples[:args.limit]
        result = evaluator.score_task(examples, args.shots, args.content_free, args.seed)
        lines.append({"eval": "task", "task": name, "checkpoint": str(evaluator.checkpoint), **result})
    if harness:
        lines.extend(_run_harness(evaluator, harness, args))
    if rank == 0:
        for line in lines:
            if line["eval"] == "loss":
                print(f"eval: {line['split']} loss {line['loss']:.4f}, perplexity {line['perplexity']:.2f} "
                      f"({line['batches']} batches, {line['tokens']:,} tokens)")
            elif line["eval"] == "lm_eval":
                print(f"eval: lm_eval task {line['task']}: " + ", ".join(
                    f"{key} {value:.4f}" for key, value in line.items() if isinstance(value, float)))
            else:
                print(f"eval: task {line['task']}: {line['examples']} examples, {line['shots']}-shot: accuracy "
                      f"{line['sum']:.3f} (sum), {line['mean']:.3f} (mean); calibrated {line['sum_calibrated']:.3f} "
                      f"(sum), {line['mean_calibrated']:.3f} (mean); chance {line['chance']:.3f}")
            if args.json:
                print(json.dumps(line))
        sys.stdout.flush()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def _harness_tasks(args: argparse.Namespace) -> list[str]:
    """The --lm-eval-tasks names; lm-evaluation-harness must be installed."""
    try:
        import megalm.eval.harness  # noqa: F401  (registers the lm_eval model "megalm")
    except ImportError as error:
        raise ConfigError(f"--lm-eval-tasks needs lm-evaluation-harness ({error}): pip install 'megalm[lmeval]'") from None
    return [name.strip() for name in args.lm_eval_tasks.split(",") if name.strip()]


def _run_harness(evaluator: Evaluator, names: list[str], args: argparse.Namespace) -> list[dict]:
    """lm_eval.simple_evaluate of the harness tasks `names` on the loaded checkpoint: one line per task."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from megalm.eval.harness import MegalmLM

    manager = TaskManager(include_path=args.lm_eval_include) if args.lm_eval_include else TaskManager()
    results = lm_eval.simple_evaluate(
        model=MegalmLM(evaluator=evaluator, batch_size=args.batch_size), tasks=names, task_manager=manager,
        num_fewshot=args.shots or None, limit=args.limit, random_seed=args.seed, numpy_random_seed=args.seed,
        torch_random_seed=args.seed, fewshot_random_seed=args.seed, log_samples=False,
    )
    return [{"eval": "lm_eval", "task": task, "checkpoint": str(evaluator.checkpoint),
             **{key: value for key, value in metrics.items() if key != "alias"}}
            for task, metrics in results["results"].items()]


def register_cli(subparsers) -> None:
    """Add `megalm eval CKPT [--data PREFIX ...] [--task FILE|world ...] [--shots K] [--tp N --pp N]`."""
    parser = subparsers.add_parser(
        "eval", help="loss/perplexity on token files and zero/few-shot task accuracy of a checkpoint (calibrated)")
    parser.add_argument("checkpoint", help="a checkpoint directory or a run directory (its latest checkpoint)")
    parser.add_argument("--data", nargs="+", help="token file prefixes (megalm preprocess) to measure loss on; "
                        "default: the checkpoint's own data")
    parser.add_argument("--split", help="data.split for --data, e.g. 100 (all documents in train) or 98,1,1")
    parser.add_argument("--on", dest="split_name", choices=("train", "valid", "test"), default="valid",
                        help="which split the loss is measured on (default valid; with --split 100 use train)")
    parser.add_argument("--batches", type=int, help="global batches of loss (default train.eval_batches)")
    parser.add_argument("--task", action="append", default=[],
                        help="a JSONL task file (README: megalm eval), or 'world': the built-in corpus-world task on the "
                        "facts the corpus holds out ('world-seen': on the facts it states)")
    parser.add_argument("--shots", type=int, default=0, help="few-shot demonstrations before each example")
    parser.add_argument("--content-free", nargs="*", default=list(DEFAULT_CONTENT_FREE),
                        help="content-free inputs for contextual calibration (default: 'N/A' and '')")
    parser.add_argument("--limit", type=int, help="score only the first N examples of each task")
    parser.add_argument("--world-seed", type=int, default=0, help="the corpus seed of the built-in world task")
    parser.add_argument("--seed", type=int, default=0, help="seed of the few-shot demonstrations' choice")
    parser.add_argument("--tokenizer", help="override the checkpoint's data.tokenizer path")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences scored per forward")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size (under torchrun)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages (under torchrun)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--json", action="store_true", help="also print each result as a JSON line")
    parser.add_argument("--lm-eval-tasks", help="comma-separated lm-evaluation-harness tasks to run on the checkpoint "
                        "(one process; needs the lmeval extra); --shots, --limit and --seed apply to them too")
    parser.add_argument("--lm-eval-include", help="a folder of extra lm_eval task YAML files (TaskManager include_path)")
    parser.set_defaults(func=cmd_eval)
