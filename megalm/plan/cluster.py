"""Cluster descriptions (configs/clusters/*.yaml) and the software profiles ("numerics") of a run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

import yaml

CLUSTER_DIR = Path(__file__).resolve().parents[2] / "configs" / "clusters"


class PlanError(ValueError):
    """A planning problem (bad cluster file, impossible layout, model that never fits), with the fix."""


@dataclass(frozen=True)
class Cluster:
    """One GPU type and its interconnect; every bandwidth is per GPU and per direction."""

    name: str
    gpu: str
    gpus_per_node: int
    peak_tflops: float  # dense bf16/fp16 tensor-core peak
    matmul_efficiency: float  # achievable fraction of peak on large GEMMs
    hbm_gib: float
    hbm_bandwidth_gbs: float
    memory_efficiency: float  # achievable fraction of HBM bandwidth for element-wise kernels
    intra_node_bandwidth_gbs: float
    intra_node_latency_us: float
    inter_node_bandwidth_gbs: float
    inter_node_latency_us: float
    bandwidth_efficiency: float  # achievable fraction of link bandwidth for large collectives
    reserved_gib: float  # CUDA context, communication workspaces, fragmentation
    # optional (0: not modelled, the behaviour of cluster files that predate them; megalm.plan.efficiency):
    kernel_launch_us: float = 0.0  # host time per kernel launched (Python, autograd, dispatcher, CUDA launch)
    gemm_half_dim: float = 0.0  # a GEMM whose narrowest dimension is this runs at half of matmul_efficiency
    fp8_peak_tflops: float = 0.0  # dense FP8 (e4m3) tensor-core peak; 0: no FP8 tensor cores

    OPTIONAL: ClassVar[tuple[str, ...]] = ("kernel_launch_us", "gemm_half_dim", "fp8_peak_tflops")
    FRACTIONS: ClassVar[tuple[str, ...]] = ("matmul_efficiency", "memory_efficiency", "bandwidth_efficiency")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("float", "int", float, int):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise PlanError(f"cluster {self.name!r}: {f.name} must be a number, got {value!r}")
                if value < 0 or (value == 0 and not f.name.endswith("latency_us") and f.name != "reserved_gib"
                                  and f.name not in self.OPTIONAL):
                    raise PlanError(f"cluster {self.name!r}: {f.name} must be positive, got {value!r}")
        if not isinstance(self.gpus_per_node, int):
            raise PlanError(f"cluster {self.name!r}: gpus_per_node must be an integer, got {self.gpus_per_node!r}")
        for name in self.FRACTIONS:
            if not 0 < getattr(self, name) <= 1:
                raise PlanError(f"cluster {self.name!r}: {name} is a fraction in (0, 1], got {getattr(self, name)!r}")

    def link(self, group_span: int) -> tuple[float, float]:
        """(bytes/s, latency s) of a group whose ranks span `group_span` consecutive ranks."""
        if group_span <= self.gpus_per_node:
            return self.intra_node_bandwidth_gbs * 1e9 * self.bandwidth_efficiency, self.intra_node_latency_us * 1e-6
        return self.inter_node_bandwidth_gbs * 1e9 * self.bandwidth_efficiency, self.inter_node_latency_us * 1e-6


def cluster_names() -> list[str]:
    return sorted(p.stem for p in CLUSTER_DIR.glob("*.yaml"))


def cluster_from_dict(data: object, source: str) -> Cluster:
    """Build a Cluster strictly: missing and unknown fields are errors that list them."""
    if not isinstance(data, dict):
        raise PlanError(f"cluster file {source} must be a mapping of fields, got {type(data).__name__}")
    names = [f.name for f in fields(Cluster)]
    missing = [n for n in names if n not in data and n not in Cluster.OPTIONAL]
    unknown = [k for k in data if k not in names]
    if missing:
        raise PlanError(f"cluster file {source} is missing field(s) {', '.join(missing)}; every cluster needs: "
                        f"{', '.join(n for n in names if n not in Cluster.OPTIONAL)}")
    if unknown:
        raise PlanError(f"cluster file {source} has unknown field(s) {', '.join(map(str, unknown))}; valid fields: {', '.join(names)}")
    return Cluster(**data)


def load_cluster(name_or_path: str | Path) -> Cluster:
    """A cluster by name (configs/clusters/NAME.yaml) or by path to a YAML file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CLUSTER_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise PlanError(f"unknown cluster {str(name_or_path)!r}: use one of {', '.join(cluster_names())} or a path to a YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise PlanError(f"cannot parse cluster file {path}: {error}") from None
    return cluster_from_dict(data, str(path))


@dataclass(frozen=True)
class Numerics:
    """What a run keeps per parameter and how its kernels behave: megalm's engine or Megatron-style mixed precision."""

    name: str
    param_bytes: int  # the weights the forward pass reads
    grad_bytes: int  # the gradient buffer (and the data-parallel all-reduce)
    master_bytes: int  # fp32 master copy kept by the optimizer (0: the weights are the masters)
    moment_bytes: int  # Adam's two moments
    zero1_gather_buffer: bool  # ZeRO-1 gathers into a buffer apart from the parameters (megalm: no, in place)
    flash_attention: bool  # fused attention: no [s, s] scores stored or read from HBM
    overlap_grad_sync: bool  # data-parallel reduction overlapped with the last backward
    description: str
    # ZeRO-1's parameter all-gather runs during the next step's forward (megalm: launched per bucket
    # after the optimizer step, waited for by each block's forward pre-hook) rather than after the step
    overlap_param_gather: bool = False

    def replace(self, **changes) -> "Numerics":
        return dataclasses.replace(self, **changes)

    def for_precision(self, precision: str) -> "Numerics":
        """megalm keeps parameters in the run's precision (fp32 masters only when that is bf16/fp16); others are fixed."""
        if self.name != "megalm":
            return self
        if precision not in ("fp32", "bf16", "fp16"):
            raise PlanError(f"unknown precision {precision!r}: use fp32, bf16 or fp16")
        low = precision != "fp32"
        return self.replace(param_bytes=2 if low else 4, master_bytes=4 if low else 0,
                            description=f"megalm's engine: {precision} params + fp32 main grads + "
                                        f"{'fp32 master + ' if low else ''}fp32 Adam, SDPA attention")


NUMERICS = {
    # megalm as implemented (megalm.parallel.optimizer): parameters in the run's precision, fp32 main-grad
    # buckets, fp32 Adam moments, fp32 masters under bf16/fp16 (`for_precision` sets param and master
    # bytes; the values here are fp32's). ZeRO-1 shards master and moments and gathers the parameters in place.
    "megalm": Numerics("megalm", 4, 4, 0, 8, False, True, True,
                       "megalm's engine: fp32 params + fp32 main grads + fp32 Adam, SDPA attention",
                       overlap_param_gather=True),
    # Megatron-LM (2021) / Yuan 1.0 mixed precision: fp16 params and grads, fp32 master + Adam moments,
    # materialised attention scores, gradient all-reduce after the backward pass.
    "megatron": Numerics("megatron", 2, 2, 4, 8, False, False, False,
                         "Megatron-style mixed precision: fp16 params + fp16 grads + fp32 master + fp32 Adam"),
}


def get_numerics(name: str) -> Numerics:
    if name not in NUMERICS:
        raise PlanError(f"unknown numerics {name!r}: use one of {', '.join(NUMERICS)}")
    return NUMERICS[name]
