"""`megalm data inspect PREFIX`: what is in a PREFIX.bin/.idx dataset, without reading all of it.

Shows the files and their sizes, the header (format version, dtype, vocab size, tokenizer hash),
document and token counts, document-length statistics with a log-binned text histogram, and, given
`--tokenizer`, a few seeded random documents decoded (a warning first when that tokenizer's hash is
not the one the dataset was made with). Only the .idx is read in full; samples touch their own
tokens in the memory map.
"""

from __future__ import annotations

import argparse
import time
import sys
from typing import Any, Optional, Sequence

import numpy as np

from megalm.data.indexed import DatasetFormatError, IndexedDataset

SAMPLE_CHARS = 300


def _size(num_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit} ({num_bytes:,} bytes)"
    return f"{num_bytes:,} bytes"


def summarize(dataset: IndexedDataset) -> dict:
    """Header fields, file sizes and document-length statistics of a dataset, as plain values."""
    lengths = dataset.doc_lengths
    stats: dict[str, Any] = {
        "prefix": str(dataset.prefix),
        "index_file": str(dataset.index_file),
        "index_bytes": dataset.index_file.stat().st_size,
        "data_file": str(dataset.data_file),
        "data_bytes": dataset.data_file.stat().st_size,
        "version": dataset.version,
        "dtype": dataset.dtype.name,
        "vocab_size": dataset.vocab_size,
        "tokenizer_hash": dataset.tokenizer_hash,
        "num_docs": dataset.num_docs,
        "num_tokens": dataset.num_tokens,
    }
    if dataset.num_docs:
        stats.update(
            min_length=int(lengths.min()),
            mean_length=float(lengths.mean()),
            median_length=float(np.median(lengths)),
            max_length=int(lengths.max()),
        )
    else:
        stats.update(min_length=0, mean_length=0.0, median_length=0.0, max_length=0)
    return stats


def length_histogram(lengths: Sequence[int] | np.ndarray, bins: int = 12, width: int = 40) -> str:
    """Text histogram of document lengths: log-spaced integer bins, one `lo - hi | count ###` row each.

    Zero-length documents, if any, get their own first row. Bins that would repeat an integer edge
    are merged, so short ranges are exact.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return "(no documents)"
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    rows: list[tuple[str, int]] = []
    zeros = int((lengths == 0).sum())
    positive = lengths[lengths > 0]
    digits = len(str(int(lengths.max())))
    if zeros:
        rows.append((f"{0:>{digits}}", zeros))
    if positive.size:
        low, high = int(positive.min()), int(positive.max())
        edges = np.unique(np.round(np.geomspace(low, high + 1, bins + 1)).astype(np.int64))
        edges[0], edges[-1] = low, high + 1
        counts = np.bincount(np.searchsorted(edges, positive, side="right") - 1, minlength=len(edges) - 1)
        for start, stop, count in zip(edges[:-1], edges[1:], counts[: len(edges) - 1]):
            label = f"{start:>{digits}}" if stop - start == 1 else f"{start:>{digits}} - {stop - 1:<{digits}}"
            rows.append((label, int(count)))
    label_width = max(len(label) for label, _ in rows)
    count_width = len(f"{max(count for _, count in rows):,}")
    most = max(count for _, count in rows)
    lines = []
    for label, count in rows:
        bar = "#" * (max(1, round(count / most * width)) if count else 0)
        lines.append(f"{label:<{label_width}} | {count:>{count_width},} {bar}".rstrip())
    return "\n".join(lines)


def _short(hash_hex: str) -> str:
    return hash_hex[:12] + ".." if hash_hex else "(unknown)"


def _sample_text(tokenizer: Any, ids: np.ndarray) -> str:
    try:
        text = tokenizer.decode([int(token) for token in ids])
    except Exception as error:  # noqa: BLE001 - a wrong tokenizer should not stop the report
        return f"<cannot decode: {error}>"
    shown = text[:SAMPLE_CHARS].replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return shown + ("..." if len(text) > SAMPLE_CHARS else "")


def sample_documents(dataset: IndexedDataset, samples: int, seed: int) -> list[int]:
    """Up to `samples` distinct document indices, chosen by `seed`, in ascending order."""
    count = min(samples, dataset.num_docs)
    if count <= 0:
        return []
    return sorted(int(doc) for doc in np.random.default_rng(seed).choice(dataset.num_docs, size=count, replace=False))


def unigram_entropy(dataset: IndexedDataset, chunk_tokens: int = 1 << 24) -> float:
    """Entropy (nats per token) of the token frequencies: the loss of a model that learned only those."""
    counts = np.zeros(max(dataset.vocab_size, 1), dtype=np.int64)
    tokens = dataset.tokens()
    for start in range(0, len(tokens), chunk_tokens):
        counts += np.bincount(np.asarray(tokens[start : start + chunk_tokens]), minlength=len(counts))
    probs = counts[counts > 0] / max(counts.sum(), 1)
    return float(-(probs * np.log(probs)).sum())


def read_speed(dataset: IndexedDataset, seq_length: int, num_samples: int = 2000, seed: int = 0) -> float:
    """Training samples of seq_length + 1 tokens read per second (shuffled order, across documents)."""
    from megalm.data.dataset import DocumentSamples

    source = DocumentSamples(dataset, range(dataset.num_docs), seq_length, (seed,))
    source.sample(0)  # build the epoch's index outside the timing
    start = time.perf_counter()
    for sample_id in range(num_samples):
        source.sample(sample_id)
    return num_samples / (time.perf_counter() - start)


def format_report(dataset: IndexedDataset, tokenizer: Any = None, samples: int = 3, seed: int = 0, bins: int = 12) -> str:
    """The full `megalm data inspect` text."""
    stats = summarize(dataset)
    lines = [
        f"dataset {stats['prefix']}",
        f"  index  {stats['index_file']}: {_size(stats['index_bytes'])}",
        f"  tokens {stats['data_file']}: {_size(stats['data_bytes'])}",
        f"format version {stats['version']}, dtype {stats['dtype']}, vocab size {stats['vocab_size']:,}",
        f"tokenizer hash {stats['tokenizer_hash'] or '(not recorded)'}",
        f"documents {stats['num_docs']:,}",
        f"tokens {stats['num_tokens']:,}",
    ]
    if stats["num_docs"]:
        lines.append(
            f"document length (tokens): min {stats['min_length']:,}, mean {stats['mean_length']:,.1f}, "
            f"median {stats['median_length']:,.1f}, max {stats['max_length']:,}"
        )
        lines.append(f"unigram entropy {unigram_entropy(dataset):.3f} nats/token (the loss of a unigram model)")
        lines.append("histogram of document lengths (log-spaced bins: tokens | documents):")
        lines.extend("  " + row for row in length_histogram(dataset.doc_lengths, bins).splitlines())
    if tokenizer is not None:
        tokenizer_hash = getattr(tokenizer, "hash", "") or ""
        if tokenizer.vocab_size != dataset.vocab_size or (
            tokenizer_hash and dataset.tokenizer_hash and tokenizer_hash != dataset.tokenizer_hash
        ):
            lines.append(
                f"warning: this tokenizer (vocab {tokenizer.vocab_size}, hash {_short(tokenizer_hash)}) is not the one "
                f"the dataset was made with (vocab {dataset.vocab_size}, hash {_short(dataset.tokenizer_hash)}); "
                f"the samples below may decode to the wrong text"
            )
        chosen = sample_documents(dataset, samples, seed)
        if chosen:
            lines.append(f"samples (seed {seed}, first {SAMPLE_CHARS} characters):")
        for doc in chosen:
            text = _sample_text(tokenizer, dataset.get(doc))
            lines.append(f"  [doc {doc}, {int(dataset.doc_lengths[doc]):,} tokens] {text}")
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        dataset = IndexedDataset(args.prefix)
        tokenizer: Optional[Any] = None
        if args.tokenizer:
            from megalm.data.tokenizer import open_tokenizer

            tokenizer = open_tokenizer(args.tokenizer)
        print(format_report(dataset, tokenizer, samples=args.samples, seed=args.seed, bins=args.bins))
        if args.read_speed:
            rate = read_speed(dataset, args.seq_length, args.read_speed)
            print(f"read speed: {rate:,.0f} samples/s of {args.seq_length + 1} tokens ({rate * args.seq_length:,.0f} tokens/s)")
    except (DatasetFormatError, ValueError, OSError) as error:  # TokenizerError is a ValueError
        print(f"megalm: error: {error}", file=sys.stderr)
        return 2
    return 0


def register_cli(data_subparsers: Any) -> argparse.ArgumentParser:
    """Add `inspect` to the `megalm data` group."""
    parser = data_subparsers.add_parser("inspect", help="summarize a PREFIX.bin/.idx dataset", description=__doc__)
    parser.add_argument("prefix", metavar="PREFIX", help="dataset prefix (PREFIX.idx and PREFIX.bin)")
    parser.add_argument("--tokenizer", metavar="TOKENIZER",
                        help="decode a few sample documents with this .model or Hugging Face tokenizer directory")
    parser.add_argument("--samples", type=int, default=3, help="documents to decode with --tokenizer (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed for choosing the sample documents")
    parser.add_argument("--bins", type=int, default=12, help="histogram bins (default: 12)")
    parser.add_argument("--read-speed", type=int, default=0, metavar="N", help="also time reading N training samples")
    parser.add_argument("--seq-length", type=int, default=2048, help="sample length for --read-speed (default: 2048)")
    parser.set_defaults(func=cmd_inspect)
    return parser
