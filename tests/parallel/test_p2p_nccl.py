"""The executor's p2p replayed under NCCL's rules: no deadlock over the whole schedule grid.

Each case runs every pp rank's real PipelineExecutor in this process with stub chunks and a
recording transport (megalm.parallel.p2p_check), then replays the recorded programs with
independent pair channels and with one stream per rank (stricter). Sequence parallelism only
changes the message shape ([s/tp, b, h] instead of [s, b, h]); each tp rank has its own pp group.
"""

from __future__ import annotations

import pytest
import torch

from megalm.parallel.p2p_check import check_trace, record_pipeline, sends_held_past_compute
from megalm.parallel.pipeline import PipelineExecutor
from megalm.parallel.schedules import ScheduleError, check_schedule_args

SHAPE = (4, 1, 2)  # [s, b, h]
SP_SHAPE = (2, 1, 2)  # [s/tp, b, h] with sequence parallel at tp = 2


def grid() -> list[tuple[str, int, int, int]]:
    """Every valid (schedule, pp, m, v) with pp 1..8, m 1..32, v 1..4."""
    cases = []
    for schedule in ("gpipe", "1f1b", "interleaved"):
        for pp in range(1, 9):
            for v in range(1, 5):
                for m in range(1, 33):
                    try:
                        check_schedule_args(schedule, pp, m, v)
                    except ScheduleError:
                        continue
                    cases.append((schedule, pp, m, v))
    return cases


def problems_of(trace: dict) -> list[str]:
    found = check_trace(trace).problems + check_trace(trace, one_stream_per_rank=True).problems
    return found + sends_held_past_compute(trace)


@pytest.mark.slow
def test_no_deadlock_over_the_schedule_grid() -> None:
    cases = grid()
    assert len(cases) == 724  # 256 gpipe + 256 1f1b + 212 interleaved
    failures = []
    for schedule, pp, m, v in cases:
        for shape in (SHAPE, SP_SHAPE):
            found = problems_of(record_pipeline(schedule, pp, m, v, shape))
            if found:
                failures.append(f"{schedule} pp={pp} m={m} v={v} shape={shape}: {found[0]}")
    assert not failures, f"{len(failures)} of {2 * len(cases)} configurations fail:\n" + "\n".join(failures[:5])


@pytest.mark.parametrize("pp,v", [(1, 1), (2, 1), (3, 1), (2, 2), (4, 4), (8, 3)])
def test_no_deadlock_in_evaluation(pp: int, v: int) -> None:
    schedule = "interleaved" if v > 1 else "1f1b"
    for m in (1, 3, 8):
        assert not problems_of(record_pipeline(schedule, pp, m * pp if v > 1 else m, v, SHAPE, forward_only=True))


SMALL_CASES = [("1f1b", 2, 2, 1), ("1f1b", 4, 9, 1), ("gpipe", 3, 4, 1), ("interleaved", 2, 4, 2),
               ("interleaved", 4, 8, 3), ("interleaved", 3, 3, 2)]


@pytest.mark.parametrize("case", SMALL_CASES)
def test_no_deadlock_small_cases(case: tuple) -> None:
    assert not problems_of(record_pipeline(*case, SP_SHAPE))


def issues(trace: dict, rank: int) -> list[list[str]]:
    return [[f"{op['op']} {op['key']}" for op in event["issue"]] for event in trace[rank] if "issue" in event]


def test_1f1b_crossing_messages_travel_in_one_group() -> None:
    """pp=2, m=2: stage 0's send of act 1 and receive of grad 0 cross stage 1's send of grad 0 and receive of act 1."""
    trace = record_pipeline("1f1b", 2, 2, 1, SHAPE)
    assert issues(trace, 0) == [["send act:0:1"], ["send act:1:1", "recv grad:0:0"], ["recv grad:1:0"]]
    assert issues(trace, 1) == [["recv act:0:1"], ["send grad:0:0", "recv act:1:1"], ["send grad:1:0"]]


def test_interleaved_steady_state_sends_and_receives_both_directions_at_once() -> None:
    trace = record_pipeline("interleaved", 2, 4, 2, SHAPE)
    four_way = [group for group in issues(trace, 0) if len(group) == 4]
    assert four_way and all(sorted(op.split()[0] for op in group) == ["recv", "recv", "send", "send"] for group in four_way)


def test_messages_use_the_message_dtype() -> None:
    trace = record_pipeline("1f1b", 2, 2, 1, SHAPE, message_dtype=torch.bfloat16)
    sizes = {op["bytes"] for events in trace.values() for event in events if "issue" in event for op in event["issue"]}
    assert sizes == {4 * 1 * 2 * 2}


def test_wrong_activation_shape_is_named() -> None:
    with pytest.raises(RuntimeError, match=r"shape \(4, 1, 2\), expected \(2, 1, 2\)"):
        record_pipeline_with_shapes(model_shape=SHAPE, executor_shape=SP_SHAPE)


def record_pipeline_with_shapes(model_shape: tuple, executor_shape: tuple) -> None:
    from megalm.data.batch import Batch
    from megalm.distributed import ParallelGroups
    from megalm.parallel.p2p_check import RecordingTransport, StubChunk
    from megalm.topology import Topology

    groups = ParallelGroups(topology=Topology(1, 2, 1), rank=0, device=torch.device("cpu"), pp_ranks=(0, 1))
    events: list = []
    chunk = StubChunk(model_shape, events, is_first=True, is_last=False, name="chunk 0")
    transport = RecordingTransport(events, (0, 1))
    executor = PipelineExecutor([chunk], groups, "1f1b", 1, executor_shape, transport=transport)
    tokens = torch.zeros(1, 4, dtype=torch.long)
    executor.run([Batch(tokens, tokens, torch.ones(1, 4))], lambda losses, batch: losses.sum())
