"""Topology: rank arithmetic, group partitions and validation for every layout of 1..16 ranks.

The documented order is rank = (pp * dp + dp_rank) * tp + tp_rank: tp varies fastest, then dp,
then pp. Everything here is pure arithmetic; no torch.distributed is started.
"""

from __future__ import annotations

import dataclasses

import pytest

from megalm.topology import RankCoords, Topology, TopologyError


def all_layouts(max_world: int = 16) -> list[tuple[int, int, int]]:
    """Every (tp, pp, dp) with tp * pp * dp = world for world in 1..max_world."""
    layouts = []
    for world in range(1, max_world + 1):
        for tp in range(1, world + 1):
            for pp in range(1, world // tp + 1):
                if world % (tp * pp) == 0:
                    layouts.append((tp, pp, world // (tp * pp)))
    return layouts


LAYOUTS = all_layouts()
LAYOUT_IDS = [f"tp{tp}-pp{pp}-dp{dp}" for tp, pp, dp in LAYOUTS]


@pytest.fixture(params=LAYOUTS, ids=LAYOUT_IDS)
def topology(request: pytest.FixtureRequest) -> Topology:
    tp, pp, dp = request.param
    return Topology(tp=tp, pp=pp, dp=dp)


def _assert_partition(groups: list[list[int]], world: int, group_size: int) -> None:
    assert len(groups) == world // group_size
    assert all(len(group) == group_size for group in groups)
    flat = [rank for group in groups for rank in group]
    assert sorted(flat) == list(range(world)), "every rank exactly once"


def test_layout_enumeration_is_complete() -> None:
    # Sanity of the parametrisation itself: 16 has 15 ordered factorisations into three factors.
    assert sum(1 for tp, pp, dp in LAYOUTS if tp * pp * dp == 16) == 15
    assert {tp * pp * dp for tp, pp, dp in LAYOUTS} == set(range(1, 17))


# ---- rank <-> coordinates ------------------------------------------------------------------


def test_world_size_defaults_to_product(topology: Topology) -> None:
    assert topology.world_size == topology.tp * topology.pp * topology.dp


def test_rank_coords_round_trip(topology: Topology) -> None:
    seen = set()
    for rank in range(topology.world_size):
        coords = topology.coords(rank)
        assert isinstance(coords, RankCoords)
        assert 0 <= coords.pp < topology.pp and 0 <= coords.dp < topology.dp and 0 <= coords.tp < topology.tp
        assert topology.rank(*coords) == rank
        assert topology.rank(pp=coords.pp, dp=coords.dp, tp=coords.tp) == rank
        # The documented formula.
        assert rank == (coords.pp * topology.dp + coords.dp) * topology.tp + coords.tp
        seen.add(coords)
    assert len(seen) == topology.world_size


def test_coords_rank_round_trip(topology: Topology) -> None:
    ranks = []
    for pp in range(topology.pp):
        for dp in range(topology.dp):
            for tp in range(topology.tp):
                rank = topology.rank(pp, dp, tp)
                assert topology.coords(rank) == RankCoords(pp=pp, dp=dp, tp=tp)
                ranks.append(rank)
    # Iterating pp, dp, tp in nesting order walks the ranks in order: tp fastest, then dp, then pp.
    assert ranks == list(range(topology.world_size))


def test_documented_order_concrete_example() -> None:
    topo = Topology(tp=2, pp=2, dp=2)
    assert topo.coords(5) == RankCoords(pp=1, dp=0, tp=1)
    assert topo.rank(pp=1, dp=0, tp=1) == 5
    assert [tuple(topo.coords(r)) for r in range(8)] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1),
        (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1),
    ]  # fmt: skip
    assert topo.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert topo.dp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert topo.pp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert topo.embedding_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]

    topo = Topology(tp=2, pp=4, dp=2)
    assert topo.coords(13) == RankCoords(pp=3, dp=0, tp=1)
    assert topo.pp_group_ranks(13) == [1, 5, 9, 13]
    assert topo.embedding_group_ranks(13) == [1, 13]
    assert topo.embedding_group_ranks(5) is None
    assert topo.dp_group_ranks(13) == [13, 15]
    assert topo.tp_group_ranks(13) == [12, 13]


# ---- groups ----------------------------------------------------------------------------------


def test_groups_partition_the_world(topology: Topology) -> None:
    world = topology.world_size
    _assert_partition(topology.tp_groups(), world, topology.tp)
    _assert_partition(topology.dp_groups(), world, topology.dp)
    _assert_partition(topology.pp_groups(), world, topology.pp)


def test_tp_groups_are_consecutive_ranks(topology: Topology) -> None:
    for group in topology.tp_groups():
        assert group == list(range(group[0], group[0] + topology.tp))
        assert group[0] % topology.tp == 0


def test_group_of_rank_matches_coords(topology: Topology) -> None:
    for rank in range(topology.world_size):
        me = topology.coords(rank)

        tp_group = topology.tp_group_ranks(rank)
        assert rank in tp_group and len(tp_group) == topology.tp
        assert tp_group in topology.tp_groups()
        assert [topology.coords(r).tp for r in tp_group] == list(range(topology.tp))
        assert all(topology.coords(r)[:2] == (me.pp, me.dp) for r in tp_group)

        dp_group = topology.dp_group_ranks(rank)
        assert rank in dp_group and len(dp_group) == topology.dp
        assert dp_group in topology.dp_groups()
        assert [topology.coords(r).dp for r in dp_group] == list(range(topology.dp))
        assert all((topology.coords(r).pp, topology.coords(r).tp) == (me.pp, me.tp) for r in dp_group)

        pp_group = topology.pp_group_ranks(rank)
        assert rank in pp_group and len(pp_group) == topology.pp
        assert pp_group in topology.pp_groups()
        # Stage order: the i-th member is on stage i.
        assert [topology.coords(r).pp for r in pp_group] == list(range(topology.pp))
        assert all(topology.coords(r)[1:] == (me.dp, me.tp) for r in pp_group)


def test_embedding_groups(topology: Topology) -> None:
    groups = topology.embedding_groups()
    assert len(groups) == topology.dp * topology.tp
    for group, pp_group in zip(groups, topology.pp_groups()):
        if topology.pp == 1:
            assert group == [pp_group[0]]
        else:
            assert group == [pp_group[0], pp_group[-1]]
    for rank in range(topology.world_size):
        stage = topology.coords(rank).pp
        first, last = stage == 0, stage == topology.pp - 1
        assert topology.is_first_stage(rank) is first
        assert topology.is_last_stage(rank) is last
        tied = topology.embedding_group_ranks(rank)
        if first or last:
            pp_group = topology.pp_group_ranks(rank)
            expected = [pp_group[0], pp_group[-1]] if topology.pp > 1 else [rank]
            assert tied == expected
            assert rank in tied
        else:
            assert tied is None


# ---- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "world, tp, pp, dp",
    [(1, 1, 1, 1), (8, 2, 2, 2), (8, 8, 1, 1), (12, 3, 2, 2), (16, 1, 4, 4), (6, 1, 1, 6)],
)
def test_from_world_size_derives_dp(world: int, tp: int, pp: int, dp: int) -> None:
    topo = Topology.from_world_size(world, tp=tp, pp=pp)
    assert topo == Topology(tp=tp, pp=pp, dp=dp)
    assert topo.world_size == world


def test_from_world_size_defaults_to_pure_data_parallel() -> None:
    assert Topology.from_world_size(5) == Topology(tp=1, pp=1, dp=5)


@pytest.mark.parametrize("world, tp, pp", [(8, 3, 1), (6, 4, 1), (12, 5, 1), (8, 2, 3), (2, 4, 1)])
def test_from_world_size_rejects_indivisible(world: int, tp: int, pp: int) -> None:
    with pytest.raises(TopologyError, match=rf"world size {world} is not divisible by tp x pp") as info:
        Topology.from_world_size(world, tp=tp, pp=pp)
    message = str(info.value)
    assert f"= {tp * pp}" in message
    assert "parallel.tp" in message  # names the fix


def test_topology_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        Topology.from_world_size(8, tp=3)


def test_world_size_zero_means_derive() -> None:
    assert Topology(tp=2, pp=3, dp=1, world_size=0).world_size == 6


def test_explicit_world_size_mismatch() -> None:
    with pytest.raises(TopologyError, match=r"2 x 2 x 2 = 8 does not equal the world size 16"):
        Topology(tp=2, pp=2, dp=2, world_size=16)
    with pytest.raises(TopologyError, match=r"launch 4 processes"):
        Topology(tp=2, pp=1, dp=2, world_size=3)
    assert Topology(tp=2, pp=2, dp=2, world_size=8) == Topology(tp=2, pp=2, dp=2)


BAD_SIZES = [0, -1, -4, 2.0, 1.5, 0.0, "2", None, True, False]
# world_size=0 (the int) is the documented "derive from tp*pp*dp" default, so it is not bad there.
BAD_SIZE_CASES = [
    (name, bad)
    for name in ("tp", "pp", "dp", "world_size")
    for bad in BAD_SIZES
    if not (name == "world_size" and type(bad) is int and bad == 0)
]


@pytest.mark.parametrize("name, bad", BAD_SIZE_CASES)
def test_bad_sizes_are_rejected(name: str, bad: object) -> None:
    kwargs: dict = {"tp": 1, "pp": 1, "dp": 1}
    kwargs[name] = bad
    with pytest.raises(TopologyError, match=rf"{name} must be a positive integer, got {bad!r}"):
        Topology(**kwargs)


@pytest.mark.parametrize("bad", [0, -2, 2.0, "4", True])
def test_from_world_size_rejects_bad_sizes(bad: object) -> None:
    with pytest.raises(TopologyError, match="world_size must be a positive integer"):
        Topology.from_world_size(bad)  # type: ignore[arg-type]
    with pytest.raises(TopologyError, match="tp must be a positive integer"):
        Topology.from_world_size(4, tp=bad)  # type: ignore[arg-type]
    with pytest.raises(TopologyError, match="pp must be a positive integer"):
        Topology.from_world_size(4, pp=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad_rank", [-1, 8, 9, 100])
def test_rank_out_of_range(bad_rank: int) -> None:
    topo = Topology(tp=2, pp=2, dp=2)
    for query in (
        topo.coords,
        topo.tp_group_ranks,
        topo.dp_group_ranks,
        topo.pp_group_ranks,
        topo.embedding_group_ranks,
        topo.is_first_stage,
        topo.is_last_stage,
    ):
        with pytest.raises(TopologyError, match=rf"rank {bad_rank} is outside the world of 8 ranks"):
            query(bad_rank)


@pytest.mark.parametrize(
    "coords, name",
    [((2, 0, 0), "pp"), ((0, 3, 0), "dp"), ((0, 0, 2), "tp"), ((-1, 0, 0), "pp"), ((0, 0, -1), "tp")],
)
def test_coordinates_out_of_range(coords: tuple[int, int, int], name: str) -> None:
    topo = Topology(tp=2, pp=2, dp=3)
    with pytest.raises(TopologyError, match=rf"{name} coordinate -?\d+ is outside 0\.\.\d+"):
        topo.rank(*coords)


# ---- stage layers ------------------------------------------------------------------------------


@pytest.mark.parametrize("pp, num_layers", [(1, 1), (1, 7), (2, 4), (3, 12), (4, 8), (8, 96)])
def test_stage_layers_split_evenly(pp: int, num_layers: int) -> None:
    topo = Topology(pp=pp)
    per_stage = num_layers // pp
    stages = [topo.stage_layers(num_layers, stage) for stage in range(pp)]
    assert all(len(layers) == per_stage for layers in stages)
    assert [i for layers in stages for i in layers] == list(range(num_layers))
    assert stages[0][0] == 0 and stages[-1][-1] == num_layers - 1


@pytest.mark.parametrize("pp, num_layers", [(2, 3), (3, 4), (4, 6), (8, 12)])
def test_stage_layers_rejects_uneven_split(pp: int, num_layers: int) -> None:
    topo = Topology(pp=pp)
    with pytest.raises(TopologyError, match=rf"{num_layers} layers do not split evenly over pp={pp} stages"):
        topo.stage_layers(num_layers, 0)


# ---- value semantics ---------------------------------------------------------------------------


def test_topology_is_frozen() -> None:
    topo = Topology(tp=2, pp=2, dp=2)
    for name in ("tp", "pp", "dp", "world_size"):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(topo, name, 4)
    assert (topo.tp, topo.pp, topo.dp, topo.world_size) == (2, 2, 2, 8)


def test_topology_is_hashable_and_equal_by_value() -> None:
    a = Topology(tp=2, pp=2, dp=2)
    b = Topology.from_world_size(8, tp=2, pp=2)
    c = Topology(tp=2, pp=2, dp=2, world_size=8)
    assert a == b == c
    assert hash(a) == hash(b) == hash(c)
    assert len({a, b, c}) == 1
    assert a != Topology(tp=2, pp=1, dp=4)
    assert a != Topology(tp=4, pp=2, dp=1)
    assert {a: "x"}[Topology(2, 2, 2)] == "x"


def test_describe_names_the_layout() -> None:
    text = Topology(tp=2, pp=4, dp=3).describe()
    assert "world 24" in text and "tp 2" in text and "pp 4" in text and "dp 3" in text


# ---- context parallelism ---------------------------------------------------------------------
# Documented order with cp: tp fastest, then cp, then dp, then pp (Megatron-Core's tp-cp-dp-pp):
# rank = ((pp * dp + dp_rank) * cp + cp_rank) * tp + tp_rank.


def cp_layouts(max_world: int = 16) -> list[tuple[int, int, int, int]]:
    """Every (tp, cp, pp, dp) with cp > 1 and tp * cp * pp * dp <= max_world."""
    return [
        (tp, cp, pp, dp)
        for tp, pp, dp in all_layouts(max_world // 2)
        for cp in range(2, max_world // (tp * pp * dp) + 1)
    ]


CP_LAYOUTS = cp_layouts()


@pytest.fixture(params=CP_LAYOUTS, ids=[f"tp{t}-cp{c}-pp{p}-dp{d}" for t, c, p, d in CP_LAYOUTS])
def cp_topology(request: pytest.FixtureRequest) -> Topology:
    tp, cp, pp, dp = request.param
    return Topology(tp=tp, pp=pp, dp=dp, cp=cp)


def test_cp_layouts_cover_every_dimension() -> None:
    assert len(CP_LAYOUTS) > 40
    assert {c for _, c, _, _ in CP_LAYOUTS} == set(range(2, 17))
    assert (2, 2, 2, 2) in CP_LAYOUTS and (1, 16, 1, 1) in CP_LAYOUTS


def test_cp_rank_order_formula_and_round_trip(cp_topology: Topology) -> None:
    t = cp_topology
    assert t.world_size == t.tp * t.cp * t.pp * t.dp
    seen, walked = set(), []
    for pp in range(t.pp):
        for dp in range(t.dp):
            for cp in range(t.cp):
                for tp in range(t.tp):
                    rank = t.rank(pp, dp, tp, cp=cp)
                    assert rank == ((pp * t.dp + dp) * t.cp + cp) * t.tp + tp  # the documented formula
                    coords = t.coords(rank)
                    assert coords == RankCoords(pp=pp, dp=dp, tp=tp, cp=cp)
                    assert (coords.pp, coords.dp, coords.tp, coords.cp) == (pp, dp, tp, cp)
                    assert t.rank(*coords, cp=coords.cp) == rank
                    seen.add(coords)
                    walked.append(rank)
    # Nesting pp, dp, cp, tp walks the ranks in order: tp fastest, then cp, then dp, then pp.
    assert walked == list(range(t.world_size))
    assert len(seen) == t.world_size  # cp takes part in equality and hashing


def test_cp_groups_partition_the_world_and_match_coords(cp_topology: Topology) -> None:
    t = cp_topology
    world = t.world_size
    for groups, size in (
        (t.tp_groups(), t.tp), (t.cp_groups(), t.cp), (t.dp_groups(), t.dp),
        (t.pp_groups(), t.pp), (t.dp_cp_groups(), t.dp * t.cp),
    ):  # fmt: skip
        _assert_partition(groups, world, size)
    for rank in range(world):
        me = t.coords(rank)
        others = {
            "tp": t.tp_group_ranks(rank), "cp": t.cp_group_ranks(rank), "dp": t.dp_group_ranks(rank),
            "pp": t.pp_group_ranks(rank), "dp_cp": t.dp_cp_group_ranks(rank),
        }  # fmt: skip
        for name, group in others.items():
            assert rank in group
            # Members differ from this rank only in the group's own coordinates.
            fixed = {"tp", "cp", "dp", "pp"} - set(name.split("_"))
            for other in group:
                c = t.coords(other)
                assert all(getattr(c, dim) == getattr(me, dim) for dim in fixed), (name, rank, other)
        assert [t.coords(r).cp for r in others["cp"]] == list(range(t.cp))
        assert [t.coords(r).pp for r in others["pp"]] == list(range(t.pp))
        assert others["dp_cp"] == sorted(others["dp_cp"])
        assert set(others["dp_cp"]) == {r for d in t.dp_group_ranks(rank) for r in t.cp_group_ranks(d)}
    for group in t.tp_groups():
        assert group == list(range(group[0], group[0] + t.tp))


def test_cp_concrete_example() -> None:
    topo = Topology(tp=2, pp=2, dp=2, cp=2)
    assert topo.world_size == 16
    assert topo.coords(6) == RankCoords(pp=0, dp=1, tp=0, cp=1)
    assert topo.rank(pp=1, dp=1, tp=1, cp=1) == 15
    assert topo.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert topo.cp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert topo.dp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]]
    assert topo.dp_cp_groups() == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert topo.pp_groups() == [[0, 8], [1, 9], [2, 10], [3, 11], [4, 12], [5, 13], [6, 14], [7, 15]]
    assert topo.embedding_group_ranks(14) == [6, 14]
    assert Topology(cp=4).cp_groups() == [[0, 1, 2, 3]] == Topology(cp=4).dp_cp_groups()
    assert Topology(cp=4).dp_groups() == [[0], [1], [2], [3]]


def test_cp_one_is_the_3d_layout(topology: Topology) -> None:
    # cp=1 (the default) changes no rank, coordinate or group; cp and dp_cp groups are singletons / dp groups.
    explicit = Topology(tp=topology.tp, pp=topology.pp, dp=topology.dp, cp=1)
    assert explicit == topology and hash(explicit) == hash(topology) and topology.cp == 1
    assert topology.cp_groups() == [[r] for r in range(topology.world_size)]
    assert topology.dp_cp_groups() == topology.dp_groups()
    for rank in range(topology.world_size):
        coords = topology.coords(rank)
        assert coords.cp == 0 and len(coords) == 3 and coords == tuple(coords)
        assert topology.rank(*coords) == topology.rank(*coords, cp=0) == rank
    assert "cp" not in topology.describe()


def test_cp_value_semantics() -> None:
    a = Topology(tp=2, pp=1, dp=2, cp=2)
    assert a != Topology(tp=2, pp=1, dp=4) and a == Topology.from_world_size(8, tp=2, cp=2)
    assert len({a, Topology(tp=2, pp=1, dp=4)}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.cp = 1  # type: ignore[misc]
    coords = a.coords(3)
    assert coords == RankCoords(0, 0, 1, cp=1) != RankCoords(0, 0, 1) and coords != (0, 0, 1)
    assert coords._replace(tp=0) == RankCoords(0, 0, 0, cp=1) and coords._asdict()["cp"] == 1
    assert repr(coords) == "RankCoords(pp=0, dp=0, tp=1, cp=1)"
    with pytest.raises(AttributeError, match="immutable"):
        coords.cp = 0  # type: ignore[misc]
    text = Topology(tp=2, pp=2, dp=3, cp=4).describe()
    assert "world 48" in text and "cp 4" in text and "((pp*3 + dp)*4 + cp)*2 + tp" in text


def test_cp_validation() -> None:
    for bad in (0, -2, 2.0, "2", None, True):
        with pytest.raises(TopologyError, match=rf"cp must be a positive integer, got {bad!r}"):
            Topology(cp=bad)  # type: ignore[arg-type]
        with pytest.raises(TopologyError, match="cp must be a positive integer"):
            Topology.from_world_size(8, cp=bad)  # type: ignore[arg-type]
    with pytest.raises(TopologyError, match=r"tp x cp x pp x dp = 2 x 2 x 1 x 2 = 8 does not equal the world size 4"):
        Topology(tp=2, pp=1, dp=2, world_size=4, cp=2)
    with pytest.raises(TopologyError, match=r"world size 12 is not divisible by tp x pp x cp = 1 x 1 x 8 = 8"):
        Topology.from_world_size(12, cp=8)
    topo = Topology(tp=2, pp=1, dp=1, cp=2)
    with pytest.raises(TopologyError, match=r"cp coordinate is needed with cp=2"):
        topo.rank(0, 0, 1)
    with pytest.raises(TopologyError, match=r"cp coordinate 2 is outside 0\.\.1"):
        topo.rank(0, 0, 1, cp=2)
    with pytest.raises(TopologyError, match=r"rank 4 is outside the world of 4 ranks"):
        topo.cp_group_ranks(4)
    with pytest.raises(TypeError):
        Topology(1, 1, 1, 1, 2)  # type: ignore[misc]  # cp is keyword-only
