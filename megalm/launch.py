"""`python -m megalm.launch TORCHRUN_ARGS...`: torchrun that reports a clean signal stop as success.

On SIGTERM or SIGINT torchrun forwards the signal to its workers, waits for them (up to its
shutdown timeout) and then re-raises the signal as an exception: it exits 1 even when every worker
saved a checkpoint and exited 0, and a scheduler counts the stop as a failure. Here torchrun runs in
this process; each worker that stops cleanly on a signal writes a marker into MEGALM_CLEAN_STOP_DIR
(`megalm.stop_marker`), and when every local worker did, this process exits 0.

Before starting any worker it checks a `-m megalm.cli train ...` command as every worker would
before its process group (config, layout, data, device, run directory, MEGALM_FAULT), so such a
mistake is printed once, in one line, with exit code 2; a worker that fails later is reported in one
line rather than torchrun's traceback and failure table (each worker has printed its own reason).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from megalm.stop_marker import STOP_DIR_ENV, all_stopped_cleanly


def _launch_world_size(args) -> Optional[int]:
    """nnodes x nproc-per-node when both are fixed numbers, else None (an elastic range, "gpu", "auto")."""
    low, _, high = str(args.nnodes).partition(":")
    nodes = low if not high or high == low else ""
    procs = str(args.nproc_per_node)
    return int(nodes) * int(procs) if nodes.isdigit() and procs.isdigit() else None


def check_before_launch(argv: Sequence[str]) -> Optional[str]:
    """The one-line report of a `-m megalm.cli train ...` command that every worker would refuse (a
    config, data, device, run directory or MEGALM_FAULT mistake), checked once here before any worker
    starts, so that it is printed once, not once per rank under torchrun's failure report. None: launch."""
    from torch.distributed.run import get_args_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = get_args_parser().parse_args(list(argv))
    except SystemExit:
        return None  # torchrun itself reports its usage errors, once
    if not (args.module and args.training_script == "megalm.cli"):
        return None
    from megalm.cli import check_launch

    return check_launch(args.training_script_args, _launch_world_size(args))


def _describe_failure(error) -> str:
    """One line instead of torchrun's traceback and failure table: the first worker that failed."""
    rank, failure = error.get_first_failure()
    how = f"exited with code {failure.exitcode}"
    if failure.exitcode < 0:
        how = f"was killed by signal {-failure.exitcode}"
    when = time.strftime("%H:%M:%S", time.localtime(failure.timestamp))
    return (
        f"megalm.launch: {len(error.failures)} worker(s) failed; the first: global rank {rank} (local rank "
        f"{failure.local_rank}, pid {failure.pid}) {how} at {when}; its own report is above"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    argv = list(sys.argv[1:] if argv is None else argv)
    refusal = check_before_launch(argv)
    if refusal is not None:
        print(refusal, file=sys.stderr, flush=True)
        return 2
    with tempfile.TemporaryDirectory(prefix="megalm-stop-") as folder:
        os.environ[STOP_DIR_ENV] = folder  # the workers inherit it
        try:
            torchrun_main(argv)
        except SignalException as error:
            if not all_stopped_cleanly(Path(folder)):
                raise
            print(f"megalm.launch: {error}: every local worker saved and exited 0; a clean stop", file=sys.stderr)
        except ChildFailedError as error:
            print(_describe_failure(error), file=sys.stderr, flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
