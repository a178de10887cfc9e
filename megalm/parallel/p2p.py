"""The pipeline's point-to-point transport: the one seam through which the executor talks to peers.

The executor describes each exchange as a list of `Transfer`s (send or receive, peer pp rank,
message key, tensor) and hands the whole list to `Transport.start`, which issues it as ONE
`torch.distributed.batch_isend_irecv` group; `Transport.wait` waits for every operation of that
group. On NCCL a group is fused (ncclGroupStart/End) and completes as a unit, so a send and a
receive that cross between two ranks cannot block each other when they are in the same group.
Tests substitute a recording transport (megalm.parallel.p2p_check) and replay what was issued.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch
import torch.distributed as dist

from megalm.distributed import ParallelGroups, wait_for

MessageKey = tuple  # ("act", microbatch, receiving virtual stage) | ("grad", microbatch, receiving virtual stage)


@dataclass(frozen=True)
class Transfer:
    """One point-to-point operation: `kind` "send" or "recv" of `tensor` with pipeline rank `peer`."""

    kind: str
    peer: int  # pp rank (index into groups.pp_ranks), not a global rank
    key: MessageKey
    tensor: torch.Tensor

    def describe(self) -> str:
        name, microbatch, stage = self.key
        what = "activation" if name == "act" else "gradient"
        direction = "to" if self.kind == "send" else "from"
        return (f"{self.kind} of the {what} of micro-batch {microbatch} for virtual stage {stage} "
                f"{direction} pipeline rank {self.peer}")


class Transport(Protocol):
    """Issues a list of transfers as one batched group, and waits for such a group."""

    def start(self, transfers: Sequence[Transfer]) -> Any:
        """Issue `transfers` as one group (non-blocking); returns a handle for `wait`."""

    def wait(self, handle: Any) -> None:
        """Block until every transfer of the group behind `handle` is complete."""


class DistTransport:
    """The real transport: `dist.batch_isend_irecv` over the pp group, addressed by global rank."""

    def __init__(self, groups: ParallelGroups) -> None:
        self.groups = groups
        self._started = False

    def start(self, transfers: Sequence[Transfer]) -> tuple[Sequence[Transfer], list]:
        if not self._started:
            self._started = True
            # torch requires every rank of the group in the FIRST batch_isend_irecv on an NCCL group
            # (it may create the communicator); the first exchange pairs only neighbours, so a
            # barrier over the pp group creates it first. gloo needs nothing.
            if dist.get_backend(self.groups.pp_group) == "nccl":
                device = self.groups.device
                dist.barrier(group=self.groups.pp_group, device_ids=[device.index] if device.type == "cuda" else None)
        ops = [
            dist.P2POp(
                dist.isend if transfer.kind == "send" else dist.irecv,
                transfer.tensor,
                self.groups.pp_ranks[transfer.peer],
                group=self.groups.pp_group,
            )
            for transfer in transfers
        ]
        # NCCL returns one coalesced work for the whole group; gloo one work per operation.
        return transfers, dist.batch_isend_irecv(ops)

    def wait(self, handle: tuple[Sequence[Transfer], list]) -> None:
        transfers, works = handle
        for work in works:
            wait_for(work, lambda: self._describe(transfers))

    def _describe(self, transfers: Sequence[Transfer]) -> str:
        parts = [
            f"{t.describe()} (global rank {self.groups.pp_ranks[t.peer]})" for t in transfers
        ]
        return f"batched p2p [{'; '.join(parts)}] over {self.groups.describe_group(self.groups.pp_group)}"
