"""Communication accounting: calls and bytes per collective and per process group during a step.

This is how megalm shows that a step moves no more than it must. A `CommCounter` is created
explicitly from the rank's ParallelGroups and switched on around the code to measure:

    counter = CommCounter(groups)
    with counter.counting():
        trainer_step()
    logger.info(counter.format())   # comm: tp all_reduce 12x 123 KB | dp all_reduce 1x 482 KB
    counter.reset()

While at least one counter is counting, the torch.distributed functions megalm calls are replaced
on the `torch.distributed` module by thin wrappers that record the call and then call the original;
the originals are put back when the last counter stops (also when the measured code raises).
Patching a module is process-wide by nature, so one private interceptor holds the active counters;
there is still no parallel state here: each counter is handed its groups. Every active counter sees
every call (nested counters both count it), from any thread: on GPU, autograd runs backward
collectives on its own threads. A collective that torch implements by calling another one is
counted once, as the function megalm called.

What "bytes" means, per op (numel * element size of the tensor argument(s) on this rank):

    all_reduce, reduce, broadcast       the tensor
    all_gather (list and single-tensor  the input, i.e. this rank's local piece (the output is
      all_gather_into_tensor/_single)   group size times larger)
    reduce_scatter (list and single-    the full input, i.e. group size times the output piece
      tensor reduce_scatter_tensor/_single)
    all_to_all_single                   the input
    isend, irecv, send, recv            the tensor sent or received
    batch_isend_irecv                   each of its P2POps, counted as one isend or irecv call
    barrier                             0

Op names are canonical: the single-tensor and list forms of all_gather and reduce_scatter share a
name. Group names come from the ParallelGroups: "tp", "dp", "pp", "embedding"; None or WORLD is
"world"; any other group is named by its global ranks, e.g. "ranks[0, 2]". Object collectives
(all_gather_object, broadcast_object_list, ...) are not counted.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import threading
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from megalm.distributed import ParallelGroups

ENV_SWITCH = "MEGALM_COMM_STATS"


def comm_stats_enabled(configured: bool = False) -> bool:
    """True when the config asks for communication stats or the environment sets MEGALM_COMM_STATS=1."""
    return configured or os.environ.get(ENV_SWITCH, "").strip().lower() in ("1", "true", "yes", "on")


def _tensor_bytes(tensor: Any) -> int:
    return tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0


def _list_bytes(tensors: Any) -> int:
    return sum(_tensor_bytes(t) for t in tensors or ())


# torch.distributed function -> (canonical op name, name of the argument whose bytes count, how).
_SPECS: dict[str, tuple[str, Optional[str], Callable[[Any], int]]] = {
    "all_reduce": ("all_reduce", "tensor", _tensor_bytes),
    "reduce": ("reduce", "tensor", _tensor_bytes),
    "broadcast": ("broadcast", "tensor", _tensor_bytes),
    "all_gather": ("all_gather", "tensor", _tensor_bytes),
    "all_gather_into_tensor": ("all_gather", "input_tensor", _tensor_bytes),
    "all_gather_single": ("all_gather", "input_tensor", _tensor_bytes),
    "reduce_scatter": ("reduce_scatter", "input_list", _list_bytes),
    "reduce_scatter_tensor": ("reduce_scatter", "input", _tensor_bytes),
    "reduce_scatter_single": ("reduce_scatter", "input", _tensor_bytes),
    "all_to_all_single": ("all_to_all", "input", _tensor_bytes),
    "isend": ("isend", "tensor", _tensor_bytes),
    "irecv": ("irecv", "tensor", _tensor_bytes),
    "send": ("send", "tensor", _tensor_bytes),
    "recv": ("recv", "tensor", _tensor_bytes),
    "barrier": ("barrier", None, _tensor_bytes),
}
_BATCH_P2P = "batch_isend_irecv"
_GROUP_ORDER = ("tp", "dp", "pp", "embedding", "world")


class _Wrapped:
    """Stands in for one torch.distributed function while counting; compares equal to it.

    Equality matters for torch's own checks such as P2POp's `op in [isend, irecv]`.
    """

    def __init__(self, name: str, original: Callable, interceptor: "_Interceptor") -> None:
        self.__name__ = self.__qualname__ = name
        self.__doc__ = original.__doc__
        self.__wrapped__ = original
        self.original = original
        self._interceptor = interceptor
        self._signature = inspect.signature(original)

    def __eq__(self, other: object) -> bool:
        return other is self or other is self.original

    def __hash__(self) -> int:
        return hash(self.original)

    def __repr__(self) -> str:
        return f"<counted {self.__name__}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        interceptor = self._interceptor
        local = interceptor.local
        if getattr(local, "depth", 0) > 0 or not interceptor.active:
            return self.original(*args, **kwargs)
        try:
            records = self._records(args, kwargs)
        except TypeError:  # arguments torch will reject: let the original raise its own error
            return self.original(*args, **kwargs)
        local.depth = getattr(local, "depth", 0) + 1
        try:
            result = self.original(*args, **kwargs)
        finally:
            local.depth -= 1
        interceptor.record(records)
        return result

    def _records(self, args: tuple, kwargs: dict) -> list[tuple[str, Any, int]]:
        """(op, group, bytes) of this call, read from its arguments before the call runs."""
        if self.__name__ == _BATCH_P2P:
            ops = args[0] if args else kwargs.get("p2p_op_list", [])
            records = []
            for p2p in ops:
                if isinstance(p2p.op, _Wrapped):
                    # batch_isend_irecv tells sends from receives with `op.op is isend`.
                    p2p.op = p2p.op.original
                records.append((p2p.op.__name__, p2p.group, _tensor_bytes(p2p.tensor)))
            return records
        op, argument, measure = _SPECS[self.__name__]
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        size = measure(bound.get(argument)) if argument is not None else 0
        return [(op, bound.get("group"), size)]


class _Interceptor:
    """Installs the wrappers while any counter is active; the single owner of the patching."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.local = threading.local()
        self.active: list["CommCounter"] = []
        self._depth: dict[int, int] = {}  # id(counter) -> nesting of its counting() blocks

    def activate(self, counter: "CommCounter") -> None:
        with self.lock:
            depth = self._depth.get(id(counter), 0)
            self._depth[id(counter)] = depth + 1
            if depth == 0:
                if not self.active:
                    self._install()
                self.active = self.active + [counter]

    def deactivate(self, counter: "CommCounter") -> None:
        with self.lock:
            depth = self._depth.pop(id(counter)) - 1
            if depth > 0:
                self._depth[id(counter)] = depth
                return
            self.active = [c for c in self.active if c is not counter]
            if not self.active:
                self._uninstall()

    def record(self, records: list[tuple[str, Any, int]]) -> None:
        for counter in self.active:
            for op, group, size in records:
                counter._add(op, group, size)

    def _install(self) -> None:
        for name in (*_SPECS, _BATCH_P2P):
            current = getattr(dist, name, None)
            if current is not None and not isinstance(current, _Wrapped):
                setattr(dist, name, _Wrapped(name, current, self))

    def _uninstall(self) -> None:
        for name in (*_SPECS, _BATCH_P2P):
            current = getattr(dist, name, None)
            if isinstance(current, _Wrapped) and current._interceptor is self:
                setattr(dist, name, current.original)


_INTERCEPTOR = _Interceptor()


def _format_bytes(size: float) -> str:
    """SI units: 1 KB = 1000 B."""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" or size >= 100 else f"{size:.3g} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


class CommCounter:
    """Counts calls and bytes per (collective, group) of this rank while `counting()` is active.

    enabled=False makes `counting()` a no-op that patches nothing (and `format()` return ""), so a
    trainer can hold one unconditionally: CommCounter(groups, enabled=comm_stats_enabled(flag)).
    """

    def __init__(self, groups: ParallelGroups, enabled: bool = True) -> None:
        self.enabled = enabled
        self.groups = groups
        self._lock = threading.Lock()
        self._stats: dict[tuple[str, str], list[int]] = {}

    def group_name(self, group: Any) -> str:
        """'tp' | 'dp' | 'pp' | 'embedding' | 'world' | 'ranks[...]' for a process group argument."""
        return self.groups.group_name(group)

    @contextlib.contextmanager
    def counting(self) -> Iterator["CommCounter"]:
        """Record every torch.distributed collective called inside the block (adds to earlier counts)."""
        if not self.enabled:
            yield self
            return
        _INTERCEPTOR.activate(self)
        try:
            yield self
        finally:
            _INTERCEPTOR.deactivate(self)

    def _add(self, op: str, group: Any, size: int) -> None:
        key = (self.group_name(group), op)
        with self._lock:
            entry = self._stats.setdefault(key, [0, 0])
            entry[0] += 1
            entry[1] += size

    def reset(self) -> None:
        with self._lock:
            self._stats.clear()

    def _sorted(self) -> list[tuple[tuple[str, str], list[int]]]:
        def order(item: tuple[tuple[str, str], list[int]]) -> tuple:
            (group, op), _ = item
            rank = _GROUP_ORDER.index(group) if group in _GROUP_ORDER else len(_GROUP_ORDER)
            return rank, group, op

        with self._lock:
            return sorted(((key, list(value)) for key, value in self._stats.items()), key=order)

    def snapshot(self) -> dict[str, dict[str, dict[str, int]]]:
        """{group: {op: {"calls": n, "bytes": b}}} of everything counted since the last reset."""
        result: dict[str, dict[str, dict[str, int]]] = {}
        for (group, op), (calls, size) in self._sorted():
            result.setdefault(group, {})[op] = {"calls": calls, "bytes": size}
        return result

    def metrics(self) -> dict[str, int]:
        """Flat form for a JSONL record: {"comm/tp/all_reduce/calls": 12, "comm/tp/all_reduce/bytes": ...}."""
        flat = {}
        for (group, op), (calls, size) in self._sorted():
            flat[f"comm/{group}/{op}/calls"] = calls
            flat[f"comm/{group}/{op}/bytes"] = size
        return flat

    def format(self) -> str:
        """One line for the step log, e.g. 'comm: tp all_reduce 12x 123 KB | dp all_reduce 1x 482 KB'."""
        if not self.enabled:
            return ""
        parts = [f"{group} {op} {calls}x {_format_bytes(size)}" for (group, op), (calls, size) in self._sorted()]
        return "comm: " + (" | ".join(parts) if parts else "none")
