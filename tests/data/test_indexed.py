"""The .bin/.idx format: round trips, every corruption refused with the file named, crash safety."""

from __future__ import annotations

import struct
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from megalm.data.indexed import (
    HEADER_SIZE,
    MAGIC,
    VERSION,
    DatasetFormatError,
    IndexedDataset,
    IndexedDatasetWriter,
    check_compatible,
    dtype_for_vocab,
)

HASH = "ab12" * 16


def _random_docs(vocab_size: int, num_docs: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 300, size=num_docs)
    return [rng.integers(0, vocab_size, size=int(length)) for length in lengths]


def _write(prefix: Path, docs: list, vocab_size: int = 1000, tokenizer_hash: str = HASH) -> None:
    with IndexedDatasetWriter(prefix, vocab_size, tokenizer_hash) as writer:
        for doc in docs:
            writer.add_document(doc)


def test_dtype_for_vocab() -> None:
    assert dtype_for_vocab(2048) == np.uint16
    assert dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.int32
    assert dtype_for_vocab(250_000) == np.int32
    with pytest.raises(ValueError):
        dtype_for_vocab(0)


@pytest.mark.parametrize("vocab_size, dtype", [(1000, np.uint16), (65536, np.uint16), (100_000, np.int32)])
def test_round_trip(tmp_path: Path, vocab_size: int, dtype: type) -> None:
    docs = _random_docs(vocab_size, 500)
    docs[3] = np.array([vocab_size - 1, 0, vocab_size - 1])  # the extreme ids survive
    _write(tmp_path / "ds", docs, vocab_size)
    dataset = IndexedDataset(tmp_path / "ds")
    assert (dataset.num_docs, dataset.vocab_size, dataset.tokenizer_hash) == (500, vocab_size, HASH)
    assert dataset.dtype == dtype and len(dataset) == 500
    assert dataset.num_tokens == sum(len(doc) for doc in docs)
    assert dataset.doc_lengths.dtype == np.int64 and dataset.doc_offsets.dtype == np.int64
    np.testing.assert_array_equal(dataset.doc_lengths, [len(doc) for doc in docs])
    np.testing.assert_array_equal(dataset.doc_offsets, np.concatenate([[0], np.cumsum([len(doc) for doc in docs])]))
    for index, doc in enumerate(docs):
        np.testing.assert_array_equal(dataset.get(index), doc)
    np.testing.assert_array_equal(dataset.tokens(), np.concatenate(docs))
    assert isinstance(dataset.tokens(), np.memmap)
    assert (tmp_path / "ds.bin").stat().st_size == dataset.num_tokens * np.dtype(dtype).itemsize
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]  # no temporary files left


def test_get_returns_views_of_slices(tmp_path: Path) -> None:
    _write(tmp_path / "ds", [np.arange(10), np.arange(100, 105), []])
    dataset = IndexedDataset(tmp_path / "ds")
    np.testing.assert_array_equal(dataset.get(0, 2, 3), [2, 3, 4])
    np.testing.assert_array_equal(dataset.get(1, 3), [103, 104])
    np.testing.assert_array_equal(dataset[1], [100, 101, 102, 103, 104])
    assert dataset.get(1, 5).size == 0 and dataset.get(2).size == 0
    view = dataset.get(0, 1, 2)
    assert isinstance(view, np.memmap) and not view.flags.writeable
    for doc, offset, length in [(3, 0, None), (-1, 0, None), (0, 8, 3), (0, -1, 2), (1, 0, 6)]:
        with pytest.raises(IndexError):
            dataset.get(doc, offset, length)


def test_zero_documents_is_a_valid_empty_dataset(tmp_path: Path) -> None:
    _write(tmp_path / "empty", [])
    dataset = IndexedDataset(tmp_path / "empty")
    assert (dataset.num_docs, dataset.num_tokens) == (0, 0)
    assert dataset.tokens().size == 0 and dataset.doc_lengths.size == 0
    np.testing.assert_array_equal(dataset.doc_offsets, [0])
    assert (tmp_path / "empty.idx").stat().st_size == HEADER_SIZE + 8


def test_add_documents_matches_add_document(tmp_path: Path) -> None:
    docs = _random_docs(500, 50, seed=1)
    _write(tmp_path / "one", docs, 500)
    with IndexedDatasetWriter(tmp_path / "many", 500, HASH) as writer:
        writer.add_documents(np.concatenate(docs[:20]).astype(np.uint16), [len(doc) for doc in docs[:20]])
        writer.add_documents(np.concatenate(docs[20:]), [len(doc) for doc in docs[20:]])
    assert (tmp_path / "one.bin").read_bytes() == (tmp_path / "many.bin").read_bytes()
    assert (tmp_path / "one.idx").read_bytes() == (tmp_path / "many.idx").read_bytes()


def test_writer_rejects_bad_ids(tmp_path: Path) -> None:
    with IndexedDatasetWriter(tmp_path / "ds", 100) as writer:
        with pytest.raises(ValueError, match="token id 100 outside"):
            writer.add_document([1, 100])
        with pytest.raises(ValueError, match="token id -1 outside"):
            writer.add_document(np.array([-1], dtype=np.int64))
        with pytest.raises(ValueError, match="integers"):
            writer.add_document([0.5])
        with pytest.raises(ValueError, match="lengths sum"):
            writer.add_documents(np.array([1, 2, 3]), [2])
        writer.add_document([99])
    assert IndexedDataset(tmp_path / "ds").num_docs == 1
    with pytest.raises(ValueError, match="at most 64"):
        IndexedDatasetWriter(tmp_path / "x", 100, "f" * 65)


def test_writer_exception_leaves_nothing_and_keeps_older_dataset(tmp_path: Path) -> None:
    old = [np.arange(5), np.arange(7)]
    _write(tmp_path / "ds", old)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetWriter(tmp_path / "ds", 1000, HASH) as writer:
            writer.add_document(np.arange(999))
            raise RuntimeError("boom")
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    np.testing.assert_array_equal(IndexedDataset(tmp_path / "ds").get(1), np.arange(7))

    # A fresh prefix leaves no files at all; abort() does the same without an exception.
    with pytest.raises(KeyboardInterrupt):
        with IndexedDatasetWriter(tmp_path / "new", 1000) as writer:
            writer.add_document([1, 2, 3])
            raise KeyboardInterrupt
    writer = IndexedDatasetWriter(tmp_path / "new2", 1000)
    writer.add_document([1])
    writer.abort()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]
    with pytest.raises(RuntimeError, match="aborted"):
        writer.add_document([2])


def test_finalize_replaces_an_older_dataset(tmp_path: Path) -> None:
    _write(tmp_path / "ds", [np.arange(5)])
    with IndexedDatasetWriter(tmp_path / "ds", 70_000, "cd34" * 16) as writer:
        writer.add_document([69_999, 1])
        assert sorted(path.name for path in tmp_path.iterdir() if not path.name.endswith(".tmp")) == ["ds.bin", "ds.idx"]
    dataset = IndexedDataset(tmp_path / "ds")
    assert (dataset.num_docs, dataset.vocab_size, dataset.tokenizer_hash) == (1, 70_000, "cd34" * 16)
    np.testing.assert_array_equal(dataset.get(0), [69_999, 1])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]


# ------------------------------------------------------------------------------------- corruption


def _patch_idx(prefix: Path, offset: int, fmt: str, value: object) -> None:
    path = Path(f"{prefix}.idx")
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))


def _truncate(path: Path, num_bytes: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-num_bytes])


def _grow_tokens(prefix: Path, extra: int) -> None:
    """Header and .bin agree on more tokens than the last offset covers."""
    data = Path(f"{prefix}.idx").read_bytes()
    num_tokens = struct.unpack_from("<q", data, 32)[0]
    _patch_idx(prefix, 32, "<q", num_tokens + extra)
    with open(f"{prefix}.bin", "ab") as handle:
        handle.write(b"\0\0" * extra)


CORRUPTIONS = {
    "truncated bin": (lambda p: _truncate(Path(f"{p}.bin"), 3), "ds.bin", "truncated or corrupt"),
    "flipped magic": (lambda p: _patch_idx(p, 0, "<B", MAGIC[0] ^ 0xFF), "ds.idx", "not a megalm index file"),
    "bumped version": (lambda p: _patch_idx(p, 8, "<I", VERSION + 1), "ds.idx", f"unsupported format version {VERSION + 1}"),
    "unknown dtype": (lambda p: _patch_idx(p, 12, "<I", 9), "ds.idx", "unknown dtype code 9"),
    "vocab too big for dtype": (lambda p: _patch_idx(p, 16, "<q", 70_000), "ds.idx", "does not fit the stored dtype uint16"),
    "truncated idx": (lambda p: _truncate(Path(f"{p}.idx"), 8), "ds.idx", "does not match its 20 documents"),
    "doc count": (lambda p: _patch_idx(p, 24, "<q", 21), "ds.idx", "does not match its 21 documents"),
    "offset past end": (lambda p: _patch_idx(p, HEADER_SIZE + 8 * 5, "<q", 10**9), "ds.idx", "offsets[5] = 1000000000 points past the end"),
    "offsets not monotonic": (lambda p: _patch_idx(p, HEADER_SIZE + 8 * 5, "<q", 0), "ds.idx", "not monotonic at document 4"),
    "tokens after last doc": (lambda p: _grow_tokens(p, 5), "ds.idx", "last offset 250 != 255 tokens"),
    "first offset": (lambda p: _patch_idx(p, HEADER_SIZE, "<q", 1), "ds.idx", "first offset is 1"),
    "missing idx": (lambda p: Path(f"{p}.idx").unlink(), "ds.idx", "index file missing (" ),
    "missing bin": (lambda p: Path(f"{p}.bin").unlink(), "ds.bin", "token file missing"),
    "empty idx": (lambda p: Path(f"{p}.idx").write_bytes(b""), "ds.idx", "not a megalm index file"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corruption_is_refused_naming_the_file(tmp_path: Path, case: str) -> None:
    prefix = tmp_path / "ds"
    _write(prefix, [np.arange(1, 4 + doc) for doc in range(20)])
    corrupt, file_name, expected = CORRUPTIONS[case]
    corrupt(prefix)
    with pytest.raises(DatasetFormatError) as info:
        IndexedDataset(prefix)
    message = str(info.value)
    assert expected in message
    assert str(tmp_path / file_name) in message
    assert "megalm preprocess" in message


def test_missing_idx_says_the_run_did_not_finish(tmp_path: Path) -> None:
    _write(tmp_path / "ds", [[1, 2]])
    (tmp_path / "ds.idx").unlink()
    with pytest.raises(DatasetFormatError, match="did not finish"):
        IndexedDataset(tmp_path / "ds")
    with pytest.raises(DatasetFormatError, match="neither does the .bin"):
        IndexedDataset(tmp_path / "nothing")


def test_open_does_not_read_the_tokens(tmp_path: Path) -> None:
    """A 4 GB (sparse) .bin opens as fast as a small one: only the header and offsets are read."""
    num_tokens = 2 * 1024**3
    with IndexedDatasetWriter(tmp_path / "big", 1000) as writer:
        writer.add_document([1, 2])
    _patch_idx(tmp_path / "big", 32, "<q", num_tokens)
    _patch_idx(tmp_path / "big", HEADER_SIZE + 8, "<q", num_tokens)
    with open(tmp_path / "big.bin", "r+b") as handle:
        handle.truncate(num_tokens * 2)
    start = time.perf_counter()
    dataset = IndexedDataset(tmp_path / "big")
    assert time.perf_counter() - start < 1.0
    assert dataset.num_tokens == num_tokens and dataset.get(0, 0, 2).tolist() == [1, 2]


# ------------------------------------------------------------------------------------- compatibility


def test_check_compatible(tmp_path: Path) -> None:
    _write(tmp_path / "ds", [[1, 2]], vocab_size=32000)
    dataset = IndexedDataset(tmp_path / "ds")
    check_compatible(dataset, 32000)
    check_compatible(dataset, 32000, HASH)
    check_compatible(dataset, SimpleNamespace(vocab_size=32000, hash=HASH))
    check_compatible(dataset, SimpleNamespace(vocab_size=32000, hash=""))  # unknown hash: vocab decides

    with pytest.raises(DatasetFormatError) as info:
        check_compatible(dataset, SimpleNamespace(vocab_size=2048, hash="cd34" * 16))
    message = str(info.value)
    assert "tokenized with a different vocabulary: dataset vocab 32000 (hash ab12ab12..), tokenizer vocab 2048 (hash cd34cd34..)" in message
    assert "re-run megalm preprocess with this tokenizer" in message and "ds.idx" in message

    with pytest.raises(DatasetFormatError, match="different tokenizer .same vocab size, different model.*hash ef56ef56"):
        check_compatible(dataset, 32000, "ef56" * 16)
    with pytest.raises(DatasetFormatError, match="dataset vocab 32000 .* tokenizer vocab 2048 .hash unknown."):
        check_compatible(dataset, 2048)
