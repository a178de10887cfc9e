"""Data statistics for the start-up log: documents and tokens per split, and the epochs a run takes.

Works on the sample sources `build_sources` returns (token files, blends, pairs, the synthetic stream)
without reading any token: sizes come from the index (document lengths) or the pairs in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from megalm.config import Config
from megalm.data.dataset import BlendedSamples, DocumentSamples, PairSamples, PrefixLMSamples
from megalm.data.pipeline import SPLITS, DataSources


@dataclass
class SplitStats:
    """One split's size; None for the synthetic stream, which is endless and never repeats."""

    documents: Optional[int]
    tokens: Optional[int]
    samples_per_epoch: Optional[int]


def split_stats(source: Any) -> SplitStats:
    """Documents (pairs for JSONL pairs), tokens and samples per epoch of one split's source."""
    if isinstance(source, PrefixLMSamples):
        return split_stats(source.source)
    if isinstance(source, BlendedSamples):
        parts = [split_stats(inner) for inner in source.sources]
        if any(part.documents is None for part in parts):
            return SplitStats(None, None, None)
        return SplitStats(
            sum(p.documents for p in parts), sum(p.tokens for p in parts), sum(p.samples_per_epoch for p in parts)
        )
    if isinstance(source, DocumentSamples):
        return SplitStats(len(source.docs), source.tokens, source.samples_per_epoch)
    if isinstance(source, PairSamples):
        # prefix <sep> target <eos>, before padding to seq_length + 1
        tokens = sum(len(prefix) + len(target) + 2 for prefix, target in source.records)
        return SplitStats(len(source.records), tokens, len(source.records))
    return SplitStats(None, None, None)


def epochs(source: Any, samples: float) -> Optional[float]:
    """How many times reading `samples` samples from `source` goes through its data (a blend: its most
    repeated dataset, each read in proportion to its weight); None for a stream that never repeats."""
    if isinstance(source, PrefixLMSamples):
        return epochs(source.source, samples)
    if isinstance(source, BlendedSamples):
        total = float(sum(source.weights))
        each = [epochs(inner, samples * weight / total) for inner, weight in zip(source.sources, source.weights)]
        return None if any(e is None for e in each) else max(each)
    size = split_stats(source).samples_per_epoch
    return samples / size if size else None


def _count(value: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(value)


def describe_data(config: Config, sources: DataSources) -> tuple[list[str], Optional[str]]:
    """Start-up log lines (one per split, then the epochs) and a warning when the run will read its train
    split more than data.max_epochs_warning times (None otherwise)."""
    lines = []
    for name in SPLITS:
        source = getattr(sources, name)
        if source is None:
            lines.append(f"data {name}: empty")
            continue
        stats = split_stats(source)
        if stats.documents is None:
            lines.append(f"data {name}: {config.data.kind} stream (endless, never repeats)")
            continue
        unit = "pairs" if config.data.kind == "pairs" else "documents"
        lines.append(
            f"data {name}: {stats.documents:,} {unit}, {_count(stats.tokens)} tokens, "
            f"{stats.samples_per_epoch:,} samples of {config.model.seq_length} tokens per epoch"
        )
    samples = config.train.steps * config.train.global_batch_size
    run_epochs = epochs(sources.train, samples)
    if run_epochs is None:
        return lines, None
    lines.append(
        f"data: train.steps {config.train.steps:,} x global batch {config.train.global_batch_size:,} = "
        f"{samples:,} samples: {run_epochs:.2f} epochs of the train split"
    )
    threshold = config.data.max_epochs_warning
    warning = None
    if threshold is not None and run_epochs > threshold:
        warning = (
            f"the run will read its train split {run_epochs:.1f} times ({samples:,} samples, "
            f"data.max_epochs_warning={threshold:g}): it may memorise rather than learn; add data or lower "
            f"train.steps (or raise data.max_epochs_warning)"
        )
    return lines, warning
