"""Failures under torchrun: a killed rank (also mid-save) restarts and resumes; a hung rank ends the job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megalm.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
COMMON = ["configs/tiny.yaml", "train.steps=30", "checkpoint.interval_steps=10", "model.hidden_dropout=0.1"]


def torchrun(run_dir: Path, *extra: str, fault: str = "", restarts: int = 0, timeout: float = 300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MEGALM_FAULT", None)
    if fault:
        env["MEGALM_FAULT"] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", str(restarts), "-m", "megalm.cli", "train", *COMMON, *extra, "--run-dir", str(run_dir)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[float]:
    run_dir = tmp_path_factory.mktemp("straight")
    proc = torchrun(run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]


@pytest.mark.parametrize("fault", ["kill:1:15", "kill-in-save:0:20"])
def test_killed_rank_restarts_and_resumes_exactly(fault: str, tmp_path: Path, uninterrupted: list[float]) -> None:
    proc = torchrun(tmp_path, fault=fault, restarts=1)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "resumed from" in log and "step_00000010" in log
    resumed = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl", across_restarts=True)]
    assert resumed == uninterrupted  # bit for bit, dropout masks included
    if fault.startswith("kill-in-save"):
        assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000030"


def test_hung_rank_ends_the_job_within_the_timeout(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = torchrun(tmp_path, "train.collective_timeout_s=6", fault="hang:1:3:60", timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    # The waiting rank names the timeout and the step and exits; torchrun then ends the hung one.
    assert "a collective failed or timed out (train.collective_timeout_s=6) during step 3" in proc.stderr
    assert elapsed < 60, elapsed  # well before the hung rank's 60 s are over


def test_sigterm_on_one_rank_makes_every_rank_save_and_exit_zero(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MEGALM_FAULT", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "megalm.cli",
           "train", "configs/tiny.yaml", "train.steps=3000", "--run-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "step     25/" in line:
            break
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(max(workers, key=int)), signal.SIGTERM)  # one worker only, as a node's scheduler might
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-3000:]
    assert output.count("stop signal received: saved step") == 1  # logged by rank 0: every rank stopped
    step = int((tmp_path / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 25 <= step < 3000
    assert len(list((tmp_path / "checkpoints" / f"step_{step:08d}").glob("rank_*.pt"))) == 2
