"""metrics: the GPU peak table, per-step peak memory, and the out-of-memory figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from megalm.metrics import peak_bf16_tflops, peak_memory_bytes, peak_reserved_bytes, reset_peak_memory

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "name, sms, memory_gib, peak",
    [
        ("NVIDIA H100 80GB HBM3", 132, 79.1, 989.0),  # SXM5 (what torch reports on an HGX board)
        ("NVIDIA H100 PCIe", 114, 79.6, 756.0),
        ("NVIDIA H100", 114, 79.6, 756.0),  # a terse name: the 114 SMs of the PCIe board decide
        ("NVIDIA H100 NVL", 132, 93.1, 835.0),
        ("NVIDIA H100", 132, 93.1, 835.0),  # 94 GB with 132 SMs: the NVL board
        ("NVIDIA H200", 132, 139.8, 989.0),
        ("NVIDIA H200 NVL", 132, 139.8, None),  # not in the table: MFU then needs log.peak_tflops
        ("NVIDIA A100-SXM4-80GB", 108, 79.2, 312.0),
        ("NVIDIA GeForce RTX 4090", 128, 23.6, None),
    ],
)
def test_peak_table_tells_the_h100_boards_apart(name: str, sms: int, memory_gib: float, peak) -> None:
    assert peak_bf16_tflops(name, sms, memory_gib) == peak


def _touch(megabytes: int) -> int:
    block = np.ones(megabytes * 2**20 // 8)  # written, so resident
    return int(block.sum())


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux resets the peak RSS via clear_refs")
def test_cpu_peak_memory_resets() -> None:
    device = torch.device("cpu")
    assert reset_peak_memory(device)
    base = peak_memory_bytes(device)
    _touch(300)
    assert peak_memory_bytes(device) > base + 250 * 2**20
    assert reset_peak_memory(device)
    assert peak_memory_bytes(device) < base + 100 * 2**20  # the freed 300 MB no longer count
    assert peak_reserved_bytes(device) is None


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux resets the peak RSS via clear_refs")
def test_trainer_peak_memory_is_per_step() -> None:
    """A large allocation before training does not show in the steps' peak_memory_gb."""
    from megalm.config import load_config
    from megalm.distributed import ParallelGroups
    from megalm.train import build_trainer

    config = load_config(ROOT / "configs" / "tiny.yaml", ["train.steps=2", "optim.warmup_steps=1"])
    trainer = build_trainer(config, ParallelGroups.single(), None)
    _touch(400)
    before = peak_memory_bytes(torch.device("cpu"))
    records = trainer.fit()
    for record in records:
        assert record["peak_memory_gb"] * 2**30 < before - 300 * 2**20, (record["peak_memory_gb"], before / 2**30)
        assert record["peak_reserved_gb"] is None


def test_the_log_follows_sys_stdout_after_the_stream_it_started_on_closed(monkeypatch) -> None:
    """setup_logging under one stdout (a test's capture, a redirected run) that is closed later: the
    next record goes to the current stdout, with no "--- Logging error ---" on stderr."""
    import io
    import sys

    from megalm.metrics import setup_logging

    first, second, errors = io.StringIO(), io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", first)
    logger = setup_logging(0)
    logger.info("one")
    first.close()
    monkeypatch.setattr(sys, "stdout", second)
    monkeypatch.setattr(sys, "stderr", errors)
    logger.info("two")
    assert "two" in second.getvalue() and errors.getvalue() == ""
