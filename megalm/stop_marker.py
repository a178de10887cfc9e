"""The clean-stop markers between `megalm.launch` and its workers (`megalm.cli train`).

The launcher sets MEGALM_CLEAN_STOP_DIR for its workers; a worker that saved and exited on a stop
signal leaves a marker there, and when every local worker did, the launcher reports the stop as a
success. Both sides import this module, so the worker never imports the launcher (which imports
`megalm.cli` to check a command before starting workers).
"""

from __future__ import annotations

import os
from pathlib import Path

STOP_DIR_ENV = "MEGALM_CLEAN_STOP_DIR"


def write_clean_stop_marker() -> None:
    """Called by a worker that saved and exited on a stop signal: record it for the launcher."""
    folder = os.environ.get(STOP_DIR_ENV)
    if folder and "RANK" in os.environ:
        Path(folder, f"rank_{os.environ['RANK']}").write_text(os.environ.get("LOCAL_WORLD_SIZE", "1") + "\n")


def all_stopped_cleanly(folder: Path) -> bool:
    """True when every local worker left a marker (each names the local world size)."""
    markers = list(folder.glob("rank_*"))
    return bool(markers) and all(int(m.read_text()) == len(markers) for m in markers)
