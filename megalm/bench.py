"""`megalm bench`: time megalm's training step against a plain PyTorch GPT of the same shape.

Both are timed in the same process, on the same device, on the same pre-generated micro-batches
(this rank's share of each global batch, already on the device), with the same number of
micro-batches per optimizer step, the same `train.precision`, optimizer, clipping, warm-up and timed step
counts. In bf16 the baseline trains the way a plain PyTorch (nanoGPT-style) loop does, under
torch.autocast over fp32 weights, while megalm holds bf16 weights with fp32 main gradients and
masters (Megatron-style): the ratio therefore includes the gain of megalm's precision scheme.
When Hugging Face `transformers` is installed (the optional `hf` extra), its GPT2LMHeadModel of the
same shape is timed too, trained exactly as the plain baseline is (`TransformersGPT2`), and a
second ratio megalm / transformers is reported; without it the report says it was skipped. The
baselines run first so that on CPU their peak memory is measured before megalm's model
exists. Results are the median step time and what follows from it (tokens/s, model TFLOP/s per
device, MFU, peak memory), and the ratio megalm / baseline of per-device tokens/s.

With train.compile=true both models compile their transformer blocks (torch.compile per block, as
megalm.model.compile does for megalm's layers). The warm-up steps absorb the compilation: each
phase reports the seconds it spent compiling during warm-up (`compile_s`) and during the timed steps
(`compile_s_timed`, 0 unless something recompiled; the report flags it: raise --warmup).

On multi-rank runs (torchrun) each rank also times the baseline on its own device, for its
data-parallel share of the batch; a step takes as long as its slowest rank (per-step maxima over
ranks), and the ratio compares per-device throughput.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megalm.config import Config, ModelConfig, grad_accum_steps
from megalm.data.batch import Batch
from megalm.data.pipeline import build_sampler, build_sources
from megalm.distributed import ParallelGroups
from megalm.metrics import guess_peak_tflops, throughput, training_flops_per_token
from megalm.model.gpt import prefix_attention_mask
from megalm.model.layers import apply_rotary, rotary_cos_sin
from megalm.topology import Topology

IGNORE_INDEX = -100
NOISY_SPREAD = 1.5  # a phase whose slowest timed step exceeds its fastest by this factor is flagged


# ---- the plain single-device baseline: a nanoGPT-style GPT in [b, s, h] layout -------------------
def _rotary_tables(seq_len: int, head_dim: int, base: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [s, d]: megalm's rotary tables in the baseline's layout (same positions, same math)."""
    cos, sin = rotary_cos_sin(seq_len, head_dim, base, device)  # [s, 1, 1, d]
    return cos[:, 0, 0], sin[:, 0, 0]


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [b, nh, s, d] by position: the baseline's [b, nh, s, d] layout of megalm's apply_rotary."""
    return apply_rotary(x, cos, sin)


class BaselineAttention(nn.Module):
    """Causal (or prefix-masked) self-attention with one fused qkv projection, q|k|v blocks."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim()
        self.dropout = cfg.attention_dropout
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor], rotary: Optional[tuple]) -> torch.Tensor:
        batch, seq_len, hidden = x.shape  # [b, s, h]
        q, k, v = self.qkv(x).split(hidden, dim=2)
        q, k, v = (t.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if rotary is not None:  # [b, nh, s, d]
            q, k = _apply_rotary(q, *rotary), _apply_rotary(k, *rotary)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=mask is None
        )
        return self.proj(out.transpose(1, 2).reshape(batch, seq_len, hidden))


class BaselineMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.ffn_size())
        self.fc2 = nn.Linear(cfg.ffn_size(), cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class BaselineBlock(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.attn = BaselineAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.mlp = BaselineMLP(cfg)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor], rotary: Optional[tuple]) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln1(x), mask, rotary))
        return x + self.dropout(self.mlp(self.ln2(x)))


class BaselineGPT(nn.Module):
    """A plain GPT LM / PrefixLM: token (+ learned position) embedding, blocks, final norm, tied output."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # the real vocab, no padding
        self.position_embedding = (
            nn.Embedding(cfg.max_positions(), cfg.hidden_size) if cfg.position_embedding == "learned" else None
        )
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.blocks = nn.ModuleList(BaselineBlock(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)

    def forward(
        self, tokens: torch.Tensor, labels: torch.Tensor, prefix_lengths: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Summed cross-entropy over the labels that are not IGNORE_INDEX; tokens, labels [b, s]."""
        seq_len = tokens.shape[1]
        x = self.token_embedding(tokens)  # [b, s, h]
        if self.position_embedding is not None:
            x = x + self.position_embedding.weight[:seq_len]
        x = self.dropout(x)
        mask = prefix_attention_mask(prefix_lengths, seq_len) if self.cfg.family == "prefixlm" else None
        rotary = None
        if self.cfg.position_embedding == "rotary":
            rotary = _rotary_tables(seq_len, self.cfg.head_dim(), self.cfg.rotary_base, tokens.device)
        for block in self.blocks:
            x = block(x, mask, rotary)
        logits = F.linear(self.final_norm(x), self.token_embedding.weight)  # [b, s, V]
        return F.cross_entropy(
            logits.float().view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )


def build_baseline(cfg: ModelConfig, seed: int, device: torch.device) -> BaselineGPT:
    """A BaselineGPT with GPT-2 style init: N(0, init_std), residual projections / sqrt(2 layers)."""
    model = BaselineGPT(cfg)
    generator = torch.Generator().manual_seed(seed)
    scaled_std = cfg.init_std / math.sqrt(2.0 * cfg.num_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif ".ln" in name or name.startswith("final_norm"):
                param.fill_(1.0)
            else:
                std = scaled_std if name.endswith(("proj.weight", "fc2.weight")) else cfg.init_std
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model.to(device)


def load_from_megalm(baseline: BaselineGPT, megalm_model: nn.Module) -> BaselineGPT:
    """Copy the weights of a full (tp = pp = 1) megalm GPTModel into `baseline`, in place.

    megalm's fused qkv rows are ordered (head, q|k|v, head_dim); the baseline's (q|k|v, head,
    head_dim). The padded vocabulary rows of megalm's embedding are dropped.
    """
    groups = getattr(megalm_model, "groups", None)
    if groups is None or groups.tp_size != 1 or groups.pp_size != 1:
        raise ValueError("load_from_megalm needs a full megalm model (tp = pp = 1); gather the shards first")
    cfg = baseline.cfg
    heads, head_dim, hidden = cfg.num_heads, cfg.head_dim(), cfg.hidden_size
    source = {name: t.detach() for name, t in megalm_model.state_dict().items()}

    def qkv(t: torch.Tensor) -> torch.Tensor:
        return t.view(heads, 3, head_dim, *t.shape[1:]).transpose(0, 1).reshape(3 * hidden, *t.shape[1:])

    target = {"token_embedding.weight": source["embedding.word.weight"][: cfg.vocab_size]}
    if baseline.position_embedding is not None:
        target["position_embedding.weight"] = source["embedding.position"]
    for i in range(cfg.num_layers):
        for kind in ("weight", "bias"):
            src, dst = f"layers.{i}.", f"blocks.{i}."
            for part in ("ln1", "ln2", "attn.proj", "mlp.fc1", "mlp.fc2"):
                target[f"{dst}{part}.{kind}"] = source[f"{src}{part}.{kind}"]
            target[f"{dst}attn.qkv.{kind}"] = qkv(source[f"{src}attn.qkv.{kind}"])
    for kind in ("weight", "bias"):
        target[f"final_norm.{kind}"] = source[f"final_norm.{kind}"]
    baseline.load_state_dict(target, strict=True)
    return baseline


def build_baseline_optimizer(model: nn.Module, config: Config, device: torch.device) -> torch.optim.AdamW:
    """torch.optim.AdamW (fused on CUDA, foreach on CPU); no weight decay on 1-D params."""
    optim = config.optim
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, **extra)


class TransformersGPT2(nn.Module):
    """Hugging Face `transformers`' GPT2LMHeadModel of megalm's shape (the optional third phase).

    Same layers, hidden size, heads, FFN, vocabulary (unpadded), tied output layer, LayerNorm eps,
    dropouts and tanh GeLU ("gelu_new"), attention through SDPA. GPT-2 has learned absolute
    positions only: a rotary megalm config is timed against learned positions (the difference is
    an [s, h] add against megalm's rotations of q and k). GPT-2 is causal; a PrefixLM run passes
    the prefix mask as a [b, 1, s, s] boolean attention mask, which transformers applies as given.
    Its own weight init; the loss is computed here, as the plain baseline computes it.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.cfg = cfg
        config = GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.max_positions(), n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.ffn_size(), activation_function="gelu_new",
            resid_pdrop=cfg.hidden_dropout, embd_pdrop=cfg.hidden_dropout, attn_pdrop=cfg.attention_dropout,
            layer_norm_epsilon=cfg.layernorm_eps, tie_word_embeddings=True, use_cache=False,
            bos_token_id=None, eos_token_id=None,
        )
        self.model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")

    def forward(
        self, tokens: torch.Tensor, labels: torch.Tensor, prefix_lengths: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Summed cross-entropy over the labels that are not IGNORE_INDEX; tokens, labels [b, s]."""
        mask = prefix_attention_mask(prefix_lengths, tokens.shape[1]) if self.cfg.family == "prefixlm" else None
        logits = self.model(input_ids=tokens, attention_mask=mask, use_cache=False).logits  # [b, s, V]
        return F.cross_entropy(
            logits.float().view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )


def transformers_missing() -> Optional[str]:
    """Why the transformers phase cannot run here (None when it can)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "Hugging Face transformers is not installed (pip install 'megalm[hf]')"
    return None


def build_transformers_gpt2(cfg: ModelConfig, seed: int, device: torch.device) -> TransformersGPT2:
    """transformers' own init, drawn from `seed` without disturbing the process's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TransformersGPT2(cfg).to(device)


BaselineBatch = tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]  # tokens, labels, prefix_lengths


def baseline_batches(batches: list[Batch]) -> list[BaselineBatch]:
    """The same micro-batches with the loss mask folded into the labels (IGNORE_INDEX)."""
    return [
        (b.tokens, b.labels.masked_fill(b.loss_mask == 0, IGNORE_INDEX), b.prefix_lengths) for b in batches
    ]


def make_baseline_step(
    model: BaselineGPT, optimizer: torch.optim.Optimizer, config: Config, data: list[list[BaselineBatch]]
) -> Callable[[int], torch.Tensor]:
    """One optimizer step of the baseline: accumulate over the micro-batches, clip, AdamW.

    The learning rate stays at optim.lr: megalm's schedule changes values, not work.
    """
    device = next(model.parameters()).device
    params = list(model.parameters())
    clip = config.optim.clip_grad
    bf16 = config.train.precision == "bf16"

    def step(index: int) -> torch.Tensor:
        batches = data[index]
        # Mean over the step's loss tokens, as megalm computes it (PrefixLM micro-batches differ).
        num_tokens = sum((labels != IGNORE_INDEX).sum() for _, labels, _ in batches)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for tokens, labels, prefix_lengths in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(tokens, labels, prefix_lengths) / num_tokens
            loss.backward()
            loss_sum += loss.detach()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        optimizer.step()
        return loss_sum

    return step


# ---- timing -------------------------------------------------------------------------------------
class PreparedBatches:
    """Stands in for the BatchSampler with micro-batches built (and moved to the device) in advance."""

    def __init__(self, steps: list[list[Batch]]) -> None:
        self.steps = steps

    def micro_batches(self, step: int) -> list[Batch]:
        return self.steps[step]


class PeakMemory:
    """Peak memory of one phase: CUDA max allocated, or on CPU the peak RSS (VmHWM, reset per phase)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.per_phase = device.type == "cuda"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")
            self.per_phase = True
        except OSError:
            self.per_phase = False

    def read(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if self.per_phase:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def description(self) -> str:
        if self.device.type == "cuda":
            return "peak allocated CUDA memory during the timed steps"
        if self.per_phase:
            return "peak RSS of the whole process (runtime included) during the timed steps"
        return "peak RSS of the process since start (the baseline ran first; megalm's figure includes it)"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class PhaseResult:
    """Raw timings of one model: per-step seconds and losses of the timed steps, peak memory."""

    name: str
    step_times_s: list[float]
    losses: list[float]
    peak_memory_bytes: int
    tokens_per_step: int  # tokens this phase's devices process per optimizer step, all of them
    num_devices: int
    num_parameters: int
    memory_kind: str
    compile_s: Optional[float] = None  # train.compile: seconds compiling during warm-up
    compile_s_timed: Optional[float] = None  # ... and during the timed steps (0 when warm-up absorbed it)


def time_steps(
    step_fn: Callable[[int], float | torch.Tensor],
    warmup: int,
    steps: int,
    device: torch.device,
    memory: PeakMemory,
    barrier: bool,
    compile_times: Optional[list[float]] = None,
) -> tuple[list[float], list[float], int]:
    """Run `warmup` untimed then `steps` timed steps; return step seconds, losses and peak memory.

    compile_times: when given, receives the seconds spent compiling during warm-up and during the
    timed steps (megalm.model.compile.compile_seconds)."""
    from megalm.model.compile import compile_seconds

    compiled_before = compile_seconds()
    for index in range(warmup):
        step_fn(index)
    _synchronize(device)
    compiled_warm = compile_seconds()
    gc.collect()
    memory.reset()
    times, losses = [], []
    for index in range(warmup, warmup + steps):
        if barrier:
            dist.barrier()
        _synchronize(device)
        start = time.perf_counter()
        loss = step_fn(index)
        _synchronize(device)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    if compile_times is not None:
        compile_times += [compiled_warm - compiled_before, compile_seconds() - compiled_warm]
    return times, losses, memory.read()


def _max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum over all ranks (a step lasts as long as its slowest rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


# ---- the two phases -------------------------------------------------------------------------------
def prepare_batches(config: Config, groups: ParallelGroups, num_steps: int) -> list[list[Batch]]:
    """This rank's micro-batches of every step, generated once and moved to the device."""
    data = build_sampler(config, build_sources(config).train, groups.dp_rank, groups.dp_size)
    return [[b.to(groups.device) for b in data.micro_batches(step)] for step in range(num_steps)]


def run_baseline(
    config: Config, groups: ParallelGroups, batches: list[list[Batch]], warmup: int, steps: int,
    builder: Callable[[ModelConfig, int, torch.device], nn.Module] = build_baseline, name: str = "plain PyTorch",
) -> Optional[PhaseResult]:
    """Time a single-device GPT (the plain one, or transformers') on this rank's share of each step;
    None if it does not fit on the device."""
    device = groups.device
    memory = PeakMemory(device)
    failed = 0.0
    compiled: list[float] = []
    try:
        model = builder(config.model, config.train.seed, device)
        if config.train.compile:
            _compile_blocks(model)
        optimizer = build_baseline_optimizer(model, config, device)
        step = make_baseline_step(model, optimizer, config, [baseline_batches(b) for b in batches])
        times, losses, peak = time_steps(step, warmup, steps, device, memory, barrier=False, compile_times=compiled)
        num_parameters = sum(p.numel() for p in model.parameters())
    except torch.cuda.OutOfMemoryError:
        failed, times, losses, peak, num_parameters = 1.0, [], [], 0, 0
    model = optimizer = step = None  # noqa: F841 - free this model before the next phase builds its own
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if _max_over_ranks([failed], device)[0] > 0:
        return None
    local_tokens = sum(b.tokens.numel() for b in batches[0])
    return PhaseResult(
        name, _max_over_ranks(times, device), losses, int(_max_over_ranks([peak], device)[0]),
        local_tokens, 1, num_parameters, memory.description(), *_compile_times(config, compiled, device),
    )


def _compile_blocks(model: nn.Module) -> None:
    """train.compile: torch.compile each transformer block of a comparison model, as megalm compiles
    each of its layers (megalm.model.compile), so the ratios compare compiled with compiled."""
    from megalm.model import compile as compile_module

    blocks = model.blocks if isinstance(model, BaselineGPT) else model.model.transformer.h
    for block in blocks:
        block.compile(backend=compile_module.DEFAULT_BACKEND)


def _compile_times(config: Config, compiled: list[float], device: torch.device) -> tuple[Optional[float], ...]:
    """(warm-up, timed) compile seconds, the maxima over ranks; (None, None) without train.compile."""
    if not config.train.compile:
        return None, None
    return tuple(_max_over_ranks(compiled, device))


def run_megalm(
    config: Config, groups: ParallelGroups, batches: list[list[Batch]], warmup: int, steps: int
) -> PhaseResult:
    """Time megalm's Trainer.train_step on the pre-generated micro-batches."""
    from megalm.model.gpt import count_parameters
    from megalm.train import build_trainer

    trainer = build_trainer(config, groups, None)
    trainer.data = PreparedBatches(batches)
    memory = PeakMemory(groups.device)
    compiled: list[float] = []
    try:
        barrier = dist.is_initialized() and dist.get_world_size() > 1
        step = lambda index: trainer.train_step(index).loss  # noqa: E731
        times, losses, peak = time_steps(step, warmup, steps, groups.device, memory, barrier, compiled)
    finally:
        trainer.metrics.close()
    world = groups.topology.world_size
    return PhaseResult(
        "megalm", _max_over_ranks(times, groups.device), losses, int(_max_over_ranks([peak], groups.device)[0]),
        config.train.global_batch_size * config.model.seq_length, world, sum(count_parameters(chunk) for chunk in trainer.chunks),
        memory.description(), *_compile_times(config, compiled, groups.device),
    )


# ---- report ---------------------------------------------------------------------------------------
def summarize(phase: PhaseResult, config: Config, peak_tflops: Optional[float]) -> dict:
    """Median step time and the rates that follow from it, plus the raw per-step numbers."""
    median = statistics.median(phase.step_times_s)
    rates = throughput(config.model, phase.tokens_per_step, median, phase.num_devices, peak_tflops)
    return {
        "median_step_s": median,
        "min_step_s": min(phase.step_times_s),
        "max_step_s": max(phase.step_times_s),
        "tokens_per_step": phase.tokens_per_step,
        "num_devices": phase.num_devices,
        "tokens_per_s": rates["tokens_per_s"],
        "tokens_per_s_per_device": rates["tokens_per_s"] / phase.num_devices,
        "tflops_per_device": rates["tflops_per_device"],
        "mfu": rates["mfu"],
        "peak_memory_bytes": phase.peak_memory_bytes,
        "peak_memory_gib": phase.peak_memory_bytes / 2**30,
        "num_parameters_on_rank0": phase.num_parameters,
        "step_times_s": phase.step_times_s,
        "losses": phase.losses,
        "compile_s": phase.compile_s,
        "compile_s_timed": phase.compile_s_timed,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'s' if threads != 1 else ''})"


PHASES = (("megalm", "megalm"), ("baseline", "plain PyTorch"), ("transformers", "transformers GPT-2"))


def format_report(result: dict) -> str:
    """The table printed by `megalm bench`."""
    multi = result["world_size"] > 1
    header = ["", "step ms", "tokens/s"] + (["tokens/s/device"] if multi else []) + [
        "TFLOP/s/device", "MFU", "peak mem GiB"
    ]
    rows = [header]
    for key, label in PHASES:
        entry = result.get(key)
        if entry is None:
            continue
        mfu = f"{100 * entry['mfu']:.1f}%" if entry["mfu"] is not None else "n/a"
        row = [label, f"{1e3 * entry['median_step_s']:.1f}", f"{entry['tokens_per_s']:,.0f}"]
        if multi:
            row.append(f"{entry['tokens_per_s_per_device']:,.0f}")
        row += [f"{entry['tflops_per_device']:.4g}", mfu, f"{entry['peak_memory_gib']:.3f}"]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    table = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    model = result["model"]
    lines = [
        f"megalm bench {result['config']} | device {result['device']} | {result['layout']}",
        f"model {model['family']}: {model['num_layers']} layers, hidden {model['hidden_size']}, "
        f"{model['num_heads']} heads, seq {model['seq_length']}, vocab {model['vocab_size']} | "
        f"{result['precision']} | global batch {result['global_batch_size']} = micro {result['micro_batch_size']} "
        f"x dp {result['dp']} x accumulation {result['grad_accum_steps']} | median of {result['steps']} steps "
        f"after {result['warmup']} warm-up" + (" | compiled layers (train.compile)" if result.get("compile") else ""),
        *table,
    ]
    if result["ratio_tokens_per_s"] is not None:
        lines.append(f"ratio megalm/baseline tokens/s: {result['ratio_tokens_per_s']:.2f}")
    elif result.get("baseline_skipped"):
        lines.append(f"baseline: {result['baseline_skipped']}")
    if result.get("ratio_transformers_tokens_per_s") is not None:
        lines.append(f"ratio megalm/transformers tokens/s: {result['ratio_transformers_tokens_per_s']:.2f}")
    elif result.get("transformers_skipped"):
        lines.append(f"transformers GPT-2: skipped, {result['transformers_skipped']}")
    notes = [f"peak memory: {result['peak_memory_kind']}"]
    for key, label in PHASES:
        entry = result.get(key)
        if entry is None or entry.get("compile_s") is None:
            continue
        notes.append(f"{label} compiled for {entry['compile_s']:.1f} s during warm-up")
        if entry["compile_s_timed"] > 0:
            notes.append(f"{label} compiled for {entry['compile_s_timed']:.1f} s during the timed steps: those "
                         f"timings include compilation; raise --warmup")
    if result.get("planned_peak_gib") and not result["device"].startswith("cpu"):  # CPU: RSS, not comparable
        measured = result["megalm"]["peak_memory_gib"]
        notes.append(f"megalm plan predicts {result['planned_peak_gib']:.3f} GiB for megalm's peak (measured/planned "
                     f"{measured / result['planned_peak_gib']:.2f})")
    planned = result.get("planned")
    if planned:
        measured = result["megalm"]["tokens_per_s"]
        notes.append(f"megalm plan predicts {planned['tokens_per_s']:,.0f} tokens/s, MFU {100 * planned['mfu']:.1f}% on "
                     f"{planned['cluster']} (measured/planned {measured / planned['tokens_per_s']:.2f}; the plan "
                     f"models no compilation)")
    for key, label in PHASES:
        entry = result.get(key)
        if entry is not None and entry["max_step_s"] > NOISY_SPREAD * entry["min_step_s"]:
            notes.append(
                f"noisy timings: {label} steps took {1e3 * entry['min_step_s']:.1f} to "
                f"{1e3 * entry['max_step_s']:.1f} ms (a busy machine?); rerun, or raise --steps"
            )
    if multi:
        notes.append(
            "megalm tokens/s is the whole job's; the baseline ran on every device for its data-parallel "
            "share; step times are per-step maxima over ranks; the ratio compares tokens/s per device"
        )
    if result["peak_tflops"] is None:
        notes.append("MFU needs log.peak_tflops on this device")
    lines += [f"  note: {note}" for note in notes]
    return "\n".join(lines)


def planned_peak_bytes(config: Config, topology: Topology) -> int:
    """What `megalm plan` predicts megalm's most loaded rank holds at its peak (reserved memory left
    out: the benchmark reports allocated memory), for comparison with the measured peak on a GPU."""
    from megalm.plan import get_numerics, load_cluster, stage_memory
    from megalm.plan.layout import layout_from_config

    layout = layout_from_config(config, gpus=topology.world_size)
    cluster, numerics = load_cluster("h100-80gb"), get_numerics("megalm")  # the cluster only sets `reserved`
    stages = [stage_memory(config.model, layout, cluster, numerics, config.train.precision, pp_rank)
              for pp_rank in range(topology.pp)]
    return max(stage.total - stage.reserved for stage in stages)


def plan_cluster(device: str) -> Optional[str]:
    """The shipped `megalm plan` cluster of a GPU by its name: A100 and H100 (an H200 is planned as an
    H100, whose dense bf16 peak it shares; its HBM is 1.4x faster); None for a CPU or another GPU."""
    name = device.upper()
    if "A100" in name:
        return "a100-80gb"
    if "H100" in name or "H200" in name:
        return "h100-80gb"
    return None


def planned_throughput(config: Config, topology: Topology, device: str) -> Optional[dict]:
    """What `megalm plan` predicts for this run on the device's cluster (tokens/s of the whole job and
    MFU), printed beside the measured figures so every GPU bench checks the planner's time model."""
    from megalm.plan import get_numerics, load_cluster, make_plan
    from megalm.plan.layout import layout_from_config

    cluster = plan_cluster(device)
    if cluster is None:
        return None
    layout = layout_from_config(config, gpus=topology.world_size)
    plan = make_plan(config.model, layout, load_cluster(cluster), get_numerics("megalm"), config.train.precision)
    return {"cluster": cluster, "tokens_per_s": plan.time.tokens_per_s, "mfu": plan.time.mfu}


def run_bench(config: Config, topology: Topology, args: argparse.Namespace) -> int:
    """`megalm bench`: time megalm and (unless --no-baseline) the plain baseline; print, write JSON."""
    from megalm.distributed import allow_tf32, build_parallel_groups, init_distributed, resolve_device
    from megalm.metrics import setup_logging

    steps, warmup = int(args.steps), int(args.warmup)
    if steps < 1 or warmup < 0:
        print(f"megalm bench: --steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}", file=sys.stderr)
        return 2
    device = resolve_device(config.train.device)
    tf32 = allow_tf32(device, config.train.precision)  # as `megalm train` does: both phases time the same math
    rank, _ = init_distributed(device)
    setup_logging(rank, config.log.all_ranks)
    groups = build_parallel_groups(topology, rank, device)
    try:
        batches = prepare_batches(config, groups, warmup + steps)
        baseline = None if args.no_baseline else run_baseline(config, groups, batches, warmup, steps)
        hf_skipped = "--no-baseline" if args.no_baseline else (
            "--no-transformers" if getattr(args, "no_transformers", False) else transformers_missing()
        )
        hf = None
        if hf_skipped is None:
            hf = run_baseline(config, groups, batches, warmup, steps, build_transformers_gpt2, "transformers GPT-2")
            if hf is None:
                hf_skipped = "transformers' GPT-2 did not fit on one device (out of memory)"
        megalm = run_megalm(config, groups, batches, warmup, steps)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

    peak_tflops = config.log.peak_tflops or guess_peak_tflops(device)
    result = {
        "config": getattr(args, "config", None),
        "overrides": list(getattr(args, "overrides", []) or []),
        "device": device_name(device),
        "torch_version": torch.__version__,
        "tf32": tf32,
        "layout": topology.describe(),
        "world_size": topology.world_size,
        "dp": topology.dp,
        "precision": config.train.precision,
        "compile": config.train.compile,
        "global_batch_size": config.train.global_batch_size,
        "micro_batch_size": config.train.micro_batch_size,
        "grad_accum_steps": grad_accum_steps(config, topology.dp),
        "steps": steps,
        "warmup": warmup,
        "model": asdict(config.model),
        "flops_per_token": training_flops_per_token(config.model),
        "peak_tflops": peak_tflops,
        "peak_memory_kind": megalm.memory_kind,
        "megalm": summarize(megalm, config, peak_tflops),
        "baseline": summarize(baseline, config, peak_tflops) if baseline is not None else None,
        "planned_peak_gib": planned_peak_bytes(config, topology) / 2**30,
        "planned": planned_throughput(config, topology, device_name(device)),
        "transformers": summarize(hf, config, peak_tflops) if hf is not None else None,
        "transformers_skipped": hf_skipped,
        "ratio_tokens_per_s": None,
        "ratio_transformers_tokens_per_s": None,
        "baseline_skipped": "--no-baseline" if args.no_baseline else (
            None if baseline is not None else "the plain model did not fit on one device (out of memory)"
        ),
    }
    if result["baseline"] is not None:
        result["ratio_tokens_per_s"] = (
            result["megalm"]["tokens_per_s_per_device"] / result["baseline"]["tokens_per_s_per_device"]
        )
    if result["transformers"] is not None:
        result["ratio_transformers_tokens_per_s"] = (
            result["megalm"]["tokens_per_s_per_device"] / result["transformers"]["tokens_per_s_per_device"]
        )
    if rank == 0:
        print(format_report(result), flush=True)
        if getattr(args, "json", None):
            path = Path(args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0

