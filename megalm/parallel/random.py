"""Random streams for dropout under tensor parallelism.

Two streams live on every rank:

- the *replicated* stream is torch's default generator, seeded identically on every rank of a
  tensor-parallel group, so dropout on replicated activations (the residual stream without
  sequence parallel, the embeddings) draws the same mask on every tp rank;
- the *tp-distinct* stream is seeded differently on each tp rank and swapped in around dropout
  on split activations (attention probabilities of local heads, sequence-parallel shards), so
  each shard gets its own mask, as one full-size mask would.

Both seeds include the context-parallel rank (parallel.cp > 1): cp ranks hold different tokens of the
same samples, so each draws masks of its own, as one rank holding the whole sequence would draw
different masks for different tokens. A cp = 1 run keeps the seeds it always had.

The object is owned by the model and passed explicitly; nothing here is global state of megalm
(it does swap torch's own generator state in and out, as dropout offers no generator argument).

`recompute` is activation recompute that redraws the same dropout masks: torch's checkpoint
restores the replicated stream (the default generator) for the rerun, and the tp-distinct stream,
which lives here, is rewound to where the forward found it and put back afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.checkpoint import checkpoint

from megalm.distributed import ParallelGroups

_TP_DISTINCT_OFFSET = 2718
_CP_OFFSET = 7919  # a prime > 100 x any pipeline depth, so (stage, cp rank) pairs never share a seed


class ParallelRNG:
    """The replicated and tp-distinct random streams of one rank."""

    def __init__(self, seed: int, groups: ParallelGroups) -> None:
        self.device = groups.device
        # Keyed by pipeline stage and, with context parallelism, by cp rank: cp ranks hold different tokens of the
        # same samples, so no two of them may draw one dropout mask (cp rank 0, and every rank at cp = 1, keeps
        # the seed it always had).
        self.replicated_seed = seed + 100 * groups.pp_rank + _CP_OFFSET * groups.cp_rank
        self.distinct_seed = self.replicated_seed + _TP_DISTINCT_OFFSET + groups.tp_rank
        self._distinct_state = self._fresh_state(self.distinct_seed)

    def _get(self) -> torch.Tensor:
        if self.device.type == "cuda":
            return torch.cuda.get_rng_state(self.device)
        return torch.get_rng_state()

    def _set(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    def _fresh_state(self, seed: int) -> torch.Tensor:
        saved = self._get()
        self._seed(seed)
        fresh = self._get()
        self._set(saved)
        return fresh

    def _seed(self, seed: int) -> None:
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)

    def seed_replicated(self) -> None:
        """Seed the default generator (the replicated stream) for this rank's stage."""
        self._seed(self.replicated_seed)
        if self.device.type == "cuda":
            torch.manual_seed(self.replicated_seed)

    @contextlib.contextmanager
    def tp_distinct(self) -> Iterator[None]:
        """Run the body with the tp-distinct stream as torch's generator."""
        replicated = self._get()
        self._set(self._distinct_state)
        try:
            yield
        finally:
            self._distinct_state = self._get()
            self._set(replicated)

    def state_dict(self) -> dict:
        return {"replicated": self._get(), "tp_distinct": self._distinct_state.clone()}

    def load_state_dict(self, state: dict) -> None:
        self._set(state["replicated"])
        self._distinct_state = state["tp_distinct"].clone()


class _Rewind:
    """Run the body with the tp-distinct stream at `state`, then put back the stream's current state.

    Re-enterable (a retained graph's second backward recomputes again), unlike a generator context."""

    def __init__(self, rng: ParallelRNG, state: torch.Tensor) -> None:
        self.rng, self.state, self.current = rng, state, None

    def __enter__(self) -> None:
        self.current = self.rng._distinct_state
        self.rng._distinct_state = self.state

    def __exit__(self, *exc: object) -> None:
        self.rng._distinct_state = self.current


def recompute(function: Callable[..., Any], rng: Optional[ParallelRNG], *args: Any) -> Any:
    """function(*args), keeping only its inputs for backward and rerunning it there (activation recompute).

    The rerun draws the forward's dropout masks from both streams, and leaves both streams as it found
    them, so a recomputed model computes bit for bit what a stored one does. rng None: `function`
    draws no random numbers, so no generator state is kept or restored, and a compiled region traces
    the call (torch's plain checkpoint) instead of breaking its graph there."""
    if rng is None:
        return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=False)
    state = rng._distinct_state  # never mutated in place: tp_distinct() replaces it by a new tensor
    return checkpoint(
        function, *args, use_reentrant=False, preserve_rng_state=True,
        context_fn=lambda: (contextlib.nullcontext(), _Rewind(rng, state)),
    )
