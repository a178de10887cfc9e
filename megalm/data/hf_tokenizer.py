"""A Hugging Face tokenizer (tokenizer.json and its config files) behind megalm's tokenizer interface.

`HFTokenizer.load(path)` takes a directory holding tokenizer.json, or a tokenizer.json file (its config
files are read from the same directory). `encode(text)` gives the ids that transformers 5's
`AutoTokenizer.from_pretrained(dir)(text)["input_ids"]` gives, with these rules:

- tokenizer_config.json names the special tokens (bos/eos/pad/unk/sep); where it lists no
  `added_tokens_decoder`, special_tokens_map.json overrides them, as in transformers.
- BOS/EOS: tokenizer.json's post-processor adds them (Llama 3's and Llama 2's TemplateProcessing add
  the BOS, Qwen2's ByteLevel adds nothing). transformers 5 drops tokenizer_config.json's `add_bos_token`
  and `add_eos_token` when a tokenizer.json exists, so they change nothing here either.
- `tokenizer_class` LlamaTokenizer(Fast) with a sentencepiece-style tokenizer.json (Llama 2, Mistral):
  transformers rebuilds the pipeline: no normalizer, a Metaspace pre-tokenizer that prepends U+2581
  to the first piece (`legacy: false`, the class default) or every piece (`legacy: true`), unless
  `add_prefix_space` is false. Qwen2Tokenizer(Fast): NFC, its split pattern, byte-level. Every other
  class uses tokenizer.json as written. The class defaults for unset special tokens apply too.

megalm's use of the ids: `eos_id` (the document separator, what preprocess appends) is the tokenizer's
eos token, or the first eos id of generation_config.json / config.json when it names none; `stop_ids`
(where generation stops) adds every eos id those files list (Llama 3 instruct: three). `pad_id` and
`sep_id` fall back to `eos_id` when the tokenizer has no pad or sep token. `decode` drops special
tokens (`skip_special_tokens=True`), as megalm's sentencepiece decode drops pad, eos and <sep>.

`hash` is the sha256 of tokenizer.json's bytes and of the resolved settings above (class, pre-tokenizer
scheme, special ids): copies of the files give the same hash; a change to what decides the ids, another.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from megalm.data import TokenizerError, checked_ids

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
MODEL_CONFIG = "config.json"
# What a copy of a Hugging Face tokenizer needs (megalm import/export): the files that decide the ids,
# the eos list for stopping (generation_config.json) and what chat templates and slow tokenizers read.
HF_TOKENIZER_FILES = (
    TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, GENERATION_CONFIG, "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "tokenizer.model",
)
SPECIAL_ROLES = ("bos", "eos", "pad", "unk", "sep")
_META = "\u2581"
# transformers' Qwen2Tokenizer splits text with this pattern before byte-level BPE
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# the special tokens a class assumes where its config leaves one out
_CLASS_DEFAULTS = {
    "llama": {"bos": "<s>", "eos": "</s>", "unk": "<unk>"},
    "qwen2": {"eos": "<|endoftext|>", "pad": "<|endoftext|>", "unk": "<|endoftext|>"},
    "gpt2": {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "unk": "<|endoftext|>"},
}
_CLASS_FAMILIES = {"LlamaTokenizer": "llama", "Qwen2Tokenizer": "qwen2", "GPT2Tokenizer": "gpt2"}
# WordPiece-era detokenization that transformers applies when clean_up_tokenization_spaces is set
# (it skips BPE models, whose spaces before punctuation are real)
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def is_hf_tokenizer_path(path: Union[str, Path]) -> bool:
    """True for a directory holding tokenizer.json or a .json file (a Hugging Face tokenizer)."""
    path = Path(path)
    return (path.is_dir() and (path / TOKENIZER_JSON).is_file()) or (path.is_file() and path.suffix == ".json")


def _read_json(path: Path) -> dict[str, Any]:
    """The object in `path`, {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise TokenizerError(f"{path} is not valid JSON ({error}); restore it from the model's files") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} holds a JSON {type(data).__name__}, expected an object")
    return data


def _content(value: Any) -> Optional[str]:
    """A special token's text: a string, or the `content` of an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value: Any) -> list[int]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _is_byte_level(tokenizer_json: dict[str, Any]) -> bool:
    """Whether tokenizer.json uses byte-level pre-tokenization or decoding (Llama 3 rather than Llama 2)."""
    def has(node: Any) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(has(v) for v in node.values())
        if isinstance(node, list):
            return any(has(v) for v in node)
        return False

    return has(tokenizer_json.get("pre_tokenizer")) or has(tokenizer_json.get("decoder"))


class HFTokenizer:
    """A Hugging Face tokenizer.json with transformers' defaults: encode, decode, special ids, a content hash."""

    kind = "huggingface"

    def __init__(self, path: Path, directory: Path, tokenizer_file: Path) -> None:
        from tokenizers import Tokenizer as Backend

        self.path = path
        self.directory = directory
        raw = tokenizer_file.read_bytes()
        try:
            tokenizer_json = json.loads(raw)
            self._backend = Backend.from_str(raw.decode("utf-8"))
        except Exception as error:  # tokenizers raises its own Exception type
            raise TokenizerError(
                f"{tokenizer_file} is not a Hugging Face tokenizer.json ({error}); pass the directory of a model's "
                f"tokenizer files or a sentencepiece .model"
            ) from None
        is_tokenizer_json = tokenizer_file.name == TOKENIZER_JSON
        config = _read_json(directory / TOKENIZER_CONFIG) if is_tokenizer_json else {}
        if "added_tokens_decoder" not in config and is_tokenizer_json:
            config.update(_read_json(directory / SPECIAL_TOKENS_MAP))
        self.config = config
        generation = _read_json(directory / GENERATION_CONFIG) if is_tokenizer_json else {}
        model_config = _read_json(directory / MODEL_CONFIG) if is_tokenizer_json else {}

        class_name = str(config.get("tokenizer_class") or "").removesuffix("Fast")
        family = _CLASS_FAMILIES.get(class_name, "generic")
        if family == "llama" and _is_byte_level(tokenizer_json):
            family = "generic"  # transformers loads a byte-level "LlamaTokenizer" (Llama 3) as the generic class
        self.family = family
        tokens = {role: _content(config.get(f"{role}_token")) for role in SPECIAL_ROLES}
        for role, default in _CLASS_DEFAULTS.get(family, {}).items():
            if f"{role}_token" not in config:
                tokens[role] = default
        self._add_missing_special_tokens([t for t in tokens.values() if t is not None])
        self.special_tokens = tokens
        settings: dict[str, Any] = {"family": family, **self._rebuild_pipeline(family, config)}
        split_special = bool(config.get("split_special_tokens", False))
        self._backend.encode_special_tokens = split_special
        settings["split_special_tokens"] = split_special
        self._clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False)) and (
            tokenizer_json.get("model", {}).get("type") != "BPE")
        settings["clean_up_tokenization_spaces"] = self._clean_up_spaces

        vocab = self._backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        ids = {role: (self._backend.token_to_id(t) if t is not None else None) for role, t in tokens.items()}
        extra_eos = _id_list(generation.get("eos_token_id")) or _id_list(model_config.get("eos_token_id"))
        eos_id = ids["eos"] if ids["eos"] is not None else (extra_eos[0] if extra_eos else None)
        if eos_id is None:
            raise TokenizerError(
                f"{path}: the tokenizer names no eos token (tokenizer_config.json eos_token, or eos_token_id in "
                f"generation_config.json / config.json); megalm ends every document with it: add one"
            )
        self.eos_id = int(eos_id)
        self.stop_ids = tuple(dict.fromkeys([self.eos_id, *extra_eos]))
        self.bos_id: Optional[int] = ids["bos"]
        self.unk_id: Optional[int] = ids["unk"]
        self.pad_id = ids["pad"] if ids["pad"] is not None else self.eos_id
        self.sep_id = ids["sep"] if ids["sep"] is not None else self.eos_id
        probe, bare = self._backend.encode("a").ids, self._backend.encode("a", add_special_tokens=False).ids
        self.add_bos = self.bos_id is not None and len(probe) > len(bare) and probe[0] == self.bos_id
        self.add_eos = len(probe) > len(bare) and probe[-1] == self.eos_id
        settings.update({f"{role}_id": ids[role] for role in SPECIAL_ROLES}, eos_id=self.eos_id)
        self.settings = settings
        digest = hashlib.sha256(raw)
        digest.update(json.dumps(settings, sort_keys=True).encode("utf-8"))
        self.hash = digest.hexdigest()

    @classmethod
    def load(cls, path: Union[str, Path]) -> "HFTokenizer":
        """Load from a directory holding tokenizer.json, or from a tokenizer.json file."""
        path = Path(path)
        if path.is_dir():
            tokenizer_file = path / TOKENIZER_JSON
            if not tokenizer_file.is_file():
                raise TokenizerError(
                    f"{path} holds no {TOKENIZER_JSON}; data.tokenizer takes a Hugging Face tokenizer directory "
                    f"(with tokenizer.json) or a sentencepiece .model file"
                )
            return cls(path, path, tokenizer_file)
        if not path.is_file():
            raise TokenizerError(f"tokenizer {path} not found; give a tokenizer directory, tokenizer.json or .model")
        return cls(path, path.parent, path)

    # ------------------------------------------------------------------------------------------ setup

    def _add_missing_special_tokens(self, contents: Sequence[str]) -> None:
        """Named special tokens the vocabulary lacks become added tokens, as transformers adds them."""
        from tokenizers import AddedToken

        missing = [c for c in dict.fromkeys(contents) if self._backend.token_to_id(c) is None]
        if missing:
            self._backend.add_special_tokens([AddedToken(c, special=True, normalized=False) for c in missing])

    def _rebuild_pipeline(self, family: str, config: dict[str, Any]) -> dict[str, Any]:
        """Replace tokenizer.json's normalizer, pre-tokenizer and decoder where transformers' class builds its own."""
        from tokenizers import Regex, decoders, normalizers, pre_tokenizers

        backend = self._backend
        if family == "llama":
            add_prefix_space = config.get("add_prefix_space")
            add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
            legacy = bool(config.get("legacy", False))
            scheme = ("always" if legacy else "first") if add_prefix_space else "never"
            backend.normalizer = None
            backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_META, prepend_scheme=scheme, split=False)
            steps = [decoders.Replace(_META, " "), decoders.ByteFallback(), decoders.Fuse()]
            if add_prefix_space:
                steps.append(decoders.Strip(" ", 1, 0))
            backend.decoder = decoders.Sequence(steps)
            return {"prepend_scheme": scheme}
        if family == "qwen2":
            add_prefix_space = bool(config.get("add_prefix_space") or False)
            backend.normalizer = normalizers.NFC()
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
            ])
            backend.decoder = decoders.ByteLevel()
            return {"add_prefix_space": add_prefix_space}
        return {}

    # ---------------------------------------------------------------------------------------- interface

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (with the BOS/EOS the tokenizer adds by default, unless add_special_tokens=False)."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text (tokenizers encodes a batch on several threads)."""
        texts = list(texts)
        if not texts:
            return []
        return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens (bos, eos, pad, chat markers) are dropped unless skip_special_tokens=False."""
        text = self._backend.decode(checked_ids(ids, self.vocab_size, self.path), skip_special_tokens=skip_special_tokens)
        if self._clean_up_spaces:
            for before, after in _CLEANUPS:
                text = text.replace(before, after)
        return text

    def id_to_piece(self, token: int) -> str:
        piece = self._backend.id_to_token(int(token))
        if piece is None:
            raise TokenizerError(f"token id {token} is not in {self.path} (vocab_size {self.vocab_size})")
        return piece

    def token_to_id(self, piece: str) -> Optional[int]:
        return self._backend.token_to_id(piece)

    def files(self) -> list[Path]:
        """The tokenizer files present (HF_TOKENIZER_FILES): what a copy of this tokenizer needs."""
        if self.path.is_file() and self.path.name != TOKENIZER_JSON:
            return [self.path]
        return [self.directory / name for name in HF_TOKENIZER_FILES if (self.directory / name).is_file()]

    def metadata(self) -> dict[str, Any]:
        """What identifies this tokenizer: path, hash, sizes, special tokens and ids, the resolved settings."""
        return {
            "tokenizer": str(self.path), "kind": self.kind, "hash": self.hash, "vocab_size": self.vocab_size,
            "bos_id": self.bos_id, "eos_id": self.eos_id, "stop_ids": list(self.stop_ids), "pad_id": self.pad_id,
            "sep_id": self.sep_id, "unk_id": self.unk_id, "add_bos": self.add_bos, "add_eos": self.add_eos,
            "special_tokens": dict(self.special_tokens), "settings": dict(self.settings),
        }

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, hash={self.hash[:12]})"
