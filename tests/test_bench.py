"""`megalm bench`: the CLI's table and JSON, and that the plain baseline is the same model as megalm's.

The baseline computing megalm's loss from megalm's weights is what makes "same shape" a fact: same
parameter count (less megalm's padded vocabulary rows), same function.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megalm.bench_baselines import IGNORE_INDEX, BaselineGPT, baseline_batches, build_baseline, load_from_megalm
from megalm.cli import main
from megalm.config import ModelConfig, load_config
from megalm.data.pipeline import build_sampler, build_sources
from megalm.distributed import ParallelGroups
from megalm.model.gpt import build_model, count_parameters

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
RATIO_LINE = "ratio megalm/baseline tokens/s:"


def test_bench_json_and_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "bench.json"
    assert main(["bench", TINY, "--steps", "3", "--warmup", "1", "--no-transformers", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    result = json.loads(path.read_text())
    megalm, baseline = result["megalm"], result["baseline"]
    assert result["steps"] == 3 and result["warmup"] == 1
    for entry in (megalm, baseline):
        assert entry["tokens_per_s"] > 0 and entry["tflops_per_device"] > 0 and entry["peak_memory_bytes"] > 0
        assert len(entry["step_times_s"]) == len(entry["losses"]) == 3
        assert entry["tokens_per_step"] == 16 * 64  # tiny: global batch 16 x seq 64, one process
        assert entry["mfu"] is None  # no known peak on CPU
    assert result["ratio_tokens_per_s"] == pytest.approx(megalm["tokens_per_s"] / baseline["tokens_per_s"], rel=1e-12)
    assert f"{RATIO_LINE} {result['ratio_tokens_per_s']:.2f}" in out
    assert "megalm " in out and "plain PyTorch" in out and "cpu (" in out
    # What scripts/gpu_check.sh reports from this file: which torch, and whether fp32 matmuls ran in TF32.
    assert result["torch_version"] == torch.__version__ and result["tf32"] is False and result["precision"] == "fp32"
    # The planner's figure for megalm's peak, compared in the table only on a GPU (on CPU the peak is the RSS).
    from megalm.bench import format_report, planned_peak_bytes
    from megalm.topology import Topology

    config = load_config(TINY)
    assert result["planned_peak_gib"] == planned_peak_bytes(config, Topology(1, 1, 1)) / 2**30 > 0
    assert "megalm plan predicts" not in out
    on_gpu = dict(result, device="NVIDIA H200")
    on_gpu["megalm"] = dict(megalm, peak_memory_gib=2 * result["planned_peak_gib"])
    assert f"megalm plan predicts {result['planned_peak_gib']:.3f} GiB for megalm's peak (measured/planned 2.00)" \
        in format_report(on_gpu)
    # ... and its time model: the plan of this run on the GPU's cluster, beside the measured tokens/s.
    from megalm.bench import planned_throughput
    from megalm.plan import get_numerics, load_cluster, make_plan
    from megalm.plan.layout import layout_from_config

    assert result["planned"] is None and planned_throughput(config, Topology(1, 1, 1), "cpu (1 thread)") is None
    planned = planned_throughput(config, Topology(1, 1, 1), "NVIDIA H200")
    plan = make_plan(config.model, layout_from_config(config, gpus=1), load_cluster("h200-141gb"), get_numerics("megalm"),
                     config.train.precision)
    assert planned == {"cluster": "h200-141gb", "tokens_per_s": plan.time.tokens_per_s, "mfu": plan.time.mfu}
    assert planned_throughput(config, Topology(1, 1, 1), "NVIDIA A100-SXM4-80GB")["cluster"] == "a100-80gb"
    assert planned_throughput(config, Topology(1, 1, 1), "NVIDIA H100 80GB HBM3")["cluster"] == "h100-80gb"
    on_gpu["planned"] = dict(planned, tokens_per_s=megalm["tokens_per_s"] / 0.8)
    assert f"MFU {100 * plan.time.mfu:.1f}% on h200-141gb (measured/planned 0.80" in format_report(on_gpu)


def test_no_baseline_prints_no_ratio(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "bench.json"
    assert main(["bench", TINY, "--steps", "1", "--warmup", "0", "--no-baseline", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert RATIO_LINE not in out and "plain PyTorch" not in out
    result = json.loads(path.read_text())
    assert result["baseline"] is None and result["ratio_tokens_per_s"] is None
    assert len(result["megalm"]["step_times_s"]) == 1


def test_prefixlm_rotary_bf16_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "bench.json"
    overrides = ["model.family=prefixlm", "model.position_embedding=rotary", "train.precision=bf16"]
    assert main(["bench", TINY, *overrides, "--steps", "1", "--warmup", "1", "--no-transformers", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["precision"] == "bf16" and result["ratio_tokens_per_s"] > 0
    assert RATIO_LINE in capsys.readouterr().out


def test_bad_step_count_is_an_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", TINY, "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err


VARIANTS = [("lm", "learned"), ("lm", "rotary"), ("prefixlm", "learned")]


def _models(family: str, position: str):
    # vocab 200 is padded to 256: the baseline has no padded rows, and they must not change the loss
    overrides = [f"model.family={family}", f"model.position_embedding={position}", "model.vocab_size=200"]
    config = load_config(TINY, overrides)
    megalm = build_model(config.model, ParallelGroups.single(), config.train.seed)
    baseline = build_baseline(config.model, config.train.seed, torch.device("cpu"))
    return config, megalm, baseline


def _perturb(model: torch.nn.Module) -> None:
    """Biases and LayerNorms are trivial at init: add seeded noise so every weight matters."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("family, position", VARIANTS)
def test_same_parameter_count_less_padding(family: str, position: str) -> None:
    config, megalm, baseline = _models(family, position)
    cfg = config.model
    padding = (cfg.padded_vocab_size(1) - cfg.vocab_size) * cfg.hidden_size
    assert padding > 0
    assert sum(p.numel() for p in baseline.parameters()) == count_parameters(megalm) - padding


@pytest.mark.parametrize("family, position", VARIANTS)
@pytest.mark.parametrize("perturb", [False, True])
def test_baseline_computes_megalm_loss(family: str, position: str, perturb: bool) -> None:
    config, megalm, baseline = _models(family, position)
    if perturb:  # biases and LayerNorms are trivial at init; make every weight matter
        _perturb(megalm)
    load_from_megalm(baseline, megalm)
    batch = build_sampler(config, build_sources(config).train, 0, 1).micro_batches(0)[0]
    with torch.no_grad():
        losses = megalm(batch.tokens, labels=batch.labels, prefix_lengths=batch.prefix_lengths)
        megalm_loss = ((losses * batch.loss_mask).sum() / batch.loss_mask.sum()).item()
        tokens, labels, prefix = baseline_batches([batch])[0]
        baseline_loss = (baseline(tokens, labels, prefix) / (labels != IGNORE_INDEX).sum()).item()
    assert abs(megalm_loss - baseline_loss) <= 1e-4, (megalm_loss, baseline_loss)


def test_load_from_megalm_needs_a_full_model() -> None:
    config = load_config(TINY)
    with pytest.raises(ValueError, match="tp = pp = 1"):
        load_from_megalm(BaselineGPT(config.model), torch.nn.Linear(2, 2))


@pytest.mark.parametrize("warmup", [1, 0])
def test_bench_with_compiled_layers(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch, warmup: int) -> None:
    """train.compile=true: both models compile their blocks; the warm-up absorbs the compilation and
    the report gives its seconds; with no warm-up the timed steps compiled, and the report says so.
    (aot_eager backend: the same graph capture without inductor's code generation, for speed.)"""
    import torch._dynamo

    from megalm.model import compile as compile_module

    monkeypatch.setattr(compile_module, "DEFAULT_BACKEND", "aot_eager")
    torch._dynamo.reset()
    path = tmp_path / "bench.json"
    args = ["bench", TINY, "--steps", "2", "--warmup", str(warmup), "--json", str(path), "train.compile=true",
            "train.global_batch_size=4"] + ([] if warmup else ["--no-transformers"])
    assert main(args) == 0
    out = capsys.readouterr().out
    result = json.loads(path.read_text())
    assert result["compile"] is True and "compiled layers (train.compile)" in out
    from megalm.bench import PHASES

    phases = [(key, label) for key, label in PHASES if result.get(key) is not None]
    assert len(phases) >= 2  # megalm and the plain baseline (and transformers' GPT-2 where installed)
    for key, label in phases:
        entry = result[key]
        if warmup:
            assert entry["compile_s"] > 0 and entry["compile_s_timed"] == 0, entry
            assert f"{label} compiled for {entry['compile_s']:.1f} s during warm-up" in out
            assert "during the timed steps: those timings include compilation" not in out
        else:
            assert entry["compile_s"] == 0 and entry["compile_s_timed"] > 0, entry
            assert f"{label} compiled for {entry['compile_s_timed']:.1f} s during the timed steps" in out
    torch._dynamo.reset()


# ---- Hugging Face transformers' GPT-2, the optional third phase ----------------------------------
def _copy_baseline_into_transformers(hf, baseline: BaselineGPT) -> None:
    """The plain baseline's weights into transformers' GPT-2 (Conv1D weights are [in, out])."""
    source = {name: t.detach() for name, t in baseline.state_dict().items()}
    target = {"wte.weight": source["token_embedding.weight"], "wpe.weight": source["position_embedding.weight"],
              "ln_f.weight": source["final_norm.weight"], "ln_f.bias": source["final_norm.bias"]}
    parts = {"ln1": "ln_1", "ln2": "ln_2", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(baseline.cfg.num_layers):
        for mine, theirs in parts.items():
            weight = source[f"blocks.{i}.{mine}.weight"]
            target[f"h.{i}.{theirs}.weight"] = weight if mine.startswith("ln") else weight.t()
            target[f"h.{i}.{theirs}.bias"] = source[f"blocks.{i}.{mine}.bias"]
    missing, unexpected = hf.model.transformer.load_state_dict(target, strict=False)
    assert not unexpected and all(".attn.bias" in name or ".attn.masked_bias" in name for name in missing), missing


@pytest.mark.parametrize("family", ["lm", "prefixlm"])
def test_transformers_gpt2_is_the_same_model(family: str) -> None:
    """Same parameter count as the plain baseline, and from its weights the same loss: "same shape"
    is a fact for the transformers phase too (PrefixLM through the [b, 1, s, s] mask it is given)."""
    pytest.importorskip("transformers", reason="Hugging Face transformers is not installed (pip install 'megalm[hf]')")
    from megalm.bench_baselines import build_transformers_gpt2

    config, megalm, baseline = _models(family, "learned")
    hf = build_transformers_gpt2(config.model, config.train.seed, torch.device("cpu"))
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in baseline.parameters())
    _perturb(baseline)
    _copy_baseline_into_transformers(hf, baseline)
    batch = build_sampler(config, build_sources(config).train, 0, 1).micro_batches(0)[0]
    tokens, labels, prefix = baseline_batches([batch])[0]
    with torch.no_grad():
        expected = baseline(tokens, labels, prefix).item()
        got = hf(tokens, labels, prefix).item()
        causal = hf(tokens, labels, torch.zeros_like(prefix)).item() if family == "prefixlm" else None
    assert got == pytest.approx(expected, rel=1e-5)
    if family == "prefixlm":  # the mask is really applied: without it the loss differs
        assert abs(causal - expected) > 1e-3


def test_bench_times_transformers_when_installed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("transformers", reason="Hugging Face transformers is not installed (pip install 'megalm[hf]')")
    path = tmp_path / "bench.json"
    assert main(["bench", TINY, "--steps", "2", "--warmup", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    result = json.loads(path.read_text())
    hf = result["transformers"]
    assert result["transformers_skipped"] is None and len(hf["step_times_s"]) == 2 and hf["tokens_per_s"] > 0
    assert hf["tokens_per_step"] == result["baseline"]["tokens_per_step"]
    assert result["ratio_transformers_tokens_per_s"] == pytest.approx(
        result["megalm"]["tokens_per_s"] / hf["tokens_per_s"], rel=1e-12)
    assert f"ratio megalm/transformers tokens/s: {result['ratio_transformers_tokens_per_s']:.2f}" in out
    assert "transformers GPT-2" in out


def test_bench_without_transformers_says_so(tmp_path: Path, capsys: pytest.CaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import megalm.bench

    monkeypatch.setattr(megalm.bench, "transformers_missing", lambda: "Hugging Face transformers is not installed")
    path = tmp_path / "bench.json"
    assert main(["bench", TINY, "--steps", "1", "--warmup", "0", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["transformers"] is None and result["ratio_transformers_tokens_per_s"] is None
    assert "transformers GPT-2: skipped, Hugging Face transformers is not installed" in capsys.readouterr().out
    assert main(["bench", TINY, "--steps", "1", "--warmup", "0", "--no-transformers", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["transformers_skipped"] == "--no-transformers"


# ---- transformers' Llama (and Qwen2) for a Llama-style spec ------------------------------------------
LLAMA_TINY = str(Path(__file__).resolve().parents[1] / "configs" / "llama-tiny.yaml")


def _megalm_into_transformers_llama(hf, megalm) -> None:
    """megalm's full (tp = pp = 1) weights into transformers' Llama / Qwen2, by the spec's layouts: query rows
    (head, d), key_value rows (kv head, k|v, d), fused qkv rows (head, q|k|v, d); padded vocabulary rows dropped."""
    cfg = megalm.cfg
    heads, kv_heads, d, vocab = cfg.num_heads, cfg.kv_heads(), cfg.head_size(), cfg.vocab_size
    source = {name: t.detach() for name, t in megalm.state_dict().items()}
    target = {"model.embed_tokens.weight": source["embedding.word.weight"][:vocab],
              "model.norm.weight": source["final_norm.weight"]}
    # tied: transformers' state_dict lists lm_head.weight as the embedding itself
    target["lm_head.weight"] = target["model.embed_tokens.weight"] if cfg.tie_embeddings else source["output.weight"][:vocab]
    for i in range(cfg.num_layers):
        mine, theirs = f"layers.{i}.", f"model.layers.{i}."
        target[theirs + "input_layernorm.weight"] = source[mine + "ln1.weight"]
        target[theirs + "post_attention_layernorm.weight"] = source[mine + "ln2.weight"]
        for kind in ("weight", "bias"):
            if cfg.grouped_attention() and mine + f"attn.query.{kind}" in source:
                q = source[mine + f"attn.query.{kind}"]
                kv = source[mine + f"attn.key_value.{kind}"]
                k, v = kv.view(kv_heads, 2, d, *kv.shape[1:]).unbind(1)
            elif mine + f"attn.qkv.{kind}" in source:
                qkv = source[mine + f"attn.qkv.{kind}"]
                q, k, v = qkv.view(heads, 3, d, *qkv.shape[1:]).unbind(1)
            else:
                continue
            for name, t in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                target[theirs + f"self_attn.{name}.{kind}"] = t.reshape(-1, cfg.hidden_size) if kind == "weight" else t.reshape(-1)
        for part, name in (("attn.proj", "self_attn.o_proj"), ("mlp.gate", "mlp.gate_proj"), ("mlp.up", "mlp.up_proj"),
                           ("mlp.down", "mlp.down_proj")):
            for kind in ("weight", "bias"):
                if mine + f"{part}.{kind}" in source:
                    target[theirs + f"{name}.{kind}"] = source[mine + f"{part}.{kind}"]
    hf.model.load_state_dict(target, strict=True)


LLAMA_VARIANTS = {
    "gqa untied": [],
    "mqa head_dim 24 tied": ["model.num_kv_heads=1", "model.head_dim=24", "model.tie_embeddings=true"],
    "llama3 rope scaling": ["model.rope_scaling=llama3", "model.rope_factor=8", "model.rotary_base=500000",
                            "model.rope_original_max_positions=32"],
    "qwen2 qkv bias": ["model.qkv_bias=true"],
    "multi-head biases": ["model.num_kv_heads=null", "model.bias=true"],
}


@pytest.mark.parametrize("variant", sorted(LLAMA_VARIANTS))
def test_transformers_llama_is_the_same_model(variant: str) -> None:
    """The transformers phase of a Llama-style config has megalm's parameter count (less its padded vocabulary
    rows) and, given megalm's weights, computes megalm's loss: "same shape" is a fact for Llama and Qwen2 too."""
    pytest.importorskip("transformers", reason="Hugging Face transformers is not installed (pip install 'megalm[hf]')")
    from megalm.bench_baselines import transformers_baseline

    config = load_config(LLAMA_TINY, ["model.vocab_size=200", *LLAMA_VARIANTS[variant]])
    cfg = config.model
    label, builder = transformers_baseline(cfg)
    assert label == ("transformers Qwen2" if variant.startswith("qwen2") else "transformers Llama")
    megalm = build_model(cfg, ParallelGroups.single(), config.train.seed)
    _perturb(megalm)
    hf = builder(cfg, config.train.seed, torch.device("cpu"))
    padding = (cfg.padded_vocab_size(1) - cfg.vocab_size) * cfg.hidden_size * (1 if cfg.tie_embeddings else 2)
    assert sum(p.numel() for p in hf.parameters()) == count_parameters(megalm) - padding
    _megalm_into_transformers_llama(hf, megalm)
    batch = build_sampler(config, build_sources(config).train, 0, 1).micro_batches(0)[0]
    tokens, labels, _ = baseline_batches([batch])[0]
    with torch.no_grad():
        losses = megalm(batch.tokens, labels=batch.labels)
        expected = (losses * batch.loss_mask).sum().item()
        got = hf(tokens, labels).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_transformers_model_follows_the_spec() -> None:
    from megalm.bench_baselines import plain_baseline_mismatch, transformers_baseline

    gpt, llama = load_config(TINY).model, load_config(LLAMA_TINY).model
    assert transformers_baseline(gpt)[0] == "transformers GPT-2" and plain_baseline_mismatch(gpt) is None
    assert transformers_baseline(llama)[0] == "transformers Llama"
    assert "norm=rmsnorm, mlp=swiglu" in plain_baseline_mismatch(llama)
    with pytest.raises(ValueError, match="norm=layernorm, mlp=swiglu"):
        transformers_baseline(load_config(LLAMA_TINY, ["model.norm=layernorm"]).model)


def test_bench_llama_tiny_against_transformers_llama(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`megalm bench configs/llama-tiny.yaml`: megalm and transformers' LlamaForCausalLM of the same shape,
    timed in one run, and their ratio; the plain (GPT) baseline is skipped and says why."""
    pytest.importorskip("transformers", reason="Hugging Face transformers is not installed (pip install 'megalm[hf]')")
    path = tmp_path / "bench.json"
    assert main(["bench", LLAMA_TINY, "--steps", "2", "--warmup", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    result = json.loads(path.read_text())
    hf = result["transformers"]
    assert result["transformers_model"] == "transformers Llama" and result["transformers_skipped"] is None
    assert len(hf["step_times_s"]) == 2 and hf["tokens_per_s"] > 0
    assert hf["num_parameters_on_rank0"] == result["megalm"]["num_parameters_on_rank0"]  # 256 rows: no padding
    assert result["ratio_transformers_tokens_per_s"] == pytest.approx(
        result["megalm"]["tokens_per_s"] / hf["tokens_per_s"], rel=1e-12)
    assert f"ratio megalm/transformers tokens/s: {result['ratio_transformers_tokens_per_s']:.2f} (transformers Llama)" in out
    assert result["baseline"] is None and result["ratio_tokens_per_s"] is None
    assert "baseline: the plain baseline is a GPT" in out and "plain PyTorch" not in out
    assert "(2 kv heads, rmsnorm, swiglu, no biases, untied)" in out
    # the FLOPs behind TFLOP/s count SwiGLU's three matrices and the smaller key/value projection
    from megalm.plan.flops import training_flops_per_token

    assert result["flops_per_token"] == training_flops_per_token(load_config(LLAMA_TINY).model)


def test_a_document_mask_skips_both_baselines_and_says_why() -> None:
    """The baselines attend across a packed sample's documents: with model.document_mask they would time other
    work, so neither runs and the report says why."""
    from megalm.bench_baselines import plain_baseline_mismatch, transformers_baseline

    cfg = ModelConfig(document_mask=True)
    assert "document_mask=True" in plain_baseline_mismatch(cfg)
    with pytest.raises(ValueError, match="document_mask=True"):
        transformers_baseline(cfg)
