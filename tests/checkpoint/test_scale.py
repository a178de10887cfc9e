"""Checkpoints at scale: dp ranks share the writes and the reads; async saves that train on while writing."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from megalm.checkpoint import Checkpointer, CheckpointError, state
from megalm.checkpoint.state import PieceIndex, optimizer_view
from megalm.distributed import ParallelGroups, build_parallel_groups
from megalm.testing import run_distributed
from megalm.topology import Topology
from megalm.train import build_trainer
from tests.test_checkpoint import make_config

ROOT = Path(__file__).resolve().parents[2]


def _live_state(trainer) -> dict:
    """(name, kind) -> this rank's flat tp shard range of every weight / Adam moment it holds."""
    view = optimizer_view(trainer.optimizer)
    states = view.inner.state_dict()["state"]
    order = [p for group in view.inner.param_groups for p in group["params"]]
    names = {id(p): getattr(p, "init_name", n) for chunk in trainer.chunks for n, p in chunk.named_parameters()}
    out = {(names[id(p)], "param"): (0, p.numel(), p.detach().reshape(-1).clone()) for p in trainer.params}
    for index, entry in states.items():
        segment = view.segments[[id(m) for m in view.masters].index(id(order[index]))]
        for kind in ("exp_avg", "exp_avg_sq"):
            out[(names[id(segment.param)], kind)] = (segment.param_lo, segment.param_hi, entry[kind].reshape(-1).clone())
    return out


# ---- dp ranks share the writes and the reads -------------------------------------------------------------
def _dp_worker(rank: int, world_size: int, root: str) -> dict:
    """1x2x2, without and with ZeRO-1: save after 2 steps, then resume in a new trainer, counting file opens."""
    groups = build_parallel_groups(Topology(tp=1, pp=2, dp=2), rank, torch.device("cpu"))
    out = {}
    for zero in (0, 1):
        run_dir = Path(root) / f"zero{zero}"
        config = make_config(pp=2, dp=2, zero=zero, dropout=0.0)
        trainer = build_trainer(config, groups, None)
        trainer.fit(steps=2, checkpointer=Checkpointer(trainer, run_dir))  # saves at the end
        file = run_dir / "checkpoints" / "step_00000002" / f"rank_{rank:05d}.pt"
        pieces = state.load_rank_file(file)["pieces"]
        out[zero] = {"stage": groups.pp_rank, "bytes": file.stat().st_size, "kinds": sorted({p["kind"] for p in pieces}),
                     "saved": _live_state(trainer)}
        # checkpoint.shared_read: always shares; auto does not on one host (its ranks share the page cache)
        for mode in ("always", "auto"):
            opened: list[str] = []
            original = state.load_rank_file
            state.load_rank_file = lambda file: opened.append(Path(file).name) or original(file)
            try:
                config.checkpoint.shared_read = mode
                resumed = build_trainer(config, groups, None)
                start = Checkpointer(resumed, run_dir).resume()
            finally:
                state.load_rank_file = original
            out[zero][mode] = {"loaded": _live_state(resumed), "start": start, "opened": opened}
    return out


@pytest.fixture(scope="module")
def dp_runs(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("dp")
    return root, run_distributed(_dp_worker, 4, str(root))


@pytest.mark.parametrize("zero", [0, 1], ids=["replicated-optimizer", "zero1"])
def test_dp_ranks_share_the_writes_and_their_union_is_the_whole_state(zero: int, dp_runs) -> None:
    """Each of a stage's two dp ranks writes half of its weights (and, without ZeRO, of its moments):
    both files hold weights, their sizes are within 5% of each other, together they hold every tensor."""
    root, results = dp_runs
    for stage in (0, 1):
        sizes = [r[zero]["bytes"] for r in results if r[zero]["stage"] == stage]
        assert len(sizes) == 2 and max(sizes) < 1.05 * min(sizes), (stage, sizes)
    for result in results:
        assert result[zero]["kinds"] == ["exp_avg", "exp_avg_sq", "param"], result[zero]["kinds"]
    index = PieceIndex(root / f"zero{zero}" / "checkpoints" / "step_00000002", [f"rank_{r:05d}.pt" for r in range(4)])
    checked = 0
    for result in results:
        for (name, kind), (lo, hi, value) in result[zero]["saved"].items():
            assert torch.equal(index.full(name, kind).reshape(-1)[lo:hi], value), (name, kind)
            checked += 1
    assert checked > 40


@pytest.mark.parametrize("zero", [0, 1], ids=["replicated-optimizer", "zero1"])
def test_resume_reads_each_file_once_per_shard_group(zero: int, dp_runs) -> None:
    """The two dp ranks of a stage open each file their stage needs once between them (not each all of
    them), both read a share, and every rank's weights and moments come back bit for bit."""
    _, results = dp_runs
    for stage in (0, 1):
        group = [r[zero]["always"] for r in results if r[zero]["stage"] == stage]
        opened = sorted(name for r in group for name in r["opened"])
        assert len(opened) == len(set(opened)) >= 2, (stage, opened)  # at least the stage's own two files, once each
        assert all(r["opened"] for r in group), group
        # shared_read=auto on one host: each rank reads what it needs itself (both of its stage's files)
        for r in results:
            if r[zero]["stage"] == stage:
                own = {f"rank_{rank:05d}.pt" for rank in range(4) if results[rank][zero]["stage"] == stage}
                assert own <= set(r[zero]["auto"]["opened"]), r[zero]["auto"]["opened"]
    for result in results:
        for mode in ("always", "auto"):
            saved, loaded = result[zero]["saved"], result[zero][mode]["loaded"]
            assert result[zero][mode]["start"] == 2 and sorted(saved) == sorted(loaded)
            for key in saved:
                assert saved[key][:2] == loaded[key][:2] and torch.equal(saved[key][2], loaded[key][2]), (mode, key)


# ---- async saves ----------------------------------------------------------------------------------------
def _gated_writer(gate: threading.Event, waited: list):
    def write(payload, handle):
        waited.append(gate.wait(timeout=10))  # False: nothing opened the gate while the save was in progress
        torch.save(payload, handle)

    return write


def _async_config():
    config = make_config(dropout=0.0)
    config.checkpoint.async_save = True
    return config


def test_async_save_returns_at_once_and_commits_the_same_files_as_a_sync_save(tmp_path: Path) -> None:
    trainer = build_trainer(_async_config(), ParallelGroups.single(), None)
    trainer.fit(steps=2)
    trainer.config.checkpoint.async_save = False
    sync = Checkpointer(trainer, tmp_path / "sync").save(2)
    trainer.config.checkpoint.async_save = True
    gate, waited = threading.Event(), []
    checkpointer = Checkpointer(trainer, tmp_path / "async", writer=_gated_writer(gate, waited))
    start = time.monotonic()
    checkpointer.save(2)
    assert time.monotonic() - start < 5 and checkpointer.writing()
    root = tmp_path / "async" / "checkpoints"
    assert not (root / "latest").exists() and not (root / "step_00000002").exists()  # nothing committed yet
    gate.set()
    assert checkpointer.finish() == root / "step_00000002"
    assert waited == [True]
    assert (root / "latest").read_text() == (sync.parent / "latest").read_text() == "step_00000002\n"
    assert sorted(os.listdir(root / "step_00000002")) == sorted(os.listdir(sync)) == ["metadata.json", "rank_00000.pt"]
    assert (root / "step_00000002" / "rank_00000.pt").read_bytes() == (sync / "rank_00000.pt").read_bytes()
    metadata = [json.loads((path / "metadata.json").read_text()) for path in (root / "step_00000002", sync)]
    assert [m["config"]["checkpoint"].pop("async_save") for m in metadata] == [True, False]
    assert metadata[0] == metadata[1]  # the same files, sizes, checksums, step and state: only the flag differs


def test_training_continues_while_the_async_writer_writes(tmp_path: Path) -> None:
    """The writer of step 2 waits until step 4 has run: training went on, and every save committed."""
    trainer = build_trainer(_async_config(), ParallelGroups.single(), None)
    gate, waited = threading.Event(), []
    train_step = trainer.train_step
    trainer.train_step = lambda step: (gate.set() if step == 3 else None) or train_step(step)
    config = trainer.config
    config.checkpoint.interval_steps = 2
    checkpointer = Checkpointer(trainer, tmp_path, writer=_gated_writer(gate, waited))
    trainer.fit(steps=6, checkpointer=checkpointer)
    assert waited == [True, True, True]
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002", "step_00000004", "step_00000006"]
    assert (root / "latest").read_text().strip() == "step_00000006" and not checkpointer.writing()
    resumed = build_trainer(make_config(dropout=0.0), ParallelGroups.single(), None)
    assert Checkpointer(resumed, tmp_path).resume() == 6
    assert all(torch.equal(a, b) for a, b in zip(trainer.params, resumed.params))


def test_an_async_writer_error_is_raised_at_the_next_step_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    trainer = build_trainer(_async_config(), ParallelGroups.single(), None)
    trainer.fit(steps=2, checkpointer=Checkpointer(trainer, tmp_path))  # step_00000002, committed at the end

    def full_disk(payload, handle):
        raise OSError(errno.ENOSPC, "No space left on device")

    trainer.config.checkpoint.interval_steps = 3
    with pytest.raises(CheckpointError, match="saving step 3 failed .*No space left on device.*step_00000002 is intact"):
        trainer.fit(steps=5, start_step=2, checkpointer=Checkpointer(trainer, tmp_path, writer=full_disk))
    assert 4 <= trainer.current_step <= 5  # raised at a step after the save (or at the end), not lost
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"


def _train(run_dir: Path, *extra: str, fault: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("MEGALM_FAULT", None)
    if fault:
        env["MEGALM_FAULT"] = fault
    cmd = [sys.executable, "-m", "megalm.cli", "train", "configs/tiny.yaml", "optim.warmup_steps=2", "train.steps=6",
           "checkpoint.interval_steps=2", "checkpoint.async_save=true", *extra, "--run-dir", str(run_dir)]
    return subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=120)


def test_a_kill_during_an_async_save_leaves_the_previous_checkpoint_latest(tmp_path: Path) -> None:
    killed = _train(tmp_path, fault="kill-in-save:0:4")  # SIGKILL in the writer, after writing its file
    assert killed.returncode == -9, killed.stdout[-3000:]
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert not (root / "step_00000004").exists() and list(root.glob(".tmp-step_00000004-*"))
    again = _train(tmp_path)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "step_00000002 at step 2" in again.stdout
    assert (root / "latest").read_text().strip() == "step_00000006"
