"""Fault injection for the restart, hang and node-failure tests (off unless MEGALM_FAULT is set).

MEGALM_FAULT="KIND:RANK:STEP[:SECONDS]" makes global rank RANK, at optimizer step STEP:
  kill          SIGKILL itself before the step runs;
  kill-in-save  SIGKILL itself inside the checkpoint save of STEP, after writing its own file;
  hang          block in a collective that no other rank joins (or sleep SECONDS without
                torch.distributed): its peers wait in theirs until the collective timeout;
  sleep         sleep SECONDS before the step, outside any collective (a window in which a test
                can kill this rank's node at a known step; its peers wait in their next collective);
  sleep-in-save sleep SECONDS inside the checkpoint save of STEP, after writing its own file (a slow
                filesystem: its peers wait in the save's coordination, on the control group);
  oom           raise torch.OutOfMemoryError before the step (what the CUDA allocator raises);
  slow          from STEP on, sleep SECONDS (required) in every step, after reading the batch and
                before any collective of the step: a straggler (a slow GPU or host), which the
                trainer's straggler report names (megalm/stragglers.py).
RANK may be "*" (every rank of the processes that see the variable, e.g. one node's agent).
A fault fires once per run directory and rank (a marker file records it), so a restarted job goes on;
"slow" fires in every step from STEP on and leaves no marker.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

KINDS = ("kill", "kill-in-save", "hang", "sleep", "sleep-in-save", "oom", "slow")
# Where a kind fires: "save" inside the save of STEP, "compute" inside train_step; the others "step", before it.
_WHERE = {"kill-in-save": "save", "sleep-in-save": "save", "slow": "compute"}


class FaultSpecError(ValueError):
    """MEGALM_FAULT is set but malformed; checked at start, before any process group exists."""


@dataclass(frozen=True)
class FaultSpec:
    kind: str
    rank: Optional[int]  # None: every rank ("*")
    step: int
    seconds: Optional[float]


def parse_fault_spec(spec: str) -> FaultSpec:
    """Parse "KIND:RANK:STEP[:SECONDS]"; FaultSpecError (one line, with the fix) when malformed."""
    fix = (
        f"expected KIND:RANK:STEP[:SECONDS], e.g. kill:1:5, with KIND one of {', '.join(KINDS)}; "
        f"or unset MEGALM_FAULT"
    )
    parts = spec.split(":")
    if not 3 <= len(parts) <= 4:
        raise FaultSpecError(f"MEGALM_FAULT={spec!r} has {len(parts)} field(s): {fix}")
    kind, rank, step = parts[:3]
    if kind not in KINDS:
        raise FaultSpecError(f"MEGALM_FAULT={spec!r}: unknown kind {kind!r}: {fix}")
    if rank != "*" and not rank.isdigit():
        raise FaultSpecError(f"MEGALM_FAULT={spec!r}: RANK must be a global rank or *, got {rank!r}: {fix}")
    if not step.isdigit():
        raise FaultSpecError(f"MEGALM_FAULT={spec!r}: STEP must be an optimizer step number, got {step!r}: {fix}")
    seconds = None
    if len(parts) == 4:
        try:
            seconds = float(parts[3])
        except ValueError:
            seconds = -1.0
        if not seconds >= 0:
            raise FaultSpecError(f"MEGALM_FAULT={spec!r}: SECONDS must be a number >= 0, got {parts[3]!r}: {fix}")
    if kind == "slow" and seconds is None:
        raise FaultSpecError(
            f"MEGALM_FAULT={spec!r}: slow needs SECONDS, the delay added to every step, e.g. slow:1:1:0.2"
        )
    return FaultSpec(kind, None if rank == "*" else int(rank), int(step), seconds)


def check_fault_env() -> None:
    """Refuse a malformed MEGALM_FAULT at start, not at the first step of a long run."""
    spec = os.environ.get("MEGALM_FAULT")
    if spec:
        parse_fault_spec(spec)


def maybe_inject(where: str, step: int, rank: int, run_dir: Optional[Path] = None) -> None:
    """Fire the configured fault if it matches (where in {"step", "save", "compute"}, step, rank).

    run_dir: where the once-only kinds leave their markers (not needed at "compute": "slow" leaves none)."""
    spec = os.environ.get("MEGALM_FAULT")
    if not spec:
        return
    fault = parse_fault_spec(spec)
    kind, seconds = fault.kind, 3600.0 if fault.seconds is None else fault.seconds
    if fault.rank not in (None, rank) or where != _WHERE.get(kind, "step"):
        return
    if kind == "slow":  # every step from STEP on, and no marker
        if step >= fault.step:
            time.sleep(seconds)
        return
    if fault.step != step:
        return
    marker = Path(run_dir) / f".fault-{kind}-{rank}-{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{os.getpid()}\n")  # the pid, for tests that look for orphans
    if kind in ("kill", "kill-in-save"):
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind in ("sleep", "sleep-in-save"):
        time.sleep(seconds)
    elif kind == "oom":
        import torch

        raise torch.OutOfMemoryError(
            f"CUDA out of memory (injected by MEGALM_FAULT={spec}). Tried to allocate 2.00 GiB"
        )
    elif kind == "hang":
        import torch
        import torch.distributed as dist

        if dist.is_initialized():
            dist.all_reduce(torch.zeros(1))  # unmatched: only this rank calls it now
        time.sleep(seconds)
