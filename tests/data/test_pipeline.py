"""The whole data path through the CLI: corpus -> tokenizer -> preprocess -> train (with eval)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megalm.cli import main
from megalm.config import load_config
from megalm.data.indexed import IndexedDataset
from megalm.data.pipeline import DataError, build_sampler, build_sources
from megalm.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 1024


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A 300 kB corpus, its tokenizer and token files, made with the CLI as a user would."""
    out = tmp_path_factory.mktemp("pipeline")
    corpus = out / "corpus.jsonl"
    assert main(["data", "corpus", str(corpus), "--size-mb", "0.3", "--seed", "1"]) == 0
    assert main(["tokenizer", "train", "--input", str(corpus), "--output", str(out / "tok"),
                 "--vocab-size", str(VOCAB)]) == 0
    assert main(["preprocess", "--input", str(corpus), "--output-prefix", str(out / "corpus"),
                 "--tokenizer", str(out / "tok.model"), "--no-progress"]) == 0
    return out


def _overrides(prepared: Path, *extra: str) -> list[str]:
    return [
        f"model.vocab_size={VOCAB}", "data.kind=indexed", f"data.paths=[{prepared / 'corpus'}]",
        f"data.tokenizer={prepared / 'tok.model'}", *extra,
    ]


def test_training_on_the_corpus_evaluates_and_samples(prepared: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    args = _overrides(
        prepared, "train.steps=40", "train.eval_interval=20", "optim.lr=3e-3", "optim.warmup_steps=5",
        "log.sample_prompts=[Lena lives in]", "log.sample_tokens=8",
    )
    assert main(["train", str(ROOT / "configs" / "tiny.yaml"), *args, "--run-dir", str(run)]) == 0
    records = read_metrics(run / "metrics.jsonl")
    valid = [r["valid_loss"] for r in records if "valid_loss" in r]
    assert [r["step"] for r in records if "valid_loss" in r] == [20, 40]
    assert valid[1] < valid[0] < np.log(VOCAB)
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    assert all(r["data_time_s"] < r["step_time_s"] for r in records)
    assert "sample: 'Lena lives in' -> " in capsys.readouterr().out


def test_every_train_sample_comes_from_the_train_documents(prepared: Path) -> None:
    config = load_config(ROOT / "configs" / "tiny.yaml", _overrides(prepared, "data.split=50,50,0"))
    sources = build_sources(config)
    dataset = IndexedDataset(prepared / "corpus")
    half = dataset.num_docs // 2
    train_tokens = np.concatenate([dataset.get(d) for d in range(half)]).tobytes()
    batch = build_sampler(config, sources.train, 0, 1).micro_batches(0)[0]
    for row in batch.tokens:
        assert row.numpy().astype(dataset.dtype).tobytes()[:40] in train_tokens
    assert sources.test is None


def test_vocab_mismatch_is_refused_before_training(prepared: Path) -> None:
    config = load_config(ROOT / "configs" / "tiny.yaml", _overrides(prepared, "model.vocab_size=256"))
    with pytest.raises(DataError, match=f"set model.vocab_size={VOCAB}"):
        build_sources(config)


def test_dataset_from_another_tokenizer_is_refused(prepared: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    assert main(["tokenizer", "train", "--input", str(prepared / "corpus.jsonl"), "--output", str(other),
                 "--vocab-size", str(VOCAB), "--model-type", "unigram"]) == 0
    config = load_config(ROOT / "configs" / "tiny.yaml", _overrides(prepared, f"data.tokenizer={other}.model"))
    with pytest.raises(ValueError, match="different"):
        build_sources(config)


def test_eval_without_a_valid_split_is_a_clear_error(prepared: Path) -> None:
    config = load_config(ROOT / "configs" / "tiny.yaml", _overrides(prepared, "data.split=100,0,0", "train.eval_interval=10"))
    with pytest.raises(DataError, match="valid split no data"):
        build_sources(config)


def test_blend_weights_must_match_the_datasets(prepared: Path) -> None:
    with pytest.raises(ValueError, match="one weight per dataset"):
        load_config(ROOT / "configs" / "tiny.yaml", _overrides(prepared, "data.weights=[0.5,0.5]"))
    with pytest.raises(ValueError, match=">= 0"):
        load_config(ROOT / "configs" / "tiny.yaml", _overrides(prepared, "data.weights=[-1.0]"))


def test_fine_tuning_pairs_train_on_targets_only(prepared: Path, tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    lines = [{"prefix": f"{a} + {b} =", "target": f" {a + b}"} for a in range(12) for b in range(12)]
    pairs.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    config = load_config(
        ROOT / "configs" / "tiny-prefixlm.yaml",
        [f"model.vocab_size={VOCAB}", "data.kind=pairs", f"data.paths=[{pairs}]",
         f"data.tokenizer={prepared / 'tok.model'}", "data.split=90,10,0"],
    )
    sources = build_sources(config)
    batch = build_sampler(config, sources.train, 0, 1).micro_batches(0)[0]
    tokenizer = sources.tokenizer
    for row in range(len(batch.tokens)):
        target = batch.labels[row][batch.loss_mask[row] == 1].tolist()
        assert target[-1] == tokenizer.eos_id
        text = tokenizer.decode(target)
        assert text.strip().isdigit()  # only the answer (and eos) is trained on
        assert int(batch.prefix_lengths[row]) == batch.tokens[row].tolist().index(tokenizer.sep_id) + 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prefix": "a", "target": "b"}\nnot json\n', encoding="utf-8")
    config.data.paths = [str(bad)]
    with pytest.raises(DataError, match="bad.jsonl:2"):
        build_sources(config)
