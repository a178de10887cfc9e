"""Data-parallel gradient synchronisation (the simplest correct version).

Gradients are summed over the data-parallel group in one coalesced all-reduce after the last
micro-batch (the loss is already normalised by the global number of loss tokens, so a sum is the
right reduction). Bucketing, overlap with the backward pass and ZeRO-1 arrive with the
data-parallel engine.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from megalm.distributed import ProcessGroup


def all_reduce_gradients(params: Iterable[nn.Parameter], group: ProcessGroup) -> None:
    """Sum every gradient over `group`, one flat buffer per dtype."""
    if group is None:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for param in params:
        if param.grad is not None:
            by_dtype.setdefault(param.grad.dtype, []).append(param.grad)
    for grads in by_dtype.values():
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=group)
        for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(synced)
