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


def problems_of(trace: dict, schedule: str = "") -> list[str]:
    """Deadlocks or mismatches under either channel model, and sends held longer than the protocol's bound.

    A send is released at the exchange after the computation that produced it; in the interleaved
    steady state, which overlaps each direction's transfer with the other direction's compute,
    one computation later.
    """
    found = check_trace(trace).problems + check_trace(trace, one_stream_per_rank=True).problems
    return found + sends_held_past_compute(trace, allowed=1 if schedule == "interleaved" else 0)


@pytest.mark.slow
def test_no_deadlock_over_the_schedule_grid() -> None:
    cases = grid()
    assert len(cases) == 724  # 256 gpipe + 256 1f1b + 212 interleaved
    failures = []
    for schedule, pp, m, v in cases:
        for shape in (SHAPE, SP_SHAPE):
            found = problems_of(record_pipeline(schedule, pp, m, v, shape), schedule)
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
    assert not problems_of(record_pipeline(*case, SP_SHAPE), case[0])


def issues(trace: dict, rank: int) -> list[list[str]]:
    return [[f"{op['op']} {op['key']}" for op in event["issue"]] for event in trace[rank] if "issue" in event]


def test_1f1b_crossing_messages_travel_in_one_group() -> None:
    """pp=2, m=2: stage 0's send of act 1 and receive of grad 0 cross stage 1's send of grad 0 and receive of act 1."""
    trace = record_pipeline("1f1b", 2, 2, 1, SHAPE)
    assert issues(trace, 0) == [["send act:0:1"], ["send act:1:1", "recv grad:0:0"], ["recv grad:1:0"]]
    assert issues(trace, 1) == [["recv act:0:1"], ["send grad:0:0", "recv act:1:1"], ["send grad:1:0"]]


def test_interleaved_steady_state_overlaps_each_direction_with_the_other_compute() -> None:
    trace = record_pipeline("interleaved", 2, 4, 2, SHAPE)
    # after a steady-state F: its activation + the next F's input; after a B: its gradient + the next B's
    assert issues(trace, 0)[4:8] == [
        ["send act:2:1"], ["send grad:0:1", "recv grad:1:2"], ["send act:3:1", "recv act:2:2"], ["send grad:1:1", "recv grad:0:0"],
    ]
    assert sends_held_past_compute(trace)  # waited after the other direction's compute ...
    assert not sends_held_past_compute(trace, allowed=1)  # ... and no later


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


# ---- the stub recording reproduces what the real executor issues over real p2p ----------------


class TeeTransport:
    """Issues through the real transport and records the same operations."""

    def __init__(self, real, recorder) -> None:
        self.real, self.recorder = real, recorder

    def start(self, transfers):
        return self.recorder.start(transfers), self.real.start(transfers)

    def wait(self, handle) -> None:
        recorded, real = handle
        self.real.wait(real)
        self.recorder.wait(recorded)


REAL_CASES = [("1f1b", 4, 1), ("interleaved", 4, 2), ("gpipe", 3, 1)]


# The Llama-family layers (RMSNorm, SwiGLU, grouped-query attention, head_dim, untied output) send the same
# [s, b, h] messages: the executor's operations with them are checked too.
LLAMA_FIELDS = dict(norm="rmsnorm", mlp="swiglu", num_heads=4, num_kv_heads=2, head_dim=8, bias=False,
                    tie_embeddings=False, position_embedding="rotary")


def _real_worker(rank: int, world_size: int, spec: str = "gpt") -> list:
    from megalm.config import Config, ModelConfig, ParallelConfig, TrainConfig
    from megalm.data.pipeline import build_sampler, build_sources
    from megalm.distributed import build_parallel_groups
    from megalm.model.gpt import build_model_chunks
    from megalm.parallel.p2p import DistTransport
    from megalm.parallel.p2p_check import RecordingTransport
    from megalm.parallel.pipeline import activation_shape
    from megalm.topology import Topology

    groups = build_parallel_groups(Topology(tp=1, pp=2, dp=1), rank, torch.device("cpu"))
    traces = []
    for schedule, m, v in REAL_CASES:
        config = Config(
            model=ModelConfig(**{**dict(num_layers=4, hidden_size=16, num_heads=2, vocab_size=100, seq_length=8),
                                 **(LLAMA_FIELDS if spec == "llama" else {})}),
            parallel=ParallelConfig(pp=2, schedule=schedule, virtual_stages=v),
            train=TrainConfig(micro_batch_size=1, global_batch_size=m, seed=5),
        )
        chunks = build_model_chunks(config, groups)
        batches = build_sampler(config, build_sources(config).train, 0, 1).micro_batches(0)
        events: list = []
        transport = TeeTransport(DistTransport(groups), RecordingTransport(events, groups.pp_ranks))
        executor = PipelineExecutor(chunks, groups, schedule, m, activation_shape(8, 1, 16, groups, False),
                                    transport=transport)
        executor.run(batches, lambda losses, batch: losses.sum())
        traces.append(events)
    return traces


def without_compute_and_sizes(events: list) -> list:
    out = []
    for event in events:
        if "issue" in event:
            out.append([(op["id"], op["op"], op["peer"], op["key"]) for op in event["issue"]])
        elif "wait" in event:
            out.append(event["wait"])
    return out


@pytest.mark.parametrize("spec", ["gpt", "llama"])
def test_stub_recording_matches_the_real_executor_over_gloo(spec: str) -> None:
    from megalm.testing import run_distributed

    ranks = run_distributed(_real_worker, 2, spec)
    for index, (schedule, m, v) in enumerate(REAL_CASES):
        real = {rank: ranks[rank][index] for rank in range(2)}
        assert check_trace(real, one_stream_per_rank=True).ok
        stub = record_pipeline(schedule, 2, m, v, (8, 1, 16))
        for rank in range(2):
            assert without_compute_and_sizes(real[rank]) == without_compute_and_sizes(stub[rank]), (schedule, rank)
            assert [e for e in real[rank] if "issue" in e] == [e for e in stub[rank] if "issue" in e]  # sizes too
