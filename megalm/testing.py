"""One spawn helper for multi-process tests: gloo on CPU, a free port, timeouts that end hangs fast.

`run_distributed(fn, world_size, *args)` starts `world_size` processes, initialises gloo in each,
calls `fn(rank, world_size, *args)` and returns every rank's return value (tensors allowed).
The processes fork from a forkserver that imported torch and the trainer once per test process
(`FORKSERVER_PRELOAD`), and take the caller's environment and working directory, as spawn would.

A hang fails in seconds, not minutes, and shows where every rank was stuck:

- every process group a worker creates (the world and, through torch's default, each `new_group`
  without an explicit timeout) times out after `collective_timeout` seconds (default 30,
  `MEGALM_TEST_COLLECTIVE_TIMEOUT_S`): a receive that no one sends, or a collective a rank never
  joins, raises on that rank instead of waiting for the test's whole budget;
- the spawn's work has `timeout` seconds once every rank has started (the caller sizes it; scaled by
  `MEGALM_TEST_TIMEOUT_SCALE` on a slow machine), and a rank that dies without reporting is
  noticed within a second;
- on any failure every rank still alive dumps its Python stack (faulthandler, on SIGUSR2) and the
  error raised here carries those stacks along with the failing rank's traceback.
The ranks' start-up (importing torch on a loaded machine) is outside these limits: the ranks meet
at a store barrier with a long timeout before the process group exists.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import io
import logging
import os
import queue
import random
import signal
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
import torch.multiprocessing as mp
from torch import nn

from megalm.distributed import ParallelGroups

ENV_COLLECTIVE_TIMEOUT = "MEGALM_TEST_COLLECTIVE_TIMEOUT_S"
ENV_TIMEOUT_SCALE = "MEGALM_TEST_TIMEOUT_SCALE"
DEFAULT_COLLECTIVE_TIMEOUT_S = 30.0
STARTUP_TIMEOUT_S = 300.0  # every rank imported torch and reached the store (8 ranks on 2 busy cores)
# Ranks start from a forkserver that imported these once (torch and megalm's trainer, which pulls in
# torch._dynamo: ~6 s of CPU per rank under spawn), not each from scratch; each rank is a fresh fork.
FORKSERVER_PRELOAD = ("torch", "torch.distributed", "megalm.testing", "megalm.train")
STACK_SIGNAL = signal.SIGUSR2  # SIGTERM/SIGINT/SIGUSR1 are the trainer's checkpoint signals


PORT_BLOCK_START = 20000  # below Linux's ephemeral range (32768+), so the kernel never hands these out itself
PORT_BLOCK_SIZE = 1000


def _port_block() -> range:
    """This process's block of ports: one per pytest-xdist worker (`PYTEST_XDIST_WORKER=gwN`), so two
    workers running tests side by side never pick the same port between its check and its use."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) % 12 if worker.startswith("gw") and worker[2:].isdigit() else 12
    start = PORT_BLOCK_START + index * PORT_BLOCK_SIZE
    return range(start, start + PORT_BLOCK_SIZE)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, from this test worker's own block (`_port_block`)."""
    block = _port_block()
    for port in random.Random(time.monotonic_ns() ^ os.getpid()).sample(block, 64):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use (or in TIME_WAIT): try another
            return port
    raise RuntimeError(f"no free TCP port among 64 tried in {block.start}-{block.stop - 1} on 127.0.0.1; "
                       "free some ports or end stray test processes")


def _dumps(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _seconds_from_env(name: str, default: float) -> float:
    text = os.environ.get(name, "")
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number of seconds; set it to e.g. 60 or unset it") from None
    if value <= 0:
        raise ValueError(f"{name}={text!r} must be positive; set it to e.g. 60 or unset it")
    return value


def _meet(store: dist.Store, world_size: int, timeout: float) -> None:
    """Wait until every rank has reached the store (start-up skew is not a hang)."""
    if store.add("megalm_testing/arrived", 1) == world_size:
        store.set("megalm_testing/all_arrived", "1")
    store.wait(["megalm_testing/all_arrived"], datetime.timedelta(seconds=timeout))


def _worker(
    rank: int, world_size: int, port: int, fn: Callable, args: tuple, results: Any,
    collective_timeout: float, stack_dir: str, environ: dict, cwd: str,
) -> None:
    # A forkserver child starts with the server's environment and directory: take the caller's, as spawn would.
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    stacks = open(Path(stack_dir) / f"rank_{rank}.txt", "w")  # noqa: SIM115 - open for the process's life
    faulthandler.register(STACK_SIGNAL, file=stacks, all_threads=True)
    try:
        store = dist.TCPStore(
            "127.0.0.1", port, world_size, is_master=rank == 0, timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S)
        )
        _meet(store, world_size, STARTUP_TIMEOUT_S)
        timeout = datetime.timedelta(seconds=collective_timeout)
        # Groups made later without a timeout (dist.new_group(...), build_parallel_groups' default)
        # take torch's default: make it this test's, in this worker process only.
        c10d.default_pg_timeout = timeout
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
        results.put((rank, None, b""))  # started: the spawn's time budget begins when every rank is here
        value = fn(rank, world_size, *args)
        results.put((rank, True, _dumps(value)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _stacks_of(procs: list, stack_dir: Path, ranks: Iterable[int]) -> str:
    """Ask each listed rank still alive for its Python stack; return them as text."""
    asked = []
    for rank in ranks:
        if procs[rank].is_alive():
            try:
                os.kill(procs[rank].pid, STACK_SIGNAL)
                asked.append(rank)
            except ProcessLookupError:
                pass
    if not asked:
        return ""
    time.sleep(1.0)  # faulthandler writes from the signal handler, at once; leave it a moment
    parts = []
    for rank in asked:
        text = (stack_dir / f"rank_{rank}.txt").read_text(errors="replace").strip()
        parts.append(f"--- rank {rank} stack ---\n{text or '(no stack written: the process did not answer)'}")
    return "\n".join(parts)


def _more_failures(failures: dict, procs: list, results: Any, world_size: int, done: set, wait: float = 2.0) -> dict:
    """The failures of the next `wait` seconds too: when one rank's collective times out, its peers
    fail a moment later ("connection closed") and whichever reports first need not be the cause."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and len(failures) + len(done) < world_size:
        try:
            rank, ok, payload = results.get(timeout=0.2)
        except queue.Empty:
            continue
        if ok:
            done.add(rank)
        elif ok is not None:
            failures[rank] = payload
    return failures


def run_distributed(
    fn: Callable, world_size: int, *args: Any, timeout: float = 180.0, collective_timeout: Optional[float] = None
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; return the ranks' results.

    `timeout`: seconds for the spawn's work once every rank has started (size it to the work),
    scaled by `MEGALM_TEST_TIMEOUT_SCALE`; `collective_timeout`: seconds a
    rank may wait in one collective or receive (default `MEGALM_TEST_COLLECTIVE_TIMEOUT_S` or 30)."""
    if collective_timeout is None:
        collective_timeout = _seconds_from_env(ENV_COLLECTIVE_TIMEOUT, DEFAULT_COLLECTIVE_TIMEOUT_S)
    timeout *= _seconds_from_env(ENV_TIMEOUT_SCALE, 1.0)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(FORKSERVER_PRELOAD))  # read when this process's server first starts
    results = ctx.Queue()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="megalm-stacks-") as stack_dir:
        procs = [
            ctx.Process(
                target=_worker,
                args=(rank, world_size, port, fn, args, results, collective_timeout, stack_dir, dict(os.environ),
                      os.getcwd()),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        finished = False
        try:
            values = _collect(procs, results, world_size, timeout, Path(stack_dir))
            finished = True
            return values
        finally:
            for proc in procs:
                proc.join(timeout=5 if finished else 0)  # after a failure the stacks are taken: end at once
                if proc.is_alive():
                    proc.kill()
                    proc.join(timeout=5)


def _collect(procs: list, results: Any, world_size: int, timeout: float, stack_dir: Path) -> list[Any]:
    """Gather every rank's result; on a failure, a death or the deadline, raise with the stacks."""
    collected: dict[int, Any] = {}
    started: set[int] = set()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S + timeout
    dead_since: dict[int, float] = {}
    while len(collected) < world_size:
        try:
            rank, ok, payload = results.get(timeout=0.5)
        except queue.Empty:
            now = time.monotonic()
            missing = sorted(set(range(world_size)) - set(collected))
            for rank in missing:
                if procs[rank].exitcode is not None:
                    dead_since.setdefault(rank, now)
            # A result is in the queue before its process exits; allow its pipe a moment to drain.
            gone = [rank for rank, since in dead_since.items() if rank in missing and now - since > 2.0]
            if gone:
                codes = ", ".join(f"rank {r} exit code {procs[r].exitcode}" for r in gone)
                stacks = _stacks_of(procs, stack_dir, missing)
                raise RuntimeError(f"ranks {gone} of {world_size} died without a result ({codes})\n{stacks}")
            if now > deadline:
                stacks = _stacks_of(procs, stack_dir, missing)
                raise TimeoutError(
                    f"ranks {missing} of {world_size} did not finish within {timeout:.0f}s; their stacks:\n{stacks}"
                )
            continue
        if ok is None:
            started.add(rank)
            if len(started) == world_size:
                deadline = time.monotonic() + timeout
            continue
        if not ok:
            failures = _more_failures({rank: payload}, procs, results, world_size, set(collected))
            others = _stacks_of(procs, stack_dir, sorted(set(range(world_size)) - set(collected) - set(failures)))
            raise RuntimeError(
                "\n".join(f"rank {r} of {world_size} failed:\n{text}" for r, text in failures.items())
                + (f"\nthe other ranks still running were here:\n{others}" if others else "")
            )
        collected[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    return [collected[rank] for rank in range(world_size)]


@contextlib.contextmanager
def log_messages(levels: bool = False) -> Iterator[list]:
    """The messages megalm's logger emits (at INFO and above) inside the block, in order; with `levels`,
    as (levelno, message) pairs."""
    from megalm.metrics import get_logger

    messages: list = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(  # type: ignore[method-assign]
        (record.levelno, record.getMessage()) if levels else record.getMessage()
    )
    logger = get_logger()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# ---- a plain reference reduction ---------------------------------------------------------------
# The trainer reduces gradients through megalm.parallel.data.GradientSync (buckets, overlap, ZeRO-1),
# and the TP/PP parity tests use it. Tests of other parts (communication counts, the optimizer)
# that only need the sequence-parallel sum use this unbucketed version.


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


def corpus_token_files(out: Path, size_mb: float, vocab_size: int, name: str = "tok") -> tuple[Path, Path]:
    """examples/quickstart.sh's data recipe through the command line, in `out`: the embedded corpus
    (seed 0, `size_mb` MB), a `vocab_size` tokenizer `name`.model and its token files; (prefix, tokenizer)."""
    from megalm.cli import main

    corpus = out / "corpus.jsonl"
    assert main(["data", "corpus", str(corpus), "--size-mb", str(size_mb), "--seed", "0"]) in (0, None)
    assert main(["tokenizer", "train", "--input", str(corpus), "--output", str(out / name),
                 "--vocab-size", str(vocab_size)]) in (0, None)
    assert main(["preprocess", "--input", str(corpus), "--output-prefix", str(out / "corpus"),
                 "--tokenizer", str(out / f"{name}.model"), "--workers", "1"]) in (0, None)
    return out / "corpus", out / f"{name}.model"


def full_tensor(tensor: torch.Tensor, param: nn.Parameter, groups: ParallelGroups) -> torch.Tensor:
    """The full tensor of `param`'s shard `tensor` (its data or its gradient), gathered over tp; a key/value
    shard held by several tp ranks counts once (megalm.parallel.tensor.gather_full_tensor)."""
    from megalm.parallel.tensor import gather_full_tensor

    return gather_full_tensor(tensor, param.tp_split_dim, groups, getattr(param, "tp_replicas", 1))


def full_weights(trainer) -> dict[str, torch.Tensor]:
    """Every parameter of the trainer's chunks as a full fp32 tensor, by name, after ZeRO-1's gathers landed."""
    trainer.wait_for_parameters()
    return {name: full_tensor(param.data, param, trainer.groups).float()
            for chunk in trainer.chunks for name, param in chunk.named_parameters()}

