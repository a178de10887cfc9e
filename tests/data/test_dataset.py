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


# ---- every epoch in another seeded order --------------------------------------------------------------
def _epoch_orders(samples: list[np.ndarray], per_epoch: int) -> list[tuple[list[int], list[int]]]:
    """Per epoch, (document order, stream position of each visited sample), read from the samples alone.

    Document d is SEQ tokens [4 + d] * (SEQ - 1) + [EOS], so a sample (SEQ + 1 tokens, starting at a
    document boundary) is document a followed by the first token of the document after it: the pairs
    (a, next) chain into the epoch's document order, and a sample's place in the chain is its position."""
    out = []
    for epoch in range(len(samples) // per_epoch):
        visited = [(int(s[0]) - 4, int(s[-1]) - 4) for s in samples[epoch * per_epoch:(epoch + 1) * per_epoch]]
        following = dict(visited)
        first = (set(following) - set(following.values())).pop()
        order = [first]
        while order[-1] in following:
            order.append(following[order[-1]])
        position = {doc: index for index, doc in enumerate(order)}
        out.append((order, [position[doc] for doc, _ in visited]))
    return out


def test_each_epoch_visits_documents_and_samples_in_another_seeded_order(tmp_path: Path) -> None:
    """Epochs 0..2 of a DocumentSamples source through the data-parallel sampler: each epoch has its own
    document order and its own sample order (not epoch 0's again), seeded, and the same samples come at
    dp 1 and dp 2 and after a resume in the second epoch on a fresh source."""
    num_docs, global_batch, micro = 33, 4, 2
    with IndexedDatasetWriter(tmp_path / "docs", vocab_size=100) as writer:
        for doc in range(num_docs):
            writer.add_document([4 + doc] * (SEQ - 1) + [EOS])
    dataset = IndexedDataset(tmp_path / "docs")
    per_epoch = num_docs - 1  # the stream's last document only lends the last sample its final token
    steps = 3 * per_epoch // global_batch

    def run(dp: int, seed: int = 5, resume_step: int = steps) -> list[np.ndarray]:
        source = DocumentSamples(dataset, range(num_docs), SEQ, (seed,))
        assert source.samples_per_epoch == per_epoch
        seen = []
        for step in range(steps):
            if step == resume_step:  # a restart: a new source object, the sampler at the saved position
                source = DocumentSamples(dataset, range(num_docs), SEQ, (seed,))
            for rank in range(dp):
                sampler = BatchSampler(source, global_batch, micro, rank, dp, False)
                sampler.resume_at(min(step, resume_step), min(step, resume_step) * global_batch)
                for batch in sampler.micro_batches(step):  # each sample: its inputs' first token, then its labels
                    seen += [np.concatenate([batch.tokens[r, :1].numpy(), batch.labels[r].numpy()])
                             for r in range(len(batch.tokens))]
        return seen

    samples = run(dp=1)
    assert len(samples) == 3 * per_epoch
    orders = _epoch_orders(samples, per_epoch)
    for order, positions in orders:
        assert sorted(order) == list(range(num_docs)) and sorted(positions) == list(range(per_epoch))
    for a in range(3):
        for b in range(a + 1, 3):
            assert orders[a][0] != orders[b][0], f"epochs {a} and {b} concatenate the documents in the same order"
            assert orders[a][1] != orders[b][1], f"epochs {a} and {b} visit the stream's samples in the same order"
    other_seed = _epoch_orders(run(dp=1, seed=6), per_epoch)
    assert all(mine[0] != theirs[0] and mine[1] != theirs[1] for mine, theirs in zip(orders, other_seed))
    tokens = [s.tolist() for s in samples]
    assert [s.tolist() for s in run(dp=2)] == tokens
    assert [s.tolist() for s in run(dp=2, resume_step=per_epoch // global_batch + 3)] == tokens


def test_pair_samples_are_reshuffled_each_epoch() -> None:
    """Each epoch of fine-tuning pairs visits every pair once, in its own seeded order."""
    records = [([10 + i], [20]) for i in range(12)]

    def epochs(seed: int) -> list[list[int]]:
        pairs = PairSamples(records, SEQ, (seed,), 0, 3, EOS)
        firsts = [int(pairs.sample(i).tokens[0]) - 10 for i in range(3 * len(records))]
        return [firsts[e * len(records):(e + 1) * len(records)] for e in range(3)]

    orders = epochs(1)
    assert all(sorted(order) == list(range(len(records))) for order in orders)
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
    assert epochs(1) == orders and epochs(2) != orders
