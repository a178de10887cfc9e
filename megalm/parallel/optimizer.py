"""The optimizer of every megalm-engine run: fp32 masters and Adam moments over the fp32 main gradients.

Megatron-style mixed precision. The model's parameters are held in the run's precision (bf16 /
fp16, or fp32) and read directly by the matmuls; their gradients are accumulated in fp32 main-grad
buffers by `GradientSync`. This wrapper keeps, for every piece of a parameter this rank updates
(a `Segment`: the whole parameter, or its ZeRO-1 shard), an fp32 *master* whose `.grad` is a view
of the main gradient, steps an inner torch optimizer (AdamW from megalm.kernels: fused where the
device has it) over the masters, and writes the updated masters back into the parameters. An fp32
parameter is its own master: without ZeRO the parameter itself, with ZeRO-1 its piece of this
rank's slice of the parameter bucket; nothing is copied.

ZeRO-1: a bucket's parameters live in one contiguous buffer of their dtype (`Bucket.param_data`,
laid out like the gradient bucket). After the step, bucket by bucket in forward order, the updated
masters are cast into this rank's slice of that buffer and an asynchronous in-place all-gather over
dp fills the other slices: no separate gather buffer, and the wire carries the parameters' dtype
(the analytic minimum: each rank sends its 1/dp of the parameters once). The gathers run while the
next buckets are cast and while the next step's forward runs: each block of the model waits for
its buckets in a forward pre-hook (GradientSync), and `wait_parameters()` waits for all of them;
call it before reading the parameters outside a forward (checkpoints and the trainer do).

Bytes a rank holds per parameter (docs/precision.md, "Bytes per parameter"): P = parameter bytes (4 fp32, 2 bf16/fp16),
main gradient 4, master 4 unless the parameter is its own (fp32), moments 8; with ZeRO-1 the master
and moments are held for 1/dp of the parameters, plus an fp32 reduce-scatter output (4/dp).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from megalm.kernels import adamw_class_and_kwargs
from megalm.parallel.data import GradientSync, Segment, counted_once


class MixedPrecisionOptimizer:
    """fp32 master weights and AdamW moments (ZeRO-1: this dp rank's shard) over fp32 main gradients."""

    def __init__(
        self,
        sync: GradientSync,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        optimizer_class: Optional[type[torch.optim.Optimizer]] = None,
        optimizer_kwargs: Optional[dict[str, Any]] = None,
    ) -> None:
        self.sync = sync
        self.groups = sync.groups
        self.sharded = sync.shard  # each dp rank holds a different shard: norms and checks span dp too
        decay: list[tuple[torch.Tensor, Segment]] = []
        no_decay: list[tuple[torch.Tensor, Segment]] = []
        for segment in sync.segments():
            param = segment.param
            if not self.sharded and param.dtype == torch.float32:
                master = param  # its own master; sync.finish() sets .grad to the main gradient
            elif param.dtype == torch.float32:  # ZeRO-1: its piece of this rank's slice of the parameter bucket
                shard = sync.parameter_shard(segment.bucket)
                master = shard[segment.shard_lo : segment.shard_lo + segment.numel]
                master.grad = sync.segment_grad(segment)
            else:
                flat = param.detach().reshape(-1)[segment.param_lo : segment.param_hi]
                master = flat.to(torch.float32, copy=True).requires_grad_(True)
                master.grad = sync.segment_grad(segment)  # a view: the reductions write it in place
            # Biases and LayerNorm parameters (1-D) are not weight-decayed.
            (no_decay if param.dim() < 2 else decay).append((master, segment))
        ordered = decay + no_decay  # param-group order
        self.masters: list[torch.Tensor] = [master for master, _ in ordered]
        self.segments: list[Segment] = [segment for _, segment in ordered]
        param_groups = [
            {"params": [m for m, _ in decay], "weight_decay": weight_decay},
            {"params": [m for m, _ in no_decay], "weight_decay": 0.0},
        ]
        if optimizer_class is None:
            optimizer_class, default_kwargs, _ = adamw_class_and_kwargs(self.groups.device)
            optimizer_kwargs = {**default_kwargs, **(optimizer_kwargs or {})}
        self.optimizer = optimizer_class(param_groups, lr=lr, betas=betas, eps=eps, **(optimizer_kwargs or {}))
        self.param_groups = self.optimizer.param_groups
        self._own = [master is segment.param or _same_memory(master, segment.param) for master, segment in ordered]
        # ZeRO-1: the separate masters of each bucket (fp32 ones are the bucket's memory already)
        self._bucket_masters: dict[int, list[tuple[torch.Tensor, Segment]]] = {}
        for (master, segment), own in zip(ordered, self._own):
            if self.sharded and not own:
                self._bucket_masters.setdefault(segment.bucket.index, []).append((master, segment))

    @property
    def state(self):
        """The inner optimizer's state, keyed by master (the parameter itself in fp32 without ZeRO)."""
        return self.optimizer.state

    def grads(self) -> list[torch.Tensor]:
        """The fp32 main gradients the step reads (unscaled and clipped in place by the trainer)."""
        return [master.grad for master in self.masters if master.grad is not None]

    def counted_grads(self) -> list[torch.Tensor]:
        """Gradients that count towards the global norm (see counted_once)."""
        pairs = zip(self.masters, self.segments)
        return [m.grad for m, s in pairs if m.grad is not None and counted_once(s.param, self.groups)]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients live in the sync's buffers, which start_step() zeroes."""

    @torch.no_grad()
    def step(self) -> None:
        """Step the masters, then write them into the model parameters (ZeRO-1: launch the all-gathers)."""
        self.wait_parameters()  # a bucket no forward read since the last step (unused parameters)
        self.optimizer.step()
        if self.sharded:
            for bucket in self.sync.forward_order():  # cast bucket k+1 while bucket k's gather runs
                shard = self.sync.parameter_shard(bucket)
                for master, segment in self._bucket_masters.get(bucket.index, ()):
                    shard[segment.shard_lo : segment.shard_lo + segment.numel].copy_(master)
                self.sync.gather_parameters(bucket)
            return
        for master, segment in zip(self.masters, self.segments):
            if master is not segment.param:
                segment.param.copy_(master.view_as(segment.param))

    def wait_parameters(self) -> None:
        """ZeRO-1: wait for the parameter all-gathers still in flight (no-op otherwise)."""
        if self.sharded:
            self.sync.wait_parameters()

    def state_bytes(self) -> int:
        """Bytes of optimizer state (Adam moments) held by this rank."""
        return sum(
            value.numel() * value.element_size()
            for state in self.optimizer.state.values()
            for value in state.values()
            if torch.is_tensor(value) and value.dim() > 0
        )

    def master_bytes(self) -> int:
        """Bytes of fp32 master weights held apart from the parameters (0 when parameters are their own)."""
        return sum(m.numel() * m.element_size() for m, own in zip(self.masters, self._own) if not own)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def bytes_per_parameter(precision: str, zero_stage: int, dp: int) -> float:
    """Persistent bytes a rank holds per parameter of its model shard (bucket padding aside): the table in docs/precision.md.

    parameter + fp32 main gradient + fp32 master (unless the parameter is its own: fp32) + two fp32
    moments; ZeRO-1 keeps master and moments for 1/dp of the parameters, plus the fp32 reduce-scatter
    output (1/dp), and gathers the parameters in place (no gather buffer).
    """
    param = 4 if precision == "fp32" else 2
    master = 0 if precision == "fp32" else 4
    if zero_stage == 1:
        return param + 4 + (master + 4 + 8) / dp
    return param + 4 + master + 8


def build_optimizer_wrapper(sync: GradientSync, optim) -> MixedPrecisionOptimizer:
    """The run's optimizer from its OptimConfig."""
    return MixedPrecisionOptimizer(sync, optim.lr, (optim.beta1, optim.beta2), optim.eps, optim.weight_decay)

