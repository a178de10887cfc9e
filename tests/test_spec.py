"""Architecture as data: every field of the model spec reaches the model, the planner and the Hugging Face maps.

For each field, a base Llama-style spec and the same spec with that field changed:

- the model: the built parameters (names and shapes) differ, or the logits on one batch do;
- the planner: its parameter count, FLOPs per token or activation bytes differ, or the field is declared
  here as one the planner has nothing to count for (a norm's epsilon, the rotary frequencies), with why;
- the Hugging Face maps: what export writes (the family chosen, config.json, or the refusal naming the field)
  differs, and where config.json can hold the model, importing it gives the changed value back.

A new field in ModelConfig's architecture (the fields a checkpoint's model is compared by) fails here until
it reaches all three.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megalm.checkpoint.state import MODEL_FIELDS
from megalm.config import ModelConfig
from megalm.distributed import ParallelGroups
from megalm.interop import InteropError
from megalm.interop.gpt2 import gpt2_differences
from megalm.interop.llama import export_family, hf_config, model_fields
from megalm.model.gpt import build_model
from megalm.plan.flops import training_flops_per_token
from megalm.plan.layout import Layout, full_param_count
from megalm.plan.model import layer_activation_bytes

BASE = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, ffn_hidden_size=96, vocab_size=256,
            seq_length=32, position_embedding="rotary", norm="rmsnorm", mlp="swiglu", bias=False,
            tie_embeddings=False, norm_eps=1e-6)
LLAMA3 = dict(rope_scaling="llama3", rope_factor=4.0, rope_original_max_positions=16)
YARN = dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_positions=2048)  # betas move the ramp at d = 16
CHANGES = {  # field -> (base overrides, changed value)
    "norm": ({}, "layernorm"), "norm_eps": ({}, 1e-3), "mlp": ({}, "gelu"), "num_kv_heads": ({}, 1),
    "head_dim": ({}, 32), "bias": ({}, True), "qkv_bias": ({}, True), "tie_embeddings": ({}, True),
    "rotary_base": ({}, 500000.0), "ffn_hidden_size": ({}, 128),
    "rope_scaling": ({"rope_factor": 4.0, "rope_original_max_positions": 16}, "llama3"),
    "rope_factor": (dict(rope_scaling="linear", rope_factor=2.0), 4.0),
    "rope_low_freq_factor": (LLAMA3, 2.0), "rope_high_freq_factor": (LLAMA3, 8.0),
    "rope_original_max_positions": (LLAMA3, 8),
    "rope_attention_factor": (YARN, 1.5), "rope_beta_fast": (YARN, 8.0), "rope_beta_slow": (YARN, 2.0),
}
# The spec: the architecture fields the issue names (norm, MLP, heads, biases, output layer, positions).
SPEC_FIELDS = tuple(sorted(CHANGES))
# Fields the planner has nothing to count for: they change values, not any tensor's size or any FLOP.
NOT_COUNTED = {
    "norm_eps": "an epsilon inside the norm: no size, no FLOPs",
    "rotary_base": "the rotary frequencies: the tables are [s, d] whatever they hold",
    **{name: "the rotary frequencies' scaling: the tables are [s, d] whatever they hold"
       for name in SPEC_FIELDS if name.startswith("rope_")},
}


def configs(field: str) -> tuple[ModelConfig, ModelConfig]:
    overrides, value = CHANGES[field]
    base = ModelConfig(**{**BASE, **overrides})
    return base, dataclasses.replace(base, **{field: value})


def test_the_spec_fields_are_the_architecture_fields() -> None:
    """Every field a checkpoint's model is compared by, except the model's size and positions table, which
    tests/test_plan*.py and the GPT-2 interop tests cover, and the attention-mask choices (family, document_mask:
    no weight, FLOP or Hugging Face field; tests/model/test_flex.py and test_document_mask.py check what the
    planner counts of their masks), is one of the spec's here."""
    sizes = {"family", "num_layers", "hidden_size", "num_heads", "vocab_size", "seq_length",
             "max_position_embeddings", "position_embedding", "document_mask"}
    assert set(MODEL_FIELDS) - sizes == set(SPEC_FIELDS)


def model_view(cfg: ModelConfig) -> tuple:
    model = build_model(cfg, ParallelGroups.single(), seed=3)
    shapes = tuple((name, tuple(param.shape)) for name, param in model.named_parameters())
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return shapes, model(tokens)


@pytest.mark.parametrize("field", SPEC_FIELDS)
def test_each_field_reaches_the_model(field: str) -> None:
    base, changed = configs(field)
    (base_shapes, base_logits), (shapes, logits) = model_view(base), model_view(changed)
    assert shapes != base_shapes or not torch.equal(logits, base_logits)


def plan_view(cfg: ModelConfig) -> tuple:
    layout = Layout(2, 1, 1, 1, 1)
    return full_param_count(cfg), training_flops_per_token(cfg), layer_activation_bytes(cfg, layout, 2)


@pytest.mark.parametrize("field", SPEC_FIELDS)
def test_each_field_reaches_the_planner(field: str) -> None:
    base, changed = configs(field)
    if field in NOT_COUNTED:
        assert plan_view(changed) == plan_view(base)  # declared: nothing to count (else it belongs below)
    else:
        assert plan_view(changed) != plan_view(base)


def hf_view(cfg: ModelConfig) -> object:
    """What export writes for `cfg`: Llama-family config.json, GPT-2 (its differences: none), or the refusal."""
    try:
        family = export_family(cfg, None, "run")
    except InteropError as error:
        return ("not llama", str(error), tuple(gpt2_differences(cfg)))
    return hf_config(cfg, family, "float32", {}, {})


@pytest.mark.parametrize("field", SPEC_FIELDS)
def test_each_field_reaches_the_hugging_face_maps(field: str) -> None:
    base, changed = configs(field)
    written = hf_view(changed)
    assert written != hf_view(base)
    if isinstance(written, tuple):  # not a Llama-family model: the refusal names the field
        assert f"model.{field}=" in written[1] or any(f"model.{field}=" in why for why in written[2])
        return
    imported = ModelConfig(**{**BASE, **model_fields(written, "config.json", seq_length=changed.seq_length)})
    as_used = {"num_kv_heads": ModelConfig.kv_heads, "head_dim": ModelConfig.head_size,
               "qkv_bias": ModelConfig.has_qkv_bias}.get(field, lambda cfg: getattr(cfg, field))
    assert as_used(imported) == as_used(changed)
