"""Checkpoint save/load figures on CPU (gloo ranks in one machine): the numbers of issue 13.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/ckpt_bench.py configs/gpt-125m.yaml \
        --layouts 1x1x1,2x2x2 model.seq_length=32

Per layout (tp x pp x dp): train 2 steps, then time a synchronous save, the resume of it (verify +
load), the bytes each rank wrote, and the bytes of the rank files each rank opened to load its
state (`load_rank_file`; the checksum pass, shared by all ranks, comes on top). Where `checkpoint.async_save` exists: the training stall of an async
save (the copy to host), the step times while its writer runs against steps without a save, and
whether its files and metadata equal the synchronous save's. Prints one JSON line per layout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megalm.checkpoint import Checkpointer, state
from megalm.config import CheckpointConfig, load_config
from megalm.distributed import build_parallel_groups
from megalm.testing import run_distributed
from megalm.topology import Topology
from megalm.train import build_trainer

HAS_ASYNC = "async_save" in CheckpointConfig.__dataclass_fields__


def _count_opened_files() -> list:
    """Record (path, bytes) of every rank file this process loads from now on."""
    opened = []
    original = state.load_rank_file

    def counting(file):
        opened.append((str(file), Path(file).stat().st_size))
        return original(file)

    state.load_rank_file = counting
    return opened


def _any_rank(flag: bool) -> bool:
    value = torch.tensor([float(flag)])
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value[0])


def _timed(fn):
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    out = fn()
    if dist.is_initialized():
        dist.barrier()
    return out, time.perf_counter() - start


def _worker(rank: int, world_size: int, config_path: str, layout: tuple, overrides: list, root: str) -> dict:
    tp, pp, dp = layout
    config = load_config(config_path, [
        f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.dp={dp}", "train.device=cpu", "train.steps=100",
        "train.micro_batch_size=1", f"train.global_batch_size={dp}", "checkpoint.interval_minutes=0", *overrides,
    ])
    groups = build_parallel_groups(Topology(tp=tp, pp=pp, dp=dp), rank, torch.device("cpu"))
    trainer = build_trainer(config, groups, None)
    trainer.fit(steps=2)  # Adam moments exist
    out: dict = {"rank": rank}
    sync_dir = Path(root) / "sync"
    path, out["save_s"] = _timed(lambda: Checkpointer(trainer, sync_dir).save(2))
    out["bytes_written"] = (path / f"rank_{rank:05d}.pt").stat().st_size
    opened = _count_opened_files()
    start, out["load_s"] = _timed(lambda: Checkpointer(trainer, sync_dir).resume())
    out["bytes_opened"] = sum(size for _, size in opened)
    assert start == 2
    if not HAS_ASYNC:
        return out
    step = 2
    times = []
    for _ in range(3):  # steps without a save
        times.append(_timed(lambda: trainer.train_step(step))[1])
        step += 1
    out["step_s"] = statistics.median(times)
    sync_path, _ = _timed(lambda: Checkpointer(trainer, Path(root) / "sync2").save(step))  # the state saved below
    config.checkpoint.async_save = True
    async_dir = Path(root) / "async"
    checkpointer = Checkpointer(trainer, async_dir)
    _, out["async_stall_s"] = _timed(lambda: checkpointer.save(step))
    during = []
    while _any_rank(checkpointer.writing()) and len(during) < 6:  # every rank runs the same steps
        during.append(_timed(lambda: trainer.train_step(step))[1])
        step += 1
    _, out["async_finish_s"] = _timed(checkpointer.finish)
    out["steps_during_async_save"] = len(during)
    out["step_during_s"] = statistics.median(during) if during else None
    if rank == 0:
        sync_meta = json.loads((sync_path / "metadata.json").read_text())
        async_path = async_dir / "checkpoints" / sync_path.name
        async_meta = json.loads((async_path / "metadata.json").read_text())
        flags = [meta["config"]["checkpoint"].pop("async_save") for meta in (sync_meta, async_meta)]
        out["async_identical"] = flags == [False, True] and sync_meta == async_meta and all(
            (sync_path / name).read_bytes() == (async_path / name).read_bytes() for name in sync_meta["files"]
        )
        out["async_latest"] = (async_dir / "checkpoints" / "latest").read_text().strip()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--layouts", default="1x1x1,2x2x2", help="comma-separated tp x pp x dp layouts")
    parser.add_argument("--root", default=None, help="where the checkpoints go (default: a temp directory)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    for text in args.layouts.split(","):
        layout = tuple(int(x) for x in text.split("x"))
        with tempfile.TemporaryDirectory(dir=args.root) as root:
            results = run_distributed(
                _worker, layout[0] * layout[1] * layout[2], args.config, layout, args.overrides, root, timeout=3600
            )
        summary = {
            "layout": text, "async": HAS_ASYNC,
            "save_s": round(max(r["save_s"] for r in results), 3),
            "load_s": round(max(r["load_s"] for r in results), 3),
            "bytes_written_per_rank": [r["bytes_written"] for r in results],
            "bytes_opened_at_load_per_rank": [r["bytes_opened"] for r in results],
        }
        if HAS_ASYNC:
            summary.update({
                key: round(max(r[key] for r in results), 3)
                for key in ("step_s", "async_stall_s", "async_finish_s")
            })
            during = [r["step_during_s"] for r in results if r["step_during_s"] is not None]
            summary["step_during_async_s"] = round(max(during), 3) if during else None
            summary["steps_during_async_save"] = results[0]["steps_during_async_save"]
            summary["async_identical_to_sync"] = results[0]["async_identical"]
            summary["async_latest"] = results[0]["async_latest"]
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    sys.exit(main())
