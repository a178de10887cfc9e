"""`megalm bench`: time megalm's training step against a plain PyTorch GPT of the same shape.

Both are timed in the same process, on the same device, on the same pre-generated micro-batches
(this rank's share of each global batch, already on the device), with the same number of
micro-batches per optimizer step, the same `train.precision`, optimizer, clipping, warm-up and timed step
counts. In bf16 the baseline trains the way a plain PyTorch (nanoGPT-style) loop does, under
torch.autocast over fp32 weights, while megalm holds bf16 weights with fp32 main gradients and
masters (Megatron-style): the ratio therefore includes the gain of megalm's precision scheme.
When Hugging Face `transformers` is installed (the optional `hf` extra), its model of the same shape
is timed too, trained exactly as the plain baseline is, and a second ratio megalm / transformers is
reported; without it the report says it was skipped. The model follows the spec's fields
(`transformers_baseline`): GPT2LMHeadModel for a GPT, LlamaForCausalLM (Qwen2ForCausalLM for biases
on q, k, v only) for RMSNorm + SwiGLU + rotary, with the same kv heads, head_dim, tied or untied
output and rope scaling. The plain baseline is a GPT: a Llama-style spec skips it and says why (the
baseline models are in megalm/bench_baselines.py; the timing, phases and report are here). The
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
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from megalm.bench_baselines import (
    BaselineGPT,
    baseline_batches,
    build_baseline,
    build_baseline_optimizer,
    make_baseline_step,
    plain_baseline_mismatch,
    transformers_baseline,
    transformers_missing,
)
from megalm.config import Config, ModelConfig, grad_accum_steps
from megalm.data.batch import Batch
from megalm.data.pipeline import build_sampler, build_sources
from megalm.distributed import ParallelGroups
from megalm.metrics import guess_peak_tflops, throughput
from megalm.plan.flops import training_flops_per_token
from megalm.topology import Topology

NOISY_SPREAD = 1.5  # a phase whose slowest timed step exceeds its fastest by this factor is flagged


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

    if isinstance(model, BaselineGPT):
        blocks = model.blocks
    elif hasattr(model, "blocks"):  # TransformersLlama
        blocks = model.blocks()
    else:  # TransformersGPT2
        blocks = model.model.transformer.h
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


def phase_label(result: dict, key: str) -> str:
    """A phase's name in the report: the transformers phase names its model (GPT-2, Llama, Qwen2)."""
    if key == "transformers" and result.get("transformers_model"):
        return result["transformers_model"]
    return dict(PHASES)[key]


def spec_summary(model: dict) -> str:
    """The model fields that differ from a GPT's, for the report's model line ("" for a GPT)."""
    parts = []
    if model.get("num_kv_heads") and model["num_kv_heads"] != model["num_heads"]:
        parts.append(f"{model['num_kv_heads']} kv heads")
    if model.get("head_dim"):
        parts.append(f"head_dim {model['head_dim']}")
    for name, default in (("norm", "layernorm"), ("mlp", "gelu")):
        if model.get(name, default) != default:
            parts.append(model[name])
    if not model.get("bias", True):
        parts.append("no biases" if not model.get("qkv_bias") else "q/k/v biases only")
    if not model.get("tie_embeddings", True):
        parts.append("untied")
    if model.get("rope_scaling", "none") != "none":
        parts.append(f"rope {model['rope_scaling']}")
    return (" (" + ", ".join(parts) + ")") if parts else ""


def format_report(result: dict) -> str:
    """The table printed by `megalm bench`."""
    multi = result["world_size"] > 1
    header = ["", "step ms", "tokens/s"] + (["tokens/s/device"] if multi else []) + [
        "TFLOP/s/device", "MFU", "peak mem GiB"
    ]
    rows = [header]
    for key, _ in PHASES:
        entry, label = result.get(key), phase_label(result, key)
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
        f"{model['num_heads']} heads{spec_summary(model)}, seq {model['seq_length']}, vocab {model['vocab_size']} | "
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
        lines.append(f"ratio megalm/transformers tokens/s: {result['ratio_transformers_tokens_per_s']:.2f} "
                     f"({phase_label(result, 'transformers')})")
    elif result.get("transformers_skipped"):
        lines.append(f"{phase_label(result, 'transformers')}: skipped, {result['transformers_skipped']}")
    notes = [f"peak memory: {result['peak_memory_kind']}"]
    for key, _ in PHASES:
        entry, label = result.get(key), phase_label(result, key)
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
    for key, _ in PHASES:
        entry, label = result.get(key), phase_label(result, key)
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
    """The shipped `megalm plan` cluster of a GPU by its name: A100, H100, H200; None for a CPU or another GPU."""
    name = device.upper()
    if "A100" in name:
        return "a100-80gb"
    if "H200" in name:
        return "h200-141gb"
    if "H100" in name:
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
        plain_skipped = "--no-baseline" if args.no_baseline else plain_baseline_mismatch(config.model)
        baseline = None
        if plain_skipped is None:
            baseline = run_baseline(config, groups, batches, warmup, steps)
            if baseline is None:
                plain_skipped = "the plain model did not fit on one device (out of memory)"
        hf_skipped = "--no-baseline" if args.no_baseline else (
            "--no-transformers" if getattr(args, "no_transformers", False) else transformers_missing()
        )
        try:
            hf_label, hf_builder = transformers_baseline(config.model)
        except ValueError as error:
            hf_label, hf_builder = "transformers", None
            hf_skipped = hf_skipped or str(error)
        hf = None
        if hf_skipped is None:
            hf = run_baseline(config, groups, batches, warmup, steps, hf_builder, hf_label)
            if hf is None:
                hf_skipped = f"{hf_label} did not fit on one device (out of memory)"
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
        "transformers_model": hf_label,
        "ratio_tokens_per_s": None,
        "ratio_transformers_tokens_per_s": None,
        "baseline_skipped": plain_skipped,
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

