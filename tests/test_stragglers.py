"""Stragglers named: a rank slowed by MEGALM_FAULT=slow is found by the trainer's once-per-log-interval
all-gather, written to rank 0's metrics.jsonl with its host, and warned about; equal ranks are not."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest
import torch

from megalm.config import ConfigError, load_config, validate
from megalm.distributed import build_parallel_groups
from megalm.faults import FaultSpecError, parse_fault_spec
from megalm.metrics import read_metrics
from megalm.testing import log_messages, run_distributed
from megalm.train import build_trainer

ROOT = Path(__file__).resolve().parents[1]
# 4 data-parallel ranks, one micro-batch each; logs at steps 1, 2 and 4 (log.interval 2, 4 steps).
RUN = [
    "model.num_layers=1", "model.hidden_size=32", "model.seq_length=16", "train.steps=4", "train.micro_batch_size=1",
    "train.global_batch_size=4", "optim.warmup_steps=1", "log.interval=2", "log.comm_stats=true",
]
DELAY_S = 0.2


def _train(rank: int, world_size: int, run_dir: Path, fault: str) -> dict:
    """Train RUN on dp=world_size with MEGALM_FAULT=fault; this rank's log (and rank 0's metrics.jsonl)."""
    os.environ["MEGALM_FAULT"] = fault
    config = load_config(ROOT / "configs" / "tiny.yaml", RUN)
    groups = build_parallel_groups(validate(config, world_size), rank, torch.device("cpu"))
    trainer = build_trainer(config, groups, run_dir)
    with log_messages(levels=True) as messages:
        trainer.fit()
    trainer.metrics.close()
    records = read_metrics(run_dir / "metrics.jsonl") if rank == 0 else None
    return {"messages": messages, "records": records}


def _worker(rank: int, world_size: int, root: str) -> dict:
    """Both runs in one spawn (starting 4 ranks costs more than the training): one slow rank, all slow."""
    return {name: _train(rank, world_size, Path(root) / name, fault)
            for name, fault in [("one", f"slow:2:1:{DELAY_S}"), ("all", f"slow:*:1:{DELAY_S}")]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Rank 0's runs; the other ranks' log messages under "others"."""
    ranks = run_distributed(_worker, 4, str(tmp_path_factory.mktemp("stragglers")), timeout=120)
    return {**ranks[0], "others": [m for rank in ranks[1:] for run in rank.values() for m in run["messages"]]}


def test_a_slowed_rank_is_named_with_its_host_and_warned_about(runs: dict) -> None:
    """Rank 2 sleeps 0.2 s in every step before the step's first collective. Its peers wait for it in
    the loss-token count and the gradient reduction, which the compute time leaves out: the slowed
    rank alone stands out (counting those waits, all four ranks would look the same)."""
    result = runs["one"]
    records = result["records"]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    logged = [r for r in records if r["step"] in (1, 2, 4)]
    for record in logged:
        assert record["straggler_rank"] == 2 and record["straggler_host"] == socket.gethostname()
        assert record["straggler_compute_s"] >= DELAY_S
        assert record["straggler_compute_s"] > 1.5 * record["median_compute_s"]
        assert record["median_compute_s"] < DELAY_S  # the waiting ranks' waits are not counted as compute
    assert "straggler_rank" not in records[2]  # step 3 does not log
    warnings = [m for level, m in result["messages"] if level == logging.WARNING and m.startswith("straggler:")]
    assert len(warnings) == 3, result["messages"]
    assert f"slowest rank 2 on {socket.gethostname()}: " in warnings[-1]
    assert "over the last 2 step(s)" in warnings[-1] and "train.straggler_factor=1.5" in warnings[-1]
    assert not [m for _, m in runs["others"] if "slowest rank" in m]  # rank 0 alone reports (every rank logs here)


def test_equally_slow_ranks_are_no_stragglers_and_the_gather_is_one_per_log_step(runs: dict) -> None:
    """Every rank sleeps the same 0.2 s: the median rises with them, so no warning (only the info line);
    the exchange is exactly one all-gather on the control group, on log steps only."""
    result = runs["all"]
    records = result["records"]
    levels = [level for level, message in result["messages"] if "slowest rank" in message]
    assert levels == [logging.INFO] * 3, result["messages"]
    for record in records:
        calls = record.get("comm/control/all_gather/calls", 0)
        if record["step"] in (1, 2, 4):
            assert calls == 1 and record["comm/control/all_gather/bytes"] == 2 * 8  # (seconds, steps) in float64
            assert DELAY_S <= record["median_compute_s"] <= record["straggler_compute_s"]
            assert record["straggler_compute_s"] <= 1.5 * record["median_compute_s"]
        else:
            assert calls == 0 and "straggler_rank" not in record
        assert not any(key.startswith("comm/control/") and key.split("/")[2] != "all_gather" for key in record)


def test_straggler_factor_must_exceed_one() -> None:
    tiny = ROOT / "configs" / "tiny.yaml"
    assert load_config(tiny).train.straggler_factor == 1.5
    assert load_config(tiny, ["train.straggler_factor=2"]).train.straggler_factor == 2.0
    for value in ("1.0", "0.5", "-2"):
        with pytest.raises(ConfigError, match=rf"train\.straggler_factor must be > 1\.0 .*, got {value}"):
            load_config(tiny, [f"train.straggler_factor={value}"])


def test_slow_fault_spec_is_validated() -> None:
    assert parse_fault_spec("slow:3:2:0.5").seconds == 0.5
    with pytest.raises(FaultSpecError, match=r"slow needs SECONDS, the delay added to every step, e\.g\. slow:1:1"):
        parse_fault_spec("slow:1:1")
    with pytest.raises(FaultSpecError, match="SECONDS must be a number >= 0, got 'x'"):
        parse_fault_spec("slow:1:1:x")
