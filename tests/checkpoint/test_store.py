"""The checkpoint directory: what `latest` may name, all-corrupt refusal, pruning order, one job per run dir."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megalm.checkpoint import Checkpointer, CheckpointError
from megalm.checkpoint.store import CheckpointStore
from megalm.distributed import ParallelGroups
from megalm.metrics import get_logger
from megalm.testing import run_distributed
from megalm.train import build_trainer
from tests.test_checkpoint import make_config

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
TINY = ["configs/tiny.yaml", "optim.warmup_steps=2"]


@pytest.fixture()
def saved_twice(tmp_path: Path):
    config = make_config()
    trainer = build_trainer(config, ParallelGroups.single(), None)
    trainer.fit(steps=20, checkpointer=Checkpointer(trainer, tmp_path))  # saves step 10 and step 20
    return tmp_path / "checkpoints", config


@pytest.fixture()
def warnings():
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    get_logger().addHandler(handler)
    yield messages
    get_logger().removeHandler(handler)


def _resume(config, run_dir: Path):
    trainer = build_trainer(config, ParallelGroups.single(), None)
    return Checkpointer(trainer, run_dir).resume()


# ---- item 3: `latest` names only a step_* entry of this directory ------------------------------------
def test_latest_naming_another_runs_checkpoint_is_not_followed(saved_twice, tmp_path: Path, warnings) -> None:
    root, config = saved_twice
    other = tmp_path / "other_run" / "checkpoints" / "step_00000030"
    shutil.copytree(root / "step_00000020", other)
    meta = json.loads((other / "metadata.json").read_text())
    (other / "metadata.json").write_text(json.dumps(dict(meta, step=30)))
    (root / "latest").write_text("../other_run/checkpoints/step_00000030\n")
    assert _resume(config, root.parent) == 20  # this directory's newest, not the other run's 30
    assert any("not a step_NNNNNNNN entry" in m and "other_run" in m for m in warnings), warnings


def test_binary_garbage_in_latest_is_skipped(saved_twice, warnings) -> None:
    root, config = saved_twice
    (root / "latest").write_bytes(b"\xff\xfe\x00\x81garbage")
    assert _resume(config, root.parent) == 20
    assert any(f"{root / 'latest'} is not text" in m for m in warnings), warnings


# ---- item 5: every checkpoint corrupt -> stop, keep every file ---------------------------------------
def test_every_checkpoint_corrupt_stops_with_the_reasons_and_keeps_the_files(saved_twice) -> None:
    root, config = saved_twice
    for step in ("step_00000010", "step_00000020"):
        shard = root / step / "rank_00000.pt"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError) as caught:
        _resume(config, root.parent)
    message = str(caught.value)
    assert "none can be resumed" in message and "--no-resume" in message
    assert "step_00000020: " in message and "step_00000010: " in message and "sha256" in message
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_no_checkpoints_at_all_starts_fresh(tmp_path: Path) -> None:
    assert _resume(make_config(), tmp_path) is None


# ---- item 6: pruning keeps this run's saves; --no-resume moves the old run aside -----------------------
def test_pruning_keeps_the_newest_saves_not_the_highest_steps(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, rank=0, keep=2)
    for step in (10, 20, 30):
        store.save(step, {"x": step}, {})
    assert sorted(p.name for p in store.complete()) == ["step_00000020", "step_00000030"]
    store.save(5, {"x": 5}, {})  # a later save with a lower step (another run in the same directory)
    assert sorted(p.name for p in store.complete()) == ["step_00000005", "step_00000030"]


def _train(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megalm.cli", "train", *TINY, *extra, "--run-dir", str(run_dir)]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=120)


def test_no_resume_moves_the_earlier_runs_checkpoints_aside(tmp_path: Path) -> None:
    every = ["checkpoint.interval_steps=2", "checkpoint.keep=2"]
    first = _train(tmp_path, "train.steps=6", *every)
    assert first.returncode == 0, first.stdout
    second = _train(tmp_path, "train.steps=3", *every, "--no-resume")
    assert second.returncode == 0, second.stdout
    old = list(tmp_path.glob("checkpoints.old-*"))
    assert len(old) == 1 and f"moved the earlier checkpoints {tmp_path / 'checkpoints'} to {old[0]}" in second.stdout
    assert sorted(p.name for p in old[0].glob("step_*")) == ["step_00000004", "step_00000006"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000003"]
    third = _train(tmp_path, "train.steps=4", *every)  # resumes the second run at 3, not the first at 6
    assert third.returncode == 0, third.stdout
    assert "step_00000003 at step 3" in third.stdout
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000004"


# ---- item 4: one job per run directory -------------------------------------------------------------------
def test_a_second_job_on_the_run_directory_is_refused_and_a_dead_holder_does_not_block(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "megalm.cli", "train", *TINY, "train.steps=5000", "checkpoint.interval_steps=0",
           "checkpoint.save_at_end=false", "--run-dir", str(tmp_path)]
    holder = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in holder.stdout:
            if "step " in line and "/5000" in line:
                break
        metrics = (tmp_path / "metrics.jsonl").read_bytes()
        second = _train(tmp_path, "train.steps=2")
        assert second.returncode == 2, second.stdout
        assert f"in use by another job (host {socket.gethostname()} pid {holder.pid} " in second.stdout
        assert "use another --run-dir" in second.stdout and "Traceback" not in second.stdout
        assert not (tmp_path / "checkpoints" / "step_00000002").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: the OS releases it
        holder.communicate(timeout=60)
    assert (tmp_path / "metrics.jsonl").read_bytes()[: len(metrics)] == metrics
    restart = _train(tmp_path, "train.steps=2")
    assert restart.returncode == 0, restart.stdout


def _lock_worker(rank: int, world_size: int, free: str, held: str) -> list[str]:
    from megalm.checkpoint.lock import RunDirLockError, lock_run_dir

    verdicts = []
    for run_dir in (free, held):
        try:
            handle = lock_run_dir(Path(run_dir), rank)
            verdicts.append("holder" if handle is not None else "follower")
        except RunDirLockError as error:
            verdicts.append(f"refused: {error}")
    return verdicts


@contextlib.contextmanager
def lock_held_elsewhere(run_dir: Path, pid: int):
    """The run directory's lock held (by this process) as another job on host "elsewhere" would hold it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".megalm.lock", "a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(f"host elsewhere pid {pid}\n")
        held.flush()
        yield


def test_every_rank_learns_of_the_refusal(tmp_path: Path) -> None:
    held_dir = tmp_path / "held"
    with lock_held_elsewhere(held_dir, 4242):
        results = run_distributed(_lock_worker, 2, str(tmp_path / "free"), str(held_dir))
    assert [r[0] for r in results] == ["holder", "follower"]
    assert all(r[1].startswith("refused:") and "host elsewhere pid 4242" in r[1] for r in results), results


def test_a_save_leaves_another_saves_temp_directory_alone(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, rank=0)
    foreign = tmp_path / ".tmp-step_00000010"  # another job's save in progress
    foreign.mkdir(parents=True)
    (foreign / "rank_00003.pt").write_bytes(b"theirs")
    store.save(10, {"x": 1}, {})
    assert (foreign / "rank_00003.pt").read_bytes() == b"theirs"
    assert not [p for p in tmp_path.glob(".tmp-*") if p != foreign]
