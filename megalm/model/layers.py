"""Transformer building blocks: embeddings, attention, MLP and the pre-LayerNorm layer.

Activations are [s, b, h] (sequence first, see megalm.parallel.tensor). With sequence parallel
the residual stream is [s/tp, b, h] and attention/MLP see the full sequence through the
all-gather inside the column-parallel layers.

Selective activation recompute (`recompute_core`) keeps the attention core's inputs (q, k, v and
the mask) instead of what it saves inside (scores, probabilities, dropout mask) and reruns it in
backward; full recompute wraps whole layers (megalm.model.gpt).

Under sequence parallel with parallel.tp_comm_overlap, every column- and row-parallel linear is built
with `overlap_chunks` > 1: its all-gather or reduce-scatter runs in pieces overlapped with its GEMMs
(megalm.parallel.tp_overlap). The layers pass the number on; nothing else changes.

The attention core is SDPA (causal, or a dense PrefixLM mask) or, handed a BlockMask, FlexAttention
(PrefixLM, megalm.model.attention).

Element-wise work after the matmuls goes through two functions, as in Megatron: the row-parallel
layers return their bias apart ("skip bias add") for `bias_dropout_add` (residual + dropout(y + b)),
and under train.compile the first MLP layer does too, for `bias_gelu`. Eagerly they are the same
ops in the same order as an unfused layer (bit for bit); in a compiled layer (megalm.model.compile)
inductor fuses each into one kernel. Dropout on split activations swaps in the tp-distinct stream,
which a compiled graph cannot trace: it runs eagerly there (a graph break), drawing eager's masks.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from megalm.config import ModelConfig
from megalm.distributed import ParallelGroups
from megalm.kernels import layer_norm_class
from megalm.model.attention import BlockMask, flex_prefix_attention
from megalm.parallel.context import ContextParallelMask, gathered_attention
from megalm.parallel.random import ParallelRNG, recompute
from megalm.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    column_parallel_linears,
    mark_parameter,
)


def layer_norm(
    hidden_size: int, eps: float, sequence_parallel: bool, device_type: Optional[str] = None
) -> nn.Module:
    """A LayerNorm replicated over tp (its grads are partial sums under sequence parallel).

    apex's FusedLayerNorm on CUDA when usable, else torch's (megalm.kernels); same parameters.
    device_type None means the default device: cuda when visible, else cpu.
    """
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    cls = layer_norm_class(device_type)
    if cls is nn.LayerNorm:
        cls = LayerNorm
    norm = cls(hidden_size, eps=eps)
    for param in norm.parameters():
        mark_parameter(param, None, sequence_parallel)
    return norm


def make_norm(cfg: ModelConfig, sequence_parallel: bool, device_type: Optional[str] = None) -> nn.Module:
    """The model's norm (model.norm): LayerNorm (weight and bias) or RMSNorm (weight), replicated over tp."""
    if cfg.norm == "rmsnorm":
        norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        for param in norm.parameters():
            mark_parameter(param, None, sequence_parallel)
        return norm
    return layer_norm(cfg.hidden_size, cfg.norm_eps, sequence_parallel, device_type)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, the statistics and the scaling in fp32 (fp64 for an fp64 model).

    As transformers' Llama computes it: the normalised x is cast back to the input's dtype before the
    weight multiplies it, so a bf16 model matches transformers' bf16 model."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = x.to(torch.promote_types(x.dtype, torch.float32))
        work = work * torch.rsqrt(work.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * work.to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm with fp32 statistics for bf16/fp16 inputs on every device.

    torch's CPU kernel computes a bf16 input's statistics in fp32 but keeps the mean and 1/std
    for backward in bf16, unless the weight is fp32 ("mixed" inputs). So low-precision weights
    (held in the run's precision, like every parameter) are passed as fp32: the kernel then keeps
    fp32 statistics, and the output stays in the input's dtype. On CUDA torch's kernel keeps fp32
    statistics either way; apex FusedLayerNorm does too (megalm.kernels). Only bf16/fp16 weights are
    up-cast: an fp64 model (numerical checks against other implementations) stays fp64 throughout.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low_precision = (torch.bfloat16, torch.float16)
        if self.weight is None or self.weight.dtype not in low_precision or x.device.type != "cpu":
            return super().forward(x)  # fp32 and fp64 (numerical checks) run torch's kernel as is
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x, self.normalized_shape, self.weight.float(), bias, self.eps)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate q or k [s, b, heads, d] by position (in fp32, or fp64 for an fp64 model)."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    work = torch.promote_types(x.dtype, torch.float32)
    return (x.to(work) * cos + rotated.to(work) * sin).to(x.dtype)


class Embedding(nn.Module):
    """Vocab-parallel token embedding plus optional learned absolute positions, then dropout."""

    def __init__(self, cfg: ModelConfig, groups: ParallelGroups, rng: ParallelRNG, sequence_parallel: bool) -> None:
        super().__init__()
        self.groups = groups
        self.rng = rng
        self.sequence_parallel = sequence_parallel
        self.dropout = cfg.hidden_dropout
        self.word = VocabParallelEmbedding(
            cfg.padded_vocab_size(groups.tp_size), cfg.hidden_size, groups, sequence_parallel
        )
        self.position: Optional[nn.Parameter] = None
        if cfg.position_embedding == "learned":
            self.position = mark_parameter(
                nn.Parameter(torch.empty(cfg.max_positions(), cfg.hidden_size)), None, sequence_parallel
            )

    def forward(self, token_ids: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        # token_ids: [b, s] -> [s, b, h] ([s/tp, b, h] with sequence parallel)
        hidden = self.word(token_ids.t())
        if self.position is not None and positions is not None:  # generation, documents: [b, s] positions of their own
            rows = positions.t()  # [s, b]
            if self.sequence_parallel:
                shard = hidden.shape[0]
                rows = rows[self.groups.tp_rank * shard : (self.groups.tp_rank + 1) * shard]
            hidden = hidden + self.position[rows]
        elif self.position is not None:
            seq_len = token_ids.shape[1]
            positions = self.position[:seq_len]
            if self.sequence_parallel:
                shard = hidden.shape[0]
                positions = positions[self.groups.tp_rank * shard : (self.groups.tp_rank + 1) * shard]
            hidden = hidden + positions.unsqueeze(1)
        return _dropout(hidden, self.dropout, self.training, self.rng, self.sequence_parallel)


def _dropout(x: torch.Tensor, p: float, training: bool, rng: ParallelRNG, split: bool) -> torch.Tensor:
    """Dropout from the replicated stream, or the tp-distinct one for split activations."""
    if p == 0.0 or not training:
        return x
    if split:
        return _distinct_dropout(x, p, rng)
    return F.dropout(x, p, training=True)


# What a layer is handed to mask attention: None (causal), a dense bool mask, a FlexAttention BlockMask, or
# (context parallelism) a ContextParallelMask: gather the cp group's keys and values, then attend (gathered_attention).
AttentionMask = Union[None, torch.Tensor, BlockMask, ContextParallelMask]


def _distinct_dropout(x: torch.Tensor, p: float, rng: ParallelRNG) -> torch.Tensor:
    """Dropout from the tp-distinct stream; eager inside a compiled layer (it swaps generator state,
    megalm.model.compile.EAGER_ONLY)."""
    with rng.tp_distinct():
        return F.dropout(x, p, training=True)


def _eager(function, *args):
    """function(*args), outside any compiled graph (megalm.model.compile.EAGER_ONLY): the attention
    core while it swaps in the tp-distinct stream (dropout) or recomputes under its own checkpoint."""
    return function(*args)


def bias_gelu(y: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """GeLU(y + bias): a column-parallel layer's skipped bias and the activation, one kernel when compiled."""
    return F.gelu(y if bias is None else y + bias, approximate="tanh")


def bias_dropout_add(
    y: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor, p: float, training: bool,
    rng: ParallelRNG, split: bool,
) -> torch.Tensor:
    """residual + dropout(y + bias): a row-parallel layer's skipped bias, the hidden dropout and the
    residual add, one kernel when compiled (unless the dropout is on a split activation, see _dropout)."""
    if bias is not None:
        y = y + bias
    return residual + _dropout(y, p, training, rng, split)


class Attention(nn.Module):
    """Self-attention with heads split over tp: multi-head (one fused QKV weight laid out per head) or
    grouped-query (query and key/value weights apart; with fewer key/value heads than tp ranks each is
    replicated on tp / num_kv_heads ranks, megalm.parallel.tensor.ColumnParallelLinear's replicas).

    recompute_core: selective recompute, the core (QK^T, softmax, dropout, PV) reruns in backward.
    overlap_chunks: the linears' tp_comm_overlap pieces (1: not split).
    fp8: the projections' float8 recipe (train.fp8, megalm.parallel.fp8), "none" for high precision."""

    def __init__(
        self, cfg: ModelConfig, groups: ParallelGroups, rng: ParallelRNG, sequence_parallel: bool,
        recompute_core: bool = False, overlap_chunks: int = 1, fp8: str = "none",
    ) -> None:
        super().__init__()
        self.rng = rng
        self.recompute_core = recompute_core
        tp = groups.tp_size
        self.local_heads = cfg.num_heads // tp
        self.head_dim = cfg.head_size()
        self.dropout = cfg.attention_dropout
        kv_heads, width = cfg.kv_heads(), cfg.num_heads * self.head_dim
        self.grouped = cfg.grouped_attention()
        if self.grouped:
            self.local_kv_heads = max(1, kv_heads // tp)
            # query rows (head, d); key/value rows (kv head, k|v, d): a contiguous split over tp hands each
            # rank whole heads, and the key/value heads of its query heads
            self.query = ColumnParallelLinear(cfg.hidden_size, width, groups, bias=cfg.has_qkv_bias(),
                                              sequence_parallel=sequence_parallel, overlap_chunks=overlap_chunks,
                                              fp8=fp8)
            self.key_value = ColumnParallelLinear(
                cfg.hidden_size, 2 * kv_heads * self.head_dim, groups, bias=cfg.has_qkv_bias(),
                sequence_parallel=sequence_parallel, replicas=max(1, tp // kv_heads), overlap_chunks=overlap_chunks,
                fp8=fp8,
            )
        else:
            self.local_kv_heads = self.local_heads
            # Rows of the full QKV weight are ordered (head, q|k|v, head_dim), so a contiguous split
            # over tp hands each rank whole heads with their q, k and v.
            self.qkv = ColumnParallelLinear(cfg.hidden_size, 3 * width, groups, bias=cfg.has_qkv_bias(),
                                            sequence_parallel=sequence_parallel, overlap_chunks=overlap_chunks,
                                            fp8=fp8)
        self.proj = RowParallelLinear(
            width, cfg.hidden_size, groups, bias=cfg.bias, sequence_parallel=sequence_parallel, skip_bias_add=True,
            overlap_chunks=overlap_chunks, fp8=fp8,
        )

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [s, b, heads/tp, d] and k, v [s, b, kv heads on this rank, d] of x."""
        if not self.grouped:
            qkv = self.qkv(x)  # [s, b, 3 * local_heads * d]
            seq_len, batch = qkv.shape[:2]
            q, k, v = qkv.view(seq_len, batch, self.local_heads, 3, self.head_dim).unbind(dim=3)
            return q, k, v
        q, kv = column_parallel_linears(x, [self.query, self.key_value])  # [s, b, heads/tp * d], [s, b, 2 kv d]
        seq_len, batch = q.shape[:2]
        k, v = kv.view(seq_len, batch, self.local_kv_heads, 2, self.head_dim).unbind(dim=3)
        return q.view(seq_len, batch, self.local_heads, self.head_dim), k, v

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: AttentionMask,
        rotary: Optional[tuple[torch.Tensor, torch.Tensor]],
        kv_cache=None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(output without its bias [s(/tp), b, h], the projection's bias): see bias_dropout_add.

        kv_cache (generation, megalm.generate.LayerCache): keys and values of earlier positions,
        to which this call's are appended; attention then spans all of them (attn_mask covers them)."""
        q, k, v = self._project(x)  # [s, b, nh, d], [s, b, nkv, d]
        seq_len, batch = q.shape[:2]
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, nh, s, d]
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # [b, nh, cached + s, d]
        if self.recompute_core and torch.is_grad_enabled():
            if self._draws_masks(attn_mask):
                out = _eager(recompute, self._core, self.rng, q, k, v, attn_mask)
            else:  # nothing random: a compiled layer traces it
                out = recompute(self._core, None, q, k, v, attn_mask)
        elif self.training and self.dropout > 0:
            out = _eager(self._core, q, k, v, attn_mask)  # tp-distinct dropout masks
        else:
            out = self._core(q, k, v, attn_mask)
        out = out.permute(2, 0, 1, 3).reshape(seq_len, batch, self.local_heads * self.head_dim)  # [s, b, h/tp]
        return self.proj(out)

    def _draws_masks(self, attn_mask: AttentionMask) -> bool:
        """Whether the selectively recomputed core must run eagerly (megalm.model.compile.EAGER_ONLY):
        its dropout swaps in the tp-distinct stream, which recompute rewinds. FlexAttention (no dropout)
        stays eager too: its block mask is not handed through a traced checkpoint."""
        return (self.training and self.dropout > 0) or isinstance(attn_mask, BlockMask)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: AttentionMask) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + mask) with dropout, times v: [b, nh, s, d].

        None: causal (SDPA is_causal); a bool tensor: SDPA with that mask; a BlockMask: FlexAttention
        (PrefixLM, no dropout: ModelConfig allows flex only with attention_dropout 0)."""
        grouped = k.shape[1] != q.shape[1]  # each key/value head serves heads / kv_heads query heads
        if isinstance(attn_mask, BlockMask):
            return flex_prefix_attention(q, k, v, attn_mask, grouped)
        dropout = self.dropout if self.training else 0.0
        # Local heads are split activations: their dropout masks must differ across tp ranks (and cp ranks).
        with self.rng.tp_distinct() if dropout > 0 else contextlib.nullcontext():
            if isinstance(attn_mask, ContextParallelMask):  # keys and values of the whole sequence, from the cp group
                return gathered_attention(q, k, v, attn_mask, dropout)
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=attn_mask is None, enable_gqa=grouped
            )


class MLP(nn.Module):
    """h -> ffn (column-parallel) -> GeLU -> h (row-parallel).

    fc1 keeps its bias inside the GEMM (addmm, faster eagerly) unless its skip_bias_add is set, as
    megalm.model.compile does for bias_gelu; fc2 hands its bias on (bias_dropout_add) where tp > 1."""

    def __init__(self, cfg: ModelConfig, groups: ParallelGroups, sequence_parallel: bool,
                 overlap_chunks: int = 1, fp8: str = "none") -> None:
        super().__init__()
        self.fc1 = ColumnParallelLinear(cfg.hidden_size, cfg.ffn_size(), groups, bias=cfg.bias,
                                        sequence_parallel=sequence_parallel, overlap_chunks=overlap_chunks, fp8=fp8)
        self.fc2 = RowParallelLinear(
            cfg.ffn_size(), cfg.hidden_size, groups, bias=cfg.bias, sequence_parallel=sequence_parallel,
            skip_bias_add=True, overlap_chunks=overlap_chunks, fp8=fp8,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(output without its bias, fc2's bias): see bias_dropout_add."""
        hidden = bias_gelu(*self.fc1(x)) if self.fc1.skip_bias_add else bias_gelu(self.fc1(x), None)
        return self.fc2(hidden)


class SwiGLU(nn.Module):
    """h -> down(silu(gate(x)) * up(x)) -> h: gate and up column-parallel (two weights, so each rank holds
    its own halves of both and any tp reshards them as plain row splits), down row-parallel."""

    def __init__(self, cfg: ModelConfig, groups: ParallelGroups, sequence_parallel: bool,
                 overlap_chunks: int = 1, fp8: str = "none") -> None:
        super().__init__()
        ffn = cfg.ffn_size()
        split = dict(sequence_parallel=sequence_parallel, overlap_chunks=overlap_chunks, fp8=fp8)
        self.gate = ColumnParallelLinear(cfg.hidden_size, ffn, groups, bias=cfg.bias, **split)
        self.up = ColumnParallelLinear(cfg.hidden_size, ffn, groups, bias=cfg.bias, **split)
        self.down = RowParallelLinear(ffn, cfg.hidden_size, groups, bias=cfg.bias, skip_bias_add=True, **split)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(output without its bias, down's bias): see bias_dropout_add."""
        gate, up = column_parallel_linears(x, [self.gate, self.up])  # [s, b, ffn/tp] each
        return self.down(F.silu(gate) * up)


MLP_CLASSES = {"gelu": MLP, "swiglu": SwiGLU}


class TransformerLayer(nn.Module):
    """Pre-norm block: x + drop(attn(ln1(x))), then x + drop(mlp(ln2(x))) (LayerNorm or RMSNorm, GeLU or SwiGLU).

    fp8: the float8 recipe of its linears (train.fp8; "none": high precision)."""

    def __init__(
        self, cfg: ModelConfig, groups: ParallelGroups, rng: ParallelRNG, sequence_parallel: bool,
        recompute_core: bool = False, overlap_chunks: int = 1, fp8: str = "none",
    ) -> None:
        super().__init__()
        self.rng = rng
        self.sequence_parallel = sequence_parallel
        self.dropout = cfg.hidden_dropout
        self.ln1 = make_norm(cfg, sequence_parallel, groups.device.type)
        self.attn = Attention(cfg, groups, rng, sequence_parallel, recompute_core, overlap_chunks, fp8)
        self.ln2 = make_norm(cfg, sequence_parallel, groups.device.type)
        self.mlp = MLP_CLASSES[cfg.mlp](cfg, groups, sequence_parallel, overlap_chunks, fp8)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: AttentionMask,
        rotary: Optional[tuple[torch.Tensor, torch.Tensor]],
        kv_cache=None,
    ) -> torch.Tensor:
        drop = (self.dropout, self.training, self.rng, self.sequence_parallel)
        x = bias_dropout_add(*self.attn(self.ln1(x), attn_mask, rotary, kv_cache), x, *drop)
        return bias_dropout_add(*self.mlp(self.ln2(x)), x, *drop)
