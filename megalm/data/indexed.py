"""The on-disk token format: a PREFIX.bin of raw token ids and a PREFIX.idx that describes it.

A dataset is two files next to each other. Both are written by `IndexedDatasetWriter` and read by
`IndexedDataset`, which maps the tokens with `np.memmap` so opening costs a header read plus the
offsets array, never a scan of the tokens.

PREFIX.bin
    Every document's token ids, concatenated, no header, no separators. Element type is the
    dataset's dtype (little-endian): uint16 when the vocabulary fits (vocab_size <= 65536), else
    int32. Its size is exactly num_tokens * itemsize. The writer stores ids as given; the caller
    appends the end-of-document id if it wants one (`megalm preprocess` does).

PREFIX.idx (all integers little-endian)
    offset  size  field
    0       8     magic, b"MGLMIDX\\x00"
    8       4     uint32 format version (currently 1)
    12      4     uint32 dtype code: 1 = uint16, 2 = int32
    16      8     int64 vocab size of the tokenizer that produced the ids (every id is below it)
    24      8     int64 number of documents N
    32      8     int64 number of tokens T
    40      64    tokenizer hash: sha256 hex of the tokenizer model, ASCII, padded with NUL bytes
                  (all NUL when unknown)
    104     8*(N+1)  int64 token offsets: document i is tokens[offsets[i]:offsets[i+1]];
                  offsets[0] = 0, non-decreasing, offsets[N] = T
    The file is exactly 104 + 8 * (N + 1) bytes. Zero documents is a valid (empty) dataset:
    offsets = [0] and an empty .bin. Zero-length documents are allowed by the format.

Completeness and crash safety: the writer streams into uniquely named temporary files in the same
directory (PREFIX.bin.*.tmp, PREFIX.idx.*.tmp) and only `finalize` moves them into place: fsync
both, remove any old PREFIX.idx, rename the .bin, rename the .idx, fsync the directory. The .idx is
the "complete" marker: a PREFIX.bin without a PREFIX.idx is an unfinished or replaced dataset and
is refused on open. An exception inside the writer's `with` block (or `abort()`) deletes the
temporary files and leaves any earlier finished dataset with the same prefix untouched.

Validation on open raises `DatasetFormatError` naming the file, the problem and the fix: a missing
file, bad magic, unsupported version or dtype code, an .idx whose size disagrees with its document
count, a .bin whose size disagrees with the token count (truncated or corrupt), and offsets that
decrease, start away from 0, or end anywhere but num_tokens.
"""

from __future__ import annotations

import os
import struct
import tempfile
from array import array
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from megalm.fsutil import fsync_dir as _fsync_dir

MAGIC = b"MGLMIDX\x00"
VERSION = 1
HASH_BYTES = 64
# magic, version, dtype code, vocab size, num docs, num tokens, tokenizer hash
_HEADER = struct.Struct(f"<8sIIqqq{HASH_BYTES}s")
HEADER_SIZE = _HEADER.size  # 104, a multiple of 8 so the offsets are aligned

_DTYPE_BY_CODE = {1: np.dtype("<u2"), 2: np.dtype("<i4")}
_CODE_BY_DTYPE = {dtype: code for code, dtype in _DTYPE_BY_CODE.items()}
_RERUN = "re-run `megalm preprocess` to rebuild it"


class DatasetFormatError(ValueError):
    """A dataset file is missing, incomplete, corrupt, or made for another tokenizer."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Smallest stored dtype for ids below vocab_size: uint16 up to 65536 ids, else int32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return np.dtype("<u2")
    if vocab_size <= 1 << 31:
        return np.dtype("<i4")
    raise ValueError(f"vocab_size {vocab_size} does not fit int32 token ids")


def index_path(prefix: Union[str, Path]) -> Path:
    return Path(f"{prefix}.idx")


def data_path(prefix: Union[str, Path]) -> Path:
    return Path(f"{prefix}.bin")


class IndexedDatasetWriter:
    """Stream documents into PREFIX.bin/.idx; nothing named PREFIX.* appears until `finalize`.

    Use as a context manager: a clean exit finalizes, an exception aborts (temporary files removed,
    an older dataset at the same prefix kept).
    """

    def __init__(self, prefix: Union[str, Path], vocab_size: int, tokenizer_hash: str = "") -> None:
        self.prefix = Path(prefix)
        self.vocab_size = int(vocab_size)
        self.dtype = dtype_for_vocab(self.vocab_size)
        hash_bytes = tokenizer_hash.encode("ascii")
        if len(hash_bytes) > HASH_BYTES:
            raise ValueError(f"tokenizer_hash must be at most {HASH_BYTES} ASCII characters, got {len(hash_bytes)}")
        self.tokenizer_hash = tokenizer_hash
        self._lengths = array("q")
        self._num_tokens = 0
        self._state = "open"
        directory = self.prefix.parent
        if not directory.is_dir():
            raise FileNotFoundError(f"output directory {directory} does not exist (for dataset prefix {self.prefix})")
        name = self.prefix.name
        bin_fd, bin_tmp = tempfile.mkstemp(dir=directory, prefix=f"{name}.bin.", suffix=".tmp")
        self._bin_tmp = Path(bin_tmp)
        self._bin_file = os.fdopen(bin_fd, "wb", buffering=1 << 20)
        self._idx_tmp: Optional[Path] = None

    @property
    def num_docs(self) -> int:
        return len(self._lengths)

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"IndexedDatasetWriter for {self.prefix} is already {self._state}")

    def _check_range(self, ids: np.ndarray, what: str) -> None:
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0]
            raise ValueError(f"{what}: token id {int(bad)} outside [0, {self.vocab_size}) for {self.prefix}")

    def add_document(self, ids: Union[Sequence[int], np.ndarray]) -> None:
        """Append one document's ids as given (add the eos id yourself if you want one)."""
        self._check_open()
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"document {self.num_docs}: expected a 1-D sequence of ids, got shape {ids.shape}")
        self.add_documents(ids, [ids.size])

    def add_documents(self, tokens: np.ndarray, lengths: Sequence[int]) -> None:
        """Append many documents at once: `tokens` concatenated, document i has lengths[i] ids."""
        self._check_open()
        tokens = np.asarray(tokens)
        lengths_arr = np.asarray(lengths, dtype=np.int64)
        if tokens.ndim != 1 or lengths_arr.ndim != 1:
            raise ValueError("add_documents expects 1-D tokens and 1-D lengths")
        if (lengths_arr < 0).any() or int(lengths_arr.sum()) != tokens.size:
            raise ValueError(f"lengths sum to {int(lengths_arr.sum())} but {tokens.size} tokens were given")
        if tokens.size:
            if not np.issubdtype(tokens.dtype, np.integer):
                raise ValueError(f"ids must be integers, got dtype {tokens.dtype}")
            last = self.num_docs + len(lengths_arr) - 1
            self._check_range(tokens, f"document {last}" if last == self.num_docs else f"documents {self.num_docs}..{last}")
        self._bin_file.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._lengths.extend(lengths_arr.tolist())
        self._num_tokens += int(tokens.size)

    def finalize(self) -> None:
        """Flush and fsync, write the .idx, then rename .bin and (last) .idx into place."""
        self._check_open()
        try:
            self._bin_file.flush()
            os.fsync(self._bin_file.fileno())
            self._bin_file.close()
            offsets = np.zeros(self.num_docs + 1, dtype="<i8")
            if self.num_docs:
                np.cumsum(np.frombuffer(self._lengths, dtype=np.int64), out=offsets[1:])
            header = _HEADER.pack(
                MAGIC, VERSION, _CODE_BY_DTYPE[self.dtype], self.vocab_size, self.num_docs, self._num_tokens,
                self.tokenizer_hash.encode("ascii"),
            )
            idx_fd, idx_tmp = tempfile.mkstemp(dir=self.prefix.parent, prefix=f"{self.prefix.name}.idx.", suffix=".tmp")
            self._idx_tmp = Path(idx_tmp)
            with os.fdopen(idx_fd, "wb") as idx_file:
                idx_file.write(header)
                idx_file.write(offsets.tobytes())
                idx_file.flush()
                os.fsync(idx_file.fileno())
            for tmp in (self._bin_tmp, self._idx_tmp):
                os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; finished files get the usual mode
            # An old .idx must never describe the new .bin, so it goes first; from here until the
            # last rename a reader sees "missing .idx", which is the truth.
            index_path(self.prefix).unlink(missing_ok=True)
            os.replace(self._bin_tmp, data_path(self.prefix))
            os.replace(self._idx_tmp, index_path(self.prefix))
            _fsync_dir(self.prefix.parent)
        except BaseException:
            self.abort()
            raise
        self._state = "finalized"

    def abort(self) -> None:
        """Drop everything written so far; finished files from an earlier run stay as they were."""
        if self._state == "finalized":
            return
        self._state = "aborted"
        if not self._bin_file.closed:
            self._bin_file.close()
        for tmp in (self._bin_tmp, self._idx_tmp):
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.finalize()

    def __del__(self) -> None:
        if getattr(self, "_state", None) == "open":
            self.abort()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class IndexedDataset:
    """Read-only view of PREFIX.bin/.idx: the tokens memory-mapped, the offsets in memory."""

    def __init__(self, prefix: Union[str, Path]) -> None:
        self.prefix = Path(prefix)
        self.index_file = index_path(self.prefix)
        self.data_file = data_path(self.prefix)
        if not self.index_file.is_file():
            if self.prefix.suffix in (".bin", ".idx") and index_path(self.prefix.with_suffix("")).is_file():
                raise DatasetFormatError(
                    f"{self.prefix}: give the token files' prefix, without {self.prefix.suffix}: "
                    f"data.paths=[{self.prefix.with_suffix('')}] (it names both {self.prefix.with_suffix('.bin').name} "
                    f"and {self.prefix.with_suffix('.idx').name})"
                )
            hint = (
                f"{self.data_file} exists without it, so the run that wrote it did not finish"
                if self.data_file.exists() else "neither does the .bin"
            )
            raise DatasetFormatError(f"{self.index_file}: index file missing ({hint}); {_RERUN}")
        if not self.data_file.is_file():
            raise DatasetFormatError(f"{self.data_file}: token file missing (its index {self.index_file} exists); {_RERUN}")

        idx_size = self.index_file.stat().st_size
        with open(self.index_file, "rb") as idx:
            raw = idx.read(HEADER_SIZE)
            if len(raw) < len(MAGIC) or raw[: len(MAGIC)] != MAGIC:
                raise DatasetFormatError(
                    f"{self.index_file}: not a megalm index file (magic {raw[:len(MAGIC)]!r}, expected {MAGIC!r}); {_RERUN}"
                )
            if len(raw) < HEADER_SIZE:
                raise DatasetFormatError(f"{self.index_file}: header truncated ({len(raw)} of {HEADER_SIZE} bytes); {_RERUN}")
            _, version, dtype_code, vocab_size, num_docs, num_tokens, hash_raw = _HEADER.unpack(raw)
            if version != VERSION:
                raise DatasetFormatError(
                    f"{self.index_file}: unsupported format version {version} (this megalm reads version {VERSION}); "
                    f"{_RERUN} with this version of megalm"
                )
            if dtype_code not in _DTYPE_BY_CODE:
                raise DatasetFormatError(
                    f"{self.index_file}: unknown dtype code {dtype_code} (known: "
                    f"{', '.join(f'{c}={d.name}' for c, d in _DTYPE_BY_CODE.items())}); {_RERUN}"
                )
            self.dtype = _DTYPE_BY_CODE[dtype_code]
            if vocab_size <= 0 or num_docs < 0 or num_tokens < 0:
                raise DatasetFormatError(
                    f"{self.index_file}: corrupt header (vocab size {vocab_size}, {num_docs} documents, "
                    f"{num_tokens} tokens); {_RERUN}"
                )
            if vocab_size > np.iinfo(self.dtype).max + 1:
                raise DatasetFormatError(
                    f"{self.index_file}: vocab size {vocab_size} does not fit the stored dtype {self.dtype.name}; {_RERUN}"
                )
            expected_idx = HEADER_SIZE + 8 * (num_docs + 1)
            if idx_size != expected_idx:
                raise DatasetFormatError(
                    f"{self.index_file}: size {idx_size} bytes does not match its {num_docs} documents "
                    f"(expected {expected_idx}); the file is truncated or corrupt; {_RERUN}"
                )
            offsets = np.fromfile(idx, dtype="<i8", count=num_docs + 1)
        try:
            tokenizer_hash = hash_raw.rstrip(b"\x00").decode("ascii")
        except UnicodeDecodeError:
            raise DatasetFormatError(f"{self.index_file}: tokenizer hash field is not ASCII; {_RERUN}") from None

        bin_size = self.data_file.stat().st_size
        if bin_size != num_tokens * self.dtype.itemsize:
            raise DatasetFormatError(
                f"{self.data_file}: size {bin_size} bytes, but {self.index_file} says {num_tokens} tokens of "
                f"{self.dtype.name} = {num_tokens * self.dtype.itemsize} bytes; the .bin is truncated or corrupt "
                f"(or belongs to another run); {_RERUN}"
            )
        if offsets[0] != 0:
            raise DatasetFormatError(
                f"{self.index_file}: corrupt offsets: first offset is {offsets[0]}, expected 0; {_RERUN}"
            )
        beyond = (offsets < 0) | (offsets > num_tokens)
        if beyond.any():
            entry = int(np.argmax(beyond))
            raise DatasetFormatError(
                f"{self.index_file}: corrupt offsets: offsets[{entry}] = {offsets[entry]} points "
                f"past the end of the {num_tokens} tokens; {_RERUN}"
            )
        lengths = np.diff(offsets)
        if num_docs and lengths.min() < 0:
            doc = int(np.argmax(lengths < 0))
            raise DatasetFormatError(
                f"{self.index_file}: corrupt offsets: not monotonic at document {doc} "
                f"({offsets[doc]} then {offsets[doc + 1]}); {_RERUN}"
            )
        if offsets[-1] != num_tokens:
            raise DatasetFormatError(
                f"{self.index_file}: corrupt offsets: last offset {offsets[-1]} != {num_tokens} tokens; {_RERUN}"
            )

        self.version = version
        self.vocab_size = int(vocab_size)
        self.num_docs = int(num_docs)
        self.num_tokens = int(num_tokens)
        self.tokenizer_hash = tokenizer_hash
        self.doc_offsets = offsets
        self.doc_lengths = lengths
        if num_tokens:
            self._tokens: np.ndarray = np.memmap(self.data_file, dtype=self.dtype, mode="r", shape=(num_tokens,))
        else:  # mmap of an empty file is an error on most platforms
            self._tokens = np.zeros(0, dtype=self.dtype)

    def __len__(self) -> int:
        return self.num_docs

    def __getitem__(self, doc: int) -> np.ndarray:
        return self.get(doc)

    def __repr__(self) -> str:
        return (f"IndexedDataset({str(self.prefix)!r}, docs={self.num_docs}, tokens={self.num_tokens}, "
                f"vocab={self.vocab_size}, dtype={self.dtype.name})")

    def get(self, doc: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens [offset, offset+length) of document `doc` (to its end if length is None); a view, no copy."""
        if not 0 <= doc < self.num_docs:
            raise IndexError(f"document {doc} out of range: {self.prefix} has {self.num_docs} documents")
        doc_length = int(self.doc_lengths[doc])
        if length is None:
            length = doc_length - offset
        if offset < 0 or length < 0 or offset + length > doc_length:
            raise IndexError(f"slice [{offset}, {offset + length}) outside document {doc} of length {doc_length}")
        start = int(self.doc_offsets[doc]) + offset
        return self._tokens[start : start + length]

    def tokens(self) -> np.ndarray:
        """All tokens, concatenated (a read-only np.memmap; a plain empty array when there are none)."""
        return self._tokens


def _short(hash_hex: str) -> str:
    return f"{hash_hex[:8]}.." if hash_hex else "unknown"


def check_compatible(
    dataset: IndexedDataset, tokenizer_or_vocab_size: Any, tokenizer_hash: Optional[str] = None
) -> None:
    """Refuse a dataset made with another vocabulary than the configured tokenizer's.

    Pass a tokenizer (its vocab_size and hash are used) or a vocab size and optional hash. Hashes
    are compared only when both sides know one.
    """
    if isinstance(tokenizer_or_vocab_size, (int, np.integer)):
        vocab_size = int(tokenizer_or_vocab_size)
        other_hash = tokenizer_hash or ""
    else:
        vocab_size = int(tokenizer_or_vocab_size.vocab_size)
        other_hash = tokenizer_hash if tokenizer_hash is not None else (getattr(tokenizer_or_vocab_size, "hash", "") or "")
    vocab_differs = vocab_size != dataset.vocab_size
    hash_differs = bool(other_hash and dataset.tokenizer_hash and other_hash != dataset.tokenizer_hash)
    if vocab_differs or hash_differs:
        what = "vocabulary" if vocab_differs else "tokenizer (same vocab size, different model)"
        raise DatasetFormatError(
            f"{dataset.index_file}: tokenized with a different {what}: dataset vocab {dataset.vocab_size} "
            f"(hash {_short(dataset.tokenizer_hash)}), tokenizer vocab {vocab_size} (hash {_short(other_hash)}); "
            f"re-run megalm preprocess with this tokenizer"
        )
