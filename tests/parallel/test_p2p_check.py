"""The NCCL-semantics checker on hand-made traces (p2p, and collectives beside it) and on the p2p the executor
issued before issue 12."""

from __future__ import annotations

from pathlib import Path

from megalm.parallel.p2p_check import check_trace, load_trace, sends_held_past_compute

DATA = Path(__file__).parent / "data"


def op(op_id: int, kind: str, peer: int, key: str, nbytes: int = 64) -> dict:
    return {"id": op_id, "op": kind, "peer": peer, "key": key, "bytes": nbytes}


def issue(*ops: dict) -> dict:
    return {"issue": list(ops)}


def wait(*ids: int) -> list[dict]:
    return [{"wait": i} for i in ids]


def call(key: str, ranks: list[int], op_name: str = "all_gather", nbytes: int = 32) -> dict:
    return {"collective": {"group": "cp", "ranks": ranks, "op": op_name, "key": key, "bytes": nbytes}}


def both_models(trace: dict) -> list:
    return [check_trace(trace, one_stream_per_rank=stream) for stream in (False, True)]


def test_crossing_exchange_as_one_group_passes() -> None:
    trace = {
        0: [issue(op(0, "send", 1, "act:1"), op(1, "recv", 1, "grad:0")), *wait(0, 1)],
        1: [issue(op(0, "send", 0, "grad:0"), op(1, "recv", 0, "act:1")), *wait(0, 1)],
    }
    for result in both_models(trace):
        assert result.ok, result.problems


def test_crossing_exchange_as_two_singles_deadlocks() -> None:
    # Both ranks issue their send first: neither channel head is a receive.
    trace = {
        0: [issue(op(0, "send", 1, "act:1")), issue(op(1, "recv", 1, "grad:0")), *wait(1, 0)],
        1: [issue(op(0, "send", 0, "grad:0")), issue(op(1, "recv", 0, "act:1")), *wait(1, 0)],
    }
    for result in both_models(trace):
        assert not result.ok
        message = result.problems[0]
        assert message.startswith("deadlock: ranks [0, 1]")
        assert "rank 0 head [send act:1], rank 1 head [send grad:0]" in message


def test_one_side_grouping_the_crossing_is_enough() -> None:
    # Rank 1's group holds the crossing pair; rank 0's single send then single receive both match it.
    trace = {
        0: [issue(op(0, "send", 1, "act:1")), issue(op(1, "recv", 1, "grad:0")), *wait(1, 0)],
        1: [issue(op(0, "send", 0, "grad:0"), op(1, "recv", 0, "act:1")), *wait(0, 1)],
    }
    assert check_trace(trace).ok


def test_wait_before_the_peer_receives_deadlocks() -> None:
    # Each rank waits for its send before it posts the receive the other one's send needs.
    trace = {
        0: [issue(op(0, "send", 1, "x")), *wait(0), issue(op(1, "recv", 1, "y")), *wait(1)],
        1: [issue(op(0, "send", 0, "y")), *wait(0), issue(op(1, "recv", 0, "x")), *wait(1)],
    }
    result = check_trace(trace)
    assert not result.ok and "rank 0 waits for [send x (64 B) rank 0 -> rank 1]" in result.problems[0]


def test_a_three_rank_cycle_through_a_group_deadlocks() -> None:
    # Rank 1's group needs rank 2's send, which comes only after rank 2 got rank 0's, which waits on rank 1.
    trace = {
        0: [issue(op(0, "recv", 1, "a")), *wait(0), issue(op(1, "send", 2, "b")), *wait(1)],
        1: [issue(op(0, "send", 0, "a"), op(1, "recv", 2, "c")), *wait(0, 1)],
        2: [issue(op(0, "recv", 0, "b")), *wait(0), issue(op(1, "send", 1, "c")), *wait(1)],
    }
    assert check_trace(trace).ok  # rank 1's send to 0 completes inside the group, so this one is fine
    trace[1] = [issue(op(0, "recv", 2, "c")), *wait(0), issue(op(1, "send", 0, "a")), *wait(1)]
    result = check_trace(trace)
    assert not result.ok and result.problems[0].startswith("deadlock: ranks [0, 1, 2]")


def test_group_completes_as_a_unit() -> None:
    # Rank 0's group sends to 1 and receives from 2; rank 2 sends only after rank 1 forwarded to it.
    trace = {
        0: [issue(op(0, "send", 1, "a"), op(1, "recv", 2, "c")), *wait(0, 1)],
        1: [issue(op(0, "recv", 0, "a")), *wait(0), issue(op(1, "send", 2, "b")), *wait(1)],
        2: [issue(op(0, "recv", 1, "b")), *wait(0), issue(op(1, "send", 0, "c")), *wait(1)],
    }
    assert check_trace(trace).ok


def test_one_stream_per_rank_keeps_groups_in_issue_order() -> None:
    # Rank 1 posts a receive from 2 early, then one from 0. With independent pair channels the second
    # completes first and unblocks the chain 0 -> 2 -> 1; on a single stream it waits behind the first.
    trace = {
        0: [issue(op(0, "send", 1, "a")), *wait(0), issue(op(1, "send", 2, "c")), *wait(1)],
        1: [issue(op(0, "recv", 2, "z")), issue(op(1, "recv", 0, "a")), *wait(1, 0)],
        2: [issue(op(0, "recv", 0, "c")), *wait(0), issue(op(1, "send", 1, "z")), *wait(1)],
    }
    assert check_trace(trace).ok
    result = check_trace(trace, one_stream_per_rank=True)
    assert not result.ok and result.problems[0].startswith("deadlock: ranks [0, 1, 2]")


def test_mismatched_sizes_and_keys_are_reported() -> None:
    trace = {
        0: [issue(op(0, "send", 1, "act:0", nbytes=64)), *wait(0), issue(op(1, "send", 1, "act:1")), *wait(1)],
        1: [issue(op(0, "recv", 0, "act:0", nbytes=32)), *wait(0), issue(op(1, "recv", 0, "grad:1")), *wait(1)],
    }
    problems = check_trace(trace).problems
    assert problems == [
        "size mismatch: send act:0 (64 B) rank 0 -> rank 1 is received as recv act:0 (32 B) rank 1 <- rank 0",
        "message mismatch: send act:1 (64 B) rank 0 -> rank 1 is received as recv grad:1 (64 B) rank 1 <- rank 0",
    ]


def test_unmatched_and_unwaited_operations_are_reported() -> None:
    unmatched = {0: [issue(op(0, "send", 1, "a"))], 1: []}
    assert "1 operations never completed" in check_trace(unmatched).problems[0]
    unwaited = {0: [issue(op(0, "send", 1, "a"))], 1: [issue(op(0, "recv", 0, "a")), *wait(0)]}
    assert "never waited for" in check_trace(unwaited).problems[0]


def test_checker_finds_the_deadlock_in_the_executor_before_issue_12() -> None:
    trace, meta = load_trace(DATA / "legacy_1f1b_pp2_m2.json")
    assert (meta["schedule"], meta["pp"], meta["microbatches"]) == ("1f1b", 2, 2)
    for result in both_models(trace):
        assert not result.ok
        message = result.problems[0]
        # stage 0 sends act 1 before it receives grad 0; stage 1 sends grad 0 before it receives act 1
        assert message.startswith("deadlock: ranks [0, 1] wait forever")
        assert "rank 0 waits for [recv grad:0:0 (32 B) rank 0 <- rank 1]" in message
        assert "rank 1 waits for [recv act:1:1 (32 B) rank 1 <- rank 0]" in message
        assert "rank 0 head [send act:1:1], rank 1 head [send grad:0:0]" in message


def test_held_sends_are_found_in_the_executor_before_issue_12() -> None:
    trace, _ = load_trace(DATA / "legacy_1f1b_pp2_m2.json")
    assert sends_held_past_compute(trace) == [
        "rank 0: send act:0:1 waited 3 computations later",
        "rank 0: send act:1:1 waited 2 computations later",
        "rank 1: send grad:0:0 waited 2 computations later",
    ]


# ---- collectives beside p2p ----------------------------------------------------------------------


def test_collectives_in_the_same_order_complete() -> None:
    trace = {rank: [call("F:0:0:0", [0, 1]), call("F:0:0:1", [0, 1]), call("B:0:0:1", [0, 1], "reduce_scatter")]
             for rank in (0, 1)}
    for result in both_models(trace):
        assert result.ok, result.problems
        assert result.num_collectives == 6


def test_collectives_in_another_order_are_a_mismatch() -> None:
    trace = {0: [call("F:0:0:0", [0, 1]), call("F:0:0:1", [0, 1])],
             1: [call("F:0:0:1", [0, 1]), call("F:0:0:0", [0, 1])]}
    for result in both_models(trace):
        assert result.problems == [
            "collective mismatch over cp [0, 1]: rank 0 calls all_gather F:0:0:0 (32 B), "
            "rank 1 calls all_gather F:0:0:1 (32 B)"
        ]


def test_a_collective_one_member_never_calls_deadlocks() -> None:
    trace = {0: [call("F:0:0:0", [0, 1]), call("loss:0", [0, 1], "all_reduce")], 1: [call("F:0:0:0", [0, 1])]}
    for result in both_models(trace):
        assert result.problems == [
            "deadlock: ranks [0] wait forever\n"
            "  rank 0 waits in [all_reduce loss:0 (32 B) over cp [0, 1]]\n"
            "    rank 1 has not called it: it finished its program"
        ]


def test_a_collective_blocks_its_rank_until_every_member_called_it() -> None:
    # Rank 1 receives from rank 0 before its all-gather; rank 0 sends only after the all-gather: a cycle.
    trace = {
        0: [call("F:0:0:0", [0, 1]), issue(op(0, "send", 1, "x")), *wait(0)],
        1: [issue(op(0, "recv", 0, "x")), *wait(0), call("F:0:0:0", [0, 1])],
    }
    for result in both_models(trace):
        assert result.problems == [
            "deadlock: ranks [0, 1] wait forever\n"
            "  rank 0 waits in [all_gather F:0:0:0 (32 B) over cp [0, 1]]\n"
            "    rank 1 has not called it: it waits for p2p: its group still needs ['recv x (64 B) rank 1 <- rank 0']\n"
            "  rank 1 waits for [recv x (64 B) rank 1 <- rank 0]; its group still needs: "
            "['recv x (64 B) rank 1 <- rank 0']\n"
            "    channel 1<->0: rank 1 head [recv x], rank 0 head (nothing issued)"
        ]
    trace[1] = [call("F:0:0:0", [0, 1]), issue(op(0, "recv", 0, "x")), *wait(0)]
    assert all(result.ok for result in both_models(trace))


def test_one_stream_per_rank_puts_a_collective_behind_a_group_in_flight() -> None:
    # Rank 0's all-gather with rank 1 follows its unwaited send to rank 2; rank 2 receives it only after a
    # message rank 1 sends once the all-gather is done. Separate streams: fine; one stream: the all-gather
    # waits for the send, which waits for rank 2, which waits for rank 1, which waits in the all-gather.
    trace = {
        0: [issue(op(0, "send", 2, "x")), call("F:0:0:0", [0, 1]), *wait(0)],
        1: [call("F:0:0:0", [0, 1]), issue(op(0, "send", 2, "y")), *wait(0)],
        2: [issue(op(0, "recv", 1, "y")), *wait(0), issue(op(1, "recv", 0, "x")), *wait(1)],
    }
    assert check_trace(trace).ok
    result = check_trace(trace, one_stream_per_rank=True)
    assert result.problems[0].startswith("deadlock: ranks [0, 1, 2] wait forever")
    assert "    rank 0's call is queued on its stream behind [group [send x]]" in result.problems[0]


def test_a_collective_over_ranks_outside_the_trace_is_refused() -> None:
    trace = {0: [call("F:0:0:0", [0, 5])], 1: []}
    assert check_trace(trace).problems == [
        "rank 0 calls all_gather F:0:0:0 (32 B) over cp [0, 5]: a group must list distinct ranks of the trace [0, 1]"
    ]
    trace = {0: [call("F:0:0:0", [0, 1])], 1: [call("F:0:0:0", [0, 1])], 2: [call("F:0:0:0", [0, 1])]}
    assert check_trace(trace).problems == [
        "rank 2 calls all_gather F:0:0:0 (32 B) over cp [0, 1]: the group must hold the caller"
    ]
