"""Experiment configuration: typed dataclasses, strict YAML with `base:`, overrides, validation.

A config file is nested YAML with one mapping per section (model, parallel, optim, train, data,
log). `base: other.yaml` (relative to the including file) inherits another file; the including
file's keys deep-merge over it. Loading is strict: an unknown key, a wrong type or a value out of
range is a `ConfigError` that names the dotted key, the file and the fix. Each section checks its
own fields; `validate(config, world_size)` does the checks that need several sections or the
world size, and returns the `Topology` the run will use.

YAML note: PyYAML follows YAML 1.1, where `3e-4` (no dot) is a string. We read it as a float, as
YAML 1.2 and Python do, so `lr: 3e-4` and the override `optim.lr=3e-4` both work.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Sequence

import yaml

from megalm.parallel.schedules import ScheduleError, check_schedule_args, partition_layers
from megalm.topology import Topology, TopologyError


class ConfigError(ValueError):
    """A config problem, with a message naming the offending key and value and how to fix it."""


# ---- YAML ----------------------------------------------------------------------------------------


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot (`1e-4`) as floats."""


# Copy the resolver lists so that adding ours does not change yaml.SafeLoader for everyone else.
_YamlLoader.yaml_implicit_resolvers = {
    first_char: list(resolvers)
    for first_char, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class _DuplicateKeyError(yaml.YAMLError):
    """A mapping names one key twice (PyYAML would silently keep the last value)."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    """Construct a mapping, refusing a key given twice: the first value would be silently ignored."""
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key; construct_mapping reports it
            continue
        if first is not None:
            raise _DuplicateKeyError(
                f"key {key!r} is given twice, on line {first.start_mark.line + 1} and line "
                f"{key_node.start_mark.line + 1}; keep one of them"
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=True)


_YamlLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKeyError as error:
        raise ConfigError(f"{source}: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"cannot parse YAML in {source}: {error}") from error


# ---- field typing --------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field's annotation; ints become floats for float fields."""
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0]
    if value is None and optional:
        return None
    or_null = " or null" if optional else ""
    if typing.get_origin(annotation) is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, list):
            return [_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
        expected = f"a list of {item_type.__name__} values"
    elif annotation is bool:
        if isinstance(value, bool):
            return value
        expected = "true or false"
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        expected = "an integer"
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number{or_null}, got {value!r}")
            return float(value)
        expected = "a number"
    elif annotation is str:
        if isinstance(value, str):
            return value
        expected = "a string"
    else:  # pragma: no cover - guards against adding a field of an unsupported type
        raise TypeError(f"unsupported config field type {annotation!r} for {key}")
    raise ConfigError(f"{key} must be {expected}{or_null}, got {_describe(value)}")


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


# ---- sections ------------------------------------------------------------------------------------


@dataclass
class _Section:
    """Base of every config section: type-checks its fields and runs its own range checks."""

    SECTION: ClassVar[str] = ""
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {}
    # Keys accepted under another name (a Python keyword cannot be a field): YAML name -> field name.
    ALIASES: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check this section's field types, allowed values and ranges."""
        for name, annotation in _field_types(type(self)).items():
            setattr(self, name, _coerce(getattr(self, name), annotation, self._key(name)))
        for name, allowed in self.CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                options = ", ".join(repr(option) for option in allowed)
                raise ConfigError(f"{self._key(name)} must be one of {options}, got {value!r}")
        self._check_values()

    def _check_values(self) -> None:
        """Range checks of one section; overridden per section."""

    def _key(self, name: str) -> str:
        return f"{self.SECTION}.{name}"

    def _require(self, condition: bool, name: str, rule: str) -> None:
        if not condition:
            raise ConfigError(f"{self._key(name)} must be {rule}, got {getattr(self, name)!r}")

    def _positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            self._require(value is None or value > 0, name, "positive")

    def _non_negative(self, *names: str) -> None:
        for name in names:
            self._require(getattr(self, name) >= 0, name, ">= 0")


@dataclass
class ModelConfig(_Section):
    """The network: a GPT decoder, causal ("lm") or with a bidirectional prefix ("prefixlm")."""

    SECTION: ClassVar[str] = "model"
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "family": ("lm", "prefixlm"),
        "position_embedding": ("learned", "rotary"),
        "prefix_attention": ("auto", "flex", "dense"),
    }

    family: str = "lm"  # "lm": causal GPT; "prefixlm": bidirectional attention over each sample's prefix, loss after it
    num_layers: int = 2  # transformer layers
    hidden_size: int = 64  # width of the residual stream
    num_heads: int = 4  # attention heads (must divide hidden_size, and be divisible by parallel.tp)
    ffn_hidden_size: Optional[int] = None  # MLP hidden size; null: 4 x hidden_size
    vocab_size: int = 256  # token ids the model knows (the tokenizer's vocabulary size)
    seq_length: int = 64  # tokens per training sample
    max_position_embeddings: Optional[int] = None  # rows of the learned position table; null: seq_length
    position_embedding: str = "learned"  # "learned" absolute positions, or "rotary" (RoPE in attention)
    rotary_base: float = 10000.0  # rotary only: the base of the rotary frequencies
    hidden_dropout: float = 0.0  # dropout after attention and MLP and on the embeddings, in [0, 1)
    attention_dropout: float = 0.0  # dropout on the attention probabilities, in [0, 1)
    layernorm_eps: float = 1e-5  # epsilon of every LayerNorm
    init_std: float = 0.02  # std of the normal initialisation (output projections: init_std / sqrt(2 x num_layers))
    make_vocab_size_divisible_by: int = 128  # the embedding's rows are vocab_size padded to a multiple of this x tp
    # PrefixLM attention: "flex" (FlexAttention, block mask), "dense" (SDPA, [b, 1, s, s] mask), "auto": flex on CUDA without attention dropout
    prefix_attention: str = "auto"

    def _check_values(self) -> None:
        self._positive(
            "num_layers", "hidden_size", "num_heads", "ffn_hidden_size", "vocab_size", "seq_length",
            "max_position_embeddings", "rotary_base", "layernorm_eps", "init_std",
            "make_vocab_size_divisible_by",
        )
        for name in ("hidden_dropout", "attention_dropout"):
            self._require(0.0 <= getattr(self, name) < 1.0, name, "in [0, 1)")
        if self.prefix_attention != "auto" and self.family != "prefixlm":
            raise ConfigError(f"model.prefix_attention={self.prefix_attention} applies to model.family=prefixlm only "
                              f"(LM attention is SDPA is_causal): remove it or set it to auto")
        if self.prefix_attention == "flex" and self.attention_dropout > 0:
            raise ConfigError(f"model.prefix_attention=flex has no attention dropout, but model.attention_dropout="
                              f"{self.attention_dropout}: set attention_dropout to 0 or prefix_attention to dense (or auto)")

    def ffn_size(self) -> int:
        """The MLP hidden size: ffn_hidden_size, or 4 * hidden_size when unset."""
        return self.ffn_hidden_size if self.ffn_hidden_size is not None else 4 * self.hidden_size

    def max_positions(self) -> int:
        """The number of positions: max_position_embeddings, or seq_length when unset."""
        if self.max_position_embeddings is not None:
            return self.max_position_embeddings
        return self.seq_length

    def head_dim(self) -> int:
        """Width of one attention head; errors (never rounds) when heads do not divide hidden."""
        if self.hidden_size % self.num_heads != 0:
            raise ConfigError(_heads_message(self))
        return self.hidden_size // self.num_heads

    def padded_vocab_size(self, tp: int) -> int:
        """vocab_size rounded up to a multiple of make_vocab_size_divisible_by * tp.

        The padding keeps each tensor-parallel vocab shard equal and its matmuls aligned; the extra
        rows are never produced by the tokenizer.
        """
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ConfigError(f"tp must be a positive integer, got {tp!r}")
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple


@dataclass
class ParallelConfig(_Section):
    """The 3D layout; dp is derived from the world size unless given (then it must match)."""

    SECTION: ClassVar[str] = "parallel"

    SCHEDULES: ClassVar[tuple[str, ...]] = ("1f1b", "gpipe", "interleaved")
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "schedule": SCHEDULES, "grad_reduce_dtype": ("fp32", "bf16"), "recompute": ("none", "selective", "full"),
    }

    tp: int = 1  # tensor-parallel ranks: each layer's weights split over them
    pp: int = 1  # pipeline stages: the layers split over them
    dp: Optional[int] = None  # data-parallel replicas; null: world size / (tp x pp), else it must equal that
    sequence_parallel: bool = False  # with tp > 1: LayerNorm and dropout regions split over tp along the sequence
    schedule: str = "1f1b"  # pipeline schedule: "1f1b" | "gpipe" | "interleaved"
    virtual_stages: int = 1  # model chunks per pipeline rank (interleaved schedule)
    pipeline_layers: Optional[list[int]] = None  # layers per (virtual) stage; null: uniform
    zero_stage: int = 0  # 0: replicated optimizer; 1: optimizer states sharded over dp (ZeRO-1)
    bucket_size_mb: float = 25.0  # gradient buckets reduced over dp as one collective each
    overlap_grad_sync: bool = True  # launch each bucket's reduction during the backward pass
    grad_reduce_dtype: str = "fp32"  # dtype on the wire of the gradient reduction: "fp32", or "bf16" (half the bytes); buckets accumulate in fp32
    # Activation recompute (README "Activation recompute"): "none"; "selective" recomputes the attention
    # core (scores, softmax, dropout) in backward; "full" keeps only each layer's input and reruns the layer.
    recompute: str = "none"
    recompute_layers: Optional[int] = None  # full only: recompute the first N layers of each model chunk; null: all

    def _check_values(self) -> None:
        self._positive("tp", "pp", "dp", "virtual_stages", "bucket_size_mb", "recompute_layers")
        self._require(self.zero_stage in (0, 1, 2), "zero_stage", "0, 1 or 2")
        if self.recompute_layers is not None and self.recompute != "full":
            raise ConfigError(
                f"parallel.recompute_layers={self.recompute_layers} applies to full recompute only, but "
                f"parallel.recompute is {self.recompute!r}: set parallel.recompute=full or remove recompute_layers"
            )


@dataclass
class OptimConfig(_Section):
    """AdamW and its learning-rate schedule (linear warmup, then decay to min_lr)."""

    SECTION: ClassVar[str] = "optim"
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "decay_style": ("cosine", "linear", "constant"),
    }

    lr: float = 3e-4  # peak learning rate, reached at the end of the warmup
    min_lr: float = 0.0  # learning rate at the end of the decay, and after it
    warmup_steps: int = 0  # steps of linear warmup from lr / warmup_steps to lr
    decay_steps: Optional[int] = None  # steps from the start to the end of the decay (warmup included); null: train.steps
    decay_style: str = "cosine"  # shape of the decay from lr to min_lr after the warmup
    weight_decay: float = 0.01  # AdamW's decoupled weight decay (not on 1-D tensors: biases, LayerNorm weights)
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay
    eps: float = 1e-8  # AdamW's epsilon
    clip_grad: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    # fp16 only: dynamic loss scaling (loss_scale null) or a static loss_scale.
    loss_scale: Optional[float] = None
    initial_loss_scale: float = 65536.0  # fp16, dynamic: the scale at the start
    loss_scale_window: int = 1000  # clean steps before the scale doubles
    loss_scale_hysteresis: int = 2  # overflowing steps tolerated before the scale halves
    min_loss_scale: float = 1.0  # fp16, dynamic: the scale never halves below this

    def _check_values(self) -> None:
        self._non_negative("min_lr", "warmup_steps", "weight_decay", "clip_grad")
        if self.lr < self.min_lr:
            raise ConfigError(
                f"optim.lr={self.lr} is below optim.min_lr={self.min_lr}: "
                f"raise optim.lr or lower optim.min_lr"
            )
        self._positive("decay_steps", "eps", "loss_scale", "initial_loss_scale", "loss_scale_window",
                       "loss_scale_hysteresis", "min_loss_scale")
        for name in ("beta1", "beta2"):
            self._require(0.0 <= getattr(self, name) < 1.0, name, "in [0, 1)")


@dataclass
class TrainConfig(_Section):
    """The loop: steps, batch sizes, seed, precision, device and where outputs go."""

    SECTION: ClassVar[str] = "train"
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "precision": ("fp32", "bf16", "fp16"),
        "device": ("auto", "cpu", "cuda"),
        "engine": ("megalm", "deepspeed"),
    }

    steps: int = 100  # optimizer steps of the whole run (a resumed run continues up to it)
    micro_batch_size: int = 1  # samples per forward/backward on one rank
    global_batch_size: int = 1  # samples per optimizer step: micro_batch_size x dp x grad_accum_steps
    grad_accum_steps: Optional[int] = None  # micro-batches per step per dp rank; null: derived from the batch sizes
    seed: int = 1234  # seeds the initialisation, dropout and the data order
    precision: str = "fp32"  # bf16 / fp16: low-precision params, fp32 main grads + masters + Adam (README "Precision")
    engine: str = "megalm"  # "deepspeed": DeepSpeed's ZeRO for data parallelism (optional extra)
    device: str = "auto"  # "auto": CUDA when a GPU is visible, else CPU
    run_dir: str = "runs/default"  # where config.yaml, metrics.jsonl and checkpoints/ go (--run-dir overrides it)
    collective_timeout_s: float = 300.0  # a collective waiting longer ends the job (NCCL's default: 600)
    eval_interval: int = 0  # evaluate the valid split every N steps (0: never)
    eval_batches: int = 1  # global batches of the valid split per evaluation
    compile: bool = False  # torch.compile each transformer layer (README "Compiled layers"); megalm engine only
    # Fine-tune from weights: a checkpoint directory (RUN/checkpoints/step_NNNNNNNN) or a run directory (its
    # latest checkpoint). Loads the model weights only, at any layout, and starts at step 0 with a fresh
    # optimizer, LR schedule and data position; a run directory with a checkpoint of its own resumes instead.
    init_from: Optional[str] = None

    def _check_values(self) -> None:
        self._positive("steps", "micro_batch_size", "global_batch_size", "grad_accum_steps", "eval_batches")
        self._non_negative("eval_interval")
        self._positive("collective_timeout_s")
        self._non_negative("seed")
        self._require(self.run_dir.strip() != "", "run_dir", "a non-empty path")
        self._require(self.init_from is None or self.init_from.strip() != "", "init_from", "a path or null")


@dataclass
class DataConfig(_Section):
    """Where tokens come from: the built-in synthetic stream, preprocessed token files, or JSONL pairs."""

    SECTION: ClassVar[str] = "data"
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"kind": ("synthetic", "indexed", "pairs")}

    kind: str = "synthetic"  # "synthetic": a built-in seeded token stream (no files); "indexed": token files; "pairs": JSONL
    # indexed: .bin/.idx prefixes written by `megalm preprocess`; pairs: JSONL files of prefix/target.
    paths: list[str] = field(default_factory=list)
    weights: Optional[list[float]] = None  # blend weights, one per path (null: proportional to size)
    split: str = "98,1,1"  # train,valid,test shares of each dataset's documents
    tokenizer: Optional[str] = None  # the sentencepiece .model the data was tokenized with
    prefix_fraction_min: float = 0.1  # PrefixLM pretraining: each sample's prefix is drawn uniform in [min, max] x seq_length
    prefix_fraction_max: float = 0.5  # PrefixLM pretraining: the longest prefix, as a fraction of seq_length
    prefix_field: str = "prefix"  # pairs: the JSONL key of the bidirectional prefix
    target_field: str = "target"  # pairs: the JSONL key of the target (the loss is on it only)
    # warn at start when the run will read its train split more than this many times (null: never warn)
    max_epochs_warning: Optional[float] = 4.0

    def _check_values(self) -> None:
        self._positive("max_epochs_warning")
        low, high = self.prefix_fraction_min, self.prefix_fraction_max
        if not 0.0 < low <= high < 1.0:
            raise ConfigError(
                f"data.prefix_fraction_min={low} and data.prefix_fraction_max={high} must satisfy "
                f"0 < min <= max < 1 (fractions of seq_length)"
            )
        if self.kind != "synthetic":
            if not self.paths:
                raise ConfigError(f"data.kind={self.kind} needs data.paths: the files to read")
            if self.tokenizer is None:
                raise ConfigError(f"data.kind={self.kind} needs data.tokenizer: the sentencepiece .model file")
        if self.weights is not None:
            if len(self.weights) != len(self.paths):
                raise ConfigError(
                    f"data.weights has {len(self.weights)} entries but data.paths has {len(self.paths)}: "
                    f"give one weight per dataset (or null to weight by size)"
                )
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ConfigError(f"data.weights must be >= 0 with a positive sum, got {self.weights}")
        self.split_fractions()

    def split_fractions(self) -> tuple[float, float, float]:
        """(train, valid, test) shares parsed from `split` ("98,1,1", "0.9,0.1,0" or "100")."""
        try:
            parts = [float(x) for x in self.split.replace("/", ",").split(",")]
        except ValueError:
            parts = []
        if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
            raise ConfigError(
                f"data.split={self.split!r} must be up to three non-negative numbers such as '98,1,1' "
                f"(train,valid,test shares)"
            )
        parts += [0.0] * (3 - len(parts))
        total = sum(parts)
        return parts[0] / total, parts[1] / total, parts[2] / total


@dataclass
class LogConfig(_Section):
    """What is logged, how often, and by which ranks."""

    SECTION: ClassVar[str] = "log"

    interval: int = 10  # print a step line every N steps (metrics.jsonl gets every step)
    peak_tflops: Optional[float] = None  # the device's dense bf16 TFLOP/s, for MFU; null: known GPUs are recognised
    all_ranks: bool = False  # every rank logs (prefixed with its rank), not only rank 0
    comm_stats: bool = False  # count bytes and calls per collective and group (or MEGALM_COMM_STATS=1)
    sample_prompts: list[str] = field(default_factory=list)  # generate from these after training
    sample_tokens: int = 48  # tokens generated per prompt
    # write TensorBoard event files to run_dir/tensorboard (rank 0; needs the tensorboard package)
    tensorboard: bool = False
    # log each step's metrics to this Weights & Biases project (rank 0; needs the wandb package; null: off)
    wandb_project: Optional[str] = None

    def _check_values(self) -> None:
        self._positive("interval", "peak_tflops", "sample_tokens")

    def check_packages(self) -> None:
        """The sinks' packages are installed: checked by `megalm train` / `check` and the launcher, not when
        loading the config, so `megalm eval`, `generate`, `plan` of a run's config work where they are not."""
        if self.tensorboard and not _importable("tensorboard"):
            raise ConfigError(
                "log.tensorboard=true needs the tensorboard package: pip install 'megalm[tensorboard]' "
                "(or pip install tensorboard), or set log.tensorboard=false"
            )
        if self.wandb_project is not None and not _importable("wandb"):
            raise ConfigError(
                f"log.wandb_project={self.wandb_project!r} needs the wandb package: pip install wandb "
                f"(and wandb login), or set log.wandb_project=null"
            )


def _importable(module: str) -> bool:
    """Whether `import module` would find it (already imported, or on the path), without importing it."""
    import importlib.util
    import sys

    if module in sys.modules:  # None there means "import fails" (how tests hide a package)
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


@dataclass
class CheckpointConfig(_Section):
    """When and where checkpoints are written, and how a run resumes."""

    SECTION: ClassVar[str] = "checkpoint"
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "signal": ("SIGTERM", "SIGUSR1"), "on_nan": ("skip", "stop"), "shared_read": ("auto", "always", "never"),
    }
    ALIASES: ClassVar[dict[str, str]] = {"async": "async_save"}

    interval_steps: int = 0  # save every N steps (0: never by count)
    interval_minutes: float = 0.0  # and/or every N minutes (0: never by time)
    keep: int = 3  # complete checkpoints kept in run_dir/checkpoints
    save_at_end: bool = True  # save when train.steps is reached
    signal: str = "SIGTERM"  # on this signal (any rank) every rank saves and exits 0
    on_nan: str = "skip"  # a non-finite gradient: skip the step, or stop (the last checkpoint stays intact)
    # Timeout of the checkpoint path's own gloo group (save/stop decision, commit barriers, checksum
    # verdicts): a save may take this long on a slow filesystem without tripping train.collective_timeout_s.
    timeout_s: float = 1800.0
    # Write checkpoints in a background thread: training stalls only for the copy to host memory
    # (pinned with CUDA); the save commits (moves `latest`) once every rank's writer is done.
    async_save: bool = False  # also accepted as checkpoint.async
    # At resume the dp ranks of a (tp, pp) shard read each file once between them and broadcast it
    # (over checkpoint.timeout_s's gloo group): always | never | auto (only when those ranks span
    # several hosts; ranks of one host share its page cache, and the broadcast costs more than the
    # reads it saves: 4.9 s -> 19.9 s for gpt-125m at 2x2x2 on one CPU host, scripts/ckpt_bench.py).
    shared_read: str = "auto"

    def _check_values(self) -> None:
        self._non_negative("interval_steps", "interval_minutes")
        self._positive("keep", "timeout_s")


_SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "log": LogConfig,
    "checkpoint": CheckpointConfig,
}


@dataclass
class Config:
    """A whole experiment: one instance of each section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(
                    f"Config.{name} must be a {cls.__name__}, got {_describe(getattr(self, name))}"
                )


# ---- dict <-> Config -----------------------------------------------------------------------------


def _all_keys() -> list[str]:
    return [f"{section}.{f.name}" for section, cls in _SECTIONS.items() for f in fields(cls)]


def _unknown_key(key: str, source: str) -> ConfigError:
    """The error for an unknown dotted key, suggesting the closest valid key."""
    section, _, leaf = key.partition(".")
    all_keys = _all_keys()
    leaves = sorted({k.split(".")[1] for k in all_keys})
    if section not in _SECTIONS:
        candidates = list(_SECTIONS)
        match = difflib.get_close_matches(section, candidates, n=1)
        if match and leaf:  # optm.lr -> optim.lr
            match = [f"{match[0]}.{leaf}"] if f"{match[0]}.{leaf}" in all_keys else match
        elif not match and not leaf:  # a field at top level, e.g. `lr:` instead of `optim: {lr:}`
            close = difflib.get_close_matches(section, leaves, n=1)
            match = [k for k in all_keys if close and k.endswith("." + close[0])][:1]
    else:
        own = [f.name for f in fields(_SECTIONS[section])]
        candidates = [f"{section}.{name}" for name in own]
        match = [f"{section}.{name}" for name in difflib.get_close_matches(leaf, own, n=1)]
        if not match:  # a field of another section, e.g. model.lr -> optim.lr
            close = difflib.get_close_matches(leaf, leaves, n=1)
            match = [k for k in all_keys if close and k.endswith("." + close[0])][:1]
    hint = f"did you mean {match[0]!r}?" if match else "valid keys: " + ", ".join(candidates)
    return ConfigError(f"unknown key {key!r} in {source}; {hint}")


def _not_a_mapping(data: Any, source: str) -> ConfigError:
    return ConfigError(
        f"{source} must be a mapping of sections (model, optim, ...), got {_describe(data)}"
    )


def _check_tree(data: Any, source: str) -> dict[str, dict[str, Any]]:
    """Check keys and value types of one raw mapping; return a normalised copy (floats coerced)."""
    if not isinstance(data, Mapping):
        raise _not_a_mapping(data, source)
    tree: dict[str, dict[str, Any]] = {}
    for section, values in data.items():
        section = str(section)
        if section == "base":
            raise ConfigError(
                f"'base' in {source} is only allowed in a YAML file read by load_config"
            )
        if section not in _SECTIONS:
            raise _unknown_key(section, source)
        if values is None:  # an empty `model:` header reads as null; treat it as an empty section
            values = {}
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"section {section!r} in {source} must be a mapping of keys to values, "
                f"got {_describe(values)}"
            )
        types = _field_types(_SECTIONS[section])
        tree[section] = {}
        for name, value in values.items():
            name = _SECTIONS[section].ALIASES.get(str(name), name)
            key = f"{section}.{name}"
            if name not in types:
                raise _unknown_key(key, source)
            try:
                tree[section][name] = _coerce(value, types[name], key)
            except ConfigError as error:
                raise ConfigError(f"{error} (in {source})") from None
    return tree


def config_from_dict(data: Mapping, source: str = "<dict>") -> Config:
    """Build a Config from nested dicts, strictly: unknown keys, wrong types and bad ranges raise."""
    tree = _check_tree(data, source)
    sections = {}
    for name, cls in _SECTIONS.items():
        try:
            sections[name] = cls(**tree.get(name, {}))
        except ConfigError as error:
            raise ConfigError(f"{error} (in {source})") from None
    return Config(**sections)


def config_to_dict(config: Config) -> dict:
    """The config as plain nested dicts of every field; round-trips through config_from_dict."""
    return dataclasses.asdict(config)


def config_to_yaml(config: Config) -> str:
    """The config as YAML text, in field order; load_config reads it back to an equal Config."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False)


# ---- files and overrides -------------------------------------------------------------------------


def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _load_tree(path: Path, chain: tuple[tuple[Path, str], ...] = ()) -> dict:
    """Read one file and its `base:` ancestors into one checked, merged tree."""
    source = str(path)
    resolved = path.resolve()
    if any(resolved == seen for seen, _ in chain):
        cycle = " -> ".join([shown for _, shown in chain] + [source])
        raise ConfigError(f"base cycle: {cycle}; remove one of these base: entries")
    included = f" (the base of {chain[-1][1]})" if chain else ""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {source}{included} not found") from None
    except IsADirectoryError:
        raise ConfigError(
            f"config path {source}{included} is a directory: give a YAML file such as configs/tiny.yaml"
        ) from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"config file {source}{included} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
            f"{error.start}): give a YAML file, saved as UTF-8"
        ) from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {source}{included}: {error.strerror or error}") from None
    data = _parse_yaml(text, source)
    if data is None:
        raise ConfigError(
            f"config file {source}{included} is empty (no settings, only comments or nothing): an empty file is "
            f"more likely a mistake than a wish for every default; write at least `base: tiny.yaml` or one section"
        )
    if not isinstance(data, Mapping):
        raise _not_a_mapping(data, source)
    data = dict(data)
    base = data.pop("base", None)
    tree = _check_tree(data, source)
    if base is None:
        return tree
    if not isinstance(base, str) or not base:
        raise ConfigError(
            f"base in {source} must be a file name such as tiny.yaml, got {_describe(base)}"
        )
    parent = _load_tree(path.parent / base, chain + ((resolved, source),))
    return _deep_merge(parent, tree)


def _parse_override(override: str) -> tuple[str, str, Any]:
    """Split `section.field=value`; the value is read as YAML (so null, true, 3e-4 all work)."""
    if not isinstance(override, str) or "=" not in override:
        raise ConfigError(
            f"override {override!r} is not of the form section.field=value, e.g. optim.lr=3e-4"
        )
    key, _, text = override.partition("=")
    key = key.strip()
    source = f"override {override!r}"
    section, _, name = key.partition(".")
    if section not in _SECTIONS:
        raise _unknown_key(key, source)
    if not name:
        example = fields(_SECTIONS[section])[0].name
        raise ConfigError(f"{source} must name a field, e.g. {section}.{example}=...")
    if _SECTIONS[section].ALIASES.get(name, name) not in _field_types(_SECTIONS[section]):
        raise _unknown_key(key, source)
    return section, name, _parse_yaml(text, source)  # _check_tree resolves an alias to its field


def _apply_to_tree(tree: dict, overrides: Sequence[str]) -> dict:
    if isinstance(overrides, str):
        raise ConfigError(
            f"overrides must be a list of strings, got the single string {overrides!r}"
        )
    tree = {section: dict(values) for section, values in tree.items()}
    for override in overrides:
        section, name, value = _parse_override(override)
        checked = _check_tree({section: {name: value}}, f"override {override!r}")
        tree.setdefault(section, {}).update(checked[section])
    return tree


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """A new Config with `section.field=value` overrides applied (all at once, then re-validated)."""
    if not overrides:
        return config_from_dict(config_to_dict(config), source="config")
    tree = _apply_to_tree(config_to_dict(config), overrides)
    return config_from_dict(tree, source="config with overrides " + " ".join(overrides))


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML experiment (following `base:`), apply overrides, and check every section."""
    path = Path(path)
    tree = _apply_to_tree(_load_tree(path), overrides)
    source = str(path) + (" with overrides " + " ".join(overrides) if overrides else "")
    return config_from_dict(tree, source=source)


# ---- cross-field validation ----------------------------------------------------------------------


def _heads_message(model: ModelConfig) -> str:
    return (
        f"model.hidden_size={model.hidden_size} is not divisible by model.num_heads="
        f"{model.num_heads}: choose num_heads dividing {model.hidden_size} "
        f"(e.g. {_nearby_divisor(model.hidden_size, model.num_heads)}) or a hidden_size that is a "
        f"multiple of {model.num_heads}"
    )


def _nearby_divisor(number: int, near: int, max_tries: int = 100_000) -> int:
    """A divisor of `number` close to `near`: the closest one (ties go to the smaller) when it is
    within `max_tries` of `near`, else gcd(number, near). Never a loop over all of `number`, which
    for a hidden size of 10^11 took minutes in an error message."""
    near = max(1, min(near, number))
    for distance in range(min(max_tries, near)):
        for candidate in (near - distance, near + distance):
            if 1 <= candidate <= number and number % candidate == 0:
                return candidate
    return math.gcd(number, near)


_MAX_TENSOR_BYTES = 2**63 - 1  # torch's sizes and strides are int64: a larger tensor cannot even be described


def _check_tensor_sizes(model: ModelConfig, tp: int) -> None:
    """Every full weight must fit torch's 64-bit byte count in fp32; a hidden size of 2^62 would
    otherwise end a dry run in a "storage size calculation overflowed" traceback."""
    hidden = model.hidden_size
    shapes = {
        "the word embedding (padded model.vocab_size x model.hidden_size)": (model.padded_vocab_size(tp), hidden),
        "the position table (model.max_position_embeddings x model.hidden_size)": (model.max_positions(), hidden),
        "the attention QKV weight (3 x model.hidden_size x model.hidden_size)": (3 * hidden, hidden),
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
    if model.hidden_size % model.num_heads != 0:
        raise ConfigError(_heads_message(model))
    _check_tensor_sizes(model, tp)
    if model.num_heads % tp != 0:
        raise ConfigError(
            f"model.num_heads={model.num_heads} is not divisible by parallel.tp={tp}: each "
            f"tensor-parallel rank needs whole heads; use a tp dividing {model.num_heads}"
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
    if model.position_embedding == "rotary" and model.head_dim() % 2 != 0:
        raise ConfigError(
            f"rotary embeddings need an even head dimension, got hidden_size / num_heads = "
            f"{model.hidden_size} / {model.num_heads} = {model.head_dim()}: change num_heads"
        )
    if parallel.sequence_parallel and model.seq_length % tp != 0:
        raise ConfigError(
            f"parallel.sequence_parallel splits the sequence over tp={tp} ranks, but "
            f"model.seq_length={model.seq_length} is not divisible by {tp}: use a multiple of {tp} "
            f"or turn sequence_parallel off"
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
    tp, pp = parallel.tp, parallel.pp
    if world_size is None:
        if parallel.dp is None:
            raise ConfigError(
                "validate() needs a world size: parallel.dp is null, so pass world_size (the number "
                "of processes launched) or set parallel.dp"
            )
        world_size = tp * pp * parallel.dp
    _check_model(config)
    try:
        topology = Topology.from_world_size(world_size, tp=tp, pp=pp)
    except TopologyError as error:
        raise ConfigError(str(error)) from None
    if parallel.dp is not None and parallel.dp != topology.dp:
        raise ConfigError(
            f"parallel.dp={parallel.dp} does not match the world size: {world_size} processes / "
            f"(tp x pp = {tp} x {pp}) = dp {topology.dp}; set parallel.dp={topology.dp} (or null "
            f"to derive it) or launch {tp * pp * parallel.dp} processes"
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
