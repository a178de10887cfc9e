"""GPT decoder, LM and PrefixLM: one model whose two families differ only in masks.

`GPTModel` is one pipeline stage: the embedding on the first stage, its share of the layers, and
the final norm plus the tied output layer and loss on the last stage (all of it when pp = 1).
Each rank builds only its own shard; `build_model` constructs on the meta device and fills the
shard from (seed, parameter name), so the same seed gives the same full model at any layout.

Under bf16/fp16 (`train.precision`) the parameters are initialised in fp32 exactly as in fp32 runs,
then cast: the low-precision model is the rounded fp32 model, and the matmuls read it directly
(no autocast). Activations follow the parameters' dtype; LayerNorm statistics, softmax and the
loss are computed in fp32 (megalm.model.layers, megalm.parallel.tensor).

PrefixLM attention is FlexAttention with a block mask, or SDPA with a dense [b, 1, s, s] mask
(`model.prefix_attention`, megalm.model.attention); either is built once per micro-batch and chunk and
shared by the chunk's layers. Per-document attention (`model.document_mask`) is the same choice over
the micro-batch's document ids, whose per-document positions index the learned or rotary tables.

Context parallelism (`parallel.cp` > 1, megalm.parallel.context): each rank holds chunks r and 2cp-1-r
of every sample's sequence (the trainer cuts the micro-batch once, Batch.cp_split); every stage indexes
the learned or rotary tables by its tokens' global positions, and its layers attend over keys and values
gathered from the cp group: under one dense mask over global positions (PrefixLM, per-document, causal off
CUDA), or, causal on CUDA, each of the rank's two chunks under a lower-right causal bias.

Activation recompute (`parallel.recompute`): "full" keeps only the input of each of a chunk's first
`recompute_layers` layers (all by default) and reruns the layer in backward; "selective" reruns the
attention core only. Both redraw the forward's dropout masks (megalm.parallel.random.recompute).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from megalm.config import Config, ModelConfig
from megalm.distributed import ParallelGroups
from megalm.model.attention import (
    document_attention_mask, document_block_mask, document_positions, masked_attention, prefix_attention_kernel,
    prefix_attention_mask, prefix_block_mask,
)
from megalm.model.init import initialize_parameters_
from megalm.model.layers import Embedding, TransformerLayer, make_norm
from megalm.model.rope import rotary_tables
from megalm.parallel.context import context_parallel_mask, cp_positions, dense_causal_mask
from megalm.parallel.fp8 import check_fp8_device
from megalm.parallel.random import ParallelRNG, recompute
from megalm.parallel.schedules import partition_layers
from megalm.parallel.tensor import mark_parameter, parallel_logits, vocab_parallel_cross_entropy

EMBEDDING_NAME = "embedding.word.weight"
PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def param_dtype(config: Config) -> torch.dtype:
    """The dtype the model's parameters (and activations) are held in for this run.

    megalm's engine holds them in train.precision; DeepSpeed is handed fp32 parameters (its bf16
    mode is autocast, megalm.engines.deepspeed_engine).
    """
    if config.train.engine == "deepspeed":
        return torch.float32
    return PARAM_DTYPES[config.train.precision]


def describe_architecture(cfg: ModelConfig) -> str:
    """One line naming the modules the spec picks, e.g. 'rmsnorm, swiglu MLP, 32 heads / 8 kv heads x 128, ...'."""
    heads = f"{cfg.num_heads} heads" + (f" / {cfg.kv_heads()} kv heads" if cfg.grouped_attention() else "")
    biases = "biases" if cfg.bias and cfg.has_qkv_bias() else "q/k/v biases only" if cfg.has_qkv_bias() else (
        "biases except q/k/v" if cfg.bias else "no biases")
    positions = "learned positions" if cfg.position_embedding == "learned" else (
        f"rotary (base {cfg.rotary_base:g}" + ("" if cfg.rope_scaling == "none" else
                                              f", {cfg.rope_scaling} x{cfg.rope_factor:g}") + ")")
    return (f"{cfg.norm} (eps {cfg.norm_eps:g}), {cfg.mlp} MLP {cfg.ffn_size()}, {heads} x {cfg.head_size()}, {biases}, "
            f"{positions}, {'tied' if cfg.tie_embeddings else 'untied'} output layer")


@dataclass(frozen=True)
class StageSpec:
    """What one (virtual) pipeline stage holds: its layers, and the embedding / output layer."""

    layers: range
    first: bool
    last: bool


def stage_specs(
    num_layers: int, groups: ParallelGroups, virtual_stages: int = 1, pipeline_layers: Optional[list[int]] = None
) -> list[StageSpec]:
    """The StageSpec of each model chunk on this rank; chunk c is virtual stage c * pp + pp_rank."""
    pp = groups.pp_size
    total = pp * virtual_stages
    ranges = partition_layers(num_layers, total, pipeline_layers)
    stages = [chunk * pp + groups.pp_rank for chunk in range(virtual_stages)]
    return [StageSpec(ranges[stage], stage == 0, stage == total - 1) for stage in stages]


class OutputLayer(nn.Module):
    """The untied output layer (model.tie_embeddings false): [padded vocab / tp, h] on the last stage,
    split over tp by vocabulary rows like the embedding (the logits stay vocab-parallel)."""

    def __init__(self, cfg: ModelConfig, groups: ParallelGroups, overlap_chunks: int = 1) -> None:
        super().__init__()
        self.tp_group = groups.tp_group
        self.overlap_chunks = overlap_chunks
        local_vocab = cfg.padded_vocab_size(groups.tp_size) // groups.tp_size
        self.weight = mark_parameter(nn.Parameter(torch.empty(local_vocab, cfg.hidden_size)), 0)

    def forward(self, hidden: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
        """Vocab-split logits [s, b, v/tp] of hidden [s(/tp), b, h]. Called as a module, so that what runs
        before a block's forward (ZeRO-1's wait for the weight's all-gather) runs before it."""
        return parallel_logits(hidden, self.weight, self.tp_group, sequence_parallel, self.overlap_chunks)


class GPTModel(nn.Module):
    """One pipeline stage (model chunk) of a tensor-parallel GPT (LM or PrefixLM)."""

    def __init__(
        self,
        cfg: ModelConfig,
        groups: ParallelGroups,
        rng: ParallelRNG,
        sequence_parallel: bool = False,
        spec: Optional[StageSpec] = None,
        recompute: str = "none",
        recompute_layers: Optional[int] = None,
        overlap_chunks: int = 1,
        fp8: str = "none",
    ) -> None:
        super().__init__()
        if recompute not in ("none", "selective", "full"):
            raise ValueError(f"recompute must be 'none', 'selective' or 'full', got {recompute!r}")
        spec = spec or stage_specs(cfg.num_layers, groups)[0]
        self.cfg = cfg
        self.groups = groups
        self.rng = rng
        self.sequence_parallel = sequence_parallel and groups.tp_size > 1
        # parallel.tp_comm_overlap: pieces of each sequence-parallel all-gather / reduce-scatter (1: not split)
        self.overlap_chunks = overlap_chunks if self.sequence_parallel else 1
        self.is_first = spec.first
        self.is_last = spec.last
        self.layer_ids = spec.layers
        self._rotary: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (seq_len, device) -> cos, sin
        self.prefix_kernel = prefix_attention_kernel(cfg, groups.device.type)[0] if masked_attention(cfg) else None
        # full: this chunk's first recomputed_layers layers keep only their input (a chunk with fewer
        # layers than recompute_layers recomputes all of them)
        self.recomputed_layers = 0
        if recompute == "full":
            self.recomputed_layers = len(spec.layers) if recompute_layers is None else min(recompute_layers, len(spec.layers))
        self.embedding = Embedding(cfg, groups, rng, self.sequence_parallel) if self.is_first else None
        # Keys are global layer indices, so parameter names do not depend on the pipeline split.
        self.layers = nn.ModuleDict({
            str(i): TransformerLayer(cfg, groups, rng, self.sequence_parallel, recompute_core=recompute == "selective",
                                     overlap_chunks=self.overlap_chunks, fp8=fp8)
            for i in self.layer_ids
        })
        self.final_norm = make_norm(cfg, self.sequence_parallel, groups.device.type) if self.is_last else None
        self.output_weight: Optional[nn.Parameter] = None
        self.output: Optional[OutputLayer] = None
        if self.is_last and not cfg.tie_embeddings:  # an output layer of its own, vocab-parallel like the embedding
            self.output = OutputLayer(cfg, groups, self.overlap_chunks)
        elif self.is_last and not self.is_first:
            # The last stage's copy of the tied embedding: same name-derived init, kept in sync by
            # all-reducing its gradient with the first stage's over the embedding group.
            local_vocab = cfg.padded_vocab_size(groups.tp_size) // groups.tp_size
            self.output_weight = mark_parameter(nn.Parameter(torch.empty(local_vocab, cfg.hidden_size)), 0)
            self.output_weight.init_name = EMBEDDING_NAME
            self.output_weight.embedding_copy = True  # counted once (first stage) in the grad norm

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the parameters (fp32, or bf16/fp16 under mixed precision)."""
        return next(self.parameters()).dtype

    def _rotary_table(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary cos, sin [seq_len, 1, 1, d], computed once per (length, device), not every forward."""
        key = (seq_len, device)
        if key not in self._rotary:
            self._rotary[key] = rotary_tables(self.cfg, seq_len, device)
        return self._rotary[key]

    def _logits(self, hidden: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
        """Vocab-split logits [s, b, v/tp]: the untied output layer, or the (copy of the) tied embedding."""
        if self.output is not None:
            return self.output(hidden, sequence_parallel)
        weight = self.embedding.word.weight if self.output_weight is None else self.output_weight
        return parallel_logits(hidden, weight, self.groups.tp_group, sequence_parallel, self.overlap_chunks)

    def forward(
        self,
        inputs: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        prefix_lengths: Optional[torch.Tensor] = None,
        document_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """First stage takes token ids [b, s]; later stages hidden states [s, b, h].

        document_ids [b, s] (model.document_mask; every stage): each token's document in its packed sample
        (Batch.document_ids); None: each sample is one document (evaluation rows), plain causal attention.

        Returns per-token losses [b, s] on the last stage when labels are given, vocab-split
        logits [s, b, v/tp] when not, and hidden states [s, b, h] on the other stages.
        """
        groups, cp = self.groups, self.groups.cp_size
        local_len = inputs.shape[1] if self.is_first else inputs.shape[0] * (
            groups.tp_size if self.sequence_parallel else 1
        )  # this rank's tokens of each sample (the whole sequence at cp = 1)
        seq_len = local_len * cp
        global_positions = None  # cp > 1: [s / cp] global positions of this rank's tokens (chunks r, 2cp-1-r)
        if cp > 1:
            global_positions = cp_positions(seq_len, cp, groups.cp_rank, inputs.device)
        positions = None  # [b, s(/cp)] positions of their own: per document, or global ones under cp
        documents = self.cfg.document_mask and document_ids is not None
        if documents:
            positions = document_positions(document_ids)  # over the whole sequence (document ids stay whole)
            if global_positions is not None:
                positions = positions[:, global_positions]
        elif global_positions is not None and self.is_first:
            positions = global_positions.expand(inputs.shape[0], -1)
        # A later stage computes in the parameters' dtype whatever dtype its input message arrived in.
        hidden = self.embedding(inputs, positions) if self.is_first else inputs.to(self.dtype)
        attn_mask = None  # causal via SDPA's is_causal
        if self.cfg.family == "prefixlm" and prefix_lengths is None:
            raise ValueError("a PrefixLM model needs prefix_lengths for every sample")
        if cp > 1:  # attention over the cp group's keys (a dense mask or lower-right causal), once per micro-batch
            kind = "prefix" if self.cfg.family == "prefixlm" else "document" if documents else "causal"
            attn_mask = context_parallel_mask(seq_len, groups.cp_group, groups.cp_rank, kind, prefix_lengths,
                                              document_ids if documents else None, hidden.device, hidden.dtype,
                                              dense_causal_mask(hidden.device.type))
        elif documents:  # built once per micro-batch and chunk, shared by its layers
            attn_mask = (document_block_mask if self.prefix_kernel == "flex" else document_attention_mask)(document_ids)
        elif self.cfg.family == "prefixlm":
            build_mask = prefix_block_mask if self.prefix_kernel == "flex" else prefix_attention_mask
            attn_mask = build_mask(prefix_lengths, seq_len)  # a BlockMask, or a [b, 1, s, s] bool tensor
        rotary = None
        if self.cfg.position_embedding == "rotary":
            rotary = self._rotary_table(seq_len, hidden.device)
            if documents:  # each token's row of the table: [s, b, 1, d]
                rotary = tuple(table[positions.t()].squeeze(2) for table in rotary)
            elif global_positions is not None:  # this rank's rows: [s / cp, 1, 1, d]
                rotary = tuple(table[global_positions] for table in rotary)
        recomputing = torch.is_grad_enabled()  # nothing to save (generation, evaluation): run plainly
        for index, layer in enumerate(self.layers.values()):
            if recomputing and index < self.recomputed_layers:
                hidden = recompute(layer, self.rng, hidden, attn_mask, rotary)  # keeps the [s(/tp), b, h] input
            else:
                hidden = layer(hidden, attn_mask, rotary)
        if not self.is_last:
            return hidden
        hidden = self.final_norm(hidden)
        logits = self._logits(hidden, self.sequence_parallel)
        if labels is None:
            return logits
        losses = vocab_parallel_cross_entropy(logits, labels.t(), self.groups, self.cfg.vocab_size)  # [s, b]
        return losses.t()

    def decode(
        self,
        inputs: torch.Tensor,
        positions: torch.Tensor,
        attn_mask: torch.Tensor,
        caches: Optional[dict[int, object]] = None,
    ) -> torch.Tensor:
        """Generation's forward (megalm.generate), without sequence parallel.

        inputs: token ids [b, s] (first stage) or hidden states [s, b, h]; positions [b, s] (< seq_length) of each
        token (left-padded prompts start later); attn_mask [b, 1, s, keys] bool over the cached keys
        then these; caches: {global layer index: LayerCache} or None (the inputs are then the whole
        sequence). Returns vocab-split logits [s, b, v/tp] on the last stage, hidden states elsewhere.
        """
        if self.sequence_parallel:
            raise ValueError("decode runs without sequence parallel: build the model with sequence_parallel=False")
        hidden = self.embedding(inputs, positions) if self.is_first else inputs.to(self.dtype)
        rotary = None
        if self.cfg.position_embedding == "rotary":
            cos, sin = self._rotary_table(self.cfg.seq_length, hidden.device)  # [seq_length, 1, 1, d]
            rotary = cos[positions.t()].squeeze(2), sin[positions.t()].squeeze(2)  # [s, b, 1, d]
        for index, layer in self.layers.items():
            # .forward: eager even under train.compile (a compiled layer would recompile for every
            # cache length); the parameters are current (ZeRO-1 callers wait for their gathers first).
            hidden = layer.forward(hidden, attn_mask, rotary, None if caches is None else caches[int(index)])
        if not self.is_last:
            return hidden
        return self._logits(self.final_norm(hidden), False)


def build_model(
    cfg: ModelConfig,
    groups: ParallelGroups,
    seed: int,
    sequence_parallel: bool = False,
    materialize: bool = True,
    spec: Optional[StageSpec] = None,
    rng: Optional[ParallelRNG] = None,
    dtype: torch.dtype = torch.float32,
    recompute: str = "none",
    recompute_layers: Optional[int] = None,
    overlap_chunks: int = 1,
    fp8: str = "none",
) -> GPTModel:
    """Build this rank's shard on the meta device, then (optionally) allocate and initialise it.

    Parameters are initialised in fp32, then cast to `dtype` (the rounded fp32 model). overlap_chunks > 1
    (with sequence_parallel): parallel.tp_comm_overlap's pieces (megalm.parallel.tp_overlap). fp8: the
    transformer layers' float8 GEMM recipe (train.fp8, megalm.parallel.fp8); the parameters are the same."""
    rng = rng or ParallelRNG(seed, groups)
    with torch.device("meta"):
        model = GPTModel(cfg, groups, rng, sequence_parallel, spec, recompute, recompute_layers, overlap_chunks, fp8)
    if materialize:
        materialize_model(model, groups.device, seed)
    if dtype != torch.float32:
        model.to(dtype)  # in place (param.data), so the Parameter objects and their layout attributes stay
    return model


def build_model_chunks(config: Config, groups: ParallelGroups, materialize: bool = True) -> list[GPTModel]:
    """This rank's model chunks (one per virtual pipeline stage), sharing one ParallelRNG."""
    parallel = config.parallel
    if config.model.grouped_attention() and groups.tp_size > config.model.kv_heads():
        # Creating process groups is collective: every rank makes the key/value replica groups here, also
        # a rank whose pipeline stage holds no layer (parallel.pipeline_layers may give a stage none).
        groups.tp_replica_group(groups.tp_size // config.model.kv_heads())
    check_fp8_device(config.train.fp8, groups.device)
    rng = ParallelRNG(config.train.seed, groups)
    specs = stage_specs(config.model.num_layers, groups, parallel.virtual_stages, parallel.pipeline_layers)
    dtype = param_dtype(config)
    return [
        build_model(config.model, groups, config.train.seed, parallel.sequence_parallel, materialize, spec, rng, dtype,
                    parallel.recompute, parallel.recompute_layers, parallel.overlap_chunks(), config.train.fp8)
        for spec in specs
    ]


def materialize_model(model: GPTModel, device: torch.device, seed: int) -> GPTModel:
    """Allocate a meta-device model's shard on `device` and initialise it from (seed, name)."""
    # to_empty may replace Parameter objects; keep the layout attributes the shards depend on.
    layout = {name: dict(vars(p)) for name, p in model.named_parameters()}
    model.to_empty(device=device)
    for name, param in model.named_parameters():
        for key, value in layout[name].items():
            setattr(param, key, value)
    initialize_parameters_(
        model, seed, model.cfg.init_std, model.cfg.num_layers, model.groups.tp_rank, model.groups.tp_size
    )
    return model


def count_parameters(model: nn.Module) -> int:
    """Parameters held by this rank (works on the meta device: nothing is allocated)."""
    return sum(p.numel() for p in model.parameters())
