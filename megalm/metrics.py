"""Throughput, model FLOPs, MFU, memory, the megalm logger, the JSONL metrics file and its
TensorBoard / Weights & Biases mirrors."""

from __future__ import annotations

import json
import logging
import resource
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from megalm.config import ModelConfig
from megalm.durations import format_duration  # noqa: F401 - the step line's ETA; re-exported

LOGGER_NAME = "megalm"

# Dense bf16 peak TFLOP/s per device, for MFU when log.peak_tflops is not set (first match wins).
# The H100 comes in three boards with different clocks and SM counts. NVIDIA's H100 product page
# (nvidia.com/en-us/data-center/h100, "BFLOAT16 Tensor Core ... * With sparsity") gives 1,979
# TFLOP/s for SXM and 1,671 for NVL; NVIDIA's earlier H100 datasheet table (SXM | PCIe columns, as
# reproduced by resellers, e.g. archive-lib.hpctech.co.jp/gpuproduct/nvidia-h100.html) gives 1,513 for
# PCIe, with "specifications 1/2 lower without sparsity": dense SXM 989, NVL 835, PCIe 756. The SXM5
# board has 132 SMs and 80 GB, NVL 132 SMs and 94 GB, PCIe 114 SMs and 80 GB.
H100_SXM, H100_NVL, H100_PCIE = 989.0, 835.0, 756.0
_PEAK_BF16_TFLOPS = {"H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time of each record (not the stream it was when the
    logger was set up, which a caller such as a test's capture may have closed since)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(rank: int, all_ranks: bool = False) -> logging.Logger:
    """One logger for megalm: rank 0 prints INFO, other ranks only warnings unless all_ranks."""
    logger = get_logger()
    logger.handlers.clear()
    handler = _StdoutHandler()
    prefix = f"[rank {rank}] " if all_ranks else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if (rank == 0 or all_ranks) else logging.WARNING)
    logger.propagate = False
    return logger


def training_flops_per_token(cfg: ModelConfig) -> float:
    """Model FLOPs per token of one training step (forward + backward = 3 x forward), no recompute.

    From the model spec (megalm.plan.flops): per layer and token, forward 2 x the attention projections
    (fused QKV, or query plus the smaller key_value of grouped-query attention, head_dim wide heads), 2 x
    the MLP's matrices (GELU's two, SwiGLU's three), scores and weighted sum 4 s H d; plus the logits
    2 h V. With ffn = 4h and multi-head GELU this is Megatron's 72 l h^2 (1 + s/(6h) + V/(12 l h)).
    """
    from megalm.plan.flops import training_flops_per_token as from_spec

    return from_spec(cfg)


def peak_bf16_tflops(name: str, sm_count: int, memory_gib: float) -> Optional[float]:
    """Dense bf16 peak of a GPU from its name, SM count and memory, or None when unknown."""
    upper = name.upper()
    if "H100" in upper:
        if "NVL" in upper or (sm_count == 132 and memory_gib > 85):  # 94 GB NVL board
            return H100_NVL
        if "PCIE" in upper or sm_count == 114:
            return H100_PCIE
        return H100_SXM
    if "NVL" in upper:  # e.g. H200 NVL: a lower-clocked board whose figure is not in this table
        return None
    for key, peak in _PEAK_BF16_TFLOPS.items():
        if key in upper:
            return peak
    return None


def guess_peak_tflops(device: torch.device) -> Optional[float]:
    """Dense bf16 peak of a known GPU, or None (CPU, unknown GPU): then MFU needs log.peak_tflops."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return peak_bf16_tflops(props.name, props.multi_processor_count, props.total_memory / 2**30)


def _linux_peak_rss_bytes() -> Optional[int]:
    """VmHWM (peak resident set) of this process from /proc, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak-memory window; False where the platform cannot (then the peak is since start).

    CUDA: the caching allocator's peak statistics. CPU: Linux resets a process's peak resident set
    (VmHWM) when "5" is written to /proc/self/clear_refs.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated GPU memory since the last reset_peak_memory, or on CPU this process's peak
    resident set (since the last reset where Linux allows one, else since the process started)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = _linux_peak_rss_bytes()
    return rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_reserved_bytes(device: torch.device) -> Optional[int]:
    """Peak memory the CUDA caching allocator held (allocated + cached), or None on CPU."""
    return torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None


def memory_figures(device: torch.device) -> dict[str, Optional[float]]:
    """GiB now allocated, reserved, peak allocated, peak reserved and total on `device` (CPU: peak RSS)."""
    gib = 2**30
    if device.type != "cuda":
        return {"allocated_gib": None, "reserved_gib": None, "peak_gib": peak_memory_bytes(device) / gib,
                "peak_reserved_gib": None, "total_gib": None}
    return {
        "allocated_gib": torch.cuda.memory_allocated(device) / gib,
        "reserved_gib": torch.cuda.memory_reserved(device) / gib,
        "peak_gib": torch.cuda.max_memory_allocated(device) / gib,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / gib,
        "total_gib": torch.cuda.get_device_properties(device).total_memory / gib,
    }


def describe_out_of_memory(device: torch.device, step: int, figures: Optional[dict] = None) -> str:
    """What an out-of-memory error needs to say: where, the memory figures, and what to try."""
    figures = figures if figures is not None else memory_figures(device)
    if device.type == "cuda":
        where = (
            f"{device}: {figures['allocated_gib']:.2f} GiB allocated, {figures['reserved_gib']:.2f} GiB reserved, "
            f"peak {figures['peak_gib']:.2f} GiB allocated / {figures['peak_reserved_gib']:.2f} GiB reserved, "
            f"of {figures['total_gib']:.2f} GiB"
        )
    else:
        where = f"{device}: peak resident set {figures['peak_gib']:.2f} GiB"
    return (
        f"out of memory during step {step} on {where}; to fit, try a smaller train.micro_batch_size "
        f"(more accumulation steps), more pipeline stages or tensor parallelism (parallel.pp, parallel.tp), "
        f"parallel.sequence_parallel=true with tp > 1, parallel.zero_stage=1, train.precision=bf16; "
        f"`megalm plan` predicts each stage's memory for a layout; PYTORCH_CUDA_ALLOC_CONF="
        f"expandable_segments:True reduces fragmentation (reserved much above allocated)"
    )


def throughput(
    cfg: ModelConfig, tokens: int, seconds: float, num_devices: int, peak_tflops: Optional[float]
) -> dict[str, Optional[float]]:
    """tokens/s (whole job), model TFLOP/s per device and MFU for `tokens` processed in `seconds`."""
    tflops = training_flops_per_token(cfg) * tokens / seconds / num_devices / 1e12
    return {
        "tokens_per_s": tokens / seconds,
        "tflops_per_device": tflops,
        "mfu": tflops / peak_tflops if peak_tflops else None,
    }


# TensorBoard tags of the step record's keys (docs/metrics.md); any other numeric key (comm/...)
# keeps its own name as the tag.
TENSORBOARD_TAGS = {
    "loss": "train/loss",
    "valid_loss": "valid/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "loss_scale": "train/loss_scale",
    "skipped": "train/skipped",
    "tokens_per_s": "perf/tokens_per_s",
    "tflops_per_device": "perf/tflops_per_device",
    "mfu": "perf/mfu",
    "step_time_s": "perf/step_time_s",
    "data_time_s": "perf/data_time_s",
    "eta_s": "perf/eta_s",
    "compile_s": "perf/compile_s",
    "straggler_rank": "perf/straggler_rank",
    "straggler_compute_s": "perf/straggler_compute_s",
    "median_compute_s": "perf/median_compute_s",
    "peak_memory_gb": "memory/peak_gb",
    "peak_reserved_gb": "memory/peak_reserved_gb",
}


def step_scalars(record: dict[str, Any]) -> dict[str, float]:
    """{tag: value} of a step record's numeric fields (None and the step number left out)."""
    return {
        TENSORBOARD_TAGS.get(key, key): float(value)
        for key, value in record.items()
        if key != "step" and isinstance(value, (int, float))  # None is neither
    }


class TensorBoardSink:
    """Step records as TensorBoard scalars in `log_dir` (torch.utils.tensorboard's writer).

    The writer opens at the first step record with purge_step set to that step, so a resumed run
    hides the steps after its checkpoint that the interrupted run had already logged."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        except ImportError as error:
            raise ImportError(
                f"log.tensorboard=true needs the tensorboard package ({error}): pip install 'megalm[tensorboard]'"
            ) from None
        self._writer_class = SummaryWriter
        self.log_dir = log_dir
        self.writer = None

    def write(self, record: dict[str, Any]) -> None:
        if "step" not in record:
            return
        if self.writer is None:
            self.writer = self._writer_class(log_dir=str(self.log_dir), purge_step=record["step"])
        for tag, value in step_scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=record["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbSink:
    """Step records logged to a Weights & Biases run (the wandb package, imported only when asked for).

    The run's id is kept in run_dir/wandb_id, so a resumed megalm run continues the same wandb run."""

    def __init__(self, project: str, run_dir: Path, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise ImportError(
                f"log.wandb_project={project!r} needs the wandb package: pip install wandb, "
                f"or set log.wandb_project=null"
            ) from None
        self.wandb = wandb
        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        self.run = wandb.init(
            project=project, name=run_dir.name, dir=str(run_dir), config=config, id=run_id, resume="allow"
        )
        if run_id is None and getattr(self.run, "id", None):
            id_file.write_text(str(self.run.id) + "\n")

    def write(self, record: dict[str, Any]) -> None:
        if "step" in record:
            self.wandb.log(step_scalars(record), step=record["step"])

    def close(self) -> None:
        self.wandb.finish()


class MetricsWriter:
    """Appends one JSON object per line (docs/metrics.md), and hands step records to the optional
    TensorBoard and Weights & Biases sinks; rank 0 only (others get a disabled writer)."""

    def __init__(self, path: Optional[Path], sinks: Sequence[Any] = ()) -> None:
        self.path = path
        self.sinks = list(sinks)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        if self.path is not None:
            self._file.close()
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def build_metrics_writer(
    log: Any, run_dir: Optional[Path], rank: int, config_dict: Optional[dict] = None
) -> MetricsWriter:
    """Rank 0's metrics.jsonl plus the sinks log.tensorboard and log.wandb_project ask for."""
    if run_dir is None or rank != 0:
        return MetricsWriter(None)
    sinks: list[Any] = []
    if log.tensorboard:
        sinks.append(TensorBoardSink(run_dir / "tensorboard"))
    if log.wandb_project is not None:
        sinks.append(WandbSink(log.wandb_project, run_dir, config_dict or {}))
    return MetricsWriter(run_dir / "metrics.jsonl", sinks)


def read_metrics(path: Path, across_restarts: bool = False) -> list[dict[str, Any]]:
    """Step records of the last run in a metrics.jsonl file; with across_restarts, the curve of a
    run that was resumed (possibly several times): a later record of a step replaces an earlier one."""
    records: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("event") == "start":
            if not across_restarts:
                records = {}
        elif "step" in record:
            if across_restarts:
                records = {k: v for k, v in records.items() if k < record["step"]}
            records[record["step"]] = record
    return [records[step] for step in sorted(records)]
