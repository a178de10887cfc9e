"""Rotary position embeddings: the frequencies of each scaling kind, their cos/sin tables, and the
Hugging Face config fields that describe them.

A head of width d rotates d/2 pairs (rotate-half layout: element i pairs with element i + d/2) by
the angle position x inv_freq[i], with inv_freq[i] = base^(-2i/d). The scaling kinds (model.rope_scaling)
change these frequencies so a model reaches past the context it was pretrained on:

- none:   the frequencies above.
- linear: every frequency divided by rope_factor (the same as dividing the positions).
- llama3: per frequency, by its wavelength 2 pi / inv_freq against the pretraining context L
  (rope_original_max_positions): wavelengths above L / rope_low_freq_factor are divided by rope_factor,
  those below L / rope_high_freq_factor are kept, and those between blend the two linearly in L / wavelength.
- yarn:   the pairs that turn more than rope_beta_fast times over L keep their frequency, those that turn
  fewer than rope_beta_slow times are divided by rope_factor, and a linear ramp over the pair index
  joins them; cos and sin are then multiplied by the attention factor (rope_attention_factor, or
  0.1 ln(rope_factor) + 1), which sharpens the attention logits by its square.

The numbers are those transformers computes (its ROPE_INIT_FUNCTIONS and LlamaRotaryEmbedding), in
fp32 and in the same order of operations, so a converted checkpoint sees the same tables, bit for bit
on CPU (tests/model/test_rope.py checks each kind against transformers).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from megalm.config import ModelConfig

YARN_BETA_FAST = 32.0  # transformers' defaults (null or 0 in a config.json means these)
YARN_BETA_SLOW = 1.0
DEFAULT_ROPE_THETA = 10000.0  # transformers' base when a config.json names none

_HF_TYPE = {"none": "default", "linear": "linear", "llama3": "llama3", "yarn": "yarn"}  # megalm -> HF rope_type
# The HF rope keys each kind reads, and the megalm field each one becomes.
_HF_KEYS: dict[str, dict[str, str]] = {
    "none": {},
    "linear": {"factor": "rope_factor"},
    "llama3": {
        "factor": "rope_factor",
        "low_freq_factor": "rope_low_freq_factor",
        "high_freq_factor": "rope_high_freq_factor",
        "original_max_position_embeddings": "rope_original_max_positions",
    },
    "yarn": {
        "factor": "rope_factor",
        "original_max_position_embeddings": "rope_original_max_positions",
        "attention_factor": "rope_attention_factor",
        "beta_fast": "rope_beta_fast",
        "beta_slow": "rope_beta_slow",
    },
}
_NAMING_KEYS = ("rope_type", "type", "rope_theta")  # the kind and the base: read apart from _HF_KEYS


def _base_inv_freq(head_dim: int, base: float, device: Optional[torch.device]) -> torch.Tensor:
    """base^(-2i/d) for the d/2 rotated pairs, fp32 [d/2]: the unscaled ("none") frequencies."""
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    return 1.0 / (base ** exponents)


def _llama3_inv_freq(inv_freq: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Llama 3.1's per-wavelength scaling: long wavelengths divided by the factor, short ones kept, a blend between."""
    context = cfg.rope_original_max_positions
    low, high, factor = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_factor
    wavelength = 2 * math.pi / inv_freq
    longest_kept, shortest_scaled = context / high, context / low  # wavelength limits
    # Between the limits the weight on the kept frequency rises linearly in context / wavelength, 0 -> 1.
    weight = (context / wavelength - low) / (high - low)
    blended = (1 - weight) * inv_freq / factor + weight * inv_freq
    outside = torch.where(wavelength > shortest_scaled, inv_freq / factor, inv_freq)
    between = (wavelength >= longest_kept) & (wavelength <= shortest_scaled)
    return torch.where(between, blended, outside)


def _yarn_pair_range(cfg: ModelConfig, head_dim: int) -> tuple[float, float]:
    """The pair indices where yarn's ramp starts and ends: where a pair turns beta_fast and beta_slow times over L.

    A pair i turns L * inv_freq[i] / (2 pi) times over the pretraining context L; solved for i, rounded
    outwards (transformers' truncate=True, the only rounding megalm expresses) and clipped to the head.
    """
    context, base = cfg.rope_original_max_positions, cfg.rotary_base

    def pair_turning(turns: float) -> float:
        return head_dim * math.log(context / (turns * 2 * math.pi)) / (2 * math.log(base))

    start = math.floor(pair_turning(cfg.rope_beta_fast))
    end = math.ceil(pair_turning(cfg.rope_beta_slow))
    return max(start, 0), min(end, head_dim - 1)


def _yarn_inv_freq(cfg: ModelConfig, head_dim: int, device: Optional[torch.device]) -> torch.Tensor:
    """YaRN's frequencies: kept below the ramp's start, divided by the factor past its end, mixed along it."""
    for name in ("rope_beta_fast", "rope_beta_slow"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"model.{name}={getattr(cfg, name)} must be positive (rope_scaling yarn): it is a "
                             f"number of turns over the pretraining context (defaults: beta_fast 32, beta_slow 1)")
    wavelengths = cfg.rotary_base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    kept = 1.0 / wavelengths
    interpolated = 1.0 / (cfg.rope_factor * wavelengths)
    start, end = _yarn_pair_range(cfg, head_dim)
    if start == end:
        end += 0.001  # a one-pair ramp still needs a width
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - start) / (end - start)).clamp(0, 1).to(device)
    keep_weight = 1 - ramp  # 1 for the fast pairs, 0 for the slow ones
    return interpolated * (1 - keep_weight) + kept * keep_weight


def yarn_attention_factor(factor: float) -> float:
    """YaRN's default scale of cos and sin for a context extension `factor`: 0.1 ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def rotary_inv_freq(cfg: ModelConfig, device: Optional[torch.device] = None) -> tuple[torch.Tensor, float]:
    """The rotary inverse frequencies (fp32 [head_size / 2]) for cfg.rope_scaling, and the factor on cos and sin."""
    head_dim = cfg.head_size()
    if head_dim % 2:
        raise ValueError(f"rotary positions rotate pairs of a head's elements, but the head size is {head_dim} "
                         f"(odd): set model.head_dim (or hidden_size / num_heads) to an even number")
    kind = cfg.rope_scaling
    if kind == "none":
        return _base_inv_freq(head_dim, cfg.rotary_base, device), 1.0
    if kind == "linear":
        return _base_inv_freq(head_dim, cfg.rotary_base, device) / cfg.rope_factor, 1.0
    if kind in ("llama3", "yarn") and cfg.rope_original_max_positions is None:
        raise ValueError(f"model.rope_scaling={kind} needs model.rope_original_max_positions (the pretraining context)")
    if kind == "llama3":
        return _llama3_inv_freq(_base_inv_freq(head_dim, cfg.rotary_base, device), cfg), 1.0
    if kind == "yarn":
        attention = cfg.rope_attention_factor
        if attention is None:
            attention = yarn_attention_factor(cfg.rope_factor)
        return _yarn_inv_freq(cfg, head_dim, device), attention
    raise ValueError(f"model.rope_scaling={kind!r} is not a rotary scaling kind: use one of {tuple(_HF_TYPE)}")


def _tables(inv_freq: torch.Tensor, seq_len: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [s, 1, 1, d] of positions 0..s-1 times inv_freq, both halves of the head alike, times `scale`."""
    positions = torch.arange(seq_len, device=inv_freq.device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)  # [s, d/2]
    angles = torch.cat([angles, angles], dim=-1)[:, None, None, :]  # [s, 1, 1, d]: rotate-half layout
    cos, sin = angles.cos(), angles.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos, sin


def rotary_tables(cfg: ModelConfig, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin tables [s, 1, 1, d] for cfg's rotary positions and scaling (attention factor included)."""
    inv_freq, scale = rotary_inv_freq(cfg, device)
    return _tables(inv_freq, seq_len, scale)


def rotary_cos_sin(seq_len: int, head_dim: int, base: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled cos and sin tables [s, 1, 1, d] (rope_scaling none), by head width and base; see rotary_tables."""
    return _tables(_base_inv_freq(head_dim, base, device), seq_len, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face config.json <-> megalm model fields


def _check_partial_rotary(value: Any, field: str, where: str) -> None:
    """megalm rotates whole heads: a partial_rotary_factor other than 1 is refused."""
    if value is not None and value != 1:
        raise ValueError(f"{where}: {field}={value!r} rotates only part of each head; megalm rotates whole heads "
                         f"(partial_rotary_factor 1), so this model cannot be read")


def _rope_dict(hf_config: dict, where: str) -> tuple[dict, str]:
    """The rope settings dict of a config.json and its name: rope_scaling (older schema) or rope_parameters.

    transformers reads a non-null rope_scaling before rope_parameters; a file that holds both with
    different values is ambiguous and refused.
    """
    scaling, parameters = hf_config.get("rope_scaling"), hf_config.get("rope_parameters")
    for name, value in (("rope_scaling", scaling), ("rope_parameters", parameters)):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{where}: {name}={value!r} is not a dict of rope settings (or null)")
        nested = [key for key, item in (value or {}).items() if isinstance(item, dict)]
        if nested:
            raise ValueError(f"{where}: {name} holds per-layer-type rope settings ({', '.join(nested)}); megalm "
                             f"uses one rotary setting for every layer")
    if scaling and parameters:
        kinds = [d.get("rope_type", d.get("type")) for d in (scaling, parameters)]
        shared = [key for key in scaling if key in parameters and key not in ("type", "rope_type")]
        differ = [key for key in shared if scaling[key] != parameters[key]]
        if differ or (None not in kinds and kinds[0] != kinds[1]):
            name = differ[0] if differ else "rope_type"
            first = scaling[name] if differ else kinds[0]
            second = parameters[name] if differ else kinds[1]
            raise ValueError(f"{where}: rope_scaling.{name}={first!r} but rope_parameters.{name}={second!r}: "
                             f"keep one of rope_scaling and rope_parameters (or make them agree)")
    if scaling:
        return scaling, "rope_scaling"
    return parameters or {}, "rope_parameters"


def _positive_number(value: Any, field: str, where: str) -> float:
    """A positive int or float setting, as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{where}: {field}={value!r} must be a positive number")
    return float(value)


def _context_length(value: Any, field: str, where: str) -> int:
    """A positive whole number of positions (8192 or 8192.0), as int."""
    number = _positive_number(value, field, where)
    if number != int(number):
        raise ValueError(f"{where}: {field}={value!r} must be a whole number of positions")
    return int(number)


def hf_rope_fields(hf_config: dict, where: str) -> dict[str, Any]:
    """megalm model fields (rotary_base, rope_scaling, rope_*) for a Hugging Face config.json dict's rope settings.

    Reads both schemas: transformers 5's `rope_parameters` {rope_type, rope_theta, factor, ...} and the
    older top-level `rope_theta` with a `rope_scaling` dict (its kind under `rope_type` or the legacy
    `type`) or null. Only the fields the kind uses are returned. A kind or key megalm cannot express
    (dynamic, longrope, mscale, truncate false, partial_rotary_factor != 1, ...) is a ValueError that names
    it; `where` (e.g. the file's path) starts every message.
    """
    rope, name = _rope_dict(hf_config, where)
    _check_partial_rotary(hf_config.get("partial_rotary_factor"), "partial_rotary_factor", where)
    _check_partial_rotary(rope.get("partial_rotary_factor"), f"{name}.partial_rotary_factor", where)

    kind_key = "rope_type" if rope.get("rope_type") is not None else "type"
    hf_kind = rope.get(kind_key) or "default"
    if rope.get("rope_type") is not None and rope.get("type") is not None and rope["type"] != rope["rope_type"]:
        raise ValueError(f"{where}: {name}.rope_type={rope['rope_type']!r} but {name}.type={rope['type']!r}: "
                         f"keep one (type is the older name of rope_type)")
    kinds = {hf: ours for ours, hf in _HF_TYPE.items()}
    if hf_kind not in kinds:
        raise ValueError(f"{where}: {name}.{kind_key}={hf_kind!r} is a rope scaling megalm does not implement "
                         f"(it reads {', '.join(kinds)})")
    kind = kinds[hf_kind]

    # transformers takes the rope dict's rope_theta, then the top-level one; two different values are refused.
    candidates = ((f"{name}.rope_theta", rope.get("rope_theta")), ("rope_theta", hf_config.get("rope_theta")),
                  ("rope_parameters.rope_theta", (hf_config.get("rope_parameters") or {}).get("rope_theta")))
    thetas = {place: value for place, value in candidates if value is not None}
    places = list(thetas.items())
    differing = [(place, value) for place, value in places if value != places[0][1]]
    if differing:
        raise ValueError(f"{where}: {places[0][0]}={places[0][1]!r} but {differing[0][0]}={differing[0][1]!r}: "
                         f"keep one rope_theta")
    theta = next(iter(thetas.values()), DEFAULT_ROPE_THETA)
    fields: dict[str, Any] = {"rotary_base": _positive_number(theta, "rope_theta", where), "rope_scaling": kind}

    known = _HF_KEYS[kind]
    for key, value in rope.items():
        if key in _NAMING_KEYS or key in known or key == "partial_rotary_factor" or value is None:
            continue  # null means unset in a config.json
        if key == "truncate" and kind == "yarn":
            if value is not True:
                raise ValueError(f"{where}: {name}.truncate={value!r}: megalm's yarn rounds the ramp's pair range "
                                 f"outwards (transformers' truncate true) and cannot express truncate false")
            continue
        raise ValueError(f"{where}: {name}.{key}={value!r} is not a setting megalm's rope_scaling {kind} can express "
                         f"(it reads {', '.join(known) or 'no settings'} for {name}.rope_type={hf_kind!r})")

    if "factor" in known:
        if "factor" not in rope:
            raise ValueError(f"{where}: {name} of rope_type {hf_kind!r} has no factor (the context extension factor)")
        factor = rope["factor"]
        if factor is None and kind == "yarn":  # transformers: the ratio of the two context lengths
            if hf_config.get("max_position_embeddings") is None:
                raise ValueError(f"{where}: {name}.factor is null and there is no max_position_embeddings to "
                                 f"derive it from (max_position_embeddings / original_max_position_embeddings)")
            factor = hf_config["max_position_embeddings"] / _original_context(hf_config, rope, name, where)
        fields["rope_factor"] = _positive_number(factor, f"{name}.factor", where)
    if "original_max_position_embeddings" in known:
        fields["rope_original_max_positions"] = _original_context(hf_config, rope, name, where)
    for key in ("low_freq_factor", "high_freq_factor"):
        if key in known:
            if rope.get(key) is None:
                raise ValueError(f"{where}: {name} of rope_type llama3 has no {key}")
            fields[known[key]] = _positive_number(rope[key], f"{name}.{key}", where)
    if kind == "yarn":
        attention = rope.get("attention_factor")
        if attention is not None:
            fields["rope_attention_factor"] = _positive_number(attention, f"{name}.attention_factor", where)
        # transformers reads a missing, null or 0 beta as its default
        fields["rope_beta_fast"] = float(rope.get("beta_fast") or YARN_BETA_FAST)
        fields["rope_beta_slow"] = float(rope.get("beta_slow") or YARN_BETA_SLOW)
    return fields


def _original_context(hf_config: dict, rope: dict, name: str, where: str) -> int:
    """The pretraining context of a llama3/yarn config, where transformers looks for it.

    A top-level original_max_position_embeddings (Phi-3's place) comes first, then the rope dict's,
    then max_position_embeddings; two different values are refused.
    """
    top, inner = hf_config.get("original_max_position_embeddings"), rope.get("original_max_position_embeddings")
    if top is not None and inner is not None and top != inner:
        raise ValueError(f"{where}: original_max_position_embeddings={top!r} but {name}.original_max_position_"
                         f"embeddings={inner!r}: keep one")
    value = top if top is not None else inner if inner is not None else hf_config.get("max_position_embeddings")
    if value is None:
        raise ValueError(f"{where}: {name} of rope_type {rope.get('rope_type', rope.get('type'))!r} needs "
                         f"original_max_position_embeddings (or max_position_embeddings)")
    return _context_length(value, f"{name}.original_max_position_embeddings", where)


def hf_rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json rope entries for a rotary model: `rope_parameters` (transformers 5) and the same as the
    older top-level `rope_theta` and `rope_scaling` (null for none), which transformers 5 reads identically."""
    if cfg.position_embedding != "rotary":
        raise ValueError(f"model.position_embedding={cfg.position_embedding}: only rotary models have rope parameters")
    kind = cfg.rope_scaling
    if kind not in _HF_KEYS:
        raise ValueError(f"model.rope_scaling={kind!r} is not a rotary scaling kind: use one of {tuple(_HF_TYPE)}")
    settings: dict[str, Any] = {}
    for key, field in _HF_KEYS[kind].items():
        value = getattr(cfg, field)
        if value is not None:  # rope_attention_factor null: transformers derives the same default
            settings[key] = value
    parameters = {"rope_type": _HF_TYPE[kind], "rope_theta": cfg.rotary_base, **settings}
    legacy_scaling = {"rope_type": _HF_TYPE[kind], **settings} if kind != "none" else None
    return {"rope_parameters": parameters, "rope_theta": cfg.rotary_base, "rope_scaling": legacy_scaling}
