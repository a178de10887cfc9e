"""`python -m megalm.launch TORCHRUN_ARGS...`: torchrun that reports a clean signal stop as success.

On SIGTERM or SIGINT torchrun forwards the signal to its workers, waits for them (up to its
shutdown timeout) and then re-raises the signal as an exception: it exits 1 even when every worker
saved a checkpoint and exited 0, and a scheduler counts the stop as a failure. Here torchrun runs in
this process; each worker that stops cleanly on a signal writes a marker into MEGALM_CLEAN_STOP_DIR
(`megalm.cli`), and when every local worker did, this process exits 0.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence


def write_clean_stop_marker() -> None:
    """Called by a worker that saved and exited on a stop signal: record it for the launcher."""
    folder = os.environ.get("MEGALM_CLEAN_STOP_DIR")
    if folder and "RANK" in os.environ:
        Path(folder, f"rank_{os.environ['RANK']}").write_text(os.environ.get("LOCAL_WORLD_SIZE", "1") + "\n")


def all_stopped_cleanly(folder: Path) -> bool:
    """True when every local worker left a marker (each names the local world size)."""
    markers = list(folder.glob("rank_*"))
    return bool(markers) and all(int(m.read_text()) == len(markers) for m in markers)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    with tempfile.TemporaryDirectory(prefix="megalm-stop-") as folder:
        os.environ["MEGALM_CLEAN_STOP_DIR"] = folder  # the workers inherit it
        try:
            torchrun_main(list(sys.argv[1:] if argv is None else argv))
        except SignalException as error:
            if not all_stopped_cleanly(Path(folder)):
                raise
            print(f"megalm.launch: {error}: every local worker saved and exited 0; a clean stop", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
