"""Checkpoint directories on disk: atomic commit, `latest` pointer, verification, keep-last-K.

Layout of `RUN_DIR/checkpoints/`::

    step_00000010/            a complete checkpoint (renamed into place only when complete)
        rank_00000.pt ...     each rank's pieces (its shards, its optimizer state, its RNG)
        metadata.json         step, config, layout, versions, and every file's size and sha256
    latest                    "step_00000010": written to a temp file, fsynced, renamed
    .tmp-step_00000020-XXXX/  an interrupted save (unique per save): ignored, and removed at the next start

A save writes every rank's file into the temp directory (fsync each), gathers sizes and
checksums on rank 0, checks them, writes metadata.json, renames the directory, then replaces
`latest` (`begin`, `write`, `commit`; an async save runs `write` in a background thread and
`commit` later, with every rank together). An interrupted or failed save therefore never leaves `latest` pointing at anything
incomplete, and a failure on any rank (a full disk) is agreed on by all ranks before commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megalm.faults import maybe_inject
from megalm.fsutil import describe_write_error
from megalm.fsutil import fsync_dir as _fsync_dir

METADATA = "metadata.json"
LATEST = "latest"
STEP_NAME = re.compile(r"step_[0-9]{8}")  # the only thing `latest` may name: an entry of this directory


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used; the message names the file and what to do."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file_name(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class CheckpointStore:
    """Saves and finds complete checkpoints under `root`, for all ranks of the job.

    Its collectives (barriers, the gathering of file records and checksum verdicts) run over
    `group`: the job's control group (`ParallelGroups.control_group`, gloo, checkpoint.timeout_s),
    never a training group, so that a slow save does not trip the training collectives' timeout.
    `group=None` means the default (world) group, for a store used outside a training run.
    """

    def __init__(
        self, root: Path, rank: int, keep: int = 3, writer=torch.save, group: Optional[dist.ProcessGroup] = None
    ) -> None:
        self.root = Path(root)
        self.rank = rank
        self.keep = keep
        self.writer = writer  # replaceable in tests (e.g. one that raises ENOSPC)
        self.group = group

    # ---- saving ---------------------------------------------------------------------------------
    def save(
        self, step: int, payload: dict[str, Any], metadata: dict[str, Any], file_info: Optional[dict[str, Any]] = None
    ) -> Path:
        """Write this rank's payload; rank 0 commits the checkpoint once every rank succeeded.

        `file_info` (this rank's, JSON-able) is recorded next to its file's size and checksum.
        The three phases (`begin`, `write`, `commit`) are also called apart: an async save runs
        `write` in a background thread while training goes on.
        """
        tmp = self.begin(step)
        return self.commit(step, tmp, self.write(step, tmp, payload, file_info), metadata)

    def begin(self, step: int) -> Path:
        """The temp directory of the save of `step`, made by rank 0 (all ranks call this together)."""
        name = None
        if self.rank == 0:
            # A name unique to this save, so that nothing else (a second job, which the run
            # directory lock refuses anyway) can remove or fill it; rank 0 tells the others.
            self.root.mkdir(parents=True, exist_ok=True)
            name = f".tmp-{step_dir_name(step)}-{os.getpid()}-{secrets.token_hex(4)}"
            (self.root / name).mkdir()
        return self.root / self._gather(name)[0]

    def write(
        self, step: int, tmp: Path, payload: dict[str, Any], file_info: Optional[dict[str, Any]] = None
    ) -> tuple[Optional[tuple[str, dict[str, Any]]], Optional[str]]:
        """Write and fsync this rank's file into `tmp`: ((file name, its record), None), or (None, the
        error). No collective: it may run in a background thread."""
        try:
            path = tmp / rank_file_name(self.rank)
            part = path.with_name(path.name + ".part")
            with open(part, "wb") as handle:
                self.writer(payload, handle)
                handle.flush()
                os.fsync(handle.fileno())
            part.replace(path)
            record = (path.name, {**(file_info or {}), "bytes": path.stat().st_size, "sha256": _sha256(path)})
            maybe_inject("save", step, self.rank, self.root.parent)
            return record, None
        except Exception as exc:  # noqa: BLE001 - every rank must learn of any rank's failure
            # A full disk says "No space left on device", not torch's "unexpected pos".
            return None, f"rank {self.rank} writing {path}: {describe_write_error(exc)}"

    def commit(
        self, step: int, tmp: Path, written: tuple[Optional[tuple[str, dict[str, Any]]], Optional[str]],
        metadata: dict[str, Any],
    ) -> Path:
        """Gather every rank's `write` result; rank 0 checks them, writes metadata.json, renames the
        directory and moves `latest` (all ranks call this together). Any rank's error: nothing is
        committed, and every rank raises CheckpointError."""
        final = self.root / step_dir_name(step)
        records = self._gather(written)
        errors = [err for _, err in records if err]
        if errors:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            self._barrier()
            try:
                previous = self.latest_name()
            except CheckpointError:
                previous = None
            raise CheckpointError(
                f"saving step {step} failed ({'; '.join(errors)}); nothing was committed and "
                f"{'the previous checkpoint ' + previous + ' is intact' if previous else 'there is no earlier checkpoint'}"
            )
        if self.rank == 0:
            files = {name: info for (name, info), _ in records}
            for name, info in files.items():
                if (tmp / name).stat().st_size != info["bytes"]:
                    raise CheckpointError(f"{tmp / name} changed size during the save")
            metadata = dict(metadata, step=step, files=files)
            meta_path = tmp / METADATA
            with open(meta_path, "w", encoding="utf-8") as handle:
                json.dump(metadata, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            _fsync_dir(self.root)
            self._write_latest(final.name)
            self._prune()
        self._barrier()
        return final

    def _write_latest(self, name: str) -> None:
        tmp = self.root / f".{LATEST}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(name + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(self.root / LATEST)
        _fsync_dir(self.root)

    def _prune(self) -> None:
        """Keep the `keep` most recently committed checkpoints (by commit time, not step number,
        so that a fresh run's saves are never removed in favour of an older run's higher steps)."""
        def committed(path: Path) -> tuple[float, str]:
            try:
                return (path / METADATA).stat().st_mtime, path.name
            except OSError:
                return 0.0, path.name

        for path in sorted(self.complete(), key=committed, reverse=True)[self.keep :]:
            shutil.rmtree(path, ignore_errors=True)

    def move_aside(self, log=print) -> Optional[Path]:
        """Move an earlier run's checkpoints to `checkpoints.old-<UTC time>/` (rank 0, for --no-resume)."""
        if self.rank != 0 or not self.root.exists() or not any(self.root.iterdir()):
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        target = self.root.with_name(f"{self.root.name}.old-{stamp}")
        suffix = 1
        while target.exists():
            target = self.root.with_name(f"{self.root.name}.old-{stamp}-{suffix}")
            suffix += 1
        self.root.rename(target)
        _fsync_dir(self.root.parent)
        log(f"--no-resume: moved the earlier checkpoints {self.root} to {target}; this run starts from step 0")
        return target

    def clean_leftovers(self) -> None:
        """Remove temp directories of interrupted saves (rank 0, at start)."""
        if self.rank == 0 and self.root.exists():
            for path in self.root.glob(".tmp-step_*"):
                shutil.rmtree(path, ignore_errors=True)

    # ---- finding and verifying ------------------------------------------------------------------
    def latest_name(self) -> Optional[str]:
        """The checkpoint `latest` names, or None; CheckpointError when it names anything but a
        plain `step_NNNNNNNN` entry of this directory (another path, garbage)."""
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        raw = pointer.read_bytes()
        try:
            name = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise CheckpointError(f"checkpoint pointer {pointer} is not text ({raw[:40]!r}...)") from None
        if not name:
            return None
        if not STEP_NAME.fullmatch(name):
            raise CheckpointError(
                f"checkpoint pointer {pointer} names {name[:200]!r}, not a step_NNNNNNNN entry of {self.root}"
            )
        return name

    def complete(self) -> list[Path]:
        """Complete checkpoints (with metadata), newest first."""
        if not self.root.exists():
            return []
        found = [p for p in self.root.glob("step_*") if p.is_dir() and (p / METADATA).exists()]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def verify(self, path: Path, share: tuple[int, int] = (0, 1)) -> dict[str, Any]:
        """Metadata of a checkpoint after checking every file's presence and size, and the checksums
        of this caller's share of the files: share (i, n) hashes every n-th file from the i-th, so n
        ranks together read the checkpoint once instead of n times."""
        meta_path = path / METADATA
        if not meta_path.exists():
            raise CheckpointError(f"{path} is incomplete: {METADATA} is missing")
        try:
            metadata = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{meta_path} is unreadable: {error}") from None
        for position, (name, info) in enumerate(sorted(metadata["files"].items())):
            file = path / name
            if not file.exists():
                raise CheckpointError(f"{file} is missing (listed in {meta_path})")
            if file.stat().st_size != info["bytes"]:
                raise CheckpointError(
                    f"{file} has {file.stat().st_size} bytes, {info['bytes']} expected: truncated or overwritten"
                )
            if position % share[1] == share[0] and _sha256(file) != info["sha256"]:
                raise CheckpointError(f"{file} fails its sha256 checksum: the file is corrupt")
        return metadata

    def verify_together(self, path: Path) -> tuple[Optional[dict[str, Any]], Optional[str]]:
        """(metadata, None) when `path` verifies, else (None, the first rank's problem). Every rank of
        the job calls this together: each checks its share of the checksums, then all agree."""
        share = (dist.get_rank(self.group), dist.get_world_size(self.group)) if _distributed() else (0, 1)
        metadata, problem = None, None
        try:
            metadata = self.verify(path, share)
        except CheckpointError as error:
            problem = str(error)
        problems = [p for p in self._gather(problem) if p]
        return (metadata, None) if not problems else (None, problems[0])

    def find_resumable(self, log=print) -> Optional[tuple[Path, dict[str, Any]]]:
        """The newest checkpoint that verifies, preferring `latest`; bad ones are reported and skipped.

        None when there is no checkpoint at all. When there are checkpoints (or a `latest` pointer)
        but none verifies, CheckpointError with every reason: starting over would overwrite them,
        so that takes an explicit --no-resume. No file is touched.
        """
        candidates = self.complete()
        reasons: list[str] = []
        try:
            name = self.latest_name()
        except CheckpointError as error:
            name = None
            reasons.append(str(error))
            log(f"{error}; ignoring it and looking for the newest complete checkpoint")
        if name is not None:
            pointed = self.root / name
            if not (pointed / METADATA).exists():
                reasons.append(f"{self.root / LATEST} names {name}, which is missing or incomplete")
                log(f"checkpoint pointer {self.root / LATEST} names {name}, which is missing or incomplete; "
                    f"looking for an earlier complete checkpoint")
            else:
                candidates = [pointed] + [c for c in candidates if c != pointed]
        for path in candidates:
            metadata, problem = self.verify_together(path)
            if problem is None:
                return path, metadata
            reasons.append(f"{path.name}: {problem}")
            log(f"skipping checkpoint {path}: {problem}")
        if reasons:
            raise CheckpointError(
                f"{self.root} has checkpoints but none can be resumed:\n  " + "\n  ".join(reasons)
                + "\nevery file was kept; repair or remove them, use another run directory, "
                "or pass --no-resume to start over (the checkpoints are then moved aside)"
            )
        return None

    # ---- collectives over the whole job (the control group) -------------------------------------
    def _barrier(self) -> None:
        if _distributed():
            dist.barrier(group=self.group)

    def _gather(self, item: Any) -> list[Any]:
        if not _distributed():
            return [item]
        out: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(out, item, group=self.group)
        return out
