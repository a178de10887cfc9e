"""Pipeline schedules as lists: completeness, stage dependencies, in-flight memory and bubble.

The dependency check here is written independently of `simulate`: it builds the graph of every
action (its rank predecessor plus its cross-stage dependency), topologically sorts it (a cycle is a
deadlock) and computes finish times as longest paths. `simulate` must agree on all of it.
Pure Python; the full grid (pp 1..8, m 1..32, v 1..4) runs in about a second.
"""

from __future__ import annotations

from collections import Counter, deque

import pytest

from megalm.parallel.schedules import (
    Action,
    ScheduleError,
    analytic_bubble,
    build_schedule,
    check_schedule_args,
    partition_layers,
    simulate,
    stage_position,
    virtual_stage,
)

MAX_PP = 8
MAX_M = 32
MAX_V = 4
TIMES = [(1.0, 2.0), (1.0, 1.0)]  # (forward, backward) per stage


def grid():
    """Every valid (name, pp, m, v) of the sweep."""
    for pp in range(1, MAX_PP + 1):
        for m in range(1, MAX_M + 1):
            yield "gpipe", pp, m, 1
            yield "1f1b", pp, m, 1
            if pp >= 2 and m % pp == 0:
                for v in range(1, MAX_V + 1):  # v=1 interleaved is accepted by check_schedule_args
                    yield "interleaved", pp, m, v


# ---------------------------------------------------------------- independent reference checks


def dependency(action: Action, rank: int, pp: int, v: int):
    """(kind, microbatch, virtual stage) this action waits for, or None."""
    stage = action.chunk * pp + rank
    last = pp * v - 1
    if action.kind == "F":
        return ("F", action.microbatch, stage - 1) if stage > 0 else None
    if stage == last:
        return ("F", action.microbatch, stage)
    return ("B", action.microbatch, stage + 1)


def reference_run(schedule, v: int, forward_time: float, backward_time: float):
    """Topological order over rank order + stage dependencies; returns (finish times, makespan).

    Raises AssertionError (with the stuck actions) if the graph has a cycle, i.e. a deadlock.
    """
    pp = len(schedule)
    node_of = {}  # (kind, mb, stage) -> (rank, index)
    for rank, actions in enumerate(schedule):
        for index, action in enumerate(actions):
            key = (action.kind, action.microbatch, action.chunk * pp + rank)
            assert key not in node_of, f"duplicate {key}"
            node_of[key] = (rank, index)
    preds = {}
    succs = {node: [] for node in node_of.values()}
    for rank, actions in enumerate(schedule):
        for index, action in enumerate(actions):
            node = (rank, index)
            p = []
            if index > 0:
                p.append((rank, index - 1))
            dep = dependency(action, rank, pp, v)
            if dep is not None:
                assert dep in node_of, f"rank {rank}: {action} depends on {dep}, which no rank runs"
                p.append(node_of[dep])
            preds[node] = p
            for q in p:
                succs[q].append(node)
    indegree = {node: len(p) for node, p in preds.items()}
    ready = deque(node for node, d in indegree.items() if d == 0)
    finish = {}
    duration = {"F": forward_time / v, "B": backward_time / v}
    while ready:
        node = ready.popleft()
        rank, index = node
        start = max((finish[q] for q in preds[node]), default=0.0)
        finish[node] = start + duration[schedule[rank][index].kind]
        for s in succs[node]:
            indegree[s] -= 1
            if indegree[s] == 0:
                ready.append(s)
    if len(finish) != len(preds):
        stuck = sorted(node for node in preds if node not in finish)
        raise AssertionError(f"deadlock: {len(stuck)} actions never become ready, e.g. {stuck[:4]}")
    return finish, max(finish.values(), default=0.0)


def in_flight_profile(actions) -> list[int]:
    """Running count after each action: F increments, B decrements."""
    count, profile = 0, []
    for action in actions:
        count += 1 if action.kind == "F" else -1
        profile.append(count)
    return profile


def check_complete(schedule, name, pp, m, v):
    for rank, actions in enumerate(schedule):
        counts = Counter(actions)
        expected = {Action(k, mb, c) for k in "FB" for mb in range(m) for c in range(v)}
        assert set(counts) == expected, f"{name} pp={pp} m={m} v={v} rank {rank}: wrong action set"
        assert all(n == 1 for n in counts.values()), f"{name} pp={pp} m={m} v={v} rank {rank}: duplicates"
        position = {a: i for i, a in enumerate(actions)}
        for mb in range(m):
            for c in range(v):
                assert position[Action("F", mb, c)] < position[Action("B", mb, c)], (
                    f"{name} pp={pp} m={m} v={v} rank {rank}: B{mb}.{c} before its F"
                )


def interleaved_bound(pp: int, rank: int, m: int, v: int) -> int:
    if m == pp:
        return m * v
    return min((pp - rank - 1) * 2 + (v - 1) * pp + 1, m * v)


# ---------------------------------------------------------------- 1. the grid


def test_every_schedule_is_complete_and_ordered():
    n = 0
    for name, pp, m, v in grid():
        schedule = build_schedule(name, pp, m, v)
        assert len(schedule) == pp
        check_complete(schedule, name, pp, m, v)
        n += 1
    assert n > 600


def test_dependencies_hold_without_deadlock_and_simulate_agrees():
    for name, pp, m, v in grid():
        schedule = build_schedule(name, pp, m, v)
        for forward_time, backward_time in TIMES:
            finish, makespan = reference_run(schedule, v, forward_time, backward_time)
            sim = simulate(schedule, v, forward_time, backward_time)  # must not raise
            assert sim.makespan == pytest.approx(makespan, abs=1e-9), (name, pp, m, v, forward_time, backward_time)
            for (rank, index), t in finish.items():
                assert sim.finish[(rank, schedule[rank][index])] == pytest.approx(t, abs=1e-9)
            # busy time per rank does not depend on v
            for busy in sim.busy:
                assert busy == pytest.approx(m * (forward_time + backward_time), abs=1e-9)


def test_in_flight_counts():
    observed_interleaved = {}
    for name, pp, m, v in grid():
        schedule = build_schedule(name, pp, m, v)
        sim = simulate(schedule, v)
        for rank, actions in enumerate(schedule):
            profile = in_flight_profile(actions)
            peak = max(profile)
            assert profile[-1] == 0 and min(profile) >= 0
            assert sim.max_in_flight[rank] == peak, (name, pp, m, v, rank)
            where = f"{name} pp={pp} m={m} v={v} rank {rank}: peak {peak}"
            if name == "gpipe":
                assert peak == m, where
            elif name == "1f1b":
                assert peak == min(pp - rank, m), where
            else:
                bound = interleaved_bound(pp, rank, m, v)
                assert peak <= bound, f"{where} > Megatron bound {bound}"
                observed_interleaved[(pp, m, v, rank)] = (peak, bound)
        if name == "1f1b" and m >= pp:
            assert max(in_flight_profile(schedule[0])) == pp
    # the list-level bound is actually reached (the schedule does warm up as Megatron does)
    assert all(peak == bound for peak, bound in observed_interleaved.values()), {
        k: pb for k, pb in observed_interleaved.items() if pb[0] != pb[1]
    }


def test_bubble_fraction_matches_formula():
    mismatches = []
    for name, pp, m, v in grid():
        schedule = build_schedule(name, pp, m, v)
        expected = (pp - 1) / (m * v + pp - 1)
        assert analytic_bubble(pp, m, v) == pytest.approx(expected, abs=1e-12)
        for forward_time, backward_time in TIMES:
            got = simulate(schedule, v, forward_time, backward_time).bubble_fraction
            if abs(got - expected) > 1e-9:
                mismatches.append((name, pp, m, v, forward_time, backward_time, got, expected))
    assert not mismatches, mismatches


def test_interleaved_chunk_mapping():
    for pp in range(1, MAX_PP + 1):
        for chunk in range(MAX_V):
            for rank in range(pp):
                stage = virtual_stage(rank, chunk, pp)
                assert stage == chunk * pp + rank
                assert stage_position(stage, pp) == (rank, chunk)


# ---------------------------------------------------------------- 2. bad input


def test_bad_schedule_arguments():
    with pytest.raises(ScheduleError, match=r"unknown pipeline schedule 'zb'.*1f1b.*gpipe.*interleaved"):
        build_schedule("zb", 2, 4)
    with pytest.raises(ScheduleError) as e:
        build_schedule("interleaved", 4, 6, 2)
    assert "multiple of pp=4" in str(e.value) and "(6)" in str(e.value)
    with pytest.raises(ScheduleError, match=r"interleaved schedule needs parallel\.pp >= 2"):
        build_schedule("interleaved", 1, 4, 2)
    for name in ("gpipe", "1f1b"):
        with pytest.raises(ScheduleError) as e:
            build_schedule(name, 2, 4, 2)
        text = str(e.value)
        assert "virtual_stages=2" in text and "interleaved" in text and repr(name) in text
    for pp, m, v in [(0, 4, 1), (2, 0, 1), (2, 4, 0), (-1, 4, 1)]:
        for name in ("gpipe", "1f1b", "interleaved"):
            with pytest.raises(ScheduleError) as e:
                check_schedule_args(name, pp, m, v)
            text = str(e.value)
            assert ">= 1" in text and f"pp={pp}" in text and f"micro-batches={m}" in text, text
            assert f"virtual stages={v}" in text, text
    # ScheduleError is a ValueError: callers catching ValueError still see it
    assert issubclass(ScheduleError, ValueError)


# ---------------------------------------------------------------- 3. partition_layers


def test_partition_uniform_and_explicit():
    assert partition_layers(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert partition_layers(5, 1) == [range(0, 5)]
    parts = partition_layers(8, 4, [1, 3, 3, 1])
    assert parts == [range(0, 1), range(1, 4), range(4, 7), range(7, 8)]
    for num_layers, counts in [(8, [1, 3, 3, 1]), (12, [0, 6, 6, 0]), (24, [3] * 8), (7, [7])]:
        parts = partition_layers(num_layers, len(counts), counts)
        assert [len(r) for r in parts] == counts
        assert [i for r in parts for i in r] == list(range(num_layers))  # contiguous, in order, complete
    # interleaved: pp * v virtual stages, stage = chunk * pp + rank
    pp, v = 4, 2
    parts = partition_layers(16, pp * v)
    assert parts[virtual_stage(1, 1, pp)] == range(10, 12)


def test_partition_errors_name_the_numbers():
    with pytest.raises(ScheduleError) as e:
        partition_layers(8, 4, [1, 3, 3, 2])
    assert "sums to 9" in str(e.value) and "8 layers" in str(e.value)
    with pytest.raises(ScheduleError) as e:
        partition_layers(8, 4, [4, 4])
    assert "2 entries" in str(e.value) and "4" in str(e.value)
    with pytest.raises(ScheduleError) as e:
        partition_layers(8, 4, [-1, 3, 3, 3])  # sums to 8 but has a negative count
    assert "-1" in str(e.value) and ">= 0" in str(e.value)
    with pytest.raises(ScheduleError) as e:
        partition_layers(10, 4)
    assert "10 layers" in str(e.value) and "4 pipeline stages" in str(e.value)


# ---------------------------------------------------------------- 4. simulate rejects bad lists


def test_simulate_detects_deadlock():
    F, B = (lambda mb: Action("F", mb, 0)), (lambda mb: Action("B", mb, 0))
    # rank 0 waits for B0 from rank 1; rank 1 first wants F1, which rank 0 only sends after B0.
    bad = [[F(0), B(0), F(1), B(1)], [F(1), B(1), F(0), B(0)]]
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(bad)
    with pytest.raises(AssertionError, match="deadlock"):  # the reference check agrees
        reference_run(bad, 1, 1.0, 2.0)
    # the same actions in a consistent order run fine
    good = [[F(0), B(0), F(1), B(1)], [F(0), B(0), F(1), B(1)]]
    simulate(good)
    reference_run(good, 1, 1.0, 2.0)


def test_simulate_rejects_duplicates_and_backward_before_forward():
    F, B = (lambda mb: Action("F", mb, 0)), (lambda mb: Action("B", mb, 0))
    with pytest.raises(ScheduleError, match="appears twice"):
        simulate([[F(0), F(0), B(0)]])
    with pytest.raises(ScheduleError, match="appears twice"):
        simulate([[F(0), B(0), B(0)]])
    with pytest.raises(ScheduleError, match="before its forward"):
        simulate([[B(0), F(0)]])
    with pytest.raises(ScheduleError, match="before its forward"):
        simulate([[B(0), F(0)], [F(0), B(0)]])  # first stage of two


# ---------------------------------------------------------------- 5. 1F1B memory at list level


def test_1f1b_bounds_first_stage_memory_gpipe_does_not():
    pp, m = 4, 16
    one_f_one_b = build_schedule("1f1b", pp, m)
    gpipe = build_schedule("gpipe", pp, m)
    assert max(in_flight_profile(one_f_one_b[0])) == 4
    assert all(count <= 4 for count in in_flight_profile(one_f_one_b[0]))
    assert max(in_flight_profile(gpipe[0])) == 16
    assert simulate(one_f_one_b).max_in_flight == [4, 3, 2, 1]
    assert simulate(gpipe).max_in_flight == [16] * 4
