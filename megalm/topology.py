"""Topology: the layout (tensor x context x data x pipeline parallel) as pure rank arithmetic.

Rank order: tp varies fastest, then cp, then dp, then pp (Megatron-Core's default tp-cp-dp-pp)::

    rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank

so a tensor-parallel group is `tp` consecutive ranks (inside one node when tp <= GPUs per node),
a context-parallel group strides by `tp` (next to it: its key/value exchange is the heavier one),
a data-parallel group strides by `cp * tp`, and a pipeline group strides by `dp * cp * tp`. The
ranks that reduce gradients and shard ZeRO-1 together are the dp x cp group (same tp and pp
coordinates): context-parallel ranks hold the same weights and different tokens of the same samples.
With cp = 1 (the default) every rank, coordinate and group is that of the 3D layout
rank = (pp_rank * dp + dp_rank) * tp + tp_rank. Nothing here touches torch.distributed: a unit test
or `megalm plan` can build any Topology on a laptop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class TopologyError(ValueError):
    """A layout that cannot work, with a message that says what to change."""


class _PpDpTp(NamedTuple):
    pp: int
    dp: int
    tp: int


class RankCoords(_PpDpTp):
    """Coordinates of one rank: the (pp, dp, tp) triple (as a tuple, as before cp existed) plus `cp`.

    The tuple part stays three long so that code written for the 3D grid unpacks it unchanged; `cp`
    (0 when there is no context parallelism) is an attribute that takes part in ==, hash and repr.
    `Topology.rank(*coords)` refuses to guess a missing cp coordinate when cp > 1.
    """

    cp: int = 0  # class default: also what _make (which bypasses __new__) gives

    def __new__(cls, pp: int, dp: int, tp: int, cp: int = 0) -> "RankCoords":
        self = super().__new__(cls, pp, dp, tp)
        if cp:
            object.__setattr__(self, "cp", cp)
        return self

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"RankCoords is immutable: cannot set {name}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, tuple):
            return NotImplemented
        return tuple.__eq__(self, other) and self.cp == getattr(other, "cp", 0)

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return hash((tuple(self), self.cp))

    def __repr__(self) -> str:
        extra = f", cp={self.cp}" if self.cp else ""
        return f"RankCoords(pp={self.pp}, dp={self.dp}, tp={self.tp}{extra})"

    def _replace(self, **changes: int) -> "RankCoords":
        values = {"pp": self.pp, "dp": self.dp, "tp": self.tp, "cp": self.cp, **changes}
        return RankCoords(**values)

    def _asdict(self) -> dict[str, int]:
        return {"pp": self.pp, "dp": self.dp, "tp": self.tp, "cp": self.cp}


def _check_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise TopologyError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class Topology:
    """A frozen (tp, pp, dp, cp) layout over `world_size` ranks; world_size defaults to tp*pp*dp*cp."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    world_size: int = field(default=0)
    cp: int = field(default=1, kw_only=True)  # keyword-only: Topology(tp, pp, dp, world_size) stays positional

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "cp"):
            _check_positive(name, getattr(self, name))
        product = self.tp * self.pp * self.dp * self.cp
        if type(self.world_size) is int and self.world_size == 0:  # 0 means "derive"; not False/0.0
            object.__setattr__(self, "world_size", product)
        _check_positive("world_size", self.world_size)
        if self.world_size != product:
            if self.cp == 1:
                layout = f"tp x pp x dp = {self.tp} x {self.pp} x {self.dp}"
            else:
                layout = f"tp x cp x pp x dp = {self.tp} x {self.cp} x {self.pp} x {self.dp}"
            raise TopologyError(
                f"{layout} = {product} does not equal the world size {self.world_size}: "
                f"launch {product} processes or change the layout"
            )

    @classmethod
    def from_world_size(cls, world_size: int, tp: int = 1, pp: int = 1, cp: int = 1) -> "Topology":
        """Derive dp from the world size; error if tp * pp * cp does not divide it."""
        _check_positive("world_size", world_size)
        _check_positive("tp", tp)
        _check_positive("pp", pp)
        _check_positive("cp", cp)
        if world_size % (tp * pp * cp) != 0:
            if cp == 1:
                layout, knobs = f"tp x pp = {tp} x {pp}", "parallel.tp / parallel.pp"
            else:
                layout, knobs = f"tp x pp x cp = {tp} x {pp} x {cp}", "parallel.tp / parallel.pp / parallel.cp"
            raise TopologyError(
                f"world size {world_size} is not divisible by {layout} = {tp * pp * cp}: "
                f"launch a multiple of {tp * pp * cp} processes or change {knobs}"
            )
        return cls(tp=tp, pp=pp, dp=world_size // (tp * pp * cp), world_size=world_size, cp=cp)

    # ---- rank <-> coordinates -------------------------------------------------------------
    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise TopologyError(f"rank {rank} is outside the world of {self.world_size} ranks")

    def coords(self, rank: int) -> RankCoords:
        """(pp, dp, tp) coordinates of `rank`, and its cp coordinate as `.cp`."""
        self._check_rank(rank)
        return RankCoords(
            pp=rank // (self.dp * self.cp * self.tp),
            dp=(rank // (self.cp * self.tp)) % self.dp,
            tp=rank % self.tp,
            cp=(rank // self.tp) % self.cp,
        )

    def rank(self, pp: int, dp: int, tp: int, cp: int | None = None) -> int:
        """The rank at the given coordinates (cp may be left out only when cp = 1)."""
        if cp is None:
            if self.cp > 1:
                raise TopologyError(
                    f"the cp coordinate is needed with cp={self.cp}: pass cp= (e.g. rank(pp, dp, tp, cp=coords.cp))"
                )
            cp = 0
        for name, value, size in (
            ("pp", pp, self.pp), ("dp", dp, self.dp), ("tp", tp, self.tp), ("cp", cp, self.cp)
        ):  # fmt: skip
            if not 0 <= value < size:
                raise TopologyError(f"{name} coordinate {value} is outside 0..{size - 1}")
        return ((pp * self.dp + dp) * self.cp + cp) * self.tp + tp

    # ---- groups ----------------------------------------------------------------------------
    def tp_groups(self) -> list[list[int]]:
        """Every tensor-parallel group (consecutive ranks), in ascending order."""
        return [
            [self.rank(p, d, t, c) for t in range(self.tp)]
            for p in range(self.pp)
            for d in range(self.dp)
            for c in range(self.cp)
        ]

    def tp_replica_groups(self, replicas: int) -> list[list[int]]:
        """Blocks of `replicas` consecutive ranks inside every tensor-parallel group: the ranks that hold copies
        of one key/value head when there are fewer key/value heads than tp ranks."""
        if replicas < 1 or self.tp % replicas != 0:
            raise TopologyError(f"{replicas} replicas do not divide tp={self.tp}")
        return [group[start : start + replicas] for group in self.tp_groups() for start in range(0, self.tp, replicas)]

    def cp_groups(self) -> list[list[int]]:
        """Every context-parallel group (the ranks that split the same samples' sequences), in cp order."""
        return [
            [self.rank(p, d, t, c) for c in range(self.cp)]
            for p in range(self.pp)
            for d in range(self.dp)
            for t in range(self.tp)
        ]

    def dp_groups(self) -> list[list[int]]:
        """Every data-parallel group (ranks holding the same shard of the same stage and the same cp chunks)."""
        return [
            [self.rank(p, d, t, c) for d in range(self.dp)]
            for p in range(self.pp)
            for c in range(self.cp)
            for t in range(self.tp)
        ]

    def dp_cp_groups(self) -> list[list[int]]:
        """Every dp x cp group: same tp and pp coordinates, so the same weights; the ranks that reduce
        gradients and shard ZeRO-1 together. Ascending ranks (dp-major, cp-minor); the dp groups at cp = 1."""
        return [
            [self.rank(p, d, t, c) for d in range(self.dp) for c in range(self.cp)]
            for p in range(self.pp)
            for t in range(self.tp)
        ]

    def pp_groups(self) -> list[list[int]]:
        """Every pipeline group (one rank per stage, in stage order)."""
        return [
            [self.rank(p, d, t, c) for p in range(self.pp)]
            for d in range(self.dp)
            for c in range(self.cp)
            for t in range(self.tp)
        ]

    def embedding_groups(self) -> list[list[int]]:
        """Groups that tie the input and output embeddings: first and last stage of each pipeline."""
        return [[group[0], group[-1]] if self.pp > 1 else [group[0]] for group in self.pp_groups()]

    def _group_of(self, groups: list[list[int]], rank: int) -> list[int]:
        self._check_rank(rank)
        return next(group for group in groups if rank in group)

    def tp_group_ranks(self, rank: int) -> list[int]:
        """The tensor-parallel group containing `rank`."""
        return self._group_of(self.tp_groups(), rank)

    def dp_group_ranks(self, rank: int) -> list[int]:
        """The data-parallel group containing `rank`."""
        return self._group_of(self.dp_groups(), rank)

    def cp_group_ranks(self, rank: int) -> list[int]:
        """The context-parallel group containing `rank`."""
        return self._group_of(self.cp_groups(), rank)

    def dp_cp_group_ranks(self, rank: int) -> list[int]:
        """The dp x cp (gradient-reduction) group containing `rank`."""
        return self._group_of(self.dp_cp_groups(), rank)

    def pp_group_ranks(self, rank: int) -> list[int]:
        """The pipeline group containing `rank`."""
        return self._group_of(self.pp_groups(), rank)

    def embedding_group_ranks(self, rank: int) -> list[int] | None:
        """The embedding-tie group of `rank`, or None for a rank on a middle stage."""
        if not (self.is_first_stage(rank) or self.is_last_stage(rank)):
            return None
        return self._group_of(self.embedding_groups(), rank)

    def is_first_stage(self, rank: int) -> bool:
        return self.coords(rank).pp == 0

    def is_last_stage(self, rank: int) -> bool:
        return self.coords(rank).pp == self.pp - 1

    def stage_layers(self, num_layers: int, pp_rank: int) -> range:
        """Global indices of the transformer layers on stage `pp_rank` (uniform split)."""
        if not 0 <= pp_rank < self.pp:
            raise TopologyError(f"pipeline stage {pp_rank} is outside 0..{self.pp - 1}")
        if num_layers % self.pp != 0:
            raise TopologyError(
                f"{num_layers} layers do not split evenly over pp={self.pp} stages: "
                f"choose pp dividing {num_layers}"
            )
        per_stage = num_layers // self.pp
        return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)

    def describe(self) -> str:
        """One line for logs: the layout and what each dimension means."""
        if self.cp == 1:
            return (
                f"world {self.world_size} = tp {self.tp} x pp {self.pp} x dp {self.dp} "
                f"(rank = (pp*{self.dp} + dp)*{self.tp} + tp)"
            )
        return (
            f"world {self.world_size} = tp {self.tp} x cp {self.cp} x pp {self.pp} x dp {self.dp} "
            f"(rank = ((pp*{self.dp} + dp)*{self.cp} + cp)*{self.tp} + tp)"
        )
