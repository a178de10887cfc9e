"""The pipeline executor: runs one rank's schedule (megalm.parallel.schedules) for one step.

Activations and their gradients travel between adjacent virtual stages through a `Transport`
(megalm.parallel.p2p: `batch_isend_irecv` over the pp group). Shapes are known from the config
([s, b, h], or [s/tp, b, h] per tp rank with sequence parallel), so there is no shape handshake;
messages travel in `message_dtype`.

The protocol is built for NCCL, where a rank pair shares one in-order channel and a large send
completes only once the peer has reached the matching receive. A rank's action list is cut into
rounds: one action each, except that in the interleaved schedule's steady phase a forward and the
backward after it form one round. Before each single-action round the rank makes ONE exchange, a
batched group holding the previous round's sends and this round's receives, and waits for all of
it: send-forward + receive-backward after a 1F1B forward, send-backward + receive-forward after a
backward, send-forward + receive-forward in GPipe and in warm-up (GPipe and 1F1B: the receive only
if it was not posted early, below). Neighbouring ranks' exchanges meet group against group, so a
crossing pair of messages is always inside one group on at least one side, and no rank waits on a
message whose sender is itself waiting on that rank.

The interleaved steady state (F then B) overlaps transfers with compute as Megatron does: right
after F the rank issues, unwaited, one group with F's output and the receive of the next F's
input; right after B one group with B's gradient and the receive of the next B's gradient; each
is waited just before the next F (B), so each direction's transfer runs under the other
direction's compute (virtual stages wrap from the last rank to the first, so F and B messages
cross between the same neighbours). The first steady round takes both inputs from the exchange
before it; the first cool-down round finds its gradient already posted.

`megalm.parallel.p2p_check` replays the operations the executor really issues under these rules
(independent pair channels, and one stream per rank) for every schedule up to pp=8, m=32, v=4.

GPipe and 1F1B post receives early: before computing an action the rank issues, unwaited, a group
with the receive of the NEXT action's input (its activation or gradient), and waits for it only
before that action, so the transfer runs under the current computation (the sender no longer meets
the receiver at its exchange). The exception is the crossing: a forward whose activation goes to the
very peer the next backward's gradient comes from (1F1B's steady state, GPipe's last forward) keeps
that receive in the exchange with the activation's send, while the peer posts its receive of the
activation ahead of its gradient's send; so on each link one side splits the crossing pair and the
other holds it in one group, which NCCL's pair order needs (both sides posting ahead deadlocks). The
exchange before an action still holds the last action's sends and is waited before the computation.

Memory stays bounded by the schedule's in-flight count: a message is released as soon as the
exchange that carried it completes, and a stage keeps only the autograd edge of its output
(`get_gradient_edge`), not the tensor, so the output's storage is freed once it is sent; backward
then starts from that edge with the received gradient (interleaved steady state: one message
per direction is held one computation longer, while it overlaps). A receive posted early holds
one more message buffer during the computation before its use (GPipe and 1F1B: at most one).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.autograd.graph import get_gradient_edge

from megalm.data.batch import Batch
from megalm.distributed import ParallelGroups
from megalm.model.gpt import GPTModel
from megalm.parallel.p2p import DistTransport, Transfer, Transport
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
        *,
        message_dtype: torch.dtype = torch.float32,
        transport: Optional[Transport] = None,
        early_receives: bool = True,
    ) -> None:
        self.chunks = chunks
        self.groups = groups
        self.pp = groups.pp_size
        self.pp_rank = groups.pp_rank
        self.virtual_stages = len(chunks)
        self.last_stage = self.pp * self.virtual_stages - 1
        self.activation_shape = tuple(activation_shape)
        self.message_dtype = message_dtype
        self.transport: Transport = transport if transport is not None else DistTransport(groups)
        self.train_schedule = build_schedule(schedule, self.pp, num_microbatches, self.virtual_stages)
        self.combine_rounds = schedule == "interleaved"
        # GPipe and 1F1B post the next action's receive before the current computation (the interleaved
        # schedule overlaps through its lanes instead); False: the reference protocol, for tests and timing.
        self.early_receives = early_receives and schedule != "interleaved"
        self.stats = StepStats()

    def _stage(self, chunk: int) -> int:
        return chunk * self.pp + self.pp_rank

    def _needs(self, action: Action) -> Optional[tuple[int, tuple]]:
        """(source pp rank, message key) of what `action` receives before it runs, if anything."""
        stage = self._stage(action.chunk)
        if action.kind == "F" and stage > 0:
            return (stage - 1) % self.pp, ("act", action.microbatch, stage)
        if action.kind == "B" and stage < self.last_stage:
            return (stage + 1) % self.pp, ("grad", action.microbatch, stage)
        return None

    def _exchange(self, outgoing: list[Transfer], actions: tuple[Action, ...]) -> dict[Action, torch.Tensor]:
        """Send the last round's messages and receive this round's inputs as ONE group; wait for it.

        The group completes only when every operation in it is matched, so on return the sent
        tensors are released (the caller drops them) and every receive buffer is filled.
        """
        transfers = list(outgoing)
        received = {}
        for action in actions:
            needs = self._needs(action)
            if needs is not None:
                buffer = torch.empty(self.activation_shape, dtype=self.message_dtype, device=self.groups.device)
                transfers.append(Transfer("recv", needs[0], needs[1], buffer))
                received[action] = buffer
        if transfers:
            self.transport.wait(self.transport.start(transfers))
        return received

    def _message(self, tensor: torch.Tensor, destination: int, key: tuple) -> Transfer:
        """A send of `tensor` in the message dtype (no copy when it already is that dtype and contiguous)."""
        if tuple(tensor.shape) != self.activation_shape:
            raise RuntimeError(
                f"pipeline message {key} has shape {tuple(tensor.shape)}, expected {self.activation_shape}: the "
                f"activation shape given to PipelineExecutor must match what the model chunks return"
            )
        tensor = tensor.detach()
        if tensor.dtype != self.message_dtype:
            tensor = tensor.to(self.message_dtype)
        return Transfer("send", destination, key, tensor.contiguous())

    # ---- running a schedule -----------------------------------------------------------------------
    def run(self, batches: list[Batch], loss_fn: LossFn, forward_only: bool = False) -> torch.Tensor:
        """Forward (and backward) every micro-batch; returns the summed loss (zero off the last stage)."""
        schedules = (
            forward_only_schedule(self.pp, len(batches), self.virtual_stages) if forward_only else self.train_schedule
        )
        if not forward_only and any(len(actions) != 2 * len(batches) * self.virtual_stages for actions in schedules):
            raise RuntimeError(f"the schedule was built for another number of micro-batches than {len(batches)}")
        self._saved: dict[tuple[int, int], tuple] = {}
        self.stats = StepStats()
        loss_sum = torch.zeros((), device=self.groups.device)
        outgoing: list[Transfer] = []  # the last round's messages, sent with the next round's receives
        grad_mode = torch.no_grad() if forward_only else contextlib.nullcontext()
        with grad_mode:
            rounds = self._rounds(schedules[self.pp_rank], combine=self.combine_rounds and not forward_only)
            lanes: dict[str, tuple[Any, dict]] = {}  # "F" / "B": the group in flight and its receive buffers
            first_steady = next((i for i, r in enumerate(rounds) if len(r) == 2), None)
            for index, round_ in enumerate(rounds):
                following = rounds[index + 1] if index + 1 < len(rounds) else ()
                if len(round_) == 2 and index != first_steady:
                    loss_sum += self._steady_round(round_, following, lanes, {}, batches, loss_fn)
                    continue
                if self.early_receives:
                    outgoing, loss = self._early_round(round_[0], following, outgoing, lanes, batches, loss_fn,
                                                       forward_only)
                    loss_sum += loss
                    continue
                prefetched = self._settle(lanes)
                received = self._exchange(outgoing, tuple(a for a in round_ if a not in prefetched))
                received.update(prefetched)
                outgoing = []  # released: the exchange that carried them has completed
                if len(round_) == 2:
                    loss_sum += self._steady_round(round_, following, lanes, received, batches, loss_fn)
                    continue
                outgoing, loss = self._run_round(round_, received, batches, loss_fn, forward_only)
                loss_sum += loss
            self._settle(lanes)
            self._exchange(outgoing, ())
        return loss_sum

    def _early_round(
        self, action: Action, following: tuple[Action, ...], outgoing: list[Transfer], lanes: dict,
        batches: list[Batch], loss_fn: LossFn, forward_only: bool,
    ) -> tuple[list[Transfer], torch.Tensor]:
        """GPipe and 1F1B: exchange, post the next action's receive ahead (lane "R"), compute `action`.

        The exchange holds the last round's sends and this action's input unless it was posted ahead;
        it is waited before the computation (sends are released there), and the receive posted ahead
        is waited only before the next action, so its transfer runs under this computation.
        """
        ahead = lanes.pop("R", None)  # posted before the last computation: (handle, {action: buffer})
        pending = () if ahead is not None and action in ahead[1] else (action,)
        handle, received = self._start_exchange(outgoing, pending)
        upcoming = following[0] if following else None
        if upcoming is not None and self._may_post_ahead(action, upcoming):
            posted = self._post([], (upcoming,))
            if posted:
                lanes["R"] = posted
        if ahead is not None:
            self.transport.wait(ahead[0])
            received.update(ahead[1])
        if handle is not None:
            self.transport.wait(handle)
        del handle, ahead
        outgoing.clear()  # released: the exchange that carried them has completed (the caller's list)
        return self._run_round((action,), received, batches, loss_fn, forward_only)

    def _may_post_ahead(self, action: Action, upcoming: Action) -> bool:
        """Whether `upcoming`'s receive may go on the channel before `action`'s send (NCCL's pair order).

        Only a crossing forbids it: `action` is a forward whose activation goes to the very peer
        `upcoming`'s gradient comes from. That peer posts its receive of the activation ahead of its
        gradient's send, so on each link exactly one side splits the crossing pair and the other keeps
        it in one group (the activation's send with the gradient's receive), as NCCL needs.
        """
        needs = self._needs(upcoming)
        if needs is None:
            return False
        stage = self._stage(action.chunk)
        sends_to = (stage + 1) % self.pp if action.kind == "F" and stage < self.last_stage else None
        return not (upcoming.kind == "B" and sends_to == needs[0])

    def _start_exchange(
        self, outgoing: list[Transfer], actions: tuple[Action, ...]
    ) -> tuple[Optional[Any], dict[Action, torch.Tensor]]:
        """`_exchange` without the wait: (handle or None, receive buffers)."""
        posted = self._post(outgoing, actions)
        return posted if posted is not None else (None, {})

    def _post(self, sends: list[Transfer], prefetch: tuple[Action, ...]) -> Optional[tuple[Any, dict]]:
        """Issue `sends` and the receives of `prefetch`'s inputs as one group, not waited: (handle, buffers)."""
        transfers, buffers = list(sends), {}
        for action in prefetch:
            needs = self._needs(action)
            if needs is not None:
                buffers[action] = torch.empty(self.activation_shape, dtype=self.message_dtype, device=self.groups.device)
                transfers.append(Transfer("recv", needs[0], needs[1], buffers[action]))
        return (self.transport.start(transfers), buffers) if transfers else None

    def _settle(self, lanes: dict, kind: Optional[str] = None) -> dict[Action, torch.Tensor]:
        """Wait for the group in flight on lane `kind` (or on both); returns its receive buffers."""
        received = {}
        for lane in [kind] if kind else list(lanes):
            if lane in lanes:
                handle, buffers = lanes.pop(lane)
                self.transport.wait(handle)
                received.update(buffers)
        return received

    def _steady_round(
        self, round_: tuple[Action, ...], following: tuple[Action, ...], lanes: dict, received: dict,
        batches: list[Batch], loss_fn: LossFn,
    ) -> torch.Tensor:
        """Interleaved steady state (Megatron's overlapped exchange): F, then B, each on its own lane.

        Before F (B) the rank waits for the forward (backward) lane's group, which holds the last
        F's (B's) message and this input; after F (B) it issues, unwaited, one group with F's
        output and the receive of the next round's F input (B's gradient and the next B's), so
        each transfer overlaps the other direction's compute.
        """
        forward, backward = round_
        received.update(self._settle(lanes, "F"))
        batch = batches[forward.microbatch]
        loss, message = self._forward(forward, batch, received.pop(forward, None), loss_fn, False)
        posted = self._post([message] if message is not None else [], tuple(a for a in following if a.kind == "F"))
        if posted:
            lanes["F"] = posted
        del message  # the lane holds it until its group completes
        received.update(self._settle(lanes, "B"))
        message = self._backward(backward, received.pop(backward, None))
        posted = self._post([message] if message is not None else [], tuple(a for a in following if a.kind == "B"))
        if posted:
            lanes["B"] = posted
        return loss

    def _run_round(
        self, round_: tuple[Action, ...], received: dict, batches: list[Batch], loss_fn: LossFn, forward_only: bool
    ) -> tuple[list[Transfer], torch.Tensor]:
        """Compute a round's actions; returns their messages (no other reference to them survives) and loss."""
        messages, loss_sum = [], torch.zeros((), device=self.groups.device)
        for action in round_:
            if action.kind == "F":
                batch = batches[action.microbatch]
                loss, message = self._forward(action, batch, received.pop(action, None), loss_fn, forward_only)
                loss_sum += loss
            else:
                message = self._backward(action, received.pop(action, None))
            if message is not None:
                messages.append(message)
        return messages, loss_sum

    @staticmethod
    def _rounds(actions: list[Action], combine: bool) -> list[tuple[Action, ...]]:
        """The actions between two exchanges: one each, or (interleaved, steady phase) a forward and a backward.

        The interleaved steady phase pairs F(a) with the B(b) after it, which does not wait for it;
        such a round runs `_steady_round`. Without a steady phase (m = pp: all forwards, then all
        backwards) every action is its own round.
        """
        singles = [(action,) for action in actions]
        leading = next((i for i, action in enumerate(actions) if action.kind == "B"), len(actions))
        if not combine or leading == sum(action.kind == "F" for action in actions):
            return singles
        rounds, index = singles[: leading - 1], leading - 1  # warm-up forwards, one each
        while index + 1 < len(actions) and actions[index].kind == "F" and actions[index + 1].kind == "B":
            rounds.append((actions[index], actions[index + 1]))
            index += 2
        return rounds + singles[index:]

    def _forward(
        self, action: Action, batch: Batch, received: Optional[torch.Tensor], loss_fn: LossFn, forward_only: bool
    ) -> tuple[torch.Tensor, Optional[Transfer]]:
        stage = self._stage(action.chunk)
        chunk = self.chunks[action.chunk]
        inputs = batch.tokens if stage == 0 else received
        if stage > 0:
            inputs.requires_grad_(not forward_only)
        if stage == self.last_stage:
            output = loss_fn(chunk(inputs, labels=batch.labels, prefix_lengths=batch.prefix_lengths,
                                   document_ids=batch.document_ids), batch)
        else:
            output = chunk(inputs, prefix_lengths=batch.prefix_lengths, document_ids=batch.document_ids)
        if stage == self.last_stage:
            if not forward_only:
                self._keep(action, inputs if stage > 0 else None, output)
            return output.detach(), None
        message = self._message(output, (stage + 1) % self.pp, ("act", action.microbatch, stage + 1))
        if not forward_only:
            # Keep only the autograd edge of the output, not the tensor: once the send completes its
            # storage is freed, and backward starts from the edge with the received gradient.
            self._keep(action, inputs if stage > 0 else None, get_gradient_edge(output))
        return torch.zeros((), device=self.groups.device), message

    def _keep(self, action: Action, inputs: Optional[torch.Tensor], output) -> None:
        self._saved[(action.microbatch, action.chunk)] = (inputs, output)
        self.stats.max_in_flight = max(self.stats.max_in_flight, len(self._saved))

    def _backward(self, action: Action, grad: Optional[torch.Tensor]) -> Optional[Transfer]:
        stage = self._stage(action.chunk)
        inputs, output = self._saved.pop((action.microbatch, action.chunk))
        if stage == self.last_stage:
            output.backward()
        else:
            torch.autograd.backward(output, grad_tensors=grad)
        if stage == 0:
            return None
        return self._message(inputs.grad, (stage - 1) % self.pp, ("grad", action.microbatch, stage - 1))


def activation_shape(seq_length: int, micro_batch_size: int, hidden_size: int, groups: ParallelGroups, sequence_parallel: bool) -> tuple[int, int, int]:
    """[s, b, h] of what crosses between stages ([s/tp, b, h] per tp rank with sequence parallel)."""
    local_seq = seq_length // groups.tp_size if (sequence_parallel and groups.tp_size > 1) else seq_length
    return (local_seq, micro_batch_size, hidden_size)
