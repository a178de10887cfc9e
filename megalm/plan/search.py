"""Plans of one layout, layout search over a GPU count, and Yuan-style model-shape proposals."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from megalm.config import Config, ConfigError, ModelConfig
from megalm.plan.cluster import Cluster, Numerics, PlanError
from megalm.plan.flops import training_flops_per_token
from megalm.plan.layout import Layout, config_for_layout, config_time_options, full_param_count
from megalm.plan.model import GiB, StageMemory, StepTime, stage_memory, step_time


@dataclass
class Plan:
    """Memory per stage and time per step of one layout."""

    model: ModelConfig
    layout: Layout
    cluster: Cluster
    numerics: Numerics
    precision: str
    memory: list[StageMemory]
    time: StepTime
    kernels: str = "cuda"  # whose kernels the activation bytes describe (megalm.plan.model.KERNELS)

    @property
    def peak_memory(self) -> int:
        return max(stage.total for stage in self.memory)

    @property
    def fits(self) -> bool:
        return self.peak_memory <= self.cluster.hbm_gib * GiB

    def to_dict(self) -> dict:
        return {
            "cluster": self.cluster.name, "numerics": self.numerics.name, "precision": self.precision,
            "kernels": self.kernels, "parameters": full_param_count(self.model),
            "parameters_padded": full_param_count(self.model, padded_tp=self.layout.tp),
            "training_flops_per_token": training_flops_per_token(self.model),
            "layout": dataclasses.asdict(self.layout), "gpus": self.layout.gpus,
            "fits": self.fits, "peak_memory_gib": self.peak_memory / GiB,
            "memory": [dict(dataclasses.asdict(s), total=s.total) for s in self.memory],
            "time": {**{k: v for k, v in dataclasses.asdict(self.time).items() if k != "parts"},
                     "step_s": self.time.total, "shares": self.time.shares()},
        }


def make_plan(model: ModelConfig, layout: Layout, cluster: Cluster, numerics: Numerics, precision: str,
              stages: Optional[Sequence[int]] = None, kernels: str = "cuda") -> Plan:
    """Plan one layout; `stages` limits the memory model to some pipeline ranks (default: all); `kernels`:
    whose kernels the activation bytes describe (cuda, or cpu for a CPU run)."""
    layout.check(model)
    numerics = numerics.for_precision(precision)
    ranks = range(layout.pp) if stages is None else sorted(set(stages))
    memory = [stage_memory(model, layout, cluster, numerics, precision, r, kernels) for r in ranks]
    return Plan(model, layout, cluster, numerics, precision, memory, step_time(model, layout, cluster, numerics, precision),
                kernels)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


LONG_SEQUENCE = 16384  # --search considers context parallelism from this sequence length on
CP_SIZES = (1, 2, 4, 8, 16)


def context_parallel_sizes(model: ModelConfig, gpus: int) -> list[int]:
    """The cp sizes the search considers: 1, and from LONG_SEQUENCE tokens on every size of CP_SIZES that
    divides the GPUs and splits the sequence into 2 x cp equal chunks (config.validate's rule)."""
    if model.seq_length < LONG_SEQUENCE:
        return [1]
    return [cp for cp in CP_SIZES if gpus % cp == 0 and model.seq_length % (2 * cp) == 0]


def candidate_layouts(model: ModelConfig, cluster: Cluster, gpus: int, global_batch_size: int,
                      micro_batches: Sequence[int] = (1, 2, 4, 8),
                      recompute: Sequence[str] = ("none", "selective", "full"),
                      cp_sizes: Optional[Sequence[int]] = None) -> Iterator[Layout]:
    """Every layout megalm could run: tp within a node, context parallelism for long sequences (cp_sizes None:
    `context_parallel_sizes`), uniform pipeline stages, whole micro-batches."""
    for tp, cp in ((tp, cp) for cp in (cp_sizes or context_parallel_sizes(model, gpus)) for tp in _divisors(gpus)):
        if tp > cluster.gpus_per_node or model.num_heads % tp or model.ffn_size() % tp or gpus % (tp * cp):
            continue
        if model.kv_heads() % tp and tp % model.kv_heads():  # kv heads split, or each replicated, over tp
            continue
        if model.seq_length % (2 * cp):
            continue
        for pp in _divisors(gpus // (tp * cp)):
            if model.num_layers % pp:
                continue
            dp = gpus // (tp * cp * pp)
            for mb in micro_batches:
                if global_batch_size % (mb * dp):
                    continue
                m = global_batch_size // (mb * dp)
                schedules = [("1f1b", 1)]
                if pp > 1 and m % pp == 0:
                    schedules += [("interleaved", v) for v in (2, 4) if model.num_layers % (pp * v) == 0]
                for schedule, v in schedules:
                    for rc in recompute:
                        for zero in (0, 1):
                            zeros = (0, 1) if dp * cp > 1 else (0,)
                            if zero not in zeros:
                                continue
                            local = model.seq_length // cp
                            for sp in ((False, True) if tp > 1 and local % tp == 0 else (False,)):
                                yield Layout(tp, pp, dp, mb, global_batch_size, schedule, v, rc, zero, sp, cp=cp)


def search(model: ModelConfig, cluster: Cluster, gpus: int, global_batch_size: int, numerics: Numerics,
           precision: str, top: int = 5, find_smallest: bool = True, config: Optional[Config] = None,
           **candidates) -> list[Plan]:
    """The `top` layouts that fit in memory, fastest first; PlanError when none divides or none fits.

    With `config`, only layouts megalm's own `config.validate` accepts for that config (and its
    bucket size) are planned: each plan's layout is then runnable by pasting `layout_overrides`."""
    plans, tried, rejected = [], 0, []
    for layout in candidate_layouts(model, cluster, gpus, global_batch_size, **candidates):
        tried += 1
        if config is not None:
            layout = dataclasses.replace(layout, bucket_size_mb=config.parallel.bucket_size_mb,
                                         **config_time_options(config))
            try:
                config_for_layout(config, layout)
            except ConfigError as error:
                rejected.append((layout, error))
                continue
        plan = make_plan(model, layout, cluster, numerics, precision, stages=(0, layout.pp - 1))
        if plan.fits:
            plans.append(plan)
    if tried and len(rejected) == tried:
        layout, error = rejected[0]
        raise PlanError(f"megalm's config validation rejects every one of the {tried} layouts of {gpus} GPUs, "
                        f"e.g. {layout.short()}: {error}")
    if not tried:
        raise PlanError(
            f"no layout divides {gpus} GPUs for this model (heads {model.num_heads}, layers {model.num_layers}, "
            f"global batch {global_batch_size}): tp must divide the heads within a {cluster.gpus_per_node}-GPU node, "
            f"pp the layers, and dp the global batch; nearby GPU counts that work: "
            f"{', '.join(map(str, _working_counts(model, cluster, gpus, global_batch_size)))}"
        )
    if not plans:
        smallest = smallest_fitting_gpus(model, cluster, gpus, global_batch_size, numerics, precision) if find_smallest else None
        where = f"the smallest GPU count at which it fits is {smallest}" if smallest else "it fits at no GPU count up to 65536"
        raise PlanError(
            f"{model.num_layers} layers x hidden {model.hidden_size} does not fit in {cluster.hbm_gib:g} GiB per GPU at "
            f"any of the {tried} layouts of {gpus} GPUs ({numerics.name} numerics, {precision}); {where}"
        )
    plans.sort(key=lambda p: -p.time.tokens_per_s)
    return plans[:top]


def _working_counts(model: ModelConfig, cluster: Cluster, gpus: int, global_batch_size: int) -> list[int]:
    counts = set()
    for tp in (d for d in _divisors(cluster.gpus_per_node) if model.num_heads % d == 0):
        for pp in _divisors(model.num_layers):
            for dp in _divisors(global_batch_size):
                counts.update(tp * pp * dp * cp for cp in _cp_factors(model))
    return sorted(sorted(counts, key=lambda n: abs(n - gpus))[:4])


def _cp_factors(model: ModelConfig) -> list[int]:
    """cp sizes a GPU count may include for this model (`context_parallel_sizes` without the GPU count)."""
    if model.seq_length < LONG_SEQUENCE:
        return [1]
    return [cp for cp in CP_SIZES if model.seq_length % (2 * cp) == 0]


def smallest_fitting_gpus(model: ModelConfig, cluster: Cluster, gpus: int, global_batch_size: int,
                          numerics: Numerics, precision: str, limit: int = 65536) -> Optional[int]:
    """The fewest GPUs (above `gpus`) with a layout that fits, or None up to `limit`."""
    counts = set()
    for tp in (d for d in _divisors(cluster.gpus_per_node) if model.num_heads % d == 0):
        for pp in _divisors(model.num_layers):
            for dp in _divisors(global_batch_size):
                counts.update(n for n in (tp * pp * dp * cp for cp in _cp_factors(model)) if gpus < n <= limit)
    for n in sorted(counts):
        for layout in candidate_layouts(model, cluster, n, global_batch_size, micro_batches=(1,), recompute=("full",)):
            if make_plan(model, layout, cluster, numerics, precision, stages=(0, layout.pp - 1)).fits:
                return n
    return None


# ---- Yuan-style shape proposals -----------------------------------------------------------------


def scaled_shape(base: ModelConfig, num_layers: int, hidden: int, head_dim: int) -> ModelConfig:
    """`base`'s spec at another depth and width: heads of head_dim, the MLP at base's ffn / hidden ratio
    (rounded to 256 when base sets ffn_hidden_size), kv heads kept where they divide the heads."""
    heads = hidden // head_dim
    ffn = None
    if base.ffn_hidden_size is not None:
        ffn = max(256, round(base.ffn_size() / base.hidden_size * hidden / 256) * 256)
    kv = base.num_kv_heads if base.num_kv_heads is not None and heads % base.num_kv_heads == 0 else None
    return dataclasses.replace(base, num_layers=num_layers, hidden_size=hidden, num_heads=heads, ffn_hidden_size=ffn,
                               num_kv_heads=kv, head_dim=None)


def propose_shapes(target_params: float, cluster: Cluster, gpus: int, global_batch_size: int, numerics: Numerics,
                   precision: str, base: ModelConfig, top: int = 5, tolerance: float = 0.1,
                   head_dim: int = 128) -> list[tuple[ModelConfig, Plan]]:
    """Shapes of `base`'s spec (norm, MLP, kv heads, biases, tied or not) within `tolerance` of the target
    parameter count, each with its fastest layout, fastest first."""
    results = []
    for hidden in range(8 * head_dim, 65 * 1024, 1024):
        one, two = (full_param_count(scaled_shape(base, n, hidden, head_dim)) for n in (1, 2))
        per_layer, fixed = two - one, 2 * one - two
        layers = round((target_params - fixed) / per_layer)
        for num_layers in {layers - 1, layers, layers + 1}:
            if num_layers < 2:
                continue
            shape = scaled_shape(base, num_layers, hidden, head_dim)
            if abs(full_param_count(shape) / target_params - 1) > tolerance:
                continue
            # under fused attention selective recompute keeps nearly what none keeps: proposals plan full only
            recompute = ("full",) if numerics.flash_attention else ("selective", "full")
            try:
                best = search(shape, cluster, gpus, global_batch_size, numerics, precision, top=1, find_smallest=False,
                              micro_batches=(1, 2), recompute=recompute)[0]
            except PlanError:
                continue
            results.append((shape, best))
    if not results:
        raise PlanError(f"no shape of about {target_params:.3g} parameters has a layout that fits on {gpus} GPUs")
    results.sort(key=lambda r: -r[1].time.tokens_per_s)
    return results[:top]
