"""Rotary frequencies and tables against transformers (each scaling kind, several settings), and the
Hugging Face rope fields in both config.json schemas: read, written, round-tripped and refused."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from megalm.config import ModelConfig
from megalm.model.rope import hf_rope_fields, hf_rope_parameters, rotary_cos_sin, rotary_inv_freq, rotary_tables

HF_REASON = "Hugging Face transformers is not installed (pip install 'megalm[hf]')"
WHERE = "model/config.json"

# (megalm fields, the same as transformers 5's rope_parameters); heads are 2 of head_dim each.
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "none-gpt-neox": ({"head_dim": 64}, {"rope_type": "default", "rope_theta": 10000.0}),
    "none-llama3-base": ({"head_dim": 128, "rotary_base": 500000.0}, {"rope_type": "default", "rope_theta": 500000.0}),
    "none-qwen-80": ({"head_dim": 80, "rotary_base": 1e6}, {"rope_type": "default", "rope_theta": 1e6}),
    "linear-2": ({"head_dim": 64, "rope_scaling": "linear", "rope_factor": 2.0},
                 {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "linear-4-theta1e6": ({"head_dim": 128, "rotary_base": 1e6, "rope_scaling": "linear", "rope_factor": 4.0},
                          {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0}),
    "linear-1.5": ({"head_dim": 96, "rope_scaling": "linear", "rope_factor": 1.5},
                   {"rope_type": "linear", "rope_theta": 10000.0, "factor": 1.5}),
    "llama3.1": ({"head_dim": 128, "rotary_base": 500000.0, "rope_scaling": "llama3", "rope_factor": 8.0,
                  "rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0, "rope_original_max_positions": 8192},
                 {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama3.2-1b": ({"head_dim": 64, "rotary_base": 500000.0, "rope_scaling": "llama3", "rope_factor": 32.0,
                     "rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0, "rope_original_max_positions": 8192},
                    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama3-small": ({"head_dim": 96, "rope_scaling": "llama3", "rope_factor": 4.0, "rope_low_freq_factor": 2.0,
                      "rope_high_freq_factor": 8.0, "rope_original_max_positions": 2048},
                     {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 2.0,
                      "high_freq_factor": 8.0, "original_max_position_embeddings": 2048}),
    "yarn-qwen": ({"head_dim": 128, "rotary_base": 1e6, "rope_scaling": "yarn", "rope_factor": 4.0,
                   "rope_original_max_positions": 32768},
                  {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768}),
    "yarn-betas-attention": ({"head_dim": 64, "rope_scaling": "yarn", "rope_factor": 2.0,
                              "rope_original_max_positions": 4096, "rope_attention_factor": 0.8,
                              "rope_beta_fast": 16.0, "rope_beta_slow": 2.0},
                             {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                              "original_max_position_embeddings": 4096, "attention_factor": 0.8,
                              "beta_fast": 16.0, "beta_slow": 2.0}),
    "yarn-short-context": ({"head_dim": 96, "rope_scaling": "yarn", "rope_factor": 8.0,
                            "rope_original_max_positions": 256},
                           {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                            "original_max_position_embeddings": 256}),
}
MAX_POSITIONS = 131072


def model_config(**fields: Any) -> ModelConfig:
    """A rotary ModelConfig of 2 heads whose width head_dim need not be hidden / heads."""
    return ModelConfig(hidden_size=64, num_heads=2, position_embedding="rotary", **fields)


def hf_llama_config(head_dim: int, **rope: Any):
    transformers = pytest.importorskip("transformers", reason=HF_REASON)
    return transformers.LlamaConfig(hidden_size=64, num_attention_heads=2, head_dim=head_dim,
                                    max_position_embeddings=MAX_POSITIONS, **rope)


def hf_inv_freq(hf_config) -> tuple[torch.Tensor, float]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    kind = hf_config.rope_parameters["rope_type"]
    init = LlamaRotaryEmbedding.compute_default_rope_parameters if kind == "default" else ROPE_INIT_FUNCTIONS[kind]
    return init(hf_config)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 0.0, atol: float = 0.0) -> None:
    assert actual.dtype == expected.dtype == torch.float32 and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("case", sorted(CASES))
def test_inv_freq_and_attention_factor_match_transformers(case: str) -> None:
    fields, rope = CASES[case]
    cfg = model_config(**fields)
    hf_freq, hf_factor = hf_inv_freq(hf_llama_config(fields["head_dim"], rope_parameters=dict(rope)))
    inv_freq, factor = rotary_inv_freq(cfg)
    assert inv_freq.shape == (fields["head_dim"] // 2,)
    assert_close(inv_freq, hf_freq.float(), rtol=1e-6)
    assert factor == pytest.approx(hf_factor, rel=1e-6)
    if fields.get("rope_scaling", "none") != "none":
        base, _ = rotary_inv_freq(model_config(head_dim=fields["head_dim"], rotary_base=cfg.rotary_base))
        assert not torch.equal(inv_freq, base)  # the scaling did change something


@pytest.mark.parametrize("case", sorted(CASES))
def test_cos_sin_match_transformers_rotary_embedding(case: str) -> None:
    fields, rope = CASES[case]
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    seq_len, head_dim = 4096, fields["head_dim"]
    embedding = LlamaRotaryEmbedding(hf_llama_config(head_dim, rope_parameters=dict(rope)))
    positions = torch.arange(seq_len)[None, :]
    hf_cos, hf_sin = embedding(torch.zeros(1, seq_len, head_dim), positions)  # [1, s, d]
    cos, sin = rotary_tables(model_config(**fields), seq_len, torch.device("cpu"))
    assert cos.shape == sin.shape == (seq_len, 1, 1, head_dim)
    assert_close(cos[:, 0, 0], hf_cos[0], atol=1e-6)
    assert_close(sin[:, 0, 0], hf_sin[0], atol=1e-6)


def test_yarn_tables_carry_the_attention_factor() -> None:
    fields, _ = CASES["yarn-qwen"]
    cos, sin = rotary_tables(model_config(**fields), 8, torch.device("cpu"))
    expected = 0.1 * math.log(4.0) + 1.0
    assert cos[0, 0, 0, 0].item() == pytest.approx(expected, rel=1e-7)  # position 0: cos 1 times the factor
    assert torch.allclose(cos**2 + sin**2, torch.full_like(cos, expected**2), rtol=1e-5)


def _todays_rotary_cos_sin(seq_len: int, head_dim: int, base: float, device: torch.device):
    """megalm.model.layers.rotary_cos_sin before rope scaling (its tables must not move by a bit)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)[:, None, None, :]
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("head_dim,base", [(16, 10000.0), (64, 10000.0), (128, 500000.0), (80, 1e6)])
def test_unscaled_tables_are_bit_identical_to_todays(head_dim: int, base: float) -> None:
    device = torch.device("cpu")
    expected = _todays_rotary_cos_sin(300, head_dim, base, device)
    cfg = model_config(head_dim=head_dim, rotary_base=base, rope_factor=4.0)  # rope_factor unused by none
    for cos, sin in (rotary_tables(cfg, 300, device), rotary_cos_sin(300, head_dim, base, device)):
        assert torch.equal(cos, expected[0]) and torch.equal(sin, expected[1])


def test_linear_scaling_is_dividing_positions() -> None:
    scaled, _ = rotary_tables(model_config(head_dim=32, rope_scaling="linear", rope_factor=2.0), 64, torch.device("cpu"))
    plain, _ = rotary_tables(model_config(head_dim=32), 64, torch.device("cpu"))
    assert torch.allclose(scaled[2::2], plain[1:32], atol=1e-6)  # position 2p scaled is position p unscaled


def test_odd_head_size_is_refused() -> None:
    with pytest.raises(ValueError, match="head size is 9 .odd."):
        rotary_inv_freq(model_config(head_dim=9))


def test_yarn_non_positive_beta_is_refused() -> None:
    fields, _ = CASES["yarn-qwen"]
    with pytest.raises(ValueError, match=r"model\.rope_beta_slow must be positive, got 0\.0"):
        rotary_inv_freq(model_config(**{**fields, "rope_beta_slow": 0.0}))  # ConfigError is a ValueError


# --- Hugging Face config.json fields ---------------------------------------------------------------------


def _megalm_rope(cfg: ModelConfig) -> dict[str, Any]:
    return {name: getattr(cfg, name) for name in ModelConfig.__dataclass_fields__
            if name.startswith("rope_") or name == "rotary_base"}


def _expected_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """What hf_rope_fields returns for a case: the kind's own fields, explicit (yarn's betas too)."""
    cfg = model_config(**fields)
    used = {"none": (), "linear": ("rope_factor",),
            "llama3": ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_positions"),
            "yarn": ("rope_factor", "rope_original_max_positions", "rope_beta_fast", "rope_beta_slow")}[cfg.rope_scaling]
    expected = {"rotary_base": cfg.rotary_base, "rope_scaling": cfg.rope_scaling, **{k: getattr(cfg, k) for k in used}}
    if cfg.rope_attention_factor is not None:
        expected["rope_attention_factor"] = cfg.rope_attention_factor
    return expected


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_rope_fields_reads_rope_parameters(case: str) -> None:
    fields, rope = CASES[case]
    got = hf_rope_fields({"max_position_embeddings": MAX_POSITIONS, "rope_parameters": dict(rope)}, WHERE)
    assert got == _expected_fields(fields)
    assert type(got["rotary_base"]) is float


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kind_key", ["rope_type", "type"])
def test_hf_rope_fields_reads_legacy_rope_theta_and_rope_scaling(case: str, kind_key: str) -> None:
    fields, rope = CASES[case]
    legacy = {"rope_theta": rope["rope_theta"], "max_position_embeddings": MAX_POSITIONS, "rope_scaling": None}
    if rope["rope_type"] != "default":
        legacy["rope_scaling"] = {kind_key: rope["rope_type"],
                                  **{k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")}}
    assert hf_rope_fields(legacy, WHERE) == _expected_fields(fields)


def test_hf_rope_fields_defaults() -> None:
    assert hf_rope_fields({}, WHERE) == {"rotary_base": 10000.0, "rope_scaling": "none"}
    assert hf_rope_fields({"rope_theta": 1e6, "rope_scaling": None}, WHERE) == {"rotary_base": 1e6, "rope_scaling": "none"}
    # Qwen2.5's suggested yarn block, in the older schema with `type`; betas as in transformers (null/0 = default)
    qwen = {"rope_theta": 1000000.0, "max_position_embeddings": 131072,
            "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn",
                             "beta_fast": None, "beta_slow": 0, "truncate": True, "mscale": None}}
    assert hf_rope_fields(qwen, WHERE) == {
        "rotary_base": 1e6, "rope_scaling": "yarn", "rope_factor": 4.0, "rope_original_max_positions": 32768,
        "rope_beta_fast": 32.0, "rope_beta_slow": 1.0}


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 32768},  # factor: the context ratio
    {"rope_type": "yarn", "factor": 4.0},  # original: max_position_embeddings
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
])
def test_hf_rope_fields_fills_in_as_transformers_does(rope: dict[str, Any]) -> None:
    fields = hf_rope_fields({"max_position_embeddings": MAX_POSITIONS, "rope_theta": 5e5, "rope_scaling": rope}, WHERE)
    hf_freq, hf_factor = hf_inv_freq(hf_llama_config(64, rope_theta=5e5, rope_scaling=dict(rope)))
    inv_freq, factor = rotary_inv_freq(model_config(head_dim=64, **fields))
    assert_close(inv_freq, hf_freq.float(), rtol=1e-6)
    assert factor == pytest.approx(hf_factor, rel=1e-6)


def test_top_level_original_max_position_embeddings_wins_as_in_transformers() -> None:
    rope = {"rope_type": "yarn", "factor": 4.0}
    hf_config = {"max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "rope_parameters": rope}
    fields = hf_rope_fields(hf_config, WHERE)
    assert fields["rope_original_max_positions"] == 4096
    hf_freq, _ = hf_inv_freq(hf_llama_config(64, original_max_position_embeddings=4096, rope_parameters=dict(rope)))
    assert_close(rotary_inv_freq(model_config(head_dim=64, **fields))[0], hf_freq.float(), rtol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_rope_parameters_round_trip_through_transformers(case: str) -> None:
    fields, rope = CASES[case]
    cfg = model_config(**fields)
    written = hf_rope_parameters(cfg)
    betas = {"beta_fast": 32.0, "beta_slow": 1.0} if cfg.rope_scaling == "yarn" else {}
    assert written["rope_parameters"] == {**betas, **rope}  # yarn's betas are written even at their defaults
    assert written["rope_theta"] == cfg.rotary_base
    if cfg.rope_scaling == "none":
        assert written["rope_scaling"] is None
    # Both schemas read back to the same megalm fields, alone or together.
    legacy = {"rope_theta": written["rope_theta"], "rope_scaling": written["rope_scaling"]}
    for hf_config in (written, {"rope_parameters": written["rope_parameters"]}, legacy):
        back = model_config(head_dim=fields["head_dim"], **hf_rope_fields(hf_config, WHERE))
        assert _megalm_rope(back) == _megalm_rope(cfg)
    # transformers 5 reads what we write as the rope_parameters alone, and computes our frequencies from it.
    loaded = hf_llama_config(fields["head_dim"], **written)
    alone = hf_llama_config(fields["head_dim"], rope_parameters=dict(written["rope_parameters"]))
    assert loaded.rope_parameters == alone.rope_parameters
    saved = loaded.to_dict()
    assert model_config(head_dim=fields["head_dim"], **hf_rope_fields(saved, WHERE)) == cfg
    hf_freq, hf_factor = hf_inv_freq(loaded)
    inv_freq, factor = rotary_inv_freq(cfg)
    assert_close(inv_freq, hf_freq.float(), rtol=1e-6)
    assert factor == pytest.approx(hf_factor, rel=1e-6)


def test_hf_rope_parameters_needs_rotary_positions() -> None:
    with pytest.raises(ValueError, match="position_embedding=learned"):
        hf_rope_parameters(ModelConfig())


_LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


@pytest.mark.parametrize("hf_config,message", [
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, r"rope_scaling\.type='dynamic' is a rope scaling megalm"),
    ({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}},
     r"rope_parameters\.rope_type='longrope'"),
    ({"rope_parameters": {**_YARN, "mscale": 0.707, "mscale_all_dim": 0.707}}, r"rope_parameters\.mscale=0\.707"),
    ({"rope_parameters": {**_YARN, "mscale_all_dim": 1.0}}, r"rope_parameters\.mscale_all_dim=1\.0"),
    ({"rope_parameters": {**_YARN, "truncate": False}}, r"rope_parameters\.truncate=False: .*truncate false"),
    ({"rope_theta": 1e4, "partial_rotary_factor": 0.5}, r"partial_rotary_factor=0\.5 rotates only part"),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.25}},
     r"rope_parameters\.partial_rotary_factor=0\.25"),
    ({"rope_parameters": {"rope_type": "llama3", **_LLAMA3, "low_freq_wavelen": 3}},
     r"rope_parameters\.low_freq_wavelen=3 is not a setting .* llama3"),
    ({"rope_parameters": {"rope_type": "default", "factor": 2.0}}, r"rope_parameters\.factor=2\.0 is not a setting"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "default"}}},
     r"per-layer-type rope settings \(full_attention, sliding_attention\)"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_parameters": {"rope_type": "linear", "factor": 4.0}},
     r"rope_scaling\.factor=2\.0 but rope_parameters\.factor=4\.0"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_parameters": {"rope_type": "default"}},
     r"rope_scaling\.rope_type='linear' but rope_parameters\.rope_type='default'"),
    ({"rope_theta": 1e4, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
     r"rope_parameters\.rope_theta=500000\.0 but rope_theta=10000\.0: keep one rope_theta"),
    ({"rope_theta": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 2.0},
      "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}},
     r"rope_theta=10000\.0 but rope_parameters\.rope_theta=500000\.0: keep one"),
    ({"max_position_embeddings": None, "rope_parameters": {**_YARN, "factor": None}},
     r"rope_parameters\.factor is null and there is no max_position_embeddings"),
    ({"rope_scaling": {"type": "linear", "rope_type": "yarn", "factor": 2.0}},
     r"rope_scaling\.rope_type='yarn' but rope_scaling\.type='linear'"),
    ({"rope_scaling": {"type": "linear"}}, r"rope_scaling of rope_type 'linear' has no factor"),
    ({"rope_scaling": {"rope_type": "linear", "factor": -2}}, r"rope_scaling\.factor=-2 must be a positive number"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}},
     r"rope_parameters of rope_type llama3 has no low_freq_factor"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, r"needs original_max_position_embeddings"),
    ({"rope_parameters": {**_YARN, "original_max_position_embeddings": 8192.5}}, r"=8192\.5 must be a whole number"),
    ({"original_max_position_embeddings": 4096, "rope_parameters": _YARN},
     r"original_max_position_embeddings=4096 but rope_parameters\.original_max_position_embeddings=32768"),
    ({"rope_scaling": "yarn"}, r"rope_scaling='yarn' is not a dict"),
])
def test_hf_rope_fields_refuses_what_megalm_cannot_express(hf_config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        hf_rope_fields(hf_config, WHERE)
    assert str(error.value).startswith(f"{WHERE}: ")
