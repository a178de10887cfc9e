"""launch/: the scripts parse, set overridable GPU defaults, pass the cluster's NCCL settings through,
and the sbatch script activates the environment and creates its log directory (with stubbed SLURM)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("launch/*.sh"), ROOT / "launch" / "slurm.sbatch", *ROOT.glob("scripts/*.sh")])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NCCL_", "TORCH_", "PYTORCH_", "GLOO_", "MEGALM_"))}
    return {**env, **extra}


def _env_after(tmp_path: Path, script: str, **extra: str) -> dict[str, str]:
    """The environment a launch script hands to torchrun (a stub that dumps it)."""
    stub = tmp_path / "torchrun_stub.sh"
    stub.write_text(f'#!/usr/bin/env bash\nenv > "{tmp_path}/env.txt"\necho "$@" > "{tmp_path}/args.txt"\n')
    stub.chmod(0o755)
    env = _clean_env(TORCHRUN=str(stub), NPROC_PER_NODE="1", NNODES="2", MASTER_ADDR="node001", **extra)
    proc = subprocess.run(["bash", str(ROOT / "launch" / script), "configs/tiny.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("=", 1) for line in (tmp_path / "env.txt").read_text().splitlines() if "=" in line)


@pytest.mark.parametrize("script", ["single_node.sh", "multi_node.sh"])
def test_launch_sets_gpu_defaults(tmp_path: Path, script: str) -> None:
    env = _env_after(tmp_path, script)
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert int(env["TORCH_FR_BUFFER_SIZE"]) > 0 and env["TORCH_NCCL_TRACE_BUFFER_SIZE"] == env["TORCH_FR_BUFFER_SIZE"]
    assert env["TORCH_FR_DUMP_TEMP_FILE"] == f"{tmp_path / 'logs'}/nccl_trace_rank_"
    assert env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == env["TORCH_FR_DUMP_TEMP_FILE"]
    assert env["NCCL_DEBUG"] == "WARN"
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "900"  # time for the stop signal's checkpoint
    assert "NCCL_SOCKET_IFNAME" not in env and "NCCL_IB_HCA" not in env  # cluster-specific: no guess
    assert (tmp_path / "logs").is_dir()
    assert (tmp_path / "args.txt").read_text().split()[-3:] == ["megalm.cli", "train", "configs/tiny.yaml"]


def test_launch_keeps_what_the_user_set(tmp_path: Path) -> None:
    env = _env_after(
        tmp_path, "multi_node.sh", PYTORCH_CUDA_ALLOC_CONF="expandable_segments:False", NCCL_DEBUG="INFO",
        NCCL_SOCKET_IFNAME="ib0", NCCL_IB_HCA="mlx5_0,mlx5_1", TORCH_NCCL_TRACE_BUFFER_SIZE="500",
        MEGALM_LOG_DIR=str(tmp_path / "mylogs"),
    )
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:False"
    assert (env["NCCL_DEBUG"], env["NCCL_SOCKET_IFNAME"], env["NCCL_IB_HCA"]) == ("INFO", "ib0", "mlx5_0,mlx5_1")
    assert env["GLOO_SOCKET_IFNAME"] == "ib0"  # the control group's gloo uses the same interface
    assert env["TORCH_FR_BUFFER_SIZE"] == env["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "500"
    assert env["TORCH_FR_DUMP_TEMP_FILE"].startswith(str(tmp_path / "mylogs") + "/")


def _stub_slurm(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/usr/bin/env bash\nenv > "{tmp_path}/srun_env.txt"\necho "$@" > "{tmp_path}/srun_args.txt"\n')
    # Many nodes, as on a real cluster: the node list is longer than a pipe's buffer, so a reader
    # that stops after the first line would kill scontrol with SIGPIPE (and the job, under pipefail).
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\nfor i in $(seq -w 1 20000); do echo "node$i"; done\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    return bin_dir


def _sbatch(tmp_path: Path, **extra: str) -> subprocess.CompletedProcess:
    env = _clean_env(PATH=f"{_stub_slurm(tmp_path)}:{os.environ['PATH']}", SLURM_JOB_ID="42",
                     SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="node[001-002]", **extra)
    return subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), "configs/tiny.yaml", "train.steps=5"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)


def test_sbatch_activates_the_venv_and_creates_its_log_directory(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'export VIRTUAL_ENV="{venv}"\nexport PATH="{venv}/bin:$PATH"\n')
    proc = _sbatch(tmp_path, VENV=str(venv), NCCL_SOCKET_IFNAME="ib0", NCCL_IB_HCA="mlx5_0")
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "logs" / "megalm-42.out").read_text()
    assert "megalm: job 42, 2 nodes x 8 GPUs, rendezvous node00001:29500" in log
    env = dict(line.split("=", 1) for line in (tmp_path / "srun_env.txt").read_text().splitlines() if "=" in line)
    assert env["VIRTUAL_ENV"] == str(venv) and env["PATH"].startswith(f"{venv}/bin:")
    assert (env["NNODES"], env["MASTER_ADDR"], env["RDZV_ID"]) == ("2", "node00001", "42")
    assert (env["NCCL_SOCKET_IFNAME"], env["NCCL_IB_HCA"]) == ("ib0", "mlx5_0")
    assert env["MEGALM_LOG_DIR"] == "logs"
    args = (tmp_path / "srun_args.txt").read_text().split()
    assert args[-3:] == ["launch/multi_node.sh", "configs/tiny.yaml", "train.steps=5"]


def test_sbatch_without_an_environment_says_so(tmp_path: Path) -> None:
    proc = _sbatch(tmp_path, VENV=str(tmp_path / "missing"))
    assert proc.returncode == 2
    log = (tmp_path / "logs" / "megalm-42.out").read_text()
    assert f"no Python environment at VENV={tmp_path / 'missing'}" in log
    assert not (tmp_path / "srun_args.txt").exists()
