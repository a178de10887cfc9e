"""GPT samples over token files, blends, the data-parallel sampler, resume, PrefixLM and pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from megalm.data.dataset import (
    BlendedSamples,
    DocumentSamples,
    PairSamples,
    PrefixLMSamples,
    blend_assignments,
    split_ranges,
)
from megalm.data.indexed import IndexedDataset, IndexedDatasetWriter
from megalm.data.sampler import BatchSampler

SEQ = 16
EOS = 1


def write_dataset(prefix: Path, num_docs: int, seed: int, vocab: int = 500) -> IndexedDataset:
    """Documents of random length whose tokens encode (doc, position) so samples can be traced."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, vocab_size=vocab) as writer:
        for _ in range(num_docs):
            length = int(rng.integers(1, 40))
            writer.add_document(list(rng.integers(4, vocab, size=length)) + [EOS])
    return IndexedDataset(prefix)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> IndexedDataset:
    return write_dataset(tmp_path_factory.mktemp("ds") / "corpus", 300, seed=0)


def test_samples_cover_each_epoch_stream_exactly(dataset: IndexedDataset) -> None:
    """Within an epoch, consecutive stream samples overlap by one token and together are the stream."""
    source = DocumentSamples(dataset, range(0, dataset.num_docs), SEQ, (5,))
    source._load_epoch(0)
    stream = np.concatenate([dataset.get(int(doc)) for doc in source._order])
    by_start = {}
    for index in range(source.samples_per_epoch):
        tokens = source.sample(index).tokens
        start = int(source._sample_order[index]) * SEQ
        by_start[start] = tokens
        assert tokens.shape == (SEQ + 1,)
        assert np.array_equal(tokens, stream[start : start + SEQ + 1])
    assert sorted(by_start) == [k * SEQ for k in range(source.samples_per_epoch)]
    assert source.samples_per_epoch == (len(stream) - 1) // SEQ


def test_order_is_deterministic_and_seeded(dataset: IndexedDataset) -> None:
    ids = range(0, 3 * 200)  # crosses epochs
    first = [DocumentSamples(dataset, range(0, 300), SEQ, (5,)).sample(i).tokens.tobytes() for i in ids]
    again = [DocumentSamples(dataset, range(0, 300), SEQ, (5,)).sample(i).tokens.tobytes() for i in ids]
    other = [DocumentSamples(dataset, range(0, 300), SEQ, (6,)).sample(i).tokens.tobytes() for i in ids]
    assert first == again
    assert first != other
    # Epochs are reshuffled: epoch 1 is not epoch 0 again.
    per_epoch = DocumentSamples(dataset, range(0, 300), SEQ, (5,)).samples_per_epoch
    assert first[:per_epoch] != first[per_epoch : 2 * per_epoch]


def test_splits_are_disjoint_document_ranges() -> None:
    ranges = split_ranges(1000, (0.98, 0.01, 0.01))
    assert [len(r) for r in ranges] == [980, 10, 10]
    assert ranges[0].stop == ranges[1].start and ranges[1].stop == ranges[2].start == 990
    assert [len(r) for r in split_ranges(7, (1.0, 0.0, 0.0))] == [7, 0, 0]


def test_split_too_small_for_one_sample_is_a_clear_error(dataset: IndexedDataset) -> None:
    with pytest.raises(ValueError, match="fewer than one sample"):
        DocumentSamples(dataset, range(0, 0), SEQ, (1,), name="tiny-split")


@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.2, 0.5, 0.3), (1.0, 0.0, 3.0)])
def test_blend_shares_match_weights(weights) -> None:
    count = 50_000
    owners, ranks = blend_assignments(weights, count)
    shares = np.bincount(owners, minlength=len(weights)) / count
    expected = np.asarray(weights) / sum(weights)
    assert np.all(np.abs(shares - expected) < 0.01)
    # Every prefix is within one sample of its share, and each dataset's samples come in order.
    for prefix in (10, 101, 4_999):
        counts = np.bincount(owners[:prefix], minlength=len(weights))
        assert np.all(np.abs(counts - expected * prefix) <= 1.0 + 1e-9)
    for i in range(len(weights)):
        assert np.array_equal(ranks[owners == i], np.arange((owners == i).sum()))
    # The first positions do not depend on how many were asked for.
    short_owners, short_ranks = blend_assignments(weights, 777)
    assert np.array_equal(short_owners, owners[:777]) and np.array_equal(short_ranks, ranks[:777])


def test_blended_source_reads_from_each_dataset(tmp_path: Path, dataset: IndexedDataset) -> None:
    other = write_dataset(tmp_path / "other", 100, seed=1)
    a = DocumentSamples(dataset, range(0, 300), SEQ, (1,))
    b = DocumentSamples(other, range(0, 100), SEQ, (2,))
    blend = BlendedSamples([a, b], [0.25, 0.75])
    for sample_id in range(0, 400, 7):
        source, inner = blend.assignment(sample_id)
        assert np.array_equal(blend.sample(sample_id).tokens, [a, b][source].sample(inner).tokens)
    with pytest.raises(ValueError, match="one weight each"):
        BlendedSamples([a, b], [1.0])
    with pytest.raises(ValueError, match=">= 0"):
        BlendedSamples([a, b], [1.0, -0.5])


class _IdSource:
    """A source whose sample is its own id, to trace exactly which samples a rank reads."""

    def sample(self, sample_id: int):
        from megalm.data.dataset import Sample

        return Sample(np.full(SEQ + 1, sample_id, dtype=np.int64))


def _seen(sampler: BatchSampler, consumed: int) -> list[int]:
    return [int(batch.tokens[row, 0]) for batch in sampler.micro_batches_at(consumed) for row in range(len(batch.tokens))]


@pytest.mark.parametrize("dp_before, dp_after", [(1, 1), (2, 2), (4, 4), (2, 4), (4, 1), (1, 2)])
def test_resume_with_changed_dp_sees_exactly_the_uninterrupted_samples(dp_before: int, dp_after: int) -> None:
    global_batch, micro, steps, resume_step = 16, 2, 9, 4
    uninterrupted = []
    for step in range(steps):
        for rank in range(dp_before):
            uninterrupted += _seen(BatchSampler(_IdSource(), global_batch, micro, rank, dp_before, False), step * global_batch)
    resumed = []
    for step in range(steps):
        dp = dp_before if step < resume_step else dp_after
        consumed = step * global_batch  # the single number a checkpoint stores
        for rank in range(dp):
            resumed += _seen(BatchSampler(_IdSource(), global_batch, micro, rank, dp, False), consumed)
    assert sorted(resumed) == sorted(uninterrupted) == list(range(steps * global_batch))
    assert len(set(resumed)) == len(resumed)  # nothing repeated, nothing skipped


def test_each_rank_reads_only_its_share() -> None:
    reads = []

    class Counting(_IdSource):
        def sample(self, sample_id):
            reads.append(sample_id)
            return super().sample(sample_id)

    BatchSampler(Counting(), 16, 2, dp_rank=1, dp_size=4, prefixlm=False).micro_batches_at(32)
    assert reads == list(range(36, 40))


def test_prefixlm_samples_draw_a_prefix_per_sample_within_bounds() -> None:
    source = PrefixLMSamples(_IdSource(), SEQ, 0.25, 0.5, seed=3)
    lengths = [source.sample(i).prefix_length for i in range(500)]
    assert min(lengths) == 4 and max(lengths) == 8
    assert lengths == [PrefixLMSamples(_IdSource(), SEQ, 0.25, 0.5, seed=3).sample(i).prefix_length for i in range(500)]
    batch = BatchSampler(source, 4, 4, 0, 1, prefixlm=True).micro_batches(0)[0]
    for row in range(4):
        prefix = int(batch.prefix_lengths[row])
        assert batch.loss_mask[row, : prefix - 1].sum() == 0 and batch.loss_mask[row, prefix - 1 :].min() == 1


def test_pair_samples_mask_everything_but_the_target() -> None:
    pad, sep, eos = 0, 3, 1
    pairs = PairSamples([([10, 11, 12], [20, 21])], SEQ, (0,), pad, sep, eos)
    sample = pairs.sample(0)
    assert sample.tokens[:7].tolist() == [10, 11, 12, sep, 20, 21, eos]
    assert set(sample.tokens[7:].tolist()) == {pad}
    assert sample.prefix_length == 4  # the prefix and its separator are bidirectional
    labels = sample.tokens[1:]
    assert labels[sample.loss_mask == 1].tolist() == [20, 21, eos]
    # A long prefix is cut from the left; the target always survives.
    long = PairSamples([(list(range(100, 140)), [20, 21])], SEQ, (0,), pad, sep, eos).sample(0)
    assert long.tokens[-4:].tolist() == [sep, 20, 21, eos] and long.tokens[0] == 100 + 40 - (SEQ + 1 - 4)
    with pytest.raises(ValueError, match="does not fit"):
        PairSamples([([1], list(range(50)))], SEQ, (0,), pad, sep, eos).sample(0)
