"""ZeRO-1's parameter all-gather: in place into the parameters' buckets, in their dtype, asynchronous,
waited block by block before the forward reads it; parity, bytes on the wire and memory allocated."""

from __future__ import annotations

import functools
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megalm.checkpoint.state import collect_pieces
from megalm.config import Config, ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from megalm.distributed import ParallelGroups, build_parallel_groups
from megalm.parallel.optimizer import build_optimizer_wrapper
from megalm.parallel.tensor import gather_full_tensor
from megalm.testing import run_distributed
from megalm.topology import Topology
from megalm.train import build_trainer

STEPS = 3


def make_config(dp=1, zero=1, precision="fp32", clip=1.0, global_batch=4) -> Config:
    return Config(
        model=ModelConfig(num_layers=2, hidden_size=32, num_heads=4, vocab_size=128, seq_length=16),
        parallel=ParallelConfig(dp=dp, zero_stage=zero, bucket_size_mb=0.01),  # several buckets
        optim=OptimConfig(lr=3e-3, warmup_steps=0, weight_decay=0.1, eps=1e-5, clip_grad=clip),
        train=TrainConfig(steps=STEPS, micro_batch_size=1, global_batch_size=global_batch, seed=7,
                          precision=precision),
    )


def weights(trainer) -> dict[str, torch.Tensor]:
    return {name: gather_full_tensor(p.data, p.tp_split_dim, trainer.groups).clone()
            for chunk in trainer.chunks for name, p in chunk.named_parameters()}


# ---- parity through Trainer.fit, the production loop ------------------------------------------------
def fit(config: Config, groups: ParallelGroups) -> dict:
    trainer = build_trainer(config, groups, None)
    records = trainer.fit()
    return {"losses": [r["loss"] for r in records], "weights": weights(trainer),
            "param_dtypes": sorted({str(p.dtype) for p in trainer.params})}


def _parity_worker(rank: int, world_size: int) -> dict:
    groups = build_parallel_groups(Topology(dp=world_size), rank, torch.device("cpu"))
    runs = [("fp32", 1, 1.0)] + [(precision, zero, 0.0) for precision in ("fp32", "bf16") for zero in (0, 1)]
    return {(precision, zero, clip): fit(make_config(world_size, zero, precision, clip), groups)
            for precision, zero, clip in runs}


@functools.lru_cache(maxsize=None)
def parity() -> tuple[list[dict], dict]:
    return run_distributed(_parity_worker, 2, timeout=300), fit(make_config(), ParallelGroups.single())


def test_zero1_fp32_matches_single_process() -> None:
    ranks, single = parity()
    for per_rank in ranks:
        run = per_rank[("fp32", 1, 1.0)]
        assert run["losses"] == pytest.approx(single["losses"], rel=1e-5)
        for name, weight in run["weights"].items():
            expected = single["weights"][name]
            assert ((weight - expected).norm() / expected.norm()).item() <= 1e-5, name


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero1_equals_replicated_optimizer_bit_for_bit(precision: str) -> None:
    """Without clipping (whose norm sums in another order) the update is element-wise: ZeRO-1's shard
    step and in-place gather must give exactly the replicated optimizer's weights."""
    ranks, _ = parity()
    for per_rank in ranks:
        sharded, replicated = per_rank[(precision, 1, 0.0)], per_rank[(precision, 0, 0.0)]
        assert sharded["param_dtypes"] == [f"torch.{'float32' if precision == 'fp32' else 'bfloat16'}"]
        assert sharded["losses"] == replicated["losses"]
        assert sharded["weights"].keys() == replicated["weights"].keys()
        for name, weight in sharded["weights"].items():
            assert torch.equal(weight, replicated["weights"][name]), name


# ---- asynchronous, in forward order, waited by each block before its forward ---------------------------
def _order_worker(rank: int, world_size: int) -> dict:
    groups = build_parallel_groups(Topology(dp=world_size), rank, torch.device("cpu"))
    trainer = build_trainer(make_config(world_size, precision="bf16"), groups, None)
    sync = trainer.sync
    events: list = []
    sync.events = events
    blocks = {}
    for name, module in trainer.model.named_modules():
        if name in ("embedding", "final_norm") or name.startswith("layers.") and name.count(".") == 1:
            blocks[name] = sorted({sync._bucket_of[p].index for p in module.parameters()})
            module.register_forward_pre_hook(lambda m, args, name=name: events.append(("forward", name)))
    trainer.train_step(0)
    trainer.wait_for_parameters()
    # Stale until waited: rank 1 steps late, so rank 0's step returns with the gathers in flight and the
    # half of each bucket that rank 1 updates still holds the old values.
    bucket = sync.buckets[0]
    step = trainer.optimizer.step

    def late_step() -> None:
        if rank == 1:
            time.sleep(1.5)
        step()

    def peer_half() -> torch.Tensor:  # the other rank's half of bucket 0's parameters
        flat = torch.cat([p.detach().reshape(-1) for p in bucket.params])
        return flat[bucket.numel // 2 :] if rank == 0 else flat[: bucket.numel // 2]

    trainer.optimizer.step = late_step
    before = peer_half()
    trainer.train_step(1)
    stale = torch.equal(peer_half(), before)
    pending_after_step = sync.gathers_in_flight
    pieces = {(p["name"], p["kind"], p["lo"]): p["tensor"]
              for p in collect_pieces(trainer.chunks, trainer.optimizer, groups)}
    pending_after_checkpoint = sync.gathers_in_flight
    fresh = not torch.equal(peer_half(), before)
    trainer.optimizer.step = step
    # the checkpoint's pieces are the gathered parameters
    params = dict(trainer.model.named_parameters())
    gathered = all(torch.equal(tensor.reshape(-1), params[name].detach().reshape(-1)[lo : lo + tensor.numel()])
                   for (name, kind, lo), tensor in pieces.items() if kind == "param")
    first = len(events)  # step 2 launches the gathers that step 3's forward waits for
    trainer.train_step(2)
    trainer.train_step(3)
    return {"events": events, "first": first, "blocks": blocks, "stale": stale, "fresh": fresh,
            "pending_after_step": pending_after_step, "pending_after_checkpoint": pending_after_checkpoint,
            "gathered": gathered, "buckets": len(sync.buckets)}


@functools.lru_cache(maxsize=None)
def order_results() -> list[dict]:
    return run_distributed(_order_worker, 2, timeout=200)


def test_parameters_are_stale_until_the_gather_is_waited_and_checkpoints_wait() -> None:
    result = order_results()[0]
    assert result["stale"] and result["fresh"]
    assert result["pending_after_step"] == result["buckets"]  # the step returned with every gather in flight
    assert result["pending_after_checkpoint"] == 0 and result["gathered"]


def test_gathers_launch_in_forward_order_and_each_block_waits_for_its_buckets() -> None:
    for result in order_results():
        buckets = result["buckets"]
        assert buckets >= 3
        events = result["events"][result["first"]:]  # steps 2 and 3
        gathers = [i for i, e in enumerate(events) if e[0] == "gather"]
        assert len(gathers) == 2 * buckets  # at the end of steps 2 and 3
        gathers, next_step = gathers[:buckets], gathers[buckets]
        launches = [events[i][1] for i in gathers]
        assert launches == list(reversed(range(buckets)))  # forward order: the last-made bucket first
        # launched at the end of step 2, none waited there: the step returned with all in flight
        assert not any(e[0] in ("gather_wait", "forward") for e in events[gathers[0] : gathers[-1]])
        later = events[gathers[-1] + 1 : next_step]  # step 3
        waits = [e[1] for e in later if e[0] == "gather_wait"]
        assert waits == launches  # waited one by one, in the order they were launched
        # Each block waits for its own buckets before it runs, and not before the previous block ran:
        # the later gathers overlap the earlier blocks' forward.
        done: set[int] = set()
        forwards_before_last_wait = 0
        for event in later:
            if event[0] == "gather_wait":
                done.add(event[1])
            elif event[0] == "forward":
                assert set(result["blocks"][event[1]]) <= done, event
                if len(done) < buckets:
                    forwards_before_last_wait += 1
        assert forwards_before_last_wait >= 2


# ---- bytes on the wire and bytes allocated ---------------------------------------------------------
class AllocationLog(TorchDispatchMode):
    """Every new storage an op returns while active: (op, bytes, storage pointer)."""

    def __init__(self) -> None:
        super().__init__()
        self.allocations: list[tuple[str, int, int]] = []
        self.ops: set[str] = set()  # every op seen: the log is live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.allocations.append((str(func), t.untyped_storage().nbytes(), t.untyped_storage().data_ptr()))
        return out


def _memory_worker(rank: int, world_size: int) -> dict:
    from megalm.comm import CommCounter

    groups = build_parallel_groups(Topology(dp=world_size), rank, torch.device("cpu"))
    out = {}
    for precision in ("fp32", "bf16"):
        trainer = build_trainer(make_config(world_size, precision=precision), groups, None)
        param_bytes = sum(p.numel() * p.element_size() for p in trainer.params)
        with AllocationLog() as built:
            trainer.optimizer = optimizer = build_optimizer_wrapper(trainer.sync, trainer.config.optim)
        trainer.comm = CommCounter(groups)
        trainer.train_step(0)  # creates the moments
        original, stepped = optimizer.step, AllocationLog()

        def logged_step() -> None:  # the step and its gathers, not the forward and backward
            with stepped:
                original()
                optimizer.wait_parameters()

        optimizer.step = logged_step
        trainer.train_step(1)
        state = {m.untyped_storage().data_ptr() for m in optimizer.masters}
        state |= {v.untyped_storage().data_ptr() for s in optimizer.state.values() for v in s.values()}
        out[precision] = {
            "param_bytes": param_bytes,
            "built_other": sum(b for _, b, ptr in built.allocations if ptr not in state),
            "built_state": sum(b for _, b, ptr in built.allocations if ptr in state),
            "master_bytes": optimizer.master_bytes(),
            "step_largest": max((b for _, b, _ in stepped.allocations), default=0),
            "step_ops": sorted(stepped.ops),
            "dp": trainer.comm.snapshot()["dp"],
            "padded": sum(b.numel for b in trainer.sync.buckets),
            "buckets": len(trainer.sync.buckets),
            "params_in_buckets": all(
                any(p.untyped_storage().data_ptr() == b.param_data.untyped_storage().data_ptr()
                    for b in trainer.sync.buckets if b.param_data is not None)
                for p in trainer.params
            ),
        }
    return out


@functools.lru_cache(maxsize=None)
def memory_results() -> list[dict]:
    return run_distributed(_memory_worker, 2, timeout=200)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_all_gather_bytes_are_the_analytic_minimum_in_the_parameters_dtype(precision: str) -> None:
    size = 4 if precision == "fp32" else 2
    for per_rank in memory_results():
        result = per_rank[precision]
        dp = result["dp"]
        # each rank sends its half of every (padded) bucket once, in the parameters' dtype
        assert dp["all_gather"] == {"calls": result["buckets"], "bytes": size * result["padded"] // 2}
        assert dp["reduce_scatter"] == {"calls": result["buckets"], "bytes": 4 * result["padded"]}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_no_gather_buffer_is_allocated(precision: str) -> None:
    """Measured: building the optimizer allocates its fp32 masters only (none in fp32: the parameter
    bucket holds them), and a step allocates nothing of a bucket's size besides AdamW's own work."""
    for per_rank in memory_results():
        result = per_rank[precision]
        assert result["built_other"] == 0, result
        assert result["params_in_buckets"]
        assert result["built_state"] == result["master_bytes"]
        if precision == "fp32":
            assert result["master_bytes"] == 0
        else:  # the fp32 masters of this rank's half of each bucket (less the padding)
            assert 0 <= 4 * result["padded"] // 2 - result["master_bytes"] < 4 * result["buckets"]
        assert any("adamw" in op for op in result["step_ops"]), result["step_ops"]  # fused AdamW on the shard
        assert any("copy_" in op for op in result["step_ops"]) == (precision != "fp32")  # the cast into the bucket
        assert any("allgather" in op for op in result["step_ops"]), result["step_ops"]  # the gathers, in place
        assert result["step_largest"] < result["param_bytes"] / 64, result


# ---- pipeline chunks: interleaved schedule, the tied embedding's own bucket ----------------------------
def _interleaved_worker(rank: int, world_size: int) -> dict:
    groups = build_parallel_groups(Topology(pp=2, dp=2), rank, torch.device("cpu"))
    out = {}
    for zero in (0, 1):
        config = make_config(2, zero, "bf16", clip=0.0, global_batch=8)
        config.model.num_layers = 4
        config.parallel.pp, config.parallel.schedule, config.parallel.virtual_stages = 2, "interleaved", 2
        trainer = build_trainer(config, groups, None)
        records = trainer.fit()
        out[zero] = {"losses": [r["loss"] for r in records], "weights": weights(trainer), "chunks": len(trainer.chunks),
                     "deferred": sum(b.deferred for b in trainer.sync.buckets)}
    return out


@pytest.mark.slow  # 4 ranks, ~15 s: the interleaved schedule reads the buckets across two chunks
def test_zero1_interleaved_pipeline_equals_replicated_optimizer_bit_for_bit() -> None:
    for per_rank in run_distributed(_interleaved_worker, 4, timeout=300):
        sharded, replicated = per_rank[1], per_rank[0]
        assert sharded["chunks"] == 2 and sharded["deferred"] == 1  # the tied embedding's bucket
        assert sharded["losses"] == replicated["losses"]
        assert sharded["weights"].keys() == replicated["weights"].keys()
        for name, weight in sharded["weights"].items():
            assert torch.equal(weight, replicated["weights"][name]), name
