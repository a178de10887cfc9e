"""The config sections (model, parallel, optim, train, data, log, checkpoint) and the `Config` that holds them.

Each field's comment (above it, or at the end of its line) is its meaning in the config reference:
`megalm config-doc` reads this file to write docs/config.md, and a field without a comment is an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional

from megalm.config.fields import ConfigError, _describe, _Section


@dataclass
class ModelConfig(_Section):
    """The network: a GPT decoder, causal ("lm") or with a bidirectional prefix ("prefixlm")."""

    SECTION: ClassVar[str] = "model"
    ALIASES: ClassVar[dict[str, str]] = {"layernorm_eps": "norm_eps"}  # configs and checkpoints before norm: rmsnorm
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "family": ("lm", "prefixlm"),
        "position_embedding": ("learned", "rotary"),
        "prefix_attention": ("auto", "flex", "dense"),
        "norm": ("layernorm", "rmsnorm"),
        "mlp": ("gelu", "swiglu"),
        "rope_scaling": ("none", "linear", "llama3", "yarn"),
    }

    family: str = "lm"  # "lm": causal GPT; "prefixlm": bidirectional attention over each sample's prefix, loss after it
    num_layers: int = 2  # transformer layers
    hidden_size: int = 64  # width of the residual stream
    num_heads: int = 4  # attention (query) heads (must be divisible by parallel.tp)
    # key/value heads: null = num_heads (multi-head); fewer = grouped-query (num_heads a multiple of it), 1 = multi-query
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None  # width of one attention head; null: hidden_size / num_heads
    ffn_hidden_size: Optional[int] = None  # MLP hidden size (each of SwiGLU's gate and up); null: 4 x hidden_size
    vocab_size: int = 256  # token ids the model knows (the tokenizer's vocabulary size)
    seq_length: int = 64  # tokens per training sample
    max_position_embeddings: Optional[int] = None  # rows of the learned position table; null: seq_length
    position_embedding: str = "learned"  # "learned" absolute positions, or "rotary" (RoPE in attention)
    rotary_base: float = 10000.0  # rotary only: the base of the rotary frequencies (Hugging Face's rope_theta)
    # rotary only: "none", "linear" (positions / rope_factor), "llama3" (per-frequency, Llama 3.1) or "yarn"
    rope_scaling: str = "none"
    rope_factor: float = 1.0  # rope_scaling: the context extension factor
    rope_low_freq_factor: float = 1.0  # rope_scaling llama3: wavelengths above original / this are divided by rope_factor
    rope_high_freq_factor: float = 4.0  # rope_scaling llama3: wavelengths below original / this are kept
    rope_original_max_positions: Optional[int] = None  # rope_scaling llama3 / yarn: the pretraining context length
    rope_attention_factor: Optional[float] = None  # rope_scaling yarn: scale of cos and sin; null: 0.1 ln(factor) + 1
    rope_beta_fast: float = 32.0  # rope_scaling yarn: rotations below which a frequency is interpolated fully
    rope_beta_slow: float = 1.0  # rope_scaling yarn: rotations above which a frequency is kept
    norm: str = "layernorm"  # "layernorm" (weight and bias) or "rmsnorm" (weight only; statistics in fp32)
    norm_eps: float = 1e-5  # epsilon of every norm (also read as layernorm_eps)
    mlp: str = "gelu"  # "gelu": fc1 -> GeLU (tanh) -> fc2; "swiglu": down(silu(gate(x)) * up(x))
    bias: bool = True  # biases on the linear layers (attention output, MLP)
    qkv_bias: Optional[bool] = None  # biases on the query, key and value projections; null: as bias
    tie_embeddings: bool = True  # the output layer is the token embedding; false: its own vocab-parallel weight
    hidden_dropout: float = 0.0  # dropout after attention and MLP and on the embeddings, in [0, 1)
    attention_dropout: float = 0.0  # dropout on the attention probabilities, in [0, 1)
    init_std: float = 0.02  # std of the normal initialisation (output projections: init_std / sqrt(2 x num_layers))
    make_vocab_size_divisible_by: int = 128  # the embedding's rows are vocab_size padded to a multiple of this x tp
    # PrefixLM (and document mask) attention: "flex" (FlexAttention, block mask), "dense" (SDPA, [b, 1, s, s] mask), "auto": flex on CUDA without attention dropout
    prefix_attention: str = "auto"
    # LM only: attention stops at each eos inside a packed sample (the eos ends its document) and positions restart at 0
    document_mask: bool = False

    def _check_values(self) -> None:
        self._positive(
            "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "ffn_hidden_size", "vocab_size",
            "seq_length", "max_position_embeddings", "rotary_base", "norm_eps", "init_std",
            "make_vocab_size_divisible_by", "rope_factor", "rope_original_max_positions", "rope_attention_factor",
            "rope_beta_fast", "rope_beta_slow",
        )
        for name in ("hidden_dropout", "attention_dropout"):
            self._require(0.0 <= getattr(self, name) < 1.0, name, "in [0, 1)")
        if self.document_mask and self.family != "lm":
            raise ConfigError(f"model.document_mask applies to model.family=lm only (a PrefixLM sample has one prefix, "
                              f"not one per document): set model.family=lm or model.document_mask=false")
        if self.prefix_attention != "auto" and self.family != "prefixlm" and not self.document_mask:
            raise ConfigError(f"model.prefix_attention={self.prefix_attention} applies to model.family=prefixlm and "
                              f"model.document_mask only (LM attention is SDPA is_causal): remove it or set it to auto")
        if self.prefix_attention == "flex" and self.attention_dropout > 0:
            raise ConfigError(f"model.prefix_attention=flex has no attention dropout, but model.attention_dropout="
                              f"{self.attention_dropout}: set attention_dropout to 0 or prefix_attention to dense (or auto)")
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads != 0:
            raise ConfigError(f"model.num_heads={self.num_heads} is not a multiple of model.num_kv_heads="
                              f"{self.num_kv_heads}: each key/value head serves a whole group of query heads")
        if self.rope_scaling != "none" and self.position_embedding != "rotary":
            raise ConfigError(f"model.rope_scaling={self.rope_scaling} scales rotary positions, but "
                              f"model.position_embedding={self.position_embedding}: set position_embedding: rotary "
                              f"or rope_scaling: none")
        if self.rope_scaling in ("llama3", "yarn") and self.rope_original_max_positions is None:
            raise ConfigError(f"model.rope_scaling={self.rope_scaling} needs model.rope_original_max_positions "
                              f"(the context length the model was pretrained with, e.g. 8192 for Llama 3)")
        if self.rope_scaling == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
            raise ConfigError(f"model.rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                              f"model.rope_low_freq_factor={self.rope_low_freq_factor} (rope_scaling llama3)")

    def ffn_size(self) -> int:
        """The MLP hidden size: ffn_hidden_size, or 4 * hidden_size when unset."""
        return self.ffn_hidden_size if self.ffn_hidden_size is not None else 4 * self.hidden_size

    def max_positions(self) -> int:
        """The number of positions: max_position_embeddings, or seq_length when unset."""
        if self.max_position_embeddings is not None:
            return self.max_position_embeddings
        return self.seq_length

    def head_size(self) -> int:
        """Width of one attention head: head_dim, or hidden / heads (errors, never rounds, when they do not divide)."""
        if self.head_dim is not None:
            return self.head_dim
        if self.hidden_size % self.num_heads != 0:
            raise ConfigError(_heads_message(self))
        return self.hidden_size // self.num_heads

    def kv_heads(self) -> int:
        """Key/value heads: num_kv_heads, or num_heads (multi-head attention) when unset."""
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    def grouped_attention(self) -> bool:
        """Whether keys and values have fewer heads than queries (GQA / MQA: separate query and key/value weights)."""
        return self.kv_heads() < self.num_heads

    def has_qkv_bias(self) -> bool:
        """Biases on the query, key and value projections: qkv_bias, or bias when unset."""
        return self.bias if self.qkv_bias is None else self.qkv_bias

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
    dp: Optional[int] = None  # data-parallel replicas; null: world size / (tp x cp x pp), else it must equal that
    # context-parallel ranks: each sample's sequence split over them (2 x cp load-balanced chunks, docs/parallelism.md)
    cp: int = 1
    sequence_parallel: bool = False  # with tp > 1: LayerNorm and dropout regions split over tp along the sequence
    schedule: str = "1f1b"  # pipeline schedule: "1f1b" | "gpipe" | "interleaved"
    virtual_stages: int = 1  # model chunks per pipeline rank (interleaved schedule)
    pipeline_layers: Optional[list[int]] = None  # layers per (virtual) stage; null: uniform
    zero_stage: int = 0  # 0: replicated optimizer; 1: optimizer states sharded over dp (ZeRO-1)
    bucket_size_mb: float = 25.0  # gradient buckets reduced over dp as one collective each
    overlap_grad_sync: bool = True  # launch each bucket's reduction during the backward pass
    grad_reduce_dtype: str = "fp32"  # dtype on the wire of the gradient reduction: "fp32", or "bf16" (half the bytes); buckets accumulate in fp32
    # Activation recompute (docs/precision.md "Activation recompute"): "none"; "selective" recomputes the attention
    # core (scores, softmax, dropout) in backward; "full" keeps only each layer's input and reruns the layer.
    recompute: str = "none"
    recompute_layers: Optional[int] = None  # full only: recompute the first N layers of each model chunk; null: all
    # With sequence_parallel: each column-parallel linear's all-gather and row-parallel linear's reduce-scatter runs
    # in pieces, each overlapped with the GEMM of a neighbouring piece (docs/parallelism.md "TP communication overlap")
    tp_comm_overlap: bool = False
    tp_comm_overlap_chunks: Optional[int] = None  # pieces per collective with tp_comm_overlap (>= 2); null: 4

    DEFAULT_TP_COMM_OVERLAP_CHUNKS: ClassVar[int] = 4

    def overlap_chunks(self) -> int:
        """Pieces each sequence-parallel all-gather / reduce-scatter is cut into: 1 (whole) without tp_comm_overlap."""
        if not self.tp_comm_overlap:
            return 1
        return self.tp_comm_overlap_chunks or self.DEFAULT_TP_COMM_OVERLAP_CHUNKS

    def _check_values(self) -> None:
        self._positive("tp", "pp", "dp", "cp", "virtual_stages", "bucket_size_mb", "recompute_layers")
        self._require(self.zero_stage in (0, 1, 2), "zero_stage", "0, 1 or 2")
        if self.tp_comm_overlap_chunks is not None and not self.tp_comm_overlap:
            raise ConfigError(
                f"parallel.tp_comm_overlap_chunks={self.tp_comm_overlap_chunks} applies to tp_comm_overlap only, but "
                f"parallel.tp_comm_overlap is false: set parallel.tp_comm_overlap=true or remove tp_comm_overlap_chunks"
            )
        if self.tp_comm_overlap_chunks is not None and self.tp_comm_overlap_chunks < 2:
            raise ConfigError(
                f"parallel.tp_comm_overlap_chunks must be >= 2 (one piece overlaps nothing), got "
                f"{self.tp_comm_overlap_chunks}: use 2 or more, or set parallel.tp_comm_overlap=false"
            )
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
        "fp8": ("none", "tensorwise", "rowwise"),
    }

    steps: int = 100  # optimizer steps of the whole run (a resumed run continues up to it)
    micro_batch_size: int = 1  # samples per forward/backward on one rank
    global_batch_size: int = 1  # samples per optimizer step: micro_batch_size x dp x grad_accum_steps
    grad_accum_steps: Optional[int] = None  # micro-batches per step per dp rank; null: derived from the batch sizes
    seed: int = 1234  # seeds the initialisation, dropout and the data order
    precision: str = "fp32"  # bf16 / fp16: low-precision params, fp32 main grads + masters + Adam (docs/precision.md)
    engine: str = "megalm"  # "deepspeed": DeepSpeed's ZeRO for data parallelism (optional extra)
    device: str = "auto"  # "auto": CUDA when a GPU is visible, else CPU
    run_dir: str = "runs/default"  # where config.yaml, metrics.jsonl and checkpoints/ go (--run-dir overrides it)
    collective_timeout_s: float = 300.0  # a collective waiting longer ends the job (NCCL's default: 600)
    eval_interval: int = 0  # evaluate the valid split every N steps (0: never)
    eval_batches: int = 1  # global batches of the valid split per evaluation
    compile: bool = False  # torch.compile each transformer layer (docs/model.md "Compiled layers"); megalm engine only
    # float8 GEMMs in the transformer layers' linears (docs/precision.md "FP8 linears"): none, tensorwise or rowwise
    # dynamic scaling; needs precision bf16 and, on CUDA, a GPU of compute capability >= 8.9
    fp8: str = "none"
    # warn when a rank's compute time per step exceeds this multiple of the median rank's (docs/metrics.md, Stragglers)
    straggler_factor: float = 1.5
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
        self._require(self.straggler_factor > 1.0, "straggler_factor", "> 1.0 (a multiple of the median, e.g. 1.5)")


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
    tokenizer: Optional[str] = None  # the tokenizer the data was made with: a sentencepiece .model, or a Hugging Face tokenizer directory (tokenizer.json)
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
                raise ConfigError(f"data.kind={self.kind} needs data.tokenizer: the sentencepiece .model file or Hugging Face tokenizer directory")
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
