"""Checkpoints: sharded atomic saves, verified resume (with fallback), resharding, stop signals.

`Checkpointer` ties a Trainer to a `CheckpointStore`: `save(step)` writes every rank's pieces
(see `state.py`) and commits atomically; `start()` resumes the run, or else loads the weights of
`train.init_from` (see `weights.py`); `resume()` finds the newest checkpoint that verifies,
refuses one from a different model, and restores weights, fp32 masters, the optimizer's state
(through its own load_state_dict), the loss scale, the data position and (same layout only) every
rank's RNG states, so the resumed run reproduces the uninterrupted one bit for bit.

We do not use torch.distributed.checkpoint: its resharding covers DTensor/FSDP state dicts,
while megalm's shards are plain tensors plus Megatron-style layout attributes; our own pieces
(name, full shape, tp slice, flat range) reshard tp, pp, dp and ZeRO-1 in ~150 lines, need no
process group to inspect, and keep atomicity and checksums under our control.
"""

from __future__ import annotations

import faulthandler
import os
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

import megalm
from megalm.checkpoint.state import (
    HostCopies, PieceIndex, collect_pieces, model_differences, named_params, optimizer_scalars, restore, saved_scalars,
    VOCAB_ROW_NAMES, shared_index, state_names, steps_of,
)
from megalm.checkpoint.store import CheckpointError, CheckpointStore, rank_file_name, step_dir_name
from megalm.checkpoint.weights import load_weights
from megalm.config import config_to_dict
from megalm.faults import maybe_inject

__all__ = ["Checkpointer", "CheckpointError", "CheckpointStore"]


def checkpoint_layout(topology, parallel) -> dict:
    """The layout a checkpoint records: the topology and the parallel settings its pieces were cut by."""
    layout = {
        "tp": topology.tp, "pp": topology.pp, "dp": topology.dp, "zero_stage": parallel.zero_stage,
        "virtual_stages": parallel.virtual_stages, "pipeline_layers": parallel.pipeline_layers,
        "sequence_parallel": parallel.sequence_parallel,
    }
    if topology.cp > 1:  # recorded only when used, so a cp = 1 layout is what checkpoints always recorded
        layout["cp"] = topology.cp
    return layout


def _layout(trainer) -> dict:
    return checkpoint_layout(trainer.groups.topology, trainer.config.parallel)


def _lower_priority() -> None:
    """Give the calling thread (the async writer) the lowest CPU priority (Linux: nice 19 for this
    thread only), so that where the CPU is short it takes what training leaves rather than half."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not allowed: the writer runs at training's priority
        pass


@dataclass
class _PendingSave:
    """An async save: its files are being written by `thread`; it commits at `Checkpointer.finish`."""

    step: int
    tmp: Path
    metadata: dict[str, Any]
    start: float  # perf_counter at the save's start
    stall_s: float  # how long training waited (the copy to host memory)
    thread: Optional[threading.Thread] = None
    written: tuple = (None, "the background writer ended without a result")  # store.write's result


class Checkpointer:
    """Saves and restores one Trainer's state under RUN_DIR/checkpoints."""

    def __init__(self, trainer, run_dir: Path, writer=torch.save) -> None:
        self.trainer = trainer
        self.config = trainer.config.checkpoint
        self.store = CheckpointStore(
            Path(run_dir) / "checkpoints", trainer.groups.rank, self.config.keep, writer, trainer.groups.control_group
        )
        self.store.clean_leftovers()
        self.last_save_time = time.monotonic()
        self.stop_requested = False
        self.stopped_on_signal = False
        self._stop_reached = False  # this rank reached a step boundary after the stop signal
        self._in_save = False
        self._longest_step_s: Optional[float] = None
        self._step_started: Optional[float] = None
        self.host = HostCopies(keep=self.config.async_save)  # pinned buffers with CUDA, reused by async saves
        self.pending: Optional[_PendingSave] = None  # an async save whose writer runs or awaits the commit

    # ---- saving ---------------------------------------------------------------------------------
    def save(self, step: int) -> Path:
        """Save the state after `step` optimizer steps (all ranks call this together).

        Synchronous: returns once the checkpoint is committed. With checkpoint.async_save, returns
        once this rank's share is copied to host memory; a background thread writes it, and the
        commit follows at the first `decide()` after every rank's writer is done (or at `finish()`).
        """
        self._in_save = True  # the stop-signal watchdog does not cut a save (see install_signal_handler)
        try:
            return self._save(step)
        finally:
            self._in_save = False

    def _save(self, step: int) -> Path:
        self.finish()  # the previous async save commits first (its writer has its buffers)
        trainer = self.trainer
        start = time.perf_counter()
        payload = {
            "rank": trainer.groups.rank,
            "layout": _layout(trainer),
            "pieces": collect_pieces(trainer.chunks, trainer.optimizer, trainer.groups, self.host),
            "rng": trainer.chunks[0].rng.state_dict(),
        }
        tokenizer = trainer.tokenizer
        scalars = optimizer_scalars(trainer.optimizer)
        metadata = {
            "megalm_version": megalm.__version__,
            "config": config_to_dict(trainer.config),
            "layout": _layout(trainer),
            "world_size": trainer.groups.topology.world_size,
            "consumed_samples": trainer.data.consumed_samples(step),
            "optimizer_steps": steps_of(scalars),
            "optimizer_scalars": scalars,  # per-parameter and group-level scalars (step), stored once
            "loss_scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
            "tokenizer_hash": tokenizer.hash if tokenizer is not None else None,
        }
        file_info = {"params": sorted({piece["name"] for piece in payload["pieces"]})}
        self.last_save_time = time.monotonic()
        if not self.config.async_save:
            path = self.store.save(step, payload, metadata, file_info=file_info)
            trainer.logger.info(f"checkpoint saved: {path} ({time.perf_counter() - start:.2f} s)")
            return path
        tmp = self.store.begin(step)
        pending = _PendingSave(step, tmp, metadata, start, time.perf_counter() - start)

        def write() -> None:
            _lower_priority()
            pending.written = self.store.write(step, tmp, payload, file_info)

        pending.thread = threading.Thread(target=write, name=f"megalm-checkpoint-writer-{step}", daemon=True)
        pending.thread.start()
        self.pending = pending
        trainer.logger.info(
            f"checkpoint of step {step}: copied to host memory in {pending.stall_s:.2f} s, written in the background"
        )
        return self.store.root / step_dir_name(step)

    def writing(self) -> bool:
        """Whether this rank's background writer is still writing."""
        return self.pending is not None and self.pending.thread.is_alive()

    def finish(self) -> Optional[Path]:
        """Wait for this rank's background writer and commit its save (all ranks call this together);
        CheckpointError when any rank's writer failed. None when no async save is pending."""
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        pending.thread.join()
        path = self.store.commit(pending.step, pending.tmp, pending.written, pending.metadata)
        self.trainer.logger.info(
            f"checkpoint saved: {path} ({time.perf_counter() - pending.start:.2f} s, of which training waited "
            f"{pending.stall_s:.2f} s for the copy to host memory)"
        )
        return path

    def before_step(self, step: int) -> None:
        """Called before optimizer step `step` (1-based); fault injection for tests hooks in here."""
        self._step_started = time.monotonic()
        maybe_inject("step", step, self.trainer.groups.rank, self.store.root.parent)

    def decide(self, step: int, final: bool) -> tuple[bool, bool]:
        """(save, stop) after `step` steps, agreed by every rank in one all-reduce.

        Save by count, by time (rank clocks differ, so any rank's "due" counts), at the end, or
        when any rank received the stop signal; stop on that signal. The all-reduce runs over the
        control group (gloo, a CPU tensor), like every collective of the checkpoint path. It also
        tells whether any rank's async writer is still writing; once none is, the pending save
        commits here (a writer's error is raised here, at the step after it happened).
        """
        if self._step_started is not None:
            took = time.monotonic() - self._step_started
            self._longest_step_s = max(took, self._longest_step_s or 0.0)
        self._stop_reached = self.stop_requested
        every, minutes = self.config.interval_steps, self.config.interval_minutes
        save = (every > 0 and step % every == 0) or (final and self.config.save_at_end)
        save = save or (minutes > 0 and time.monotonic() - self.last_save_time >= 60 * minutes)
        flags = torch.tensor([float(save), float(self.stop_requested), float(self.writing())])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.trainer.groups.control_group)
        save, stop = bool(flags[0]), bool(flags[1])
        if self.pending is not None and not flags[2]:
            self.finish()  # every rank's writer is done (every rank sees the same flags): commit now
        self.stopped_on_signal = stop  # this rank's or another's: megalm.launch reads it as a clean stop
        return save or stop, stop

    # ---- resuming -------------------------------------------------------------------------------
    def start_over(self) -> None:
        """--no-resume: move an earlier run's checkpoints aside (logged) so that this run's saves
        are neither pruned in their favour nor mixed with them at the next resume."""
        self.store.move_aside(log=self.trainer.logger.warning)
        self.store._barrier()

    def start(self, resume: bool = True) -> int:
        """The step training starts at (all ranks call this together). This run's newest checkpoint is
        resumed; when there is none (or `resume` is False, --no-resume: earlier checkpoints are moved
        aside), train.init_from's weights are loaded, if set, and training starts at 0. Logs which."""
        trainer = self.trainer
        source = trainer.config.train.init_from
        if resume:
            step = self.resume()
            if step is not None:
                if source is not None:
                    trainer.logger.info(
                        f"train.init_from={source} not used: this run directory has a checkpoint of its own, resumed "
                        f"at step {step} (--no-resume moves it aside and starts over from train.init_from)"
                    )
                return step
        else:
            self.start_over()
        if source is not None:
            self.initialize_from(source)
        return 0

    def initialize_from(self, source: str) -> Path:
        """Load the model weights alone from the checkpoint `source` names (train.init_from), at this
        run's layout and precision; optimizer, schedule, data and RNG stay fresh (checkpoint/weights.py)."""
        path, _ = load_weights(self.trainer, source, self.trainer.groups.control_dp_group
                               if self._share_reads() else None)
        return path

    def resume(self) -> Optional[int]:
        """Restore the newest usable checkpoint; return its step, or None when there is none."""
        trainer = self.trainer
        start = time.perf_counter()
        found = self.store.find_resumable(log=trainer.logger.warning)
        if found is None:
            return None
        path, metadata = found
        differences = model_differences(metadata["config"]["model"], config_to_dict(trainer.config)["model"])
        tokenizer = trainer.tokenizer
        saved_hash = metadata.get("tokenizer_hash")
        if tokenizer is not None and saved_hash and saved_hash != tokenizer.hash:
            differences.append(f"tokenizer hash: checkpoint {saved_hash[:12]}, this run {tokenizer.hash[:12]}")
        if differences:
            raise CheckpointError(
                f"checkpoint {path} is from a different model and cannot be resumed:\n  " + "\n  ".join(differences)
                + "\nuse the checkpoint's config, another run directory, or --no-resume"
            )
        verified = time.perf_counter()
        groups = trainer.groups
        same_layout = metadata["layout"] == _layout(trainer) and metadata["world_size"] == groups.topology.world_size
        # The dp ranks of this (tp, pp) shard read each needed file once between them and share the
        # pieces (with the same layout, their own files too: each one's RNG states are in its own);
        # or, not sharing (checkpoint.shared_read), each reads what it needs, its own file included.
        share = self._share_reads()
        own_files = tuple(rank_file_name(rank) for rank in (groups.dp_ranks if share else (groups.rank,)))
        index = shared_index(
            path, metadata["files"], names={name for name, _ in named_params(trainer.chunks)},
            state_names=state_names(trainer.chunks, trainer.optimizer),
            group=groups.control_dp_group if share else None, always=own_files if same_layout else (),
        )
        restore(trainer.chunks, trainer.optimizer, groups, index, saved_scalars(metadata))
        if trainer.scaler is not None and metadata.get("loss_scaler"):
            trainer.scaler.load_state_dict(metadata["loss_scaler"])
        if same_layout:
            trainer.chunks[0].rng.load_state_dict(index.payloads[trainer.groups.rank]["rng"])
        step = int(metadata["step"])
        self._resume_data(step, metadata)
        trainer.logger.info(
            f"resumed from {path} at step {step} ({time.perf_counter() - start:.2f} s, of which "
            f"{verified - start:.2f} s verifying)"
            + ("" if same_layout else f"; resharded from {metadata['layout']} (random streams reseeded)")
        )
        return step

    def _share_reads(self) -> bool:
        """Whether this shard's dp ranks share the reads at resume (checkpoint.shared_read; the same
        answer on every rank of the dp group)."""
        group, mode = self.trainer.groups.control_dp_group, self.config.shared_read
        if group is None or mode == "never":
            return False
        if mode == "always":
            return True
        hosts: list[Optional[str]] = [None] * dist.get_world_size(group)
        dist.all_gather_object(hosts, socket.gethostname(), group=group)
        return len(set(hosts)) > 1

    def _resume_data(self, step: int, metadata: dict[str, Any]) -> None:
        """Continue the data at the checkpoint's consumed_samples; say when the batch size or the seed changed."""
        trainer, saved = self.trainer, metadata["config"]["train"]
        current = trainer.config.train
        consumed = int(metadata.get("consumed_samples", step * saved["global_batch_size"]))
        trainer.data.resume_at(step, consumed)
        if saved["global_batch_size"] != current.global_batch_size:
            trainer.logger.warning(
                f"train.global_batch_size changed from {saved['global_batch_size']} to {current.global_batch_size}: "
                f"the data continues at sample {consumed} (the checkpoint's consumed_samples), in global batches of "
                f"{current.global_batch_size}"
            )
        if saved["seed"] != current.seed:
            trainer.logger.warning(
                f"train.seed changed from {saved['seed']} to {current.seed}: the data order changes from here on "
                f"(the run continues at sample {consumed} of the new order)"
            )

    # ---- stop signals ---------------------------------------------------------------------------
    def install_signal_handler(self) -> None:
        """On checkpoint.signal or SIGINT (Ctrl-C), finish the current step, save and exit 0 (every
        rank agrees); a second SIGINT exits at once with 130, without saving (the last committed
        checkpoint stays `latest`: saves are atomic).

        The signals are handled by a watcher thread woken through `signal.set_wakeup_fd`, so they are
        seen even while the main thread is stuck in C code (where Python-level handlers never run).
        After the first one the rank has `stop_grace_s()` to reach the end of its step; a rank that
        does not (stuck outside any collective: its peers have already timed out, and torchrun's
        SIGTERM is what reaches it) prints every thread's stack and exits 1 at once instead of
        waiting for torchrun's SIGKILL (30 s after a peer failed; TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 900 s in
        launch/env.sh, when torchrun itself was signalled).
        A save in progress is not cut: the checkpoint path has its own bound (checkpoint.timeout_s).
        """
        numbers = {getattr(signal, self.config.signal), signal.SIGINT}
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)

        def handler(number, frame):  # noqa: ARG001  (main thread, between bytecodes: may come late or never)
            self.stop_requested = True

        for number in numbers:  # a Python handler must be set for the C-level one to write to the wakeup fd
            signal.signal(number, handler)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self._watch_signals, args=(read_fd, numbers), daemon=True,
                         name="megalm-stop-signals").start()

    def stop_grace_s(self) -> float:
        """How long a rank may take after the stop signal to reach the end of its step: three times
        its longest step so far (at least 5 s), at most train.collective_timeout_s (the timeout
        itself before the first step has ended, which may include compilation)."""
        timeout = float(self.trainer.config.train.collective_timeout_s)
        if self._longest_step_s is None:
            return timeout
        return min(timeout, max(5.0, 3 * self._longest_step_s))

    def _watch_signals(self, read_fd: int, numbers: set) -> None:
        rank = self.trainer.groups.rank
        deadline = grace = None  # set by the first signal
        while True:
            # Asleep until a signal comes; after the first one, awake every 0.1 s to watch the deadline.
            ready, _, _ = select.select([read_fd], [], [], None if deadline is None else 0.1)
            received = [n for n in os.read(read_fd, 64) if n in numbers] if ready else []
            for number in received:
                if number == signal.SIGINT and deadline is not None:
                    print(f"megalm: rank {rank}: second interrupt: exiting now without saving", file=sys.stderr,
                          flush=True)
                    os._exit(128 + signal.SIGINT)
                if deadline is None:
                    self.stop_requested = True
                    grace = self.stop_grace_s()
                    deadline = time.monotonic() + grace
                    if number == signal.SIGINT:
                        print(f"megalm: rank {rank}: interrupt: saving after this step, then exiting (press Ctrl-C "
                              f"again to exit at once without saving)", file=sys.stderr, flush=True)
            if deadline is None or self._stop_reached:
                continue
            if self._in_save:  # saves are bounded by checkpoint.timeout_s; the grace restarts after one
                deadline = max(deadline, time.monotonic() + self.stop_grace_s())
            elif time.monotonic() > deadline:
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                print(f"megalm: rank {rank}: the stop signal came over {grace:.0f} s ago and this rank has "
                      f"not reached the end of step {self.trainer.current_step}: it is stuck outside any collective "
                      f"(its stack is above); exiting without saving (the last committed checkpoint stays latest)",
                      file=sys.stderr, flush=True)
                os._exit(1)


def checkpoint_summary(path: Path) -> dict[str, Any]:
    """Size and file count of a checkpoint directory."""
    files = list(Path(path).glob("*"))
    return {"files": len(files), "bytes": sum(f.stat().st_size for f in files)}


def export_consolidated(checkpoint_dir: Path, output: Path) -> dict[str, Any]:
    """Write one file of full tensors (real vocabulary rows only) plus the config, for inference."""
    import json
    import os

    checkpoint_dir = Path(checkpoint_dir)
    store = CheckpointStore(checkpoint_dir.parent, rank=0)
    metadata = store.verify(checkpoint_dir)
    index = PieceIndex(checkpoint_dir, metadata["files"])
    vocab = metadata["config"]["model"]["vocab_size"]
    state = {}
    for name, kind in sorted(index.pieces):
        if kind == "param":
            full = index.full(name, kind)
            state[name] = full[:vocab].clone() if name in VOCAB_ROW_NAMES else full
    output = Path(output)
    tmp = output.with_name(output.name + ".part")
    with open(tmp, "wb") as handle:
        torch.save({"config": metadata["config"], "step": metadata["step"], "state_dict": state}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(output)
    summary = {"tensors": len(state), "parameters": sum(t.numel() for t in state.values()), "bytes": output.stat().st_size}
    (output.with_name(output.name + ".json")).write_text(json.dumps(summary) + "\n")
    return summary
