"""A built-in, learnable token stream for smoke tests and benchmarks (no files needed).

Tokens follow a fixed random sparse Markov chain: each token has `branching` possible successors
with skewed probabilities, so a model can learn the chain and its loss falls from ln(vocab) toward
the chain's entropy (about 1.1 nats with the defaults). Sample `i` depends only on (seed, i), so
any data-parallel rank can produce its share of any global batch, and a batch is the same at any
layout.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from megalm.config import Config
from megalm.data.batch import Batch, prefix_loss_mask

_SUCCESSOR_PROBS = np.array([0.55, 0.25, 0.15, 0.05])


class SyntheticTokenStream:
    """Samples of seq_length + 1 tokens from a seeded sparse Markov chain."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int) -> None:
        self.vocab_size = vocab_size
        self.seq_length = seq_length
        self.seed = seed
        table_rng = np.random.default_rng([seed, 0x5EED])
        self.successors = table_rng.integers(0, vocab_size, size=(vocab_size, len(_SUCCESSOR_PROBS)))

    def entropy(self) -> float:
        """Per-token entropy of the chain in nats: the loss a perfect model reaches."""
        return float(-(_SUCCESSOR_PROBS * np.log(_SUCCESSOR_PROBS)).sum())

    def sample(self, index: int) -> np.ndarray:
        """Tokens [seq_length + 1] of sample `index`."""
        rng = np.random.default_rng([self.seed, 1, index])
        choices = rng.choice(len(_SUCCESSOR_PROBS), size=self.seq_length, p=_SUCCESSOR_PROBS)
        tokens = np.empty(self.seq_length + 1, dtype=np.int64)
        tokens[0] = rng.integers(self.vocab_size)
        for position, choice in enumerate(choices):
            tokens[position + 1] = self.successors[tokens[position], choice]
        return tokens

    def prefix_length(self, index: int, low: float, high: float) -> int:
        """PrefixLM: the prefix length of sample `index`, uniform in [low, high] x seq_length."""
        rng = np.random.default_rng([self.seed, 2, index])
        shortest = max(1, math.ceil(low * self.seq_length))
        longest = max(shortest, math.floor(high * self.seq_length))
        return int(rng.integers(shortest, longest + 1))


class SyntheticBatches:
    """This data-parallel rank's micro-batches of each global batch of the synthetic stream."""

    def __init__(self, config: Config, dp_rank: int, dp_size: int) -> None:
        train = config.train
        self.stream = SyntheticTokenStream(config.model.vocab_size, config.model.seq_length, train.seed)
        self.prefixlm = config.model.family == "prefixlm"
        self.prefix_range = (config.data.prefix_fraction_min, config.data.prefix_fraction_max)
        self.global_batch_size = train.global_batch_size
        self.micro_batch_size = train.micro_batch_size
        self.per_rank = train.global_batch_size // dp_size
        self.dp_rank = dp_rank

    def micro_batches(self, step: int) -> list[Batch]:
        """The micro-batches this rank trains on at `step` (samples step*G + rank's slice)."""
        first = step * self.global_batch_size + self.dp_rank * self.per_rank
        indices = range(first, first + self.per_rank)
        return [
            self._batch(indices[start : start + self.micro_batch_size])
            for start in range(0, self.per_rank, self.micro_batch_size)
        ]

    def _batch(self, indices: range) -> Batch:
        tokens = torch.from_numpy(np.stack([self.stream.sample(i) for i in indices]))
        seq = self.stream.seq_length
        if not self.prefixlm:
            return Batch(tokens[:, :-1], tokens[:, 1:], torch.ones(len(indices), seq))
        prefix = torch.tensor([self.stream.prefix_length(i, *self.prefix_range) for i in indices])
        return Batch(tokens[:, :-1], tokens[:, 1:], prefix_loss_mask(prefix, seq), prefix)
