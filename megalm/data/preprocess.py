"""`megalm preprocess`: tokenize text files into a PREFIX.bin/.idx dataset (see megalm.data.indexed).

Inputs, one document per line, read as bytes and decoded line by line so one bad line costs one
document, not the file:

- `.jsonl` / `.json` / `.ndjson`: each line is a JSON object; the document is its `text_field` string.
- anything else: plain UTF-8 text, each line is one document (the newline is not part of it; a
  line of only whitespace is an empty document). Multi-line documents need JSONL.

Lines that yield no document are skipped and counted by reason: `empty` (blank line or empty
text), `invalid_utf8`, `bad_json` (not JSON, or JSON that is not an object) and `missing_field`
(no `text_field`, or it is not a string). With `strict=True` any of these except `empty` stops
the run with `PreprocessError` naming file:line.

Tokenizing runs in `workers` processes (a ProcessPoolExecutor with the forkserver or spawn start
method, the tokenizer loaded once per worker; workers=1 tokenizes in-process). The main process
reads lines into chunks of `chunk_docs` and collects the results in input order with at most
4 x workers chunks in flight, so memory stays flat and the output is byte-identical for any worker
count. The tokenizer is `data.tokenizer`'s kind (megalm.data.tokenizer.open_tokenizer): a sentencepiece
.model, or a Hugging Face tokenizer directory, whose encode adds what AutoTokenizer adds by default (the
BOS of Llama-style tokenizers at each document's start, nothing for Qwen2). Each document gets the
tokenizer's eos id appended unless `append_eos=False` (or the tokenizer's encode already ends it with
eos: none is added twice). Output goes
through `IndexedDatasetWriter`: nothing at PREFIX.* changes until the new dataset is complete, and
a failed or interrupted run leaves an older dataset at that prefix intact.
"""

from __future__ import annotations

import argparse
import codecs
import json
import math
import multiprocessing
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, TextIO

import numpy as np

from megalm.data.indexed import DatasetFormatError, IndexedDatasetWriter, data_path, dtype_for_vocab, index_path
from megalm.durations import format_duration

SKIP_REASONS = ("empty", "invalid_utf8", "bad_json", "missing_field")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


class PreprocessError(ValueError):
    """Bad inputs or options for preprocessing; the message names the file (and line) and the fix."""


@dataclass
class PreprocessSummary:
    """What one run wrote and skipped, and how fast."""

    output_prefix: Path
    docs_written: int = 0
    tokens: int = 0
    lines_read: int = 0
    bytes_read: int = 0
    skipped: dict = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    first_skipped: dict = field(default_factory=dict)  # reason -> "file:line: detail" of its first case
    seconds: float = 0.0
    workers: int = 1

    @property
    def docs_per_second(self) -> float:
        return self.docs_written / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def describe(self) -> str:
        """One line for humans (the final summary), plus one per skip reason's first example."""
        line = (
            f"wrote {data_path(self.output_prefix)} and {index_path(self.output_prefix).name}: "
            f"{self.docs_written:,} documents, {self.tokens:,} tokens from {self.lines_read:,} lines "
            f"({self.bytes_read / 1e6:.1f} MB) in {self.seconds:.1f}s with {self.workers} worker(s): "
            f"{self.docs_per_second:,.0f} docs/s, {self.tokens_per_second:,.0f} tokens/s"
        )
        if self.num_skipped:
            counts = ", ".join(f"{reason} {count:,}" for reason, count in self.skipped.items() if count)
            line += f"; skipped {self.num_skipped:,} lines ({counts})"
            for reason, where in self.first_skipped.items():
                if reason != "empty":
                    line += f"\n  first {reason}: {where}"
        return line


# ---------------------------------------------------------------------------------------------
# Reading: bytes lines grouped into chunks (file, first line number, lines)

@dataclass
class _Chunk:
    file_index: int
    first_line: int
    is_json: bool
    lines: list


@dataclass
class _ChunkResult:
    tokens: np.ndarray  # all documents' ids, concatenated (eos included)
    lengths: np.ndarray  # int64 [documents]
    skipped: dict  # reason -> count
    first_skipped: dict  # reason -> (line number, detail)


class _Reader:
    """Iterates chunks over all inputs and counts lines and bytes as they are read."""

    def __init__(self, inputs: Sequence[Path], chunk_docs: int) -> None:
        self.inputs = inputs
        self.chunk_docs = chunk_docs
        self.lines_read = 0
        self.bytes_read = 0

    def __iter__(self) -> Iterator[_Chunk]:
        for file_index, path in enumerate(self.inputs):
            is_json = path.suffix.lower() in JSON_SUFFIXES
            with open(path, "rb") as handle:
                lines: list = []
                first_line = 1
                for line_no, raw in enumerate(handle, 1):
                    self.lines_read += 1
                    self.bytes_read += len(raw)
                    lines.append(raw)
                    if len(lines) == self.chunk_docs:
                        yield _Chunk(file_index, first_line, is_json, lines)
                        lines, first_line = [], line_no + 1
                if lines:
                    yield _Chunk(file_index, first_line, is_json, lines)


# ---------------------------------------------------------------------------------------------
# Tokenizing: runs in each worker (or in-process for workers=1)

def _load_tokenizer(path: Path) -> Any:
    from megalm.data.tokenizer import open_tokenizer

    return open_tokenizer(path)


class _ChunkTokenizer:
    """Decodes, parses and tokenizes one chunk; pure function of (tokenizer, options, chunk)."""

    def __init__(self, tokenizer: Any, text_field: str, append_eos: bool, threaded_batches: bool = True) -> None:
        self.tokenizer = tokenizer
        self.text_field = text_field
        self.append_eos = append_eos
        # sentencepiece encodes a batch on all cores: right in-process (workers=1), oversubscribed
        # when every worker process does it, so pool workers encode one document at a time.
        self.threaded_batches = threaded_batches
        self.dtype = dtype_for_vocab(tokenizer.vocab_size)

    def _document(self, raw: bytes, line_no: int, is_json: bool) -> tuple[Optional[str], str, str]:
        """(text, "", "") for a document, else (None, reason, detail)."""
        body = raw[:-1] if raw.endswith(b"\n") else raw
        if body.endswith(b"\r"):
            body = body[:-1]
        if line_no == 1 and body.startswith(codecs.BOM_UTF8):
            body = body[len(codecs.BOM_UTF8):]
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as error:
            return None, "invalid_utf8", f"invalid UTF-8 at byte {error.start} ({body[error.start:error.start + 4]!r})"
        if not text.strip():
            return None, "empty", "blank line"
        if not is_json:
            return text, "", ""
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            return None, "bad_json", f"not valid JSON ({error.msg} at column {error.colno})"
        if not isinstance(record, dict):
            return None, "bad_json", f"JSON {type(record).__name__}, expected an object with a {self.text_field!r} field"
        if self.text_field not in record:
            keys = ", ".join(repr(key) for key in list(record)[:5]) or "none"
            return None, "missing_field", f"no {self.text_field!r} field (keys: {keys}); see --text-field"
        text = record[self.text_field]
        if not isinstance(text, str):
            return None, "missing_field", f"field {self.text_field!r} is a JSON {type(text).__name__}, not a string"
        if not text.strip():
            return None, "empty", f"empty {self.text_field!r}"
        return text, "", ""

    def __call__(self, chunk: _Chunk) -> _ChunkResult:
        texts = []
        skipped = dict.fromkeys(SKIP_REASONS, 0)
        first_skipped: dict = {}
        for index, raw in enumerate(chunk.lines):
            line_no = chunk.first_line + index
            text, reason, detail = self._document(raw, line_no, chunk.is_json)
            if text is None:
                skipped[reason] += 1
                first_skipped.setdefault(reason, (line_no, detail))
            else:
                texts.append(text)
        if self.threaded_batches:
            encoded = self.tokenizer.encode_batch(texts) if texts else []
        else:
            encoded = [self.tokenizer.encode(text) for text in texts]
        # a tokenizer whose encode ends with eos (a Hugging Face post-processor) needs no second one
        eos = [self.tokenizer.eos_id] if self.append_eos and not getattr(self.tokenizer, "add_eos", False) else []
        flat: list = []
        lengths = np.empty(len(encoded), dtype=np.int64)
        for doc, ids in enumerate(encoded):
            flat.extend(ids)
            flat.extend(eos)
            lengths[doc] = len(ids) + len(eos)
        return _ChunkResult(np.array(flat, dtype=self.dtype), lengths, skipped, first_skipped)


_WORKER: Optional[_ChunkTokenizer] = None


def _init_worker(tokenizer_path: Path, loader: Callable[[Path], Any], text_field: str, append_eos: bool) -> None:
    global _WORKER
    _WORKER = _ChunkTokenizer(loader(tokenizer_path), text_field, append_eos, threaded_batches=False)


def _work(chunk: _Chunk) -> _ChunkResult:
    assert _WORKER is not None, "preprocess worker used without _init_worker"
    return _WORKER(chunk)


def _ordered_parallel_map(executor: Any, items: Iterable[_Chunk], max_pending: int) -> Iterator[_ChunkResult]:
    """Like an ordered imap (results in input order), but reads ahead at most max_pending chunks."""
    pending: deque = deque()
    for item in items:
        pending.append(executor.submit(_work, item))
        if len(pending) >= max_pending:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _mp_context() -> Any:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


# ---------------------------------------------------------------------------------------------
# Progress

class _Progress:
    """Progress of a run, by input bytes read: on a terminal a bar redrawn in place every `interval`
    seconds (default 0.25); elsewhere (a log file, a pipe) one plain line every `interval` seconds
    (default 30), so a log holds a readable history rather than carriage returns."""

    BAR_WIDTH = 30

    def __init__(
        self, enabled: bool, stream: Optional[TextIO] = None, total_bytes: int = 0, interval: Optional[float] = None
    ) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if interval is not None else (0.25 if self.tty else 30.0)
        self.total_bytes = total_bytes
        self.start = time.perf_counter()
        self.last_draw = self.start if not self.tty else 0.0  # a log's first line comes after one interval
        self.width = 0

    def update(self, docs: int, tokens: int, bytes_read: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self.last_draw < self.interval:
            return
        self.last_draw = now
        elapsed = max(now - self.start, 1e-9)
        fraction = min(bytes_read / self.total_bytes, 1.0) if self.total_bytes else 1.0
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else float("inf")
        eta_text = f"ETA {format_duration(eta)}" if math.isfinite(eta) else "ETA ?"
        rates = (
            f"{docs:,} docs, {tokens:,} tokens | {docs / elapsed:,.0f} docs/s, {tokens / elapsed:,.0f} tokens/s, "
            f"{bytes_read / 1e6 / elapsed:,.1f} MB/s"
        )
        done = f"{bytes_read / 1e6:,.1f}/{self.total_bytes / 1e6:,.1f} MB read"
        if self.tty:
            filled = int(round(self.BAR_WIDTH * fraction))
            bar = "#" * filled + "." * (self.BAR_WIDTH - filled)
            line = f"preprocess [{bar}] {100 * fraction:5.1f}% {done} | {rates} | {eta_text}"
            self.stream.write("\r" + line.ljust(self.width))
            self.width = len(line)
        else:
            self.stream.write(f"preprocess: {100 * fraction:.1f}% ({done}) | {rates} | {eta_text}\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled and self.tty and self.width:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------------------------------

def _check_inputs(inputs: Sequence[Path], output_prefix: Path, tokenizer_path: Path, workers: int, chunk_docs: int) -> None:
    if not inputs:
        raise PreprocessError("no input files given; pass at least one --input FILE")
    missing = [str(path) for path in inputs if not path.exists()]
    if missing:
        raise PreprocessError(f"input file(s) not found: {', '.join(missing)}")
    not_files = [str(path) for path in inputs if not path.is_file()]
    if not_files:
        raise PreprocessError(f"input(s) are not regular files: {', '.join(not_files)}; pass the files inside")
    if not (tokenizer_path.is_file() or tokenizer_path.is_dir() or Path(f"{tokenizer_path}.model").is_file()):
        raise PreprocessError(
            f"tokenizer model {tokenizer_path} not found; train one with `megalm tokenizer train` or pass --tokenizer "
            f"(a sentencepiece .model or a Hugging Face tokenizer directory)"
        )
    if output_prefix.is_dir() or str(output_prefix).endswith(("/", "\\")) or not output_prefix.name:
        raise PreprocessError(
            f"--output-prefix {output_prefix} names a directory; give a path prefix such as {output_prefix}/corpus "
            f"(the files become PREFIX.bin and PREFIX.idx)"
        )
    if workers < 1:
        raise PreprocessError(f"workers must be at least 1, got {workers}")
    if chunk_docs < 1:
        raise PreprocessError(f"chunk_docs must be at least 1, got {chunk_docs}")


def preprocess(
    inputs: Sequence[Path],
    output_prefix: Path,
    tokenizer_path: Path,
    text_field: str = "text",
    workers: int = 1,
    append_eos: bool = True,
    strict: bool = False,
    chunk_docs: int = 256,
    progress: bool = True,
    tokenizer_loader: Optional[Callable[[Path], Any]] = None,
    progress_stream: Optional[TextIO] = None,
    progress_interval: Optional[float] = None,
) -> PreprocessSummary:
    """Tokenize `inputs` into OUTPUT_PREFIX.bin/.idx; returns counts and throughput.

    `tokenizer_loader(path)` replaces `open_tokenizer` (tests, custom tokenizers); with workers > 1
    it must be picklable, i.e. a module-level function. `progress_interval`: seconds between progress
    updates (default 0.25 on a terminal, 30 otherwise: see _Progress).
    """
    inputs = [Path(path) for path in inputs]
    output_prefix, tokenizer_path = Path(output_prefix), Path(tokenizer_path)
    _check_inputs(inputs, output_prefix, tokenizer_path, workers, chunk_docs)
    loader = tokenizer_loader or _load_tokenizer
    tokenizer = loader(tokenizer_path)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)

    summary = PreprocessSummary(output_prefix=output_prefix, workers=workers)
    reader = _Reader(inputs, chunk_docs)
    status = _Progress(progress, progress_stream, sum(path.stat().st_size for path in inputs), progress_interval)
    start = time.perf_counter()
    pool = None
    try:
        with IndexedDatasetWriter(output_prefix, tokenizer.vocab_size, getattr(tokenizer, "hash", "") or "") as writer:
            if workers == 1:
                tokenize_chunk = _ChunkTokenizer(tokenizer, text_field, append_eos)
                results: Iterator[tuple[_Chunk, _ChunkResult]] = ((chunk, tokenize_chunk(chunk)) for chunk in reader)
            else:
                # A process pool that raises BrokenProcessPool if a worker dies or cannot load the
                # tokenizer (multiprocessing.Pool would respawn it and wait forever).
                pool = ProcessPoolExecutor(
                    workers, mp_context=_mp_context(), initializer=_init_worker,
                    initargs=(tokenizer_path, loader, text_field, append_eos),
                )
                chunks: deque = deque()  # chunks in flight, to name file:line for their results

                def remembered() -> Iterator[_Chunk]:
                    for chunk in reader:
                        chunks.append(chunk)
                        yield chunk

                results = ((chunks.popleft(), result) for result in _ordered_parallel_map(pool, remembered(), 4 * workers))
            for chunk, result in results:
                path = inputs[chunk.file_index]
                for reason, (line_no, detail) in sorted(result.first_skipped.items(), key=lambda item: item[1][0]):
                    if strict and reason != "empty":
                        raise PreprocessError(
                            f"{path}:{line_no}: {detail} (strict mode; drop --strict to skip and count such lines)"
                        )
                    summary.first_skipped.setdefault(reason, f"{path}:{line_no}: {detail}")
                for reason, count in result.skipped.items():
                    summary.skipped[reason] += count
                writer.add_documents(result.tokens, result.lengths)
                summary.docs_written += len(result.lengths)
                summary.tokens += int(result.tokens.size)
                status.update(summary.docs_written, summary.tokens, reader.bytes_read)
            summary.lines_read, summary.bytes_read = reader.lines_read, reader.bytes_read
            if summary.docs_written == 0:
                counts = ", ".join(f"{reason} {count}" for reason, count in summary.skipped.items() if count) or "none"
                raise PreprocessError(
                    f"no documents in {', '.join(str(path) for path in inputs)}: {summary.lines_read} lines read, "
                    f"all skipped ({counts}); nothing written"
                )
            status.update(summary.docs_written, summary.tokens, reader.bytes_read, force=True)
            writer.finalize()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # in-flight chunks are small; the rest never start
        status.finish()
    summary.seconds = time.perf_counter() - start
    return summary


# ---------------------------------------------------------------------------------------------
# CLI

def _error_types() -> tuple:
    types: list = [PreprocessError, DatasetFormatError, OSError, ValueError]
    try:
        from megalm.data.tokenizer import TokenizerError

        types.append(TokenizerError)
    except ImportError:
        pass
    return tuple(types)


def cmd_preprocess(args: argparse.Namespace) -> int:
    try:
        summary = preprocess(
            args.input, args.output_prefix, args.tokenizer, text_field=args.text_field, workers=args.workers,
            append_eos=not args.no_eos, strict=args.strict, progress=not args.no_progress,
            progress_interval=args.progress_interval,
        )
    except _error_types() as error:
        print(f"megalm: error: {error}", file=sys.stderr)
        return 2
    except BrokenProcessPool as error:
        print(f"megalm: error: a preprocess worker died ({error}); rerun with --workers 1 to see the cause", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("megalm: interrupted; nothing written (an earlier dataset at that prefix is untouched)", file=sys.stderr)
        return 130
    print(summary.describe())
    return 0


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add `megalm preprocess` to the top-level sub-commands."""
    parser = subparsers.add_parser(
        "preprocess",
        help="tokenize JSONL/text files into a PREFIX.bin/.idx dataset",
        description=__doc__.split("\n\n")[0] + " JSONL/JSON: one object per line; other files: one document per line.",
    )
    parser.add_argument("--input", nargs="+", required=True, type=Path, metavar="FILE",
                        help=".jsonl/.json (one JSON object per line) or plain text (one document per line)")
    parser.add_argument("--output-prefix", required=True, type=Path, metavar="PREFIX",
                        help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer", required=True, type=Path, metavar="TOKENIZER",
                        help="sentencepiece .model file, or Hugging Face tokenizer directory (tokenizer.json)")
    parser.add_argument("--text-field", default="text", help="JSON field holding the document text (default: text)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    parser.add_argument("--no-eos", action="store_true", help="do not append the eos id to each document")
    parser.add_argument("--strict", action="store_true",
                        help="fail on the first invalid UTF-8 / bad JSON / missing-field line instead of skipping it")
    parser.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    parser.add_argument("--progress-interval", type=float, metavar="SECONDS",
                        help="seconds between progress updates on stderr: a bar redrawn in place on a terminal "
                             "(default 0.25), one line each otherwise, e.g. a log file (default 30)")
    parser.set_defaults(func=cmd_preprocess)
    return parser
