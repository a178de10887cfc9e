"""Data-parallel gradient sync: contiguous fp32 main-grad buckets, reductions overlapped with backward, ZeRO-1.

Every parameter's gradient is accumulated (by a post-accumulate-grad hook) into a slice of a
contiguous fp32 bucket, its *main gradient*: the per-micro-batch `.grad` (in the parameter's
dtype, bf16/fp16 under mixed precision) is added into the fp32 slice and freed, so small
contributions of many micro-batches are kept whatever the parameter's precision. A parameter's
gradient is final after its m-th accumulation of the step (m = micro-batches), so no signal from
the schedule is needed and no collective ever runs on a non-final micro-batch. When every
parameter of a bucket is final, the bucket's reduction over the data-parallel group is launched
asynchronously (buckets in a fixed order, the same on every rank), overlapping the rest of the
backward pass; `finish()` waits before the optimizer step.

- Plain data parallel: all-reduce (sum) of each bucket. The loss is already divided by the
  global token count, so a sum is right. fp32 parameters then see their main gradient as `.grad`.
- ZeRO-1 (`shard=True`): reduce-scatter of each bucket instead: dp rank r receives the summed
  slice r of every bucket (buckets are padded to a multiple of dp) in an fp32 shard buffer. The
  parameters of a bucket then live in one contiguous buffer of their own dtype, laid out like the
  gradient bucket (`Bucket.param_data`): the optimizer (megalm.parallel.optimizer) steps only slice r,
  writes it into slice r of that buffer, and `gather_parameters` all-gathers every bucket in place,
  asynchronously, in forward order. A forward pre-hook on each block of the model (embedding, each
  layer, ...) waits for the gathers of that block's buckets, so the later buckets' gathers overlap
  the earlier blocks' forward; `wait_parameters()` waits for all (before parameters are read outside
  a forward: checkpoints, the next optimizer step).
- `reduce_dtype=torch.bfloat16` changes only the wire: a bf16 copy of the bucket is reduced
  (half the bytes) and the result is written back into the fp32 buffers. Accumulation stays fp32.

With context parallelism (parallel.cp > 1) the ranks that reduce and shard together are dp x cp
(`ParallelGroups.grad_group`): cp ranks hold the same weights and each computed the gradient of its own
tokens' share of the loss, so their gradients are summed like those of dp ranks.

Two reductions are folded in: sequence-parallel gradients (replicated params that saw only this
rank's sequence shard) are summed over tp in the hook, as tp ranks run their backward in
lockstep; the tied embedding's two copies (first and last pipeline stage) sit in a bucket of
their own that is summed over the embedding group in `finish()`, after the pipeline drained
(in the hook it could deadlock against the stages still sending gradients).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from megalm.distributed import ParallelGroups, ProcessGroup, all_gather_single, reduce_scatter_single, wait_for
from megalm.parallel.tensor import first_replica


@dataclass
class Bucket:
    """A contiguous gradient buffer for some parameters (padded to a multiple of dp for ZeRO-1)."""

    index: int
    params: list[nn.Parameter]
    offsets: list[int]
    grad: torch.Tensor
    deferred: bool = False  # reduced in finish() (the tied embedding across pipeline stages)
    ready: int = 0
    launched: bool = False
    handle: Optional[dist.Work] = None
    shard_main: Optional[torch.Tensor] = None  # ZeRO-1: this rank's reduced slice, fp32, for the optimizer
    wire: Optional[torch.Tensor] = None  # reduce_dtype copy of the bucket while its reduction runs
    wire_shard: Optional[torch.Tensor] = None  # ZeRO-1 with a low-precision wire: the reduce-scatter output
    param_data: Optional[torch.Tensor] = None  # ZeRO-1: the parameters' storage (their dtype, padded like grad)
    gather: Optional[dist.Work] = None  # ZeRO-1: the in-flight all-gather of param_data

    @property
    def numel(self) -> int:
        return self.grad.numel()


@dataclass
class Segment:
    """The part of one parameter whose main gradient this rank's optimizer reads: its ZeRO-1 shard
    of a bucket, or (without ZeRO) the whole parameter."""

    param: nn.Parameter
    param_lo: int  # range in the flattened parameter
    param_hi: int
    shard_lo: int  # where it sits in the bucket's shard (ZeRO-1) or in the bucket (without ZeRO)
    bucket: Bucket = field(repr=False)

    @property
    def numel(self) -> int:
        return self.param_hi - self.param_lo


class GradientSync:
    """Bucketed, overlapped reduction of gradients over the data-parallel group."""

    def __init__(
        self,
        chunks: list[nn.Module],
        groups: ParallelGroups,
        bucket_bytes: int = 25 * 2**20,
        overlap: bool = True,
        shard: bool = False,
        events: Optional[list] = None,
        reduce_dtype: torch.dtype = torch.float32,
    ) -> None:
        if reduce_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"reduce_dtype must be torch.float32 or torch.bfloat16, got {reduce_dtype}")
        self.groups = groups
        self.reduce_dtype = reduce_dtype  # the wire only: buckets accumulate in fp32 always
        self.overlap = overlap
        self.shard = shard
        self.events = events  # when a list: ("hook", name, count), ("launch", bucket), ("gather", bucket) and
        # ("gather_wait", bucket) in order
        self.dp = groups.grad_size  # dp x cp: every rank holding these weights
        self.buckets: list[Bucket] = []
        self._views: dict[nn.Parameter, torch.Tensor] = {}
        self._bucket_of: dict[nn.Parameter, Bucket] = {}
        self._counts: dict[nn.Parameter, int] = {}
        self._names: dict[nn.Parameter, str] = {}
        self.num_microbatches = 1
        # Backward runs from the last chunk's last layer to the first chunk's first: bucket in that order.
        ordered: list[list[tuple[str, nn.Parameter]]] = []
        for chunk in reversed(chunks):
            named = [(n, p) for n, p in chunk.named_parameters() if p.requires_grad]
            ordered.append(list(reversed(named)))
        tied = [(n, p) for group in ordered for n, p in group if self._is_cross_stage_tie(chunks, p)]
        regular = [(n, p) for group in ordered for n, p in group if not self._is_cross_stage_tie(chunks, p)]
        self._make_buckets(regular, bucket_bytes)
        if tied:
            self._make_bucket(tied, deferred=True)
        for bucket in self.buckets:
            for param in bucket.params:
                param.register_post_accumulate_grad_hook(self._hook)
        self._gathering = 0  # ZeRO-1: parameter all-gathers in flight
        if self.shard:
            self._register_gather_waits(chunks)

    def _is_cross_stage_tie(self, chunks: list[nn.Module], param: nn.Parameter) -> bool:
        if self.groups.pp_size == 1 or not chunks[0].cfg.tie_embeddings:
            return False
        first, last = chunks[0], chunks[-1]
        embedding = first.embedding.word.weight if getattr(first, "embedding", None) is not None else None
        return param is embedding or param is getattr(last, "output_weight", None)

    def _make_buckets(self, named: list[tuple[str, nn.Parameter]], bucket_bytes: int) -> None:
        current: list[tuple[str, nn.Parameter]] = []
        size = 0
        for name, param in named:
            current.append((name, param))
            size += param.numel() * 4  # fp32 main gradients
            if size >= bucket_bytes:
                self._make_bucket(current)
                current, size = [], 0
        if current:
            self._make_bucket(current)

    def _make_bucket(self, named: list[tuple[str, nn.Parameter]], deferred: bool = False) -> None:
        offsets, total = [], 0
        for _, param in named:
            offsets.append(total)
            total += param.numel()
        padded = -(-total // self.dp) * self.dp if self.shard else total  # equal shards for reduce-scatter
        grad = torch.zeros(padded, dtype=torch.float32, device=self.groups.device)
        bucket = Bucket(len(self.buckets), [p for _, p in named], offsets, grad, deferred)
        if self.shard:
            bucket.shard_main = torch.zeros(padded // self.dp, dtype=torch.float32, device=self.groups.device)
            bucket.param_data = self._parameter_buffer(named, offsets, padded)
        for (name, param), offset in zip(named, offsets):
            self._views[param] = grad[offset : offset + param.numel()].view_as(param)
            self._bucket_of[param] = bucket
            self._names[param] = name
        self.buckets.append(bucket)

    def _parameter_buffer(self, named: list[tuple[str, nn.Parameter]], offsets: list[int], padded: int) -> torch.Tensor:
        """ZeRO-1: move a bucket's parameters into one buffer laid out like its gradients (the all-gather target)."""
        dtypes = {param.dtype for _, param in named}
        if len(dtypes) != 1:
            raise ValueError(
                f"ZeRO-1 gathers a bucket's parameters in one dtype, but {named[0][0]}... mix "
                f"{sorted(str(d) for d in dtypes)}: cast the model to one dtype before building GradientSync"
            )
        buffer = torch.zeros(padded, dtype=dtypes.pop(), device=self.groups.device)
        for (_, param), offset in zip(named, offsets):
            view = buffer[offset : offset + param.numel()].view_as(param)
            view.copy_(param.detach())
            param.data = view  # the Parameter object (and its attributes, hooks) stays; its storage moves
        return buffer

    def _register_gather_waits(self, chunks: list[nn.Module]) -> None:
        """ZeRO-1: before each block of the model runs forward, wait for the gathers of its parameters.

        Blocks are the modules a chunk calls in turn: each child, and each entry of a ModuleDict /
        ModuleList child (the layers); the chunk itself waits for its own direct parameters (the last
        stage's copy of the embedding). A whole block (not each Linear inside it) is the unit, so a
        block compiled as one region sees the wait at its boundary."""
        for chunk in chunks:
            blocks: list[nn.Module] = [chunk]
            for child in chunk.children():
                blocks.extend(child.values() if isinstance(child, nn.ModuleDict) else
                              child if isinstance(child, nn.ModuleList) else [child])
            for block in blocks:
                own = block.parameters(recurse=block is not chunk)
                # in forward order (buckets are made in backward order), as the gathers were launched
                buckets = sorted({self._bucket_of[p].index for p in own if p in self._bucket_of}, reverse=True)
                if buckets:
                    # not traced by torch.compile (a compiled layer runs the hook eagerly); wrapped here, as
                    # torch.compiler.disable imports torch._dynamo (seconds) and only ZeRO-1 needs it
                    block.register_forward_pre_hook(
                        torch.compiler.disable(functools.partial(self._wait_before_forward, buckets)))

    def _wait_before_forward(self, buckets: list[int], module: nn.Module, args) -> None:
        if self._gathering:
            for index in buckets:
                self._wait_gather(self.buckets[index])

    # ---- during the step ------------------------------------------------------------------------
    def start_step(self, num_microbatches: int) -> None:
        """Zero the buffers and expect `num_microbatches` accumulations of every gradient."""
        self.num_microbatches = num_microbatches
        self._counts = {param: 0 for param in self._views}
        self._next_launch = 0
        for bucket in self.buckets:
            bucket.grad.zero_()
            bucket.ready, bucket.launched, bucket.handle = 0, False, None
        for param, view in self._views.items():
            # An fp32 parameter's gradient is accumulated by autograd straight into its bucket view
            # (in place: no per-micro-batch gradient tensor, no extra add); others arrive in their
            # dtype and are added into the fp32 view by the hook.
            param.grad = view if param.dtype == torch.float32 else None

    def main_grad(self, param: nn.Parameter) -> torch.Tensor:
        """The fp32 main gradient of `param` (its slice of a bucket, shaped like the parameter)."""
        return self._views[param]

    def _hook(self, param: nn.Parameter) -> None:
        view = self._views[param]
        if param.grad is not view:  # bf16/fp16, or an fp32 .grad someone replaced: add it in
            view.add_(param.grad)  # the micro-batch's gradient (param dtype) into the fp32 main gradient
            param.grad = view if param.dtype == torch.float32 else None
        self._counts[param] += 1
        if self.events is not None:
            self.events.append(("hook", self._names[param], self._counts[param]))
        if self._counts[param] != self.num_microbatches:
            return
        if getattr(param, "sequence_parallel", False) and self.groups.tp_group is not None:
            dist.all_reduce(view, group=self.groups.tp_group)
        bucket = self._bucket_of[param]
        bucket.ready += 1
        if self.overlap:
            self._launch_ready()

    def _launch_ready(self) -> None:
        """Launch, in bucket order, every bucket whose gradients are all final."""
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if bucket.deferred or bucket.ready < len(bucket.params):
                return
            self._launch(bucket)
            self._next_launch += 1

    def _launch(self, bucket: Bucket) -> None:
        if self.events is not None:
            self.events.append(("launch", bucket.index))
        bucket.launched = True
        group = self.groups.grad_group
        if group is None:
            if self.shard:
                bucket.shard_main.copy_(bucket.grad)
            return
        source, target = bucket.grad, bucket.shard_main
        if self.reduce_dtype != torch.float32:  # a low-precision copy travels; fp32 is written back in finish()
            bucket.wire = source = bucket.grad.to(self.reduce_dtype)
            if self.shard:
                bucket.wire_shard = target = torch.empty(
                    bucket.numel // self.dp, dtype=self.reduce_dtype, device=bucket.grad.device
                )
        if self.shard:
            bucket.handle = reduce_scatter_single(target, source, group, async_op=True)
        else:
            bucket.handle = dist.all_reduce(source, group=group, async_op=True)

    def finish(self) -> None:
        """Launch what is left (the tied embedding after its cross-stage sum), wait, expose grads."""
        for bucket in self.buckets:
            if bucket.launched:
                continue
            if bucket.deferred and self.groups.embedding_group is not None:
                dist.all_reduce(bucket.grad, group=self.groups.embedding_group)
            self._launch(bucket)
        for bucket in self.buckets:
            if bucket.handle is not None:
                wait_for(bucket.handle, lambda: f"{'reduce_scatter' if self.shard else 'all_reduce'} of gradient "
                         f"bucket {bucket.index} over {self.groups.describe_group(self.groups.grad_group)}")
                bucket.handle = None
            if bucket.wire is not None:  # back into fp32, then free the wire copies
                if self.shard:
                    bucket.shard_main.copy_(bucket.wire_shard)
                else:
                    bucket.grad.copy_(bucket.wire)
                bucket.wire = bucket.wire_shard = None
        if not self.shard:
            for param, view in self._views.items():
                if param.dtype == torch.float32:  # an fp32 parameter is its own master: .grad is the main grad
                    param.grad = view

    # ---- ZeRO-1 parameter all-gather -------------------------------------------------------------
    def parameter_shard(self, bucket: Bucket) -> torch.Tensor:
        """This dp rank's slice of a bucket's parameter buffer: the optimizer writes it, the gather sends it."""
        size = bucket.numel // self.dp
        return bucket.param_data[self.groups.grad_rank * size : (self.groups.grad_rank + 1) * size]

    def forward_order(self) -> list[Bucket]:
        """Buckets in the order the forward pass reads them (buckets are made in backward order)."""
        return list(reversed(self.buckets))

    def gather_parameters(self, bucket: Bucket) -> None:
        """Launch the asynchronous all-gather of `bucket`'s parameter shards into its parameter buffer.

        In place: the input is this rank's slice of the output. Every dp rank launches the buckets
        in the same (forward) order, so the collectives match on NCCL."""
        self.wait_parameters([bucket])  # never two gathers of one buffer in flight
        self._check_storage(bucket)
        if self.groups.grad_group is None:
            return  # one dp rank: its shard is the whole buffer
        if self.events is not None:
            self.events.append(("gather", bucket.index))
        bucket.gather = all_gather_single(bucket.param_data, self.parameter_shard(bucket), self.groups.grad_group,
                                           async_op=True)
        self._gathering += 1

    @property
    def gathers_in_flight(self) -> int:
        """ZeRO-1: parameter all-gathers launched and not yet waited for."""
        return self._gathering

    def _check_storage(self, bucket: Bucket) -> None:
        storage = bucket.param_data.untyped_storage().data_ptr()
        for param in bucket.params:
            if param.untyped_storage().data_ptr() != storage:
                raise RuntimeError(
                    f"ZeRO-1: parameter {self._names[param]} no longer lives in its gradient bucket's parameter "
                    f"buffer (its .data was replaced, e.g. by module.to() or load_state_dict(assign=True) after "
                    f"GradientSync was built): copy values into parameters in place (param.copy_) instead"
                )

    def _wait_gather(self, bucket: Bucket) -> None:
        if bucket.gather is None:
            return
        if self.events is not None:
            self.events.append(("gather_wait", bucket.index))
        wait_for(bucket.gather, lambda: f"all_gather of parameter bucket {bucket.index} over "
                 f"{self.groups.describe_group(self.groups.grad_group)}")
        bucket.gather = None
        self._gathering -= 1

    def wait_parameters(self, buckets: Optional[list[Bucket]] = None) -> None:
        """Wait for the parameter all-gathers in flight (of `buckets`, default all), in forward order.

        The forward pre-hooks do this block by block; call it before reading parameters any other way."""
        if self._gathering:
            for bucket in buckets if buckets is not None else self.forward_order():
                self._wait_gather(bucket)

    # ---- ZeRO-1 views ---------------------------------------------------------------------------
    def segments(self) -> list[Segment]:
        """This dp rank's pieces of every parameter (ZeRO-1; whole parameters without), in bucket order."""
        out = []
        rank = self.groups.grad_rank
        for bucket in self.buckets:
            if not self.shard:
                out.extend(Segment(p, 0, p.numel(), offset, bucket) for p, offset in zip(bucket.params, bucket.offsets))
                continue
            shard_size = bucket.numel // self.dp
            lo, hi = rank * shard_size, (rank + 1) * shard_size
            for param, offset in zip(bucket.params, bucket.offsets):
                start, end = max(lo, offset), min(hi, offset + param.numel())
                if start < end:
                    out.append(Segment(param, start - offset, end - offset, start - lo, bucket))
        return out

    def segment_grad(self, segment: Segment) -> torch.Tensor:
        """The flat fp32 main gradient of a segment (a view into the buffers the reductions write)."""
        buffer = segment.bucket.shard_main if self.shard else segment.bucket.grad
        return buffer[segment.shard_lo : segment.shard_lo + segment.numel]


def counted_once(param: nn.Parameter, groups: ParallelGroups) -> bool:
    """Count each full parameter once in a global norm: split params on every tp rank, replicated
    ones on tp rank 0, a replicated key/value shard on the first of its copies, and the last stage's copy
    of the tied embedding not at all."""
    if getattr(param, "embedding_copy", False):
        return False
    if getattr(param, "tp_split_dim", None) is not None:
        return first_replica(param, groups.tp_rank)  # key/value heads held by several tp ranks: once
    return groups.tp_rank == 0
