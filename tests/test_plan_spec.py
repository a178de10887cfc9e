"""The planner's counts follow the model spec: parameters equal transformers' num_parameters() for Llama,
Qwen2-style and GPT-style shapes (8B and 70B on the meta device), FLOPs per token count SwiGLU's three
matrices and GQA's smaller key/value projections, and the time and memory models follow the fields."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megalm.config import ModelConfig, load_config
from megalm.plan import Layout, get_numerics, load_cluster, make_plan
from megalm.plan.flops import layer_matmul_flops, training_flops_per_token
from megalm.plan.layout import bucket_sizes, full_param_count, layer_param_sizes, local_kv_heads, rank_param_count

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
H100 = load_cluster("h100-80gb")
MEGALM = get_numerics("megalm")

transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed")


def _llama(**fields) -> ModelConfig:
    spec = dict(num_layers=2, hidden_size=64, num_heads=8, num_kv_heads=2, ffn_hidden_size=176, vocab_size=300,
                seq_length=32, position_embedding="rotary", norm="rmsnorm", mlp="swiglu", bias=False,
                tie_embeddings=False)
    spec.update(fields)
    return ModelConfig(**spec)


def _hf_count(cfg: ModelConfig) -> int:
    """transformers' own count of the same shape, built on the meta device (nothing allocated)."""
    shape = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size(),
                 num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                 num_key_value_heads=cfg.kv_heads(), rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings)
    if cfg.has_qkv_bias() and not cfg.bias:
        config, model_class = transformers.Qwen2Config(**shape), transformers.Qwen2ForCausalLM
    else:
        config = transformers.LlamaConfig(**shape, head_dim=cfg.head_size(), attention_bias=cfg.bias, mlp_bias=cfg.bias)
        model_class = transformers.LlamaForCausalLM
    with torch.device("meta"):
        return model_class(config).num_parameters()


# Llama 3.1 8B and 70B as Meta's config.json gives them, written out here rather than read from our configs
LLAMA_3_8B = dict(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, ffn_hidden_size=14336,
                  vocab_size=128256, seq_length=8192)
LLAMA_3_70B = dict(num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8, ffn_hidden_size=28672,
                   vocab_size=128256, seq_length=8192)

SHAPES = {
    "llama-3-8b": _llama(**LLAMA_3_8B),
    "llama-3-70b": _llama(**LLAMA_3_70B),
    "gqa untied": _llama(),
    "gqa tied": _llama(tie_embeddings=True),
    "mqa": _llama(num_kv_heads=1),
    "mha swiglu": _llama(num_kv_heads=None),
    "head_dim 24": _llama(head_dim=24),
    "biases everywhere": _llama(bias=True),
    "qwen2 qkv bias": _llama(qkv_bias=True),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_parameter_count_equals_transformers(name: str) -> None:
    cfg = SHAPES[name]
    assert full_param_count(cfg) == _hf_count(cfg)


def test_published_llama_3_sizes() -> None:
    """The counts Meta publishes (8.03B, 70.6B), exactly, and our shipped configs have those shapes."""
    assert full_param_count(SHAPES["llama-3-8b"]) == 8_030_261_248
    assert full_param_count(SHAPES["llama-3-70b"]) == 70_553_706_496
    for name, shape in (("llama-3-8b", LLAMA_3_8B), ("llama-3-70b", LLAMA_3_70B)):
        model = load_config(CONFIGS / f"{name}.yaml").model
        assert {key: getattr(model, key) for key in shape} == shape
        assert full_param_count(model) == full_param_count(SHAPES[name])
        assert (model.rope_scaling, model.rope_factor, model.rope_original_max_positions) == ("llama3", 8.0, 8192)
        assert (model.rotary_base, model.norm_eps, model.tie_embeddings, model.bias) == (500000.0, 1e-5, False, False)


def test_gpt_parameter_count_equals_transformers_gpt2() -> None:
    """The default spec (LayerNorm, GeLU, biases, learned positions, tied) is GPT-2's count."""
    cfg = ModelConfig(num_layers=3, hidden_size=48, num_heads=4, vocab_size=300, seq_length=40)
    config = transformers.GPT2Config(vocab_size=300, n_positions=40, n_embd=48, n_layer=3, n_head=4)
    with torch.device("meta"):
        assert full_param_count(cfg) == transformers.GPT2LMHeadModel(config).num_parameters()


def test_vocabulary_padding_is_counted_apart() -> None:
    cfg = SHAPES["llama-3-8b"]  # 128,256 = 1002 x 128: unpadded at tp 1 and 2, padded to 129,024 at tp 8
    assert full_param_count(cfg, padded_tp=2) == full_param_count(cfg)
    assert full_param_count(cfg, padded_tp=8) - full_param_count(cfg) == 2 * (129024 - 128256) * 4096


# ---- per rank: kv heads split or replicated -------------------------------------------------------


@pytest.mark.parametrize("tp,local", [(1, 2), (2, 1), (4, 1), (8, 1)])
def test_kv_heads_per_rank(tp: int, local: int) -> None:
    cfg = _llama()  # 8 heads, 2 kv heads, head_dim 8
    assert local_kv_heads(cfg, tp) == local
    sizes = layer_param_sizes(cfg, tp)
    # rmsnorm, query, key_value, proj, rmsnorm, gate, up, down
    assert sizes == [64, 64 * 64 // tp, 2 * local * 8 * 64, 64 * 64 // tp, 64, 176 * 64 // tp, 176 * 64 // tp,
                     64 * 176 // tp]
    with pytest.raises(ValueError, match="num_kv_heads=2"):
        local_kv_heads(_llama(num_kv_heads=2, num_heads=6), 3)


def test_untied_output_lives_on_the_last_stage_and_needs_no_embedding_sum() -> None:
    cfg = _llama(num_layers=4)
    tied = dataclasses.replace(cfg, tie_embeddings=True)
    layout = Layout(2, 2, 1, 1, 4)
    embedding = cfg.padded_vocab_size(2) // 2 * cfg.hidden_size
    assert rank_param_count(cfg, layout, 0) == rank_param_count(tied, layout, 0)  # the word embedding
    assert rank_param_count(cfg, layout, 1) == rank_param_count(tied, layout, 1)  # output.weight, or the tied copy
    assert bucket_sizes(tied, layout, 1)[-1] == embedding  # the tied copy: its own bucket, summed over the group
    assert sum(bucket_sizes(cfg, layout, 1)) == rank_param_count(cfg, layout, 1)
    # one stage: tied holds one embedding, untied two
    single = Layout(2, 1, 1, 1, 4)
    assert rank_param_count(cfg, single, 0) - rank_param_count(tied, single, 0) == embedding
    plan = lambda model: make_plan(model, layout, H100, MEGALM, "bf16").time.data_comm  # noqa: E731
    assert plan(cfg) < plan(tied)  # no all-reduce of the tied embedding between the first and last stage


# ---- FLOPs per token ---------------------------------------------------------------------------------


def test_flops_count_swiglu_matrices_and_smaller_kv_projections() -> None:
    """By hand from the shapes: 2 FLOPs per multiply-add; q [H d, h], k and v [K d, h] each, o [h, H d],
    gate, up [f, h] and down [h, f]; scores and weighted sum 2 x 2 s H d; logits 2 h V; training = 3 x."""
    cfg = _llama(head_dim=12)  # h 64, H 8, K 2, d 12, f 176, s 32, V 300, 2 layers
    h, heads, kv, d, f, s, vocab = 64, 8, 2, 12, 176, 32, 300
    per_layer = 2 * h * heads * d + 2 * 2 * h * kv * d + 2 * heads * d * h + 3 * 2 * h * f + 4 * s * heads * d
    assert training_flops_per_token(cfg) == 3 * (2 * per_layer + 2 * h * vocab)
    # GELU and multi-head attention: Megatron's 72 l h^2 (1 + s / (6 h) + V / (12 l h)) with ffn = 4h
    gpt = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, seq_length=32, vocab_size=300)
    assert training_flops_per_token(gpt) == pytest.approx(72 * 2 * 64**2 * (1 + 32 / (6 * 64) + 300 / (12 * 2 * 64)))
    # tp splits every matrix but a replicated kv head: at tp 4 (> 2 kv heads) each rank computes one kv head
    gemm, core = layer_matmul_flops(cfg, 4)
    assert gemm == 2 * h * heads * d / 4 + 2 * 2 * h * 1 * d + 2 * heads * d * h / 4 + 3 * 2 * h * f / 4
    assert core == 4 * s * heads * d / 4


def test_megalm_metrics_and_bench_use_the_spec_flops() -> None:
    from megalm.metrics import training_flops_per_token as logged

    cfg = SHAPES["llama-3-8b"]
    assert logged(cfg) == training_flops_per_token(cfg)
    # Llama 3 8B at 8,192 tokens: 6 N-ish plus attention; about 59 GFLOP per token per training step
    assert 6 * 7.5e9 < training_flops_per_token(cfg) < 6 * 8.0e9 + 12 * 32 * 8192 * 4096


def test_swiglu_and_gqa_change_step_time_as_their_flops() -> None:
    """The time model's GEMMs follow the spec: a wider SwiGLU MLP costs more compute than GELU's at the same ffn."""
    gelu = _llama(num_layers=4, hidden_size=1024, num_heads=8, num_kv_heads=None, ffn_hidden_size=4096,
                  seq_length=1024, vocab_size=1024, mlp="gelu")
    swiglu = dataclasses.replace(gelu, mlp="swiglu")
    gqa = dataclasses.replace(gelu, num_kv_heads=2)
    layout = Layout(1, 1, 1, 1, 1)
    compute = lambda model: make_plan(model, layout, H100, MEGALM, "bf16").time.compute  # noqa: E731
    assert compute(swiglu) > compute(gelu) > compute(gqa)


def test_replicated_kv_heads_sum_their_gradients() -> None:
    """tp 8 over 2 kv heads: each kv head on 4 ranks, whose key_value gradients are summed once per step."""
    cfg = _llama(num_layers=4, hidden_size=1024, num_heads=8, num_kv_heads=2, ffn_hidden_size=2816,
                 seq_length=256, vocab_size=1024)
    split = dataclasses.replace(cfg, num_kv_heads=8)
    layout = Layout(8, 1, 1, 1, 1)
    comm = lambda model: make_plan(model, layout, H100, MEGALM, "bf16").time.data_comm  # noqa: E731
    assert comm(split) == 0.0 and comm(cfg) > 0.0


def test_proposed_shapes_keep_the_spec() -> None:
    """--propose-params on a Llama config proposes Llama shapes: SwiGLU at its ffn ratio, 8 kv heads, untied."""
    from megalm.plan.search import propose_shapes

    base = load_config(CONFIGS / "llama-3-8b.yaml").model
    shapes = propose_shapes(8e9, H100, 64, 512, MEGALM, "bf16", base, top=2)
    assert shapes
    for model, plan in shapes:
        assert (model.mlp, model.norm, model.num_kv_heads, model.tie_embeddings) == ("swiglu", "rmsnorm", 8, False)
        assert abs(full_param_count(model) / 8e9 - 1) <= 0.1 and plan.fits
        assert model.ffn_size() % 256 == 0 and 3.4 < model.ffn_size() / model.hidden_size < 3.6


# ---- against megalm's own model --------------------------------------------------------------------


def _spec_config(tp: int, pp: int, dp: int = 1, **fields):
    from megalm.config import Config, ParallelConfig, TrainConfig

    model = _llama(num_layers=4, **fields)
    return Config(model=model, parallel=ParallelConfig(tp=tp, pp=pp, dp=dp, bucket_size_mb=0.01),
                  train=TrainConfig(micro_batch_size=1, global_batch_size=4 * dp))


SPEC_LAYOUTS = [
    (1, 1, {}), (2, 1, {}), (4, 1, {}), (8, 1, {}), (2, 2, {}), (4, 2, dict(tie_embeddings=True)),
    (2, 1, dict(num_kv_heads=1)), (2, 2, dict(num_kv_heads=None)), (2, 1, dict(qkv_bias=True)),
    (2, 2, dict(bias=True, head_dim=12)), (2, 1, dict(norm="layernorm", mlp="gelu")),
]


@pytest.mark.parametrize("tp,pp,fields", SPEC_LAYOUTS, ids=[f"tp{t}-pp{p}-{f}" for t, p, f in SPEC_LAYOUTS])
def test_rank_parameters_and_buckets_equal_megalm(tp: int, pp: int, fields: dict) -> None:
    """Per-rank parameter counts equal megalm's meta-built shards, and the gradient buckets megalm's own
    GradientSync forms, for Llama-style specs at every tp (kv heads split, or replicated at tp > 2)."""
    from megalm.distributed import ParallelGroups
    from megalm.model.gpt import build_model_chunks, count_parameters
    from megalm.parallel.data import GradientSync
    from megalm.topology import Topology

    config = _spec_config(tp, pp, **fields)
    topology = Topology(tp, pp, 1)
    layout = Layout(tp, pp, 1, 1, 4, bucket_size_mb=0.01)
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            groups = ParallelGroups(topology=topology, rank=topology.rank(pp_rank, 0, tp_rank),
                                    device=torch.device("cpu"))
            chunks = build_model_chunks(config, groups, materialize=False)
            assert rank_param_count(config.model, layout, pp_rank) == sum(count_parameters(c) for c in chunks)
        chunks = build_model_chunks(config, groups)  # materialised (small): GradientSync needs real tensors
        sync = GradientSync(chunks, groups, int(0.01 * 2**20), shard=False)
        assert [bucket.numel for bucket in sync.buckets] == bucket_sizes(config.model, layout, pp_rank)


@pytest.mark.parametrize("name,tp", [("llama-3-8b.yaml", 1), ("llama-3-8b.yaml", 2), ("llama-tiny.yaml", 1),
                                     ("llama-3-70b.yaml", 1)])
def test_megalm_check_prints_transformers_count(name: str, tp: int, capsys) -> None:
    """`megalm check` counts the parameters of a meta-built model: the same number as transformers'
    (Llama 3's vocabulary is a multiple of 128 x 2, so nothing is padded at tp 1 or 2)."""
    from megalm.cli import main

    config = load_config(CONFIGS / name)
    overrides = [f"parallel.tp={tp}", "parallel.pp=1", "parallel.dp=1", "parallel.virtual_stages=1",
                 "parallel.schedule=1f1b", "train.global_batch_size=4"]
    assert main(["check", str(CONFIGS / name), *overrides]) == 0
    out = capsys.readouterr().out
    assert f"parameters: {_hf_count(config.model):,} " in out


SPEC_CHANGES = {  # each model spec field, and a value that changes the architecture
    "norm": "layernorm", "mlp": "gelu", "num_kv_heads": 4, "head_dim": 12, "bias": True, "qkv_bias": True,
    "tie_embeddings": True, "ffn_hidden_size": 256,
}


@pytest.mark.parametrize("field", sorted(SPEC_CHANGES))
def test_every_spec_field_reaches_the_planner(field: str) -> None:
    """Changing any architecture field of the spec changes what the planner predicts (parameters, FLOPs or
    activation bytes); the rope fields change only the rotary frequencies, nothing the planner counts."""
    from megalm.plan.model import layer_activation_bytes

    base = _llama()
    changed = dataclasses.replace(base, **{field: SPEC_CHANGES[field]})
    layout = Layout(2, 1, 1, 1, 1)

    def predicted(model: ModelConfig) -> tuple:
        return (full_param_count(model), training_flops_per_token(model), layer_activation_bytes(model, layout, 2))

    assert predicted(changed) != predicted(base)
    rope = dataclasses.replace(base, rope_scaling="llama3", rope_factor=8.0, rope_original_max_positions=16)
    assert predicted(rope) == predicted(base)


@pytest.mark.parametrize("name", ["llama-3-8b.yaml", "llama-3-70b.yaml"])
def test_megalm_check_at_the_shipped_layout_counts_the_padded_vocabulary(name: str, capsys) -> None:
    """At the config's own tp (8 for 70B) megalm pads the vocabulary: check prints the padded count, which
    `megalm plan`'s model line gives beside transformers' count."""
    from megalm.cli import main
    from megalm.plan.report import model_line

    config = load_config(CONFIGS / name)
    tp = config.parallel.tp
    assert main(["check", str(CONFIGS / name)]) == 0
    padded = full_param_count(config.model, padded_tp=tp)
    assert f"parameters: {padded:,} " in capsys.readouterr().out
    line = model_line(config.model, tp)
    assert f"{full_param_count(config.model):,} parameters" in line
    assert (f"{padded:,} with the vocabulary padded" in line) == (padded != full_param_count(config.model))
