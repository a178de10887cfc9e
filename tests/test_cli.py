"""The command line: dry runs of the shipped configs, clear errors, resolved config in the run dir."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megalm.cli import main
from megalm.config import load_config
from megalm.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def _params(text: str) -> int:
    return int(re.search(r"parameters: ([\d,]+)", text).group(1).replace(",", ""))


@pytest.mark.parametrize(
    "config, world, billions",
    [
        ("yuan-245b.yaml", "world 2128 = tp 8 x pp 38 x dp 7", (244.0, 247.0)),
        ("yuan-lm-13b.yaml", "world 1792 = tp 8 x pp 2 x dp 112", (12.5, 13.5)),
        ("yuan-plm-13b.yaml", "world 1792 = tp 8 x pp 2 x dp 112", (12.5, 13.5)),
    ],
)
def test_dry_run_prints_layout_and_parameter_count(config, world, billions, capsys) -> None:
    assert main(["train", str(ROOT / "configs" / config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert world in out
    assert billions[0] * 1e9 < _params(out) < billions[1] * 1e9
    assert "stage   0: layers 0-" in out


def test_check_validates_against_a_given_world_size(capsys) -> None:
    config = str(ROOT / "configs" / "tiny.yaml")
    assert main(["check", config, "parallel.tp=2", "--world-size", "8"]) == 0
    assert "world 8 = tp 2 x pp 1 x dp 4" in capsys.readouterr().out
    assert main(["check", config, "parallel.tp=3", "--world-size", "6"]) == 2
    assert "num_heads" in capsys.readouterr().err


def test_unknown_override_is_a_clear_error(capsys) -> None:
    assert main(["train", str(ROOT / "configs" / "tiny.yaml"), "optim.lrr=1e-3"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.pp=4"], "4 pipeline stages but only model.num_layers=2 layers"),
        (["parallel.pp=2", "model.num_layers=4", "parallel.pipeline_layers=[1,2]"], "sums to 3 but the model has 4"),
        (["parallel.pp=2", "model.num_layers=4", "parallel.schedule=interleaved", "parallel.virtual_stages=2",
          "train.global_batch_size=24"], "micro-batches per step (3) to be a multiple of pp=2"),
        (["parallel.pp=3", "model.num_layers=3"], "world size 4 is not divisible by tp x pp = 1 x 3"),
    ],
)
def test_bad_pipeline_layouts_fail_before_any_process_group(overrides, message, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")  # as under torchrun, but no process group may be created
    code = main(["train", str(ROOT / "configs" / "tiny.yaml"), *overrides, "--run-dir", str(tmp_path)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_train_writes_resolved_config_and_metrics(tmp_path: Path, capsys) -> None:
    config = str(ROOT / "configs" / "tiny.yaml")
    assert main(["train", config, "train.steps=25", "optim.warmup_steps=5", "--run-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "resolved config:" in out and "warmup_steps: 5" in out
    resolved = load_config(tmp_path / "config.yaml")
    assert resolved.train.steps == 25 and resolved.optim.warmup_steps == 5
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 26))
    assert records[-1]["loss"] < records[0]["loss"]
    for key in ("lr", "grad_norm", "tokens_per_s", "tflops_per_device", "mfu", "peak_memory_gb"):
        assert key in records[0]
    assert "peak_reserved_gb" in records[0]  # None on CPU: the caching allocator's figure is CUDA's


def test_out_of_memory_is_reported_with_figures_not_as_a_traceback(tmp_path: Path, capsys, monkeypatch) -> None:
    """An OutOfMemoryError (a RuntimeError) is neither a collective failure nor an unexplained crash."""
    monkeypatch.setenv("MEGALM_FAULT", "oom:0:3")
    config = str(ROOT / "configs" / "tiny.yaml")
    code = main(["train", config, "train.steps=5", "optim.warmup_steps=1", "--run-dir", str(tmp_path)])
    assert code == 4
    err = capsys.readouterr().err
    assert "megalm: rank 0: out of memory during step 3 on cpu: peak resident set" in err
    for advice in ("train.micro_batch_size", "parallel.pp", "parallel.tp", "megalm plan"):
        assert advice in err
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_out_of_memory_message_gives_the_cuda_allocator_figures() -> None:
    import torch

    from megalm.metrics import describe_out_of_memory

    figures = {"allocated_gib": 70.25, "reserved_gib": 78.5, "peak_gib": 77.0, "peak_reserved_gib": 79.0,
               "total_gib": 79.1}
    text = describe_out_of_memory(torch.device("cuda", 3), 12, figures)
    assert text.startswith("out of memory during step 12 on cuda:3: 70.25 GiB allocated, 78.50 GiB reserved, "
                           "peak 77.00 GiB allocated / 79.00 GiB reserved, of 79.10 GiB; to fit, try")


def _train_until_sleeping(run_dir: Path, seconds: float) -> subprocess.Popen:
    """`megalm train` in one process, paused by the sleep fault before step 5 (after 4 steps)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MEGALM_FAULT=f"sleep:0:5:{seconds}")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "megalm.cli", "train", "configs/tiny.yaml", "train.steps=3000",
           "optim.warmup_steps=2", "--run-dir", str(run_dir)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not (run_dir / ".fault-sleep-0-5").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    return proc


def test_ctrl_c_saves_and_exits_zero(tmp_path: Path) -> None:
    proc = _train_until_sleeping(tmp_path, 2)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert "interrupt: saving after this step" in output and "stop signal received: saved step 5" in output
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000005"


def test_a_second_ctrl_c_exits_at_once_without_saving(tmp_path: Path) -> None:
    proc = _train_until_sleeping(tmp_path, 60)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=30)[0]
    assert time.monotonic() - start < 10  # not the 60 s sleep
    assert proc.returncode == 130, output[-3000:]
    assert "second interrupt: exiting now without saving" in output and "Traceback" not in output
    assert not (tmp_path / "checkpoints" / "latest").exists()


def test_check_warns_about_a_long_run_without_periodic_saves(capsys) -> None:
    config = str(ROOT / "configs" / "yuan-lm-13b.yaml")
    assert main(["check", config, "checkpoint.interval_minutes=0"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"warning: no periodic checkpoint .* in a run of 54,496 steps, about [\d,.]+ h on 1792 a100-80gb "
                     r"GPUs by `megalm plan`'s step-time model: .* checkpoint.interval_minutes=30", err), err
    assert main(["check", config]) == 0  # the shipped config saves every 30 minutes
    assert "no periodic checkpoint" not in capsys.readouterr().err
    assert main(["check", str(ROOT / "configs" / "tiny.yaml")]) == 0  # a run of seconds needs none
    assert "no periodic checkpoint" not in capsys.readouterr().err
