"""Small filesystem helpers shared by the writers that must never leave a half-written file."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Optional


def fsync_dir(directory: Path) -> None:
    """Flush a directory entry (after a rename) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class PathError(ValueError):
    """A path from the command line or the config that cannot be used; the message says why and what to do."""


_FULL = (errno.ENOSPC, errno.EDQUOT)


def os_error_in(error: BaseException) -> Optional[OSError]:
    """The OSError behind `error`, if any: torch.save reports a failed write as a RuntimeError
    ("unexpected pos ...") whose __context__ is the OSError that says why (e.g. ENOSPC)."""
    seen: set[int] = set()
    current: Optional[BaseException] = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def describe_write_error(error: BaseException) -> str:
    """One line for a failed write: "no space left on device" for a full disk or quota, whatever
    wrapper (torch's "unexpected pos") it came in; otherwise the error itself."""
    cause = os_error_in(error)
    if cause is not None and cause.errno in _FULL:
        where = f" writing {cause.filename}" if cause.filename else ""
        return f"{os.strerror(cause.errno)} ({errno.errorcode[cause.errno]}){where}: free space on that filesystem"
    if cause is not None and cause is not error:
        return f"{type(error).__name__}: {error} ({type(cause).__name__}: {cause})"
    return f"{type(error).__name__}: {error}"


def _probe_writable(directory: Path) -> Optional[str]:
    """None when a file can be created in `directory` (created and removed at once), else why not."""
    try:
        handle, name = tempfile.mkstemp(prefix=".megalm-write-probe-", dir=directory)
    except OSError as error:
        return error.strerror or str(error)
    os.close(handle)
    os.unlink(name)
    return None


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run directory that training could not use, before any process group exists: a
    path that is a file, one that cannot be created, or a run or checkpoint directory that is not
    writable (found now, not at the first save after hours of training)."""
    run_dir = Path(run_dir)
    fix = "use another --run-dir (or train.run_dir)"
    if run_dir.exists() and not run_dir.is_dir():
        raise PathError(f"run directory {run_dir} is a file, not a directory: {fix}")
    if not run_dir.exists():
        ancestor = run_dir.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise PathError(f"run directory {run_dir} cannot be created: {ancestor} is a file: {fix}")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise PathError(f"run directory {run_dir} cannot be created: {ancestor} is not writable: {fix}")
        return
    checkpoints = run_dir / "checkpoints"
    if checkpoints.exists() and not checkpoints.is_dir():
        raise PathError(f"{checkpoints} is a file, but checkpoints are saved in that directory: move it, or {fix}")
    for directory, what in ((run_dir, "run directory"), (checkpoints, "checkpoint directory")):
        if directory.is_dir():
            reason = _probe_writable(directory)
            if reason is not None:
                raise PathError(
                    f"the {what} {directory} is not writable ({reason}): checkpoints and metrics could not be "
                    f"saved; make it writable or {fix}"
                )
