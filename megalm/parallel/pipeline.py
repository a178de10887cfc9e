"""The pipeline executor: runs one rank's schedule (megalm.parallel.schedules) for one step.

Activations and their gradients travel between adjacent virtual stages with non-blocking
isend/irecv. Shapes are known from the config ([s, b, h], or [s/tp, b, h] per tp rank with
sequence parallel), so there is no shape handshake. Every rank knows every rank's action list,
so a receiver posts its receives on each channel in exactly the order the sender sends (the
order NCCL needs; gloo would also match by tag), posting them lazily, when first needed.
Sends are waited on at the end of the step; since no send blocks, a schedule whose dependencies
are acyclic (which `simulate` checks) cannot deadlock.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megalm.data.batch import Batch
from megalm.distributed import ParallelGroups, wait_for
from megalm.model.gpt import GPTModel
from megalm.parallel.schedules import Action, build_schedule

LossFn = Callable[[torch.Tensor, Batch], torch.Tensor]


@dataclass
class StepStats:
    """What the last run held: the most micro-batch chunks whose activations were kept at once."""

    max_in_flight: int = 0


def forward_only_schedule(pp: int, num_microbatches: int, virtual_stages: int) -> list[list[Action]]:
    """Every rank: forwards only, micro-batch by micro-batch, chunk by chunk (for evaluation)."""
    actions = [Action("F", mb, chunk) for mb in range(num_microbatches) for chunk in range(virtual_stages)]
    return [list(actions) for _ in range(pp)]


class PipelineExecutor:
    """Runs this rank's action list over its model chunks, with p2p between virtual stages."""

    def __init__(
        self,
        chunks: list[GPTModel],
        groups: ParallelGroups,
        schedule: str,
        num_microbatches: int,
        activation_shape: tuple[int, ...],
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        self.chunks = chunks
        self.groups = groups
        self.pp = groups.pp_size
        self.virtual_stages = len(chunks)
        self.last_stage = self.pp * self.virtual_stages - 1
        self.activation_shape = activation_shape
        self.autocast = autocast
        self.train_schedule = build_schedule(schedule, self.pp, num_microbatches, self.virtual_stages)
        self.stats = StepStats()
        self._train_orders: Optional[dict[int, list]] = None  # source rank -> keys in send order

    # ---- the order of messages on each channel ----------------------------------------------------
    def _stage(self, rank: int, chunk: int) -> int:
        return chunk * self.pp + rank

    def _sends(self, rank: int, action: Action) -> Optional[tuple[int, tuple]]:
        """(destination pp rank, message key) of what `action` on `rank` sends, if anything."""
        stage = self._stage(rank, action.chunk)
        if action.kind == "F" and stage < self.last_stage:
            return (stage + 1) % self.pp, ("act", action.microbatch, stage + 1)
        if action.kind == "B" and stage > 0:
            return (stage - 1) % self.pp, ("grad", action.microbatch, stage - 1)
        return None

    def _channel_orders(self, schedules: list[list[Action]]) -> dict[int, list]:
        """For each source rank: the keys it sends to this rank, in its sending order."""
        me = self.groups.pp_rank
        expected: dict[int, list] = {}
        for rank, actions in enumerate(schedules):
            for action in actions:
                sent = self._sends(rank, action)
                if sent is not None and sent[0] == me:
                    expected.setdefault(rank, []).append(sent[1])
        return expected

    def _recv(self, source: int, key: tuple) -> torch.Tensor:
        """Post receives from `source` in its sending order up to `key`, then wait for `key`."""
        while key not in self._posted:
            next_key = self._expected[source].popleft()
            buffer = torch.empty(self.activation_shape, dtype=torch.float32, device=self.groups.device)
            work = dist.irecv(buffer, src=self.groups.pp_ranks[source], group=self.groups.pp_group)
            self._posted[next_key] = (buffer, work)
        buffer, work = self._posted.pop(key)
        wait_for(work, lambda: f"irecv of {key} from pipeline stage {source} (global rank "
                               f"{self.groups.pp_ranks[source]}) over {self.groups.describe_group(self.groups.pp_group)}")
        return buffer

    def _send(self, tensor: torch.Tensor, destination: int) -> None:
        tensor = tensor.detach().to(torch.float32).contiguous()
        if tuple(tensor.shape) != self.activation_shape:
            raise RuntimeError(f"pipeline message of shape {tuple(tensor.shape)}, expected {self.activation_shape}")
        work = dist.isend(tensor, dst=self.groups.pp_ranks[destination], group=self.groups.pp_group)
        self._pending_sends.append((tensor, work, destination))

    # ---- running a schedule -----------------------------------------------------------------------
    def run(self, batches: list[Batch], loss_fn: LossFn, forward_only: bool = False) -> torch.Tensor:
        """Forward (and backward) every micro-batch; returns the summed loss (zero off the last stage)."""
        schedules = (
            forward_only_schedule(self.pp, len(batches), self.virtual_stages) if forward_only else self.train_schedule
        )
        if not forward_only and any(len(actions) != 2 * len(batches) * self.virtual_stages for actions in schedules):
            raise RuntimeError(f"the schedule was built for another number of micro-batches than {len(batches)}")
        if forward_only:  # evaluation: rare, and its schedule depends on len(batches)
            orders = self._channel_orders(schedules)
        else:  # training: the same schedule every step, so its channel orders are computed once
            if self._train_orders is None:
                self._train_orders = self._channel_orders(schedules)
            orders = self._train_orders
        self._expected = {source: deque(keys) for source, keys in orders.items()}
        self._posted: dict[tuple, tuple] = {}
        self._pending_sends: list = []
        self._saved: dict[tuple[int, int], tuple] = {}
        self.stats = StepStats()
        loss_sum = torch.zeros((), device=self.groups.device)
        grad_mode = torch.no_grad() if forward_only else contextlib.nullcontext()
        with grad_mode:
            for action in schedules[self.groups.pp_rank]:
                if action.kind == "F":
                    loss_sum += self._forward(action, batches[action.microbatch], loss_fn, forward_only)
                else:
                    self._backward(action)
        for _, work, destination in self._pending_sends:
            wait_for(work, lambda: f"isend to pipeline stage {destination} (global rank "
                                   f"{self.groups.pp_ranks[destination]}) over {self.groups.describe_group(self.groups.pp_group)}")
        self._pending_sends.clear()
        return loss_sum

    def _forward(self, action: Action, batch: Batch, loss_fn: LossFn, forward_only: bool) -> torch.Tensor:
        stage = self._stage(self.groups.pp_rank, action.chunk)
        chunk = self.chunks[action.chunk]
        if stage == 0:
            inputs = batch.tokens
        else:
            inputs = self._recv((stage - 1) % self.pp, ("act", action.microbatch, stage))
            inputs.requires_grad_(not forward_only)
        with self.autocast():
            if stage == self.last_stage:
                output = loss_fn(chunk(inputs, labels=batch.labels, prefix_lengths=batch.prefix_lengths), batch)
            else:
                output = chunk(inputs, prefix_lengths=batch.prefix_lengths)
        if stage < self.last_stage:
            self._send(output, (stage + 1) % self.pp)
        if not forward_only:
            self._saved[(action.microbatch, action.chunk)] = (inputs if stage > 0 else None, output)
            self.stats.max_in_flight = max(self.stats.max_in_flight, len(self._saved))
        return output.detach() if stage == self.last_stage else torch.zeros((), device=self.groups.device)

    def _backward(self, action: Action) -> None:
        stage = self._stage(self.groups.pp_rank, action.chunk)
        inputs, output = self._saved.pop((action.microbatch, action.chunk))
        if stage == self.last_stage:
            output.backward()
        else:
            grad = self._recv((stage + 1) % self.pp, ("grad", action.microbatch, stage))
            torch.autograd.backward(output, grad_tensors=grad)
        if stage > 0:
            self._send(inputs.grad, (stage - 1) % self.pp)


def activation_shape(seq_length: int, micro_batch_size: int, hidden_size: int, groups: ParallelGroups, sequence_parallel: bool) -> tuple[int, int, int]:
    """[s, b, h] of what crosses between stages ([s/tp, b, h] per tp rank with sequence parallel)."""
    local_seq = seq_length // groups.tp_size if (sequence_parallel and groups.tp_size > 1) else seq_length
    return (local_seq, micro_batch_size, hidden_size)
