"""megalm plan with context parallelism: activations per rank divided by cp plus the key/value and mask buffers of
megalm's all-gather attention, the exchange in the time model, ZeRO-1 over dp x cp, the search for long sequences,
and plans at cp = 1 unchanged."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from megalm.cli import main
from megalm.config import ModelConfig, load_config, validate
from megalm.plan import Layout, PlanError, get_numerics, layout_from_config, load_cluster, make_plan, search
from megalm.plan.layout import layout_overrides
from megalm.plan.collectives import context_exchange_time, ring_half_time
from megalm.plan.model import context_mask_bytes, layer_activation_bytes, prefix_mask_bytes
from megalm.plan.search import context_parallel_sizes

H100 = load_cluster("h100-80gb")
MEGALM = get_numerics("megalm")
DOCS = Path(__file__).resolve().parent.parent / "docs" / "plan.md"

# multi-head, learned positions, bf16: S = 1024 tokens, h = 512, 8 heads of 64
MODEL = ModelConfig(num_layers=4, hidden_size=512, num_heads=8, vocab_size=1024, seq_length=1024)


def _cp_terms(model: ModelConfig, layout: Layout, act: int, kernels: str) -> int:
    """By hand: what megalm's cp attention keeps per layer beyond the per-token terms (tp 1, b = 1, causal): the
    gathered keys and values [2, b, heads, S, d]; the layers share one additive mask, copied per layer only
    where CUDA pads its rows to 16 keys."""
    s, d, heads = model.seq_length, model.head_size(), model.num_heads
    padded = 0 if kernels == "cpu" or s % 16 == 0 else act * (s // layout.cp) * -(-s // 16) * 16
    return act * 2 * heads * s * d + padded


@pytest.mark.parametrize("kernels", ["cpu", "cuda"])
def test_cp2_halves_the_per_token_activations_and_adds_the_key_value_and_mask_buffers(kernels):
    act = 2
    one = Layout(1, 1, 1, 1, 1)
    two = dataclasses.replace(one, cp=2)
    stored1, _ = layer_activation_bytes(MODEL, one, act, kernels=kernels)
    stored2, _ = layer_activation_bytes(MODEL, two, act, kernels=kernels)
    # every per-token term of cp 1 (q, k, v: views of the QKV output, which q keeps alive) halves at cp 2; the
    # logsumexp is per local query; on CPU the two LayerNorms' fp32 weight and bias copies do not depend on tokens
    s, h = MODEL.seq_length, MODEL.hidden_size
    lse = 4 * MODEL.num_heads * (s if kernels == "cpu" else -(-s // 32) * 32)
    lse2 = 4 * MODEL.num_heads * (s // 2 if kernels == "cpu" else -(-(s // 2) // 32) * 32)
    weights = 2 * 2 * 4 * h if kernels == "cpu" else 0
    assert stored2 == (stored1 - lse - weights) // 2 + lse2 + weights + _cp_terms(MODEL, two, act, kernels)
    gathered = act * 2 * s * h  # [2, 1, heads, S, d]: cp times a rank's own keys and values
    assert gathered == 2 * act * 2 * (s // 2) * h
    # full recompute keeps the [S/cp, b, h] layer input: exactly half
    full1, _ = layer_activation_bytes(MODEL, dataclasses.replace(one, recompute="full"), act, kernels=kernels)
    full2, _ = layer_activation_bytes(MODEL, dataclasses.replace(two, recompute="full"), act, kernels=kernels)
    assert 2 * full2 == full1 == act * s * h


def test_cp_mask_dense_over_global_positions_except_causal_on_cuda():
    """cp > 1 builds a [b or 1, 1, S/cp, S] additive mask once per micro-batch, in the activation dtype, for
    PrefixLM and per-document masks (one row block per sample), and for causal attention off CUDA; on CUDA causal
    attention runs each chunk under a lower-right causal bias with no mask. Its layers share it: a stage keeps
    one per micro-batch in flight, whatever the layer count."""
    layout = Layout(1, 1, 1, 2, 2, recompute="selective", cp=4)
    s = MODEL.seq_length
    assert context_mask_bytes(MODEL, layout, 2, "cpu") == 2 * 1 * (s // 4) * s
    assert context_mask_bytes(MODEL, layout, 2, "cuda") == 0
    prefixlm = dataclasses.replace(MODEL, family="prefixlm")
    assert context_mask_bytes(prefixlm, layout, 2, "cuda") == 2 * 2 * (s // 4) * s
    documents = dataclasses.replace(MODEL, document_mask=True)
    assert context_mask_bytes(documents, layout, 2, "cuda") == 2 * 2 * (s // 4) * s  # per sample
    assert context_mask_bytes(MODEL, dataclasses.replace(layout, cp=1), 2, "cpu") == 0  # cp 1: SDPA is_causal
    assert prefix_mask_bytes(MODEL, layout) == 0  # the bool mask only leads to the additive one
    deep = dataclasses.replace(MODEL, num_layers=8)
    for layers in (MODEL, deep):
        for model, mask in ((layers, 0), (dataclasses.replace(layers, family="prefixlm"), 2 * (s // 2) * s)):
            plan = make_plan(model, Layout(1, 1, 1, 1, 1, cp=2), H100, MEGALM, "bf16")  # CUDA kernels
            per_layer, _ = layer_activation_bytes(model, Layout(1, 1, 1, 1, 1, cp=2), 2)
            positions = 8 * s // 2  # learned: the int64 global positions of the rank's tokens
            assert plan.memory[0].activations == model.num_layers * per_layer + mask + positions


def test_stage_memory_at_cp2_model_states_sharded_over_dp_x_cp():
    """Weights, gradients and ZeRO-1 optimizer state at cp 2 x dp 2 equal those at dp 4 (the dp x cp group
    shards them); activations per rank are about half (plus the cp buffers)."""
    model = dataclasses.replace(MODEL, seq_length=4096, hidden_size=2048, num_heads=16)
    dp4 = Layout(1, 1, 4, 1, 8, zero_stage=1)
    cp2 = Layout(1, 1, 2, 1, 8, zero_stage=1, cp=2)
    a, b = (make_plan(model, layout, H100, MEGALM, "bf16").memory[0] for layout in (dp4, cp2))
    assert (a.weights, a.grads, a.optimizer, a.buffers) == (b.weights, b.grads, b.optimizer, b.buffers)
    assert 0.5 < b.activations / a.activations < 0.75
    assert b.embedding_logits * 2 == a.embedding_logits


@pytest.mark.parametrize("tp,cp,intra", [(2, 2, True), (8, 2, False), (1, 8, True), (4, 4, False)])
def test_exchange_time_is_an_all_gather_of_keys_and_values_over_the_cp_link(tp, cp, intra):
    """(cp - 1)/cp of S b 2 K/tp d bytes per layer and micro-batch over NVLink when tp x cp fits in a node, else the
    network; forward gathers, backward reduce-scatters, full recompute gathers again: none of it overlapped."""
    model = dataclasses.replace(MODEL, num_kv_heads=8, seq_length=8192)
    layout = Layout(tp, 1, 1, 2, 4, cp=cp)
    nbytes = (cp - 1) / cp * 8192 * 2 * 2 * (8 // tp) * 64 * 2  # S b 2 K/tp d, bf16
    bandwidth = (H100.intra_node_bandwidth_gbs if intra else H100.inter_node_bandwidth_gbs) * 1e9 * H100.bandwidth_efficiency
    latency = (H100.intra_node_latency_us if intra else H100.inter_node_latency_us) * 1e-6
    exchange = context_exchange_time(model, layout, H100, "bf16")
    assert exchange == pytest.approx(nbytes / bandwidth + (cp - 1) * latency, rel=1e-12)
    assert exchange == ring_half_time(8192 * 2 * 2 * (8 // tp) * 64 * 2, cp, bandwidth, latency)
    time = make_plan(model, layout, H100, MEGALM, "bf16").time
    assert time.context_comm == pytest.approx(2 * 4 * 2 * exchange, rel=1e-12)  # 2 micro-batches x 4 layers x 2
    assert time.total == pytest.approx(time.compute + time.launch + time.tensor_comm + time.context_comm + time.data_comm
                                       + time.optimizer, rel=1e-12)
    full = make_plan(model, dataclasses.replace(layout, recompute="full"), H100, MEGALM, "bf16").time
    assert full.context_comm == pytest.approx(2 * 4 * 3 * exchange, rel=1e-12)
    assert "context_comm" in time.shares()


def test_cp_divides_the_compute_per_rank():
    """A rank computes S/cp tokens (their queries against every key): 1/cp of the per-micro-batch work."""
    model = dataclasses.replace(MODEL, seq_length=8192)
    one = make_plan(model, Layout(2, 1, 1, 1, 4), H100, MEGALM, "bf16").time
    two = make_plan(model, Layout(2, 1, 1, 1, 4, cp=2), H100, MEGALM, "bf16").time
    assert two.compute == pytest.approx(one.compute / 2, rel=1e-9)
    assert two.tokens_per_s > 0 and one.context_comm == 0 and two.context_comm > 0


def test_search_considers_cp_only_for_long_sequences():
    assert context_parallel_sizes(MODEL, 64) == [1]
    long = dataclasses.replace(MODEL, seq_length=32768)
    assert context_parallel_sizes(long, 64) == [1, 2, 4, 8, 16]
    assert context_parallel_sizes(long, 24) == [1, 2, 4, 8]


def test_search_picks_cp_for_32k_when_cp1_does_not_fit():
    """Llama 3 70B at 32,768 tokens on 512 H100s without full recompute: no cp = 1 layout fits, the search
    finds cp > 1 layouts that do."""
    model = dataclasses.replace(load_config("configs/llama-3-70b.yaml").model, seq_length=32768)
    options = dict(top=3, find_smallest=False, micro_batches=(1,), recompute=("none", "selective"))
    with pytest.raises(PlanError, match="does not fit"):
        search(model, H100, 512, 64, MEGALM, "bf16", cp_sizes=(1,), **options)
    best = search(model, H100, 512, 64, MEGALM, "bf16", **options)
    assert all(plan.fits and plan.layout.cp > 1 and plan.layout.gpus == 512 for plan in best)
    assert re.match(r"tp\d cp\d pp\d dp\d", best[0].layout.short())


def test_shipped_32k_config_runs_the_plans_best_layout(capsys):
    """configs/yuan-lm-13b-32k.yaml: megalm validates it on 1792 GPUs, it fits on h100-80gb, and its layout is
    what --search finds fastest there (the overrides it prints are the config's own)."""
    config = load_config("configs/yuan-lm-13b-32k.yaml")
    assert validate(config).world_size == 1792 and config.parallel.cp > 1
    layout = layout_from_config(config)
    assert make_plan(config.model, layout, H100, MEGALM, "bf16").fits
    assert main(["plan", "configs/yuan-lm-13b-32k.yaml", "--cluster", "h100-80gb", "--search", "--top", "2",
                 "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["best"][0]["layout"] == dataclasses.asdict(layout)
    assert found["overrides"] == layout_overrides(layout, config) and "parallel.cp=4" in found["overrides"]


def test_layout_round_trips_cp_through_the_config():
    config = load_config("configs/yuan-lm-13b-32k.yaml")
    layout = layout_from_config(config)
    assert (layout.cp, layout.gpus) == (4, 1792)
    with pytest.raises(PlanError, match="not divisible by tp x cp x pp = 8 x 4 x 1"):
        layout_from_config(config, 1000)
    with pytest.raises(PlanError, match="divisible by 2 x cp = 8"):
        Layout(8, 1, 1, 1, 1, cp=4).check(dataclasses.replace(config.model, seq_length=32764))


def _doc_block(command: str) -> str:
    """The output block docs/plan.md shows after `command`."""
    text = DOCS.read_text()
    start = text.index(f"`{command}`")
    block = text[text.index("```\n", start) + 4:]
    return block[:block.index("```")]


@pytest.mark.parametrize("command", [
    "megalm plan configs/llama-3-8b.yaml --cluster h100-80gb",
    "megalm plan configs/llama-3-70b.yaml --cluster h100-80gb",
    "megalm plan configs/yuan-lm-13b-32k.yaml --cluster h100-80gb",
])
def test_documented_plans_are_current(command, capsys):
    """The plans docs/plan.md shows are what `megalm plan` prints: the cp = 1 ones are unchanged by cp."""
    assert main(command.split()[1:]) == 0
    assert capsys.readouterr().out == _doc_block(command)
