"""The exported tokenizer: transformers' AutoTokenizer gives megalm's sentencepiece ids, Chinese and English."""

from __future__ import annotations

from pathlib import Path

import pytest

from megalm.data.corpus import generate_documents, write_corpus
from megalm.data.tokenizer import EOS_ID, PAD_ID, SEP_ID, Tokenizer, train_tokenizer
from megalm.interop.hf_tokenizer import build_hf_tokenizer, write_hf_tokenizer

transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed "
                                                          "(pip install 'megalm[hf]')")

EDGE_CASES = [
    "", " ", "  leading, inner   and trailing spaces  ", "tab\tnew line\nwindows\r\nend", "数字 12345 与 3.14 和 1,000",
    "全角标点：，。！？“引号”（括号）", "a literal \u2581 meta symbol", "<sep> </s> <pad> <unk> <0x41> stay text",
    "emoji 😀 and 𝄞 and ﬁ ligature", "Ünïcödé àccents", "混合 mixed 文本 text!",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root / "corpus.jsonl", num_bytes=150_000, seed=0)
    return root / "corpus.jsonl"


def held_out_texts() -> list[str]:
    """Documents of another seed (not trained on): Chinese, English and both."""
    return list(generate_documents(60_000, seed=7))


def test_auto_tokenizer_gives_megalms_ids(corpus: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer.load(train_tokenizer([corpus], tmp_path / "tok", vocab_size=800))
    write_hf_tokenizer(tokenizer, tmp_path / "hf", max_length=128)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = held_out_texts() + EDGE_CASES
    assert any("的" in text for text in texts) and any("the" in text for text in texts)
    for text in texts:
        ids = tokenizer.encode(text)
        assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids) == text
    assert hf(texts)["input_ids"] == tokenizer.encode_batch(texts)
    assert (hf.pad_token_id, hf.eos_token_id, hf.sep_token_id) == (PAD_ID, EOS_ID, SEP_ID)
    assert hf.decode([5, SEP_ID, EOS_ID], skip_special_tokens=True) == tokenizer.decode([5, SEP_ID, EOS_ID])
    assert (tmp_path / "hf" / "megalm_tokenizer.model").read_bytes() == Path(tokenizer.path).read_bytes()


def test_a_unigram_model_exports_too(corpus: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer.load(train_tokenizer([corpus], tmp_path / "uni", vocab_size=800, model_type="unigram"))
    hf = build_hf_tokenizer(tokenizer)
    hf.encode_special_tokens = True  # what tokenizer_config.json's split_special_tokens sets
    # the one known difference (megalm.interop.hf_tokenizer): text spelling a special piece's name
    for text in held_out_texts() + [text for text in EDGE_CASES if "<sep>" not in text]:
        assert hf.encode(text, add_special_tokens=False).ids == tokenizer.encode(text), text
