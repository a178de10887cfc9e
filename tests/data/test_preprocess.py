"""`megalm preprocess` and `megalm data inspect`: exact round trips, skip accounting, crash safety, CLI."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from megalm.data.indexed import DatasetFormatError, IndexedDataset
from megalm.data.inspect import format_report, length_histogram, sample_documents, summarize
from megalm.data.preprocess import PreprocessError, preprocess

from megalm.cli import main as cli_main
from megalm.data.tokenizer import Tokenizer, train_tokenizer

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "  Leading spaces, double  spaces and a trailing space ",
    "Numbers 12345 and symbols: <sep> $%^&*() stay text.",
]
CHINESE = [
    "今天天气很好，我们去公园散步吧！",
    "他说：“你好吗？”我回答：“很好，谢谢。”",
    "全角标点：，。！？；：（）【】《》、～",
]
MIXED = [
    "Python 是一种编程语言，it is widely used in 数据科学 (data science).",
    "混合 text 与 emoji 😀 和 tabs\tinside，结尾。",
    "Ünïcödé façade — naïve café 与 中文。",
]
DOCUMENTS = ENGLISH + CHINESE + MIXED


class ByteTokenizer:
    """Stand-in tokenizer: id = UTF-8 byte + 4, the same special ids as megalm's Tokenizer."""

    pad_id, eos_id, unk_id, sep_id = 0, 1, 2, 3
    vocab_size = 260

    def __init__(self, model_bytes: bytes = b"") -> None:
        self.hash = hashlib.sha256(model_bytes).hexdigest()

    def encode(self, text: str) -> list[int]:
        return [byte + 4 for byte in text.encode("utf-8")]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) - 4 for i in ids if int(i) >= 4).decode("utf-8")


def load_byte_tokenizer(path: Path) -> ByteTokenizer:
    """Module level, so worker processes can unpickle it."""
    return ByteTokenizer(Path(path).read_bytes())


@pytest.fixture
def fake_model(tmp_path: Path) -> Path:
    path = tmp_path / "fake.model"
    path.write_bytes(b"fake tokenizer")
    return path


@pytest.fixture(scope="module")
def real_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    corpus = directory / "train.txt"
    corpus.write_text("\n".join(DOCUMENTS * 20) + "\n", encoding="utf-8")
    return train_tokenizer([corpus], directory / "tok", vocab_size=400)


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text, "id": i}, ensure_ascii=False) + "\n" for i, text in enumerate(texts)),
                    encoding="utf-8")
    return path


def _run(inputs, prefix: Path, model: Path, **kwargs):
    kwargs.setdefault("progress", False)
    if model.name == "fake.model":
        kwargs.setdefault("tokenizer_loader", load_byte_tokenizer)
    return preprocess(inputs, prefix, model, **kwargs)


def _files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


# ------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("kind", ["fake", "real"])
@pytest.mark.parametrize("fmt", ["jsonl", "txt"])
def test_round_trip_english_chinese_mixed(tmp_path: Path, kind: str, fmt: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue("fake_model" if kind == "fake" else "real_model")
    tokenizer = load_byte_tokenizer(model) if kind == "fake" else Tokenizer.load(model)
    if fmt == "jsonl":
        source = _jsonl(tmp_path / "docs.jsonl", DOCUMENTS)
    else:
        source = tmp_path / "docs.txt"
        source.write_text("\n".join(DOCUMENTS) + "\n", encoding="utf-8")
    summary = _run([source], tmp_path / "out" / "ds", model)
    dataset = IndexedDataset(tmp_path / "out" / "ds")
    assert summary.docs_written == dataset.num_docs == len(DOCUMENTS)
    assert summary.tokens == dataset.num_tokens and summary.num_skipped == 0
    assert (dataset.vocab_size, dataset.tokenizer_hash) == (tokenizer.vocab_size, tokenizer.hash)
    for index, text in enumerate(DOCUMENTS):
        ids = dataset.get(index)
        assert ids[-1] == tokenizer.eos_id
        assert list(ids[:-1]) == list(tokenizer.encode(text))
        assert tokenizer.decode(ids[:-1]) == text


def test_no_eos_crlf_and_bom(tmp_path: Path, fake_model: Path) -> None:
    source = tmp_path / "docs.txt"
    source.write_bytes(b"\xef\xbb\xbffirst\r\nsecond\r\nlast line without newline")
    _run([source], tmp_path / "ds", fake_model, append_eos=False)
    dataset = IndexedDataset(tmp_path / "ds")
    tokenizer = ByteTokenizer()
    assert [tokenizer.decode(dataset.get(i)) for i in range(dataset.num_docs)] == [
        "first", "second", "last line without newline"]
    assert 1 not in dataset.tokens()


@pytest.mark.parametrize("kind", ["fake", "real"])
def test_worker_count_does_not_change_the_output(tmp_path: Path, kind: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue("fake_model" if kind == "fake" else "real_model")
    texts = [DOCUMENTS[i % len(DOCUMENTS)] * (1 + i % 4) for i in range(300)]
    first = _jsonl(tmp_path / "a.jsonl", texts[:170])
    second = tmp_path / "b.txt"
    second.write_text("\n".join(texts[170:]) + "\n\nnot json here\n", encoding="utf-8")
    one = _run([first, second], tmp_path / "one", model, workers=1, chunk_docs=16)
    two = _run([first, second], tmp_path / "two", model, workers=2, chunk_docs=16)
    assert (tmp_path / "one.bin").read_bytes() == (tmp_path / "two.bin").read_bytes()
    assert (tmp_path / "one.idx").read_bytes() == (tmp_path / "two.idx").read_bytes()
    assert (one.docs_written, one.tokens, one.skipped) == (two.docs_written, two.tokens, two.skipped)
    assert one.docs_written == 301 and one.skipped["empty"] == 1


# ------------------------------------------------------------------------------------------- skipping


def _messy_jsonl(path: Path) -> Path:
    lines = [
        json.dumps({"text": "good one"}).encode(),                  # 1
        b"",                                                        # 2 empty
        b'{"text": "bad \xff\xfe bytes"}',                          # 3 invalid_utf8
        b"this is not json",                                        # 4 bad_json
        b"[1, 2, 3]",                                               # 5 bad_json (not an object)
        json.dumps({"body": "no text field"}).encode(),            # 6 missing_field
        json.dumps({"text": 42}).encode(),                          # 7 missing_field (not a string)
        json.dumps({"text": "   "}).encode(),                       # 8 empty
        json.dumps({"text": "good two"}, ensure_ascii=False).encode(),  # 9
        b"   ",                                                     # 10 empty
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_skipped_lines_are_counted_by_reason(tmp_path: Path, fake_model: Path) -> None:
    source = _messy_jsonl(tmp_path / "messy.jsonl")
    text = tmp_path / "plain.txt"
    text.write_bytes(b"plain one\n\n\xc3\x28 broken\nplain two\n")
    summary = _run([source, text], tmp_path / "ds", fake_model)
    assert summary.skipped == {"empty": 4, "invalid_utf8": 2, "bad_json": 2, "missing_field": 2}
    assert summary.docs_written == 4 and summary.lines_read == 14
    dataset = IndexedDataset(tmp_path / "ds")
    decoded = [ByteTokenizer().decode(dataset.get(i)) for i in range(dataset.num_docs)]
    assert decoded == ["good one", "good two", "plain one", "plain two"]
    report = summary.describe()
    assert "skipped 10 lines (empty 4, invalid_utf8 2, bad_json 2, missing_field 2)" in report
    assert f"first invalid_utf8: {source}:3:" in report and f"first missing_field: {source}:6:" in report


@pytest.mark.parametrize("workers", [1, 2])
def test_strict_mode_fails_with_file_and_line_and_writes_nothing(tmp_path: Path, fake_model: Path, workers: int) -> None:
    source = _messy_jsonl(tmp_path / "messy.jsonl")
    with pytest.raises(PreprocessError, match=rf"{source}:3: invalid UTF-8 at byte 14 .*strict"):
        _run([source], tmp_path / "out" / "ds", fake_model, strict=True, workers=workers, chunk_docs=2)
    assert _files(tmp_path / "out") == []
    source.write_bytes(b'{"text": "fine"}\n\n{"txt": "x"}\n')  # empty lines are fine in strict mode
    with pytest.raises(PreprocessError, match=rf"{source}:3: no 'text' field \(keys: 'txt'\); see --text-field"):
        _run([source], tmp_path / "out" / "ds", fake_model, strict=True, workers=workers)
    assert _files(tmp_path / "out") == []


def test_empty_input_is_an_error_with_no_output(tmp_path: Path, fake_model: Path) -> None:
    blank = tmp_path / "blank.txt"
    blank.write_bytes(b"\n  \n\n")
    nothing = tmp_path / "nothing.jsonl"
    nothing.write_bytes(b"")
    with pytest.raises(PreprocessError, match=r"no documents in .*blank.txt.*: 3 lines read, all skipped \(empty 3\)"):
        _run([blank, nothing], tmp_path / "out" / "ds", fake_model)
    assert _files(tmp_path / "out") == []


def test_bad_arguments_fail_before_any_work(tmp_path: Path, fake_model: Path) -> None:
    good = _jsonl(tmp_path / "good.jsonl", ["x"])
    with pytest.raises(PreprocessError, match=r"input file\(s\) not found: .*missing.jsonl"):
        _run([good, tmp_path / "missing.jsonl"], tmp_path / "out" / "ds", fake_model)
    with pytest.raises(PreprocessError, match="tokenizer model .*nope.model not found"):
        _run([good], tmp_path / "out" / "ds", tmp_path / "nope.model")
    with pytest.raises(PreprocessError, match="names a directory"):
        _run([good], tmp_path, fake_model)
    with pytest.raises(PreprocessError, match="workers must be at least 1"):
        _run([good], tmp_path / "out" / "ds", fake_model, workers=0)
    assert not (tmp_path / "out").exists()


def test_failed_run_keeps_the_existing_dataset(tmp_path: Path, fake_model: Path) -> None:
    _run([_jsonl(tmp_path / "v1.jsonl", ["version one"])], tmp_path / "ds", fake_model)
    before = {name: (tmp_path / name).read_bytes() for name in ("ds.bin", "ds.idx")}
    with pytest.raises(PreprocessError):
        _run([_messy_jsonl(tmp_path / "v2.jsonl")], tmp_path / "ds", fake_model, strict=True)
    with pytest.raises(PreprocessError):
        _run([tmp_path / "v1.jsonl", tmp_path / "gone.jsonl"], tmp_path / "ds", fake_model)
    assert {name: (tmp_path / name).read_bytes() for name in ("ds.bin", "ds.idx")} == before
    assert not [name for name in _files(tmp_path) if name.endswith(".tmp")]
    # A successful run replaces it.
    _run([_jsonl(tmp_path / "v3.jsonl", ["version three", "more"])], tmp_path / "ds", fake_model)
    assert IndexedDataset(tmp_path / "ds").num_docs == 2


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal(tmp_path: Path, fake_model: Path) -> None:
    stream = _Terminal()
    source = _jsonl(tmp_path / "docs.jsonl", DOCUMENTS * 10)
    summary = _run([source], tmp_path / "ds", fake_model, progress=True, progress_stream=stream, chunk_docs=8)
    output = stream.getvalue()
    assert output.startswith("\rpreprocess [") and output.endswith("\n") and output.count("\n") == 1
    final = output.rstrip("\n").split("\r")[-1]
    size = source.stat().st_size / 1e6
    assert final.startswith(f"preprocess [{'#' * 30}] 100.0% {size:,.1f}/{size:,.1f} MB read | 90 docs, ")
    assert "docs/s" in final and "tokens/s" in final and final.rstrip().endswith("ETA 0s")
    assert summary.seconds > 0 and summary.tokens_per_second > 0 and summary.docs_per_second > 0
    assert summary.bytes_read == source.stat().st_size


def test_progress_is_one_line_per_interval_in_a_log(tmp_path: Path, fake_model: Path) -> None:
    source = _jsonl(tmp_path / "docs.jsonl", DOCUMENTS * 10)
    stream = io.StringIO()  # not a terminal: a log file or a pipe
    _run([source], tmp_path / "ds", fake_model, progress=True, progress_stream=stream, chunk_docs=8,
         progress_interval=0.0)
    lines = stream.getvalue().splitlines(keepends=True)
    assert "\r" not in stream.getvalue() and all(line.endswith("\n") for line in lines)
    assert len(lines) == 12 + 1  # one per chunk of 8 of the 90 documents, and the final line
    percents = [float(line.split("%")[0].split()[-1]) for line in lines]
    assert percents == sorted(percents) and percents[-1] == 100.0 and lines[-1].startswith("preprocess: 100.0% (")
    stream = io.StringIO()  # the default interval (30 s) in a log: only the final line for a short run
    _run([source], tmp_path / "ds2", fake_model, progress=True, progress_stream=stream, chunk_docs=8)
    assert stream.getvalue().count("\n") == 1 and "90 docs" in stream.getvalue()


# ------------------------------------------------------------------------------------------- inspect


def _byte_dataset(tmp_path: Path, fake_model: Path) -> IndexedDataset:
    texts = [f"document number {i} " * (1 + i % 7) for i in range(40)]
    _run([_jsonl(tmp_path / "docs.jsonl", texts)], tmp_path / "ds", fake_model)
    return IndexedDataset(tmp_path / "ds")


def test_summarize_and_histogram(tmp_path: Path, fake_model: Path) -> None:
    dataset = _byte_dataset(tmp_path, fake_model)
    stats = summarize(dataset)
    lengths = dataset.doc_lengths
    assert stats["num_docs"] == 40 and stats["num_tokens"] == int(lengths.sum())
    assert stats["min_length"] == lengths.min() and stats["max_length"] == lengths.max()
    assert stats["median_length"] == pytest.approx(np.median(lengths))
    assert stats["data_bytes"] == 2 * stats["num_tokens"] and stats["dtype"] == "uint16"
    assert stats["tokenizer_hash"] == ByteTokenizer(b"fake tokenizer").hash

    histogram = length_histogram([0, 1, 1, 2, 3, 10, 100, 1000], bins=4, width=10)
    rows = histogram.splitlines()
    assert rows[0].split("|")[0].strip() == "0" and rows[0].endswith("| 1 ##")  # 1 of at most 4: a quarter bar
    assert rows[1].endswith("| 4 ##########")
    assert sum(int(row.split("|")[1].split()[0]) for row in rows) == 8
    assert "1 - " in rows[1] and rows[-1].split("|")[0].strip().endswith("1000")
    assert max(row.count("#") for row in rows) == 10
    assert length_histogram([]) == "(no documents)"
    assert length_histogram([5, 5, 5]).splitlines() == ["5 | 3 ########################################"]


def test_inspect_report_and_samples(tmp_path: Path, fake_model: Path) -> None:
    dataset = _byte_dataset(tmp_path, fake_model)
    report = format_report(dataset, load_byte_tokenizer(fake_model), samples=2, seed=3)
    assert "documents 40" in report and f"tokens {dataset.num_tokens:,}" in report
    assert "histogram of document lengths" in report and "#" in report
    assert "format version 1, dtype uint16, vocab size 260" in report
    chosen = sample_documents(dataset, 2, seed=3)
    assert chosen == sample_documents(dataset, 2, seed=3) and len(set(chosen)) == 2
    assert f"[doc {chosen[0]}, " in report and "document number" in report and "warning" not in report
    other = ByteTokenizer(b"another model")
    assert "warning: this tokenizer (vocab 260, hash " in format_report(dataset, other, samples=1)
    assert sample_documents(dataset, 100, seed=0) == list(range(40))


# ------------------------------------------------------------------------------------------- CLI


def _cli(argv: list[str]) -> int:
    return cli_main(argv)


def test_cli_preprocess_and_inspect(tmp_path: Path, real_model: Path, capsys: pytest.CaptureFixture) -> None:
    source = _jsonl(tmp_path / "docs.jsonl", DOCUMENTS)
    prefix = tmp_path / "data" / "corpus"
    assert _cli(["preprocess", "--input", str(source), "--output-prefix", str(prefix), "--tokenizer",
                 str(real_model), "--workers", "2"]) == 0
    captured = capsys.readouterr()
    assert f"wrote {prefix}.bin and corpus.idx: 9 documents" in captured.out
    # stderr is not a terminal here: plain lines, no carriage returns
    assert captured.err.startswith("preprocess: 100.0% (") and "tokens/s" in captured.err and "\r" not in captured.err

    assert _cli(["data", "inspect", str(prefix), "--tokenizer", str(real_model), "--samples", "9"]) == 0
    out = capsys.readouterr().out
    assert "documents 9" in out and "histogram of document lengths" in out
    assert f"tokenizer hash {Tokenizer.load(real_model).hash}" in out
    assert CHINESE[1] in out and MIXED[0] in out and "warning" not in out

    assert _cli(["preprocess", "--input", str(tmp_path / "missing.jsonl"), "--output-prefix", str(prefix),
                 "--tokenizer", str(real_model), "--no-progress"]) == 2
    assert "megalm: error: input file(s) not found" in capsys.readouterr().err
    source.write_bytes(b"not json\n")
    assert _cli(["preprocess", "--input", str(source), "--output-prefix", str(prefix), "--tokenizer",
                 str(real_model), "--strict", "--no-progress"]) == 2
    assert f"megalm: error: {source}:1: not valid JSON" in capsys.readouterr().err
    assert IndexedDataset(prefix).num_docs == 9  # the failed runs left the dataset alone

    (tmp_path / "data" / "corpus.idx").unlink()
    assert _cli(["data", "inspect", str(prefix)]) == 2
    assert "index file missing" in capsys.readouterr().err


def test_real_tokenizer_round_trip_for_unseen_text(tmp_path: Path, real_model: Path) -> None:
    """Characters the tokenizer never saw come back exactly (byte fallback), as do odd separators."""
    unseen = ["龘靐齉 — never seen characters 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "line\u2028separator and \u2581 meta symbol", "\u3000全角空格\u3000"]
    _run([_jsonl(tmp_path / "u.jsonl", unseen)], tmp_path / "u", real_model, workers=1)
    tokenizer = Tokenizer.load(real_model)
    dataset = IndexedDataset(tmp_path / "u")
    assert [tokenizer.decode(dataset.get(i)) for i in range(dataset.num_docs)] == unseen


def test_dataset_format_error_is_a_value_error() -> None:
    assert issubclass(DatasetFormatError, ValueError) and issubclass(PreprocessError, ValueError)
