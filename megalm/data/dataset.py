"""Sample sources: fixed-length GPT samples over token files, weighted blends, JSONL pairs.

A *source* maps a sample id g = 0, 1, 2, ... to one training sample: `seq_length + 1` tokens, and
optionally a loss mask and a PrefixLM prefix length. Every source is a pure function of
(seed, files, split, sequence length) and g: the order never depends on how many samples the
run will take, on the data-parallel size or on where a run resumed, so nothing needs caching
on disk and every node computes the same index by itself (no shared filesystem, no locks).

GPT samples (`DocumentSamples`): each epoch concatenates the split's documents in a seeded
random order (each already ends with eos), cuts the stream into samples of seq_length + 1 tokens
that overlap by one token (the last input's label is the next sample's first input), drops the
incomplete tail, and visits the epoch's samples in a seeded random order.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, Sequence

import numpy as np

from megalm.data.indexed import IndexedDataset


@dataclass
class Sample:
    """One sample: tokens [seq + 1]; loss_mask [seq] over labels (None: all count); prefix length."""

    tokens: np.ndarray
    loss_mask: Optional[np.ndarray] = None
    prefix_length: Optional[int] = None


class SampleSource(Protocol):
    def sample(self, sample_id: int) -> Sample: ...


def split_ranges(num_docs: int, fractions: Sequence[float]) -> list[range]:
    """Contiguous (train, valid, test) document ranges in the given proportions."""
    bounds = [0]
    for fraction in np.cumsum(fractions)[:-1]:
        bounds.append(int(round(fraction * num_docs)))
    bounds.append(num_docs)
    return [range(bounds[i], bounds[i + 1]) for i in range(len(fractions))]


class DocumentSamples:
    """Fixed-length samples across document boundaries from one split of one token file."""

    def __init__(
        self, dataset: IndexedDataset, docs: range, seq_length: int, seed: Sequence[int], name: str = ""
    ) -> None:
        self.dataset = dataset
        self.docs = np.arange(docs.start, docs.stop, dtype=np.int64)
        self.seq_length = seq_length
        self.seed = list(seed)
        self.name = name or str(getattr(dataset, "prefix", "dataset"))
        self.tokens = int(dataset.doc_lengths[self.docs].sum()) if len(self.docs) else 0
        self.samples_per_epoch = max(self.tokens - 1, 0) // seq_length
        if self.samples_per_epoch == 0:
            raise ValueError(
                f"{self.name}: this split has {len(self.docs)} documents and {self.tokens} tokens, fewer than "
                f"one sample of seq_length + 1 = {seq_length + 1} tokens; use more data, a larger share "
                f"in data.split, or a shorter model.seq_length"
            )
        self._epoch: Optional[int] = None

    def _load_epoch(self, epoch: int) -> None:
        """Document order, stream offsets and sample order of one epoch (O(documents))."""
        if self._epoch == epoch:
            return
        rng = np.random.default_rng([*self.seed, epoch, 0x6D6C])
        self._order = self.docs[rng.permutation(len(self.docs))]
        lengths = self.dataset.doc_lengths[self._order]
        self._ends = np.cumsum(lengths)  # stream offset just past each document
        self._sample_order = np.random.default_rng([*self.seed, epoch, 0x5A]).permutation(self.samples_per_epoch)
        self._epoch = epoch

    def sample(self, sample_id: int) -> Sample:
        epoch, index = divmod(sample_id, self.samples_per_epoch)
        self._load_epoch(epoch)
        start = int(self._sample_order[index]) * self.seq_length
        needed = self.seq_length + 1
        position = int(np.searchsorted(self._ends, start, side="right"))
        offset = start - (int(self._ends[position - 1]) if position > 0 else 0)
        pieces = []
        while needed > 0:
            doc = int(self._order[position])
            piece = self.dataset.get(doc, offset, min(needed, int(self.dataset.doc_lengths[doc]) - offset))
            pieces.append(piece)
            needed -= len(piece)
            position, offset = position + 1, 0
        return Sample(np.concatenate(pieces).astype(np.int64))


def blend_assignments(weights: Sequence[float], count: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset, sample id within it) for blended positions 0..count-1.

    Dataset i's k-th sample is placed at "time" (k + 0.5) / w_i and positions follow time order
    (ties by dataset index), so every prefix of the blend holds each dataset within one sample of
    its share, and the first N positions do not depend on how many are asked for.
    """
    shares = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    times, owners, ranks = [], [], []
    for i, share in enumerate(shares):
        if share <= 0:
            continue
        k = np.arange(int(math.ceil(count * share)) + 2, dtype=np.int64)
        times.append((k + 0.5) / share)
        owners.append(np.full(len(k), i, dtype=np.int64))
        ranks.append(k)
    times_all, owners_all, ranks_all = np.concatenate(times), np.concatenate(owners), np.concatenate(ranks)
    order = np.lexsort((owners_all, times_all))[:count]
    return owners_all[order], ranks_all[order]


class BlendedSamples:
    """A weighted blend of sources; weights default to the sources' sizes (samples per epoch)."""

    _CHUNK = 1 << 16

    def __init__(self, sources: Sequence[SampleSource], weights: Sequence[float]) -> None:
        if len(sources) != len(weights):
            raise ValueError(f"{len(weights)} blend weights for {len(sources)} datasets: give one weight each")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"blend weights must be >= 0 with a positive sum, got {list(weights)}")
        self.sources = list(sources)
        self.weights = list(weights)
        self._owners = np.zeros(0, dtype=np.int64)
        self._ranks = np.zeros(0, dtype=np.int64)

    def assignment(self, sample_id: int) -> tuple[int, int]:
        """(source index, sample id inside that source) of blended sample `sample_id`."""
        if sample_id >= len(self._owners):
            count = (sample_id // self._CHUNK + 2) * self._CHUNK
            self._owners, self._ranks = blend_assignments(self.weights, count)
        return int(self._owners[sample_id]), int(self._ranks[sample_id])

    def sample(self, sample_id: int) -> Sample:
        source, inner = self.assignment(sample_id)
        return self.sources[source].sample(inner)


class PrefixLMSamples:
    """PrefixLM pretraining: wraps a source and draws a prefix length per sample id."""

    def __init__(self, source: SampleSource, seq_length: int, low: float, high: float, seed: int) -> None:
        self.source = source
        self.shortest = max(1, math.ceil(low * seq_length))
        self.longest = max(self.shortest, min(seq_length - 1, math.floor(high * seq_length)))
        self.seed = seed

    def sample(self, sample_id: int) -> Sample:
        sample = self.source.sample(sample_id)
        rng = np.random.default_rng([self.seed, sample_id, 0x50])
        sample.prefix_length = int(rng.integers(self.shortest, self.longest + 1))
        return sample


def pair_prefix(prefix: Sequence[int], sep_id: int, room: Optional[int] = None) -> list[int]:
    """A pair's bidirectional prefix as fine-tuning encodes it: the prefix's ids (their last `room`
    when given; none when room is 0), then <sep>. Prompts to a model trained on pairs go through
    this same function (prompt_ids), so it sees what training showed it."""
    kept = list(prefix) if room is None else (list(prefix[-room:]) if room > 0 else [])
    return kept + [sep_id]


def trained_on_pairs(config) -> bool:
    """Whether a checkpoint's config fine-tuned it on pairs (data.kind pairs): LM and PrefixLM alike
    saw each prefix followed by <sep> (PairSamples), so their prompts end in <sep> too."""
    return config.data.kind == "pairs"


def prompt_ids(context: Sequence[int], sep_id: int, eos_id: int, pairs: bool) -> list[int]:
    """The ids a model continues from, as training showed such a context; the one rule of `megalm
    generate`, `megalm eval`, the lm_eval adapter and the end-of-training samples.

    pairs (trained_on_pairs): the context then <sep>, as pair_prefix (for a PrefixLM all of it is the
    bidirectional prefix, for an LM it is causal); else the context, or eos alone when it is empty
    (a document's first token follows the previous document's eos)."""
    ids = pair_prefix(context, sep_id) if pairs else list(context)
    return ids or [eos_id]


class PairSamples:
    """Fine-tuning from JSONL pairs: prefix <sep> target <eos>, padded; loss on the target only.

    The prefix and the separator form the bidirectional prefix (PrefixLM); with an LM model the
    same loss mask applies and attention stays causal. A pair longer than seq_length + 1 keeps its
    target and loses the start of its prefix.
    """

    def __init__(
        self,
        records: Sequence[tuple[list[int], list[int]]],
        seq_length: int,
        seed: Sequence[int],
        pad_id: int,
        sep_id: int,
        eos_id: int,
        name: str = "pairs",
    ) -> None:
        if not records:
            raise ValueError(f"{name}: no (prefix, target) pairs in this split")
        self.records = records
        self.seq_length = seq_length
        self.seed = list(seed)
        self.pad_id, self.sep_id, self.eos_id = pad_id, sep_id, eos_id
        self.name = name
        self._epoch: Optional[int] = None

    def sample(self, sample_id: int) -> Sample:
        epoch, index = divmod(sample_id, len(self.records))
        if self._epoch != epoch:
            self._order = np.random.default_rng([*self.seed, epoch, 0x7A]).permutation(len(self.records))
            self._epoch = epoch
        prefix, target = self.records[int(self._order[index])]
        target = target + [self.eos_id]
        room = self.seq_length + 1 - len(target) - 1  # tokens left for the prefix after <sep>
        if room < 0:
            raise ValueError(
                f"{self.name}: a target of {len(target)} tokens does not fit in seq_length "
                f"{self.seq_length}; raise model.seq_length or shorten the targets"
            )
        prefix = pair_prefix(prefix, self.sep_id, room)
        tokens = np.full(self.seq_length + 1, self.pad_id, dtype=np.int64)
        used = len(prefix) + len(target)
        tokens[:used] = prefix + target
        # label t is token t + 1: count it when that token belongs to the target
        label_positions = np.arange(1, self.seq_length + 1)
        loss_mask = ((label_positions >= len(prefix)) & (label_positions < used)).astype(np.float32)
        return Sample(tokens, loss_mask, prefix_length=len(prefix))


def read_pairs(path: Path, prefix_field: str, target_field: str) -> list[tuple[str, str]]:
    """(prefix, target) strings from a JSONL file; a bad line is an error naming file:line."""
    pairs = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
                pairs.append((str(record[prefix_field]), str(record[target_field])))
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(
                    f"{path}:{number}: not a JSON object with string fields '{prefix_field}' and "
                    f"'{target_field}' ({type(error).__name__}: {error}); fix or remove the line"
                ) from None
    if not pairs:
        raise ValueError(f"{path}: no (prefix, target) pairs found")
    return pairs
