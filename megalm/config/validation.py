"""Cross-field validation: the checks that need several sections or the world size (`validate`).

Each section checks its own fields when built; `validate(config, world_size)` adds the checks between
them (heads divisible by tp, layers by pipeline stages, global batch = micro batch x dp x
accumulation) and returns the `Topology` the run will use.
"""

from __future__ import annotations

from typing import Optional

from megalm.config.fields import ConfigError
from megalm.config.sections import _SECTIONS, Config, ModelConfig, _heads_message
from megalm.parallel.schedules import ScheduleError, check_schedule_args, partition_layers
from megalm.topology import Topology, TopologyError


_MAX_TENSOR_BYTES = 2**63 - 1  # torch's sizes and strides are int64: a larger tensor cannot even be described


def _check_tensor_sizes(model: ModelConfig, tp: int) -> None:
    """Every full weight must fit torch's 64-bit byte count in fp32; a hidden size of 2^62 would
    otherwise end a dry run in a "storage size calculation overflowed" traceback."""
    hidden = model.hidden_size
    shapes = {
        "the word embedding (padded model.vocab_size x model.hidden_size)": (model.padded_vocab_size(tp), hidden),
        "the position table (model.max_position_embeddings x model.hidden_size)": (model.max_positions(), hidden),
        "the attention QKV weight ((num_heads + 2 x num_kv_heads) x head_dim x model.hidden_size)":
            ((model.num_heads + 2 * model.kv_heads()) * (model.head_dim or hidden // model.num_heads), hidden),
        "the MLP weight (model.ffn_hidden_size x model.hidden_size)": (model.ffn_size(), hidden),
    }
    for name, (rows, cols) in shapes.items():
        if rows * cols * 4 > _MAX_TENSOR_BYTES:
            raise ConfigError(
                f"model too large to describe: {name} would be {rows:,} x {cols:,} = {rows * cols:.3g} elements, "
                f"{rows * cols * 4:.3g} bytes in fp32, beyond torch's 2^63-byte limit (model.hidden_size={hidden}, "
                f"model.vocab_size={model.vocab_size}); use sizes of a real model (Yuan 245B: hidden 16384)"
            )


def _check_model(config: Config) -> None:
    model, parallel = config.model, config.parallel
    tp, pp = parallel.tp, parallel.pp
    if model.head_dim is None and model.hidden_size % model.num_heads != 0:
        raise ConfigError(_heads_message(model))
    _check_tensor_sizes(model, tp)
    if model.num_heads % tp != 0:
        raise ConfigError(
            f"model.num_heads={model.num_heads} is not divisible by parallel.tp={tp}: each "
            f"tensor-parallel rank needs whole heads; use a tp dividing {model.num_heads}"
        )
    kv_heads = model.kv_heads()
    if model.grouped_attention() and kv_heads % tp != 0 and tp % kv_heads != 0:
        raise ConfigError(
            f"model.num_kv_heads={kv_heads} and parallel.tp={tp}: tensor-parallel ranks must split the key/value "
            f"heads evenly (tp dividing num_kv_heads) or hold copies of them (num_kv_heads dividing tp); "
            f"use a tp that divides or is a multiple of {kv_heads}"
        )
    if model.grouped_attention() and tp > kv_heads and config.train.engine == "deepspeed":
        raise ConfigError(
            f"parallel.tp={tp} > model.num_kv_heads={kv_heads} replicates key/value heads over tp ranks, which "
            f"DeepSpeed's gradient norm does not know (it would count each copy): use train.engine=megalm, "
            f"or tp <= {kv_heads}"
        )
    if model.ffn_size() % tp != 0:
        raise ConfigError(
            f"the MLP hidden size {model.ffn_size()} (model.ffn_hidden_size) is not divisible by "
            f"parallel.tp={tp}: set model.ffn_hidden_size to a multiple of {tp}"
        )
    stages = pp * parallel.virtual_stages
    if model.num_layers < stages:
        raise ConfigError(
            f"parallel.pp={pp} x virtual_stages={parallel.virtual_stages} = {stages} pipeline stages but only "
            f"model.num_layers={model.num_layers} layers: every stage needs a layer; lower pp or virtual_stages"
        )
    try:
        per_stage = [len(layers) for layers in partition_layers(model.num_layers, stages, parallel.pipeline_layers)]
    except ScheduleError as error:
        raise ConfigError(str(error)) from None
    if parallel.recompute_layers is not None and parallel.recompute_layers > max(per_stage):
        raise ConfigError(
            f"parallel.recompute_layers={parallel.recompute_layers} exceeds the {max(per_stage)} layers of the "
            f"largest pipeline stage (model chunk): use at most {max(per_stage)}, or null to recompute every layer"
        )
    if model.seq_length > model.max_positions():
        raise ConfigError(
            f"model.seq_length={model.seq_length} exceeds model.max_position_embeddings="
            f"{model.max_positions()}: raise max_position_embeddings or shorten seq_length"
        )
    if model.position_embedding == "rotary" and model.head_size() % 2 != 0:
        raise ConfigError(
            f"rotary embeddings need an even head dimension, got {model.head_size()} (model.head_dim, or "
            f"hidden_size / num_heads = {model.hidden_size} / {model.num_heads}): change head_dim or num_heads"
        )
    if parallel.sequence_parallel and model.seq_length % tp != 0:
        raise ConfigError(
            f"parallel.sequence_parallel splits the sequence over tp={tp} ranks, but "
            f"model.seq_length={model.seq_length} is not divisible by {tp}: use a multiple of {tp} "
            f"or turn sequence_parallel off"
        )
    _check_tp_comm_overlap(config)


def _check_tp_comm_overlap(config: Config) -> None:
    """parallel.tp_comm_overlap: sequence parallel over tp > 1, and shards that cut into whole pieces."""
    parallel, seq_length = config.parallel, config.model.seq_length
    if not parallel.tp_comm_overlap:
        return
    if parallel.tp == 1 or not parallel.sequence_parallel:
        raise ConfigError(
            f"parallel.tp_comm_overlap=true overlaps the sequence-parallel all-gathers and reduce-scatters with the "
            f"GEMMs, but parallel.tp={parallel.tp} and parallel.sequence_parallel={str(parallel.sequence_parallel).lower()}"
            f": set parallel.tp > 1 and parallel.sequence_parallel=true, or parallel.tp_comm_overlap=false"
        )
    tp, cp, chunks = parallel.tp, parallel.cp, parallel.overlap_chunks()
    unit = tp * cp * chunks
    if seq_length % unit != 0:
        raise ConfigError(
            f"parallel.tp_comm_overlap cuts each rank's sequence shard (model.seq_length / (tp x cp)) into "
            f"parallel.tp_comm_overlap_chunks={chunks} pieces, but model.seq_length={seq_length} is not divisible by "
            f"tp x cp x chunks = {tp} x {cp} x {chunks} = {unit}: use a seq_length such as "
            f"{_nearby_multiples(seq_length, unit)}, or another tp_comm_overlap_chunks"
        )


def _check_context_parallel(config: Config) -> None:
    """parallel.cp > 1: the sequence splits into 2 x cp equal chunks, on megalm's own engine."""
    cp, seq_length = config.parallel.cp, config.model.seq_length
    if cp == 1:
        return
    if seq_length % (2 * cp) != 0:
        raise ConfigError(
            f"model.seq_length={seq_length} is not divisible by 2 x parallel.cp = {2 * cp}: context parallelism "
            f"splits each sequence into 2 x cp equal chunks (rank r holds chunks r and 2cp-1-r); set "
            f"model.seq_length to a multiple of {2 * cp} such as {_nearby_multiples(seq_length, 2 * cp)}, or change "
            f"parallel.cp"
        )
    if config.train.compile:
        raise ConfigError(
            f"train.compile=true is not supported with parallel.cp={cp} yet (the layers' key/value all-gather over "
            f"the cp group runs eagerly): set train.compile=false or parallel.cp=1"
        )
    if config.train.engine == "deepspeed":
        raise ConfigError(
            f"parallel.cp={cp} runs on train.engine=megalm only: the DeepSpeed engine reduces gradients over its own "
            f"data-parallel group, which does not include the context-parallel ranks; set train.engine=megalm or "
            f"parallel.cp=1"
        )


_FP8_ALIGNMENT = 16  # torch._scaled_mm: every GEMM dimension a multiple of 16 (megalm.parallel.fp8.ALIGNMENT)


def fp8_widths(model: ModelConfig, tp: int) -> dict[str, tuple[int, str]]:
    """The feature widths of the fp8 linears' GEMMs on one tp rank: {description: (width, how to fix it)}."""
    head_dim, width, unit = model.head_size(), model.num_heads * model.head_size(), _FP8_ALIGNMENT
    widths = {
        "model.hidden_size": (model.hidden_size, f"model.hidden_size a multiple of {unit}"),
        "the attention width per tp rank (num_heads x head_dim / tp)":
            (width // tp, f"num_heads x head_dim a multiple of {unit * tp}"),
        "the MLP width per tp rank (ffn_hidden_size / tp)":
            (model.ffn_size() // tp, f"model.ffn_hidden_size a multiple of {unit * tp} such as "
                                     f"{_nearby_multiples(model.ffn_size(), unit * tp)}"),
    }
    if model.grouped_attention():
        kv_shards = tp // max(1, tp // model.kv_heads())
        widths["the key/value width per tp rank (2 x num_kv_heads x head_dim / shards)"] = (
            2 * model.kv_heads() * head_dim // kv_shards,
            f"2 x num_kv_heads x head_dim a multiple of {unit * kv_shards}")
    return widths


def _check_fp8(config: Config) -> None:
    """train.fp8: float8 GEMMs need bf16 parameters, megalm's engine and widths that are multiples of 16."""
    train, tp = config.train, config.parallel.tp
    if train.fp8 == "none":
        return
    if train.precision != "bf16":
        raise ConfigError(
            f"train.fp8={train.fp8} needs train.precision=bf16, got {train.precision}: the float8 GEMMs write bf16 "
            f"(CUDA's row-wise scaled GEMM has no fp32 or fp16 output, and fp16's loss scaling is not combined "
            f"with float8 scales); set train.precision=bf16 or train.fp8=none"
        )
    if train.engine == "deepspeed":
        raise ConfigError(
            f"train.fp8={train.fp8} runs with train.engine=megalm only (DeepSpeed holds fp32 parameters under "
            f"autocast, not the bf16 parameters the float8 linears are built for): set train.engine=megalm or "
            f"train.fp8=none"
        )
    if config.parallel.tp_comm_overlap:
        raise ConfigError(
            f"train.fp8={train.fp8} with parallel.tp_comm_overlap=true: the overlapped, chunked sequence-parallel "
            f"GEMMs run in high precision only (float8 pieces are later work); set parallel.tp_comm_overlap=false "
            f"to train in float8, or train.fp8=none to overlap"
        )
    problems = [
        f"{name} = {value} (make {fix})"
        for name, (value, fix) in fp8_widths(config.model, tp).items() if value % _FP8_ALIGNMENT != 0
    ]
    if problems:
        raise ConfigError(
            f"train.fp8={train.fp8} multiplies in float8 through torch._scaled_mm, whose dimensions must be "
            f"multiples of {_FP8_ALIGNMENT}, but at parallel.tp={tp}: " + "; ".join(problems)
            + "; or set train.fp8=none"
        )


def _nearby_multiples(number: int, unit: int) -> str:
    lower = (number // unit) * unit
    return f"{lower} or {lower + unit}" if lower > 0 else f"{unit} or {2 * unit}"


def grad_accum_steps(config: Config, dp: int) -> int:
    """Micro-batches per optimizer step per data-parallel rank; errors if the batch sizes disagree."""
    train = config.train
    micro, total = train.micro_batch_size, train.global_batch_size
    per_step = micro * dp
    if train.grad_accum_steps is not None:
        accum = train.grad_accum_steps
        if per_step * accum != total:
            if total % per_step == 0:
                fix = f"set train.grad_accum_steps={total // per_step} (or null to derive it)"
            else:
                fix = f"set train.global_batch_size={per_step * accum}"
            raise ConfigError(
                f"train.global_batch_size={total} does not equal micro_batch_size x dp x "
                f"grad_accum_steps = {micro} x {dp} x {accum} = {per_step * accum}; {fix}"
            )
        return accum
    if total % per_step != 0:
        raise ConfigError(
            f"train.global_batch_size={total} is not divisible by micro_batch_size x dp = "
            f"{micro} x {dp} = {per_step}; use a multiple of {per_step} such as "
            f"{_nearby_multiples(total, per_step)}"
        )
    return total // per_step


def resolved_decay_steps(config: Config) -> int:
    """Steps of the LR schedule's warmup+decay span: optim.decay_steps, or train.steps when unset."""
    return config.optim.decay_steps if config.optim.decay_steps is not None else config.train.steps


def validate(config: Config, world_size: Optional[int] = None) -> Topology:
    """Run every section's checks and the cross-field checks; return the run's Topology."""
    for name in _SECTIONS:
        getattr(config, name).validate()
    parallel = config.parallel
    tp, pp, cp = parallel.tp, parallel.pp, parallel.cp
    if world_size is None:
        if parallel.dp is None:
            raise ConfigError(
                "validate() needs a world size: parallel.dp is null, so pass world_size (the number "
                "of processes launched) or set parallel.dp"
            )
        world_size = tp * pp * cp * parallel.dp
    _check_model(config)
    _check_context_parallel(config)
    _check_fp8(config)
    try:
        topology = Topology.from_world_size(world_size, tp=tp, pp=pp, cp=cp)
    except TopologyError as error:
        raise ConfigError(str(error)) from None
    if parallel.dp is not None and parallel.dp != topology.dp:
        layout = f"tp x pp = {tp} x {pp}" if cp == 1 else f"tp x cp x pp = {tp} x {cp} x {pp}"
        raise ConfigError(
            f"parallel.dp={parallel.dp} does not match the world size: {world_size} processes / "
            f"({layout}) = dp {topology.dp}; set parallel.dp={topology.dp} (or null "
            f"to derive it) or launch {tp * pp * cp * parallel.dp} processes"
        )
    try:
        check_schedule_args(parallel.schedule, pp, grad_accum_steps(config, topology.dp), parallel.virtual_stages)
    except ScheduleError as error:
        raise ConfigError(str(error)) from None
    if config.train.compile and config.train.engine == "deepspeed":
        raise ConfigError(
            "train.compile=true runs with train.engine=megalm only (DeepSpeed wraps the model and compiles "
            "with its own settings): set train.compile=false or train.engine=megalm"
        )
    if parallel.zero_stage == 2 and config.train.engine != "deepspeed":
        raise ConfigError(
            "parallel.zero_stage=2 needs train.engine=deepspeed; megalm's own engine offers 0 (replicated) and 1 "
            "(sharded optimizer states)"
        )
    if config.log.sample_prompts and config.data.tokenizer is None:
        raise ConfigError(
            "log.sample_prompts needs data.tokenizer (the prompts are text): remove the prompts or set data.tokenizer"
        )
    if config.optim.warmup_steps > resolved_decay_steps(config):
        raise ConfigError(
            f"optim.warmup_steps={config.optim.warmup_steps} exceeds the schedule length "
            f"{resolved_decay_steps(config)} (optim.decay_steps, or train.steps when null): "
            f"shorten the warmup or lengthen the decay"
        )
    return topology
