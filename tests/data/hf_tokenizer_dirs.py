"""Small Hugging Face tokenizer directories built locally with `tokenizers` (nothing downloaded), shaped like
three families' real files: Llama 3 (byte-level BPE, a TemplateProcessing post-processor adding
<|begin_of_text|>, an eos list in generation_config.json), Llama 2 / Mistral (sentencepiece-style BPE with byte
fallback, LlamaTokenizer with add_bos_token) and Qwen2 (byte-level BPE, NFC, no BOS, <|im_end|> / <|endoftext|>)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CORPUS = [
    "the model trains on tokens while pipeline stages pass activations between ranks",
    "data parallel ranks average gradients across the cluster so that throughput stays high",
    "Hello world! It's a test: don't stop, we'll see; they're here. I'm fine, you've won.",
    "numbers 1234567890 and 3.14159 and 2024-01-01, prices $5.99",
    "我们今天训练一个中文语言模型，数据并行、张量并行、流水线并行。",
    "emoji 😀🎉 and accents café naïve résumé",
    "    indented code:\n\tdef f(x):\n\t\treturn x + 1\n",
    "multiple   spaces    inside and trailing spaces   ",
] * 4

# the split pattern of Llama 3 / Qwen2 style byte-level tokenizers (contractions, letters, 1-3 digits, ...)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _added(tokenizer: Any) -> dict[str, dict[str, Any]]:
    """tokenizer_config.json's added_tokens_decoder for the tokenizer's added tokens."""
    out = {}
    for token_id, token in sorted(tokenizer.get_added_tokens_decoder().items()):
        out[str(token_id)] = {"content": token.content, "lstrip": token.lstrip, "normalized": token.normalized,
                              "rstrip": token.rstrip, "single_word": token.single_word, "special": token.special}
    return out


def _byte_level_bpe(split: str, specials: list[str], vocab_size: int, nfc: bool) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    if nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.add_special_tokens(specials)
    return tokenizer


def llama3_dir(out: Path) -> Path:
    """Llama-3-instruct style: PreTrainedTokenizerFast, BOS from tokenizer.json's post-processor, eos
    <|eot_id|> in tokenizer_config.json, three eos ids in generation_config.json, no pad."""
    from tokenizers import processors

    out.mkdir(parents=True, exist_ok=True)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"]
    tokenizer = _byte_level_bpe(LLAMA3_SPLIT, specials, 400, nfc=False)
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    tokenizer.save(str(out / "tokenizer.json"))
    eos_ids = [tokenizer.token_to_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    _write_json(out / "tokenizer_config.json", {
        "added_tokens_decoder": _added(tokenizer), "bos_token": "<|begin_of_text|>",
        "clean_up_tokenization_spaces": True, "eos_token": "<|eot_id|>", "model_input_names": ["input_ids"],
        "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast",
    })
    _write_json(out / "special_tokens_map.json", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
    _write_json(out / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos_ids, "do_sample": True})
    return out


def qwen2_dir(out: Path) -> Path:
    """Qwen2-instruct style: Qwen2Tokenizer, NFC, no BOS, eos <|im_end|>, pad <|endoftext|>."""
    from tokenizers import processors

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _byte_level_bpe(QWEN2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], 400, nfc=True)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.save(str(out / "tokenizer.json"))
    ids = {t: tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>")}
    _write_json(out / "tokenizer_config.json", {
        "add_prefix_space": False, "added_tokens_decoder": _added(tokenizer), "bos_token": None,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 32768, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    })
    _write_json(out / "generation_config.json", {
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    })
    return out


def llama2_dir(out: Path, legacy: bool = False, add_eos: bool = False) -> Path:
    """Llama-2 / Mistral style: LlamaTokenizer(Fast), sentencepiece-like BPE (U+2581 for spaces, byte fallback
    pieces <0x00>..<0xFF>), add_bos_token true, `legacy` as in the config, pad unset."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    out.mkdir(parents=True, exist_ok=True)
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False)
    trainer_tok.train_from_iterator(CORPUS, trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": add_eos, "added_tokens_decoder": _added(tokenizer),
        "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": legacy,
        "model_max_length": 4096, "pad_token": None, "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
    })
    _write_json(out / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    _write_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    return out
