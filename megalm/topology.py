"""Topology: the 3D layout (tensor x pipeline x data parallel) as pure rank arithmetic.

Rank order: tp varies fastest, then dp, then pp::

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

so a tensor-parallel group is `tp` consecutive ranks (inside one node when tp <= GPUs per node),
a data-parallel group strides by `tp`, and a pipeline group strides by `dp * tp`. Nothing here
touches torch.distributed: a unit test or `megalm plan` can build any Topology on a laptop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class TopologyError(ValueError):
    """A layout that cannot work, with a message that says what to change."""


class RankCoords(NamedTuple):
    """Coordinates of one rank in the (pp, dp, tp) grid."""

    pp: int
    dp: int
    tp: int


def _check_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise TopologyError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class Topology:
    """A frozen (tp, pp, dp) layout over `world_size` ranks; world_size defaults to tp*pp*dp."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    world_size: int = field(default=0)

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp"):
            _check_positive(name, getattr(self, name))
        product = self.tp * self.pp * self.dp
        if type(self.world_size) is int and self.world_size == 0:  # 0 means "derive"; not False/0.0
            object.__setattr__(self, "world_size", product)
        _check_positive("world_size", self.world_size)
        if self.world_size != product:
            raise TopologyError(
                f"tp x pp x dp = {self.tp} x {self.pp} x {self.dp} = {product} does not equal the "
                f"world size {self.world_size}: launch {product} processes or change the layout"
            )

    @classmethod
    def from_world_size(cls, world_size: int, tp: int = 1, pp: int = 1) -> "Topology":
        """Derive dp from the world size; error if tp * pp does not divide it."""
        _check_positive("world_size", world_size)
        _check_positive("tp", tp)
        _check_positive("pp", pp)
        if world_size % (tp * pp) != 0:
            raise TopologyError(
                f"world size {world_size} is not divisible by tp x pp = {tp} x {pp} = {tp * pp}: "
                f"launch a multiple of {tp * pp} processes or change parallel.tp / parallel.pp"
            )
        return cls(tp=tp, pp=pp, dp=world_size // (tp * pp), world_size=world_size)

    # ---- rank <-> coordinates -------------------------------------------------------------
    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise TopologyError(f"rank {rank} is outside the world of {self.world_size} ranks")

    def coords(self, rank: int) -> RankCoords:
        """(pp, dp, tp) coordinates of `rank`."""
        self._check_rank(rank)
        return RankCoords(
            pp=rank // (self.dp * self.tp),
            dp=(rank // self.tp) % self.dp,
            tp=rank % self.tp,
        )

    def rank(self, pp: int, dp: int, tp: int) -> int:
        """The rank at the given coordinates."""
        for name, value, size in (("pp", pp, self.pp), ("dp", dp, self.dp), ("tp", tp, self.tp)):
            if not 0 <= value < size:
                raise TopologyError(f"{name} coordinate {value} is outside 0..{size - 1}")
        return (pp * self.dp + dp) * self.tp + tp

    # ---- groups ----------------------------------------------------------------------------
    def tp_groups(self) -> list[list[int]]:
        """Every tensor-parallel group (consecutive ranks), in ascending order."""
        return [
            [self.rank(p, d, t) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)
        ]

    def tp_replica_groups(self, replicas: int) -> list[list[int]]:
        """Blocks of `replicas` consecutive ranks inside every tensor-parallel group: the ranks that hold copies
        of one key/value head when there are fewer key/value heads than tp ranks."""
        if replicas < 1 or self.tp % replicas != 0:
            raise TopologyError(f"{replicas} replicas do not divide tp={self.tp}")
        return [group[start : start + replicas] for group in self.tp_groups() for start in range(0, self.tp, replicas)]

    def dp_groups(self) -> list[list[int]]:
        """Every data-parallel group (ranks holding the same shard of the same stage)."""
        return [
            [self.rank(p, d, t) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)
        ]

    def pp_groups(self) -> list[list[int]]:
        """Every pipeline group (one rank per stage, in stage order)."""
        return [
            [self.rank(p, d, t) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)
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
        return (
            f"world {self.world_size} = tp {self.tp} x pp {self.pp} x dp {self.dp} "
            f"(rank = (pp*{self.dp} + dp)*{self.tp} + tp)"
        )
