"""One job per run directory: an exclusive lock held by rank 0 for the job's life.

Rank 0 takes `fcntl.flock(LOCK_EX | LOCK_NB)` on `RUN_DIR/.megalm.lock` and writes its host and pid
into it. The kernel drops the lock when the process dies (even by kill -9), so a crashed job never
blocks its restart. The other ranks do not lock: rank 0 decides, and its verdict is broadcast over
the default group right after `init_distributed`, before the parallel groups are built or the run
directory is written, so every rank of a refused job stops with the same message and no rank does
any work. (Every rank checking by itself would need a lock per rank, and on a shared filesystem
the ranks of one job would then block each other.) On NFS, Linux implements flock with byte-range
locks, which the server arbitrates between nodes.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import IO, Optional

import torch.distributed as dist

from megalm.checkpoint.store import CheckpointError

LOCK_FILE = ".megalm.lock"


class RunDirLockError(CheckpointError):
    """The run directory is held by another job (the message names its host and pid) or cannot be locked."""


def _try_lock(run_dir: Path) -> tuple[Optional[IO[str]], Optional[str]]:
    """(open lock file, None) when this process now holds the lock, else (None, the reason)."""
    path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+", encoding="utf-8")
    except OSError as error:
        return None, f"cannot create the run directory lock {path}: {error}; check --run-dir / train.run_dir"
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a process that has not written its name yet"
        handle.close()
        return None, (
            f"run directory {run_dir} is in use by another job ({holder}); two jobs in one run directory "
            f"overwrite each other's checkpoints and metrics. Wait for it or stop it, or use another --run-dir"
        )
    handle.seek(0)
    handle.truncate()
    handle.write(f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle, None


def lock_run_dir(run_dir: Path, rank: int) -> Optional[IO[str]]:
    """Lock `run_dir` for this job (all ranks call it together, after init_distributed).

    Rank 0 returns the open lock file (keep it open for the job's life; closing it, or dying,
    releases the lock); the other ranks return None. Every rank raises RunDirLockError when refused.
    """
    handle, refusal = _try_lock(Path(run_dir)) if rank == 0 else (None, None)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        verdict = [refusal]
        dist.broadcast_object_list(verdict, src=0)
        refusal = verdict[0]
    if refusal is not None:
        raise RunDirLockError(refusal)
    return handle
