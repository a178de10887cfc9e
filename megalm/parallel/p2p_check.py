"""A CPU check that pipeline p2p cannot deadlock under NCCL: record what the executor issues, replay it.

gloo buffers sends and matches by tag, so a CPU run cannot show an NCCL hang. Instead each pp
rank's real `PipelineExecutor` runs in this process with stub chunks and a `RecordingTransport`,
which logs every issued group and every wait (with peer, message key and bytes). `check_trace`
replays those per-rank programs under NCCL's rules:

- issuing a group is non-blocking; a `wait` blocks that rank's program until the op completes;
- each rank pair has ONE in-order channel shared by both directions: a rank's operations with a
  peer sit in that channel in issue order (the operations of one group with that peer form one
  item), and only the two head items of a pair can match, send against receive, in order;
- a send completes only when matched with the peer's receive (no buffering), and a group
  completes as a unit when all its operations (possibly with two peers) are matched; its items
  leave their channels' heads only then;
- optionally (`one_stream_per_rank`), all of a rank's groups also run one after another, as on a
  single NCCL communicator stream: a group starts only when the rank's earlier groups completed.

The replay reports deadlocks (the blocked ranks, what each waits for, the channel heads), sends
and receives whose sizes or keys disagree, and operations never completed or never waited.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from megalm.data.batch import Batch
from megalm.distributed import ParallelGroups
from megalm.parallel.p2p import Transfer
from megalm.topology import Topology

Trace = dict[int, list[dict]]  # rank -> events: {"issue": [op, ...]}, {"wait": op id}, {"compute": "F3.1"}


def key_text(key: Sequence) -> str:
    """("act", 3, 2) -> "act:3:2", the form a trace stores."""
    return ":".join(str(part) for part in key)


class RecordingTransport:
    """A transport that records issues and waits into `events` and fills receive buffers with zeros."""

    def __init__(self, events: list[dict], pp_ranks: Sequence[int]) -> None:
        self.events = events
        self.pp_ranks = pp_ranks
        self._next_id = 0

    def start(self, transfers: Sequence[Transfer]) -> list[int]:
        ops, ids = [], []
        for transfer in transfers:
            if transfer.kind == "recv":
                transfer.tensor.zero_()
            ops.append(
                {
                    "id": self._next_id,
                    "op": transfer.kind,
                    "peer": self.pp_ranks[transfer.peer],
                    "key": key_text(transfer.key),
                    "bytes": transfer.tensor.numel() * transfer.tensor.element_size(),
                }
            )
            ids.append(self._next_id)
            self._next_id += 1
        self.events.append({"issue": ops})
        return ids

    def wait(self, handle: list[int]) -> None:
        for op_id in handle:
            self.events.append({"wait": op_id})


# ---- the replay -------------------------------------------------------------------------------


@dataclass(eq=False)
class _Group:
    rank: int
    ops: list["_Op"] = field(default_factory=list)
    unmatched: int = 0

    @property
    def complete(self) -> bool:
        return self.unmatched == 0


@dataclass(eq=False)
class _Op:
    rank: int
    id: int
    kind: str
    peer: int
    key: str
    nbytes: int
    group: _Group
    matched: bool = False
    waited: bool = False

    def __str__(self) -> str:
        arrow = "->" if self.kind == "send" else "<-"
        return f"{self.kind} {self.key} ({self.nbytes} B) rank {self.rank} {arrow} rank {self.peer}"


@dataclass
class CheckResult:
    """What the replay found: an empty `problems` list means the trace is safe under NCCL's rules."""

    problems: list[str]
    num_ops: int

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_failed(self, what: str = "p2p trace") -> None:
        if self.problems:
            raise AssertionError(f"{what}: " + "\n".join(self.problems))


def check_trace(trace: Trace, one_stream_per_rank: bool = False) -> CheckResult:
    """Replay every rank's recorded program under NCCL's p2p rules (see the module docstring)."""
    ranks = sorted(trace)
    pc = {rank: 0 for rank in ranks}
    ops: dict[tuple[int, int], _Op] = {}
    channels: dict[tuple[int, int], deque] = {}  # (rank, peer) -> items [group, [ops]] in issue order
    streams: dict[int, deque] = {rank: deque() for rank in ranks}
    problems: list[str] = []

    def active(group: _Group) -> bool:
        return not one_stream_per_rank or streams[group.rank][0] is group

    def match(left: list[_Op], right: list[_Op]) -> bool:
        """Pair the unmatched sends of `left` with the unmatched receives of `right`, in order."""
        sends = [op for op in left if op.kind == "send" and not op.matched]
        recvs = [op for op in right if op.kind == "recv" and not op.matched]
        for send, recv in zip(sends, recvs):
            if send.nbytes != recv.nbytes:
                problems.append(f"size mismatch: {send} is received as {recv}")
            elif send.key != recv.key:
                problems.append(f"message mismatch: {send} is received as {recv}")
            for op in (send, recv):
                op.matched = True
                op.group.unmatched -= 1
        return bool(sends and recvs)

    while True:
        progress = False
        for rank in ranks:  # run each program up to its next unsatisfied wait
            events = trace[rank]
            while pc[rank] < len(events):
                event = events[pc[rank]]
                if "issue" in event:
                    group = _Group(rank)
                    by_peer: dict[int, list[_Op]] = {}
                    for spec in event["issue"]:
                        op = _Op(rank, spec["id"], spec["op"], spec["peer"], spec["key"], spec["bytes"], group)
                        if op.peer not in trace or op.peer == rank:
                            problems.append(f"{op}: the peer is not another rank of the trace {ranks}")
                            continue
                        ops[(rank, op.id)] = op
                        group.ops.append(op)
                        by_peer.setdefault(op.peer, []).append(op)
                    group.unmatched = len(group.ops)
                    for peer, peer_ops in by_peer.items():
                        channels.setdefault((rank, peer), deque()).append((group, peer_ops))
                    streams[rank].append(group)
                elif "wait" in event:
                    op = ops.get((rank, event["wait"]))
                    if op is None:
                        problems.append(f"rank {rank} waits for op {event['wait']}, which it never issued")
                        return CheckResult(problems, len(ops))
                    if not op.group.complete:
                        break
                    op.waited = True
                pc[rank] += 1
                progress = True
        for (rank, peer), channel in list(channels.items()):  # match the two head items of each pair
            other = channels.get((peer, rank))
            if rank > peer or not channel or not other:
                continue
            (mine, my_ops), (theirs, their_ops) = channel[0], other[0]
            if active(mine) and active(theirs):
                progress |= match(my_ops, their_ops)
                progress |= match(their_ops, my_ops)
        for channel in channels.values():  # an item leaves the head when its whole group completed
            while channel and channel[0][0].complete:
                channel.popleft()
        for stream in streams.values():
            while stream and stream[0].complete:
                stream.popleft()
        if not progress:
            break

    blocked = [rank for rank in ranks if pc[rank] < len(trace[rank])]
    if blocked:
        lines = [f"deadlock: ranks {blocked} wait forever"]
        for rank in blocked:
            op = ops[(rank, trace[rank][pc[rank]]["wait"])]
            pending = [str(o) for o in op.group.ops if not o.matched]
            lines.append(f"  rank {rank} waits for [{op}]; its group still needs: {pending}")
            for peer in sorted({o.peer for o in op.group.ops if not o.matched}):
                lines.append(f"    channel {rank}<->{peer}: rank {rank} head {_head(channels, rank, peer)}, "
                             f"rank {peer} head {_head(channels, peer, rank)}")
        problems.append("\n".join(lines))
    else:
        never = [str(op) for op in ops.values() if not op.matched]
        if never:
            problems.append(f"{len(never)} operations never completed: {never[:6]}")
        unwaited = [str(op) for op in ops.values() if op.matched and not op.waited]
        if unwaited:
            problems.append(f"{len(unwaited)} operations were never waited for: {unwaited[:6]}")
    return CheckResult(problems, len(ops))


def _head(channels: dict, rank: int, peer: int) -> str:
    channel = channels.get((rank, peer))
    if not channel:
        return "(nothing issued)"
    group, ops = channel[0]
    return "[" + "; ".join(f"{op.kind} {op.key}{'' if not op.matched else ' (matched)'}" for op in ops) + "]"


def sends_held_past_compute(trace: Trace, allowed: int = 0) -> list[str]:
    """Sends whose wait (their release) comes more than `allowed` compute events after their issue."""
    held = []
    for rank, events in trace.items():
        issued_at: dict[int, tuple[int, dict]] = {}
        computes = 0
        for event in events:
            if "compute" in event:
                computes += 1
            elif "issue" in event:
                for spec in event["issue"]:
                    if spec["op"] == "send":
                        issued_at[spec["id"]] = (computes, spec)
            elif "wait" in event and event["wait"] in issued_at:
                start, spec = issued_at.pop(event["wait"])
                if computes > start + allowed:
                    held.append(f"rank {rank}: send {spec['key']} waited {computes - start} computations later")
    return held


def save_trace(path: Path, trace: Trace, meta: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps({"meta": meta, "ranks": {str(r): e for r, e in trace.items()}}, indent=None))


def load_trace(path: Path) -> tuple[Trace, dict]:
    data = json.loads(Path(path).read_text())
    return {int(rank): events for rank, events in data["ranks"].items()}, data["meta"]


# ---- recording the real executor with stub chunks ---------------------------------------------


class StubChunk(nn.Module):
    """A model chunk with one scalar weight: [s, b, h] in, [s, b, h] out; logs each F and B it runs."""

    def __init__(self, shape: tuple[int, ...], events: list[dict], is_first: bool, is_last: bool, name: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.shape, self.events, self.is_first, self.is_last, self.name = shape, events, is_first, is_last, name

    def forward(self, inputs: torch.Tensor, labels: Optional[torch.Tensor] = None,
                prefix_lengths: Optional[torch.Tensor] = None,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.events.append({"compute": f"F {self.name}"})
        hidden = self.weight.expand(self.shape) * 1.0 if self.is_first else inputs * self.weight
        if hidden.requires_grad:
            hidden.register_hook(lambda grad: self.events.append({"compute": f"B {self.name}"}))
        return hidden.sum().reshape(1, 1) if self.is_last else hidden


def record_pipeline(schedule: str, pp: int, num_microbatches: int, virtual_stages: int,
                    shape: tuple[int, ...], forward_only: bool = False,
                    message_dtype: torch.dtype = torch.float32) -> Trace:
    """Run every pp rank's real PipelineExecutor (stub chunks, recording transport); return the trace."""
    from megalm.parallel.pipeline import PipelineExecutor  # the executor imports nothing from here

    topology = Topology(tp=1, pp=pp, dp=1)
    pp_ranks = tuple(range(pp))
    tokens = torch.zeros(shape[1], shape[0], dtype=torch.long)
    batches = [Batch(tokens, tokens, torch.ones(tokens.shape)) for _ in range(num_microbatches)]
    trace: Trace = {}
    last = pp * virtual_stages - 1
    for rank in range(pp):
        events: list[dict] = []
        groups = ParallelGroups(topology=topology, rank=rank, device=torch.device("cpu"), pp_ranks=pp_ranks)
        chunks = [
            StubChunk(shape, events, c * pp + rank == 0, c * pp + rank == last, f"chunk {c}")
            for c in range(virtual_stages)
        ]
        executor = PipelineExecutor(
            chunks, groups, schedule, num_microbatches, shape,
            transport=RecordingTransport(events, pp_ranks), message_dtype=message_dtype,
        )
        executor.run(batches, lambda losses, batch: losses.sum(), forward_only=forward_only)
        trace[rank] = events
    return trace
