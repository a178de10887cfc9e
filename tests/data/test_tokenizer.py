"""Tokenizer: exact round trip on tricky text, fixed special ids, inputs, sidecar, errors and the CLI."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import random
from pathlib import Path

import pytest

from megalm.data.tokenizer import (
    EOS_ID,
    MAX_SENTENCE_BYTES,
    PAD_ID,
    SEP_ID,
    SEP_PIECE,
    UNK_ID,
    Tokenizer,
    TokenizerError,
    _SentenceReader,
    register_cli,
    train_tokenizer,
)

ENGLISH = (
    "the model trains on tokens while pipeline stages pass activations and data parallel ranks "
    "average gradients across the cluster so that throughput stays high and memory stays low"
).split()
CHINESE = "我们今天训练一个中文语言模型数据并行张量流水线吞吐量很高这是测试句子显存不够需要切分参数"
PUNCTUATION = ["，", "。", "！", "？", "、", "：", "；", ", ", ". ", "! "]

TRICKY = [
    "hello world",
    "中文，测试。！？“引号”（括号）",
    "mixed 中文 and English text，混合。",
    "multiple   spaces    inside",
    " leading space",
    "   three leading spaces",
    "trailing space ",
    "trailing spaces   ",
    " ",
    "   ",
    "",
    "line one\nline two\n",
    "\n\nblank lines\n\n",
    "windows\r\nline end",
    "\ttabs\tinside\t",
    " \t \n mixed whitespace \n\t ",
    "emoji 😀🎉👩‍👩‍👧 and flags 🇨🇳",
    "rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 龘 䨻 ‽ ∮ ﷽",
    "full　width　space and ＡＢＣ１２３",
    "non\u00a0breaking and zero\u200bwidth",
    "combining e\u0301 vs é",
    "digits 1234567890 and 3.14159",
    "the <sep> text is not the separator",
    "meta \u2581 symbol \u2581\u2581 at end\u2581",
    "\u2581leading meta",
    "control \x00 \x07 \x1b chars",
    "ℌ𝔢𝔩𝔩𝔬 – “quotes” ‘single’ — dash…",
]


def _corpus_lines(count: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for index in range(count):
        english = " ".join(rng.choice(ENGLISH) for _ in range(rng.randint(3, 12)))
        chinese = "".join(rng.choice(CHINESE) for _ in range(rng.randint(4, 20)))
        line = f"{english}{rng.choice(PUNCTUATION)}{chinese}{rng.choice(PUNCTUATION)}{rng.randint(0, 99999)}"
        if index % 5 == 0:
            line = f"{chinese}。{english}\tend"
        lines.append(line)
    return lines


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(_corpus_lines()) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def trained(request, corpus, tmp_path_factory) -> tuple[Path, Tokenizer]:
    prefix = tmp_path_factory.mktemp(f"tok_{request.param}") / "tok"
    model_path = train_tokenizer([corpus], prefix, vocab_size=400, model_type=request.param, num_threads=1)
    return model_path, Tokenizer.load(model_path)


# ------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
def test_round_trip_is_exact(trained, text):
    _, tokenizer = trained
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert UNK_ID not in ids


def test_round_trip_of_training_lines_and_batch(trained):
    _, tokenizer = trained
    lines = _corpus_lines(50, seed=1) + TRICKY
    batch = tokenizer.encode_batch(lines)
    assert batch == [tokenizer.encode(line) for line in lines]
    assert [tokenizer.decode(ids) for ids in batch] == lines
    assert tokenizer.encode_batch([]) == []


def test_concatenated_encodings_decode_to_concatenated_text(trained):
    _, tokenizer = trained
    prompt, response = "问题：what is 2+2? ", " 答案是四。"
    ids = tokenizer.encode(prompt) + [SEP_ID] + tokenizer.encode(response) + [EOS_ID, PAD_ID, PAD_ID]
    assert tokenizer.decode(ids) == prompt + response


def test_compresses_seen_text(trained):
    _, tokenizer = trained
    line = _corpus_lines(1, seed=2)[0]
    assert len(tokenizer.encode(line)) < len(line.encode("utf-8")) / 2


def test_unseen_characters_fall_back_to_bytes(trained):
    _, tokenizer = trained
    for text in ["𝔘", "龘", "😀", "\U0010FFFD", "\u2581"]:
        ids = tokenizer.encode(text)
        assert UNK_ID not in ids
        assert len(ids) == len(text.encode("utf-8"))  # one byte piece per UTF-8 byte
        assert tokenizer.decode(ids) == text


def test_sep_piece_in_text_is_not_the_separator(trained):
    _, tokenizer = trained
    assert SEP_ID not in tokenizer.encode(f"a{SEP_PIECE}b")


# ------------------------------------------------------------------------------------------ special ids


def test_special_ids(trained):
    _, tokenizer = trained
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id, tokenizer.sep_id) == (0, 1, 2, 3)
    assert (PAD_ID, EOS_ID, UNK_ID, SEP_ID) == (0, 1, 2, 3)
    assert tokenizer.vocab_size == 400
    sp = tokenizer._sp
    assert sp.bos_id() == -1
    assert sp.piece_to_id(SEP_PIECE) == SEP_ID
    assert tokenizer.id_to_piece(SEP_ID) == SEP_PIECE


def test_decode_drops_special_ids_and_rejects_out_of_range(trained):
    _, tokenizer = trained
    ids = tokenizer.encode("你好 world")
    assert tokenizer.decode([PAD_ID, *ids, SEP_ID, EOS_ID]) == "你好 world"
    with pytest.raises(TokenizerError, match="out of range"):
        tokenizer.decode([tokenizer.vocab_size])


def test_foreign_ids_are_rejected_on_load(tmp_path, corpus):
    import sentencepiece as spm

    prefix = tmp_path / "foreign"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=400, byte_fallback=True, minloglevel=2,
        num_threads=1,
    )  # sentencepiece defaults: unk=0, bos=1, eos=2, no pad
    with pytest.raises(TokenizerError, match=r"pad id is -1, megalm expects 0"):
        Tokenizer.load(f"{prefix}.model")


def test_normalizing_model_is_rejected_on_load(tmp_path, corpus):
    import sentencepiece as spm

    prefix = tmp_path / "nfkc"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=400, byte_fallback=True, minloglevel=2,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, control_symbols=[SEP_PIECE], num_threads=1,
    )
    with pytest.raises(TokenizerError, match="normalizes text"):
        Tokenizer.load(f"{prefix}.model")


# ------------------------------------------------------------------------------------------ files


def test_files_and_metadata_sidecar(trained):
    model_path, tokenizer = trained
    prefix = model_path.with_suffix("")
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert tokenizer.hash == digest
    sidecar = json.loads(Path(f"{prefix}.json").read_text(encoding="utf-8"))
    assert sidecar == tokenizer.metadata()
    assert sidecar["hash"] == digest
    assert sidecar["vocab_size"] == 400
    assert (sidecar["pad_id"], sidecar["eos_id"], sidecar["unk_id"], sidecar["sep_id"]) == (0, 1, 2, 3)
    assert sidecar["model_type"] == model_path.parent.name.split("_")[1].rstrip("0123456789")
    vocab_lines = Path(f"{prefix}.vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab_lines) == 400 and vocab_lines[SEP_ID].startswith(SEP_PIECE + "\t")
    assert sorted(p.name for p in model_path.parent.iterdir()) == ["tok.json", "tok.model", "tok.vocab"]


def test_reader_splits_lines_and_cuts_long_ones(tmp_path):
    path = tmp_path / "long.txt"
    long_line = "长" * 10_000  # 30,000 UTF-8 bytes, over sentencepiece's max_sentence_length
    path.write_bytes(f"first\r\n\n   \nsecond\n{long_line}\n".encode("utf-8"))
    sentences = list(_SentenceReader([path], "text"))
    assert sentences[:2] == ["first", "second"]
    assert "".join(sentences[2:]) == long_line
    assert all(len(s.encode("utf-8")) <= MAX_SENTENCE_BYTES for s in sentences)


def test_load_accepts_prefix(trained):
    model_path, tokenizer = trained
    assert Tokenizer.load(model_path.with_suffix("")).hash == tokenizer.hash


def test_jsonl_input_skips_bad_lines(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = _corpus_lines(200)
    records = [json.dumps({"content": line, "id": i}, ensure_ascii=False) for i, line in enumerate(lines)]
    records.insert(3, "{not json")
    records.insert(7, json.dumps({"text": "wrong field"}))
    records.insert(9, json.dumps([1, 2, 3]))
    path.write_text("\n".join(records) + "\n", encoding="utf-8")

    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    megalm_logger = logging.getLogger("megalm")
    megalm_logger.addHandler(handler)
    try:
        model_path = train_tokenizer([path], tmp_path / "json_tok", vocab_size=350, text_field="content", num_threads=1)
    finally:
        megalm_logger.removeHandler(handler)
    assert any("skipped 3 line(s)" in message and str(path) in message for message in messages)
    tokenizer = Tokenizer.load(model_path)
    assert tokenizer.decode(tokenizer.encode("训练 the model")) == "训练 the model"


# ------------------------------------------------------------------------------------------ errors


def test_empty_input_names_the_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n", encoding="utf-8")
    blank_json = tmp_path / "blank.jsonl"
    blank_json.write_text(json.dumps({"other": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"no training text found in .*empty\.txt, .*blank\.jsonl"):
        train_tokenizer([empty, blank_json], tmp_path / "tok", vocab_size=300)
    assert list(tmp_path.glob("tok*")) == []


def test_missing_input_file(tmp_path):
    with pytest.raises(TokenizerError, match="nowhere.txt"):
        train_tokenizer([tmp_path / "nowhere.txt"], tmp_path / "tok", vocab_size=300)


def test_vocab_too_large_says_the_supported_size(tmp_path, corpus):
    with pytest.raises(TokenizerError, match=r"vocab_size 50000 is too large .*at most \d+ .*--vocab-size"):
        train_tokenizer([corpus], tmp_path / "tok", vocab_size=50000, model_type="unigram", num_threads=1)
    assert list(tmp_path.glob("tok*")) == []


def test_vocab_too_small_says_the_needed_size(tmp_path, corpus):
    with pytest.raises(TokenizerError, match=r"too small .*at least \d+"):
        train_tokenizer([corpus], tmp_path / "tok", vocab_size=100, num_threads=1)


def test_load_missing_file(tmp_path):
    missing = tmp_path / "absent.model"
    with pytest.raises(TokenizerError, match=r"absent\.model not found"):
        Tokenizer.load(missing)


def test_load_non_sentencepiece_file(tmp_path):
    bogus = tmp_path / "bogus.model"
    bogus.write_text("this is not a model\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"bogus\.model is not a sentencepiece model"):
        Tokenizer.load(bogus)


# ------------------------------------------------------------------------------------------ CLI


def _own_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megalm")
    register_cli(parser.add_subparsers(dest="command", required=True))
    return parser


def _check_cli_output(output: str, prefix: Path) -> None:
    tokenizer = Tokenizer.load(f"{prefix}.model")
    assert f"{prefix}.model" in output
    assert tokenizer.hash in output
    assert "vocab_size: 360" in output
    assert "pad=0 eos=1 unk=2 sep=3" in output


def test_register_cli_train(tmp_path, corpus, capsys):
    prefix = tmp_path / "cli_tok"
    args = _own_parser().parse_args(
        ["tokenizer", "train", "--input", str(corpus), "--output", str(prefix), "--vocab-size", "360",
         "--model-type", "unigram", "--num-threads", "1"]
    )
    assert args.func(args) == 0
    _check_cli_output(capsys.readouterr().out, prefix)
    assert Tokenizer.load(f"{prefix}.model").metadata()["model_type"] == "unigram"


def test_register_cli_reports_errors(tmp_path, corpus, capsys):
    args = _own_parser().parse_args(
        ["tokenizer", "train", "--input", str(corpus), "--output", str(tmp_path / "t"), "--vocab-size", "90000"]
    )
    assert args.func(args) == 2
    assert "too large" in capsys.readouterr().err


_CLI_DEPENDENCIES = ("megalm.data.corpus", "megalm.data.inspect", "megalm.data.preprocess")


@pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in _CLI_DEPENDENCIES),
    reason="megalm.cli imports data modules that do not exist yet",
)
def test_megalm_cli_main(tmp_path, corpus, capsys):
    from megalm.cli import main

    prefix = tmp_path / "main_tok"
    code = main(["tokenizer", "train", "--input", str(corpus), "--output", str(prefix), "--vocab-size", "360"])
    assert code == 0
    _check_cli_output(capsys.readouterr().out, prefix)


def test_tokenizer_pickles_for_worker_processes(trained):
    import pickle

    _, tokenizer = trained
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert copy.hash == tokenizer.hash and copy.encode("并行 training") == tokenizer.encode("并行 training")
