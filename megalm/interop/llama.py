"""Hugging Face Llama, Qwen2 and Mistral decoders as megalm models: the config map and the tensor table.

The three families share one decoder: RMSNorm before attention and MLP, rotary positions
(rotate-half, the layout megalm uses: q_proj and k_proj rows need no permutation), grouped key/value
heads, a SwiGLU MLP. They differ in biases (Llama: `attention_bias` on q, k, v and o, `mlp_bias`;
Qwen2: q, k and v only; Mistral: none) and in a sliding window (Mistral, Qwen2 `use_sliding_window`).

`model_fields(hf, where)` reads config.json into megalm's model fields and refuses anything that would
change the math and that megalm does not implement; `hf_config(...)` writes it back. `tensor_table(cfg,
family)` lists every megalm tensor with the Hugging Face tensors it is made of; `from_hf` and `to_hf`
convert one entry in either direction (a copy, the vocabulary padding, or the per-head interleave of
q/k/v into megalm's fused `attn.qkv` and of k/v into `attn.key_value`), so both directions are a table
walk, one tensor at a time, and give every tensor back bit for bit.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from megalm.config import ModelConfig
from megalm.interop import InteropError
from megalm.model.rope import hf_rope_fields, hf_rope_parameters


ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}

# config.json keys read below (each one's meaning is implemented or refused there)
_UNDERSTOOD = {
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "initializer_range",
    "tie_word_embeddings", "attention_bias", "mlp_bias", "rope_theta", "rope_scaling", "rope_parameters",
    "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "attention_dropout",
    "partial_rotary_factor", "original_max_position_embeddings", "pretraining_tp", "megalm",
}
# keys that change nothing a forward pass computes: bookkeeping, token ids, generation defaults, output flags
HARMLESS_KEYS = {
    "architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "output_attentions", "output_hidden_states", "return_dict", "torchscript", "use_bfloat16", "pruned_heads",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "tie_encoder_decoder", "id2label", "label2id",
    "problem_type", "finetuning_task", "tokenizer_class", "prefix", "task_specific_params",
    "cross_attention_hidden_size", "_attn_implementation_autoset", "attn_implementation", "tf_legacy_loss",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "add_cross_attention",
}
_SILU = ("silu", "swish")


# ---- rope: both config schemas (megalm.model.rope reads and writes them) ---------------------------------
def _rope_fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """megalm's rotary fields from config.json (transformers 5 `rope_parameters`, or `rope_theta` + `rope_scaling`)."""
    try:
        return dict(hf_rope_fields(hf, where))
    except ValueError as error:
        raise InteropError(str(error)) from None


# ---- config.json -> megalm -------------------------------------------------------------------------------
def _sliding_window(hf: dict[str, Any], family: str) -> Optional[tuple[int, str]]:
    """(window, the config field that turns it on) where some layer attends through a sliding window."""
    window = hf.get("sliding_window")
    if family == "qwen2":  # the window applies only where use_sliding_window (or layer_types) says so
        types = hf.get("layer_types")
        if types is not None:
            sliding = any(kind != "full_attention" for kind in types)
            return (int(window or 0), "layer_types (sliding_attention) with sliding_window") if sliding else None
        layers = hf.get("num_hidden_layers", 0)
        if hf.get("use_sliding_window") and window and hf.get("max_window_layers", layers) < layers:
            return int(window), "use_sliding_window with sliding_window"
        return None
    return (int(window), "sliding_window") if window else None  # Mistral; Llama has none, so one is refused alike


def model_fields(hf: dict[str, Any], where: str, seq_length: Optional[int] = None) -> dict[str, Any]:
    """megalm's model fields for a Llama / Qwen2 / Mistral config.json; InteropError naming the field for
    anything megalm's decoder does not compute (so nothing that changes the math is dropped silently)."""
    family = hf.get("model_type")
    if family not in ARCHITECTURES:
        raise InteropError(f"{where}: model_type {family!r} is not one megalm imports "
                           f"(gpt2, {', '.join(ARCHITECTURES)})")
    unknown = sorted(set(hf) - _UNDERSTOOD - HARMLESS_KEYS)
    if unknown:
        raise InteropError(f"{where}: config fields megalm does not implement: {', '.join(unknown)}; a field that "
                           f"changes the model cannot be dropped (remove it only if it changes nothing)")
    if hf.get("hidden_act", "silu") not in _SILU:
        raise InteropError(f"{where}: hidden_act {hf['hidden_act']!r}; megalm's SwiGLU MLP uses silu")
    if hf.get("add_cross_attention"):
        raise InteropError(f"{where}: add_cross_attention is true; megalm's decoder has no cross-attention")
    hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or hidden // heads
    if head_dim * heads != hidden and not hf.get("head_dim"):
        raise InteropError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} and "
                           f"there is no head_dim")
    if family == "qwen2":
        qkv_bias, bias = True, False
    elif family == "mistral":
        qkv_bias = bias = False
    else:
        attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
        if attention_bias != mlp_bias:
            raise InteropError(
                f"{where}: attention_bias={attention_bias} with mlp_bias={mlp_bias}; megalm's model.bias puts biases "
                f"on the attention output (o_proj) and the MLP together, so they must be equal")
        qkv_bias = bias = attention_bias
    positions = int(hf.get("max_position_embeddings", 2048))
    window = _sliding_window(hf, family)
    length = seq_length or min(positions, window[0] if window and window[0] > 0 else positions)
    if window and length > window[0]:
        raise InteropError(f"{where}: {window[1]} = {window[0]} tokens, and model.seq_length={length} exceeds it; "
                           f"megalm has no sliding-window attention: train at seq_length <= {window[0]}")
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    fields = {
        "num_layers": int(hf["num_hidden_layers"]), "hidden_size": hidden, "num_heads": heads,
        "num_kv_heads": kv_heads if kv_heads != heads else None,
        "head_dim": int(head_dim) if hf.get("head_dim") and head_dim * heads != hidden else None,
        "ffn_hidden_size": int(hf["intermediate_size"]), "vocab_size": int(hf["vocab_size"]),
        "seq_length": int(length), "max_position_embeddings": positions, "position_embedding": "rotary",
        "norm": "rmsnorm", "norm_eps": float(hf.get("rms_norm_eps", 1e-6)), "mlp": "swiglu",
        "bias": bias, "qkv_bias": qkv_bias if qkv_bias != bias else None,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "init_std": float(hf.get("initializer_range", 0.02)),
        "attention_dropout": float(hf.get("attention_dropout", 0.0)), "hidden_dropout": 0.0,
    }
    fields.update(_rope_fields(hf, where))
    saved = hf.get("megalm") or {}
    for key in ("family", "make_vocab_size_divisible_by", "prefix_attention", "hidden_dropout"):
        if key in (saved.get("model") or {}):
            fields[key] = saved["model"][key]  # megalm's own choices that config.json has no field for
    return fields


def export_family(cfg: ModelConfig, wanted: Optional[str], where: str) -> str:
    """The Hugging Face family that writes `cfg` (`wanted`, else the one its biases need); InteropError
    when `cfg` is not a model any of them computes."""
    problems = []
    if cfg.norm != "rmsnorm":
        problems.append(f"model.norm={cfg.norm} (rmsnorm)")
    if cfg.mlp != "swiglu":
        problems.append(f"model.mlp={cfg.mlp} (swiglu)")
    if cfg.position_embedding != "rotary":
        problems.append(f"model.position_embedding={cfg.position_embedding} (rotary)")
    if problems:
        raise InteropError(f"{where} is not a Llama-family model: {', '.join(problems)}; export it with --format gpt2 "
                           f"if it is GPT-2 shaped")
    qkv_bias, bias = cfg.has_qkv_bias(), cfg.bias
    family = wanted or ("qwen2" if qkv_bias and not bias else "llama")
    if family not in ARCHITECTURES:
        raise InteropError(f"--family {family!r}: megalm exports {', '.join(ARCHITECTURES)}")
    allowed = {"llama": qkv_bias == bias, "qwen2": qkv_bias and not bias, "mistral": not qkv_bias and not bias}
    if not allowed[family]:
        raise InteropError(f"{where}: model.bias={bias} with q/k/v biases {qkv_bias} cannot be written as {family} "
                           f"(llama: both or neither; qwen2: q/k/v only; mistral: none)")
    return family


def hf_config(cfg: ModelConfig, family: str, dtype_name: str, tokens: dict[str, Any],
              megalm_model: dict[str, Any]) -> dict[str, Any]:
    """config.json of transformers' `family` for megalm's model (`tokens`: bos/eos/pad ids)."""
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]], "model_type": family,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_size(),
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads(), "head_dim": cfg.head_size(), "hidden_act": "silu",
        "max_position_embeddings": cfg.max_positions(), "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
        **hf_rope_parameters(cfg), "attention_dropout": cfg.attention_dropout,
        "use_cache": True, "dtype": dtype_name,
        "bos_token_id": tokens.get("bos_token_id"), "eos_token_id": tokens.get("eos_token_id"),
        "pad_token_id": tokens.get("pad_token_id"),
    }
    if family == "llama":
        config.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    elif family == "qwen2":
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers,
                      layer_types=["full_attention"] * cfg.num_layers)
    else:
        config.update(sliding_window=None)
    config["megalm"] = {"family": cfg.family, "model": megalm_model}
    return config


# ---- the tensor table ------------------------------------------------------------------------------------
class Entry(NamedTuple):
    """One megalm tensor and the Hugging Face tensors it is made of.

    kind: "copy"; "vocab" (megalm pads the vocabulary rows with zeros); "heads" (the Hugging Face tensors'
    rows are (group, d) each, megalm's rows are (group, tensor, d): q|k|v per head, k|v per kv head).
    """

    name: str  # megalm's
    theirs: tuple[str, ...]
    kind: str
    shapes: tuple[tuple[int, ...], ...]  # of `theirs`
    groups: int = 1  # "heads": heads (or kv heads)
    split_dim: Optional[int] = None  # megalm's tensor-parallel split (0 column, 1 row, None replicated)


def tensor_table(cfg: ModelConfig) -> list[Entry]:
    """Every megalm tensor of a Llama-family model and its Hugging Face tensors, in Hugging Face file order."""
    h, ffn, d = cfg.hidden_size, cfg.ffn_size(), cfg.head_size()
    heads, kv = cfg.num_heads, cfg.kv_heads()
    table = [Entry("embedding.word.weight", ("model.embed_tokens.weight",), "vocab", ((cfg.vocab_size, h),), 1, 0)]
    for i in range(cfg.num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        attn, mlp = theirs + "self_attn.", theirs + "mlp."
        table.append(Entry(ours + "ln1.weight", (theirs + "input_layernorm.weight",), "copy", ((h,),)))
        kinds = [("weight", (h,))] + ([("bias", ())] if cfg.has_qkv_bias() else [])
        for suffix, rest in kinds:
            q, k, v = (f"{attn}{p}_proj.{suffix}" for p in "qkv")
            if not cfg.grouped_attention():
                table.append(Entry(f"{ours}attn.qkv.{suffix}", (q, k, v), "heads",
                                   ((heads * d, *rest),) * 3, heads, 0))
            else:
                table.append(Entry(f"{ours}attn.query.{suffix}", (q,), "copy", ((heads * d, *rest),), 1, 0))
                table.append(Entry(f"{ours}attn.key_value.{suffix}", (k, v), "heads", ((kv * d, *rest),) * 2, kv, 0))
        table.append(Entry(f"{ours}attn.proj.weight", (attn + "o_proj.weight",), "copy", ((h, heads * d),), 1, 1))
        if cfg.bias:
            table.append(Entry(f"{ours}attn.proj.bias", (attn + "o_proj.bias",), "copy", ((h,),)))
        table.append(Entry(ours + "ln2.weight", (theirs + "post_attention_layernorm.weight",), "copy", ((h,),)))
        for part, rows, cols, split in (("gate", ffn, h, 0), ("up", ffn, h, 0), ("down", h, ffn, 1)):
            table.append(Entry(f"{ours}mlp.{part}.weight", (f"{mlp}{part}_proj.weight",), "copy", ((rows, cols),), 1, split))
            if cfg.bias:
                table.append(Entry(f"{ours}mlp.{part}.bias", (f"{mlp}{part}_proj.bias",), "copy", ((rows,),), 1,
                                   0 if split == 0 else None))
    table.append(Entry("final_norm.weight", ("model.norm.weight",), "copy", ((h,),)))
    if not cfg.tie_embeddings:
        table.append(Entry("output.weight", ("lm_head.weight",), "vocab", ((cfg.vocab_size, h),), 1, 0))
    return table


def megalm_shape(entry: Entry, cfg: ModelConfig) -> tuple[int, ...]:
    """The full megalm tensor's shape at tp 1 (the vocabulary padded)."""
    first = entry.shapes[0]
    if entry.kind == "vocab":
        return (cfg.padded_vocab_size(1), *first[1:])
    if entry.kind == "heads":
        return (sum(shape[0] for shape in entry.shapes), *first[1:])
    return first


def from_hf(entry: Entry, tensors: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """megalm's full tensor (tp 1) from the Hugging Face tensors of `entry`, in their order."""
    if entry.kind == "vocab":
        padded = torch.zeros(megalm_shape(entry, cfg), dtype=tensors[0].dtype)
        padded[: tensors[0].shape[0]] = tensors[0]
        return padded
    if entry.kind == "heads":  # [(G * d, ...)] x n -> rows (G, n, d)
        g = entry.groups
        parts = [t.reshape(g, t.shape[0] // g, *t.shape[1:]) for t in tensors]
        stacked = torch.stack(parts, dim=1)
        return stacked.reshape(-1, *stacked.shape[3:])
    return tensors[0].contiguous()


def to_hf(entry: Entry, tensor: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """The Hugging Face tensors of `entry` from megalm's full tensor (views where they can be)."""
    if entry.kind == "vocab":
        return [tensor[: cfg.vocab_size]]
    if entry.kind == "heads":
        g, n = entry.groups, len(entry.theirs)
        grouped = tensor.reshape(g, n, tensor.shape[0] // (g * n), *tensor.shape[1:])
        return [part.reshape(-1, *tensor.shape[1:]) for part in grouped.unbind(1)]
    return [tensor]
