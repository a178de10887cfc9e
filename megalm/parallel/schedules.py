"""Pipeline schedules as plain lists, and a simulator that checks and times them.

A schedule gives every pipeline rank an ordered list of `Action(kind, microbatch, chunk)`, kind
"F" (forward) or "B" (backward). With v virtual stages (interleaving) rank p holds model chunks
0..v-1, and chunk c of rank p is virtual stage `c * pp + p`: micro-batches flow 0 -> 1 -> ... ->
pp*v - 1, wrapping from the last rank back to the first. Nothing here runs a model: the lists
can be printed, checked and simulated; `megalm.parallel.pipeline` executes them.

- gpipe: all forwards, then all backwards; m micro-batches in flight.
- 1f1b: rank p runs pp - p - 1 warm-up forwards, then alternates one forward and one backward;
  at most pp - p micro-batches in flight (pp on the first stage).
- interleaved: 1F1B over virtual stages (Megatron's ordering): chunks are visited in groups of pp
  micro-batches; the bubble shrinks by v. Needs m to be a multiple of pp.

Bubble fraction of all three with uniform stage times: (pp - 1) / (m * v + pp - 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

SCHEDULES = ("1f1b", "gpipe", "interleaved")


class ScheduleError(ValueError):
    """A schedule that cannot be built for these sizes, with the fix."""


class Action(NamedTuple):
    kind: str  # "F" or "B"
    microbatch: int
    chunk: int

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")


def check_schedule_args(name: str, pp: int, num_microbatches: int, virtual_stages: int) -> None:
    """Raise ScheduleError when the schedule cannot run with these sizes."""
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown pipeline schedule {name!r}: use one of {', '.join(SCHEDULES)}")
    if pp < 1 or num_microbatches < 1 or virtual_stages < 1:
        raise ScheduleError(f"pp={pp}, micro-batches={num_microbatches} and virtual stages={virtual_stages} must be >= 1")
    if name != "interleaved" and virtual_stages != 1:
        raise ScheduleError(
            f"parallel.virtual_stages={virtual_stages} needs parallel.schedule=interleaved (got {name!r})"
        )
    if name == "interleaved":
        if pp < 2:
            raise ScheduleError("the interleaved schedule needs parallel.pp >= 2")
        if num_microbatches % pp != 0:
            raise ScheduleError(
                f"the interleaved schedule needs the micro-batches per step ({num_microbatches}) to be a "
                f"multiple of pp={pp}: change train.global_batch_size or train.micro_batch_size"
            )


def _gpipe(pp_rank: int, pp: int, m: int) -> list[Action]:
    return [Action("F", i, 0) for i in range(m)] + [Action("B", i, 0) for i in range(m)]


def _one_f_one_b(pp_rank: int, pp: int, m: int) -> list[Action]:
    warmup = min(pp - pp_rank - 1, m)
    actions = [Action("F", i, 0) for i in range(warmup)]
    for i in range(m - warmup):
        actions += [Action("F", warmup + i, 0), Action("B", i, 0)]
    return actions + [Action("B", i, 0) for i in range(m - warmup, m)]


def _interleaved(pp_rank: int, pp: int, m: int, v: int) -> list[Action]:
    total = m * v

    def unit(k: int, forward: bool) -> Action:
        group, within = divmod(k, pp * v)
        chunk = (k // pp) % v
        microbatch = group * pp + within % pp
        return Action("F" if forward else "B", microbatch, chunk if forward else v - 1 - chunk)

    if m == pp:
        warmup = total
    else:
        warmup = min((pp - pp_rank - 1) * 2 + (v - 1) * pp, total)
    actions = [unit(k, True) for k in range(warmup)]
    for k in range(total - warmup):
        actions += [unit(warmup + k, True), unit(k, False)]
    return actions + [unit(k, False) for k in range(total - warmup, total)]


def build_schedule(name: str, pp: int, num_microbatches: int, virtual_stages: int = 1) -> list[list[Action]]:
    """The action list of every pipeline rank (index = pp rank)."""
    check_schedule_args(name, pp, num_microbatches, virtual_stages)
    if name == "gpipe":
        return [_gpipe(p, pp, num_microbatches) for p in range(pp)]
    if name == "1f1b":
        return [_one_f_one_b(p, pp, num_microbatches) for p in range(pp)]
    return [_interleaved(p, pp, num_microbatches, virtual_stages) for p in range(pp)]


def virtual_stage(pp_rank: int, chunk: int, pp: int) -> int:
    return chunk * pp + pp_rank


def stage_position(stage: int, pp: int) -> tuple[int, int]:
    """(pp rank, chunk) holding virtual stage `stage`."""
    return stage % pp, stage // pp


@dataclass
class Simulation:
    """Result of running every rank's list with uniform per-chunk times and instant messages."""

    makespan: float
    busy: list[float]  # per rank
    max_in_flight: list[int]  # per rank: most micro-batch chunks forwarded but not yet backwarded
    finish: dict  # (rank, action) -> finish time

    @property
    def bubble_fraction(self) -> float:
        """Idle share of the pipeline's time (all ranks equally busy with uniform stages)."""
        return 1.0 - sum(self.busy) / (len(self.busy) * self.makespan)


def simulate(
    schedule: list[list[Action]], virtual_stages: int = 1, forward_time: float = 1.0, backward_time: float = 2.0
) -> Simulation:
    """Execute the lists in order with dependencies; raise ScheduleError on a deadlock or a bad list.

    A forward of (mb, stage s) needs the forward of (mb, s - 1); a backward of (mb, s) needs the
    backward of (mb, s + 1), or on the last stage its own forward. A chunk's time is the stage
    time divided by v, so the total work per rank does not depend on v.
    """
    pp, v = len(schedule), virtual_stages
    last_stage = pp * v - 1
    per_chunk = {"F": forward_time / v, "B": backward_time / v}
    done: dict[tuple[str, int, int], float] = {}  # (kind, mb, virtual stage) -> finish time
    finish = {}
    position = [0] * pp
    clock = [0.0] * pp
    busy = [0.0] * pp
    in_flight = [0] * pp
    max_in_flight = [0] * pp
    remaining = sum(len(actions) for actions in schedule)
    while remaining:
        progressed = False
        for rank in range(pp):
            while position[rank] < len(schedule[rank]):
                action = schedule[rank][position[rank]]
                stage = virtual_stage(rank, action.chunk, pp)
                if action.kind == "F":
                    needs = ("F", action.microbatch, stage - 1) if stage > 0 else None
                else:
                    needs = ("B", action.microbatch, stage + 1) if stage < last_stage else ("F", action.microbatch, stage)
                    if ("F", action.microbatch, stage) not in done:
                        raise ScheduleError(f"rank {rank}: {action} comes before its forward")
                if needs is not None and needs not in done:
                    break
                key = (action.kind, action.microbatch, stage)
                if key in done:
                    raise ScheduleError(f"rank {rank}: {action} appears twice")
                start = max(clock[rank], done[needs] if needs else 0.0)
                clock[rank] = start + per_chunk[action.kind]
                busy[rank] += per_chunk[action.kind]
                done[key] = clock[rank]
                finish[(rank, action)] = clock[rank]
                in_flight[rank] += 1 if action.kind == "F" else -1
                max_in_flight[rank] = max(max_in_flight[rank], in_flight[rank])
                position[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {rank: str(schedule[rank][position[rank]]) for rank in range(pp) if position[rank] < len(schedule[rank])}
            raise ScheduleError(f"deadlock: every rank waits: {stuck}")
    return Simulation(max(clock), busy, max_in_flight, finish)


def analytic_bubble(pp: int, num_microbatches: int, virtual_stages: int = 1) -> float:
    """(pp - 1) / (m * v + pp - 1): the idle share with uniform stage times."""
    return (pp - 1) / (num_microbatches * virtual_stages + pp - 1)


def format_schedule(schedule: list[list[Action]]) -> str:
    """One line per rank, for logs and --dry-run."""
    return "\n".join(f"  stage {rank}: " + " ".join(str(a) for a in actions) for rank, actions in enumerate(schedule))


def partition_layers(num_layers: int, num_stages: int, layers_per_stage: Optional[list[int]] = None) -> list[range]:
    """Global layer indices of each (virtual) stage: uniform, or an explicit per-stage count list."""
    if layers_per_stage is None:
        if num_layers % num_stages != 0:
            raise ScheduleError(
                f"{num_layers} layers do not split evenly over {num_stages} pipeline stages: choose a stage count "
                f"that divides {num_layers}, or give parallel.pipeline_layers (one count per stage)"
            )
        layers_per_stage = [num_layers // num_stages] * num_stages
    if len(layers_per_stage) != num_stages:
        raise ScheduleError(
            f"parallel.pipeline_layers has {len(layers_per_stage)} entries but there are {num_stages} "
            f"(virtual) pipeline stages (pp x virtual_stages): give one layer count per stage"
        )
    if any(count < 0 for count in layers_per_stage) or sum(layers_per_stage) != num_layers:
        raise ScheduleError(
            f"parallel.pipeline_layers={layers_per_stage} sums to {sum(layers_per_stage)} but the model has "
            f"{num_layers} layers: the counts must be >= 0 and add up to model.num_layers"
        )
    starts = [sum(layers_per_stage[:i]) for i in range(num_stages)]
    return [range(start, start + count) for start, count in zip(starts, layers_per_stage)]
