"""AdamW with decoupled-decay parameter groups, the LR schedule, and global-norm clipping."""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from megalm.config import OptimConfig
from megalm.distributed import ParallelGroups


def lr_at(step: int, cfg: OptimConfig, decay_steps: int) -> float:
    """Learning rate for 0-based `step`: linear warmup, then cosine/linear decay to min_lr, then flat."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay_style == "constant":
        return cfg.lr
    span = max(decay_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    if cfg.decay_style == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear
        factor = 1.0 - progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * factor


def _no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases and LayerNorm parameters are not weight-decayed (1-D tensors)."""
    return param.dim() < 2


def build_optimizer(
    model: nn.Module | list[nn.Module], cfg: OptimConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW over this rank's shard (all its model chunks); torch's fused implementation on CUDA."""
    decay, no_decay = [], []
    for chunk in model if isinstance(model, list) else [model]:
        for name, param in chunk.named_parameters():
            if param.requires_grad:
                (no_decay if _no_decay(name, param) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    extra = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **extra)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _counted_here(param: nn.Parameter, groups: ParallelGroups) -> bool:
    """Count each full parameter once: split params on every tp rank, replicated ones on tp rank 0.

    The last stage's copy of the tied embedding (pp > 1) duplicates the first stage's and is not counted.
    """
    if getattr(param, "embedding_copy", False):
        return False
    return getattr(param, "tp_split_dim", None) is not None or groups.tp_rank == 0


def global_grad_norm(params: Iterable[nn.Parameter], groups: ParallelGroups) -> torch.Tensor:
    """L2 norm of the full model's gradient across tp and pp shards (grads already equal over dp)."""
    grads = [p.grad for p in params if p.grad is not None and _counted_here(p, groups)]
    if grads:
        norms = torch._foreach_norm([g.float() for g in grads])
        square_sum = torch.stack(norms).square().sum()
    else:
        square_sum = torch.zeros((), device=groups.device)
    square_sum = square_sum.to(groups.device, torch.float32)
    for group in (groups.tp_group, groups.pp_group):
        if group is not None:
            dist.all_reduce(square_sum, group=group)
    return square_sum.sqrt()


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float, groups: ParallelGroups) -> float:
    """Scale gradients so the global norm is at most max_norm (0 disables); return the norm before."""
    norm = global_grad_norm(params, groups)
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], coef)
    return float(norm)
