"""Tensor-parallel communication overlap (parallel.tp_comm_overlap): sequence-parallel collectives in chunks.

Under sequence parallel each rank holds m = s / tp rows of the residual stream. A column-parallel linear
all-gathers them into [s, b, h] before its GEMM; a row-parallel linear reduce-scatters its [s, b, h] partial
sums back to [m, b, h] after its GEMM. With `chunks` = k pieces of c = m / k rows, piece j of every rank's
shard is rows j c .. (j+1) c; gathered over tp it is the rows r m + j c .. r m + (j+1) c of the full
sequence for every rank r, a [tp c, b, h] block in rank order. So each collective splits into k
collectives of 1/k the bytes, and each GEMM into k GEMMs on row subsets, paired piece by piece:

    column forward   all-gather piece j+1 (async)        while GEMM(piece j) runs
    column backward  reduce-scatter d input piece j      while d input GEMM(piece j+1) and the weight-gradient
                     (async)                              GEMMs run; the shard's one all-gather (for the
                                                          weight gradients) runs during the d input GEMMs
    row forward      reduce-scatter piece j (async)      while GEMM(piece j+1) runs
    row backward     all-gather d output piece j+1       while d input GEMM(piece j) runs; the weight-gradient
                     (async)                              GEMM follows on the whole gathered gradient

What stays exposed: the first piece's all-gather (nothing to compute before it arrives) and the last
piece's reduce-scatter of a forward (nothing left to compute; backward hides it behind the weight
gradients of a column linear). Only collectives over the tp group are used (no point-to-point), issued
in the same order on every rank, so NCCL's ordering rules hold as for the plain path.

Every GEMM is the plain path's GEMM on a subset of its rows (the same reduction over the same inner
dimension), and the weight gradients are computed once over the whole sequence, as the plain path
does: the results are the plain path's (bit for bit in tests/parallel/test_tp_overlap.py's models and
Trainer runs at tp 2 and 4). A GEMM kernel may pick another blocking for fewer rows, and a reduce-scatter
over tp > 2 ranks another summation order for fewer bytes: then a result moves by rounding only (seen
in the unit test at tp 4 with one-row pieces, within 1e-5).
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalm.distributed import ProcessGroup, all_gather_single, reduce_scatter_single, wait_for


def _tp_size(group: ProcessGroup) -> int:
    return dist.get_world_size(group)


def _piece_rows(rows: int, chunks: int, tp: int = 1) -> int:
    """Rows c of one piece: `rows` (a rank's shard, or tp shards) cut into tp x chunks; a clear error if that
    does not divide them."""
    if chunks < 1 or rows % (tp * chunks) != 0:
        raise ValueError(
            f"parallel.tp_comm_overlap cuts each rank's {rows // tp if rows % tp == 0 else rows / tp} sequence rows "
            f"into tp_comm_overlap_chunks={chunks} pieces, which does not divide them: use a model.seq_length "
            f"divisible by tp x cp x tp_comm_overlap_chunks, or fewer chunks"
        )
    return rows // (tp * chunks)


def _pieces_of_full(full: torch.Tensor, tp: int, chunks: int, j: int) -> torch.Tensor:
    """Rows r m + j c .. r m + (j+1) c for every rank r of a full [s, ...] tensor: a contiguous [tp c, ...] copy."""
    rows = full.shape[0] // (tp * chunks)
    blocks = full.view(tp, chunks, rows, *full.shape[1:])[:, j]  # [tp, c, ...]
    return blocks.reshape(tp * rows, *full.shape[1:]).contiguous()


def _write_piece(full: torch.Tensor, piece: torch.Tensor, tp: int, chunks: int, j: int) -> None:
    """Copy a [tp c, ...] piece to its rows r m + j c .. of the full [s, ...] tensor."""
    rows = piece.shape[0] // tp
    full.view(tp, chunks, rows, *full.shape[1:])[:, j].copy_(piece.view(tp, rows, *piece.shape[1:]))


def _gathered_pieces(shard: torch.Tensor, group: ProcessGroup, chunks: int, what: str) -> Iterator[torch.Tensor]:
    """Piece j of `shard` gathered over tp ([tp c, ...], rank order), for j = 0 .. chunks-1; piece j+1's
    all-gather is in flight while the caller computes on piece j (two pieces alive at a time)."""
    tp, rows = _tp_size(group), _piece_rows(shard.shape[0], chunks)
    shard = shard.contiguous()

    def start(j: int):
        local = shard[j * rows:(j + 1) * rows]
        gathered = torch.empty((tp * rows,) + tuple(shard.shape[1:]), dtype=shard.dtype, device=shard.device)
        return gathered, all_gather_single(gathered, local, group=group, async_op=True)

    pending = start(0)
    for j in range(chunks):
        gathered, work = pending
        if j + 1 < chunks:
            pending = start(j + 1)
        wait_for(work, lambda: f"all_gather of piece {j} of {chunks} of {what} (tp_comm_overlap)")
        yield gathered


class _PieceScatter:
    """Reduce-scatters [tp c, ...] pieces into their rows j c .. of an [m, ...] output, each asynchronously."""

    def __init__(self, out: torch.Tensor, group: ProcessGroup, chunks: int, what: str) -> None:
        self.out, self.group, self.chunks, self.what = out, group, chunks, what
        self.rows = _piece_rows(out.shape[0], chunks)
        self.in_flight: list[tuple[int, torch.Tensor, object]] = []

    def start(self, j: int, piece: torch.Tensor) -> None:
        piece = piece.contiguous()  # kept alive until its reduce-scatter is waited for
        target = self.out[j * self.rows:(j + 1) * self.rows]
        self.in_flight.append((j, piece, reduce_scatter_single(target, piece, group=self.group, async_op=True)))

    def wait(self) -> torch.Tensor:
        for j, _, work in self.in_flight:
            wait_for(work, lambda: f"reduce_scatter of piece {j} of {self.chunks} of {self.what} (tp_comm_overlap)")
        self.in_flight = []
        return self.out


def _scatter_output(like: torch.Tensor, tp: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """An empty [s / tp, b, width] tensor for a reduce-scatter of a [s, b, ...] result."""
    return torch.empty((like.shape[0] // tp,) + tuple(like.shape[1:-1]) + (width,), dtype=dtype, device=like.device)


class _ChunkedGatherLinear(torch.autograd.Function):
    """All-gather over s in pieces, each piece's GEMMs while the next piece travels: the column-parallel
    linears of megalm.parallel.tensor.sequence_parallel_linear (several weights may read one input), chunked.

    Keeps only the [s/tp, b, h] shard for backward, as the plain path does; backward all-gathers it again
    (one collective, during the input-gradient GEMMs) and reduce-scatters the input gradient in pieces."""

    @staticmethod
    def forward(ctx, shard, group, chunks, *params):
        # shard [m, b, h] -> one [s, b, out_i/tp] per (weight, bias) in params
        weights, biases = params[0::2], params[1::2]
        ctx.group, ctx.chunks = group, chunks
        ctx.bias_dtypes = [None if bias is None else bias.dtype for bias in biases]
        ctx.save_for_backward(shard, *weights)
        tp = _tp_size(group)
        outputs: list[Optional[torch.Tensor]] = [None] * len(weights)
        for j, piece in enumerate(_gathered_pieces(shard, group, chunks, "a column-parallel linear's input")):
            for i, (weight, bias) in enumerate(zip(weights, biases)):
                y = F.linear(piece, weight, bias)  # [tp c, b, out_i/tp]
                if outputs[i] is None:
                    outputs[i] = y.new_empty((tp * shard.shape[0],) + tuple(y.shape[1:]))
                _write_piece(outputs[i], y, tp, chunks, j)
        return tuple(outputs) if len(outputs) > 1 else outputs[0]

    @staticmethod
    def backward(ctx, *grads):
        shard, *weights = ctx.saved_tensors
        group, chunks, tp = ctx.group, ctx.chunks, _tp_size(ctx.group)
        need_input = ctx.needs_input_grad[0]
        need_weights, need_biases = ctx.needs_input_grad[3::2], ctx.needs_input_grad[4::2]
        full = gathering = None
        if any(need_weights):  # the whole shard, once: it travels during the input-gradient GEMMs
            full = torch.empty((tp * shard.shape[0],) + tuple(shard.shape[1:]), dtype=shard.dtype, device=shard.device)
            gathering = all_gather_single(full, shard.contiguous(), group=group, async_op=True)
        grads = [grad.contiguous() for grad in grads]  # [s, b, out_i/tp]
        scatter = None
        if need_input:
            dtype = grads[0].dtype
            scatter = _PieceScatter(torch.empty_like(shard), group, chunks, "a column-parallel linear's input gradient")
            for j in range(chunks):
                pieces = [_pieces_of_full(grad, tp, chunks, j) for grad in grads]  # [tp c, b, out_i/tp]
                rows = pieces[0].shape[:-1]
                grad_piece = pieces[0].view(-1, pieces[0].shape[-1]).mm(weights[0].to(dtype))
                for piece, weight in zip(pieces[1:], weights[1:]):
                    grad_piece = grad_piece.addmm_(piece.view(-1, piece.shape[-1]), weight.to(dtype))
                scatter.start(j, grad_piece.view(rows + (weights[0].shape[1],)).to(shard.dtype))  # [tp c, b, h]
        out: list[Optional[torch.Tensor]] = []
        for i, weight in enumerate(weights):
            grad_2d = grads[i].view(-1, grads[i].shape[-1])  # [s b, out_i/tp]
            grad_weight = grad_bias = None
            if need_weights[i]:
                if gathering is not None:
                    wait_for(gathering, lambda: "all_gather of a column-parallel linear's input shard (backward)")
                    gathering = None
                grad_weight = grad_2d.t().mm(full.view(-1, full.shape[-1]).to(grad_2d.dtype)).to(weight.dtype)
            if need_biases[i]:
                grad_bias = grad_2d.sum(0).to(ctx.bias_dtypes[i])
            out += [grad_weight, grad_bias]
        grad_input = None if scatter is None else scatter.wait()
        return (grad_input, None, None, *out)


class _ChunkedLinearReduceScatter(torch.autograd.Function):
    """x W^T in pieces of output rows, each piece reduce-scattered over s while the next piece's GEMM runs:
    a row-parallel linear under sequence parallel (bias added by the caller after the reduction), chunked."""

    @staticmethod
    def forward(ctx, x, weight, group, chunks):
        # x [s, b, in/tp] (partial sums over tp after the GEMM) -> [s/tp, b, out]
        ctx.group, ctx.chunks = group, chunks
        ctx.save_for_backward(x, weight)
        tp = _tp_size(group)
        _piece_rows(x.shape[0], chunks, tp)
        scatter = None
        for j in range(chunks):
            y = F.linear(_pieces_of_full(x, tp, chunks, j), weight)  # [tp c, b, out]
            if scatter is None:
                out = _scatter_output(x, tp, y.shape[-1], y.dtype)
                scatter = _PieceScatter(out, group, chunks, "a row-parallel linear's output")
            scatter.start(j, y)
        return scatter.wait()

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        group, chunks, tp = ctx.group, ctx.chunks, _tp_size(ctx.group)
        # grad [s/tp, b, out] -> gathered [s, b, out] piece by piece, each piece's input-gradient GEMM
        # while the next travels; the weight gradient once over the whole gathered gradient
        dtype = grad.dtype
        grad_full = grad.new_empty((tp * grad.shape[0],) + tuple(grad.shape[1:]))
        grad_input = x.new_empty(x.shape) if ctx.needs_input_grad[0] else None
        for j, piece in enumerate(_gathered_pieces(grad, group, chunks, "a row-parallel linear's output gradient")):
            if grad_input is not None:
                piece_input = piece.view(-1, piece.shape[-1]).mm(weight.to(dtype))  # [tp c b, in/tp]
                _write_piece(grad_input, piece_input.view(piece.shape[:-1] + (x.shape[-1],)).to(x.dtype), tp, chunks, j)
            _write_piece(grad_full, piece, tp, chunks, j)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_2d = grad_full.view(-1, grad_full.shape[-1])
            grad_weight = grad_2d.t().mm(x.reshape(-1, x.shape[-1]).to(dtype)).to(weight.dtype)
        return grad_input, grad_weight, None, None


def gather_linears(shard: torch.Tensor, group: ProcessGroup, chunks: int, *params: Optional[torch.Tensor]):
    """F.linear(all-gather over s of shard, W_i, b_i) for each (W_i, b_i) in params, the gather in `chunks`
    pieces overlapped with the GEMMs; one [s, b, out_i/tp] output, or a tuple of them. Eager even inside a
    compiled layer (megalm.model.compile.EAGER_ONLY), like the plain path."""
    return _ChunkedGatherLinear.apply(shard, group, chunks, *params)


def linear_reduce_scatter(x: torch.Tensor, weight: torch.Tensor, group: ProcessGroup, chunks: int) -> torch.Tensor:
    """Reduce-scatter over s of F.linear(x, weight) ([s, b, in/tp] -> [s/tp, b, out]), in `chunks` pieces
    overlapped with the GEMMs. Eager even inside a compiled layer (megalm.model.compile.EAGER_ONLY)."""
    return _ChunkedLinearReduceScatter.apply(x, weight, group, chunks)
