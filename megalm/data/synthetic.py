"""A built-in, learnable token stream for smoke tests and benchmarks (no files needed).

Tokens follow a fixed random sparse Markov chain: each token has a few possible successors with
skewed probabilities, so a model can learn the chain and its loss falls from ln(vocab) toward the
chain's entropy (about 1.11 nats). Sample `g` depends only on (seed, g), like every source.
"""

from __future__ import annotations

import numpy as np

from megalm.data.dataset import Sample

_SUCCESSOR_PROBS = np.array([0.55, 0.25, 0.15, 0.05])


class SyntheticTokenStream:
    """Samples of seq_length + 1 tokens from a seeded sparse Markov chain."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int, stream: int = 0) -> None:
        self.vocab_size = vocab_size
        self.seq_length = seq_length
        self.seed = seed
        self.stream = stream  # 0: train, 1: valid, ...: disjoint sample streams of one chain
        table_rng = np.random.default_rng([seed, 0x5EED])
        self.successors = table_rng.integers(0, vocab_size, size=(vocab_size, len(_SUCCESSOR_PROBS)))

    def entropy(self) -> float:
        """Per-token entropy of the chain in nats: the loss a perfect model reaches."""
        return float(-(_SUCCESSOR_PROBS * np.log(_SUCCESSOR_PROBS)).sum())

    def sample(self, sample_id: int) -> Sample:
        """Tokens [seq_length + 1] of sample `sample_id`."""
        rng = np.random.default_rng([self.seed, 1, self.stream, sample_id])
        choices = rng.choice(len(_SUCCESSOR_PROBS), size=self.seq_length, p=_SUCCESSOR_PROBS)
        tokens = np.empty(self.seq_length + 1, dtype=np.int64)
        tokens[0] = rng.integers(self.vocab_size)
        for position, choice in enumerate(choices):
            tokens[position + 1] = self.successors[tokens[position], choice]
        return Sample(tokens)
