"""megalm's sentencepiece tokenizer as a Hugging Face `tokenizers` tokenizer.json with the same ids.

megalm tokenizers (megalm.data.tokenizer) have no normalisation and no dummy prefix: sentencepiece
only writes a space as the meta symbol U+2581, and megalm sends a literal U+2581 of the text as its
three UTF-8 byte pieces. The exported vocabulary therefore spells the meta symbol as a real space,
and no normaliser or pre-tokeniser runs: a space in the text is that piece's space, and a literal
U+2581 (in no piece) falls back to its bytes, as in megalm. Byte fallback covers every character
outside the vocabulary; the decoder joins byte pieces back into UTF-8.

- BPE models: the merges are every split of every ordinary piece into two ordinary pieces, ranked
  by the merged piece's score (sentencepiece merges the adjacent pair whose result scores highest).
  Control and byte pieces are in the vocabulary but no merge makes them, so the text "<sep>" or
  "<0x41>" is spelled out, as sentencepiece does.
- Unigram models: the pieces with their scores; control and byte pieces get a score of -1e9 so that
  Viterbi does not pick them for text. One known difference: `tokenizers` scores a character outside
  the vocabulary below the lowest piece score, so a text that spells a special or byte piece's name
  ("<sep>", "<0x41>") where "<" is not itself a piece comes out as that piece (sentencepiece spells
  it out). BPE, megalm's default, has no such case.

The special pieces (<pad>=0, </s>=1, <unk>=2, <sep>=3) are special tokens for transformers
(skipped by `decode(..., skip_special_tokens=True)`), and tokenizer_config.json sets
`split_special_tokens`, so their spelling in a text stays text, as in megalm.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megalm.data.tokenizer import _META, Tokenizer

MEGALM_TOKENIZER = "megalm_tokenizer.model"  # the sentencepiece model itself, next to tokenizer.json
SPECIAL_ROLES = {"pad_token": "pad_id", "eos_token": "eos_id", "unk_token": "unk_id", "sep_token": "sep_id"}
CONTROL_SCORE = -1e9


def build_hf_tokenizer(tokenizer: Tokenizer):
    """A `tokenizers.Tokenizer` that encodes every text to megalm's ids (see the module docstring)."""
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as HFTokenizer

    sp = tokenizer._sp
    size = tokenizer.vocab_size
    pieces = [sp.id_to_piece(i).replace(_META, " ") for i in range(size)]
    ordinary = [not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i)) for i in range(size)]
    unk = pieces[tokenizer.unk_id]
    if tokenizer._specs["model_type"] == "bpe":
        ids = {piece: i for i, piece in enumerate(pieces) if ordinary[i]}
        ranked = []
        for i, piece in enumerate(pieces):
            if ordinary[i]:
                for cut in range(1, len(piece)):
                    left, right = piece[:cut], piece[cut:]
                    if left in ids and right in ids:
                        ranked.append((-sp.get_score(i), i, cut, left, right))
        ranked.sort()
        model = models.BPE(vocab={piece: i for i, piece in enumerate(pieces)},
                           merges=[(left, right) for *_, left, right in ranked], unk_token=unk, byte_fallback=True)
    elif tokenizer._specs["model_type"] == "unigram":
        vocab = [(piece, sp.get_score(i) if ordinary[i] else CONTROL_SCORE) for i, piece in enumerate(pieces)]
        model = models.Unigram(vocab, unk_id=tokenizer.unk_id, byte_fallback=True)
    else:
        raise ValueError(f"{tokenizer.path}: sentencepiece model type {tokenizer._specs['model_type']!r} cannot be "
                         f"exported; megalm trains bpe and unigram models")
    hf = HFTokenizer(model)
    hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    hf.add_special_tokens([AddedToken(pieces[getattr(tokenizer, role)], special=True, normalized=False)
                           for role in SPECIAL_ROLES.values()])
    return hf


def tokenizer_config(tokenizer: Tokenizer, max_length: int) -> dict[str, Any]:
    """tokenizer_config.json: the generic fast tokenizer, megalm's special tokens, no BOS/EOS added."""
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "split_special_tokens": True,  # "<sep>" in a text is text, as in megalm
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    for role, attribute in SPECIAL_ROLES.items():
        config[role] = tokenizer.id_to_piece(getattr(tokenizer, attribute))
    return config


def write_hf_tokenizer(tokenizer: Tokenizer, out: Path, max_length: int) -> list[str]:
    """tokenizer.json and tokenizer_config.json in `out`, plus the sentencepiece model itself
    (megalm_tokenizer.model: what `megalm import` gives back to megalm). The files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    build_hf_tokenizer(tokenizer).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tokenizer, max_length), indent=2) + "\n")
    (out / MEGALM_TOKENIZER).write_bytes(Path(tokenizer.path).read_bytes())
    return ["tokenizer.json", "tokenizer_config.json", MEGALM_TOKENIZER]
