"""Megatron-style tensor parallelism: split linear layers, vocab-parallel embedding and loss.

Activations in the transformer trunk are laid out [s, b, h] (sequence first), so that the
sequence-parallel split and its all-gather / reduce-scatter act on dim 0, the contiguous one.

Communication pairs (forward / backward), each an autograd function:

    copy_to_tp                 identity      / all-reduce      (input of a column-parallel layer)
    reduce_from_tp             all-reduce    / identity        (output of a row-parallel layer)
    gather_from_sequence       all-gather s  / reduce-scatter s (input of column-parallel, SP)
    reduce_scatter_to_sequence reduce-scatter s / all-gather s (output of row-parallel, SP)
    scatter_to_sequence        split s       / all-gather s    (enter the SP region)
    gather_from_tp             all-gather -1 / split -1        (full logits or outputs, tests)

Under sequence parallel a column-parallel linear does not use gather_from_sequence: its all-gather
and GEMM are one function (sequence_parallel_linear) that keeps only the local [s/tp, b, h] shard for
the weight gradient and all-gathers it again in backward, as Megatron-LM does.

Every parameter carries `tp_split_dim` (None when replicated over tp) and `sequence_parallel`
(True when its gradient is a partial sum over sequence shards and must be all-reduced over tp); a
split parameter held by several consecutive tp ranks alike (key/value heads fewer than tp ranks)
carries `tp_replicas`, the number of its copies (`tp_shard`).

With parallel.tp_comm_overlap a sequence-parallel layer built with overlap_chunks > 1 runs its all-gather
(column) or reduce-scatter (row) in that many pieces, each overlapped with the GEMM of a neighbouring
piece (megalm.parallel.tp_overlap); the results are the plain path's.
With train.fp8 the column- and row-parallel layers run their GEMMs in float8 (megalm.parallel.fp8, the
layer's `fp8` recipe, given at construction); the embedding and the output logits stay in high precision.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megalm.distributed import ParallelGroups, ProcessGroup, all_gather_single, reduce_scatter_single, wait_for
from megalm.parallel import tp_overlap
from megalm.parallel.fp8 import linear


def mark_parameter(param: nn.Parameter, tp_split_dim: Optional[int], sequence_parallel: bool = False) -> nn.Parameter:
    """Record how `param` is laid out over the tensor-parallel group."""
    param.tp_split_dim = tp_split_dim
    param.sequence_parallel = sequence_parallel
    return param


def tp_shard(param: nn.Parameter, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """(index of the shard this tp rank holds, number of distinct shards): (tp_rank, tp_size), except for a
    parameter replicated on `tp_replicas` consecutive ranks (key/value heads fewer than tp ranks)."""
    replicas = getattr(param, "tp_replicas", 1)
    return tp_rank // replicas, tp_size // replicas


def first_replica(param: nn.Parameter, tp_rank: int) -> bool:
    """Whether this tp rank holds the first copy of its shard (the one saved and counted in norms)."""
    return tp_rank % getattr(param, "tp_replicas", 1) == 0


# ---- raw collectives (no autograd) ------------------------------------------------------------
def _group_size(group: ProcessGroup) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    if group is not None:
        x = x.contiguous()
        dist.all_reduce(x, group=group)
    return x


def _all_gather_dim0(x: torch.Tensor, group: ProcessGroup, async_op: bool = False):
    """x gathered over the group along dim 0; with async_op, (output, Work): wait before reading it."""
    size = _group_size(group)
    if size == 1:
        return (x, None) if async_op else x
    x = x.contiguous()
    out = torch.empty((size * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    work = all_gather_single(out, x, group=group, async_op=async_op)
    return (out, work) if async_op else out


def _reduce_scatter_dim0(x: torch.Tensor, group: ProcessGroup, async_op: bool = False):
    """This rank's dim-0 slice of x summed over the group; with async_op, (output, Work)."""
    size = _group_size(group)
    if size == 1:
        return (x, None) if async_op else x
    if x.shape[0] % size != 0:
        raise ValueError(f"sequence length {x.shape[0]} is not divisible by tensor-parallel size {size}")
    x = x.contiguous()
    out = torch.empty((x.shape[0] // size,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    work = reduce_scatter_single(out, x, group=group, async_op=async_op)
    return (out, work) if async_op else out


def _split_dim(x: torch.Tensor, dim: int, group: ProcessGroup) -> torch.Tensor:
    size = _group_size(group)
    if size == 1:
        return x
    rank = dist.get_rank(group)
    if x.shape[dim] % size != 0:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by {size} ranks")
    return x.chunk(size, dim=dim)[rank].contiguous()


def _all_gather_last(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    size = _group_size(group)
    if size == 1:
        return x
    # Gathering along dim 0 concatenates the rank slices in rank order.
    return _all_gather_dim0(x.movedim(-1, 0), group).movedim(0, -1).contiguous()


# ---- conjugate autograd functions -----------------------------------------------------------
def _identity(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    return x


def _split_last(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    return _split_dim(x, x.dim() - 1, group)


def _split_first(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    return _split_dim(x, 0, group)


class _Conjugate(torch.autograd.Function):
    """Applies one collective in forward and its conjugate to the gradient in backward."""

    @staticmethod
    def forward(ctx, x, group, forward_op, backward_op):
        ctx.group, ctx.backward_op = group, backward_op
        return forward_op(x, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward_op(grad, ctx.group), None, None, None


def _run_conjugate(x: torch.Tensor, group: ProcessGroup, forward_op, backward_op) -> torch.Tensor:
    """Eager even inside a compiled layer (megalm.model.compile.EAGER_ONLY): the collective stays the
    c10d call that megalm.comm counts and that keeps NCCL's ordering; the compiled graph breaks there."""
    return _Conjugate.apply(x, group, forward_op, backward_op)


def _conjugate(forward_op, backward_op):
    def apply(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        return x if group is None else _run_conjugate(x, group, forward_op, backward_op)

    apply.__doc__ = f"forward: {forward_op.__name__.strip('_')}; backward: {backward_op.__name__.strip('_')}"
    return apply


copy_to_tp = _conjugate(_identity, _all_reduce)
reduce_from_tp = _conjugate(_all_reduce, _identity)
gather_from_sequence = _conjugate(_all_gather_dim0, _reduce_scatter_dim0)
reduce_scatter_to_sequence = _conjugate(_reduce_scatter_dim0, _all_gather_dim0)
scatter_to_sequence = _conjugate(_split_first, _all_gather_dim0)
gather_from_tp = _conjugate(_all_gather_last, _split_last)


class _SequenceParallelLinear(torch.autograd.Function):
    """all-gather over s, then x W_i^T (+ b_i) for each weight: column-parallel linears under sequence parallel.

    Saves only the local [s/tp, b, h] shard (and the weights), not the gathered [s, b, h] input the weight
    gradients need: backward all-gathers the shard again, launched before the input-gradient GEMMs so
    the two overlap, and reduce-scatters the input gradient while the weight-gradient GEMMs run.
    One more all-gather of the shard per layer input in backward buys (tp - 1) / tp of an [s, b, h]
    activation per layer input kept (Megatron-LM does the same). Several weights reading one input
    (query and key/value, SwiGLU's gate and up) share the gathers and the reduce-scatter. The GEMMs are
    those autograd runs for F.linear (mm, weight gradient computed as grad^T x), so the gradients are the
    gather + F.linear path's bit for bit. Under autocast (low-precision grad, fp32 weights) the backward
    GEMMs run in the gradient's dtype, as autocast ran the forward's, and each gradient comes back in its
    input's dtype.
    """

    @staticmethod
    def forward(ctx, shard, group, *params):
        # shard: [s/tp, b, h] -> one [s, b, out_i/tp] per (weight, bias) in params; the gathered input lives
        # only for these GEMMs
        weights, biases = params[0::2], params[1::2]
        ctx.group, ctx.bias_dtypes = group, [None if bias is None else bias.dtype for bias in biases]
        ctx.save_for_backward(shard, *weights)
        full = _all_gather_dim0(shard, group)
        outputs = tuple(F.linear(full, weight, bias) for weight, bias in zip(weights, biases))
        return outputs if len(outputs) > 1 else outputs[0]

    @staticmethod
    def backward(ctx, *grads):
        shard, *weights = ctx.saved_tensors
        need_input = ctx.needs_input_grad[0]
        need_weights, need_biases = ctx.needs_input_grad[2::2], ctx.needs_input_grad[3::2]
        # autograd hands every output a gradient (zeros for an unused one)
        full, gathering = _all_gather_dim0(shard, ctx.group, async_op=True) if any(need_weights) else (None, None)
        grads_2d = [grad.contiguous().view(-1, grad.shape[-1]) for grad in grads]  # [s b, out_i/tp]
        grad_input = scattering = None
        if need_input:
            dtype = grads[0].dtype
            grad_full = grads_2d[0].mm(weights[0].to(dtype))
            for grad_2d, weight in zip(grads_2d[1:], weights[1:]):
                grad_full = grad_full.addmm_(grad_2d, weight.to(dtype))  # the other weights' share, in place
            grad_full = grad_full.view(grads[0].shape[:-1] + (weights[0].shape[1],))  # [s, b, h]
            grad_full = grad_full.to(shard.dtype)  # autocast: summed over tp in the input's dtype, as before
            grad_input, scattering = _reduce_scatter_dim0(grad_full, ctx.group, async_op=True)
        out: list[Optional[torch.Tensor]] = []
        for i, weight in enumerate(weights):
            grad_weight = grad_bias = None
            if need_weights[i]:
                if gathering is not None:
                    wait_for(gathering, lambda: "all_gather of a sequence-parallel linear's input shard (backward)")
                    gathering = None
                grad_2d = grads_2d[i]
                grad_weight = grad_2d.t().mm(full.view(-1, full.shape[-1]).to(grad_2d.dtype)).to(weight.dtype)
            if need_biases[i]:
                grad_bias = grads_2d[i].sum(0).to(ctx.bias_dtypes[i])
            out += [grad_weight, grad_bias]
        if gathering is not None:
            wait_for(gathering, lambda: "all_gather of a sequence-parallel linear's input shard (backward)")
        if scattering is not None:
            wait_for(scattering, lambda: "reduce_scatter of a sequence-parallel linear's input gradient")
        return (grad_input, None, *out)


def _run_sequence_parallel_linear(x: torch.Tensor, group: ProcessGroup, *params: Optional[torch.Tensor]):
    """Eager even inside a compiled layer (megalm.model.compile.EAGER_ONLY), like _run_conjugate."""
    return _SequenceParallelLinear.apply(x, group, *params)


def sequence_parallel_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             group: ProcessGroup, overlap_chunks: int = 1) -> torch.Tensor:
    """F.linear(all-gather over s of x, weight, bias), keeping only the [s/tp, b, h] shard x for backward;
    overlap_chunks > 1: the gather in that many pieces overlapped with the GEMMs (tp_overlap)."""
    if group is None:
        return F.linear(x, weight, bias)
    if overlap_chunks > 1:
        return tp_overlap.gather_linears(x, group, overlap_chunks, weight, bias)
    return _run_sequence_parallel_linear(x, group, weight, bias)


def column_parallel_linears(x: torch.Tensor, layers: list["ColumnParallelLinear"]) -> list[torch.Tensor]:
    """Each column-parallel layer of `layers` applied to one input x ([s, b, h], or [s/tp, b, h] under sequence
    parallel), sharing its all-gather (or its backward all-reduce): the query and key/value projections, SwiGLU's
    gate and up. Biases are added (none is skipped). Returns [s, b, out_i/tp] per layer."""
    first = layers[0]
    params = [t for layer in layers for t in (layer.compute_weight(), layer.compute_bias())]
    if first.sequence_parallel and first.group is not None:
        if first.fp8 != "none":  # the plain all-gather conjugate (keeps the gathered input), see ColumnParallelLinear
            shared = gather_from_sequence(x, first.group)
            return [linear(shared, weight, bias, first.fp8) for weight, bias in zip(params[0::2], params[1::2])]
        if first.overlap_chunks > 1:
            outputs = tp_overlap.gather_linears(x, first.group, first.overlap_chunks, *params)
        else:
            outputs = _run_sequence_parallel_linear(x, first.group, *params)
        return list(outputs) if len(layers) > 1 else [outputs]
    shared = copy_to_tp(x, first.group)
    return [linear(shared, weight, bias, first.fp8) for weight, bias in zip(params[0::2], params[1::2])]


# ---- layers --------------------------------------------------------------------------------
def _divide(total: int, parts: int, what: str) -> int:
    if total % parts != 0:
        raise ValueError(f"{what}={total} is not divisible by tensor-parallel size {parts}")
    return total // parts


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split by rows (output features) over tp: each rank computes a slice of y.

    skip_bias_add: return (x A^T, b) and leave the bias to the caller, which fuses it into the next
    element-wise work (bias + GeLU, megalm.model.layers); the parameters are the same either way.
    overlap_chunks > 1 (sequence parallel, parallel.tp_comm_overlap): the input's all-gather in that many
    pieces, overlapped with the GEMMs (megalm.parallel.tp_overlap); not with fp8 (refused by config validation).
    fp8: "none", or the float8 recipe of the GEMMs ("tensorwise" / "rowwise", megalm.parallel.fp8)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        groups: ParallelGroups,
        bias: bool = True,
        sequence_parallel: bool = False,
        gather_output: bool = False,
        device: torch.device | str | None = None,
        skip_bias_add: bool = False,
        replicas: int = 1,
        overlap_chunks: int = 1,
        fp8: str = "none",
    ) -> None:
        super().__init__()
        self.group = groups.tp_group
        self.fp8 = fp8
        self.sequence_parallel = sequence_parallel
        self.overlap_chunks = overlap_chunks
        if fp8 != "none" and overlap_chunks > 1:
            raise ValueError(f"fp8={fp8!r} with overlap_chunks={overlap_chunks}: the chunked tp_comm_overlap GEMMs "
                             f"run in high precision; use one of train.fp8 and parallel.tp_comm_overlap")
        self.gather_output = gather_output
        self.skip_bias_add = skip_bias_add
        if skip_bias_add and gather_output:
            raise ValueError("skip_bias_add returns the local output slice's bias: it cannot gather the output")
        # replicas > 1: the output features are split over tp / replicas shards, each held by `replicas`
        # consecutive tp ranks (key/value heads fewer than tp); the copies' gradients are summed over
        # exactly those ranks (compute_weight), so the copies stay equal.
        self.replica_group = groups.tp_replica_group(replicas) if replicas > 1 else None
        local_out = _divide(out_features, _divide(groups.tp_size, replicas, "tp / replicas"), "output features")
        self.weight = mark_parameter(nn.Parameter(torch.empty(local_out, in_features, device=device)), 0)
        self.bias = mark_parameter(nn.Parameter(torch.empty(local_out, device=device)), 0) if bias else None
        if replicas > 1:
            for param in self.parameters():
                param.tp_replicas = replicas

    def compute_weight(self) -> torch.Tensor:
        """The weight as the GEMM reads it: with replicas, its gradient is summed over the copies' ranks."""
        return copy_to_tp(self.weight, self.replica_group)

    def compute_bias(self) -> Optional[torch.Tensor]:
        """The bias as the layer adds it (None when it has none), summed over copies like compute_weight."""
        return None if self.bias is None else copy_to_tp(self.bias, self.replica_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, Optional[torch.Tensor]]:
        # x: [s, b, h] replicated, or [s/tp, b, h] with sequence parallel
        weight = self.compute_weight()
        bias = None if self.skip_bias_add else self.compute_bias()
        if self.sequence_parallel and self.fp8 != "none":
            # float8 GEMMs under sequence parallel: the all-gather conjugate, then the fp8 linear. Simpler than
            # fusing them (sequence_parallel_linear); costs keeping the gathered [s, b, h] input for backward.
            y = linear(gather_from_sequence(x, self.group), weight, bias, self.fp8)  # [s, b, out/tp]
        elif self.sequence_parallel:
            y = sequence_parallel_linear(x, weight, bias, self.group, self.overlap_chunks)  # [s, b, out/tp]
        else:
            y = linear(copy_to_tp(x, self.group), weight, bias, self.fp8)  # [s, b, out/tp]
        if self.skip_bias_add:
            return y, self.compute_bias()  # [s, b, out/tp], [out/tp]
        return gather_from_tp(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split by columns (input features): partial sums reduced over tp.

    skip_bias_add: return (reduced x A^T, b), the bias for the caller's bias + dropout + residual. At
    tp 1 there is nothing to reduce, so the bias stays inside the GEMM (addmm) and (x A^T + b, None)
    is returned: one pass fewer over the output, eagerly and compiled. overlap_chunks > 1 (sequence
    parallel, parallel.tp_comm_overlap): the reduce-scatter in that many pieces, overlapped with the GEMM
    (megalm.parallel.tp_overlap); not with fp8. fp8: as ColumnParallelLinear's."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        groups: ParallelGroups,
        bias: bool = True,
        sequence_parallel: bool = False,
        device: torch.device | str | None = None,
        skip_bias_add: bool = False,
        overlap_chunks: int = 1,
        fp8: str = "none",
    ) -> None:
        super().__init__()
        self.group = groups.tp_group
        self.sequence_parallel = sequence_parallel
        self.overlap_chunks = overlap_chunks
        self.skip_bias_add = skip_bias_add
        self.fp8 = fp8
        if fp8 != "none" and overlap_chunks > 1:
            raise ValueError(f"fp8={fp8!r} with overlap_chunks={overlap_chunks}: the chunked tp_comm_overlap GEMMs "
                             f"run in high precision; use one of train.fp8 and parallel.tp_comm_overlap")
        local_in = _divide(in_features, groups.tp_size, "input features")
        self.weight = mark_parameter(nn.Parameter(torch.empty(out_features, local_in, device=device)), 1)
        self.bias = (
            mark_parameter(nn.Parameter(torch.empty(out_features, device=device)), None, sequence_parallel)
            if bias
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, Optional[torch.Tensor]]:
        # x: [s, b, in/tp] -> [s, b, out] (or [s/tp, b, out] with sequence parallel)
        if self.group is None:  # one rank holds all input features: no partial sums to reduce first
            y = linear(x, self.weight, self.bias, self.fp8)
            return (y, None) if self.skip_bias_add else y
        if self.sequence_parallel and self.overlap_chunks > 1:
            y = tp_overlap.linear_reduce_scatter(x, self.weight, self.group, self.overlap_chunks)
        else:
            y = linear(x, self.weight, None, self.fp8)
            y = reduce_scatter_to_sequence(y, self.group) if self.sequence_parallel else reduce_from_tp(y, self.group)
        if self.skip_bias_add:
            return y, self.bias
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split over tp; each rank looks up only its own rows."""

    def __init__(
        self,
        padded_vocab_size: int,
        hidden_size: int,
        groups: ParallelGroups,
        sequence_parallel: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.group = groups.tp_group
        self.sequence_parallel = sequence_parallel
        local_vocab = _divide(padded_vocab_size, groups.tp_size, "padded vocab size")
        self.vocab_start = groups.tp_rank * local_vocab
        self.vocab_end = self.vocab_start + local_vocab
        self.weight = mark_parameter(nn.Parameter(torch.empty(local_vocab, hidden_size, device=device)), 0)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        # token_ids: [s, b] -> [s, b, h] (or [s/tp, b, h] with sequence parallel)
        if self.group is None:
            return F.embedding(token_ids, self.weight)
        outside = (token_ids < self.vocab_start) | (token_ids >= self.vocab_end)
        local_ids = (token_ids - self.vocab_start).masked_fill(outside, 0)
        partial = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence(partial, self.group)
        return reduce_from_tp(partial, self.group)


def parallel_logits(
    hidden: torch.Tensor, weight: torch.Tensor, group: ProcessGroup, sequence_parallel: bool,
    overlap_chunks: int = 1,
) -> torch.Tensor:
    """Output-layer logits against a vocab-split weight: [s, b, h] -> [s, b, v/tp], never gathered.

    Under sequence parallel the [s/tp, b, h] hidden states are all-gathered for the GEMM and only the
    shard is kept for backward (sequence_parallel_linear; in overlap_chunks pieces with tp_comm_overlap)."""
    if sequence_parallel:
        return sequence_parallel_linear(hidden, weight, None, group, overlap_chunks)
    return F.linear(copy_to_tp(hidden, group), weight)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy over vocab-split logits: three all-reduces of [s, b] scalars, no full logits."""

    @staticmethod
    def forward(ctx, logits, target, vocab_start, real_vocab_size, group):
        # logits: [s, b, v/tp] (bf16/fp16 computed in fp32, fp32/fp64 in their own dtype), target: [s, b]
        # One fp32 working copy of the logits, transformed in place (shift, exp, normalise) into the
        # softmax that backward turns into the gradient: with the caller's logits, at most one fp32
        # and one low-precision [s, b, v/tp] tensor are alive (planner: act_bytes + 4 per element).
        ctx.logits_dtype = logits.dtype
        work = logits.to(torch.promote_types(logits.dtype, torch.float32), copy=True)
        local_vocab = work.shape[-1]
        if real_vocab_size is not None and vocab_start + local_vocab > real_vocab_size:
            # Padded vocabulary entries never take part in the softmax.
            work[..., max(real_vocab_size - vocab_start, 0):] = float("-inf")
        logits_max = work.amax(dim=-1)
        if group is not None:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = work.sub_(logits_max.unsqueeze(-1))

        if group is None:  # one rank holds the whole vocabulary: every target is local
            outside, local_target = None, target
            target_logit = shifted.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        else:
            outside = (target < vocab_start) | (target >= vocab_start + local_vocab)
            local_target = (target - vocab_start).masked_fill(outside, 0)
            target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp_()
        sum_exp = exp.sum(dim=-1)
        if group is not None:
            both = torch.stack([target_logit, sum_exp])
            dist.all_reduce(both, group=group)
            target_logit, sum_exp = both[0], both[1]
        loss = sum_exp.log() - target_logit

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, outside = ctx.saved_tensors
        grad = softmax  # reuse the saved buffer: d loss / d logits = softmax - one_hot(target)
        index = local_target.unsqueeze(-1)
        if outside is None:
            grad.scatter_add_(-1, index, torch.full(index.shape, -1.0, dtype=grad.dtype, device=grad.device))
        else:
            grad.scatter_add_(-1, index, -(~outside).to(grad.dtype).unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    groups: ParallelGroups,
    real_vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """Per-token loss [s, b] from vocab-split logits [s, b, v/tp]; padded ids >= real_vocab_size are masked."""
    vocab_start = groups.tp_rank * logits.shape[-1]
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, real_vocab_size, groups.tp_group)


# ---- gradients and full tensors --------------------------------------------------------------


def gather_full_tensor(local: torch.Tensor, tp_split_dim: Optional[int], groups: ParallelGroups,
                       replicas: int = 1) -> torch.Tensor:
    """The full tensor of a (possibly) tp-split parameter or gradient, on every tp rank; `replicas`: the
    parameter's tp_replicas (consecutive ranks holding one shard: the first copy of each is kept)."""
    if tp_split_dim is None or groups.tp_group is None:
        return local.detach().clone()
    gathered = _all_gather_dim0(local.detach().movedim(tp_split_dim, 0), groups.tp_group)
    if replicas > 1:
        gathered = torch.cat(gathered.chunk(groups.tp_size)[::replicas])
    return gathered.movedim(0, tp_split_dim).contiguous()
