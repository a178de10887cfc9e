"""Context parallelism's core: the load-balanced sequence split, attention across it, and the loss rule.

The split. Each sample's sequence of length S is cut into 2 x cp chunks of S / (2 cp) tokens; cp rank r
holds chunks r and 2cp-1-r, in that order. Under a causal mask the work of a query grows with its
position, so pairing an early chunk with a late one gives every rank the same attention cost.
`cp_positions` gives the global positions of a rank's tokens: positions (learned tables, rotary
angles, per-document positions) and masks are indexed by them, so they follow the tokens.

Attention across the split: all-gather of keys and values over the cp group, not a ring. Each rank's
local queries then attend, in one SDPA call, to every key of the sequence under a mask built from
GLOBAL positions. Why:
- exact for every mask with no extra machinery: a document or PrefixLM mask is one dense mask over
  global positions; a ring needs per-step masks, a log-sum-exp merge of partial results that must stay
  stable when a query sees no key in a step, and a backward that replays each step's own keys and
  values (the bugs peers shipped). Here each query row always sees at least itself, as at cp = 1;
- with grouped-query attention the keys and values are small (kv_heads / heads of the queries' size),
  so the gathered tensor is cheap next to the activations cp divides; Llama 3 trained with document
  masks this way for the same reasons;
- the cost: the gather is not overlapped with compute, and each rank keeps the whole sequence's keys
  and values of a layer for backward (cp times its own). The gather's autograd conjugate is a
  reduce-scatter: every rank's key/value gradients are summed onto the rank that owns those tokens.

Plain causal attention on CUDA needs no mask: with the gathered keys in sequence order, each of the rank's
two chunks attends to the keys up to its own end under a lower-right causal bias (two SDPA calls, a fused
kernel). PrefixLM and document masks, and causal attention elsewhere (`dense_causal_mask`), run SDPA with a
dense mask [b, 1, s_local, S] over global positions, made additive in the activations' dtype once per
micro-batch and shared by the layers. FlexAttention on CUDA, with a block mask built once per micro-batch from the same global
positions, is the later fast path; the mask functions here are what it must equal. Attention dropout
draws from the tp-distinct stream, whose seed includes the cp rank (megalm.parallel.random), so cp ranks
never share a dropout mask.

In the model (megalm.model.gpt): the trainer cuts each micro-batch once (Batch.cp_split: tokens, labels,
loss mask; prefix lengths and document ids stay whole); every stage computes its tokens' global
positions (`cp_positions`, or per-document positions indexed by them) for the learned or rotary tables,
and one `ContextParallelMask` per micro-batch and chunk that its layers hand to `gathered_attention`.

The loss rule: the loss of a cp-split sequence is the sum of the per-token losses over all cp ranks
divided by the count of loss tokens over all cp ranks (both all-reduced): never a mean per rank
(ranks hold different counts) and never multiplied by cp. `cp_loss` returns this rank's share (its
masked sum over the global count: backward gives every token its exact gradient, and the parameter
gradients then sum over the dp x cp group) and the loss itself; a rank with no loss token adds 0.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from megalm.distributed import ProcessGroup
from megalm.parallel.tensor import gather_from_sequence

MaskKind = Literal["causal", "prefix", "document"]
MASK_KINDS = ("causal", "prefix", "document")


# ---- the load-balanced split ------------------------------------------------------------------
def _chunk_length(seq_length: int, cp: int) -> int:
    """Tokens per chunk; a length not divisible by 2 x cp is an error naming both numbers."""
    if not isinstance(cp, int) or cp < 1:
        raise ValueError(f"cp must be a positive integer, got {cp!r}")
    if seq_length % (2 * cp) != 0:
        raise ValueError(
            f"sequence length {seq_length} is not divisible by 2 x cp = {2 * cp} (cp = {cp}): context parallelism "
            f"splits each sequence into 2 x cp equal chunks; choose a sequence length that is a multiple of {2 * cp}"
        )
    return seq_length // (2 * cp)


def _check_cp_rank(cp: int, cp_rank: int) -> None:
    if not 0 <= cp_rank < cp:
        raise ValueError(f"cp rank {cp_rank} is outside 0..{cp - 1}")


def cp_chunks(cp: int, cp_rank: int) -> tuple[int, int]:
    """The two chunk indices (of 2 x cp) that `cp_rank` holds: r and 2cp-1-r."""
    _check_cp_rank(cp, cp_rank)
    return cp_rank, 2 * cp - 1 - cp_rank


def cp_split(x: Tensor, cp: int, cp_rank: int, dim: int) -> Tensor:
    """`cp_rank`'s part of `x` along the sequence dimension `dim`: chunks r and 2cp-1-r of 2 x cp, concatenated."""
    if cp == 1:
        return x
    chunk = _chunk_length(x.shape[dim], cp)
    first, second = cp_chunks(cp, cp_rank)
    return torch.cat([x.narrow(dim, first * chunk, chunk), x.narrow(dim, second * chunk, chunk)], dim=dim)


def cp_positions(seq_length: int, cp: int, cp_rank: int, device: Optional[torch.device] = None) -> Tensor:
    """Global positions (int64, [seq_length / cp]) of `cp_rank`'s tokens, in local order."""
    if cp == 1:
        _check_cp_rank(cp, cp_rank)
        return torch.arange(seq_length, device=device)
    chunk = _chunk_length(seq_length, cp)
    first, second = cp_chunks(cp, cp_rank)
    local = torch.arange(chunk, device=device)
    return torch.cat([local + first * chunk, local + second * chunk])


def cp_unsplit(parts: Sequence[Tensor], dim: int) -> Tensor:
    """The inverse of cp_split: every cp rank's part (in cp-rank order) put back into sequence order."""
    cp = len(parts)
    if cp == 0:
        raise ValueError("cp_unsplit needs the part of every cp rank, got none")
    if cp == 1:
        return parts[0]
    local = parts[0].shape[dim]
    if local % 2 != 0 or any(part.shape[dim] != local for part in parts):
        lengths = [part.shape[dim] for part in parts]
        raise ValueError(f"cp parts must all hold the same even length along dim {dim}, got {lengths}")
    chunk = local // 2
    ordered: list[Optional[Tensor]] = [None] * (2 * cp)
    for rank, part in enumerate(parts):
        first, second = cp_chunks(cp, rank)
        ordered[first], ordered[second] = part.narrow(dim, 0, chunk), part.narrow(dim, chunk, chunk)
    return torch.cat(ordered, dim=dim)  # type: ignore[arg-type]


def _group_size(group: ProcessGroup) -> int:
    return 1 if group is None else dist.get_world_size(group)


def cp_gather(x: Tensor, group: ProcessGroup, dim: int) -> Tensor:
    """Every cp rank's part of `x` (split along `dim`) gathered into the whole sequence, in sequence order.

    Its backward is the conjugate reduce-scatter: right when each rank's objective is its own term of a sum
    (as cp_loss's shares are); where every rank computes the same objective from the gathered tensor that
    sums cp equal gradients, so gather under torch.no_grad() for outputs (tests, generation)."""
    cp = _group_size(group)
    if cp == 1:
        return x
    gathered = gather_from_sequence(x.movedim(dim, 0), group)  # [cp * local, ...] in cp-rank order
    return cp_unsplit(list(gathered.chunk(cp, dim=0)), 0).movedim(0, dim)


# ---- masks over global positions ----------------------------------------------------------------
def attention_mask(
    query_positions: Tensor,
    key_positions: Tensor,
    kind: MaskKind = "causal",
    prefix_lengths: Optional[Tensor] = None,
    document_ids: Optional[Tensor] = None,
) -> Tensor:
    """Boolean mask (True = attend) [b or 1, 1, len(query_positions), len(key_positions)] from global positions.

    causal: key <= query; prefix: key <= query or key < prefix_lengths[b]; document: same document id
    (document_ids [b, S] over global positions) and key <= query."""
    q = query_positions.view(-1, 1)
    k = key_positions.view(1, -1)
    causal = (k <= q).unsqueeze(0)  # [1, sq, sk]
    if kind == "causal":
        mask = causal
    elif kind == "prefix":
        if prefix_lengths is None:
            raise ValueError("a prefix mask needs prefix_lengths ([b] tokens of each sample's prefix)")
        mask = causal | (k.unsqueeze(0) < prefix_lengths.view(-1, 1, 1).to(k.device))
    elif kind == "document":
        if document_ids is None:
            raise ValueError("a document mask needs document_ids ([b, S] document index of every global position)")
        ids = document_ids.to(k.device)
        same = ids[:, query_positions].unsqueeze(-1) == ids[:, key_positions].unsqueeze(-2)  # [b, sq, sk]
        mask = causal & same
    else:
        raise ValueError(f"mask kind {kind!r} is not one of {', '.join(MASK_KINDS)}")
    return mask.unsqueeze(1)


# ---- attention across the split -------------------------------------------------------------------
def gather_keys_values(k: Tensor, v: Tensor, group: ProcessGroup) -> tuple[Tensor, Tensor]:
    """[b, kv_heads, s_local, d] keys and values of every cp rank, concatenated along s in cp-rank order
    (not sequence order: masks index them by `gathered_key_positions`). Backward: reduce-scatter."""
    if _group_size(group) == 1:
        return k, v
    # One collective for both: they are gathered over the same group and their gradients come back together.
    kv = torch.stack([k, v]).movedim(3, 0)  # [s_local, 2, b, h, d]: dim 0 is what the gather concatenates
    gathered = gather_from_sequence(kv, group).movedim(0, 3)  # [2, b, h, cp * s_local, d]
    return gathered[0], gathered[1]


def gathered_key_positions(seq_length: int, cp: int, device: Optional[torch.device] = None) -> Tensor:
    """Global positions of the keys as `gather_keys_values` lays them out (cp rank 0's tokens, then rank 1's, ...)."""
    return torch.cat([cp_positions(seq_length, cp, rank, device) for rank in range(cp)])


def context_parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: ProcessGroup,
    kind: MaskKind = "causal",
    prefix_lengths: Optional[Tensor] = None,
    document_ids: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> Tensor:
    """Attention of this cp rank's queries over the whole sequence; [b, heads, s_local, d] in and out.

    q: [b, heads, s_local, d]; k, v: [b, kv_heads, s_local, d] (kv_heads dividing heads: grouped-query),
    each this rank's cp_split part, its cp rank being its rank in `group`. prefix_lengths [b] for kind='prefix'; document_ids [b, S] over global
    positions for kind='document'; scale defaults to 1 / sqrt(d). With group None (cp = 1) it is plain
    attention under the same mask."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [b, heads, s, d], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    cp = _group_size(group)
    cp_rank = dist.get_rank(group) if cp > 1 else 0  # the cp groups list their ranks in cp order
    seq_length = q.shape[2] * cp
    if document_ids is not None and document_ids.shape[-1] != seq_length:
        raise ValueError(f"document_ids cover {document_ids.shape[-1]} positions, the sequence has {seq_length}")
    mask = context_parallel_mask(seq_length, group, cp_rank, kind, prefix_lengths, document_ids, q.device)
    return gathered_attention(q, k, v, mask, scale=scale)


def dense_causal_mask(device_type: str) -> bool:
    """Whether plain causal attention at cp > 1 uses the shared dense mask on this device: on CUDA each chunk's
    lower-right causal bias runs a fused kernel (flash or memory-efficient) with no mask in memory; elsewhere
    torch materialises that bias in every call (an fp32 [s/2cp, keys] mask per chunk and layer, kept for
    backward), so one additive mask per micro-batch, shared by the layers, costs less."""
    return device_type != "cuda"


class ContextParallelMask:
    """What a layer is handed to attend across the cp split, built once per micro-batch and model chunk
    (`context_parallel_mask`) and shared by the chunk's layers: the cp group, this rank's place in it, and
    either a dense mask [b or 1, 1, s_local, S] of this rank's queries over the keys as `gather_keys_values`
    lays them out (boolean, or additive in the activations' dtype), or None for plain causal attention."""

    def __init__(self, mask: Optional[Tensor], group: ProcessGroup, cp_rank: int = 0) -> None:
        self.mask = mask
        self.group = group
        self.cp_rank = cp_rank


def context_parallel_mask(
    seq_length: int,
    group: ProcessGroup,
    cp_rank: int,
    kind: MaskKind = "causal",
    prefix_lengths: Optional[Tensor] = None,
    document_ids: Optional[Tensor] = None,
    device: Optional[torch.device] = None,
    dtype: Optional[torch.dtype] = None,
    dense_causal: bool = False,
) -> ContextParallelMask:
    """The ContextParallelMask of `cp_rank`'s queries over the whole sequence of `seq_length` tokens.

    Plain causal attention needs no mask (`gathered_attention` runs each of the rank's two chunks over the
    keys up to its end, lower-right causal) unless dense_causal. dtype (the activations'): the dense mask is
    made additive (0 where a query attends, -inf elsewhere) once here, so every layer's SDPA reads the same
    tensor; handed a boolean mask, SDPA would convert it in every layer and keep each copy for backward."""
    cp = _group_size(group)
    if kind == "causal" and not dense_causal:
        return ContextParallelMask(None, group, cp_rank)
    query_pos = cp_positions(seq_length, cp, cp_rank, device)
    key_pos = gathered_key_positions(seq_length, cp, device)
    mask = attention_mask(query_pos, key_pos, kind, prefix_lengths, document_ids)
    if dtype is not None:  # every query row sees at least itself: no row is all -inf
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return ContextParallelMask(mask, group, cp_rank)


def gathered_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: ContextParallelMask, dropout_p: float = 0.0, scale: Optional[float] = None
) -> Tensor:
    """A layer's attention core across the cp split: gather every rank's keys and values, then attend; q
    [b, heads, s_local, d], k and v [b, kv_heads, s_local, d]; [b, heads, s_local, d] out.

    With a dense mask: one SDPA call under it. Plain causal (mask None): the gathered keys and values are put
    in sequence order, and each of the rank's two chunks (global chunks r and 2cp-1-r) attends to the keys up
    to its own end under a lower-right causal bias: no mask in memory, and on CUDA the flash kernel runs."""
    keys, values = gather_keys_values(k, v, mask.group)
    grouped = q.shape[1] != k.shape[1]
    if mask.mask is not None:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.mask, dropout_p=dropout_p,
                                              scale=scale, enable_gqa=grouped)
    cp = _group_size(mask.group)
    if cp == 1:
        return F.scaled_dot_product_attention(q, keys, values, dropout_p=dropout_p, is_causal=True, scale=scale,
                                              enable_gqa=grouped)
    from torch.nn.attention.bias import causal_lower_right  # imports torch._dynamo (seconds): only where used

    keys, values = (cp_unsplit(list(t.chunk(cp, dim=2)), 2) for t in (keys, values))  # sequence order
    chunk = q.shape[2] // 2
    outputs = []
    for half, index in enumerate(cp_chunks(cp, mask.cp_rank)):
        end = (index + 1) * chunk  # the chunk's queries see keys 0 .. end-1, the last chunk of them causally
        outputs.append(F.scaled_dot_product_attention(
            q.narrow(2, half * chunk, chunk), keys.narrow(2, 0, end), values.narrow(2, 0, end),
            attn_mask=causal_lower_right(chunk, end), dropout_p=dropout_p, scale=scale, enable_gqa=grouped,
        ))
    return torch.cat(outputs, dim=2)


# ---- the loss rule ----------------------------------------------------------------------------------
def cp_loss(token_losses: Tensor, loss_mask: Tensor, group: ProcessGroup) -> tuple[Tensor, Tensor]:
    """(this rank's share, the loss): share = masked sum / global loss-token count (call backward on it;
    the shares of the cp ranks sum to the loss), loss = global masked sum / global count, the same on every
    rank and detached. `group` spans every rank holding tokens of the averaged samples (cp, or dp x cp).
    A rank with no loss token has share 0; a batch with no loss token anywhere has loss 0, not NaN."""
    mask = loss_mask.to(torch.bool)
    local_sum = torch.where(mask, token_losses, torch.zeros_like(token_losses)).sum()  # masked NaN/inf stay out
    totals = torch.stack([local_sum.detach().to(torch.float64), mask.sum().to(torch.float64)])
    if group is not None:
        dist.all_reduce(totals, group=group)
    count = totals[1].clamp(min=1.0)
    share = local_sum / count.to(local_sum.dtype)
    return share, (totals[0] / count).to(token_losses.dtype)
