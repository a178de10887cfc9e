"""Checkpoints: bitwise resume, resharding, atomic commit and corruption handling, SIGTERM."""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torch.distributed as dist

from megalm import kernels
from megalm.checkpoint import Checkpointer, CheckpointError
from megalm.checkpoint.state import PieceIndex, optimizer_scalars, optimizer_view
from megalm.config import Config, ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from megalm.distributed import ParallelGroups, build_parallel_groups
from megalm.metrics import get_logger, read_metrics
from megalm.parallel.tensor import gather_full_tensor
from megalm.testing import run_distributed
from megalm.topology import Topology
from megalm.train import build_trainer
from tests import fake_apex
from tests.fake_apex import GroupStepAdam

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20


def make_config(tp=1, pp=1, dp=1, zero=0, dropout=0.1) -> Config:
    config = Config(
        model=ModelConfig(num_layers=4, hidden_size=32, num_heads=4, vocab_size=200, seq_length=16,
                          hidden_dropout=dropout, attention_dropout=dropout),
        parallel=ParallelConfig(tp=tp, pp=pp, dp=dp, zero_stage=zero, bucket_size_mb=0.02),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        train=TrainConfig(steps=STEPS, micro_batch_size=2, global_batch_size=8, seed=9),
    )
    config.checkpoint.interval_steps = 10
    return config


IMPLEMENTATIONS = ("foreach", "fused", "apex")  # apex: the group-step stand-in, tests/fake_apex.py


def use_adamw(implementation: str) -> None:
    """In a worker process: make the production path build this AdamW (apex: the stand-in)."""
    if implementation == "apex":
        fake_apex.install()
    os.environ[kernels.ENV_ADAMW] = implementation


def implementation_of(trainer) -> str:
    """Which AdamW the trainer's optimizer really runs."""
    inner = optimizer_view(trainer.optimizer).inner
    if isinstance(inner, GroupStepAdam):
        return "apex"
    return "fused" if inner.defaults.get("fused") else "foreach" if inner.defaults.get("foreach") else "other"


def optimizer_state(trainer) -> dict:
    """Everything the optimizer holds: masters, per-parameter state and param-group entries."""
    view = optimizer_view(trainer.optimizer)
    saved = view.inner.state_dict()
    out = {f"master {i}": master.detach().clone() for i, master in enumerate(view.masters)}
    for index, entry in saved["state"].items():
        out.update({f"state {index} {key}": value.clone() for key, value in entry.items()})
    for position, group in enumerate(saved["param_groups"]):
        out.update({f"group {position} {key}": value for key, value in group.items() if key != "params"})
    return out


def differences(first: dict, second: dict) -> list[str]:
    """Keys whose values differ (tensors: bits, dtype and device), or that only one side has."""
    out = sorted(set(first) ^ set(second))
    for key in sorted(set(first) & set(second)):
        a, b = first[key], second[key]
        if torch.is_tensor(a):
            same = torch.is_tensor(b) and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
        else:
            same = type(a) is type(b) and a == b
        if not same:
            out.append(key)
    return out


BITWISE_STEPS, BITWISE_SAVE = 8, 4


def _bitwise_worker(rank: int, world_size: int, layout: tuple, root: str, implementations: tuple,
                    precision: str = "fp32") -> dict:
    """Per implementation: 8 steps straight (saving at 4) == resume that checkpoint in a new trainer, 4 steps."""
    tp, pp, dp, zero = layout
    groups = build_parallel_groups(Topology(tp=tp, pp=pp, dp=dp), rank, torch.device("cpu"))
    config = make_config(tp, pp, dp, zero)
    config.train.precision = precision
    config.checkpoint.interval_steps = BITWISE_SAVE
    if precision == "fp16":  # a scale that overflows at steps 1, 4 and 8 and grows between: the state matters
        config.optim.initial_loss_scale, config.optim.loss_scale_window, config.optim.loss_scale_hysteresis = 2.0**20, 2, 1
    results = {}
    for implementation in implementations:
        use_adamw(implementation)
        straight_dir, resumed_dir = Path(root) / implementation / "straight", Path(root) / implementation / "resumed"
        straight = build_trainer(config, groups, None)
        records = straight.fit(steps=BITWISE_STEPS, checkpointer=Checkpointer(straight, straight_dir))
        if rank == 0:
            name = f"step_{BITWISE_SAVE:08d}"
            shutil.copytree(straight_dir / "checkpoints" / name, resumed_dir / "checkpoints" / name)
            (resumed_dir / "checkpoints" / "latest").write_text(name + "\n")
        if world_size > 1:
            dist.barrier()
        resumed = build_trainer(config, groups, None)
        checkpointer = Checkpointer(resumed, resumed_dir)
        start = checkpointer.resume()
        continued = resumed.fit(steps=BITWISE_STEPS, start_step=start, checkpointer=checkpointer)
        results[implementation] = {
            "implementation": (implementation_of(straight), implementation_of(resumed)),
            "start": start,
            "losses_equal": [r["loss"] for r in records[BITWISE_SAVE:]] == [r["loss"] for r in continued],
            "weights_equal": all(torch.equal(a, b) for a, b in zip(straight.params, resumed.params)),
            "state_differences": differences(optimizer_state(straight), optimizer_state(resumed)),
            "scales_equal": [(r["loss_scale"], r["skipped"]) for r in records[BITWISE_SAVE:]]
            == [(r["loss_scale"], r["skipped"]) for r in continued],
            "scaler_equal": (straight.scaler and straight.scaler.state_dict()) == (resumed.scaler and resumed.scaler.state_dict()),
            "skipped": [r["skipped"] for r in records],
        }
    return results


@pytest.mark.parametrize("layout, implementations", [
    ((1, 1, 1, 0), IMPLEMENTATIONS),
    # tp 2 x dp 2 without ZeRO: slow (11 s); 2x2x2-zero1 below spans tp, pp and dp
    pytest.param((2, 1, 2, 0), ("fused",), marks=pytest.mark.slow),
    pytest.param((2, 2, 2, 1), IMPLEMENTATIONS, marks=pytest.mark.slow),
], ids=["1x1x1", "2x1x2", "2x2x2-zero1"])
def test_resume_is_bitwise_identical(layout, implementations, tmp_path: Path) -> None:
    """Losses, weights, masters and optimizer state (tensors, step placement, group step) equal bit
    for bit after a resume, with dropout on, for each AdamW implementation (one spawn runs them all)."""
    tp, pp, dp, _ = layout
    results = run_distributed(_bitwise_worker, tp * pp * dp, layout, str(tmp_path), implementations, timeout=600)
    expected = {
        name: {"implementation": (name, name), "start": BITWISE_SAVE, "losses_equal": True, "weights_equal": True,
               "state_differences": [], "scales_equal": True, "scaler_equal": True, "skipped": [False] * BITWISE_STEPS}
        for name in implementations
    }
    for rank, result in enumerate(results):
        assert result == expected, (rank, result)


def test_fp16_resume_is_bitwise_identical_with_the_loss_scaler(tmp_path: Path) -> None:
    """fp16 with dynamic loss scaling: the scale, its clean-step count and hysteresis resume too, so the
    overflow-skipped steps and every bit of the weights and optimizer state match the straight run."""
    results = run_distributed(_bitwise_worker, 2, (1, 1, 2, 0), str(tmp_path), ("foreach",), "fp16", timeout=400)
    for rank, result in enumerate(results):
        assert result["foreach"] == {
            "implementation": ("foreach", "foreach"), "start": BITWISE_SAVE, "losses_equal": True, "weights_equal": True,
            "state_differences": [], "scales_equal": True, "scaler_equal": True,
            # overflows before the save and after it: the resumed run must skip the same step
            "skipped": [True, False, False, True, False, False, False, True],
        }, (rank, result)


# ---- resharding ---------------------------------------------------------------------------------------
def full_state(trainer) -> dict:
    """Every full parameter by name (tp-gathered), for comparisons across layouts."""
    out = {}
    for chunk in trainer.chunks:
        for name, p in chunk.named_parameters():
            out[getattr(p, "init_name", name)] = gather_full_tensor(p.data, p.tp_split_dim, trainer.groups)[:200]
    return out


def _reshard_worker(rank: int, world_size: int, layout: tuple, root: str, mode: str, implementation: str = "") -> dict:
    tp, pp, dp, zero = layout
    if implementation:
        use_adamw(implementation)
    groups = build_parallel_groups(Topology(tp=tp, pp=pp, dp=dp), rank, torch.device("cpu"))
    config = make_config(tp, pp, dp, zero, dropout=0.0)
    trainer = build_trainer(config, groups, None)
    checkpointer = Checkpointer(trainer, Path(root))
    if mode == "save":
        trainer.fit(steps=10, checkpointer=checkpointer)
        records = trainer.fit(steps=13, start_step=10)  # the un-resharded continuation
        return {"weights": full_state(trainer), "continuation": [r["loss"] for r in records]}
    start = checkpointer.resume()
    scalars = optimizer_scalars(trainer.optimizer)
    # Save the loaded state again at this layout: the test compares every full tensor with the original.
    Checkpointer(trainer, Path(root) / f"resaved-{'x'.join(map(str, layout))}").save(start)
    weights = full_state(trainer)
    records = trainer.fit(steps=13, start_step=start)
    return {"weights": weights, "continuation": [r["loss"] for r in records], "start": start, "scalars": scalars,
            "implementation": implementation_of(trainer)}


def assert_same_full_tensors(original: Path, resaved: Path) -> None:
    """Every parameter and Adam moment of two checkpoints, as full tensors (real vocabulary rows)."""
    first = PieceIndex(original, json.loads((original / "metadata.json").read_text())["files"])
    second = PieceIndex(resaved, json.loads((resaved / "metadata.json").read_text())["files"])
    assert set(first.pieces) == set(second.pieces)
    assert {kind for _, kind in first.pieces} == {"param", "exp_avg", "exp_avg_sq"}
    for name, kind in sorted(first.pieces):
        assert torch.equal(first.full(name, kind)[:200], second.full(name, kind)[:200]), (resaved, name, kind)


@pytest.fixture(scope="module")
def resharding_source(tmp_path_factory) -> tuple[Path, list[dict]]:
    """A 2x2x2+ZeRO-1 run saved at step 10, which the resharding tests load into other layouts."""
    root = tmp_path_factory.mktemp("reshard")
    return root, run_distributed(_reshard_worker, 8, (2, 2, 2, 1), str(root), "save", timeout=400)


# (tp, pp, dp, zero stage), world size. Three targets are marked slow; the consolidation to one rank
# and the tp-changing ZeRO-1 target are the fast ones.
RESHARD_TARGETS = [
    pytest.param((1, 1, 1, 0), 1, id="1x1x1"),
    pytest.param((4, 1, 2, 1), 8, id="4x1x2-zero1"),
    pytest.param((1, 2, 4, 1), 8, id="1x2x4-zero1", marks=pytest.mark.slow),
    pytest.param((2, 2, 2, 0), 8, id="2x2x2", marks=pytest.mark.slow),
    pytest.param((1, 4, 1, 0), 4, id="1x4x1", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("target, world", RESHARD_TARGETS)
def test_resharding_from_2x2x2_zero1(target: tuple, world: int, resharding_source) -> None:
    root, saved = resharding_source
    index = PieceIndex(root / "checkpoints" / "step_00000010", [f"rank_{r:05d}.pt" for r in range(8)])
    loaded = run_distributed(_reshard_worker, world, target, str(root), "load", timeout=400)
    assert loaded[0]["start"] == 10
    for name, weight in {k: v for r in loaded for k, v in r["weights"].items()}.items():
        assert torch.equal(weight, index.full(name, "param")[:200]), (target, name)
    continuation = saved[0]["continuation"]
    assert loaded[0]["continuation"] == pytest.approx(continuation, rel=1e-5), target
    resaved = root / f"resaved-{'x'.join(map(str, target))}" / "checkpoints" / "step_00000010"
    assert_same_full_tensors(root / "checkpoints" / "step_00000010", resaved)


def test_the_metadata_lets_a_rank_open_only_the_files_it_needs(resharding_source) -> None:
    root, _ = resharding_source
    checkpoint = root / "checkpoints" / "step_00000010"
    files = json.loads((checkpoint / "metadata.json").read_text())["files"]
    last_stage_layer = sorted(set(files["rank_00004.pt"]["params"]) & set(files["rank_00005.pt"]["params"]))[0]
    for name, dp0, stage in (("embedding.word.weight", {0, 1}, {0, 1, 2, 3}), (last_stage_layer, {4, 5}, {4, 5, 6, 7})):
        opened = set(PieceIndex(checkpoint, files, names={name}).payloads)
        assert dp0 <= opened <= stage, (name, opened)  # dp rank 0 of the stage holds every weight


@pytest.mark.slow  # 30 s; the group step's save/restore is in the default run (tests/checkpoint/test_state.py)
def test_group_step_optimizer_reshards(tmp_path: Path) -> None:
    """The apex stand-in (step in the param group) saved at 2x2x2+ZeRO-1 loads at 1x1x1 and 1x2x2+ZeRO-1:
    every full tensor and moment equal, the group step carried over, the same continuation."""
    saved = run_distributed(_reshard_worker, 8, (2, 2, 2, 1), str(tmp_path), "save", "apex", timeout=600)
    checkpoint = tmp_path / "checkpoints" / "step_00000010"
    metadata = json.loads((checkpoint / "metadata.json").read_text())
    assert metadata["optimizer_scalars"]["group"] == {"step": {"value": 10}}
    assert metadata["optimizer_scalars"]["param"] == {}
    index = PieceIndex(checkpoint, metadata["files"])
    for target, world in (((1, 1, 1, 0), 1), ((1, 2, 2, 1), 4)):
        loaded = run_distributed(_reshard_worker, world, target, str(tmp_path), "load", "apex", timeout=600)
        for result in loaded:
            assert result["implementation"] == "apex" and result["start"] == 10
            assert result["scalars"]["group"] == {"step": {"value": 10}}, (target, result["scalars"])
        for name, weight in {k: v for r in loaded for k, v in r["weights"].items()}.items():
            assert torch.equal(weight, index.full(name, "param")[:200]), (target, name)
        assert loaded[0]["continuation"] == pytest.approx(saved[0]["continuation"], rel=1e-5), target
        resaved = tmp_path / f"resaved-{'x'.join(map(str, target))}" / "checkpoints" / "step_00000010"
        assert_same_full_tensors(checkpoint, resaved)


def _resume_worker(rank: int, world_size: int, root: str, train_steps: int = 0) -> dict:
    groups = build_parallel_groups(Topology(tp=1, pp=1, dp=world_size), rank, torch.device("cpu"))
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    get_logger().addHandler(handler)
    trainer = build_trainer(make_config(dp=world_size), groups, None)
    checkpointer = Checkpointer(trainer, Path(root))
    if train_steps:
        trainer.fit(steps=train_steps, checkpointer=checkpointer)
        return {}
    return {"start": checkpointer.resume(), "messages": messages}


def test_ranks_share_the_checksums_and_agree_on_a_damaged_file(tmp_path: Path) -> None:
    """Two ranks each hash half the files; a flipped byte that only rank 1 reads still makes both
    ranks skip that checkpoint and resume the previous one."""
    run_distributed(_resume_worker, 2, str(tmp_path), 20, timeout=400)  # saves steps 10 and 20
    shard = tmp_path / "checkpoints" / "step_00000020" / "rank_00001.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    results = run_distributed(_resume_worker, 2, str(tmp_path), timeout=400)
    assert [r["start"] for r in results] == [10, 10]
    assert any("rank_00001.pt fails its sha256 checksum" in m for m in results[0]["messages"]), results[0]


def test_optimizer_moments_survive_resharding(tmp_path: Path) -> None:
    """ZeRO-1 moments saved at dp=2 are the same full tensors after loading at dp=1 (no ZeRO)."""
    run_distributed(_reshard_worker, 2, (1, 1, 2, 1), str(tmp_path), "save", timeout=400)
    index = PieceIndex(tmp_path / "checkpoints" / "step_00000010", ["rank_00000.pt", "rank_00001.pt"])
    config = make_config(dropout=0.0)
    trainer = build_trainer(config, ParallelGroups.single(), None)
    Checkpointer(trainer, tmp_path).resume()
    for chunk in trainer.chunks:
        for name, param in chunk.named_parameters():
            state = trainer.optimizer.state[param]
            for kind in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(state[kind], index.full(name, kind)), (name, kind)
            assert int(state["step"]) == 10


# ---- atomicity and corruption ---------------------------------------------------------------------------
@pytest.fixture()
def saved_twice(tmp_path: Path):
    config = make_config()
    trainer = build_trainer(config, ParallelGroups.single(), None)
    checkpointer = Checkpointer(trainer, tmp_path)
    trainer.fit(steps=20, checkpointer=checkpointer)  # saves step 10 and step 20
    return tmp_path / "checkpoints", config


def _resume(config, run_dir: Path):
    trainer = build_trainer(config, ParallelGroups.single(), None)
    return Checkpointer(trainer, run_dir).resume()


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "pointer"])
def test_damaged_latest_falls_back_to_the_previous_checkpoint(damage, saved_twice) -> None:
    root, config = saved_twice
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    get_logger().addHandler(handler)
    shard = root / "step_00000020" / "rank_00000.pt"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "delete":
        shard.unlink()
    else:
        (root / "latest").write_text("step_00000099\n")
    try:
        assert _resume(config, root.parent) == (20 if damage == "pointer" else 10)
    finally:
        get_logger().removeHandler(handler)
    expected = {
        "truncate": "truncated", "flip": "fails its sha256 checksum", "delete": "is missing", "pointer": "step_00000099",
    }[damage]
    assert any(expected in message for message in messages), messages


def test_full_disk_during_save_keeps_the_previous_checkpoint(saved_twice) -> None:
    root, config = saved_twice
    trainer = build_trainer(config, ParallelGroups.single(), None)

    def full_disk(payload, handle):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    checkpointer = Checkpointer(trainer, root.parent, writer=full_disk)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint step_00000020 is intact"):
        checkpointer.save(30)
    assert (root / "latest").read_text().strip() == "step_00000020"
    assert not list(root.glob(".tmp-*")) and not (root / "step_00000030").exists()
    assert _resume(config, root.parent) == 20


def test_checkpoint_from_another_model_is_refused(saved_twice) -> None:
    root, config = saved_twice
    config.model.hidden_size = 64
    with pytest.raises(CheckpointError, match=r"model\.hidden_size: checkpoint 32, this run 64"):
        _resume(config, root.parent)


def test_keeps_only_the_last_k(tmp_path: Path) -> None:
    config = make_config()
    config.checkpoint.interval_steps = 5
    config.checkpoint.keep = 2
    trainer = build_trainer(config, ParallelGroups.single(), None)
    trainer.fit(steps=20, checkpointer=Checkpointer(trainer, tmp_path))
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000015", "step_00000020"]


# ---- stop signal -------------------------------------------------------------------------------------
def test_sigterm_saves_and_exits_zero(tmp_path: Path) -> None:
    """A SIGTERM mid-run: the process saves at the current step and exits 0; a restart resumes there."""
    cmd = [sys.executable, "-m", "megalm.cli", "train", "configs/tiny.yaml", "train.steps=2000",
           "checkpoint.interval_steps=0", "--run-dir", str(tmp_path)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "step     25/" in line:
            proc.send_signal(signal.SIGTERM)
            break
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    assert "stop signal received: saved step" in output
    step = int((tmp_path / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 25 <= step < 2000
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[-1]["step"] == step


# slow (19 s); resharding from 2x2x2 with ZeRO-1 to other layouts is the fast check
@pytest.mark.slow
def test_resharding_back_from_1x1x1_to_2x2x2_zero1(tmp_path: Path) -> None:
    saved = run_distributed(_reshard_worker, 1, (1, 1, 1, 0), str(tmp_path), "save", timeout=400)
    index = PieceIndex(tmp_path / "checkpoints" / "step_00000010", ["rank_00000.pt"])
    loaded = run_distributed(_reshard_worker, 8, (2, 2, 2, 1), str(tmp_path), "load", timeout=400)
    for name, weight in {k: v for r in loaded for k, v in r["weights"].items()}.items():
        assert torch.equal(weight, index.full(name, "param")[:200]), name
    assert loaded[0]["continuation"] == pytest.approx(saved[0]["continuation"], rel=1e-5)
    resaved = tmp_path / "resaved-2x2x2x1" / "checkpoints" / "step_00000010"
    assert_same_full_tensors(tmp_path / "checkpoints" / "step_00000010", resaved)


# slow (19 s); convert -> import -> exact weights is the fast check (tests/interop/test_gpt2.py)
@pytest.mark.slow
def test_convert_writes_one_file_of_full_tensors(tmp_path: Path) -> None:
    from megalm.cli import main

    run_distributed(_reshard_worker, 8, (2, 2, 2, 1), str(tmp_path), "save", timeout=400)
    output = tmp_path / "model.pt"
    assert main(["convert", str(tmp_path / "checkpoints" / "step_00000010"), str(output)]) == 0
    exported = torch.load(output, weights_only=False)
    loaded = run_distributed(_reshard_worker, 1, (1, 1, 1, 0), str(tmp_path), "load", timeout=400)[0]
    assert exported["step"] == 10 and exported["state_dict"].keys() == loaded["weights"].keys()
    for name, tensor in exported["state_dict"].items():
        assert torch.equal(tensor, loaded["weights"][name]), name
    assert exported["state_dict"]["embedding.word.weight"].shape[0] == 200  # real vocabulary rows only
