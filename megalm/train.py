"""The training loop, given everything explicitly: config, groups, model, optimizer, data."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megalm.comm import CommCounter, comm_stats_enabled
from megalm.config import Config, config_to_dict, config_to_yaml, grad_accum_steps, resolved_decay_steps
from megalm.data.batch import Batch
from megalm.data.dataset import trained_on_pairs
from megalm.data.pipeline import DataSources, build_sampler, build_sources
from megalm.data.sampler import BatchSampler
from megalm.data.stats import describe_data
from megalm.data.tokenizer import AnyTokenizer
from megalm.distributed import ParallelGroups, all_reduce_, wait_for
from megalm.faults import maybe_inject
from megalm.generate import Sampling, encode_prompt, generate
from megalm.kernels import describe_kernels
from megalm.metrics import (
    MetricsWriter, build_metrics_writer, format_duration, get_logger, guess_peak_tflops, peak_memory_bytes,
    peak_reserved_bytes, reset_peak_memory, throughput,
)
from megalm.model.attention import describe_attention
from megalm.model.gpt import GPTModel, build_model_chunks, count_parameters, describe_architecture, param_dtype
from megalm.optim import LossScaler, clip_grads_, found_inf, grad_norm, lr_at, set_lr
from megalm.parallel.data import GradientSync
from megalm.parallel.tensor import tp_shard
from megalm.parallel.optimizer import MixedPrecisionOptimizer, build_optimizer_wrapper, bytes_per_parameter
from megalm.parallel.pipeline import PipelineExecutor, activation_shape
from megalm.parallel.schedules import analytic_bubble, build_schedule, simulate
from megalm.stragglers import StepClock, StragglerMonitor, StragglerReport


@dataclass
class StepResult:
    step: int
    loss: float
    lr: float
    grad_norm: float
    seconds: float
    data_seconds: float
    tokens: int
    skipped: bool = False  # fp16 overflow: the optimizer step was skipped
    loss_scale: float = 1.0
    compute_seconds: Optional[float] = None  # this rank's own part of the step (Trainer.train_step); megalm engine


class NonFiniteLossError(RuntimeError):
    """The loss became inf or nan and checkpoint.on_nan is 'stop'."""


class Trainer:
    """Runs optimizer steps: micro-batch forward/backward, gradient sync, clipping, AdamW, logging."""

    def __init__(
        self,
        config: Config,
        groups: ParallelGroups,
        chunks: list[GPTModel],
        optimizer: Optional[MixedPrecisionOptimizer],  # None: built for evaluation only
        data: BatchSampler,
        metrics: MetricsWriter,
        valid: Optional[BatchSampler] = None,
        tokenizer: Optional[AnyTokenizer] = None,
        sync: Optional[GradientSync] = None,
        runner=None,
    ) -> None:
        self.config = config
        self.runner = runner  # a DeepSpeedRunner when train.engine is deepspeed
        self.sync = sync or GradientSync(chunks, groups)
        self.scaler = LossScaler(config.optim) if config.train.precision == "fp16" else None
        self.comm = CommCounter(groups, enabled=comm_stats_enabled(config.log.comm_stats))
        self.groups = groups
        self.chunks = chunks
        self.model = chunks[0]  # the whole model when pp = 1
        self.optimizer = optimizer
        self.executor = PipelineExecutor(
            chunks,
            groups,
            config.parallel.schedule,
            grad_accum_steps(config, groups.dp_size),
            activation_shape(
                config.model.seq_length // groups.cp_size, config.train.micro_batch_size, config.model.hidden_size, groups,
                config.parallel.sequence_parallel,
            ),
            message_dtype=param_dtype(config),  # activations cross stages in the parameters' dtype
        )
        self.data = data
        self.valid = valid
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.params = [p for chunk in chunks for p in chunk.parameters() if p.requires_grad]
        self.decay_steps = resolved_decay_steps(config)
        self.peak_tflops = config.log.peak_tflops or guess_peak_tflops(groups.device)
        self.tokens_per_step = config.train.global_batch_size * config.model.seq_length
        self.logger = get_logger()
        self.current_step = 0
        self.compile_s = 0.0  # train.compile: seconds spent compiling so far (megalm.model.compile)
        self._eta_origin: Optional[tuple[float, int]] = None  # (time, step) after this process's first step
        self.clock = StepClock(groups.device)
        # Every rank builds one (its hostname goes to the others now); not for DeepSpeed or evaluation.
        training = optimizer is not None and runner is None
        self.stragglers = StragglerMonitor(groups, config.train.straggler_factor) if training else None

    def _global_loss_tokens(self, batches: list[Batch]) -> tuple[torch.Tensor, Callable[[], None], list]:
        """The global count of loss tokens, reduced asynchronously; the wait to call before reading it;
        and the list where that wait leaves its (before, after) clock marks (not this rank's compute).

        Asynchronous because on NCCL the dp group's collectives run in issue order: a blocking count
        would hold this step's forward until ZeRO-1's parameter gathers (issued before it) are done."""
        local = sum(batch.loss_mask.sum() for batch in batches).to(self.groups.device, torch.float32).clone()
        group = self.groups.grad_group  # dp x cp: with context parallelism each rank counts its own tokens
        work = dist.all_reduce(local, group=group, async_op=True) if group is not None else None
        marks: list = []

        def wait() -> None:
            if not marks:
                before = self.clock.mark()
                if work is not None:
                    wait_for(work,
                             lambda: f"all_reduce of the loss-token count over {self.groups.describe_group(group)}")
                marks.append((before, self.clock.mark()))

        return local, wait, marks

    def _micro_batches(self, sampler: BatchSampler, index: int) -> list[Batch]:
        """The micro-batches of global batch `index` on this rank's device, each cut once to this rank's part of
        the sequence when parallel.cp > 1 (Batch.cp_split: where the data enters the model)."""
        groups = self.groups
        return [batch.to(groups.device).cp_split(groups.cp_size, groups.cp_rank) for batch in sampler.micro_batches(index)]

    @staticmethod
    def _masked_sum(losses: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Sum of the masked token losses of one micro-batch (the product's memory order fixes the summation order:
        a resumed old checkpoint reports its losses bit for bit)."""
        return (losses.float() * batch.loss_mask).sum()

    def _set_training(self, training: bool) -> None:
        for chunk in self.chunks:
            chunk.train(training)

    def train_step(self, step: int) -> StepResult:
        """One optimizer step over the global batch of `step`.

        ZeRO-1: the parameters' all-gathers may still be in flight when this returns (the next forward
        waits for them block by block); `wait_for_parameters()` before reading the weights directly.

        The result's compute_seconds is this rank's own part of the step, for the straggler report: from
        the step's start to the wait for the gradient reduction, less the wait for the loss-token count
        (the two places where every dp rank waits for the slowest). It does include the waits inside
        forward and backward for the rank's tp group and pipeline neighbours, so a slow rank makes those
        peers look slow too: the report then names the slow group, not always the rank in it.
        On a GPU it is timed on the device's stream (megalm.stragglers.StepClock)."""
        if self.optimizer is None:
            raise RuntimeError("this Trainer was built for evaluation (build_trainer(training=False)): it has no optimizer")
        reset_peak_memory(self.groups.device)  # record()'s peak_memory_gb is this step's
        start = time.perf_counter()
        clock = self.clock
        begin = clock.mark()
        device = self.groups.device
        batches = self._micro_batches(self.data, step)
        data_seconds = time.perf_counter() - start
        maybe_inject("compute", step + 1, self.groups.rank)  # the "slow" fault of MEGALM_FAULT: a straggler
        if self.runner is not None:
            lr = lr_at(step, self.config.optim, self.decay_steps)
            out = self.runner.train_step(batches, lr)
            seconds = time.perf_counter() - start
            return StepResult(step, out.loss, lr, out.grad_norm, seconds, data_seconds, self.tokens_per_step)
        self._set_training(True)
        self.sync.start_step(len(batches))
        scale = self.scaler.scale if self.scaler is not None else 1.0
        self.comm.reset()
        with self.comm.counting():
            # Normalise by the global count of loss tokens so every layout computes the same mean.
            global_tokens, wait_tokens, token_wait = self._global_loss_tokens(batches)

            def scaled_loss(losses: torch.Tensor, batch: Batch) -> torch.Tensor:
                wait_tokens()
                return self._masked_sum(losses, batch) * (scale / global_tokens)

            loss_sum = self.executor.run(batches, scaled_loss)
            wait_tokens()  # the stages without a loss
            ready = clock.mark()  # this rank's gradients are computed: the wait for the others starts
            self.sync.finish()
            all_reduce_(loss_sum, self.groups.pp_group)  # only the last stage holds the loss
            all_reduce_(loss_sum, self.groups.grad_group)  # over dp (x cp: each cp rank holds its tokens' part)
            loss_value = loss_sum.item() / scale  # the same on every rank
            if self.scaler is None and not math.isfinite(loss_value):
                if self.config.checkpoint.on_nan == "stop":
                    raise NonFiniteLossError(
                        f"the loss is {loss_value} at step {step + 1}: stopping (checkpoint.on_nan=stop); the last "
                        f"checkpoint is intact; lower the learning rate or check the data, then resume"
                    )
                self.logger.warning(f"step {step + 1}: loss is {loss_value}, skipping the update (checkpoint.on_nan=skip)")
                grad_norm, skipped = float("nan"), True
            else:
                grad_norm, skipped = self._update(step, scale)
        seconds = time.perf_counter() - start
        lr = lr_at(step, self.config.optim, self.decay_steps)
        # After loss_sum.item(): on a GPU the stream has passed every mark, so reading them waits for nothing.
        compute_seconds = clock.seconds(begin, ready) - clock.seconds(*token_wait[0])
        return StepResult(
            step, loss_value, lr, grad_norm, seconds, data_seconds, self.tokens_per_step, skipped, scale,
            compute_seconds,
        )

    def _update(self, step: int, scale: float) -> tuple[float, bool]:
        """Unscale, check for overflow (fp16), clip by the global norm and step; (norm, skipped).

        Works on the optimizer's fp32 main gradients, whatever the parameters' precision."""
        groups = self.groups
        grads, counted = self.optimizer.grads(), self.optimizer.counted_grads()
        # ZeRO-1: each dp rank holds a different shard, so norms span dp too.
        reduce_over = [groups.grad_group, groups.tp_group, groups.pp_group] if self.optimizer.sharded else [
            groups.tp_group, groups.pp_group
        ]
        if self.scaler is not None:
            if found_inf(grads, [groups.grad_group, groups.tp_group, groups.pp_group], groups.device):
                self.scaler.update(found_inf=True)
                return float("nan"), True
            torch._foreach_mul_(grads, 1.0 / scale)
        norm = grad_norm(counted, reduce_over, groups.device)
        clip_grads_(grads, norm, self.config.optim.clip_grad)
        set_lr(self.optimizer, lr_at(step, self.config.optim, self.decay_steps))
        self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update(found_inf=False)
        return float(norm), False

    def wait_for_parameters(self) -> None:
        """ZeRO-1: wait for the parameter all-gathers of the last step (call before reading weights yourself;
        the next forward, evaluation, generation and checkpoints wait on their own)."""
        wait = getattr(self.optimizer, "wait_parameters", None)  # DeepSpeed's optimizer has none
        if wait is not None:
            wait()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss over the first train.eval_batches global batches of the valid split."""
        self._set_training(False)
        self.wait_for_parameters()
        total = torch.zeros(2, device=self.groups.device)  # [loss sum, loss tokens]
        for index in range(self.config.train.eval_batches):
            batches = self._micro_batches(self.valid, index)
            loss_sum = self.executor.run(batches, self._masked_sum, forward_only=True)
            total[0] += all_reduce_(loss_sum, self.groups.pp_group)
            total[1] += sum(batch.loss_mask.sum() for batch in batches)
        all_reduce_(total, self.groups.grad_group)
        return (total[0] / total[1]).item()

    def record(self, result: StepResult) -> dict:
        """Metrics of one step: written to JSONL every step, logged every log.interval steps.

        peak_memory_gb / peak_reserved_gb are the peaks of this step (train_step resets the window
        at its start). CUDA: allocated and reserved by the caching allocator; CPU: the process's peak
        resident set (reset per step where Linux allows it; peak_reserved_gb is None).
        """
        rates = throughput(
            self.config.model, result.tokens, result.seconds, self.groups.topology.world_size, self.peak_tflops
        )
        step = result.step + 1
        record = {
            "step": step,
            "loss": result.loss,
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "step_time_s": result.seconds,
            "data_time_s": result.data_seconds,
            "skipped": result.skipped,
            "loss_scale": result.loss_scale,
            **rates,
            "peak_memory_gb": peak_memory_bytes(self.groups.device) / 2**30,
            "peak_reserved_gb": (
                None if (reserved := peak_reserved_bytes(self.groups.device)) is None else reserved / 2**30
            ),
        }
        logs = step % self.config.log.interval == 0 or step == 1 or step == self.config.train.steps
        stragglers = self._stragglers(result, logs)
        if stragglers is not None:
            record.update(stragglers.fields())
        if self.comm.enabled:
            record.update(self.comm.metrics())
        interval = self.config.train.eval_interval
        if self.valid is not None and interval > 0 and (step % interval == 0 or step == self.config.train.steps):
            record["valid_loss"] = self.evaluate()
        if self.config.train.compile:
            self._record_compile(record, result)  # after the evaluation, which compiles its own graph
        record["eta_s"] = self._eta_seconds(step, result.seconds)
        self.metrics.write(record)
        if logs:
            mfu = f"{100 * record['mfu']:.1f}%" if record["mfu"] is not None else "n/a"
            valid = f" | valid {record['valid_loss']:.4f}" if "valid_loss" in record else ""
            self.logger.info(
                f"step {step:>6}/{self.config.train.steps} | loss {result.loss:.4f}{valid} | lr {result.lr:.3e} | "
                f"grad norm {result.grad_norm:.3f} | {rates['tokens_per_s']:,.0f} tok/s | "
                f"{rates['tflops_per_device']:.3g} TFLOP/s/device | MFU {mfu} | "
                f"data {100 * result.data_seconds / result.seconds:.1f}% | mem {record['peak_memory_gb']:.2f} GB"
                + (f" ({record['peak_reserved_gb']:.2f} GB reserved)" if record["peak_reserved_gb"] is not None else "")
                + f" | ETA {format_duration(record['eta_s'])}"
                + (f" | skipped ({self._skip_reason()})" if result.skipped else "")
            )
            if self.comm.enabled:
                self.logger.info(self.comm.format())
            if stragglers is not None and self.groups.topology.world_size > 1 and self.groups.rank == 0:
                (self.logger.warning if stragglers.is_straggler else self.logger.info)(stragglers.message())
        return record

    def _stragglers(self, result: StepResult, logs: bool) -> Optional[StragglerReport]:
        """Add this step's compute time; on a log step, the slowest rank since the last one (one all-gather
        on every rank, counted in this step's comm stats)."""
        if self.stragglers is None:  # DeepSpeed or evaluation: no compute_seconds
            return None
        self.stragglers.add(result.compute_seconds)
        if not logs:
            return None
        with self.comm.counting():
            return self.stragglers.report()

    def _record_compile(self, record: dict, result: StepResult) -> None:
        """compile_s (seconds compiled so far) in every record; logged when a step compiled."""
        from megalm.model.compile import compile_seconds

        total = compile_seconds()
        record["compile_s"] = total
        if total > self.compile_s:
            self.logger.info(
                f"compile: {total - self.compile_s:.1f} s compiling the transformer layers at step "
                f"{result.step + 1} (its training step took {result.seconds:.1f} s; {total:.1f} s compiling in all)"
            )
        self.compile_s = total

    def _eta_seconds(self, step: int, step_seconds: float) -> float:
        """Seconds until train.steps at the wall-clock pace since this process's first step (evaluation
        and checkpoint time included; the first step, with its warm-up, is left out once there are more)."""
        now = time.perf_counter()
        remaining = self.config.train.steps - step
        if self._eta_origin is None or self._eta_origin[1] >= step:
            self._eta_origin = (now, step)
            return remaining * step_seconds
        origin_time, origin_step = self._eta_origin
        return remaining * (now - origin_time) / (step - origin_step)

    def _skip_reason(self) -> str:
        """Why a step's update was skipped: an fp16 overflow, or a non-finite loss (fp32/bf16)."""
        if self.scaler is not None:
            return f"fp16 overflow, loss scale now {self.scaler.scale:g}"
        return "non-finite loss, checkpoint.on_nan=skip"

    def fit(self, steps: Optional[int] = None, start_step: int = 0, checkpointer=None) -> list[dict]:
        """Train from `start_step` to `steps` (default train.steps), saving as configured; print samples."""
        total = steps or self.config.train.steps
        records = []
        step = start_step
        while step < total:
            self.current_step = step + 1
            if checkpointer is not None:
                checkpointer.before_step(step + 1)
            records.append(self.record(self.train_step(step)))
            step += 1
            if checkpointer is not None:
                save, stop = checkpointer.decide(step, final=step == total)
                if save:
                    checkpointer.save(step)
                if stop:
                    checkpointer.finish()  # an async save's writer ends and the save commits before exit
                    self.wait_for_parameters()
                    self.logger.info(f"stop signal received: saved step {step}, exiting")
                    return records
        if checkpointer is not None:
            checkpointer.finish()
        self.wait_for_parameters()  # the weights the run ends with are whole
        if records:
            rest = records[1:] or records
            times = [r["step_time_s"] for r in rest]
            data_share = sum(r["data_time_s"] for r in rest) / sum(times)
            self.logger.info(
                f"done: {len(records)} steps, loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}, "
                f"median step {statistics.median(times) * 1e3:.1f} ms, {100 * data_share:.1f}% of it reading data"
            )
        self.print_samples()
        return records

    def print_samples(self) -> list[str]:
        """Generate from log.sample_prompts (every rank takes part; rank 0 prints). Prompts are
        encoded as the training data encoded prefixes (<sep> after pairs fine-tuning)."""
        prompts = self.config.log.sample_prompts
        if not prompts:
            return []
        self.wait_for_parameters()  # ZeRO-1: the last step's all-gathers
        pairs = trained_on_pairs(self.config)
        sampling = Sampling(self.config.log.sample_tokens, temperature=0.7, top_k=20, seed=self.config.train.seed,
                            stop_id=tuple(self.tokenizer.stop_ids))
        encoded = [encode_prompt(self.tokenizer, prompt, pairs) for prompt in prompts]
        texts = [self.tokenizer.decode(ids) for ids in generate(self.chunks, self.groups, encoded, sampling)]
        for prompt, text in zip(prompts, texts):
            self.logger.info(f"sample: {prompt!r} -> {text!r}")
        return texts


def build_trainer(
    config: Config, groups: ParallelGroups, run_dir: Optional[Path], sources: Optional[DataSources] = None,
    training: bool = True,
) -> Trainer:
    """Model shard, optimizer, data and metrics file for this rank; run_dir=None writes nothing.

    training=False (megalm eval): the model, the data and evaluate() only. No gradient buckets and no
    optimizer are built: their fp32 main gradients and masters would hold 4 to 8 bytes per parameter
    beside the weights (5x a bf16 model), memory a forward-only job does not need."""
    logger = get_logger()
    sources = sources or build_sources(config)
    chunks = build_model_chunks(config, groups)
    chunks[0].rng.seed_replicated()
    if config.train.compile:
        from megalm.model import compile as compile_module

        compiled = compile_module.compile_layers(chunks)
        backend = compile_module.DEFAULT_BACKEND
        logger.info(f"compile: {compiled} transformer layers compiled with torch.compile ({backend}) when the first "
                    f"step runs them; identical layers share the compiled code")
    parallel = config.parallel
    runner = None
    if not training:
        sync, optimizer = _NoSync(), None
    elif config.train.engine == "deepspeed":
        from megalm.engines.deepspeed_engine import build_deepspeed_engine, check_supported

        check_supported(config, groups, parallel.zero_stage)
        if config.train.init_from is not None:  # now: DeepSpeed copies the weights into its partitions
            from megalm.checkpoint.weights import load_initial_weights

            load_initial_weights(chunks, None, groups, config, sources.tokenizer, config.train.init_from)
        runner = build_deepspeed_engine(config, groups, chunks, parallel.zero_stage)
        sync, optimizer = _NoSync(), runner.engine.optimizer  # DeepSpeed reduces gradients itself
    else:
        sync = GradientSync(
            chunks, groups, int(parallel.bucket_size_mb * 2**20), parallel.overlap_grad_sync,
            shard=parallel.zero_stage == 1,
            reduce_dtype=torch.bfloat16 if parallel.grad_reduce_dtype == "bf16" else torch.float32,
        )
        optimizer = build_optimizer_wrapper(sync, config.optim)
    data = build_sampler(config, sources.train, groups.dp_rank, groups.dp_size)
    valid = build_sampler(config, sources.valid, groups.dp_rank, groups.dp_size) if sources.valid else None
    metrics = build_metrics_writer(config.log, run_dir, groups.rank, config_to_dict(config))
    metrics.write({"event": "start", "time": time.time(), "world_size": groups.topology.world_size})
    logger.info(describe_kernels(groups.device))
    logger.info(describe_attention(config.model, groups.device, groups.cp_size))
    logger.info(
        f"{groups.topology.describe()} | {sum(count_parameters(c) for c in chunks):,} parameters on rank "
        f"{groups.rank} | schedule {config.parallel.schedule} | "
        f"accumulation {grad_accum_steps(config, groups.dp_size)} x micro batch {config.train.micro_batch_size} | "
        f"recompute {parallel.recompute}"
        + (f" (first {parallel.recompute_layers} layers of each chunk)" if parallel.recompute_layers else "")
    )
    if groups.rank == 0:
        lines, warning = describe_data(config, sources)
        for line in lines:
            logger.info(line)
        if warning:
            logger.warning(warning)
    return Trainer(config, groups, chunks, optimizer, data, metrics, valid, sources.tokenizer, sync, runner)


class _NoSync:
    """Stands in for GradientSync when DeepSpeed owns the gradient reduction."""

    def start_step(self, num_microbatches: int) -> None:
        pass

    def finish(self) -> None:
        pass


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
    return ParallelGroups(topology=topology, rank=topology.rank(pp_rank, 0, 0, cp=0), device=torch.device("cpu"))


def dry_run_report(config: Config, topology) -> str:
    """Parameter counts, layout and pipeline schedule, on the meta device: nothing is allocated or launched."""
    lines = [topology.describe()]
    total = 0
    per_rank = []
    for pp_rank in range(topology.pp):
        chunks = build_model_chunks(config, _stage_groups(topology, pp_rank), materialize=False)
        layers = ", ".join(
            f"{c.layer_ids[0]}-{c.layer_ids[-1]}" if len(c.layer_ids) > 1 else str(c.layer_ids[0])
            for c in chunks
            if len(c.layer_ids)
        )
        per_rank.append((pp_rank, layers, sum(count_parameters(chunk) for chunk in chunks)))
        for param in (p for chunk in chunks for p in chunk.parameters()):
            if getattr(param, "embedding_copy", False):
                continue
            total += param.numel() * (tp_shard(param, 0, topology.tp)[1] if getattr(param, "tp_split_dim", None) is not None else 1)
    accum = grad_accum_steps(config, topology.dp)
    lines.append(
        f"model: {config.model.family}, {config.model.num_layers} layers, hidden {config.model.hidden_size}, "
        f"{config.model.num_heads} heads, seq {config.model.seq_length}, vocab {config.model.vocab_size} "
        f"(padded to {config.model.padded_vocab_size(topology.tp)})"
    )
    lines.append(f"architecture: {describe_architecture(config.model)}")
    lines.append(f"parameters: {total:,} ({total / 1e9:.2f} B)")
    lines.append(
        f"batch: global {config.train.global_batch_size} = micro {config.train.micro_batch_size} x dp "
        f"{topology.dp} x accumulation {accum}; {config.train.global_batch_size * config.model.seq_length:,} "
        f"tokens per step"
    )
    parallel = config.parallel
    if topology.cp > 1:
        lines.append(
            f"context parallel: cp {topology.cp}, {config.model.seq_length // topology.cp:,} tokens of each sequence per "
            f"rank (chunks r and {2 * topology.cp - 1}-r of {2 * topology.cp}); keys/values all-gathered per layer; "
            f"gradients and ZeRO-1 over dp x cp = {topology.dp * topology.cp} ranks"
        )
    schedule = build_schedule(parallel.schedule, topology.pp, accum, parallel.virtual_stages)
    simulation = simulate(schedule, parallel.virtual_stages)
    lines.append(
        f"pipeline: schedule {parallel.schedule}, {topology.pp} stages x {parallel.virtual_stages} virtual, "
        f"{accum} micro-batches; bubble {100 * simulation.bubble_fraction:.1f}% simulated, "
        f"{100 * analytic_bubble(topology.pp, accum, parallel.virtual_stages):.1f}% = (pp-1)/(m*v+pp-1)"
    )
    shown = per_rank if len(per_rank) <= 6 else per_rank[:3] + [None] + per_rank[-2:]
    per_param = bytes_per_parameter(config.train.precision, parallel.zero_stage, topology.dp * topology.cp)
    for entry in shown:
        if entry is None:
            lines.append("  ...")
            continue
        pp_rank, layers, count = entry
        layers = f"layers {layers}" if layers else "no layers"
        lines.append(
            f"  stage {pp_rank:>3}: {layers}, {count:,} parameters per rank, "
            f"{per_param * count / 2**30:.1f} GiB of {config.train.precision} weights + fp32 main grads + "
            f"optimizer state ({per_param:g} bytes/parameter), "
            f"at most {simulation.max_in_flight[pp_rank]} micro-batch chunks in flight"
        )
    return "\n".join(lines)
