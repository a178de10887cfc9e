"""Text generation with a KV cache, at any tp and pp: `megalm generate` and the end-of-training samples.

A batch's prompts are left-padded to one width, so they all end at the same column: one forward over
the prompts (the prefill) fills every layer's KV cache, and each later step feeds each row's newest
token alone. Every token has its own position (counted from its row's first real token) and the
attention mask hides the pad columns, so a row gets the tokens it would get alone. A PrefixLM's
prompt is its bidirectional prefix: the prompt's columns see each other both ways, so the cache holds
the prefix's keys and values computed with the prefix mask, and generated tokens are causal; this is
training's prefix mask (megalm.model.gpt.prefix_attention_mask) shifted by the padding.
`use_cache=False` recomputes the whole sequence every step: the reference the cache is tested against.

Tensor parallel: each tp rank gathers the last position's vocab-split logits, drops the padded
vocabulary rows and draws from a generator seeded alike on every rank, so all tp ranks pick the same
token with no further collective. Pipeline parallel: a stage receives the previous stage's hidden
states, runs its layers and sends them on (a rank's virtual stages in turn); the last stage samples
and broadcasts the tokens over its pipeline group, so the first stage can feed them back. Data
parallel replicas of `megalm generate` take turns at the batches.

A model fine-tuned on pairs (data.kind pairs, LM or PrefixLM) saw each prefix followed by <sep>; its
prompts are encoded the same way, by the rule `megalm eval` and the lm_eval adapter use too
(encode_prompt: megalm.data.dataset.prompt_ids).
Generation ends at model.seq_length tokens (prompt included); a longer prompt keeps its last
seq_length - 1 tokens, as pairs training keeps a long prefix's end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.distributed as dist

from megalm.data.dataset import prompt_ids, trained_on_pairs
from megalm.distributed import ParallelGroups
from megalm.model.gpt import GPTModel
from megalm.parallel.tensor import gather_from_tp


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn, and when a row stops."""

    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens (0: all)
    top_p: float = 1.0  # keep the smallest set of most likely tokens whose probability reaches p (1: all)
    seed: int = 0  # the draws' generator, the same on every rank
    # a row ends when it draws this id, or any id of this tuple (eos; a tokenizer's stop_ids), not returned
    stop_id: Union[int, tuple[int, ...], None] = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max new tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top-k must be >= 0 (0 keeps every token), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top-p must be in (0, 1] (1 keeps every token), got {self.top_p}")


class LayerCache:
    """One layer's keys and values [b, heads/tp, positions, d]; Attention appends each step's."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None
        self.length = 0

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' keys and values; return all of them so far."""
        end = self.length + keys.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} positions cannot take {end}")
        if self.keys is None:
            shape = (*keys.shape[:2], self.capacity, keys.shape[3])
            self.keys, self.values = keys.new_empty(shape), values.new_empty(shape)
        self.keys[:, :, self.length : end] = keys
        self.values[:, :, self.length : end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


def encode_prompt(tokenizer, text: str, pairs: bool) -> list[int]:
    """A prompt's ids as training showed such text (megalm.data.dataset.prompt_ids): after fine-tuning
    on pairs, the prefix then <sep>; eos alone for an empty prompt. A Hugging Face tokenizer's BOS stays
    (documents were encoded with it); an eos its encode appends is cut, so the model continues the text."""
    ids = tokenizer.encode(text)
    if getattr(tokenizer, "add_eos", False) and ids and ids[-1] == tokenizer.eos_id:
        ids = ids[:-1]
    return prompt_ids(ids, tokenizer.sep_id, tokenizer.eos_id, pairs)


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """Next ids [b] from fp32 logits [b, v]: argmax, or a draw after temperature, top-k and top-p."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ranked, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(ranked, dim=-1)
        above = probs.cumsum(dim=-1) - probs  # the mass of the tokens ranked higher; the first is always kept
        drop = torch.zeros_like(above, dtype=torch.bool).scatter(-1, order, above >= sampling.top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)


def decoding_mask(pads: torch.Tensor, width: int, total: int, prefix: bool) -> torch.Tensor:
    """[b, 1, total, total] bool: which columns each column attends to, for prompts left-padded by
    `pads` [b] to end at column `width`. Causal, plus (PrefixLM) the whole prompt both ways; no real
    token sees a pad column, and a pad column sees itself alone (a softmax row with no key is NaN)."""
    columns = torch.arange(total, device=pads.device)
    real = columns.unsqueeze(0) >= pads.unsqueeze(1)  # [b, k]: not padding
    sees = columns.unsqueeze(1) >= columns.unsqueeze(0)  # [q, k] causal
    if prefix:
        sees = sees | (columns < width).unsqueeze(0)  # the prompt is the bidirectional prefix
    alone = torch.eye(total, dtype=torch.bool, device=pads.device)
    return ((sees.unsqueeze(0) & real.unsqueeze(1)) | alone).unsqueeze(1)


@contextlib.contextmanager
def _decoding(chunks: Sequence[GPTModel]) -> Iterator[None]:
    """Eval mode without sequence parallel (a decode step is one position: nothing to split);
    the weights are the same either way. Restores both afterwards (the trainer's samples)."""
    modes = [chunk.training for chunk in chunks]
    split = [m for chunk in chunks for m in chunk.modules() if getattr(m, "sequence_parallel", False) is True]
    for module in split:
        module.sequence_parallel = False
    for chunk in chunks:
        chunk.eval()
    try:
        yield
    finally:
        for module in split:
            module.sequence_parallel = True
        for chunk, mode in zip(chunks, modes):
            chunk.train(mode)


def _forward(
    chunks: Sequence[GPTModel], groups: ParallelGroups, ids: torch.Tensor, positions: torch.Tensor,
    mask: torch.Tensor, caches: Optional[list[dict[int, LayerCache]]],
) -> Optional[torch.Tensor]:
    """One forward through this rank's chunks, passing hidden states [s, b, h] between stages;
    the last stage's logits [s, b, v/tp], None elsewhere."""
    pp, pp_rank = groups.pp_size, groups.pp_rank
    hidden: torch.Tensor = ids
    for index, chunk in enumerate(chunks):
        if not chunk.is_first:
            hidden = torch.empty(ids.shape[1], ids.shape[0], chunk.cfg.hidden_size, dtype=chunk.dtype, device=ids.device)
            dist.recv(hidden, src=groups.pp_ranks[(pp_rank - 1) % pp], group=groups.pp_group)
        hidden = chunk.decode(hidden, positions, mask, None if caches is None else caches[index])
        if not chunk.is_last:
            dist.send(hidden.contiguous(), dst=groups.pp_ranks[(pp_rank + 1) % pp], group=groups.pp_group)
    return hidden if chunks[-1].is_last else None


@torch.no_grad()
def generate(
    chunks: Sequence[GPTModel] | GPTModel,
    groups: ParallelGroups,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling,
    use_cache: bool = True,
) -> list[list[int]]:
    """Continue each prompt (token ids) by up to sampling.max_new_tokens ids; every rank of the
    model replica (its tp and pp ranks) calls this together and gets the same ids."""
    chunks = [chunks] if isinstance(chunks, GPTModel) else list(chunks)
    cfg, device = chunks[0].cfg, groups.device
    if not prompts:
        return []
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("an empty prompt: give every prompt at least one token")
    window = cfg.seq_length
    prompts = [list(prompt)[-(window - 1):] for prompt in prompts]  # room for at least one new token
    batch, width = len(prompts), max(len(prompt) for prompt in prompts)
    total = min(window, width + sampling.max_new_tokens)
    tokens = torch.zeros(batch, total, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) : width] = torch.tensor(prompt, dtype=torch.long, device=device)
    pads = torch.tensor([width - len(prompt) for prompt in prompts], device=device)
    positions = (torch.arange(total, device=device).unsqueeze(0) - pads.unsqueeze(1)).clamp(min=0)  # [b, total]
    mask = decoding_mask(pads, width, total, cfg.family == "prefixlm")
    caches = [{i: LayerCache(total) for i in chunk.layer_ids} for chunk in chunks] if use_cache else None
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    last_stage = chunks[-1].is_last
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    stop = sampling.stop_id
    stop_ids = None if stop is None else torch.tensor(
        [stop] if isinstance(stop, int) else list(stop), dtype=torch.long, device=device)
    new: list[list[int]] = [[] for _ in range(batch)]
    with _decoding(chunks):
        for end in range(width, total):
            begin = end - 1 if use_cache and end > width else 0  # the cache holds columns [0, begin)
            logits = _forward(chunks, groups, tokens[:, begin:end], positions[:, begin:end],
                              mask[:, :, begin:end, :end], caches)
            if last_stage:
                full = gather_from_tp(logits[-1].float().contiguous(), groups.tp_group)[:, : cfg.vocab_size]
                next_ids = sample_next(full, sampling, generator)
            else:
                next_ids = torch.empty(batch, dtype=torch.long, device=device)
            if groups.pp_size > 1:
                dist.broadcast(next_ids, src=groups.pp_ranks[-1], group=groups.pp_group)
            stopped = torch.isin(next_ids, stop_ids) if stop_ids is not None else torch.zeros_like(done)
            for row in (~done & ~stopped).nonzero().flatten().tolist():
                new[row].append(int(next_ids[row]))
            done |= stopped
            tokens[:, end] = next_ids
            if bool(done.all()):
                break
    return new


# ----------------------------------------------------------------------------- megalm generate
def read_prompts(texts: Sequence[str], path: Optional[str], field: str) -> list[str]:
    """Prompts from --prompt and from a file: one per line, or JSONL (.jsonl/.json: the `field` of each
    object, or a JSON string per line). Blank lines are skipped."""
    from megalm.fsutil import PathError

    prompts = list(texts)
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise PathError(f"--prompts-file {file} is not a file: give a text file (one prompt a line) or JSONL")
        jsonl = file.suffix in (".jsonl", ".json")
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            if not jsonl:
                prompts.append(line)
                continue
            try:
                record = json.loads(line)
                prompts.append(record if isinstance(record, str) else str(record[field]))
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise PathError(
                    f"{file}:{number}: not a JSON string or an object with the field {field!r} "
                    f"({type(error).__name__}: {error}); fix the line or pass --field"
                ) from None
    if not prompts:
        raise PathError("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def _load_tokenizer(config, metadata: dict[str, Any], override: Optional[str]):
    from megalm.data.pipeline import DataError
    from megalm.data.tokenizer import check_model_vocab, open_tokenizer

    path = override or config.data.tokenizer
    if path is None:
        raise DataError("the checkpoint was trained without a tokenizer (data.tokenizer is null): give --tokenizer "
                        "FILE.model or a Hugging Face tokenizer directory")
    tokenizer = open_tokenizer(path)
    problem = check_model_vocab(tokenizer, config.model.vocab_size)
    if problem:
        raise DataError(f"the tokenizer {path} does not fit the model ({problem}): "
                        f"give the tokenizer the checkpoint was trained with (--tokenizer)")
    saved = metadata.get("tokenizer_hash")
    if saved and saved != tokenizer.hash:
        raise DataError(f"the tokenizer {path} (hash {tokenizer.hash[:12]}) is not the checkpoint's ({saved[:12]}): "
                        f"give the tokenizer the checkpoint was trained with (--tokenizer)")
    return tokenizer


def generate_batches(
    chunks: Sequence[GPTModel], groups: ParallelGroups, prompts: Sequence[Sequence[int]], sampling: Sampling,
    batch_size: int, use_cache: bool = True,
) -> list[list[int]]:
    """generate over batches of batch_size prompts: each data-parallel replica takes every dp-th batch
    (its tp and pp ranks together), then all meet, so every rank returns every prompt's ids, in order."""
    mine: dict[int, list[list[int]]] = {}
    for number, start in enumerate(range(0, len(prompts), batch_size)):
        if number % groups.dp_size == groups.dp_rank:
            mine[number] = generate(chunks, groups, prompts[start:start + batch_size], sampling, use_cache)
    if groups.dp_size > 1:
        everyone: list[Optional[dict[int, list[list[int]]]]] = [None] * groups.dp_size
        dist.all_gather_object(everyone, mine, group=groups.control_dp_group)
        mine = {number: out for part in everyone for number, out in part.items()}  # type: ignore[union-attr]
    return [ids for number in sorted(mine) for ids in mine[number]]


def cmd_generate(args: argparse.Namespace) -> int:
    """Load a checkpoint at --tp x --pp (x the data-parallel rest of the world), generate, print JSONL."""
    from megalm.checkpoint.weights import find_checkpoint, load_model_weights, read_metadata
    from megalm.config import ConfigError, config_from_dict, validate
    from megalm.distributed import build_parallel_groups, init_distributed, resolve_device
    from megalm.model.gpt import build_model_chunks

    path = find_checkpoint(args.checkpoint, "checkpoint")
    metadata = read_metadata(path, "checkpoint")
    config = config_from_dict(metadata["config"], f"{path}/metadata.json")
    prompts = read_prompts(args.prompt, args.prompts_file, args.field)
    tokenizer = _load_tokenizer(config, metadata, args.tokenizer)
    pairs = args.prompt_format == "pairs" or (args.prompt_format == "auto" and trained_on_pairs(config))
    try:
        sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                            None if args.ignore_eos else tokenizer.stop_ids)
    except ValueError as error:
        raise ConfigError(f"megalm generate: {error}") from None
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size % (args.tp * args.pp) != 0:
        raise ConfigError(f"--tp {args.tp} x --pp {args.pp} does not divide the {world_size} processes: launch a multiple")
    parallel, train = config.parallel, config.train
    parallel.tp, parallel.pp, parallel.dp, parallel.cp = args.tp, args.pp, world_size // (args.tp * args.pp), 1  # whole sequences
    parallel.virtual_stages, parallel.pipeline_layers, parallel.sequence_parallel = 1, None, False
    parallel.recompute, parallel.zero_stage, parallel.schedule = "none", 0, "1f1b"
    # training-speed options, not the model: decoding runs plain high-precision linears (docs/generate-eval.md)
    parallel.tp_comm_overlap, parallel.tp_comm_overlap_chunks, train.fp8 = False, None, "none"
    train.engine, train.init_from = "megalm", None
    train.precision = args.precision or train.precision
    train.global_batch_size = train.micro_batch_size * parallel.dp
    config.log.sample_prompts = []
    topology = validate(config, world_size)
    device = resolve_device(args.device)
    rank, _ = init_distributed(device)
    try:
        groups = build_parallel_groups(topology, rank, device)
        chunks = build_model_chunks(config, groups)
        load_model_weights(chunks, groups, path, "checkpoint")
        encoded = [encode_prompt(tokenizer, text, pairs) for text in prompts]
        outputs = generate_batches(chunks, groups, encoded, sampling, args.batch_size, use_cache=not args.no_cache)
        if rank == 0:
            lines = [json.dumps({"prompt": text, "completion": tokenizer.decode(ids), "ids": ids},
                                ensure_ascii=False) for text, ids in zip(prompts, outputs)]
            if args.output:
                Path(args.output).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            else:
                print("\n".join(lines), flush=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def register_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "generate", help="generate text from a checkpoint (KV cache; any tp/pp under torchrun, or one process)",
        description="Generate from a checkpoint or run directory. Prints one JSON object per prompt: prompt, "
                    "completion, ids. Under torchrun the world is --tp x --pp x data-parallel replicas.",
    )
    parser.add_argument("checkpoint", help="a checkpoint directory or a run directory (its latest checkpoint)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="prompts, one per line; .jsonl/.json: one JSON object (or string) per line")
    parser.add_argument("--field", default="prompt", help="the JSONL key of the prompt (default: prompt)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; else sample")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample from the most likely tokens holding p of the mass")
    parser.add_argument("--seed", type=int, default=0, help="the sampling generator's seed")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop a prompt at eos")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step (slow; a check)")
    parser.add_argument("--prompt-format", choices=("auto", "pairs", "text"), default="auto",
                        help="pairs: end each prompt with <sep> as pairs fine-tuning did; auto: pairs when the "
                             "checkpoint was trained on data.kind pairs")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="default: the checkpoint's")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda when visible")
    parser.add_argument("--tokenizer", help="default: the checkpoint's data.tokenizer")
    parser.add_argument("--output", help="write the JSONL here instead of stdout")
    parser.set_defaults(func=cmd_generate)
    return None

