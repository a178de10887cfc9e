"""Stragglers named: each rank's compute time per step, gathered once per log interval, and the
slowest rank (its host, its time against the median of all ranks) reported by rank 0.

At thousands of ranks the slowest one sets the pace of all: the others wait for it in the gradient
reduction, so their step times all look alike. What tells the slow rank apart is the time each rank
spends on its own work before that wait. The trainer measures it per step with a `StepClock`; a
`StragglerMonitor` sums it between log lines and, on a log step, exchanges the sums in one small
all-gather over the control group (gloo, CPU tensors: nothing enters the GPU streams). Hostnames
are exchanged once, when the monitor is built. Nothing is synchronised on the other steps.
"""

from __future__ import annotations

import socket
import statistics
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from megalm.distributed import ParallelGroups, all_gather_single


class StepClock:
    """Marks on this rank's timeline: perf_counter on CPU; on a GPU, CUDA events on the current stream.

    On a GPU the host runs ahead of the device, so host time before a collective says little about the
    rank's compute; events time the stream itself. `seconds` reads them after the step has synchronised
    (the trainer's `loss.item()`), so they add no synchronisation of their own."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        """Seconds from mark `start` to mark `end` (on a GPU: both events must have completed)."""
        return start.elapsed_time(end) / 1000.0 if self.cuda else end - start


@dataclass(frozen=True)
class StragglerReport:
    """The slowest rank of the last log interval against the median rank (seconds of compute per step)."""

    rank: int
    host: str
    compute_s: float
    median_s: float
    steps: int
    factor: float

    @property
    def is_straggler(self) -> bool:
        return self.compute_s > self.factor * self.median_s

    def fields(self) -> dict[str, Any]:
        """The metrics.jsonl keys (docs/metrics.md)."""
        return {
            "straggler_rank": self.rank,
            "straggler_host": self.host,
            "straggler_compute_s": self.compute_s,
            "median_compute_s": self.median_s,
        }

    def message(self) -> str:
        ratio = f"{self.compute_s / self.median_s:.1f}x" if self.median_s > 0 else "n/a"
        text = (
            f"slowest rank {self.rank} on {self.host}: {1e3 * self.compute_s:.1f} ms of compute per step over the "
            f"last {self.steps} step(s), {ratio} the median rank's {1e3 * self.median_s:.1f} ms"
        )
        if self.is_straggler:
            text = (
                f"straggler: {text} (more than train.straggler_factor={self.factor:g}); every rank waits for it in "
                f"the gradient reduction: check that host (GPU clocks and temperature, its data reading, other "
                f"processes on it)"
            )
        return text


class StragglerMonitor:
    """Sums this rank's compute seconds per step; `report()` gathers every rank's sum in one all-gather.

    Every rank must call `report()` at the same steps (the trainer's log steps). The gather runs over
    the control group (gloo, CPU tensors); without one (a single process) the report names this rank."""

    def __init__(self, groups: ParallelGroups, factor: float) -> None:
        self.factor = factor
        self.compute_s = 0.0
        self.steps = 0
        self.group = groups.control_group  # None: a single process
        self.hosts = [socket.gethostname()]
        if self.group is not None:
            self.hosts = [""] * groups.topology.world_size
            dist.all_gather_object(self.hosts, socket.gethostname(), group=self.group)

    def add(self, compute_s: float) -> None:
        """Count one step of this rank."""
        self.compute_s += compute_s
        self.steps += 1

    def report(self) -> Optional[StragglerReport]:
        """The slowest rank since the last report, from one all-gather of (seconds, steps); None if no step."""
        mine = torch.tensor([self.compute_s, float(self.steps)], dtype=torch.float64)
        self.compute_s, self.steps = 0.0, 0
        everyone = mine
        if self.group is not None:
            everyone = torch.empty(len(self.hosts) * 2, dtype=torch.float64)
            all_gather_single(everyone, mine, self.group)
        pairs = everyone.view(-1, 2).tolist()
        if any(steps == 0 for _, steps in pairs):
            return None
        per_step = [seconds / steps for seconds, steps in pairs]
        slowest = max(range(len(per_step)), key=per_step.__getitem__)
        return StragglerReport(
            slowest, self.hosts[slowest], per_step[slowest], statistics.median(per_step), int(pairs[0][1]), self.factor
        )
