"""The side by side with Megatron-Core and torchtitan (megalm.bench_peers, scripts/peers/): what runs without
a GPU and without the peers. The shared token file holds exactly megalm's batches, megalm's runner trains
on it as the Trainer trains on its own data, the driver turns runner output into rows and ratios, the
pins parse, and gpu_check_summary.py reports the side by side, FP8 against bf16 and the planner's ratio.
Where megatron-core or torchtitan import (never in CI), their runners train the tiny Llama on CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megalm import bench_peers
from megalm.bench_peers import (
    format_markdown,
    parse_record,
    read_token_file,
    run_megalm,
    side_by_side,
    write_token_file,
)
from megalm.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY, LLAMA_TINY = ROOT / "configs" / "tiny.yaml", ROOT / "configs" / "llama-tiny.yaml"


def test_token_file_holds_megalm_batches_and_refuses_another_shape(tmp_path: Path) -> None:
    from megalm.data.pipeline import build_sampler, build_sources

    config = load_config(TINY, ["train.device=cpu"])
    path = write_token_file(config, 3, tmp_path / "tokens.npz")
    tokens = read_token_file(path, config, 3)
    sampler = build_sampler(config, build_sources(config).train, 0, 1)
    assert tokens.tokens.shape == (3, 4, 4, 64)  # steps, accumulation 16/4, micro-batch, seq
    for step in range(3):
        for (ids, labels), batch in zip(tokens.step(step, torch.device("cpu")), sampler.micro_batches(step)):
            assert torch.equal(ids, batch.tokens) and torch.equal(labels, batch.labels)
    assert np.array_equal(tokens.tokens[:, :, :, 1:], tokens.labels[:, :, :, :-1])  # labels: the next token
    with pytest.raises(ValueError, match=r"needs at least \[4, 4, 4, 64\].*python -m megalm.bench_peers tokens"):
        read_token_file(path, config, 4)
    other = load_config(TINY, ["train.global_batch_size=8"])
    with pytest.raises(ValueError, match=r"holds batches \[3, 4, 4, 64\]"):
        read_token_file(path, other, 3)


def test_token_file_refuses_masked_labels(tmp_path: Path) -> None:
    config = load_config(ROOT / "configs" / "tiny-prefixlm.yaml", ["train.device=cpu"])
    with pytest.raises(ValueError, match="trains on every label.*model.family=lm"):
        write_token_file(config, 1, tmp_path / "tokens.npz")


def test_megalm_runner_trains_as_the_trainer_does_on_its_own_data(tmp_path: Path) -> None:
    """The token file carries megalm's batches, so the runner's losses are the Trainer's on its sampler."""
    from megalm.config import validate
    from megalm.distributed import build_parallel_groups
    from megalm.train import build_trainer

    config = load_config(LLAMA_TINY, ["train.device=cpu"])
    tokens = read_token_file(write_token_file(config, 4, tmp_path / "t.npz"), config, 4)
    record = run_megalm(config, "configs/llama-tiny.yaml", tokens, warmup=1, steps=3)
    trainer = build_trainer(config, build_parallel_groups(validate(config, 1), 0, torch.device("cpu")), None)
    try:
        reference = [trainer.train_step(step).loss for step in range(4)]
    finally:
        trainer.metrics.close()
    assert record["losses"] == pytest.approx(reference[1:], rel=1e-6)
    assert record["system"] == "megalm" and record["steps"] == 3 and record["tokens_per_step"] == 16 * 64
    assert record["tokens_per_s"] == pytest.approx(16 * 64 / record["median_step_s"])
    from megalm.plan.flops import training_flops_per_token

    assert record["tflops_per_device"] == pytest.approx(
        training_flops_per_token(config.model) * record["tokens_per_s"] / 1e12)
    assert record["mfu"] is None  # a CPU has no peak in megalm's table
    assert record["num_parameters"] > 0


def _row(system: str, config: str, tokens_per_s: float, mfu: float, peak: float, loss: float) -> dict:
    return {"system": system, "config": config, "tokens_per_s": tokens_per_s, "mfu": mfu, "peak_memory_gib": peak,
            "loss": loss, "version": "v", "attention": "sdpa"}


def test_side_by_side_rows_give_megalm_over_peer_ratios_and_a_markdown_table() -> None:
    records = [
        _row("megalm", "configs/gpt-1.3b.yaml", 56000.0, 0.516, 36.5, 10.5),
        _row("megatron-core", "configs/gpt-1.3b.yaml", 50000.0, 0.46, 40.0, 10.6),
        {"system": "torchtitan", "config": "configs/gpt-1.3b.yaml", "skipped": "torchtitan has no model for x"},
        _row("megalm", "configs/llama-1b.yaml", 70000.0, 0.55, 30.0, 11.0),
        _row("torchtitan", "configs/llama-1b.yaml", 80000.0, 0.62, 25.0, 11.5),
    ]
    rows = side_by_side(records)
    assert rows[0]["megalm_over_peer_tokens_per_s"] is None  # megalm against itself: no ratio
    assert rows[1]["megalm_over_peer_tokens_per_s"] == pytest.approx(1.12)
    assert rows[1]["megalm_over_peer_mfu"] == pytest.approx(0.516 / 0.46)
    assert rows[1]["megalm_over_peer_peak_memory_gib"] == pytest.approx(36.5 / 40.0)
    assert rows[1]["loss_minus_megalm"] == pytest.approx(0.1)
    assert rows[2]["megalm_over_peer_tokens_per_s"] is None
    assert rows[4]["megalm_over_peer_tokens_per_s"] == pytest.approx(0.875)  # against llama-1b's megalm row
    table = format_markdown(rows).splitlines()
    assert table[0].startswith("| model | system | tokens/s | MFU |") and len(table) == 2 + len(records)
    assert table[3] == ("| gpt-1.3b | megatron-core | 50,000 | 46.0% | 40.0 | 10.600 | 1.12 | 1.12 | 0.91 "
                        "| version v, attention sdpa |")
    assert table[4].startswith("| gpt-1.3b | torchtitan | n/a | n/a |") and "torchtitan has no model for x" in table[4]
    assert table[6].split("|")[7].strip() == "0.88"


def test_parse_record_takes_the_last_result_line() -> None:
    output = "warning\nPEER_RESULT {\"a\": 1}\nnoise\nPEER_RESULT {\"a\": 2}\ntrailer\n"
    assert parse_record(output) == {"a": 2}
    assert parse_record("Traceback ...\nModuleNotFoundError: No module named 'megatron'\n") is None


def test_driver_runs_each_system_in_its_process_and_writes_the_table(tmp_path: Path, monkeypatch) -> None:
    """megalm for real (tiny, CPU); a peer that prints a canned row and one that fails, in place of the peers."""
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text("import json, sys\nprint('PEER_RESULT ' + json.dumps({'system': 'megatron-core', 'config': "
                    "sys.argv[1], 'tokens_per_s': 1000.0, 'mfu': None, 'peak_memory_gib': 0.5, 'loss': 5.5, "
                    "'argv': sys.argv[2:]}))\n")
    bad.write_text("raise ModuleNotFoundError(\"No module named 'torchtitan'\")\n")
    monkeypatch.setattr(bench_peers, "PEERS", {"megatron-core": str(good), "torchtitan": str(bad)})
    out = tmp_path / "out"
    assert bench_peers.main(["run", str(TINY), "--out", str(out), "--steps", "2", "--warmup", "1",
                             "--override", "train.device=cpu"]) == 0
    rows = json.loads((out / "peers.json").read_text())["rows"]
    assert [row["system"] for row in rows] == ["megalm", "megatron-core", "torchtitan"]
    megalm, peer, failed = rows
    assert megalm["steps"] == 2 and math.isfinite(megalm["loss"]) and megalm["tokens_per_s"] > 0
    assert peer["argv"] == ["train.device=cpu", "--tokens", str(out / "tokens_tiny.npz"), "--steps", "2", "--warmup", "1"]
    assert peer["megalm_over_peer_tokens_per_s"] == pytest.approx(megalm["tokens_per_s"] / 1000.0)
    assert failed["skipped"].startswith("exit 1: ModuleNotFoundError: No module named 'torchtitan'")
    assert (out / "peers_tiny_torchtitan.log").exists()
    assert "| tiny | megatron-core | 1,000 |" in (out / "peers.md").read_text()
    assert bench_peers.main(["run", str(TINY), "--out", str(out), "--systems", "megalm,nemo"]) == 2


def test_pins_parse_and_the_scripts_read_them() -> None:
    from packaging.requirements import Requirement

    lines = [line.split("#")[0].strip() for line in (ROOT / "scripts/peers/requirements.txt").read_text().splitlines()]
    pins = {Requirement(line).name: Requirement(line) for line in lines if line}
    assert {"megatron-core", "torchtitan"} <= set(pins)
    for requirement in pins.values():  # exact pins: the wheel directory holds exactly these files
        assert [spec.operator for spec in requirement.specifier] == ["=="], requirement
    assert str(pins["megatron-core"].specifier) == "==0.16.1" and str(pins["torchtitan"].specifier) == "==0.3.0"
    for script in ("fetch_wheels.sh", "install_wheels.sh"):
        path = ROOT / "scripts" / "peers" / script
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
        assert "requirements.txt" in path.read_text()
        proc = subprocess.run(["bash", str(path)], capture_output=True, text=True)
        assert proc.returncode == 2 and "usage:" in proc.stderr


def test_install_wheels_names_a_missing_directory(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", "scripts/peers/install_wheels.sh", str(tmp_path / "none")], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no wheel directory" in proc.stderr and "fetch_wheels.sh" in proc.stderr


def test_gpu_check_summary_reports_peers_fp8_planner_and_tp_overlap(tmp_path: Path) -> None:
    def bench(name: str, tokens_per_s: float, loss: float, planned: float | None = None) -> None:
        result = {"megalm": {"tokens_per_s": tokens_per_s, "tflops_per_device": 1.0, "mfu": 0.5, "losses": [9.0, loss]},
                  "planned": {"cluster": "h100-80gb", "tokens_per_s": planned, "mfu": 0.6} if planned else None}
        (tmp_path / f"bench_{name}.json").write_text(json.dumps(result))

    bench("gpt-1.3b", 56000.0, 7.0, planned=64000.0)
    bench("gpt-1.3b-fp8-bf16", 60000.0, 6.0)
    bench("gpt-1.3b-fp8-rowwise", 75000.0, 6.03)
    bench("gpt-1.3b-fp8-compiled-bf16", 80000.0, 6.0)
    bench("gpt-1.3b-fp8-compiled-tensorwise", 96000.0, 6.0)
    (tmp_path / "peers").mkdir()
    rows = side_by_side([_row("megalm", "configs/llama-1b.yaml", 70000.0, 0.55, 30.0, 11.0),
                         _row("torchtitan", "configs/llama-1b.yaml", 80000.0, 0.62, 25.0, 11.5)])
    (tmp_path / "peers" / "peers.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "skipped.txt").write_text("fp8 tensorwise: past BUDGET_S=540\n\n")
    proc = subprocess.run([sys.executable, "scripts/gpu_check_summary.py", str(tmp_path), "500"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    rowwise = summary["fp8"]["rowwise"]
    assert rowwise["tokens_per_s_ratio"] == pytest.approx(1.25) and rowwise["loss_relative_difference"] == pytest.approx(0.005)
    # compiled FP8 against compiled bf16, not against eager bf16
    assert summary["fp8"]["compiled-tensorwise"]["tokens_per_s_ratio"] == pytest.approx(1.2)
    assert sorted(summary["fp8"]) == ["compiled-tensorwise", "rowwise"]
    assert summary["planner_measured_over_planned"] == {"gpt-1.3b": pytest.approx(0.875)}
    assert [row["system"] for row in summary["peers"]] == ["megalm", "torchtitan"]
    assert summary["skipped"] == ["fp8 tensorwise: past BUDGET_S=540"] and "tp >= 2" in summary["tp_overlap"]
    assert "fp8 rowwise: 1.25x bf16 tokens/s, loss 6.0300 against 6.0000 (+0.50%)" in proc.stdout
    assert "side by side llama-1b torchtitan: 80,000 tokens/s, MFU 62.0%, peak 25.0 GiB, loss 11.500; megalm/torchtitan 0.88" \
        in proc.stdout
    assert "planner gpt-1.3b: measured/planned tokens/s 0.88" in proc.stdout and "tp overlap: not measured" in proc.stdout


PEER_PACKAGES = {"megatron-core": "megatron.core", "torchtitan": "torchtitan"}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.parametrize("system,config_path", [("megatron-core", TINY), ("megatron-core", LLAMA_TINY),
                                                ("torchtitan", TINY), ("torchtitan", LLAMA_TINY)],
                         ids=["megatron-core-gpt", "megatron-core-llama", "torchtitan-gpt", "torchtitan-llama"])
def test_peer_runner_trains_the_tiny_models_like_megalm(system: str, config_path: Path, tmp_path: Path) -> None:
    """With the peer installed (scripts/peers/install_wheels.sh; never in CI): its model has megalm's parameter
    count, and after the same steps on the same tokens its loss is within 10% of megalm's (own inits);
    torchtitan, which has no GPT, says so in its row."""
    if not _importable(PEER_PACKAGES[system]):
        pytest.skip(f"{system} is not installed (scripts/peers/install_wheels.sh installs it beside a GPU check)")
    config = load_config(config_path, ["train.device=cpu"])
    path = write_token_file(config, 4, tmp_path / "t.npz")
    proc = subprocess.run([sys.executable, bench_peers.PEERS[system], str(config_path), "train.device=cpu",
                           "--tokens", str(path), "--steps", "3", "--warmup", "1"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    record = parse_record(proc.stdout)
    assert record is not None, proc.stderr[-3000:]
    if system == "torchtitan" and config_path == TINY:
        assert "torchtitan has no model for model.norm='layernorm'" in record["skipped"]
        return
    megalm = run_megalm(config, str(config_path), read_token_file(path, config, 4), warmup=1, steps=3)
    assert record["system"] == system and record["num_parameters"] == megalm["num_parameters"]
    assert abs(record["loss"] / megalm["loss"] - 1) < 0.10, (record["losses"], megalm["losses"])


def test_llama_1b_is_the_llama_3_2_1b_shape_with_gpt_1_3b_work() -> None:
    """configs/llama-1b.yaml: Meta's Llama-3.2-1B config.json (1.24B parameters, tied) with gpt-1.3b's
    sequence, batch, precision and optimizer, so the side by side times the same work on both shapes."""
    from megalm.config import validate
    from megalm.distributed import build_parallel_groups
    from megalm.model.gpt import build_model, count_parameters

    llama, gpt = load_config(ROOT / "configs" / "llama-1b.yaml"), load_config(ROOT / "configs" / "gpt-1.3b.yaml")
    model = llama.model
    assert (model.num_layers, model.hidden_size, model.num_heads, model.kv_heads(), model.ffn_size(),
            model.vocab_size) == (16, 2048, 32, 8, 8192, 128256)
    assert (model.rotary_base, model.rope_scaling, model.rope_factor, model.tie_embeddings) == (500000.0, "llama3", 32.0, True)
    assert (model.seq_length, llama.train.micro_batch_size, llama.train.precision) == (
        gpt.model.seq_length, gpt.train.micro_batch_size, gpt.train.precision)
    assert llama.optim == gpt.optim
    groups = build_parallel_groups(validate(llama, 1), 0, torch.device("cpu"))
    model = build_model(llama.model, groups, seed=1, materialize=False)  # on the meta device: no memory
    assert count_parameters(model) == 1_235_814_400  # Llama-3.2-1B's count (tied output layer)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_megatron_sdpa_core_attention_equals_megatron_local_attention(kv_heads: int) -> None:
    """The runner's SDPA core attention computes what Megatron-Core's own local (unfused) one does, with
    its explicit causal mask, for full and grouped-query attention (needs megatron-core; never in CI)."""
    if not _importable("megatron.core"):
        pytest.skip("megatron-core is not installed (scripts/peers/install_wheels.sh installs it beside a GPU check)")
    import contextlib
    import importlib

    sys.path.insert(0, str(ROOT / "scripts" / "peers"))
    try:
        runner = importlib.import_module("megatron_core_bench")
    finally:
        sys.path.remove(str(ROOT / "scripts" / "peers"))
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    current_device = torch.cuda.current_device
    try:
        if not parallel_state.model_parallel_is_initialized():
            runner.init_parallel_state(torch.device("cpu"), 1)
        tracker = tensor_parallel.get_cuda_rng_tracker()
        fork, tracker.fork = tracker.fork, lambda *args, **kwargs: contextlib.nullcontext()  # no CUDA RNG here
        config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=kv_heads,
                                   use_cpu_initialization=True, masked_softmax_fusion=False, attention_dropout=0.0)
        local = DotProductAttention(config, 1, AttnMaskType.causal, "self")
        sdpa = runner.sdpa_core_attention()(config, 1, AttnMaskType.causal, "self")
        generator = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(8, 2, heads, 16, generator=generator) for heads in (4, kv_heads, kv_heads))
        causal = torch.triu(torch.ones(8, 8, dtype=torch.bool), 1)[None, None]  # True: masked
        expected, unmasked = local(q, k, v, causal), local(q, k, v, torch.zeros_like(causal))
        got = sdpa(q, k, v, None)
        tracker.fork = fork
    finally:
        torch.cuda.current_device = current_device
        if torch.distributed.is_initialized():
            parallel_state.destroy_model_parallel()
            torch.distributed.destroy_process_group()
    assert got.shape == expected.shape == (8, 2, 64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, unmasked, atol=1e-3)  # the mask matters


@pytest.mark.slow  # every Python start imports torch (sitecustomize)
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_gpu_check_runs_the_side_by_side_part_and_summarises_it(tmp_path: Path) -> None:
    """scripts/gpu_check.sh's peers part on a CPU made to look like a CUDA build (as tests/test_gpu.py fakes
    one), that part alone (GPU_CHECK_PARTS): without PEER_WHEELS megalm runs alone and says so, and
    gpu_check.json carries its row and the TP overlap note."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(
        "import torch\nfrom types import SimpleNamespace\ntorch.version.cuda = '12.8'\n"
        "torch.cuda.is_available = lambda: True\ntorch.cuda.device_count = lambda: 1\n"
        "torch.cuda.get_device_name = lambda i=0: 'Fake GPU'\n"
        "torch.cuda.get_device_properties = lambda i=0: SimpleNamespace(name='Fake GPU', multi_processor_count=1, "
        "total_memory=2**34, major=9, minor=0)\n")
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "VENV", "PEER_WHEELS")}
    env.update(PYTHON=sys.executable, PYTHONPATH=str(fake), GPU_CHECK_PARTS="peers", PEER_DEVICE="cpu",
               PEER_CONFIGS="configs/tiny.yaml", PEER_SYSTEMS="megalm", PEER_STEPS="1", PEER_WARMUP="0",
               PEER_BATCH="4", OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no PEER_WHEELS: the side by side runs megalm alone" in proc.stderr
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [(row["system"], row["config"]) for row in summary["peers"]] == [("megalm", "configs/tiny.yaml")]
    assert summary["peers"][0]["tokens_per_s"] > 0 and summary["tests"] == {} and summary["bench"] == {}
    assert "side by side tiny megalm:" in proc.stdout and "tp overlap: not measured" in proc.stdout
    assert (tmp_path / "out" / "peers" / "peers.md").read_text().startswith("| model | system |")


def test_runner_args_take_overrides_before_or_after_the_options() -> None:
    from megalm.bench_peers import runner_args

    for argv in ([str(TINY), "train.global_batch_size=8", "--tokens", "t.npz", "--device", "cpu"],
                 [str(TINY), "--tokens", "t.npz", "train.global_batch_size=8", "--device", "cpu"]):
        args, config = runner_args("test", argv)
        assert (args.tokens, args.steps, args.warmup) == ("t.npz", 5, 2)
        assert (config.train.global_batch_size, config.train.device) == (8, "cpu")
