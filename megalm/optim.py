"""AdamW with decoupled-decay parameter groups, the LR schedule, and global-norm clipping."""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from megalm.config import OptimConfig
from megalm.distributed import ParallelGroups, ProcessGroup
from megalm.kernels import adamw_class_and_kwargs
from megalm.parallel.data import counted_once


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
    cls, extra, _ = adamw_class_and_kwargs(device)
    return cls(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **extra)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def grad_norm(counted: list[torch.Tensor], groups: list[ProcessGroup], device: torch.device) -> torch.Tensor:
    """L2 norm of gradients spread over ranks: local squares summed over `groups`."""
    if counted:
        square_sum = torch.stack(torch._foreach_norm([g.float() for g in counted])).square().sum()
    else:
        square_sum = torch.zeros((), device=device)
    square_sum = square_sum.to(device, torch.float32)
    for group in groups:
        if group is not None:
            dist.all_reduce(square_sum, group=group)
    return square_sum.sqrt()


def global_grad_norm(params: Iterable[nn.Parameter], groups: ParallelGroups) -> torch.Tensor:
    """L2 norm of the full model's gradient across tp and pp shards (grads already equal over dp)."""
    counted = [p.grad for p in params if p.grad is not None and counted_once(p, groups)]
    return grad_norm(counted, [groups.tp_group, groups.pp_group], groups.device)


def clip_grads_(grads: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scale `grads` so their (precomputed) global norm is at most max_norm; 0 disables."""
    if max_norm > 0 and grads:
        torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float, groups: ParallelGroups) -> float:
    """Scale gradients so the global norm is at most max_norm (0 disables); return the norm before."""
    norm = global_grad_norm(params, groups)
    clip_grads_([p.grad for p in params if p.grad is not None], norm, max_norm)
    return float(norm)


class LossScaler:
    """fp16 loss scaling: static, or dynamic with backoff, growth and hysteresis.

    Every rank must decide alike: `found_inf` is reduced over every group first (see Trainer).
    """

    def __init__(self, cfg: OptimConfig) -> None:
        self.dynamic = cfg.loss_scale is None
        self.scale = cfg.initial_loss_scale if self.dynamic else cfg.loss_scale
        self.window = cfg.loss_scale_window
        self.hysteresis = cfg.loss_scale_hysteresis
        self.min_scale = cfg.min_loss_scale
        self._clean_steps = 0
        self._overflows_left = self.hysteresis

    def update(self, found_inf: bool) -> None:
        """After a step: halve on overflow (once hysteresis runs out), double after `window` clean steps."""
        if not self.dynamic:
            return
        if found_inf:
            self._clean_steps = 0
            self._overflows_left -= 1
            if self._overflows_left <= 0:
                self.scale = max(self.scale / 2.0, self.min_scale)
                self._overflows_left = self.hysteresis
            return
        self._clean_steps += 1
        if self._clean_steps == self.window:
            self.scale *= 2.0
            self._clean_steps = 0
            self._overflows_left = self.hysteresis

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self._clean_steps, "overflows_left": self._overflows_left}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self._clean_steps, self._overflows_left = state["scale"], state["clean_steps"], state["overflows_left"]


def found_inf(grads: list[torch.Tensor], groups: list[ProcessGroup], device: torch.device) -> bool:
    """Whether any gradient on any rank of `groups` holds inf or nan (all ranks get the same answer)."""
    flag = torch.zeros((), device=device)
    if grads:
        flag = torch.stack([(~torch.isfinite(g)).any() for g in grads]).any().float().to(device)
    for group in groups:
        if group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())
