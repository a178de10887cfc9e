"""The training loop, given everything explicitly: config, groups, model, optimizer, data."""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megalm.config import Config, config_to_yaml, grad_accum_steps, resolved_decay_steps
from megalm.data.batch import Batch
from megalm.data.synthetic import SyntheticBatches
from megalm.distributed import ParallelGroups, all_reduce_
from megalm.metrics import MetricsWriter, get_logger, guess_peak_tflops, peak_memory_bytes, throughput
from megalm.model.gpt import GPTModel, build_model, count_parameters
from megalm.optim import build_optimizer, clip_grad_norm_, lr_at, set_lr
from megalm.parallel.data import all_reduce_gradients
from megalm.parallel.tensor import all_reduce_sequence_parallel_grads


@dataclass
class StepResult:
    step: int
    loss: float
    lr: float
    grad_norm: float
    seconds: float
    tokens: int


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16: parameters and optimizer stay fp32, matmuls run in bf16 under torch.autocast."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Trainer:
    """Runs optimizer steps: micro-batch forward/backward, gradient sync, clipping, AdamW, logging."""

    def __init__(
        self,
        config: Config,
        groups: ParallelGroups,
        model: GPTModel,
        optimizer: torch.optim.Optimizer,
        data: SyntheticBatches,
        metrics: MetricsWriter,
    ) -> None:
        if groups.pp_size > 1:
            raise NotImplementedError(
                f"parallel.pp={groups.pp_size}: pipeline execution is not implemented in this version "
                f"(the model already builds per-stage shards); train with parallel.pp=1, or use --dry-run "
                f"to check a pipelined layout"
            )
        self.config = config
        self.groups = groups
        self.model = model
        self.optimizer = optimizer
        self.data = data
        self.metrics = metrics
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.decay_steps = resolved_decay_steps(config)
        self.peak_tflops = config.log.peak_tflops or guess_peak_tflops(groups.device)
        self.tokens_per_step = config.train.global_batch_size * config.model.seq_length
        self.logger = get_logger()

    def _global_loss_tokens(self, batches: list[Batch]) -> torch.Tensor:
        local = sum(batch.loss_mask.sum() for batch in batches).to(self.groups.device, torch.float32)
        return all_reduce_(local.clone(), self.groups.dp_group)

    def train_step(self, step: int) -> StepResult:
        """One optimizer step over the global batch of `step`."""
        start = time.perf_counter()
        device = self.groups.device
        batches = [batch.to(device) for batch in self.data.micro_batches(step)]
        # Normalise by the global count of loss tokens so every layout computes the same mean.
        global_tokens = self._global_loss_tokens(batches)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for batch in batches:
            with autocast_context(self.config.train.precision, device):
                losses = self.model(batch.tokens, labels=batch.labels, prefix_lengths=batch.prefix_lengths)
            loss = (losses.float() * batch.loss_mask).sum() / global_tokens
            loss.backward()
            loss_sum += loss.detach()
        all_reduce_sequence_parallel_grads(self.params, self.groups)
        all_reduce_gradients(self.params, self.groups.dp_group)
        grad_norm = clip_grad_norm_(self.params, self.config.optim.clip_grad, self.groups)
        lr = lr_at(step, self.config.optim, self.decay_steps)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        all_reduce_(loss_sum, self.groups.dp_group)
        loss_value = loss_sum.item()
        return StepResult(step, loss_value, lr, grad_norm, time.perf_counter() - start, self.tokens_per_step)

    def record(self, result: StepResult) -> dict:
        """Metrics of one step: written to JSONL every step, logged every log.interval steps."""
        rates = throughput(
            self.config.model, result.tokens, result.seconds, self.groups.topology.world_size, self.peak_tflops
        )
        record = {
            "step": result.step + 1,
            "loss": result.loss,
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "step_time_s": result.seconds,
            **rates,
            "peak_memory_gb": peak_memory_bytes(self.groups.device) / 2**30,
        }
        self.metrics.write(record)
        step = result.step + 1
        if step % self.config.log.interval == 0 or step == 1 or step == self.config.train.steps:
            mfu = f"{100 * record['mfu']:.1f}%" if record["mfu"] is not None else "n/a"
            self.logger.info(
                f"step {step:>6}/{self.config.train.steps} | loss {result.loss:.4f} | lr {result.lr:.3e} | "
                f"grad norm {result.grad_norm:.3f} | {rates['tokens_per_s']:,.0f} tok/s | "
                f"{rates['tflops_per_device']:.3g} TFLOP/s/device | MFU {mfu} | "
                f"mem {record['peak_memory_gb']:.2f} GB"
            )
        return record

    def fit(self, steps: Optional[int] = None) -> list[dict]:
        """Train for `steps` (default train.steps) and return the per-step records."""
        records = [self.record(self.train_step(step)) for step in range(steps or self.config.train.steps)]
        if records:
            times = [r["step_time_s"] for r in records[1:]] or [records[0]["step_time_s"]]
            self.logger.info(
                f"done: {len(records)} steps, loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}, "
                f"median step {statistics.median(times) * 1e3:.1f} ms"
            )
        return records


def build_trainer(config: Config, groups: ParallelGroups, run_dir: Optional[Path]) -> Trainer:
    """Model shard, optimizer, data and metrics file for this rank; run_dir=None writes nothing."""
    logger = get_logger()
    model = build_model(config.model, groups, config.train.seed, config.parallel.sequence_parallel)
    model.rng.seed_replicated()
    optimizer = build_optimizer(model, config.optim, groups.device)
    data = SyntheticBatches(config, groups.dp_rank, groups.dp_size)
    writer_path = run_dir / "metrics.jsonl" if (run_dir is not None and groups.rank == 0) else None
    metrics = MetricsWriter(writer_path)
    metrics.write({"event": "start", "time": time.time(), "world_size": groups.topology.world_size})
    logger.info(
        f"{groups.topology.describe()} | {count_parameters(model):,} parameters on rank {groups.rank} | "
        f"accumulation {grad_accum_steps(config, groups.dp_size)} x micro batch {config.train.micro_batch_size}"
    )
    return Trainer(config, groups, model, optimizer, data, metrics)


def write_resolved_config(config: Config, run_dir: Path) -> Path:
    """Save the resolved config beside the run's outputs (atomically: temp file then rename)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(config_to_yaml(config), encoding="utf-8")
    tmp.replace(path)
    return path


def _stage_groups(topology, pp_rank: int) -> ParallelGroups:
    """Groups of the (pp_rank, dp 0, tp 0) rank, for building a stage on the meta device."""
    return ParallelGroups(topology=topology, rank=topology.rank(pp_rank, 0, 0), device=torch.device("cpu"))


def dry_run_report(config: Config, topology) -> str:
    """Parameter counts and layout, built on the meta device: nothing is allocated or launched."""
    lines = [topology.describe()]
    total = 0
    per_rank = []
    for pp_rank in range(topology.pp):
        model = build_model(config.model, _stage_groups(topology, pp_rank), config.train.seed, materialize=False)
        rank_params = count_parameters(model)
        per_rank.append((pp_rank, list(model.layer_ids), rank_params))
        for param in model.parameters():
            if getattr(param, "embedding_copy", False):
                continue
            total += param.numel() * (topology.tp if getattr(param, "tp_split_dim", None) is not None else 1)
    accum = grad_accum_steps(config, topology.dp)
    lines.append(
        f"model: {config.model.family}, {config.model.num_layers} layers, hidden {config.model.hidden_size}, "
        f"{config.model.num_heads} heads, seq {config.model.seq_length}, vocab {config.model.vocab_size} "
        f"(padded to {config.model.padded_vocab_size(topology.tp)})"
    )
    lines.append(f"parameters: {total:,} ({total / 1e9:.2f} B)")
    lines.append(
        f"batch: global {config.train.global_batch_size} = micro {config.train.micro_batch_size} x dp "
        f"{topology.dp} x accumulation {accum}; {config.train.global_batch_size * config.model.seq_length:,} "
        f"tokens per step"
    )
    shown = per_rank if len(per_rank) <= 6 else per_rank[:3] + [None] + per_rank[-2:]
    for entry in shown:
        if entry is None:
            lines.append("  ...")
            continue
        pp_rank, layer_ids, count = entry
        layers = f"layers {layer_ids[0]}-{layer_ids[-1]}" if layer_ids else "no layers"
        lines.append(
            f"  stage {pp_rank:>3}: {layers}, {count:,} parameters per rank, "
            f"{16 * count / 2**30:.1f} GiB of fp32 weights + grads + Adam states"
        )
    return "\n".join(lines)
