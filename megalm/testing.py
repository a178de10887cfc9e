"""One spawn helper for multi-process tests: gloo on CPU, a free port, a hard timeout.

`run_distributed(fn, world_size, *args)` starts `world_size` processes, initialises gloo in each,
calls `fn(rank, world_size, *args)` and returns every rank's return value (tensors allowed).
A failure on any rank, or the timeout, kills all ranks and raises with the rank's traceback.
"""

from __future__ import annotations

import io
import os
import queue
import socket
import traceback
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from megalm.distributed import ParallelGroups, ProcessGroup


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dumps(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args)
        results.put((rank, True, _dumps(value)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 180.0) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; return the ranks' results."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, results), daemon=True)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    collected: dict[int, Any] = {}
    try:
        while len(collected) < world_size:
            try:
                rank, ok, payload = results.get(timeout=timeout)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(collected))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f}s") from None
            if not ok:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{payload}")
            collected[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
    return [collected[rank] for rank in range(world_size)]


# ---- plain reference reductions ---------------------------------------------------------------
# The trainer reduces gradients through megalm.parallel.data.GradientSync (buckets, overlap, ZeRO-1).
# These unbucketed versions do the same sums in the most direct way; tests use them to build the
# references that the engine is compared against.


def all_reduce_sequence_parallel_grads(params: Iterable[nn.Parameter], groups: ParallelGroups) -> None:
    """Sum, over tp, the gradients of replicated params that only saw this rank's sequence shard."""
    if groups.tp_group is None:
        return
    grads = [p.grad for p in params if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=groups.tp_group)
    for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def all_reduce_embedding_grads(chunks: list[nn.Module], groups: ParallelGroups) -> None:
    """Sum the tied embedding's gradient over its first-stage and last-stage copies."""
    if groups.embedding_group is None or groups.pp_size == 1:
        return
    weight = None
    if chunks[0].is_first:
        weight = chunks[0].embedding.word.weight
    elif chunks[-1].is_last:
        weight = chunks[-1].output_weight
    if weight is not None and weight.grad is not None:
        dist.all_reduce(weight.grad, group=groups.embedding_group)


def all_reduce_gradients(params: Iterable[nn.Parameter], group: ProcessGroup) -> None:
    """Sum every gradient over `group` in one flat buffer per dtype (no buckets, no overlap)."""
    if group is None:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for param in params:
        if param.grad is not None:
            by_dtype.setdefault(param.grad.dtype, []).append(param.grad)
    for grads in by_dtype.values():
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=group)
        for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(synced)
