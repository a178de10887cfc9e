"""The start-up data statistics: documents and tokens per split, epochs of the run, the repeat warning."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from megalm.config import ConfigError, load_config
from megalm.data.dataset import BlendedSamples, DocumentSamples, PairSamples, PrefixLMSamples
from megalm.data.pipeline import DataSources
from megalm.data.stats import describe_data, epochs, split_stats
from megalm.distributed import ParallelGroups
from megalm.testing import log_messages
from megalm.train import build_trainer
from tests.data.test_dataset import write_dataset

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
SEQ = 64  # tiny.yaml's seq_length


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> DataSources:
    """A blend of two token files (300 and 100 documents) for train, the first file's tail for valid."""
    out = tmp_path_factory.mktemp("stats")
    big = write_dataset(out / "big", 300, seed=0, vocab=256)
    small = write_dataset(out / "small", 100, seed=1, vocab=256)
    train = BlendedSamples(
        [DocumentSamples(big, range(0, 280), SEQ, (1, 0, 0)), DocumentSamples(small, range(0, 100), SEQ, (1, 1, 0))],
        [3.0, 1.0],
    )
    return DataSources(train, DocumentSamples(big, range(280, 300), SEQ, (1, 0, 1)), None, None)


def test_split_sizes_and_epochs_are_counted_from_the_index(sources: DataSources) -> None:
    big, small = sources.train.sources
    tokens = [int(d.dataset.doc_lengths[d.docs].sum()) for d in (big, small)]
    stats = split_stats(sources.train)
    assert (stats.documents, stats.tokens) == (380, sum(tokens))
    assert stats.samples_per_epoch == (tokens[0] - 1) // SEQ + (tokens[1] - 1) // SEQ
    # a blend repeats its most repeated dataset: 3/4 of the samples come from `big`, 1/4 from `small`
    samples = 1000
    expected = max(samples * 0.75 / big.samples_per_epoch, samples * 0.25 / small.samples_per_epoch)
    assert epochs(sources.train, samples) == pytest.approx(expected)
    assert epochs(PrefixLMSamples(big, SEQ, 0.1, 0.5, seed=0), 500) == pytest.approx(500 / big.samples_per_epoch)
    pairs = PairSamples([([5, 6, 7], [8]), ([9], [10, 11])], SEQ, (0,), 0, 3, 1)
    assert split_stats(pairs) == type(stats)(2, (3 + 1 + 2) + (1 + 2 + 2), 2)  # prefix <sep> target <eos>
    assert epochs(pairs, 7) == 3.5


def test_start_up_lines_and_the_repeat_warning(sources: DataSources) -> None:
    big, small = sources.train.sources
    few = load_config(TINY, ["train.steps=2", "train.global_batch_size=16"])
    lines, warning = describe_data(few, sources)
    assert lines[0].startswith("data train: 380 documents, ") and "samples of 64 tokens per epoch" in lines[0]
    assert lines[1].startswith("data valid: 20 documents, ") and lines[2] == "data test: empty"
    run_epochs = max(32 * 0.75 / big.samples_per_epoch, 32 * 0.25 / small.samples_per_epoch)
    assert lines[3] == f"data: train.steps 2 x global batch 16 = 32 samples: {run_epochs:.2f} epochs of the train split"
    assert warning is None
    many = load_config(TINY, ["train.steps=300"])
    run_epochs = epochs(sources.train, 300 * 16)
    assert run_epochs > 4
    _, warning = describe_data(many, sources)
    assert warning.startswith(f"the run will read its train split {run_epochs:.1f} times (4,800 samples, "
                              f"data.max_epochs_warning=4)")
    assert describe_data(load_config(TINY, ["train.steps=300", "data.max_epochs_warning=null"]), sources)[1] is None
    higher = load_config(TINY, ["train.steps=300", f"data.max_epochs_warning={run_epochs + 1}"])
    assert describe_data(higher, sources)[1] is None
    with pytest.raises(ConfigError, match="data.max_epochs_warning must be positive"):
        load_config(TINY, ["data.max_epochs_warning=0"])


def test_the_trainer_logs_them_at_start(sources: DataSources) -> None:
    with log_messages(levels=True) as messages:
        build_trainer(load_config(TINY), ParallelGroups.single(), None, sources)
        build_trainer(load_config(TINY), ParallelGroups.single(), None)  # synthetic
    assert any(m.startswith("data train: 380 documents") for _, m in messages)
    assert any(level == logging.WARNING and m.startswith("the run will read its train split") for level, m in messages)
    assert (logging.INFO, "data train: synthetic stream (endless, never repeats)") in messages
