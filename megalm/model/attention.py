"""PrefixLM attention: FlexAttention with a block mask, or SDPA with a dense [b, 1, s, s] mask.

LM attention is always SDPA with `is_causal` (flash on GPU). PrefixLM (query i sees key j when
j <= i or j lies in the sample's prefix) chooses by `model.prefix_attention`:

- `flex`: `torch.nn.attention.flex_attention` with a `BlockMask` built once per micro-batch and model
  chunk from the prefix lengths, at 128 x 128 tile granularity ([b, 1, s/128, s/128] ints, built
  arithmetically on the device: no [s, s] tensor), shared by every layer of the chunk. On CUDA the
  call is one module-level `torch.compile`d flex_attention (a fused kernel that skips masked tiles and
  stores no scores); elsewhere it runs eagerly (torch's math path, which materialises the scores).
  FlexAttention has no attention dropout, so `flex` with `model.attention_dropout > 0` is a config
  error. torch 2.13 has no FlexAttention backward on CPU: training with `flex` on CPU fails with a
  message saying so (tests run it eagerly with torch's device check lifted, tests/model/test_flex.py).
- `dense`: SDPA with the dense bool mask (`prefix_attention_mask`), which rules out the flash kernel;
  SDPA turns it into an additive mask in the activation dtype and keeps that for backward in every
  layer (CPU flash and CUDA memory-efficient kernels alike).
- `auto` (default): `flex` on CUDA when `attention_dropout` is 0, else `dense`; the run logs which
  and why (`describe_attention`).

Per-document attention (`model.document_mask`, LM only) takes the same kernel choice: query i sees key
j when j <= i and both lie in the same document of the packed sample ([b, s] `document_ids` from the
data pipeline: each eos ends its document). Its BlockMask is built arithmetically from the tiles' first
and last document ids (`document_block_mask`), its dense equivalent is `document_attention_mask`, and
`document_positions` restarts the positions (learned or rotary) at 0 after each eos.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from megalm.config import ModelConfig

FLEX_BLOCK_SIZE = 128  # FlexAttention's default tile (its kernels' query and key block)


def masked_attention(cfg: ModelConfig) -> bool:
    """Whether attention needs a mask beyond causal: PrefixLM, or per-document attention."""
    return cfg.family == "prefixlm" or cfg.document_mask


def prefix_attention_kernel(cfg: ModelConfig, device_type: str) -> tuple[str, str]:
    """("flex" | "dense", why) for a PrefixLM (or document-masked) model on `device_type` (ModelConfig rejects
    flex with dropout)."""
    choice = cfg.prefix_attention
    if choice != "auto":
        return choice, "model.prefix_attention"
    if cfg.attention_dropout > 0:
        return "dense", "auto: FlexAttention has no attention dropout and model.attention_dropout > 0"
    if device_type != "cuda":
        return "dense", f"auto: torch {torch.__version__} has no FlexAttention backward on {device_type}"
    return "flex", "auto on cuda"


def uses_dense_prefix_mask(cfg: ModelConfig, device_type: str) -> bool:
    """Whether this model keeps SDPA's dense [b, 1, s, s] PrefixLM (or document) mask on `device_type` (`megalm
    plan` counts its bytes); False for causal LM and for FlexAttention, whose block mask is [b, 1, s/128, s/128] ints."""
    return masked_attention(cfg) and prefix_attention_kernel(cfg, device_type)[0] == "dense"


def describe_attention(cfg: ModelConfig, device: torch.device | str, cp: int = 1) -> str:
    """One start-up log line naming the attention kernel of the run and why."""
    if cp > 1:
        what = "PrefixLM" if cfg.family == "prefixlm" else "LM with per-document masks" if cfg.document_mask else "LM"
        return (f"attention: {what}, context parallel over {cp} ranks: keys and values all-gathered, SDPA with a dense "
                f"[b, 1, s/{cp}, s] mask over global positions (megalm.parallel.context)")
    if not masked_attention(cfg):
        return "attention: LM, SDPA is_causal"
    what = "PrefixLM" if cfg.family == "prefixlm" else "LM with per-document masks"
    device_type = torch.device(device).type
    kernel, why = prefix_attention_kernel(cfg, device_type)
    if kernel == "flex":
        how = "compiled" if device_type == "cuda" else "eager"
        return f"attention: {what}, FlexAttention ({how}, {FLEX_BLOCK_SIZE}x{FLEX_BLOCK_SIZE} block mask; {why})"
    return f"attention: {what}, SDPA with a dense [b, 1, s, s] mask ({why})"


def prefix_attention_mask(prefix_lengths: Tensor, seq_length: int) -> Tensor:
    """[b, 1, s, s] bool mask: query i sees key j if j <= i or j lies inside the sample's prefix."""
    positions = torch.arange(seq_length, device=prefix_lengths.device)
    causal = positions.unsqueeze(1) >= positions.unsqueeze(0)  # [s, s]
    in_prefix = positions.unsqueeze(0) < prefix_lengths.view(-1, 1, 1)  # [b, 1, s] over keys
    return (causal.unsqueeze(0) | in_prefix).unsqueeze(1)


def prefix_mask_mod(prefix_lengths: Tensor) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """FlexAttention's mask_mod of a PrefixLM batch: key <= query, or key inside the prefix."""

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx <= q_idx) | (kv_idx < prefix_lengths[b])

    return mask_mod


def prefix_block_mask(prefix_lengths: Tensor, seq_length: int, block_size: int = FLEX_BLOCK_SIZE) -> BlockMask:
    """The BlockMask of `prefix_mask_mod`, from the tile arithmetic alone ([b, 1, n, n] with n = s / block).

    Tile (query block m, key block n) has some visible pair when n <= m (its first key precedes its last
    query) or its first key lies in the prefix; it is full (mask_mod skipped) when every pair is visible:
    both tiles lie wholly inside the sequence and n < m or its last key lies in the prefix. Equal to
    torch's create_block_mask of the same mask_mod (tests/model/test_flex.py), without its [b, 1, s, s].
    """
    blocks = -(-seq_length // block_size)
    index = torch.arange(blocks, device=prefix_lengths.device)
    query, key = index.view(-1, 1), index.view(1, -1)  # [n, 1], [1, n]
    prefix = prefix_lengths.view(-1, 1, 1).to(index.dtype)  # [b, 1, 1]
    visible = (key <= query) | (key * block_size < prefix)  # [b, n, n]
    whole = (index + 1) * block_size <= seq_length  # tiles without padding
    full = (whole.view(-1, 1) & whole.view(1, -1)) & ((key < query) | ((key + 1) * block_size <= prefix))
    partial = visible & ~full
    return BlockMask.from_kv_blocks(
        *_ordered(partial.unsqueeze(1)), *_ordered(full.unsqueeze(1)),
        BLOCK_SIZE=block_size, mask_mod=prefix_mask_mod(prefix_lengths), seq_lengths=(seq_length, seq_length),
    )


def document_positions(document_ids: Tensor) -> Tensor:
    """[b, s] position of each token inside its document: 0 at a document's first token (after an eos)."""
    seq_length = document_ids.shape[1]
    index = torch.arange(seq_length, device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # [b, s] its document's start
    return index - first


def document_attention_mask(document_ids: Tensor) -> Tensor:
    """[b, 1, s, s] bool mask: query i sees key j if j <= i and both lie in the same document."""
    seq_length = document_ids.shape[1]
    positions = torch.arange(seq_length, device=document_ids.device)
    causal = positions.unsqueeze(1) >= positions.unsqueeze(0)  # [s, s]
    same = document_ids.unsqueeze(2) == document_ids.unsqueeze(1)  # [b, s, s]
    return (causal.unsqueeze(0) & same).unsqueeze(1)


def document_mask_mod(document_ids: Tensor) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """FlexAttention's mask_mod of per-document attention: key <= query inside one document
    (`document_ids` [b, >= s], padded past the sequence)."""

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx <= q_idx) & (document_ids[b, q_idx] == document_ids[b, kv_idx])

    return mask_mod


def document_block_mask(document_ids: Tensor, block_size: int = FLEX_BLOCK_SIZE) -> BlockMask:
    """The BlockMask of `document_mask_mod` from the tiles' first and last document ids alone.

    Document ids never decrease along a sample, so key tile n < query tile m has a visible pair exactly
    when its last key's document reaches the query tile's first document, and is full (mask_mod skipped)
    when its first key and the query tile's last query share one document; the diagonal tile is partial.
    The ids are padded to whole tiles with a document of their own. Equal to torch's create_block_mask of
    the same mask_mod (tests/model/test_document_mask.py), without its [b, 1, s, s].
    """
    batch, seq_length = document_ids.shape
    blocks = -(-seq_length // block_size)
    padded = torch.cat([document_ids, (document_ids[:, -1:] + 1).expand(batch, blocks * block_size - seq_length)], 1)
    first, last = padded[:, ::block_size], padded[:, block_size - 1 :: block_size]  # [b, n] per tile
    index = torch.arange(blocks, device=document_ids.device)
    query, key = index.view(-1, 1), index.view(1, -1)  # [n, 1], [1, n]
    visible = (key <= query) & (last.unsqueeze(1) >= first.unsqueeze(2))  # [b, n, n]: [b, query tile, key tile]
    whole = (index + 1) * block_size <= seq_length  # tiles without padding
    full = (whole.view(-1, 1) & whole.view(1, -1)) & (key < query) & (first.unsqueeze(1) == last.unsqueeze(2))
    partial = visible & ~full
    return BlockMask.from_kv_blocks(
        *_ordered(partial.unsqueeze(1)), *_ordered(full.unsqueeze(1)),
        BLOCK_SIZE=block_size, mask_mod=document_mask_mod(padded), seq_lengths=(seq_length, seq_length),
    )


def _ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
    """(number of set tiles per row, their column indices first, ascending) of a [b, h, n, n] bool."""
    dense = dense.to(torch.int32)
    indices = torch.argsort(dense, dim=-1, descending=True, stable=True)
    return dense.sum(dim=-1).to(torch.int32), indices.to(torch.int32)


_compiled_flex_attention: Optional[Callable[..., Tensor]] = None


def _flex_kernel(device_type: str) -> Callable[..., Tensor]:
    """The compiled flex_attention on CUDA (one per process, shared by every layer; built on first use, as
    torch.compile's import takes seconds), the eager one elsewhere. Inside a region being compiled
    (train.compile) the plain function: dynamo traces it into the fused kernel itself."""
    global _compiled_flex_attention
    if device_type != "cuda" or torch.compiler.is_compiling():
        return flex_attention
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention)
    return _compiled_flex_attention


def flex_prefix_attention(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, grouped: bool = False) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over the block mask's visible pairs: [b, nh, s, d], no dropout.
    grouped: k and v have fewer heads than q (each serves a group of query heads)."""
    try:
        return _flex_kernel(q.device.type)(q, k, v, block_mask=block_mask, enable_gqa=grouped)
    except NotImplementedError as error:  # torch has no FlexAttention backward on this device
        if q.device.type == "cuda":
            raise
        raise RuntimeError(
            f"model.prefix_attention=flex cannot train on {q.device.type}: {error} Use model.prefix_attention=auto "
            f"(or dense) there"
        ) from error
