"""SentencePiece tokenizer: training from text/JSONL, loading with id checks, exact round-trip encode/decode.

Every megalm tokenizer has the same fixed special ids (pad=0, eos=1, unk=2, <sep>=3, no BOS) and is
trained so that ``decode(encode(text)) == text`` for any Unicode text:

- ``byte_fallback``: a character outside the vocabulary becomes its UTF-8 bytes, never ``unk``;
- ``normalization_rule_name="identity"``: no NFKC, so full-width punctuation (，。！？“”) survives;
- ``remove_extra_whitespaces=False``: runs of spaces, leading and trailing spaces are kept;
- ``add_dummy_prefix=False``: no invented leading space, so ``encode(a) + encode(b)`` decodes to ``a + b``;
- ``<sep>`` is a control symbol: only ever inserted by id, so the text "<sep>" in a document stays text.

SentencePiece writes a space as the meta symbol U+2581 and decodes that symbol back to a space. A literal
U+2581 in the input would therefore come back as a space; ``encode`` sends it as its three byte pieces.

``open_tokenizer(path)`` is what every command uses for ``data.tokenizer``: a .model file gives this class,
a Hugging Face tokenizer directory (tokenizer.json) gives megalm.data.hf_tokenizer.HFTokenizer.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import re
import struct
import sys
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

from megalm.data import TokenizerError, checked_ids  # TokenizerError: callers import it from here too

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
SEP_ID = 3
SEP_PIECE = "<sep>"

PathLike = Union[str, Path]
AnyTokenizer = Any  # a Tokenizer or a megalm.data.hf_tokenizer.HFTokenizer (open_tokenizer gives either)
MODEL_TYPES = ("bpe", "unigram")
MAX_SENTENCE_BYTES = 16384  # longer lines are cut into chunks below this (sentencepiece drops longer ones)
_META = "\u2581"  # sentencepiece's whitespace symbol
_PROTO_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}

logger = logging.getLogger("megalm")


# --------------------------------------------------------------------------------------------- training


def _split_long(line: str) -> Iterator[str]:
    """Yield ``line`` in chunks that fit sentencepiece's max_sentence_length (4 bytes per char at most)."""
    if len(line.encode("utf-8")) <= MAX_SENTENCE_BYTES:
        yield line
        return
    step = MAX_SENTENCE_BYTES // 4
    for start in range(0, len(line), step):
        yield line[start : start + step]


def _is_json_input(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".json", ".ndjson")


class _SentenceReader:
    """Iterates the training sentences of all inputs: one line = one sentence; JSONL gives `text_field`."""

    def __init__(self, inputs: Sequence[Path], text_field: str) -> None:
        self.inputs = inputs
        self.text_field = text_field
        self.num_sentences = 0
        self.skipped: dict[Path, int] = {}

    def _texts(self, path: Path) -> Iterator[str]:
        with open(path, encoding="utf-8", errors="replace", newline="") as handle:
            if not _is_json_input(path):
                yield from handle
                return
            for line in handle:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    text = record[self.text_field]
                    if not isinstance(text, str):
                        raise TypeError(text)
                except (ValueError, KeyError, TypeError, IndexError):
                    self.skipped[path] = self.skipped.get(path, 0) + 1
                    continue
                yield text

    def __iter__(self) -> Iterator[str]:
        for path in self.inputs:
            for text in self._texts(path):
                for line in text.splitlines():
                    if line.strip():
                        for chunk in _split_long(line):
                            self.num_sentences += 1
                            yield chunk


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name beside `path`, then rename, so a reader never sees a half file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _sentencepiece_error(error: Exception, vocab_size: int, inputs: Sequence[Path]) -> TokenizerError:
    """Turn a sentencepiece trainer failure into a message that says what to change."""
    message = str(error)
    files = ", ".join(str(p) for p in inputs)
    too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if too_high:
        return TokenizerError(
            f"vocab_size {vocab_size} is too large for the training data in {files}: it supports at most "
            f"{too_high.group(2)} pieces; pass --vocab-size {too_high.group(2)} or less, or train on more text"
        )
    if "Vocabulary size too high" in message:
        return TokenizerError(f"vocab_size {vocab_size} is too large for the data in {files}; lower --vocab-size")
    too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_small:
        return TokenizerError(
            f"vocab_size {vocab_size} is too small for the training data in {files}: its characters plus the "
            f"special and 256 byte pieces need {too_small.group(2)}; raise --vocab-size to at least "
            f"{too_small.group(2)} or lower --character-coverage"
        )
    return TokenizerError(f"sentencepiece failed to train on {files} with vocab_size {vocab_size}: {message}")


def train_tokenizer(
    inputs: Sequence[PathLike],
    model_prefix: PathLike,
    vocab_size: int,
    model_type: str = "bpe",
    text_field: str = "text",
    character_coverage: float = 0.9995,
    max_sentences: int = 2_000_000,
    num_threads: Optional[int] = None,
    *,
    verbose: bool = False,
) -> Path:
    """Train a round-trip-exact sentencepiece model; write <prefix>.model, .vocab and .json; return the .model path."""
    import sentencepiece as spm

    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    paths = [Path(p) for p in inputs]
    if not paths:
        raise TokenizerError("no training inputs given; pass one or more text or JSONL files with --input")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise TokenizerError(f"training input not found: {', '.join(missing)}; check the --input paths")
    if model_type not in MODEL_TYPES:
        raise TokenizerError(f"model_type {model_type!r} is not supported; use one of {', '.join(MODEL_TYPES)}")
    if vocab_size <= SEP_ID + 1:
        raise TokenizerError(f"vocab_size {vocab_size} is too small; it needs room for 256 byte pieces and the text")
    if not 0.0 < character_coverage <= 1.0:
        raise TokenizerError(f"character_coverage {character_coverage} must be in (0, 1], e.g. 0.9995 for Chinese")
    if max_sentences <= 0:
        raise TokenizerError(f"max_sentences {max_sentences} must be positive")

    model_path = Path(f"{model_prefix}.model")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    reader = _SentenceReader(paths, text_field)
    model_bytes = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(reader),
            model_writer=model_bytes,  # nothing is written by sentencepiece itself; we commit the files below
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            bos_id=-1,
            control_symbols=[SEP_PIECE],
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=MAX_SENTENCE_BYTES,
            train_extremely_large_corpus=False,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=0 if verbose else 2,
        )
    except RuntimeError as error:
        if reader.num_sentences == 0:
            raise _empty_input_error(paths, reader, text_field) from error
        raise _sentencepiece_error(error, vocab_size, paths) from error
    for path, count in reader.skipped.items():
        logger.warning(f"{path}: skipped {count} line(s) that are not JSON objects with a string {text_field!r} field")
    if reader.num_sentences == 0:
        raise _empty_input_error(paths, reader, text_field)

    data = model_bytes.getvalue()
    tokenizer = Tokenizer._from_bytes(data, model_path)  # also checks the ids came out as intended
    _write_atomic(Path(f"{model_prefix}.vocab"), tokenizer._vocab_text().encode("utf-8"))
    _write_atomic(Path(f"{model_prefix}.json"), (json.dumps(tokenizer.metadata(), indent=2) + "\n").encode("utf-8"))
    _write_atomic(model_path, data)  # last: a .model file means the training finished
    logger.info(f"tokenizer trained on {reader.num_sentences} sentences: {model_path} (vocab {tokenizer.vocab_size})")
    return model_path


def _empty_input_error(paths: Sequence[Path], reader: _SentenceReader, text_field: str) -> TokenizerError:
    files = ", ".join(str(p) for p in paths)
    hint = ""
    if reader.skipped:
        skipped = sum(reader.skipped.values())
        hint = f" ({skipped} JSON line(s) lacked a string {text_field!r} field; check --text-field)"
    return TokenizerError(f"no training text found in {files}{hint}; give files with non-empty lines")


# ---------------------------------------------------------------------------------------------- loading


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, pos


def _proto_fields(data: bytes) -> dict[int, Any]:
    """The last value of each field of one protobuf message (enough to read sentencepiece's specs)."""
    fields: dict[int, Any] = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields[number] = value
    return fields


def _model_specs(data: bytes) -> dict[str, Any]:
    """model_type, character_coverage and normalizer settings from a serialized sentencepiece ModelProto."""
    top = _proto_fields(data)
    trainer = _proto_fields(top.get(2, b""))
    normalizer = _proto_fields(top.get(3, b""))
    coverage = trainer.get(10)
    return {
        "model_type": _PROTO_MODEL_TYPES.get(trainer.get(3, 1), str(trainer.get(3))),
        "character_coverage": round(struct.unpack("<f", coverage)[0], 6) if coverage else 0.9995,
        "normalization": normalizer.get(1, b"").decode("utf-8", "replace"),
        "add_dummy_prefix": bool(normalizer.get(3, 1)),
        "remove_extra_whitespaces": bool(normalizer.get(4, 1)),
    }


class Tokenizer:
    """A loaded megalm sentencepiece model: fixed special ids, exact round trip, a content hash."""

    kind = "sentencepiece"
    bos_id: Optional[int] = None  # megalm's sentencepiece models have no BOS
    add_bos = False
    add_eos = False

    def __init__(self, processor: Any, path: Path, model_bytes: bytes) -> None:
        self._sp = processor
        self.path = path
        self.hash = hashlib.sha256(model_bytes).hexdigest()
        self.vocab_size = int(processor.get_piece_size())
        self.pad_id = int(processor.pad_id())
        self.eos_id = int(processor.eos_id())
        self.unk_id = int(processor.unk_id())
        self.sep_id = int(processor.piece_to_id(SEP_PIECE))
        self.stop_ids = (self.eos_id,)
        self._specs = _model_specs(model_bytes)
        self._check()
        self._dropped = frozenset((self.pad_id, self.eos_id, self.sep_id))
        self._meta_ids = [processor.piece_to_id(f"<0x{b:02X}>") for b in _META.encode("utf-8")]

    @classmethod
    def load(cls, path: PathLike) -> "Tokenizer":
        """Load a .model file (a prefix without `.model` works too) and check it is a megalm tokenizer."""
        path = Path(path)
        if not path.is_file() and Path(f"{path}.model").is_file():
            path = Path(f"{path}.model")
        if not path.is_file():
            raise TokenizerError(
                f"tokenizer model {path} not found; train one with `megalm tokenizer train --input FILE "
                f"--output PREFIX --vocab-size N` and pass PREFIX.model"
            )
        return cls._from_bytes(path.read_bytes(), path)

    @classmethod
    def _from_bytes(cls, data: bytes, path: Path) -> "Tokenizer":
        import sentencepiece as spm

        processor = spm.SentencePieceProcessor()
        try:
            processor.load_from_serialized_proto(data)
            _model_specs(data)
        except Exception as error:  # sentencepiece raises RuntimeError/OSError, the proto reader IndexError
            raise TokenizerError(
                f"{path} is not a sentencepiece model ({error}); pass the .model file written by "
                f"`megalm tokenizer train`"
            ) from None
        return cls(processor, path, data)

    def _check(self) -> None:
        """Raise unless the ids and settings are those megalm relies on."""
        sp = self._sp
        expected = {"pad": (self.pad_id, PAD_ID), "eos": (self.eos_id, EOS_ID), "unk": (self.unk_id, UNK_ID)}
        expected[f"{SEP_PIECE!r}"] = (self.sep_id, SEP_ID)
        for name, (actual, want) in expected.items():
            if actual != want:
                raise TokenizerError(
                    f"{self.path}: {name} id is {actual}, megalm expects {want} (pad={PAD_ID}, eos={EOS_ID}, "
                    f"unk={UNK_ID}, {SEP_PIECE}={SEP_ID}); retrain it with `megalm tokenizer train`"
                )
        if not (sp.is_control(SEP_ID) or sp.is_user_defined(SEP_ID)):
            raise TokenizerError(f"{self.path}: id {SEP_ID} is an ordinary piece, not the {SEP_PIECE} symbol; retrain")
        if any(not sp.is_byte(sp.piece_to_id(f"<0x{b:02X}>")) for b in range(256)):
            raise TokenizerError(
                f"{self.path}: model has no byte fallback, so unseen characters would become unk; retrain it "
                f"with `megalm tokenizer train`"
            )
        specs = self._specs
        if specs["normalization"] != "identity" or specs["add_dummy_prefix"] or specs["remove_extra_whitespaces"]:
            raise TokenizerError(
                f"{self.path}: model normalizes text (rule {specs['normalization']!r}, add_dummy_prefix="
                f"{specs['add_dummy_prefix']}, remove_extra_whitespaces={specs['remove_extra_whitespaces']}), so "
                f"decode(encode(text)) would differ from text; retrain it with `megalm tokenizer train`"
            )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, no eos added (nor anything else: add_special_tokens is for HFTokenizer's interface)."""
        if _META not in text:
            return self._sp.encode(text)
        ids: list[int] = []
        for index, part in enumerate(text.split(_META)):
            if index:
                ids.extend(self._meta_ids)
            if part:
                ids.extend(self._sp.encode(part))
        return ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text (sentencepiece encodes a batch on several threads)."""
        texts = list(texts)
        if any(_META in text for text in texts):
            return [self.encode(text) for text in texts]
        return self._sp.encode(texts) if texts else []

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; pad, eos and sep are dropped (always: skip_special_tokens is for HFTokenizer's interface)."""
        return self._sp.decode([token for token in checked_ids(ids, self.vocab_size, self.path)
                                if token not in self._dropped])

    def id_to_piece(self, token: int) -> str:
        return self._sp.id_to_piece(int(token))

    def files(self) -> list[Path]:
        """The file a copy of this tokenizer needs: the .model."""
        return [Path(self.path)]

    def metadata(self) -> dict[str, Any]:
        """What identifies this tokenizer: sizes, special ids, hash and the settings it was trained with."""
        import sentencepiece as spm

        return {
            "model_file": str(self.path),
            "hash": self.hash,
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "eos_id": self.eos_id,
            "unk_id": self.unk_id,
            "sep_id": self.sep_id,
            "bos_id": int(self._sp.bos_id()),
            "sep_piece": SEP_PIECE,
            "model_type": self._specs["model_type"],
            "character_coverage": self._specs["character_coverage"],
            "byte_fallback": True,
            "normalization": self._specs["normalization"],
            "add_dummy_prefix": self._specs["add_dummy_prefix"],
            "sentencepiece_version": spm.__version__,
        }

    def _vocab_text(self) -> str:
        """The .vocab listing: one `piece<TAB>score` line per id."""
        sp = self._sp
        return "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(self.vocab_size))

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, hash={self.hash[:12]})"


def open_tokenizer(path: PathLike) -> AnyTokenizer:
    """The tokenizer at `path`, what `data.tokenizer` names: a sentencepiece .model (or its prefix) gives a
    `Tokenizer`; a directory holding tokenizer.json, or a .json file, gives a Hugging Face `HFTokenizer`
    (megalm.data.hf_tokenizer). Both have encode, encode_batch, decode, vocab_size, hash, eos_id, stop_ids,
    pad_id, sep_id, bos_id, add_bos, id_to_piece, files and metadata."""
    from megalm.data.hf_tokenizer import HFTokenizer, is_hf_tokenizer_path

    if is_hf_tokenizer_path(path):
        return HFTokenizer.load(path)
    if Path(path).is_dir():
        raise TokenizerError(
            f"{path} is a directory without tokenizer.json; give a Hugging Face tokenizer directory (tokenizer.json, "
            f"tokenizer_config.json...) or a sentencepiece .model file"
        )
    return Tokenizer.load(path)


def check_model_vocab(tokenizer: Any, model_vocab_size: int) -> Optional[str]:
    """Why `tokenizer` cannot feed a model of model_vocab_size ids, or None. A sentencepiece model must match
    exactly; a Hugging Face tokenizer may have fewer ids than the model's embedding (Qwen2: 151,665 of 151,936)."""
    size = int(tokenizer.vocab_size)
    if getattr(tokenizer, "kind", "sentencepiece") == "huggingface":
        if size > model_vocab_size:
            return f"the tokenizer has {size} ids but model.vocab_size is {model_vocab_size}: set model.vocab_size >= {size}"
        return None
    if size != model_vocab_size:
        return f"the tokenizer has {size} tokens but model.vocab_size is {model_vocab_size}: set model.vocab_size={size}"
    return None


# -------------------------------------------------------------------------------------------------- CLI


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    """`megalm tokenizer train`: train, then print the path, size, hash and special ids."""
    try:
        model_path = train_tokenizer(
            args.input,
            args.output,
            args.vocab_size,
            model_type=args.model_type,
            text_field=args.text_field,
            character_coverage=args.character_coverage,
            max_sentences=args.max_sentences,
            num_threads=args.num_threads,
            verbose=args.verbose,
        )
        tokenizer = Tokenizer.load(model_path)
    except TokenizerError as error:
        print(f"megalm: tokenizer error: {error}", file=sys.stderr)
        return 2
    print(f"model: {model_path}")
    print(f"metadata: {Path(f'{args.output}.json')}")
    print(f"vocab_size: {tokenizer.vocab_size}")
    print(f"hash: {tokenizer.hash}")
    print(f"special ids: pad={tokenizer.pad_id} eos={tokenizer.eos_id} unk={tokenizer.unk_id} sep={tokenizer.sep_id}")
    return 0


def register_cli(subparsers: Any) -> None:
    """Add `megalm tokenizer train ...` to megalm's top-level sub-commands."""
    tokenizer = subparsers.add_parser("tokenizer", help="train and inspect sentencepiece tokenizers")
    commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True)
    train = commands.add_parser("train", help="train a byte-fallback sentencepiece model on text or JSONL files")
    train.add_argument("--input", nargs="+", required=True, metavar="FILE", help="text (a line each) or .jsonl files")
    train.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.model, .vocab and .json")
    train.add_argument("--vocab-size", type=int, required=True, help="number of pieces, e.g. 64000")
    train.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    train.add_argument("--text-field", default="text", help="field of each JSONL object to train on")
    train.add_argument("--character-coverage", type=float, default=0.9995, help="0.9995 suits Chinese")
    train.add_argument("--max-sentences", type=int, default=2_000_000, help="sample at most this many lines")
    train.add_argument("--num-threads", type=int, default=None, help="default: all cores")
    train.add_argument("--verbose", action="store_true", help="show sentencepiece's training log")
    train.set_defaults(func=cmd_tokenizer_train)
