"""megalm plan: formulas on small cases, exact agreement with megalm's own byte counts, published runs, search, errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from megalm.cli import main
from megalm.config import Config, ModelConfig, ParallelConfig, TrainConfig, load_config, validate
from megalm.distributed import ParallelGroups
from megalm.model.gpt import build_model_chunks, count_parameters
from megalm.parallel.data import GradientSync
from megalm.parallel.optimizer import MixedPrecisionOptimizer
from megalm.parallel.schedules import build_schedule, simulate
from megalm.plan import (
    Layout, PlanError, cluster_from_dict, get_numerics, load_cluster, make_plan, search, stage_memory,
)
from megalm.plan.layout import bucket_sizes, layout_from_config, rank_param_count, zero1_shard_params
from megalm.plan.collectives import all_reduce_time
from megalm.plan.model import in_flight, layer_activation_bytes
from megalm.plan.search import propose_shapes
from megalm.plan.validation import YUAN_245B, validation_rows, yuan_layout
from megalm.topology import Topology

A100 = load_cluster("a100-80gb")
MEGATRON = get_numerics("megatron")
MEGALM = get_numerics("megalm")


# ---- clusters -----------------------------------------------------------------------------------


def test_shipped_clusters_load():
    h100 = load_cluster("h100-80gb")
    assert A100.gpus_per_node == h100.gpus_per_node == 8
    assert (A100.peak_tflops, h100.peak_tflops) == (312.0, 989.0)
    assert A100.inter_node_bandwidth_gbs * 8 == 200  # 8 x 200 Gb/s per node = 25 GB/s per GPU


def test_cluster_missing_field_is_named():
    data = dataclasses.asdict(A100)
    del data["hbm_gib"], data["inter_node_latency_us"]
    with pytest.raises(PlanError, match="missing field.*hbm_gib, inter_node_latency_us"):
        cluster_from_dict(data, "broken.yaml")


def test_cluster_file_missing_field_via_cli(tmp_path, capsys):
    path = tmp_path / "half.yaml"
    path.write_text("name: half\ngpu: X\ngpus_per_node: 8\n")
    assert main(["plan", "configs/tiny.yaml", "--cluster", str(path)]) == 2
    assert "missing field" in capsys.readouterr().err


# ---- formulas on hand-computed cases ------------------------------------------------------------


def test_ring_all_reduce_by_hand():
    # 4 ranks, 1 MB at 1 GB/s, 1 us latency: 2*3/4 * 1e-3 s + 6 us
    assert all_reduce_time(1e6, 4, 1e9, 1e-6) == pytest.approx(1.5e-3 + 6e-6)
    assert all_reduce_time(1e6, 1, 1e9, 1e-6) == 0.0


def test_activation_bytes_by_hand():
    model = ModelConfig(num_layers=2, hidden_size=8, num_heads=2, seq_length=4)
    layout = Layout(1, 1, 1, 1, 1)
    # megalm on CUDA: LN1 in, LN2 in 2 x 2 x 32 = 128 + their fp32 mean and 1/std 4 x 4 x 4 = 64; QKV in, fc1 in
    # 2 x 2 x 32 = 128; proj in 2 x 32 + GeLU in + fc2 in 2 x 2 x 128 = 576; q, k, v (views of the QKV
    # output) 3 x 2 x 32 = 192 + the flash kernel's fp32 logsumexp 2 heads x 4 x 4 = 32 (its output, b = 1,
    # is the projection's input)
    assert layer_activation_bytes(model, layout, 2, flash=True) == (1120, 0)
    # on CPU the bf16 LayerNorm weights and biases are handed over as fp32 copies: 4 x 8 x 4 = 128 more
    assert layer_activation_bytes(model, layout, 2, flash=True, kernels="cpu") == (1248, 0)
    # selective keeps q, k, v and drops the logsumexp; full keeps the layer input and reruns the rest
    assert layer_activation_bytes(model, dataclasses.replace(layout, recompute="selective"), 2) == (1088, 32)
    assert layer_activation_bytes(model, dataclasses.replace(layout, recompute="full"), 2) == (64, 1120)
    # tp 2 with sequence parallel: every [s, b, h] term, the QKV and fc1 inputs included (the column-parallel
    # linears keep their input shard and all-gather it again in backward), is halved: LN1, LN2 in 64 + 32,
    # QKV, fc1 in 64; proj, GeLU, fc2 in 288; q, k, v 96 + logsumexp (1 head) 16
    assert layer_activation_bytes(model, Layout(2, 1, 1, 1, 1, sequence_parallel=True), 2) == (560, 0)
    # Megatron-LM's kernels (Korthikanti et al. 2022): LN1 in, QKV in, LN2 in, fc1 in: 4 x 2 x 32 = 256;
    # Q, K, V, proj in 4 x 2 x 32 = 256; GeLU in + fc2 in 2 x 2 x 128 = 512
    # materialised scores: 2 heads x 4 x 4 elements x 2 bytes = 64
    assert layer_activation_bytes(model, layout, 2, flash=False) == (1088, 0)
    full = dataclasses.replace(layout, recompute="full")
    assert layer_activation_bytes(model, full, 2, flash=False) == (2 * 4 * 8, 1088)  # only the layer input kept
    assert layer_activation_bytes(model, dataclasses.replace(layout, recompute="selective"), 2, flash=False) == (1024, 64)


@pytest.mark.parametrize("schedule,pp,m,v", [("1f1b", 4, 8, 1), ("1f1b", 4, 2, 1), ("gpipe", 3, 5, 1),
                                             ("interleaved", 4, 8, 2), ("interleaved", 2, 4, 3), ("interleaved", 4, 4, 2)])
def test_in_flight_matches_schedule_simulation(schedule, pp, m, v):
    layout = Layout(1, pp, 1, 1, m, schedule, v)
    simulated = simulate(build_schedule(schedule, pp, m, v), v).max_in_flight
    assert [in_flight(layout, r) for r in range(pp)] == simulated


def test_bubble_share_is_the_schedules_formula():
    model = ModelConfig(num_layers=8, hidden_size=256, num_heads=4, seq_length=128, vocab_size=512)
    layout = Layout(1, 4, 1, 1, 8, "interleaved", 2)
    t = make_plan(model, layout, A100, MEGALM, "bf16").time
    assert t.bubble / (t.compute + t.tensor_comm + t.launch) == pytest.approx(3 / (8 * 2))


# ---- exact agreement with megalm ----------------------------------------------------------------


def _config(tp, pp, dp, **parallel):
    return Config(model=ModelConfig(num_layers=4, hidden_size=32, num_heads=4, vocab_size=300, seq_length=16),
                  parallel=ParallelConfig(tp=tp, pp=pp, dp=dp, **parallel),
                  train=TrainConfig(micro_batch_size=1, global_batch_size=4 * dp))


def _groups(topology, pp_rank, dp_rank=0):
    return ParallelGroups(topology=topology, rank=topology.rank(pp_rank, dp_rank, 0), device=torch.device("cpu"))


def _layout(config):
    p = config.parallel
    return Layout(p.tp, p.pp, p.dp, 1, config.train.global_batch_size, p.schedule, p.virtual_stages, "none",
                  p.zero_stage, p.sequence_parallel, tuple(p.pipeline_layers) if p.pipeline_layers else None,
                  p.bucket_size_mb)


@pytest.mark.parametrize("parallel", [
    dict(tp=1, pp=1, dp=1), dict(tp=2, pp=2, dp=1), dict(tp=4, pp=1, dp=2, sequence_parallel=True),
    dict(tp=2, pp=2, dp=1, schedule="interleaved", virtual_stages=2),
    dict(tp=1, pp=2, dp=1, pipeline_layers=[1, 3]),
])
def test_parameter_counts_equal_meta_built_shards(parallel):
    config = _config(**parallel)
    topology = Topology(config.parallel.tp, config.parallel.pp, config.parallel.dp)
    for pp_rank in range(topology.pp):
        chunks = build_model_chunks(config, _groups(topology, pp_rank), materialize=False)
        assert rank_param_count(config.model, _layout(config), pp_rank) == sum(count_parameters(c) for c in chunks)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("tp,pp,dp,zero", [(1, 1, 1, 0), (2, 2, 1, 0), (1, 2, 2, 1), (2, 1, 3, 1)])
def test_gradient_and_optimizer_bytes_equal_megalm(tp, pp, dp, zero, precision):
    """Buckets from a real GradientSync and state from a real MixedPrecisionOptimizer, per dp rank."""
    config = _config(tp, pp, dp, zero_stage=zero, bucket_size_mb=0.004)  # small buckets: several per stage
    config.train.precision = precision
    param_bytes = 4 if precision == "fp32" else 2
    topology = Topology(tp, pp, dp)
    layout = _layout(config)
    for pp_rank in range(pp):
        planned = stage_memory(config.model, layout, A100, MEGALM, precision, pp_rank)
        for dp_rank in range(dp):
            groups = _groups(topology, pp_rank, dp_rank)
            chunks = build_model_chunks(config, groups)  # materialised: small
            sync = GradientSync(chunks, groups, int(config.parallel.bucket_size_mb * 2**20), shard=zero == 1)
            buckets = bucket_sizes(config.model, layout, pp_rank)
            assert [b.numel for b in sync.buckets] == [-(-n // dp) * dp if zero else n for n in buckets]
            params = sum(count_parameters(c) for c in chunks)
            assert planned.weights == sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
            assert planned.weights == param_bytes * params
            optimizer = MixedPrecisionOptimizer(sync, 1e-3, (0.9, 0.95), 1e-8, 0.0)
            for master in optimizer.masters:
                master.grad = torch.zeros_like(master) if master.grad is None else master.grad
            optimizer.optimizer.step()  # the local AdamW step (no collective): creates the moments
            grads = sum(b.grad.numel() * b.grad.element_size() for b in sync.buckets)
            if zero:
                shard = zero1_shard_params(buckets, dp, dp_rank)
                assert optimizer.state_bytes() == 8 * shard
                assert sum(m.numel() for m in optimizer.masters) == shard
                assert optimizer.master_bytes() == (0 if precision == "fp32" else 4 * shard)  # fp32: in the bucket
                grads += sum(b.shard_main.numel() * b.shard_main.element_size() for b in sync.buckets)
                # the parameters live in padded bucket buffers: the padding is the only extra (no gather buffer)
                padding = sum(b.param_data.numel() * b.param_data.element_size() for b in sync.buckets) - planned.weights
                if dp_rank == 0:
                    assert planned.optimizer == optimizer.state_bytes() + optimizer.master_bytes()
                    # send + receive of [s, b, h], and 1F1B's next receive posted early (test_pipeline_memory)
                    p2p = 3 * param_bytes * 16 * 1 * 32 if pp > 1 else 0
                    assert planned.buffers == padding + p2p
            else:
                assert optimizer.state_bytes() == 8 * params
                assert optimizer.master_bytes() == (0 if precision == "fp32" else 4 * params)
                assert planned.optimizer == optimizer.state_bytes() + optimizer.master_bytes()
            assert planned.grads == grads


# ---- published runs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rows():
    return validation_rows()


@pytest.mark.parametrize("index", range(5))
def test_published_runs_within_10_percent(rows, index):
    row = rows[index]
    assert abs(row.error) < 0.10, f"{row.name}: predicted {row.predicted:.2f}, published {row.published:.2f}"


def test_yuan_compute_and_bubble_close_to_their_breakdown(rows):
    yuan = rows[0].time
    assert yuan.compute == pytest.approx(36.67, rel=0.10)
    assert yuan.bubble == pytest.approx(2.83, rel=0.10)


# ---- search --------------------------------------------------------------------------------------


def test_search_yuan_245b_beats_published_layout():
    published = make_plan(YUAN_245B, yuan_layout(), A100, MEGATRON, "fp16")
    best = search(YUAN_245B, A100, 2128, 3360, MEGATRON, "fp16", top=3)
    assert best[0].fits and best[0].time.total <= published.time.total
    # with the 2021 software's options only (full recompute, no sequence parallel) still at least as fast
    same = search(YUAN_245B, A100, 2128, 3360, MEGATRON, "fp16", top=1, recompute=("full",))
    assert same[0].time.total <= published.time.total * 1.0001


@pytest.mark.parametrize("name", ["yuan-lm-13b", "yuan-plm-13b"])
def test_search_13b_on_1792_gpus(name, capsys):
    assert main(["plan", f"configs/{name}.yaml", "--gpus", "1792", "--search", "--top", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["best"][0]["time"]["step_s"] <= out["configured"]["time"]["step_s"]
    assert all(p["fits"] and p["gpus"] == 1792 for p in out["best"])


def test_propose_shapes_near_target():
    base = ModelConfig(num_layers=2, hidden_size=1024, num_heads=8, vocab_size=53005, seq_length=2048)
    shapes = propose_shapes(13e9, A100, 256, 512, MEGALM, "bf16", base, top=3)
    assert shapes and all(abs(count / 13e9 - 1) < 0.1 for count in (
        12 * m.num_layers * m.hidden_size**2 + 53005 * m.hidden_size for m, _ in shapes))
    assert all(m.hidden_size % m.num_heads == 0 and p.fits for m, p in shapes)


# ---- CLI and bad input ---------------------------------------------------------------------------


def test_cli_plan_table(capsys):
    assert main(["plan", "configs/yuan-245b.yaml", "--cluster", "a100-80gb", "--tokens", "1e11"]) == 0
    out = capsys.readouterr().out
    assert "memory per GPU" in out and "tensor_comm" in out and "MFU" in out and "days to train" in out


def test_gpu_count_no_layout_divides(capsys):
    assert main(["plan", "configs/yuan-245b.yaml", "--gpus", "2129", "--search"]) == 2
    assert "no layout divides 2129 GPUs" in capsys.readouterr().err


def test_gpu_count_not_divisible_by_configured_layout(capsys):
    assert main(["plan", "configs/yuan-245b.yaml", "--gpus", "100"]) == 2
    assert "not divisible by tp x pp" in capsys.readouterr().err


def test_model_that_never_fits_names_smallest_gpu_count():
    with pytest.raises(PlanError, match=r"does not fit .* smallest GPU count at which it fits is \d+") as info:
        search(YUAN_245B, A100, 8, 3360, MEGATRON, "fp16")
    smallest = int(str(info.value).rsplit(" ", 1)[-1])
    assert search(YUAN_245B, A100, smallest, 3360, MEGATRON, "fp16", top=1, micro_batches=(1,))[0].fits


def test_plan_follows_the_configs_recompute(capsys):
    """`megalm plan` plans the recompute the config runs (parallel.recompute, recompute_layers); --recompute overrides."""
    def plan(*overrides, flags=()):
        assert main(["plan", "configs/gpt-125m.yaml", *overrides, "--gpus", "8", "--json", *flags]) == 0
        out = json.loads(capsys.readouterr().out)
        return out["layout"], out["memory"][0]["activations"], out["time"]["hardware_tflops"] / out["time"]["model_tflops"]

    layout, none, _ = plan()
    assert (layout["recompute"], layout["recompute_layers"]) == ("none", None)
    layout, full, full_ratio = plan("parallel.recompute=full")
    assert (layout["recompute"], layout["recompute_layers"]) == ("full", None)
    layout, half, half_ratio = plan("parallel.recompute=full", "parallel.recompute_layers=6")
    assert (layout["recompute"], layout["recompute_layers"]) == ("full", 6)
    assert full < half < none
    assert 1 < half_ratio < full_ratio  # half the layers' forward recomputed
    # 6 layers store only their input, 6 store everything (pp=1: one micro-batch in flight; bf16)
    half_layout = Layout(**layout)
    model = load_config("configs/gpt-125m.yaml", []).model
    stored_full, working = layer_activation_bytes(model, half_layout, 2, MEGALM.flash_attention)
    plain = dataclasses.replace(half_layout, recompute="none", recompute_layers=None)
    stored_none, _ = layer_activation_bytes(model, plain, 2, MEGALM.flash_attention)
    assert half == 6 * stored_full + 6 * stored_none + working
    layout, _, _ = plan("parallel.recompute=full", "parallel.recompute_layers=6", flags=("--recompute", "selective"))
    assert (layout["recompute"], layout["recompute_layers"]) == ("selective", None)



# ---- the search follows megalm: runnable layouts only, and the best one ready to paste ----------


def _search_json(capsys, config, *overrides, gpus=8):
    assert main(["plan", config, *overrides, "--gpus", str(gpus), "--search", "--top", "3", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("config,overrides,gpus", [
    ("configs/gpt-125m.yaml", (), 8),
    ("configs/yuan-lm-13b.yaml", ("train.grad_accum_steps=8", "parallel.pipeline_layers=[16,24]",
                                  "parallel.recompute=full", "parallel.recompute_layers=3", "parallel.bucket_size_mb=40"), 64),
])
def test_search_ends_with_overrides_that_run_the_best_layout(capsys, tmp_path, config, overrides, gpus):
    """Pasted after the config (command line) or merged into it (YAML), the printed overrides give a config
    that megalm validates and whose plan is the reported best."""
    found = _search_json(capsys, config, *overrides, gpus=gpus)
    best, pasted = found["best"][0], found["overrides"]
    assert main(["plan", config, *overrides, "--gpus", str(gpus), "--search", "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert " ".join(pasted) in text and text.rstrip().endswith(found["yaml"].splitlines()[-1])
    for source in ("cli", "yaml"):
        if source == "cli":
            args = [config, *overrides, *pasted]
        else:
            path = tmp_path / "best.yaml"
            base = load_config(config, list(overrides))
            from megalm.config import config_to_yaml
            (tmp_path / "base.yaml").write_text(config_to_yaml(base))
            path.write_text("base: base.yaml\n" + found["yaml"] + "\n")
            args = [str(path)]
        resolved = load_config(args[0], args[1:])
        validate(resolved)  # parallel.dp is written out: no world size needed
        assert dataclasses.asdict(layout_from_config(resolved)) == best["layout"]
        assert main(["plan", *args, "--json"]) == 0
        plan = json.loads(capsys.readouterr().out)
        assert plan["layout"] == best["layout"]
        assert plan["time"]["step_s"] == best["time"]["step_s"]
        assert plan["peak_memory_gib"] == best["peak_memory_gib"]


def test_search_plans_only_layouts_megalm_validates(capsys, monkeypatch):
    """The search asks megalm's own config.validate about every layout: a validation that refuses
    pipelining (as one did for generation after training, issue 15) leaves only pp = 1 layouts."""
    import megalm.plan.layout as plan_layout
    from megalm.config import ConfigError, validate

    unrestricted = _search_json(capsys, "configs/yuan-lm-13b.yaml", gpus=16)
    assert any(p["layout"]["pp"] > 1 for p in unrestricted["best"])

    def no_pipeline(config, world_size=None):
        if config.parallel.pp > 1:
            raise ConfigError("pipelining refused (test)")
        return validate(config, world_size)

    monkeypatch.setattr(plan_layout, "validate", no_pipeline)
    restricted = _search_json(capsys, "configs/yuan-lm-13b.yaml", gpus=16)
    assert restricted["best"] and [p["layout"]["pp"] for p in restricted["best"]] == [1] * len(restricted["best"])
    monkeypatch.undo()
    # a config megalm rejects at every layout: the search says so, with megalm's own message
    assert main(["plan", "configs/gpt-125m.yaml", "optim.warmup_steps=600000", "--gpus", "8", "--search"]) == 2
    err = capsys.readouterr().err
    assert "megalm's config validation rejects every one of the" in err and "optim.warmup_steps=600000" in err


def test_sequence_parallel_regather_counts_only_what_the_input_gradient_gemm_does_not_hide():
    """Under sequence parallel backward all-gathers each column-parallel input (QKV, fc1, logits) again,
    beside its input-gradient GEMM: exposed only where the all-gather (half an all-reduce) is longer."""
    layout = Layout(2, 1, 1, 1, 4)
    sp = dataclasses.replace(layout, sequence_parallel=True)
    matmul_rate = A100.peak_tflops * 1e12 * A100.matmul_efficiency
    bandwidth, latency = A100.link(2)
    for model in (ModelConfig(num_layers=2, hidden_size=64, num_heads=2, seq_length=32, vocab_size=512),
                  load_config("configs/gpt-1.3b.yaml").model):
        s, h, f, v = model.seq_length, model.hidden_size, model.ffn_size(), model.padded_vocab_size(2)
        collective = all_reduce_time(2 * s * h, 2, bandwidth, latency)
        exposed = [max(0.0, collective / 2 - 2 * s * h * out / 2 / matmul_rate) for out in (3 * h, f, v)]
        plain, split = (make_plan(model, lay, A100, MEGALM, "bf16").time.tensor_comm for lay in (layout, sp))
        # 4 micro-batches; sequence parallel adds the logits' all-gather + reduce-scatter and the exposed re-gathers
        extra = 4 * (model.num_layers * (exposed[0] + exposed[1]) + collective + exposed[2])
        assert split - plain == pytest.approx(extra, rel=1e-9)
        assert (sum(exposed) > 0) == (h == 64)  # latency-bound at h 64; hidden at 1.3B


def test_selective_recompute_costs_the_attention_core():
    """Selective recompute reruns QK^T and PV (4 s^2 b h / t FLOPs per layer), whatever the attention kernel."""
    model = load_config("configs/gpt-125m.yaml").model
    none = make_plan(model, Layout(1, 1, 8, 8, 512), A100, MEGALM, "bf16")
    selective = make_plan(model, Layout(1, 1, 8, 8, 512, recompute="selective"), A100, MEGALM, "bf16")
    matmul_rate = A100.peak_tflops * 1e12 * A100.matmul_efficiency
    core = 4 * 1024 ** 2 * 8 * 768 / matmul_rate
    assert selective.time.compute - none.time.compute == pytest.approx(8 * 12 * core, rel=1e-6)
    assert selective.peak_memory < none.peak_memory  # fused attention: only its logsumexp is not kept


def test_plan_describes_cuda_kernels_unless_asked_for_cpu_ones(capsys):
    """A plan describes the GPU run (CUDA kernels); --kernels cpu plans a CPU run's activations, which under
    dropout keep the math path's [s, s] tensors and activation-dtype masks (tests/test_plan_measure.py)."""
    def activations(*flags):
        assert main(["plan", "configs/tiny.yaml", "model.hidden_dropout=0.1", "model.attention_dropout=0.1",
                     "--gpus", "1", "--json", *flags]) == 0
        out = json.loads(capsys.readouterr().out)
        return out["kernels"], out["memory"][0]["activations"]

    (cuda_name, cuda), (cpu_name, cpu) = activations(), activations("--kernels", "cpu")
    assert (cuda_name, cpu_name) == ("cuda", "cpu")
    config = load_config("configs/tiny.yaml", ["model.hidden_dropout=0.1", "model.attention_dropout=0.1"])
    layout = layout_from_config(config, 1)
    for kernels, got in (("cuda", cuda), ("cpu", cpu)):
        stored, _ = layer_activation_bytes(config.model, layout, 4, kernels=kernels)
        assert got == config.model.num_layers * stored
    assert cpu > cuda


def test_zero1_time_is_a_reduce_scatter_and_a_gather_in_the_parameters_dtype():
    """megalm's ZeRO-1 reduce-scatters the fp32 gradients (half a ring all-reduce) and all-gathers the updated
    parameters in their own dtype during the next forward, block by block: with a forward longer than the
    gather only the first bucket's gather shows. Without that overlap the whole gather (bf16 bytes) is added."""
    model = load_config("configs/gpt-125m.yaml").model
    layout = Layout(1, 1, 8, 8, 512, bucket_size_mb=25)  # 8 micro-batches per step
    zero = dataclasses.replace(layout, zero_stage=1)
    plain = make_plan(model, layout, A100, MEGALM, "bf16").time
    sharded = make_plan(model, zero, A100, MEGALM, "bf16").time
    bandwidth, latency = A100.link(8)
    params = rank_param_count(model, zero, 0)
    buckets = bucket_sizes(model, zero, 0)
    reduce_scatter = max(all_reduce_time(params * 4, 8, bandwidth, latency) / 2 - plain.compute / 8 * 2 / 3,
                         all_reduce_time(min(buckets) * 4, 8, bandwidth, latency) / 2)
    first_gather = all_reduce_time(buckets[-1] * 2, 8, bandwidth, latency) / 2
    assert all_reduce_time(params * 2, 8, bandwidth, latency) / 2 < plain.compute / 8 / 3  # the forward hides it
    assert sharded.data_comm == pytest.approx(reduce_scatter + first_gather, rel=1e-9)
    assert sharded.data_comm < plain.data_comm  # less on the wire than the all-reduce, nothing of it exposed
    after_step = make_plan(model, zero, A100, MEGALM.replace(overlap_param_gather=False), "bf16").time
    assert after_step.data_comm == pytest.approx(
        reduce_scatter + all_reduce_time(params * 2, 8, bandwidth, latency) / 2, rel=1e-9)
