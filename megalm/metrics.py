"""Throughput, model FLOPs, MFU, memory, the megalm logger and the JSONL metrics file."""

from __future__ import annotations

import json
import logging
import resource
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from megalm.config import ModelConfig

LOGGER_NAME = "megalm"

# Dense bf16 peak TFLOP/s per device, for MFU when log.peak_tflops is not set.
_PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A800": 312.0, "H800": 989.0, "L40S": 362.0}


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def setup_logging(rank: int, all_ranks: bool = False) -> logging.Logger:
    """One logger for megalm: rank 0 prints INFO, other ranks only warnings unless all_ranks."""
    logger = get_logger()
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stdout)
    prefix = f"[rank {rank}] " if all_ranks else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if (rank == 0 or all_ranks) else logging.WARNING)
    logger.propagate = False
    return logger


def training_flops_per_token(cfg: ModelConfig) -> float:
    """Model FLOPs per token of one training step (forward + backward = 3 x forward), no recompute.

    Per layer and token, forward: QKV 6h^2, attention output 2h^2, MLP 4*h*ffn, scores and
    weighted sum 4*s*h; plus the logits 2*h*V. With ffn = 4h this is Megatron's
    72*l*h^2*(1 + s/(6h) + V/(12*l*h)) per token.
    """
    h, s, layers = cfg.hidden_size, cfg.seq_length, cfg.num_layers
    forward = layers * (8 * h * h + 4 * h * cfg.ffn_size() + 4 * s * h) + 2 * h * cfg.vocab_size
    return 3.0 * forward


def guess_peak_tflops(device: torch.device) -> Optional[float]:
    """Dense bf16 peak of a known GPU, or None (CPU, unknown GPU): then MFU needs log.peak_tflops."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in _PEAK_BF16_TFLOPS.items():
        if key in name:
            return peak
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated GPU memory, or this process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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


class MetricsWriter:
    """Appends one JSON object per line; rank 0 only (others get a disabled writer)."""

    def __init__(self, path: Optional[Path]) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self.path is not None:
            self._file.close()


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
