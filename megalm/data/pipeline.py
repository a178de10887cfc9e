"""Build the train and valid samplers (and the tokenizer) that a config asks for.

Every check that can fail on the data (missing or corrupt files, a dataset tokenized with another
vocabulary, a model vocab that does not match the tokenizer, an empty split) runs here, before
any process group is created or any GPU time is spent.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megalm.config import Config
from megalm.data.dataset import (
    BlendedSamples,
    DocumentSamples,
    PairSamples,
    PrefixLMSamples,
    SampleSource,
    read_pairs,
    split_ranges,
)
from megalm.data.indexed import IndexedDataset, check_compatible
from megalm.data.sampler import BatchSampler
from megalm.data.synthetic import SyntheticTokenStream
from megalm.data.tokenizer import EOS_ID, AnyTokenizer, check_model_vocab, open_tokenizer

SPLITS = ("train", "valid", "test")


class DataError(ValueError):
    """The data a config points at cannot be used; the message names the file and the fix."""


@dataclass
class DataSources:
    """The sample source of each split (None where the split is empty) and the tokenizer."""

    train: SampleSource
    valid: Optional[SampleSource]
    test: Optional[SampleSource]
    tokenizer: Optional[AnyTokenizer]


def load_tokenizer(config: Config) -> Optional[AnyTokenizer]:
    """The configured tokenizer (sentencepiece or Hugging Face), checked against model.vocab_size (None for
    synthetic data)."""
    if config.data.tokenizer is None:
        return None
    tokenizer = open_tokenizer(config.data.tokenizer)
    problem = check_model_vocab(tokenizer, config.model.vocab_size)
    if problem:
        raise DataError(f"model.vocab_size={config.model.vocab_size} does not fit data.tokenizer "
                        f"{config.data.tokenizer}: {problem}")
    return tokenizer


def _blend(sources: list[SampleSource], weights: Optional[list[float]]) -> SampleSource:
    if len(sources) == 1:
        return sources[0]
    if weights is None:
        weights = [float(source.samples_per_epoch) for source in sources]
    return BlendedSamples(sources, weights)


def _indexed_sources(config: Config, tokenizer: AnyTokenizer) -> list[Optional[SampleSource]]:
    data, seq = config.data, config.model.seq_length
    per_split: list[list[SampleSource]] = [[], [], []]
    for index, prefix in enumerate(data.paths):
        dataset = IndexedDataset(prefix)
        check_compatible(dataset, tokenizer.vocab_size, tokenizer.hash)
        for split, docs in enumerate(split_ranges(dataset.num_docs, data.split_fractions())):
            if len(docs) == 0:
                continue
            name = f"{prefix} ({SPLITS[split]} split, documents {docs.start}..{docs.stop - 1})"
            try:
                per_split[split].append(DocumentSamples(dataset, docs, seq, (config.train.seed, index, split), name))
            except ValueError as error:
                raise DataError(str(error)) from None
    if data.weights is not None and any(len(p) != len(data.paths) for p in per_split if p):
        raise DataError(
            "with data.weights every dataset needs documents in each used split: a dataset is too small "
            "for data.split; use more data or change data.split"
        )
    if not per_split[0]:
        raise DataError(f"data.split={data.split!r} leaves the train split empty")
    return [_blend(sources, data.weights) if sources else None for sources in per_split]


def _pair_sources(config: Config, tokenizer: AnyTokenizer) -> list[Optional[SampleSource]]:
    data = config.data
    records = []
    for path in data.paths:
        try:
            for prefix, target in read_pairs(Path(path), data.prefix_field, data.target_field):
                # the prefix as the tokenizer encodes a text (a Hugging Face BOS included), the target bare
                records.append((tokenizer.encode(prefix), tokenizer.encode(target, add_special_tokens=False)))
        except (OSError, ValueError) as error:
            raise DataError(str(error)) from None
    sources: list[Optional[SampleSource]] = []
    for split, indices in enumerate(split_ranges(len(records), data.split_fractions())):
        chosen = [records[i] for i in indices]
        sources.append(
            PairSamples(
                chosen, config.model.seq_length, (config.train.seed, split), tokenizer.pad_id,
                tokenizer.sep_id, tokenizer.eos_id, name=f"{', '.join(data.paths)} ({SPLITS[split]} split)",
            )
            if chosen
            else None
        )
    if sources[0] is None:
        raise DataError(f"data.split={data.split!r} leaves no training pairs in {data.paths}")
    return sources


def build_sources(config: Config) -> DataSources:
    """Open, check and index the configured data; PrefixLM pretraining gets per-sample prefixes."""
    tokenizer = load_tokenizer(config)
    kind = config.data.kind
    if kind == "synthetic":
        model = config.model
        sources: list[Optional[SampleSource]] = [
            SyntheticTokenStream(model.vocab_size, model.seq_length, config.train.seed, stream=split)
            for split in range(3)
        ]
    elif kind == "indexed":
        sources = _indexed_sources(config, tokenizer)
    else:
        sources = _pair_sources(config, tokenizer)
    if config.model.family == "prefixlm" and kind != "pairs":
        low, high = config.data.prefix_fraction_min, config.data.prefix_fraction_max
        sources = [
            PrefixLMSamples(source, config.model.seq_length, low, high, seed=config.train.seed + split)
            if source is not None
            else None
            for split, source in enumerate(sources)
        ]
    if config.train.eval_interval > 0 and sources[1] is None:
        raise DataError(
            f"train.eval_interval={config.train.eval_interval} but data.split={config.data.split!r} gives "
            f"the valid split no data: give it a share (e.g. '98,1,1') or set train.eval_interval=0"
        )
    return DataSources(sources[0], sources[1], sources[2], tokenizer)


def document_eos_id(config: Config) -> Optional[int]:
    """The id that ends each document under model.document_mask (None without it): data.tokenizer's eos, or
    megalm's fixed eos id (1) for synthetic data, which then ends a document wherever the chain emits it."""
    if not config.model.document_mask:
        return None
    return EOS_ID if config.data.tokenizer is None else _eos_id_of(str(config.data.tokenizer))


@functools.lru_cache(maxsize=8)
def _eos_id_of(tokenizer: str) -> int:
    """The eos id of the tokenizer at this path, opened once (every split's sampler asks for it)."""
    return open_tokenizer(tokenizer).eos_id


def build_sampler(config: Config, source: SampleSource, dp_rank: int, dp_size: int) -> BatchSampler:
    """This data-parallel rank's view of a source, in global batches of train.global_batch_size (with each
    micro-batch's document ids under model.document_mask)."""
    return BatchSampler(
        source,
        config.train.global_batch_size,
        config.train.micro_batch_size,
        dp_rank,
        dp_size,
        prefixlm=config.model.family == "prefixlm",
        eos_id=document_eos_id(config),
    )
