"""ParallelGroups: the torch process groups built from a Topology really contain the right ranks.

Every rank all-reduces its own global rank over each of its groups; the sum must equal the sum of
that rank's group as the Topology lists it. Several layouts share one spawn of 8 gloo ranks.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megalm.distributed import ParallelGroups, all_reduce_, build_parallel_groups
from megalm.testing import run_distributed
from megalm.topology import Topology

# (tp, pp, dp) over 8 ranks.
LAYOUTS_8 = [(2, 2, 2), (4, 2, 1), (1, 2, 4), (8, 1, 1), (1, 4, 2)]


def _sum_over(group, rank: int) -> int:
    """All-reduce this rank's id over `group` (None: a group of one, nothing to do)."""
    value = torch.tensor([rank], dtype=torch.int64)
    all_reduce_(value, group)
    return int(value.item())


def _groups_worker(rank: int, world_size: int, layouts: list[tuple[int, int, int]]) -> list[dict]:
    results = []
    for tp, pp, dp in layouts:
        topology = Topology(tp=tp, pp=pp, dp=dp)
        groups = build_parallel_groups(topology, rank, torch.device("cpu"))
        result = {
            "rank": groups.rank,
            "coords": tuple(groups.coords),
            "sizes": (groups.tp_size, groups.pp_size, groups.dp_size),
            "ranks": {"tp": groups.tp_ranks, "dp": groups.dp_ranks, "pp": groups.pp_ranks},
            "is_none": {},
            "group_size": {},
            "sum": {},
            "first_last": (groups.is_first_stage, groups.is_last_stage),
        }
        for name in ("tp", "dp", "pp", "embedding"):
            group = getattr(groups, f"{name}_group")
            result["is_none"][name] = group is None
            result["group_size"][name] = None if group is None else dist.get_world_size(group)
            result["sum"][name] = _sum_over(group, rank)
        results.append(result)
    return results


def test_groups_reduce_over_the_topology_ranks() -> None:
    per_rank = run_distributed(_groups_worker, 8, LAYOUTS_8)
    for layout_index, (tp, pp, dp) in enumerate(LAYOUTS_8):
        topology = Topology(tp=tp, pp=pp, dp=dp)
        for rank in range(8):
            got = per_rank[rank][layout_index]
            where = (tp, pp, dp, rank)
            assert got["rank"] == rank, where
            assert got["coords"] == tuple(topology.coords(rank)), where
            assert got["sizes"] == (tp, pp, dp), where
            assert got["first_last"] == (topology.is_first_stage(rank), topology.is_last_stage(rank)), where
            expected = {
                "tp": topology.tp_group_ranks(rank),
                "dp": topology.dp_group_ranks(rank),
                "pp": topology.pp_group_ranks(rank),
            }
            for name, ranks in expected.items():
                assert got["ranks"][name] == tuple(ranks), (where, name)
                assert got["is_none"][name] == (len(ranks) == 1), (where, name)
                if len(ranks) > 1:
                    assert got["group_size"][name] == len(ranks), (where, name)
                assert got["sum"][name] == sum(ranks), (where, name, got["sum"][name], ranks)

            tied = topology.embedding_group_ranks(rank)
            if tied is None:  # a middle stage
                assert got["is_none"]["embedding"], where
                assert got["sum"]["embedding"] == rank, where
            else:
                assert got["is_none"]["embedding"] == (len(tied) == 1), where
                if len(tied) > 1:
                    assert got["group_size"]["embedding"] == len(tied), where
                assert got["sum"]["embedding"] == sum(tied), (where, got["sum"]["embedding"], tied)


def test_layouts_cover_middle_stages_and_singleton_groups() -> None:
    # Guard the test above: it must see middle stages and groups of size one in every dimension.
    middle = any(
        Topology(*layout).embedding_group_ranks(r) is None for layout in LAYOUTS_8 for r in range(8)
    )
    assert middle
    assert any(tp == 1 for tp, _, _ in LAYOUTS_8)
    assert any(pp == 1 for _, pp, _ in LAYOUTS_8)
    assert any(dp == 1 for _, _, dp in LAYOUTS_8)


def test_single_process_groups() -> None:
    groups = ParallelGroups.single()
    assert (groups.tp_size, groups.pp_size, groups.dp_size) == (1, 1, 1)
    assert (groups.tp_rank, groups.pp_rank, groups.dp_rank) == (0, 0, 0)
    assert groups.rank == 0 and groups.topology.world_size == 1
    assert groups.is_first_stage and groups.is_last_stage
    assert groups.tp_group is None and groups.dp_group is None
    assert groups.pp_group is None and groups.embedding_group is None
    assert groups.device == torch.device("cpu")
    # A world of one needs no torch.distributed either.
    built = build_parallel_groups(Topology(), 0, torch.device("cpu"))
    assert built.tp_group is None and built.is_first_stage and built.is_last_stage
    # all_reduce_ over a group of one is a no-op.
    assert all_reduce_(torch.tensor([3.0]), None).item() == 3.0


def _mismatch_worker(rank: int, world_size: int) -> str | None:
    try:
        build_parallel_groups(Topology(tp=2, pp=1, dp=2), rank, torch.device("cpu"))
    except RuntimeError as error:
        return str(error)
    return None


def test_world_size_mismatch_is_a_clear_error() -> None:
    messages = run_distributed(_mismatch_worker, 2)
    for message in messages:
        assert message is not None, "build_parallel_groups accepted a topology of 4 on 2 ranks"
        assert "torch.distributed has 2 ranks" in message
        assert "topology expects 4" in message


# ---- naming a failed collective -------------------------------------------------------------------------
class _FailingWork:
    def wait(self) -> None:
        raise RuntimeError("Connection closed by peer [127.0.0.1]:1234")


def test_a_failed_asynchronous_wait_names_what_it_waited_for() -> None:
    from megalm.distributed import describe_failed_collective, wait_for

    with pytest.raises(RuntimeError, match="Connection closed") as info:
        wait_for(_FailingWork(), lambda: "all_reduce of gradient bucket 2 over the dp group (global ranks [0, 1])")
    text = describe_failed_collective(info.value, ParallelGroups.single())
    assert text.startswith("all_reduce of gradient bucket 2 over the dp group (global ranks [0, 1]) (waited at")


def test_a_failed_blocking_collective_is_named_from_the_traceback() -> None:
    from megalm.distributed import describe_failed_collective

    assert not dist.is_initialized()
    with pytest.raises(Exception) as info:  # no process group: torch raises inside all_reduce
        dist.all_reduce(torch.zeros(1))
    text = describe_failed_collective(info.value, ParallelGroups.single())
    assert text.startswith("all_reduce over "), text


# ---- the control group: checkpoint coordination with its own timeout ----------------------------------
def _control_worker(rank: int, world_size: int) -> dict:
    import time

    groups = build_parallel_groups(
        Topology(tp=1, pp=1, dp=world_size), rank, torch.device("cpu"), timeout_s=60, control_timeout_s=1.0
    )
    control = groups.control_group
    result = {
        "backend": dist.get_backend(control),
        "size": dist.get_world_size(control),
        "sum": _sum_over(control, rank),
        "separate": control is not groups.dp_group and control is not dist.group.WORLD,
        "name": groups.describe_group(control),
    }
    # Rank 1 is 6 s late: rank 0's barrier on the control group ends after its own 1 s timeout, not
    # the dp group's 60 s, so the timeout is the control group's own.
    if rank == 1:
        time.sleep(6.0)
    start = time.monotonic()
    try:
        dist.barrier(group=control)
        result["timed_out"] = False
    except RuntimeError:
        result["timed_out"] = True
    result["waited_s"] = time.monotonic() - start
    dist.barrier(group=groups.dp_group)  # both ranks leave together (the dp group's timeout is 60 s)
    return result


def test_control_group_spans_every_rank_over_gloo_with_its_own_timeout() -> None:
    results = run_distributed(_control_worker, 2)
    for result in results:
        assert result["backend"] == "gloo" and result["size"] == 2 and result["sum"] == 0 + 1
        assert result["separate"]
        assert result["name"] == "the control group (global ranks [0, 1])"
    assert results[0]["timed_out"] and results[0]["waited_s"] < 4.5, results[0]


# ---- GPU start-up: device_id, TF32 ----------------------------------------------------------------------
def test_init_process_group_binds_the_gpu_with_device_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA, init_process_group gets device_id (eager NCCL init on this rank's GPU); on CPU it does not."""
    import megalm.distributed as distributed

    calls = []
    class Store:  # the start-up barrier's keys: every rank has arrived
        def set(self, key, value):
            pass

        def wait(self, keys, timeout):
            pass

    monkeypatch.setattr(distributed.dist, "TCPStore", lambda *a, **k: Store())
    monkeypatch.setattr(distributed.dist, "PrefixStore", lambda prefix, store: store)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed.torch.cuda, "set_device", lambda device: None)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)

    assert distributed.init_distributed(torch.device("cuda", 1), timeout_s=5) == (1, 2)
    assert calls[-1]["backend"] == "nccl" and calls[-1]["device_id"] == torch.device("cuda", 1)
    calls.clear()
    distributed.init_distributed(torch.device("cpu"), timeout_s=5)
    assert calls[-1]["backend"] == "gloo" and "device_id" not in calls[-1]


def test_tf32_is_allowed_for_fp32_runs_on_cuda_only() -> None:
    from megalm.distributed import allow_tf32

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = (matmul.fp32_precision, conv.fp32_precision)
    try:
        matmul.fp32_precision, conv.fp32_precision = "ieee", "ieee"
        assert not allow_tf32(torch.device("cpu"), "fp32")
        assert not allow_tf32(torch.device("cuda", 0), "bf16")
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        assert allow_tf32(torch.device("cuda", 0), "fp32")  # sets backend flags only: no GPU needed
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


# (tp, pp, dp, cp) over 4 ranks; the last is cp = 1, which must build no cp groups.
CP_LAYOUTS_4 = [(1, 1, 1, 4), (2, 1, 1, 2), (1, 1, 2, 2), (1, 2, 1, 2), (2, 1, 2, 1)]


def _cp_groups_worker(rank: int, world_size: int, layouts: list[tuple[int, int, int, int]]) -> list[dict]:
    results = []
    real_new_group = dist.new_group
    for tp, pp, dp, cp in layouts:
        created = []

        def counting_new_group(ranks, *args, **kwargs):  # noqa: ANN001, ANN202
            created.append(list(ranks))
            return real_new_group(ranks, *args, **kwargs)

        dist.new_group = counting_new_group
        try:
            groups = build_parallel_groups(Topology(tp=tp, pp=pp, dp=dp, cp=cp), rank, torch.device("cpu"))
        finally:
            dist.new_group = real_new_group
        results.append({
            "cp_rank": groups.cp_rank, "cp_size": groups.cp_size,
            "ranks": {"cp": groups.cp_ranks, "dp_cp": groups.dp_cp_ranks},
            "is_none": {name: getattr(groups, f"{name}_group") is None for name in ("cp", "dp_cp")},
            "sum": {name: _sum_over(getattr(groups, f"{name}_group"), rank) for name in ("cp", "dp_cp", "dp")},
            "names": [groups.group_name(getattr(groups, f"{n}_group")) for n in ("cp", "dp_cp") if cp > 1],
            "created": created,
        })  # fmt: skip
    return results


def test_cp_groups_reduce_over_the_topology_ranks() -> None:
    per_rank = run_distributed(_cp_groups_worker, 4, CP_LAYOUTS_4)
    for index, (tp, pp, dp, cp) in enumerate(CP_LAYOUTS_4):
        topology = Topology(tp=tp, pp=pp, dp=dp, cp=cp)
        for rank in range(4):
            got, where = per_rank[rank][index], (tp, pp, dp, cp, rank)
            assert (got["cp_rank"], got["cp_size"]) == (topology.coords(rank).cp, cp), where
            assert got["sum"]["dp"] == sum(topology.dp_group_ranks(rank)), where
            if cp == 1:  # nothing new: no cp groups, and exactly the process groups a 3D run creates
                assert got["is_none"] == {"cp": True, "dp_cp": True}, where
                assert got["ranks"] == {"cp": (rank,), "dp_cp": (rank,)}, where
                lists = [topology.tp_groups(), topology.dp_groups(), topology.pp_groups(), topology.embedding_groups()]
                expected = [g for groups in lists for g in groups if len(g) > 1]
                expected += [list(range(4))] + [g for g in topology.dp_groups() if len(g) > 1]  # control groups
                assert got["created"] == expected, where
                continue
            assert got["names"] == ["cp", "dp_cp"], where
            for name, ranks in (("cp", topology.cp_group_ranks(rank)), ("dp_cp", topology.dp_cp_group_ranks(rank))):
                assert got["ranks"][name] == tuple(ranks), (where, name)
                assert got["is_none"][name] == (len(ranks) == 1), (where, name)
                assert got["sum"][name] == sum(ranks), (where, name)
