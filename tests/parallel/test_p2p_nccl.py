"""The executor's p2p, with context parallelism's collectives beside it, replayed under NCCL's rules:
no deadlock over the whole schedule grid.

Each case runs every rank's real PipelineExecutor in this process with stub chunks and a recording
transport (megalm.parallel.p2p_check), then replays the recorded programs with independent pair
channels and with one stream per rank (stricter). Sequence parallelism only changes the message
shape ([s/tp, b, h] instead of [s, b, h]); each tp rank has its own pp group. Context parallelism
(cp > 1) runs one pipeline per cp rank, and every chunk calls collectives over its cp group (a
key/value all-gather per layer in forward, its reduce-scatter in backward: what a real GPTModel chunk
calls, checked on gloo below), which tie the pipelines of a stage's cp ranks together.
"""

from __future__ import annotations

import functools

import pytest
import torch

from megalm.parallel.p2p_check import (
    check_trace,
    rank_coordinates,
    receives_by_overlap,
    record_pipeline,
    sends_held_past_compute,
)
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


def late_receives(schedule: str, pp: int, m: int, stage: int) -> list[str]:
    """GPipe and 1F1B: the receives a stage cannot post ahead of the computation before their use.

    The first action's input (nothing runs before it), and each gradient that crosses the activation the
    forward before it sends to the same peer (GPipe: gradient 0, after the last forward; 1F1B: the
    steady state's gradients, or gradient 0 when warm-up holds every forward). Every other receive is
    posted before the computation that precedes it."""
    late = [f"act:0:{stage}"] if stage > 0 else []
    if stage < pp - 1:
        crossing = 1 if schedule == "gpipe" else max(m - min(pp - stage - 1, m), 1)
        late += [f"grad:{mb}:{stage}" for mb in range(crossing)]
    return sorted(late)


def overlap_failures(trace: dict, schedule: str, pp: int, m: int) -> list[str]:
    """GPipe and 1F1B: receives posted ahead or not where `late_receives` says otherwise."""
    if schedule == "interleaved":
        return []
    found = []
    for stage, (ahead, late) in sorted(receives_by_overlap(trace).items()):
        if sorted(late) != late_receives(schedule, pp, m, stage) or len(ahead) + len(late) != m * (
                (stage > 0) + (stage < pp - 1)):
            found.append(f"stage {stage}: receives not posted ahead {sorted(late)}, "
                         f"expected {late_receives(schedule, pp, m, stage)} (posted ahead: {ahead})")
    return found


def grid_failures(cases: list[tuple], layouts: tuple[tuple[tuple, int], ...]) -> list[str]:
    """Each case recorded at each (message shape, cp) layout and replayed; the problems found, one line each.

    At cp = 1, GPipe and 1F1B must also post every receive ahead that `late_receives` allows."""
    failures = []
    for schedule, pp, m, v in cases:
        for shape, cp in layouts:
            trace = record_pipeline(schedule, pp, m, v, shape, cp=cp, replicate_cp=True)
            found = problems_of(trace, schedule) + (overlap_failures(trace, schedule, pp, m) if cp == 1 else [])
            if found:
                failures.append(f"{schedule} pp={pp} m={m} v={v} shape={shape} cp={cp}: {found[0]}")
    return failures


@pytest.mark.slow
def test_no_deadlock_over_the_schedule_grid() -> None:
    """The whole grid without cp ([s, b, h] messages) and with cp = 2 (smaller messages, as with sequence parallel).

    A cp = 2 trace holds two copies of the cp = 1 pipeline (one per cp rank) tied by collectives: it
    checks the sequence-parallel message shape's p2p too (collectives only ever hold a rank back)."""
    cases = grid()
    assert len(cases) == 724  # 256 gpipe + 256 1f1b + 212 interleaved
    failures = grid_failures(cases, ((SHAPE, 1), (SP_SHAPE, 2)))
    assert not failures, f"{len(failures)} of {2 * len(cases)} configurations fail:\n" + "\n".join(failures[:5])


def cp4_cases() -> list[tuple[str, int, int, int]]:
    """The grid's cases at pp <= 4 with the fewest micro-batches (m <= pp + 1, and m = 2 pp + 1): warm-up,
    steady state and cool-down all present, at a fraction of the cost."""
    return [case for case in grid() if case[1] <= 4 and (case[2] <= case[1] + 1 or case[2] == 2 * case[1] + 1)]


@pytest.mark.slow
def test_no_deadlock_with_cp4() -> None:
    cases = cp4_cases()
    assert len(cases) == 48  # 18 gpipe + 18 1f1b + 12 interleaved
    failures = grid_failures(cases, ((SP_SHAPE, 4),))
    assert not failures, f"{len(failures)} of {len(cases)} configurations fail:\n" + "\n".join(failures[:5])


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_early_receives_are_posted_wherever_the_pair_order_allows(schedule: str) -> None:
    """pp 1..4, m 1..9 (the whole grid in the slow test): every receive but `late_receives` overlaps the
    computation before its use, the replay passes, and the reference protocol overlaps none."""
    for pp in range(1, 5):
        for m in range(1, 10):
            trace = record_pipeline(schedule, pp, m, 1, SHAPE)
            assert not problems_of(trace, schedule) + overlap_failures(trace, schedule, pp, m), (schedule, pp, m)
            reference = record_pipeline(schedule, pp, m, 1, SHAPE, early_receives=False)
            assert not problems_of(reference, schedule)
            early = receives_by_overlap(trace)
            for stage, (ahead, late) in receives_by_overlap(reference).items():
                assert not ahead and sorted(late) == sorted(early[stage][0] + early[stage][1])


def test_early_receives_in_evaluation() -> None:
    """Forward only: every activation but the first is received under the forward before it."""
    for pp in (2, 3, 4):
        trace = record_pipeline("1f1b", pp, 5, 1, SHAPE, forward_only=True)
        assert not problems_of(trace)
        for stage, (ahead, late) in receives_by_overlap(trace).items():
            assert (sorted(ahead), late) == ([f"act:{mb}:{stage}" for mb in range(1, 5)] if stage else [],
                                             [f"act:0:{stage}"] if stage else [])


@pytest.mark.parametrize("pp,v", [(1, 1), (2, 1), (3, 1), (2, 2), (4, 4), (8, 3)])
@pytest.mark.parametrize("cp", [1, 2])
def test_no_deadlock_in_evaluation(pp: int, v: int, cp: int) -> None:
    schedule = "interleaved" if v > 1 else "1f1b"
    for m in (1, 3, 8):
        trace = record_pipeline(schedule, pp, m * pp if v > 1 else m, v, SHAPE, forward_only=True, cp=cp)
        assert not problems_of(trace)


SMALL_CASES = [("1f1b", 2, 2, 1), ("1f1b", 4, 9, 1), ("gpipe", 3, 4, 1), ("interleaved", 2, 4, 2),
               ("interleaved", 4, 8, 3), ("interleaved", 3, 3, 2)]


@pytest.mark.parametrize("case", SMALL_CASES)
@pytest.mark.parametrize("cp", [1, 2, 4])
def test_no_deadlock_small_cases(case: tuple, cp: int) -> None:
    assert not problems_of(record_pipeline(*case, SP_SHAPE, cp=cp), case[0])  # every cp rank's executor run


@pytest.mark.parametrize("case", [("1f1b", 3, 5, 1), ("gpipe", 2, 3, 1), ("interleaved", 2, 4, 2)])
def test_every_cp_rank_records_the_program_replicate_cp_gives_it(case: tuple) -> None:
    """The grid records cp rank 0 and renames its program for the others: the same trace as running them all."""
    for cp, forward_only in ((2, False), (4, False), (2, True)):
        recorded = record_pipeline(*case, SHAPE, cp=cp, forward_only=forward_only)
        assert recorded == record_pipeline(*case, SHAPE, cp=cp, forward_only=forward_only, replicate_cp=True)
        assert len(recorded) == case[1] * cp


def issues(trace: dict, rank: int) -> list[list[str]]:
    return [[f"{op['op']} {op['key']}" for op in event["issue"]] for event in trace[rank] if "issue" in event]


def test_1f1b_crossing_messages_travel_in_one_group_on_one_side() -> None:
    """pp=2, m=2: stage 0's send of act 1 and receive of grad 0 cross stage 1's receive of act 1 and send of grad 0.

    Stage 0 keeps the crossing pair in one group; stage 1 posts its receive of act 1 ahead, before it
    computes B0, and sends grad 0 after it (one side grouping the crossing is enough under NCCL's rules)."""
    trace = record_pipeline("1f1b", 2, 2, 1, SHAPE)
    assert issues(trace, 0) == [["send act:0:1"], ["send act:1:1", "recv grad:0:0"], ["recv grad:1:0"]]
    assert issues(trace, 1) == [["recv act:0:1"], ["recv act:1:1"], ["send grad:0:0"], ["send grad:1:0"]]
    reference = record_pipeline("1f1b", 2, 2, 1, SHAPE, early_receives=False)
    assert issues(reference, 1) == [["recv act:0:1"], ["send grad:0:0", "recv act:1:1"], ["send grad:1:0"]]


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


# ---- context parallelism: what each cp rank calls, and broken traces the replay must refuse ----------


def calls(trace: dict, rank: int) -> list[str]:
    return [f"{call['op']} {call['key']}" for call in (event.get("collective") for event in trace[rank]) if call]


def test_cp_ranks_call_every_layers_collectives_over_their_cp_group() -> None:
    trace = record_pipeline("1f1b", 2, 2, 1, SHAPE, cp=2)
    assert rank_coordinates(2, 2) == {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1)}  # (pp, cp); rank = pp * cp + cp
    stage = lambda mb: [f"all_gather F:{mb}:0:0", f"all_gather F:{mb}:0:1"]  # noqa: E731
    backward = lambda mb: [f"reduce_scatter B:{mb}:0:1", f"reduce_scatter B:{mb}:0:0"]  # noqa: E731
    for rank in (0, 1):  # stage 0: F0 F1 B0 B1
        assert calls(trace, rank) == stage(0) + stage(1) + backward(0) + backward(1)
    for rank in (2, 3):  # the last stage: F0 B0 F1 B1
        assert calls(trace, rank) == [*stage(0), *backward(0), *stage(1), *backward(1)]
    groups = {rank: {tuple(event["collective"]["ranks"]) for event in trace[rank] if "collective" in event}
              for rank in trace}
    assert groups == {0: {(0, 1)}, 1: {(0, 1)}, 2: {(2, 3)}, 3: {(2, 3)}}
    assert issues(trace, 1) == issues(trace, 0)  # the same pipeline program over each cp rank's own pp group
    peers = {rank: {op["peer"] for event in trace[rank] if "issue" in event for op in event["issue"]} for rank in trace}
    assert peers == {0: {2}, 1: {3}, 2: {0}, 3: {1}}
    for one_stream in (False, True):
        result = check_trace(trace, one_stream_per_rank=one_stream)
        assert result.ok and result.num_collectives == 4 * 8


def collective_index(events: list[dict], key: str) -> int:
    return next(i for i, event in enumerate(events) if event.get("collective", {}).get("key") == key)


def test_a_cp_rank_calling_its_collectives_in_another_order_is_a_mismatch() -> None:
    trace = record_pipeline("interleaved", 2, 4, 2, SHAPE, cp=2)
    events = trace[3]  # pp 1, cp 1
    first, second = collective_index(events, "F:0:0:0"), collective_index(events, "F:0:0:1")
    events[first], events[second] = events[second], events[first]
    for one_stream in (False, True):
        assert check_trace(trace, one_stream_per_rank=one_stream).problems == [
            "collective mismatch over cp [2, 3]: rank 2 calls all_gather F:0:0:0 (64 B), "
            "rank 3 calls all_gather F:0:0:1 (64 B)"
        ]


def test_a_cp_rank_skipping_a_collective_is_a_mismatch_or_a_deadlock() -> None:
    trace = record_pipeline("1f1b", 2, 2, 1, SHAPE, cp=2)
    del trace[3][collective_index(trace[3], "F:0:0:1")]  # the last stage's cp rank 1 skips a layer's all-gather
    assert check_trace(trace).problems == [
        "collective mismatch over cp [2, 3]: rank 2 calls all_gather F:0:0:1 (64 B), "
        "rank 3 calls reduce_scatter B:0:0:1 (64 B)"
    ]
    trace = record_pipeline("1f1b", 2, 2, 1, SHAPE, cp=2)
    del trace[1][collective_index(trace[1], "B:1:0:0")]  # stage 0's cp rank 1 skips its very last one
    assert check_trace(trace, one_stream_per_rank=True).problems == [
        "deadlock: ranks [0] wait forever\n"
        "  rank 0 waits in [reduce_scatter B:1:0:0 (64 B) over cp [0, 1]]\n"
        "    rank 1 has not called it: it finished its program"
    ]


def test_a_collective_called_late_deadlocks_through_both_pipelines() -> None:
    """GPipe pp=2 m=2 cp=2 where stage 0's cp rank 1 calls F1's all-gathers only once it received B0's gradient:
    rank 0 waits for it there before it sends act 1; so stage 1's cp rank 0 never runs F1, its cp peer waits
    for it in F1's all-gather before B0, and rank 1 never receives that gradient. A cycle through four ranks.
    On one stream per rank stage 1 is stuck earlier: its cp rank 0's all-gathers of F0 queue behind the
    receive of act 1 it posted ahead, which rank 0 never sends."""
    trace = record_pipeline("gpipe", 2, 2, 1, SHAPE, cp=2)
    events = trace[1]
    late = [events.pop(collective_index(events, key)) for key in ("F:1:0:0", "F:1:0:1")]
    at = collective_index(events, "B:0:0:1")
    events[at:at] = late
    for one_stream in (False, True):
        message = check_trace(trace, one_stream_per_rank=one_stream).problems[0]
        assert message.startswith("deadlock: ranks [0, 1, 2, 3] wait forever\n")
        assert ("  rank 0 waits in [all_gather F:1:0:0 (64 B) over cp [0, 1]]\n"
                "    rank 1 has not called it: it waits for p2p: its group still needs "
                "['recv grad:0:0 (32 B) rank 1 <- rank 3']") in message
        if one_stream:
            assert ("  rank 3 waits in [all_gather F:0:0:0 (64 B) over cp [2, 3]]\n"
                    "    rank 2's call is queued on its stream behind [group [recv act:1:1]]") in message
        else:
            assert ("  rank 3 waits in [all_gather F:1:0:0 (64 B) over cp [2, 3]]\n"
                    "    rank 2 has not called it: it waits for p2p: its group still needs "
                    "['recv act:1:1 (32 B) rank 2 <- rank 0']") in message


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


def _real_worker(rank: int, world_size: int, spec: str = "gpt") -> dict:
    """The executor's operations over real p2p for each REAL_CASES case; with "gpt", also _cp_collectives."""
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
    return {"traces": traces, "cp_calls": _cp_collectives(rank) if spec == "gpt" else None}


@functools.lru_cache(maxsize=None)
def gloo_run(spec: str) -> list[dict]:
    """_real_worker's results on 2 gloo ranks, once per spec for the tests that read them."""
    from megalm.testing import run_distributed

    return run_distributed(_real_worker, 2, spec)


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
    ranks = [result["traces"] for result in gloo_run(spec)]
    for index, (schedule, m, v) in enumerate(REAL_CASES):
        real = {rank: ranks[rank][index] for rank in range(2)}
        assert check_trace(real, one_stream_per_rank=True).ok
        stub = record_pipeline(schedule, 2, m, v, (8, 1, 16))
        for rank in range(2):
            assert without_compute_and_sizes(real[rank]) == without_compute_and_sizes(stub[rank]), (schedule, rank)
            assert [e for e in real[rank] if "issue" in e] == [e for e in stub[rank] if "issue" in e]  # sizes too


def _cp_collectives(rank: int) -> list[str]:
    """The collectives a real 2-layer GPTModel chunk at cp = 2 (2 ranks) calls in a training forward and backward,
    with the group each runs over, in order."""
    from unittest import mock

    import megalm.parallel.tensor as tensor
    from megalm.config import ModelConfig
    from megalm.distributed import build_parallel_groups
    from megalm.model.gpt import build_model
    from megalm.parallel.context import cp_split
    from megalm.topology import Topology

    groups = build_parallel_groups(Topology(tp=1, pp=1, dp=1, cp=2), rank, torch.device("cpu"))
    model = build_model(ModelConfig(num_layers=2, hidden_size=16, num_heads=4, num_kv_heads=2, vocab_size=32,
                                    seq_length=8, position_embedding="rotary"), groups, 1)
    log: list[str] = []

    def recording(name: str, real):
        def call(*args, group=None, **kwargs):
            log.append(f"{name} {groups.group_name(group)}")
            return real(*args, group=group, **kwargs)
        return call

    gather = recording("all_gather", tensor.all_gather_single)
    scatter = recording("reduce_scatter", tensor.reduce_scatter_single)
    reduce = recording("all_reduce", torch.distributed.all_reduce)
    with mock.patch.object(tensor, "all_gather_single", gather), \
            mock.patch.object(tensor, "reduce_scatter_single", scatter), \
            mock.patch.object(torch.distributed, "all_reduce", reduce):
        tokens = cp_split(torch.arange(8).unsqueeze(0) + 1, 2, rank, 1)
        losses = model(tokens, labels=tokens)
        log.append("forward done")
        losses.sum().backward()
    return log


def test_the_stub_calls_what_a_model_chunk_calls() -> None:
    """A real model chunk calls, per layer, one all-gather of keys and values together (forward) and its
    reduce-scatter (backward, reverse layer order), all over the cp group, and nothing else: what StubChunk logs."""
    for rank in range(2):
        assert gloo_run("gpt")[rank]["cp_calls"] == [
            "all_gather cp", "all_gather cp", "forward done", "reduce_scatter cp", "reduce_scatter cp"
        ]
