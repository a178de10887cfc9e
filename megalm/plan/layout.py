"""A candidate layout and the exact per-rank parameter geometry megalm builds for it.

The parameter list below mirrors `megalm.model.gpt.GPTModel` (registration order and shapes) and
the bucket list mirrors `megalm.parallel.data.GradientSync`, so parameter, gradient and optimizer
bytes are exactly what megalm allocates (tests/test_plan.py checks both against the real code).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from megalm.config import Config, ModelConfig, grad_accum_steps, validate
from megalm.parallel.schedules import check_schedule_args, partition_layers, ScheduleError
from megalm.plan.cluster import PlanError

ACTIVATION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # bytes per activation element by precision

RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Layout:
    """Everything that decides memory and time besides the model: parallel sizes, batch, schedule."""

    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    global_batch_size: int
    schedule: str = "1f1b"
    virtual_stages: int = 1
    recompute: str = "none"
    zero_stage: int = 0
    sequence_parallel: bool = False
    pipeline_layers: Optional[tuple[int, ...]] = None
    bucket_size_mb: float = 25.0
    recompute_layers: Optional[int] = None  # full recompute: the first N layers of each chunk; None: all
    cp: int = 1  # context parallel: each sample's sequence split over cp ranks (megalm.parallel.context)
    fp8: str = "none"  # train.fp8: the tp column/row linears' GEMMs in float8 (none | tensorwise | rowwise)
    tp_comm_overlap: bool = False  # parallel.tp_comm_overlap: sp's gathers/reduce-scatters overlapped in chunks
    tp_overlap_chunks: int = 4  # parallel.tp_comm_overlap_chunks: the pieces each of those collectives is cut into

    @property
    def overlaps_tp_comm(self) -> bool:
        """Whether tp_comm_overlap applies: it needs tp > 1 and sequence parallel (a layout without either runs plain)."""
        return self.tp_comm_overlap and self.sequence_parallel and self.tp > 1

    @property
    def gpus(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    def local_tokens(self, seq_length: int) -> int:
        """Tokens of each sample one rank holds: seq_length / cp (its two load-balanced chunks)."""
        return seq_length // self.cp

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    def short(self) -> str:
        cp = f" cp{self.cp}" if self.cp > 1 else ""
        parts = [f"tp{self.tp}{cp} pp{self.pp} dp{self.dp} mb{self.micro_batch_size}"]
        if self.pp > 1:
            parts.append(self.schedule + (f" v{self.virtual_stages}" if self.virtual_stages > 1 else ""))
        parts.append(f"recompute {self.recompute}" + (
            f" (first {self.recompute_layers} layers per chunk)" if self.recompute_layers else ""))
        if self.sequence_parallel:
            parts.append("sp")
        if self.zero_stage:
            parts.append(f"zero{self.zero_stage}")
        if self.overlaps_tp_comm:
            parts.append(f"tp overlap x{self.tp_overlap_chunks}")
        if self.fp8 != "none":
            parts.append(f"fp8 {self.fp8}")
        return ", ".join(parts)

    def check(self, model: ModelConfig) -> None:
        """Raise PlanError if megalm could not run this layout (same rules as config.validate)."""
        if self.recompute not in RECOMPUTE:
            raise PlanError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {self.recompute!r}")
        if self.recompute_layers is not None and (self.recompute != "full" or self.recompute_layers < 1):
            raise PlanError(f"recompute_layers={self.recompute_layers} needs full recompute and a positive count")
        if model.num_heads % self.tp or model.ffn_size() % self.tp:
            raise PlanError(f"tp={self.tp} does not divide num_heads={model.num_heads} / ffn {model.ffn_size()}")
        local_kv_heads(model, self.tp)  # kv heads split over tp, or each replicated on tp / kv_heads ranks
        if self.cp < 1 or model.seq_length % (2 * self.cp):
            raise PlanError(f"cp={self.cp} needs seq_length {model.seq_length} divisible by 2 x cp = {2 * self.cp} "
                            f"(each sequence splits into 2 x cp equal chunks)")
        if self.sequence_parallel and self.local_tokens(model.seq_length) % self.tp:
            raise PlanError(f"sequence parallel needs the {self.local_tokens(model.seq_length)} tokens per rank "
                            f"(seq_length {model.seq_length} / cp {self.cp}) divisible by tp={self.tp}")
        if self.global_batch_size % (self.micro_batch_size * self.dp):
            raise PlanError(
                f"global batch {self.global_batch_size} is not divisible by micro batch x dp = "
                f"{self.micro_batch_size} x {self.dp}"
            )
        try:
            partition_layers(model.num_layers, self.pp * self.virtual_stages,
                             list(self.pipeline_layers) if self.pipeline_layers else None)
            check_schedule_args(self.schedule, self.pp, self.num_microbatches, self.virtual_stages)
        except ScheduleError as error:
            raise PlanError(str(error)) from None


def layout_from_config(config: Config, gpus: Optional[int] = None, recompute: Optional[str] = None) -> Layout:
    """The layout a config runs with on `gpus` GPUs (dp derived as in config.validate).

    recompute None: the config's parallel.recompute (and recompute_layers); a value overrides it."""
    parallel, train = config.parallel, config.train
    recompute_layers = parallel.recompute_layers
    if recompute is None:
        recompute = parallel.recompute
    elif recompute != parallel.recompute:
        recompute_layers = None  # the config's count belongs to its own recompute mode
    if gpus is None:
        if parallel.dp is None:
            raise PlanError("the config has parallel.dp null: give --gpus N")
        gpus = parallel.tp * parallel.cp * parallel.pp * parallel.dp
    model_parallel = parallel.tp * parallel.cp * parallel.pp
    if gpus % model_parallel:
        sizes = (f"tp x pp = {parallel.tp} x {parallel.pp}" if parallel.cp == 1
                 else f"tp x cp x pp = {parallel.tp} x {parallel.cp} x {parallel.pp}")
        raise PlanError(
            f"{gpus} GPUs are not divisible by {sizes}: use a multiple of "
            f"{model_parallel} or --search for a layout that fits {gpus} GPUs"
        )
    dp = gpus // model_parallel
    try:
        grad_accum_steps(config, dp)
    except Exception as error:  # ConfigError: name the GPU count that caused it
        raise PlanError(f"{error} (at {gpus} GPUs, dp={dp})") from None
    return Layout(
        parallel.tp, parallel.pp, dp, train.micro_batch_size, train.global_batch_size, parallel.schedule,
        parallel.virtual_stages, recompute, parallel.zero_stage, parallel.sequence_parallel,
        tuple(parallel.pipeline_layers) if parallel.pipeline_layers else None, parallel.bucket_size_mb,
        recompute_layers, parallel.cp, **config_time_options(config),
    )


def config_time_options(config: Config) -> dict:
    """The config's keys that change the step time but not the layout search: train.fp8 and
    parallel.tp_comm_overlap (read with defaults, so a config from before them plans as before)."""
    parallel = config.parallel
    return {"fp8": getattr(config.train, "fp8", "none") or "none", "tp_comm_overlap": parallel.tp_comm_overlap,
            "tp_overlap_chunks": parallel.tp_comm_overlap_chunks or parallel.DEFAULT_TP_COMM_OVERLAP_CHUNKS}


def layout_overrides(layout: Layout, config: Config) -> list[str]:
    """`section.field=value` overrides that make `config` run `layout` (megalm train/plan CONFIG OVERRIDES).

    Every field a layout decides is written out; fields the layout leaves at their default are reset
    only where the config sets them (uneven pipeline_layers, recompute_layers, a fixed grad_accum_steps)."""
    def text(value) -> str:
        return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    parallel, train = config.parallel, config.train
    values = {
        "parallel.tp": layout.tp, **({"parallel.cp": layout.cp} if layout.cp > 1 or parallel.cp > 1 else {}),
        "parallel.pp": layout.pp, "parallel.dp": layout.dp,
        "parallel.sequence_parallel": layout.sequence_parallel, "parallel.schedule": layout.schedule,
        "parallel.virtual_stages": layout.virtual_stages, "parallel.zero_stage": layout.zero_stage,
        "parallel.recompute": layout.recompute,
    }
    pipeline_layers = list(layout.pipeline_layers) if layout.pipeline_layers else None
    if layout.recompute_layers is not None or parallel.recompute_layers is not None:
        values["parallel.recompute_layers"] = layout.recompute_layers
    if pipeline_layers is not None or parallel.pipeline_layers is not None:
        values["parallel.pipeline_layers"] = "[" + ", ".join(map(str, pipeline_layers)) + "]" if pipeline_layers else None
    if layout.bucket_size_mb != parallel.bucket_size_mb:
        values["parallel.bucket_size_mb"] = layout.bucket_size_mb
    if parallel.tp_comm_overlap:  # off where the layout cannot overlap (tp 1 or no sequence parallel)
        values["parallel.tp_comm_overlap"] = layout.overlaps_tp_comm
        if not layout.overlaps_tp_comm and parallel.tp_comm_overlap_chunks is not None:
            values["parallel.tp_comm_overlap_chunks"] = None
    values["train.micro_batch_size"] = layout.micro_batch_size
    if layout.global_batch_size != train.global_batch_size:
        values["train.global_batch_size"] = layout.global_batch_size
    if train.grad_accum_steps is not None:
        values["train.grad_accum_steps"] = layout.num_microbatches
    return [f"{key}={text(value)}" for key, value in values.items()]


def overrides_yaml(overrides: list[str]) -> str:
    """The same overrides as a YAML snippet to merge into an experiment file."""
    sections: dict[str, list[str]] = {}
    for override in overrides:
        key, _, value = override.partition("=")
        section, _, name = key.partition(".")
        sections.setdefault(section, []).append(f"  {name}: {value}")
    return "\n".join(f"{section}:\n" + "\n".join(lines) for section, lines in sections.items())


def config_for_layout(config: Config, layout: Layout) -> Config:
    """`config` running `layout`, checked by megalm's own `config.validate` (ConfigError if megalm cannot run it)."""
    parallel = dataclasses.replace(
        config.parallel, tp=layout.tp, cp=layout.cp, pp=layout.pp, dp=layout.dp, sequence_parallel=layout.sequence_parallel,
        schedule=layout.schedule, virtual_stages=layout.virtual_stages, zero_stage=layout.zero_stage,
        recompute=layout.recompute, recompute_layers=layout.recompute_layers,
        pipeline_layers=list(layout.pipeline_layers) if layout.pipeline_layers else None,
        bucket_size_mb=layout.bucket_size_mb, tp_comm_overlap=layout.overlaps_tp_comm,
        tp_comm_overlap_chunks=config.parallel.tp_comm_overlap_chunks if layout.overlaps_tp_comm else None,
    )
    train = dataclasses.replace(
        config.train, micro_batch_size=layout.micro_batch_size, global_batch_size=layout.global_batch_size,
        grad_accum_steps=None if config.train.grad_accum_steps is None else layout.num_microbatches,
    )
    candidate = dataclasses.replace(config, parallel=parallel, train=train)
    validate(candidate, layout.gpus)
    return candidate


def recomputed_layers(layout: Layout, chunk_layers: int) -> int:
    """How many of a chunk's layers full recompute reruns (megalm.model.gpt.GPTModel.recomputed_layers)."""
    if layout.recompute != "full":
        return 0
    return chunk_layers if layout.recompute_layers is None else min(layout.recompute_layers, chunk_layers)


# ---- exact parameter geometry --------------------------------------------------------------------


def local_kv_heads(model: ModelConfig, tp: int) -> int:
    """Key/value heads on one tp rank: kv_heads / tp, or 1 when tp > kv_heads (each kv head is then
    replicated on tp / kv_heads consecutive ranks)."""
    kv = model.kv_heads()
    if tp > kv:
        if tp % kv:
            raise PlanError(f"tp={tp} is not a multiple of num_kv_heads={kv}: each kv head must be replicated "
                            f"on a whole number of tp ranks")
        return 1
    if kv % tp:
        raise PlanError(f"tp={tp} does not divide num_kv_heads={kv}")
    return kv // tp


def projection_widths(model: ModelConfig, tp: int) -> tuple[int, int]:
    """(query width, key + value width) of one tp rank's attention projections: H d / tp, 2 K_local d."""
    d = model.head_size()
    return model.num_heads * d // tp, 2 * local_kv_heads(model, tp) * d


def layer_gemms(model: ModelConfig, tp: int, tokens: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of each weight GEMM of one layer's forward on one tp rank (M: the tokens it multiplies; under
    sequence parallel the all-gathered ones): attention input (fused QKV, or query and key_value), the output
    projection, the MLP's input matrices (fc1; gate and up) and its output matrix."""
    h, f = model.hidden_size, model.ffn_size() // tp
    query, kv = projection_widths(model, tp)
    attention = [(tokens, h, query), (tokens, h, kv)] if model.grouped_attention() else [(tokens, h, query + kv)]
    mlp_in = [(tokens, h, f)] * (2 if model.mlp == "swiglu" else 1)
    return attention + [(tokens, query, h)] + mlp_in + [(tokens, f, h)]


def layer_param_sizes(model: ModelConfig, tp: int) -> list[int]:
    """Per-rank sizes of one transformer layer's parameters, in registration order, from the spec:
    norms (weight, + bias for layernorm), attention (fused qkv when every head has its own kv, else query
    and key_value; biases when has_qkv_bias), proj (bias when bias), MLP (gelu: fc1, fc2; swiglu: gate,
    up, down; biases when bias)."""
    h, f = model.hidden_size, model.ffn_size()
    query, kv = projection_widths(model, tp)
    qkv_bias, bias = model.has_qkv_bias(), model.bias
    norm = [h, h] if model.norm == "layernorm" else [h]
    if model.grouped_attention():
        attention = [query * h] + ([query] if qkv_bias else []) + [kv * h] + ([kv] if qkv_bias else [])
    else:
        attention = [(query + kv) * h] + ([query + kv] if qkv_bias else [])
    attention += [h * query] + ([h] if bias else [])
    column = [f * h // tp] + ([f // tp] if bias else [])
    mlp = column * (2 if model.mlp == "swiglu" else 1) + [h * f // tp] + ([h] if bias else [])
    return norm + attention + norm + mlp


def full_param_count(model: ModelConfig, padded_tp: Optional[int] = None) -> int:
    """Parameters of the whole model, each counted once (a replicated kv head once): with padded_tp None
    the vocabulary as given (what transformers' num_parameters() counts), else padded as megalm builds it
    at that tp."""
    h = model.hidden_size
    vocab = model.vocab_size if padded_tp is None else model.padded_vocab_size(padded_tp)
    embeddings = vocab * h * (1 if model.tie_embeddings else 2)
    if model.position_embedding == "learned":
        embeddings += model.max_positions() * h
    final_norm = h * (2 if model.norm == "layernorm" else 1)
    return embeddings + model.num_layers * sum(layer_param_sizes(model, 1)) + final_norm


def stage_chunks(model: ModelConfig, layout: Layout, pp_rank: int) -> list[tuple[range, bool, bool]]:
    """(layers, first, last) of each model chunk of one pipeline rank (chunk c is virtual stage c*pp + rank)."""
    total = layout.pp * layout.virtual_stages
    ranges = partition_layers(model.num_layers, total, list(layout.pipeline_layers) if layout.pipeline_layers else None)
    stages = [c * layout.pp + pp_rank for c in range(layout.virtual_stages)]
    return [(ranges[s], s == 0, s == total - 1) for s in stages]


def chunk_param_sizes(model: ModelConfig, layout: Layout, layers: range, first: bool, last: bool) -> list[tuple[int, bool]]:
    """(numel, is cross-stage tied embedding) of one chunk's parameters, in registration order."""
    tp = layout.tp
    local_vocab = model.padded_vocab_size(tp) // tp
    sizes: list[tuple[int, bool]] = []
    tied = layout.pp > 1 and model.tie_embeddings  # the last stage's copy of the tied embedding
    if first:
        if model.position_embedding == "learned":
            sizes.append((model.max_positions() * model.hidden_size, False))
        sizes.append((local_vocab * model.hidden_size, tied))
    if last and tied:
        sizes.append((local_vocab * model.hidden_size, True))
    per_layer = [(n, False) for n in layer_param_sizes(model, tp)]
    for _ in layers:
        sizes.extend(per_layer)
    if last:
        sizes.extend([(model.hidden_size, False)] * (2 if model.norm == "layernorm" else 1))
        if not model.tie_embeddings:  # untied output layer: vocab-parallel, the last stage's own
            sizes.append((local_vocab * model.hidden_size, False))
    return sizes


def rank_param_count(model: ModelConfig, layout: Layout, pp_rank: int) -> int:
    """Parameters held by one rank of pipeline stage pp_rank (equal on every tp and dp rank)."""
    return sum(n for chunk in stage_chunks(model, layout, pp_rank) for n, _ in chunk_param_sizes(model, layout, *chunk))


def bucket_sizes(model: ModelConfig, layout: Layout, pp_rank: int) -> list[int]:
    """Unpadded element counts of GradientSync's buckets on this stage (tied embedding bucket last)."""
    ordered: list[tuple[int, bool]] = []
    for chunk in reversed(stage_chunks(model, layout, pp_rank)):
        ordered.extend(reversed(chunk_param_sizes(model, layout, *chunk)))
    limit = int(layout.bucket_size_mb * 2**20)
    buckets, current, size = [], 0, 0
    for numel, tied in ordered:
        if tied:
            continue
        current += numel
        size += numel * 4
        if size >= limit:
            buckets.append(current)
            current, size = 0, 0
    if current:
        buckets.append(current)
    tied_total = sum(numel for numel, tied in ordered if tied)
    if tied_total:
        buckets.append(tied_total)
    return buckets


def padded(numel: int, dp: int) -> int:
    return -(-numel // dp) * dp


def zero1_shard_params(buckets: list[int], dp: int, dp_rank: int) -> int:
    """Real (unpadded) parameter elements of dp rank `dp_rank`'s ZeRO-1 shard of every bucket."""
    total = 0
    for numel in buckets:
        shard = padded(numel, dp) // dp
        lo, hi = dp_rank * shard, (dp_rank + 1) * shard
        total += max(0, min(hi, numel) - lo)
    return total
