"""A CPU check that pipeline p2p, with context-parallel collectives beside it, cannot deadlock under NCCL.

gloo buffers sends and matches by tag, so a CPU run cannot show an NCCL hang. Instead the real
`PipelineExecutor` of every rank (one per (pp, cp) coordinate; global ranks in the Topology's
order) runs in this process with stub chunks and a `RecordingTransport`, which logs every issued
group and every wait (with peer, message key and bytes). With cp > 1 the stub chunks also log the
collectives a model chunk issues over its cp group: per layer, the key/value all-gather in forward
and its reduce-scatter in backward (reverse layer order): the only collectives the trainer issues inside
the pipeline (the loss-token count and the gradient reductions run over dp x cp, another communicator).
`check_trace` replays those per-rank programs under NCCL's rules:

- issuing a group is non-blocking; a `wait` blocks that rank's program until the op completes;
- each rank pair has ONE in-order channel shared by both directions: a rank's operations with a
  peer sit in that channel in issue order (the operations of one group with that peer form one
  item), and only the two head items of a pair can match, send against receive, in order;
- a send completes only when matched with the peer's receive (no buffering), and a group
  completes as a unit when all its operations (possibly with two peers) are matched; its items
  leave their channels' heads only then;
- a collective completes only when every member of its group has called it, and blocks its
  rank's program until then (the computation after it consumes its result, and on the GPU all
  that is issued later waits for that computation). A communicator runs its collectives in call
  order, so members must call the same ones (operation, key, bytes) in the same order: a
  disagreement is reported as a mismatch naming the ranks and what each called;
- optionally (`one_stream_per_rank`), all of a rank's groups and collectives also run one after
  another, as on a single stream: each starts only when the rank's earlier ones completed, so a
  collective waits behind a p2p group still in flight and vice versa (stricter than PyTorch's
  stream per communicator).

The replay reports deadlocks (the blocked ranks, what each waits for, the channel heads and the
members a collective still waits for), sends and receives whose sizes or keys disagree,
collective mismatches, and operations never completed or never waited.
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

# rank -> events: {"issue": [op, ...]}, {"wait": op id}, {"compute": "F chunk 0"},
# {"collective": {"group": "cp", "ranks": [...], "op": "all_gather", "key": "F:3:0:1", "bytes": n}}
Trace = dict[int, list[dict]]


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

    def __str__(self) -> str:
        return "group [" + "; ".join(f"{op.kind} {op.key}" for op in self.ops) + "]"


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


@dataclass(eq=False)
class _Call:
    """One rank's call of a collective over `comm` = (group name, member ranks)."""

    rank: int
    comm: tuple[str, tuple[int, ...]]
    op: str
    key: str
    nbytes: int
    complete: bool = False

    @property
    def what(self) -> tuple[str, str, int]:
        return self.op, self.key, self.nbytes

    def __str__(self) -> str:
        return f"{self.op} {self.key} ({self.nbytes} B) over {self.comm[0]} {list(self.comm[1])}"


@dataclass
class CheckResult:
    """What the replay found: an empty `problems` list means the trace is safe under NCCL's rules."""

    problems: list[str]
    num_ops: int
    num_collectives: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_failed(self, what: str = "p2p trace") -> None:
        if self.problems:
            raise AssertionError(f"{what}: " + "\n".join(self.problems))


def check_trace(trace: Trace, one_stream_per_rank: bool = False) -> CheckResult:
    """Replay every rank's recorded program under NCCL's p2p and collective rules (see the module docstring)."""
    ranks = sorted(trace)
    pc = {rank: 0 for rank in ranks}
    ops: dict[tuple[int, int], _Op] = {}
    channels: dict[tuple[int, int], deque] = {}  # (rank, peer) -> items [group, [ops]] in issue order
    streams: dict[int, deque] = {rank: deque() for rank in ranks}  # groups and calls not yet complete
    comms: dict[tuple, dict[int, deque]] = {}  # (name, members) -> member -> its calls not yet complete
    calling: dict[int, Optional[_Call]] = {rank: None for rank in ranks}  # the call a rank is blocked in
    problems: list[str] = []
    num_calls = 0

    def active(item: Any) -> bool:
        return not one_stream_per_rank or streams[item.rank][0] is item

    def result() -> CheckResult:
        return CheckResult(problems, len(ops), num_calls)

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

    def call(rank: int, spec: dict) -> Optional[_Call]:
        members = tuple(spec["ranks"])
        entry = _Call(rank, (spec["group"], members), spec["op"], spec["key"], spec["bytes"])
        if entry.comm not in comms:
            if len(set(members)) != len(members) or any(member not in trace for member in members):
                problems.append(f"rank {rank} calls {entry}: a group must list distinct ranks of the trace {ranks}")
                return None
            comms[entry.comm] = {member: deque() for member in members}
        if rank not in members:
            problems.append(f"rank {rank} calls {entry}: the group must hold the caller")
            return None
        comms[entry.comm][rank].append(entry)
        streams[rank].append(entry)
        return entry

    while True:
        progress = False
        for rank in ranks:  # run each program up to its next unsatisfied wait or collective
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
                        return result()
                    if not op.group.complete:
                        break
                    op.waited = True
                elif "collective" in event:
                    if calling[rank] is None:
                        calling[rank] = call(rank, event["collective"])
                        if calling[rank] is None:
                            return result()
                        num_calls += 1
                        progress = True
                    if not calling[rank].complete:
                        break
                    calling[rank] = None
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
        for (name, members), queues in comms.items():  # a collective runs once every member called it
            if not all(queues[member] for member in members):
                continue
            heads = [queues[member][0] for member in members]
            if len({head.what for head in heads}) > 1:
                calls = ", ".join(f"rank {head.rank} calls {head.op} {head.key} ({head.nbytes} B)" for head in heads)
                problems.append(f"collective mismatch over {name} {list(members)}: {calls}")
                return result()
            if all(active(head) for head in heads):
                for head in heads:
                    head.complete = True
                    queues[head.rank].popleft()
                progress = True
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
        now = {rank: "finished its program" for rank in ranks}
        for rank in blocked:
            event = trace[rank][pc[rank]]
            if "wait" in event:
                pending = [str(op) for op in ops[(rank, event["wait"])].group.ops if not op.matched]
                now[rank] = f"waits for p2p: its group still needs {pending}"
            else:
                now[rank] = f"waits in [{calling[rank]}]"
        for rank in blocked:
            lines += _blocked_report(rank, trace[rank][pc[rank]], ops, channels, streams, comms, calling, now,
                                     one_stream_per_rank)
        problems.append("\n".join(lines))
    else:
        never = [str(op) for op in ops.values() if not op.matched]
        if never:
            problems.append(f"{len(never)} operations never completed: {never[:6]}")
        unwaited = [str(op) for op in ops.values() if op.matched and not op.waited]
        if unwaited:
            problems.append(f"{len(unwaited)} operations were never waited for: {unwaited[:6]}")
    return result()


def _blocked_report(rank: int, event: dict, ops: dict, channels: dict, streams: dict, comms: dict,
                    calling: dict, now: dict[int, str], one_stream: bool) -> list[str]:
    """What a blocked rank waits for, and why it cannot proceed."""
    lines = []
    if "wait" in event:
        op = ops[(rank, event["wait"])]
        pending = [str(o) for o in op.group.ops if not o.matched]
        lines.append(f"  rank {rank} waits for [{op}]; its group still needs: {pending}")
        if one_stream and streams[rank][0] is not op.group:
            lines.append(f"    its group is queued on rank {rank}'s stream behind [{streams[rank][0]}]")
        for peer in sorted({o.peer for o in op.group.ops if not o.matched}):
            lines.append(f"    channel {rank}<->{peer}: rank {rank} head {_head(channels, rank, peer)}, "
                         f"rank {peer} head {_head(channels, peer, rank)}")
        return lines
    entry = calling[rank]
    lines.append(f"  rank {rank} waits in [{entry}]")
    for member, queue in comms[entry.comm].items():
        if not queue:
            lines.append(f"    rank {member} has not called it: it {now[member]}")
        elif one_stream and streams[member][0] is not queue[0]:
            lines.append(f"    rank {member}'s call is queued on its stream behind [{streams[member][0]}]")
    return lines


def _head(channels: dict, rank: int, peer: int) -> str:
    channel = channels.get((rank, peer))
    if not channel:
        return "(nothing issued)"
    group, ops = channel[0]
    return "[" + "; ".join(f"{op.kind} {op.key}{'' if not op.matched else ' (matched)'}" for op in ops) + "]"


def _waited(events: list[dict], op: str):
    """(spec, computations run between its issue and its wait) of each `op` ("send" / "recv") a rank waits on."""
    issued_at: dict[int, tuple[int, dict]] = {}
    computes = 0
    for event in events:
        if "compute" in event:
            computes += 1
        elif "issue" in event:
            for spec in event["issue"]:
                if spec["op"] == op:
                    issued_at[spec["id"]] = (computes, spec)
        elif "wait" in event and event["wait"] in issued_at:
            start, spec = issued_at.pop(event["wait"])
            yield spec, computes - start


def sends_held_past_compute(trace: Trace, allowed: int = 0) -> list[str]:
    """Sends whose wait (their release) comes more than `allowed` compute events after their issue."""
    return [f"rank {rank}: send {spec['key']} waited {between} computations later"
            for rank, events in trace.items() for spec, between in _waited(events, "send") if between > allowed]


def receives_by_overlap(trace: Trace) -> dict[int, tuple[list[str], list[str]]]:
    """Per rank, the keys of receives (posted ahead, not ahead): ahead when a computation runs between the
    receive's issue and its wait, so its transfer can overlap that computation."""
    out = {}
    for rank, events in trace.items():
        ahead, late = [], []
        for spec, between in _waited(events, "recv"):
            (ahead if between > 0 else late).append(spec["key"])
        out[rank] = (ahead, late)
    return out


def save_trace(path: Path, trace: Trace, meta: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps({"meta": meta, "ranks": {str(r): e for r, e in trace.items()}}, indent=None))


def load_trace(path: Path) -> tuple[Trace, dict]:
    data = json.loads(Path(path).read_text())
    return {int(rank): events for rank, events in data["ranks"].items()}, data["meta"]


# ---- recording the real executor with stub chunks ---------------------------------------------


@dataclass(frozen=True)
class CpGroup:
    """What a stub chunk needs to log its cp collectives: the global ranks of its cp group, in cp order."""

    ranks: tuple[int, ...]
    layers: int = 2  # transformer layers per chunk: one all-gather (forward) and one reduce-scatter (backward) each

    def log(self, events: list[dict], op: str, key: tuple, nbytes: int) -> None:
        events.append({"collective": {"group": "cp", "ranks": list(self.ranks), "op": op, "key": key_text(key),
                                      "bytes": nbytes}})


class StubChunk(nn.Module):
    """A model chunk with one scalar weight: [s, b, h] in, [s, b, h] out; logs each F and B it runs.

    With a `cp` group it also logs the collectives a GPTModel chunk calls over it: per layer a key/value
    all-gather in forward, and in backward (reverse layer order) its reduce-scatter. Their keys name
    (F or B, micro-batch, chunk, layer); the micro-batch is read from the document ids the executor
    hands every chunk (record_pipeline fills them with the micro-batch's index)."""

    def __init__(self, shape: tuple[int, ...], events: list[dict], is_first: bool, is_last: bool, name: str,
                 index: int = 0, cp: Optional[CpGroup] = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.shape, self.events, self.is_first, self.is_last, self.name = shape, events, is_first, is_last, name
        self.index, self.cp = index, cp
        self.kv_bytes = 2 * torch.Size(shape).numel() * 4  # keys and values of this rank's tokens (a stand-in size)

    def forward(self, inputs: torch.Tensor, labels: Optional[torch.Tensor] = None,
                prefix_lengths: Optional[torch.Tensor] = None,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.events.append({"compute": f"F {self.name}"})
        microbatch = self._microbatch(document_ids)
        for layer in range(self.cp.layers if self.cp else 0):
            self.cp.log(self.events, "all_gather", ("F", microbatch, self.index, layer), self.kv_bytes)
        hidden = self.weight.expand(self.shape) * 1.0 if self.is_first else inputs * self.weight
        if hidden.requires_grad:
            hidden.register_hook(lambda grad: self._backward(microbatch))
        return hidden.sum().reshape(1, 1) if self.is_last else hidden

    def _backward(self, microbatch: Optional[int]) -> None:
        self.events.append({"compute": f"B {self.name}"})
        for layer in reversed(range(self.cp.layers if self.cp else 0)):
            self.cp.log(self.events, "reduce_scatter", ("B", microbatch, self.index, layer), self.kv_bytes)

    def _microbatch(self, document_ids: Optional[torch.Tensor]) -> Optional[int]:
        if self.cp is None:
            return None
        if document_ids is None:
            raise ValueError(f"{self.name}: a stub chunk with a cp group reads the micro-batch index from the "
                             f"document ids; fill each Batch's document_ids with its index (as record_pipeline does)")
        return int(document_ids.flatten()[0])


def rank_coordinates(pp: int, cp: int = 1) -> dict[int, tuple[int, int]]:
    """Global rank -> (pp rank, cp rank) of the recorded layout (tp = dp = 1; the Topology's rank order)."""
    topology = Topology(tp=1, pp=pp, dp=1, cp=cp)
    return {rank: (topology.coords(rank).pp, topology.coords(rank).cp) for rank in range(topology.world_size)}


def record_pipeline(schedule: str, pp: int, num_microbatches: int, virtual_stages: int,
                    shape: tuple[int, ...], forward_only: bool = False,
                    message_dtype: torch.dtype = torch.float32, cp: int = 1, layers: int = 2,
                    replicate_cp: bool = False, early_receives: bool = True) -> Trace:
    """Run the real PipelineExecutor of every (pp, cp) rank (stub chunks, recording transport); return the trace.

    Global ranks follow the Topology (tp = dp = 1: rank = pp_rank * cp + cp_rank). With cp > 1 each chunk
    logs `layers` all-gathers (forward) and reduce-scatters (backward) over its cp group (the loss needs
    none inside the pipeline: the trainer divides by the global token count, reduced before). `replicate_cp` runs
    only cp rank 0's executors and gives every other cp rank the same program over its own pp group
    (cp times faster; tests check on a subset that recording every cp rank gives the same trace).
    `early_receives=False` records the executor's reference protocol (no receive posted ahead)."""
    from megalm.parallel.pipeline import PipelineExecutor  # the executor imports nothing from here

    topology = Topology(tp=1, pp=pp, dp=1, cp=cp)
    tokens = torch.zeros(shape[1], shape[0], dtype=torch.long)
    batches = [Batch(tokens, tokens, torch.ones(tokens.shape), document_ids=torch.full(tokens.shape, index))
               for index in range(num_microbatches)]
    trace: Trace = {}
    last = pp * virtual_stages - 1
    for rank in range(topology.world_size):
        pp_rank, cp_rank = topology.coords(rank).pp, topology.coords(rank).cp
        if replicate_cp and cp_rank > 0:
            trace[rank] = _renamed(trace[topology.rank(pp_rank, 0, 0, cp=0)], topology, cp_rank)
            continue
        pp_ranks = tuple(topology.pp_group_ranks(rank))
        group = CpGroup(tuple(topology.cp_group_ranks(rank)), layers) if cp > 1 else None
        events: list[dict] = []
        groups = ParallelGroups(topology=topology, rank=rank, device=torch.device("cpu"), pp_ranks=pp_ranks)
        chunks = [
            StubChunk(shape, events, c * pp + pp_rank == 0, c * pp + pp_rank == last, f"chunk {c}", c, group)
            for c in range(virtual_stages)
        ]
        executor = PipelineExecutor(
            chunks, groups, schedule, num_microbatches, shape,
            transport=RecordingTransport(events, pp_ranks), message_dtype=message_dtype,
            early_receives=early_receives,
        )

        executor.run(batches, lambda losses, batch: losses.sum(), forward_only=forward_only)
        trace[rank] = events
    return trace


def _renamed(events: list[dict], topology: Topology, cp_rank: int) -> list[dict]:
    """cp rank 0's program as cp rank `cp_rank` of the same pp rank runs it: p2p peers in its own pp group."""
    rename = {topology.rank(p, 0, 0, cp=0): topology.rank(p, 0, 0, cp=cp_rank) for p in range(topology.pp)}
    return [{"issue": [{**op, "peer": rename[op["peer"]]} for op in event["issue"]]} if "issue" in event else event
            for event in events]
