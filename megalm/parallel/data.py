"""Data-parallel gradient sync: contiguous buckets, reductions overlapped with backward, ZeRO-1.

Every parameter's gradient is accumulated (by a post-accumulate-grad hook) into a slice of a
contiguous fp32 bucket. A parameter's gradient is final after its m-th accumulation of the step
(m = micro-batches), so no signal from the schedule is needed and no collective ever runs on a
non-final micro-batch. When every parameter of a bucket is final, the bucket's reduction over the
data-parallel group is launched asynchronously (buckets in a fixed order, the same on every
rank), overlapping the rest of the backward pass; `finish()` waits before the optimizer step.

- Plain data parallel: all-reduce (sum) of each bucket; each parameter's `.grad` then views its
  slice. The loss is already divided by the global token count, so a sum is right.
- ZeRO-1 (`shard=True`): reduce-scatter of each bucket instead: dp rank r receives the summed
  slice r of every bucket (buckets are padded to a multiple of dp). `ShardedAdamW` steps only
  that slice (fp32 master weights and Adam states for 1/dp of the model), then all-gathers the
  updated parameters.

Two reductions are folded in: sequence-parallel gradients (replicated params that saw only this
rank's sequence shard) are summed over tp in the hook, as tp ranks run their backward in
lockstep; the tied embedding's two copies (first and last pipeline stage) sit in a bucket of
their own that is summed over the embedding group in `finish()`, after the pipeline drained
(in the hook it could deadlock against the stages still sending gradients).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from megalm.distributed import ParallelGroups, ProcessGroup, wait_for


def _reduce_scatter_single(output: torch.Tensor, tensor: torch.Tensor, group: ProcessGroup, async_op: bool):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, tensor, group=group, async_op=async_op)


def _all_gather_single(output: torch.Tensor, tensor: torch.Tensor, group: ProcessGroup):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(output, tensor, group=group)


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
    shard_grad: Optional[torch.Tensor] = None  # ZeRO-1: this rank's reduced slice (reduce dtype)
    shard_main: Optional[torch.Tensor] = None  # the same slice in fp32, for the optimizer

    @property
    def numel(self) -> int:
        return self.grad.numel()


@dataclass
class Segment:
    """The part of one parameter inside this rank's ZeRO-1 shard of a bucket."""

    param: nn.Parameter
    param_lo: int  # range in the flattened parameter
    param_hi: int
    shard_lo: int  # where it sits in the shard
    bucket: Bucket = field(repr=False)


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
        grad_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.groups = groups
        self.grad_dtype = grad_dtype  # accumulation and reduction dtype (bf16 halves the bytes moved)
        self.overlap = overlap
        self.shard = shard
        self.events = events  # when a list: ("hook", name, count) and ("launch", bucket) in order
        self.dp = groups.dp_size
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

    def _is_cross_stage_tie(self, chunks: list[nn.Module], param: nn.Parameter) -> bool:
        if self.groups.pp_size == 1:
            return False
        first, last = chunks[0], chunks[-1]
        embedding = first.embedding.word.weight if getattr(first, "embedding", None) is not None else None
        return param is embedding or param is getattr(last, "output_weight", None)

    def _make_buckets(self, named: list[tuple[str, nn.Parameter]], bucket_bytes: int) -> None:
        current: list[tuple[str, nn.Parameter]] = []
        size = 0
        for name, param in named:
            current.append((name, param))
            size += param.numel() * torch.finfo(self.grad_dtype).bits // 8
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
        grad = torch.zeros(padded, dtype=self.grad_dtype, device=self.groups.device)
        bucket = Bucket(len(self.buckets), [p for _, p in named], offsets, grad, deferred)
        if self.shard:
            bucket.shard_grad = torch.zeros(padded // self.dp, dtype=self.grad_dtype, device=self.groups.device)
            bucket.shard_main = (
                bucket.shard_grad
                if self.grad_dtype == torch.float32
                else torch.zeros(padded // self.dp, dtype=torch.float32, device=self.groups.device)
            )
        for (name, param), offset in zip(named, offsets):
            self._views[param] = grad[offset : offset + param.numel()].view_as(param)
            self._bucket_of[param] = bucket
            self._names[param] = name
        self.buckets.append(bucket)

    # ---- during the step ------------------------------------------------------------------------
    def start_step(self, num_microbatches: int) -> None:
        """Zero the buffers and expect `num_microbatches` accumulations of every gradient."""
        self.num_microbatches = num_microbatches
        self._counts = {param: 0 for param in self._views}
        self._next_launch = 0
        for bucket in self.buckets:
            bucket.grad.zero_()
            bucket.ready, bucket.launched, bucket.handle = 0, False, None
        for param in self._views:
            param.grad = None

    def _hook(self, param: nn.Parameter) -> None:
        view = self._views[param]
        view.add_(param.grad)
        param.grad = None
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
        group = self.groups.dp_group
        if group is None:
            if self.shard:
                bucket.shard_grad.copy_(bucket.grad)
            return
        if self.shard:
            bucket.handle = _reduce_scatter_single(bucket.shard_grad, bucket.grad, group, async_op=True)
        else:
            bucket.handle = dist.all_reduce(bucket.grad, group=group, async_op=True)

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
                         f"bucket {bucket.index} over {self.groups.describe_group(self.groups.dp_group)}")
                bucket.handle = None
        if self.shard:
            for bucket in self.buckets:
                if bucket.shard_main is not bucket.shard_grad:
                    bucket.shard_main.copy_(bucket.shard_grad)
        else:
            for param, view in self._views.items():
                param.grad = view if view.dtype == param.dtype else view.to(param.dtype)

    # ---- ZeRO-1 views ---------------------------------------------------------------------------
    def segments(self) -> list[Segment]:
        """This dp rank's pieces of every parameter (ZeRO-1), in bucket order."""
        out = []
        rank = self.groups.dp_rank
        for bucket in self.buckets:
            shard_size = bucket.numel // self.dp
            lo, hi = rank * shard_size, (rank + 1) * shard_size
            for param, offset in zip(bucket.params, bucket.offsets):
                start, end = max(lo, offset), min(hi, offset + param.numel())
                if start < end:
                    out.append(Segment(param, start - offset, end - offset, start - lo, bucket))
        return out


def counted_once(param: nn.Parameter, groups: ParallelGroups) -> bool:
    """Count each full parameter once in a global norm: split params on every tp rank, replicated
    ones on tp rank 0, and the last stage's copy of the tied embedding not at all."""
    if getattr(param, "embedding_copy", False):
        return False
    return getattr(param, "tp_split_dim", None) is not None or groups.tp_rank == 0


class ShardedAdamW:
    """ZeRO-1: AdamW over this dp rank's shard, fp32 masters, then an all-gather of the parameters."""

    def __init__(
        self,
        sync: GradientSync,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        make_optimizer: Optional[Callable[..., torch.optim.Optimizer]] = None,
    ) -> None:
        if not sync.shard:
            raise ValueError("ShardedAdamW needs a GradientSync built with shard=True")
        self.sync = sync
        self.groups = sync.groups
        self.segments = sync.segments()
        self.masters: list[torch.Tensor] = []
        decay, no_decay = [], []
        for segment in self.segments:
            flat = segment.param.detach().reshape(-1)[segment.param_lo : segment.param_hi]
            master = flat.to(torch.float32).clone().requires_grad_(True)
            size = segment.param_hi - segment.param_lo
            master.grad = segment.bucket.shard_main[segment.shard_lo : segment.shard_lo + size]
            self.masters.append(master)
            (no_decay if segment.param.dim() < 2 else decay).append(master)
        param_groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        make = make_optimizer or torch.optim.AdamW
        self.optimizer = make(param_groups, lr=lr, betas=betas, eps=eps)
        self.param_groups = self.optimizer.param_groups
        self._gather = [
            torch.empty(bucket.numel, dtype=bucket.params[0].dtype, device=self.groups.device)
            for bucket in sync.buckets
        ]

    def grads(self) -> list[torch.Tensor]:
        return [master.grad for master in self.masters]

    def counted_grads(self) -> list[torch.Tensor]:
        """Shard gradients that count towards the global norm (see counted_once)."""
        return [m.grad for m, s in zip(self.masters, self.segments) if counted_once(s.param, self.groups)]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients live in the sync's buffers, which start_step() zeroes."""

    def step(self) -> None:
        self.optimizer.step()
        dp_group = self.groups.dp_group
        for bucket, gathered in zip(self.sync.buckets, self._gather):
            shard_size = bucket.numel // self.sync.dp
            local = gathered[self.groups.dp_rank * shard_size : (self.groups.dp_rank + 1) * shard_size]
            for master, segment in zip(self.masters, self.segments):
                if segment.bucket is bucket:
                    size = segment.param_hi - segment.param_lo
                    local[segment.shard_lo : segment.shard_lo + size].copy_(master.detach())
            if dp_group is not None:
                _all_gather_single(gathered, local.clone(), dp_group)
            with torch.no_grad():
                for param, offset in zip(bucket.params, bucket.offsets):
                    param.copy_(gathered[offset : offset + param.numel()].view_as(param))

    def state_bytes(self) -> int:
        """Bytes of optimizer state (Adam moments) held by this rank."""
        return sum(
            value.numel() * value.element_size()
            for state in self.optimizer.state.values()
            for value in state.values()
            if torch.is_tensor(value) and value.dim() > 0
        )
