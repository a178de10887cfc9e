"""The multi-process test harness itself: a hang or a dead rank fails fast, with every rank's stack."""

from __future__ import annotations

import os
import re
import threading
import time

import pytest
import torch
import torch.distributed as dist

from megalm.testing import run_distributed

# Spawning ranks (importing torch) takes seconds on a loaded machine; the hangs below are limited to
# a few seconds more. The old harness waited for the spawn's whole budget (180-600 s) here.
FAST = 60.0


def _crossed_receive(rank: int, world_size: int) -> None:
    """A receive-order mistake: both ranks receive first, so neither ever sends."""
    buffer = torch.zeros(4)
    dist.recv(buffer, src=1 - rank)
    dist.send(buffer, dst=1 - rank)


def test_a_communication_deadlock_fails_within_seconds_with_the_stuck_receive_named() -> None:
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        run_distributed(_crossed_receive, 2, timeout=600, collective_timeout=3)
    assert time.monotonic() - start < FAST
    message = str(info.value)
    # The first rank to report timed out in its receive (or saw its peer, which had, hang up).
    assert re.search(r"Timed out waiting 3000ms for recv|Connection closed by peer|pair closure", message), message
    assert "in _crossed_receive" in message and "dist.recv(buffer" in message




def _wait_forever_in_python() -> None:
    threading.Event().wait()


def _both_stuck(rank: int, world_size: int) -> None:
    if rank == 0:
        _wait_forever_in_python()
    dist.barrier()  # rank 1 waits here for rank 0


def test_a_python_hang_fails_at_the_spawn_timeout_with_every_stuck_ranks_stack() -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        run_distributed(_both_stuck, 2, timeout=8, collective_timeout=600)
    assert time.monotonic() - start < FAST
    message = str(info.value)
    assert "ranks [0, 1] of 2 did not finish within 8s" in message
    rank0, rank1 = message.split("--- rank 1 stack ---")
    assert "--- rank 0 stack ---" in rank0 and "_wait_forever_in_python" in rank0 and "_both_stuck" in rank0
    assert "_both_stuck" in rank1 and "barrier" in rank1


def _first_rank_fails(rank: int, world_size: int) -> None:
    if rank == 0:
        raise ValueError("rank 0 broke")
    _wait_forever_in_python()


def test_a_failing_rank_reports_its_traceback_and_the_others_stacks_at_once() -> None:
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        run_distributed(_first_rank_fails, 2, timeout=600)
    assert time.monotonic() - start < FAST
    message = str(info.value)
    assert message.startswith("rank 0 of 2 failed:") and "ValueError: rank 0 broke" in message
    assert "--- rank 1 stack ---" in message and "_wait_forever_in_python" in message


def _rank_dies(rank: int, world_size: int) -> None:
    if rank == 1:
        os._exit(7)  # no exception, no result: a crash
    _wait_forever_in_python()


def test_a_rank_that_dies_without_a_result_is_noticed_at_once() -> None:
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"ranks \[1\] of 2 died without a result \(rank 1 exit code 7\)") as info:
        run_distributed(_rank_dies, 2, timeout=600)
    assert time.monotonic() - start < FAST
    assert "--- rank 0 stack ---" in str(info.value)


def _groups_inherit_the_timeout(rank: int, world_size: int) -> float:
    group = dist.new_group([0, 1])  # no timeout given: the harness's collective timeout applies
    buffer = torch.zeros(1)
    start = time.monotonic()
    try:
        if rank == 0:
            dist.recv(buffer, src=1, group=group)
        else:
            dist.barrier(group=group)
    except RuntimeError:
        return time.monotonic() - start
    return -1.0


def test_new_groups_take_the_collective_timeout() -> None:
    waited = run_distributed(_groups_inherit_the_timeout, 2, timeout=600, collective_timeout=2)
    assert all(1.5 < seconds < 20 for seconds in waited), waited
