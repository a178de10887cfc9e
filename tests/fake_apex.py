"""A stand-in for NVIDIA apex (FusedAdam, FusedLayerNorm) that runs on CPU, for kernel and checkpoint tests.

`GroupStepAdam` keeps its optimizer state the way apex.optimizers.FusedAdam does: one `step` per
param group (an int, incremented once per step for every group that has parameters) and only
exp_avg / exp_avg_sq per parameter, and computes apex's adam_w_mode update. It declares
`megalm_device_types = ("cuda", "cpu")`, the documented way for a stand-in to lift megalm.kernels'
CUDA-only check for apex, so the production path (megalm.kernels.adamw_class_and_kwargs) builds it
on CPU once `install()` has put the fake modules in sys.modules.
"""

from __future__ import annotations

import sys
import types
from typing import Callable, Optional

import torch
from torch import nn


class FakeFusedLayerNorm(nn.LayerNorm):
    """Stands in for apex.normalization.FusedLayerNorm (same constructor and parameters)."""


class GroupStepAdam(torch.optim.Optimizer):
    """Stands in for apex.optimizers.FusedAdam: AdamW whose `step` lives in the param group."""

    megalm_device_types = ("cuda", "cpu")

    def __init__(self, params, lr: float = 1e-3, bias_correction: bool = True, betas=(0.9, 0.999), eps: float = 1e-8,
                 adam_w_mode: bool = True, weight_decay: float = 0.0, amsgrad: bool = False) -> None:
        if amsgrad:
            raise RuntimeError("FusedAdam does not support the AMSGrad variant.")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.adam_w_mode = adam_w_mode

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None) -> None:
        for group in self.param_groups:
            if not group["params"]:
                continue
            group["step"] = group.get("step", 0) + 1  # like apex: one count per group, not per parameter
            beta1, beta2 = group["betas"]
            step, lr, eps, decay = group["step"], group["lr"], group["eps"], group["weight_decay"]
            correction1 = 1 - beta1**step if group["bias_correction"] else 1.0
            correction2 = 1 - beta2**step if group["bias_correction"] else 1.0
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                grad = param.grad if self.adam_w_mode or decay == 0 else param.grad + decay * param
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                update = (state["exp_avg"] / correction1) / ((state["exp_avg_sq"] / correction2).sqrt() + eps)
                if self.adam_w_mode and decay != 0:
                    update.add_(param, alpha=decay)
                param.add_(update, alpha=-lr)


def modules(with_extensions: bool = True, adam: type = GroupStepAdam) -> dict[str, Optional[types.ModuleType]]:
    """sys.modules entries of a fake apex; without extensions its compiled parts fail to import."""
    apex = types.ModuleType("apex")
    normalization = types.ModuleType("apex.normalization")
    normalization.FusedLayerNorm = FakeFusedLayerNorm
    optimizers = types.ModuleType("apex.optimizers")
    optimizers.FusedAdam = adam
    apex.normalization, apex.optimizers = normalization, optimizers
    found: dict[str, Optional[types.ModuleType]] = {"apex": apex, "apex.normalization": normalization,
                                                    "apex.optimizers": optimizers}
    for extension in ("fused_layer_norm_cuda", "amp_C"):
        found[extension] = types.ModuleType(extension) if with_extensions else None
    return found


def install(setitem: Callable[[dict, str, object], None] = dict.__setitem__) -> None:
    """Put the fake apex in sys.modules (pass monkeypatch.setitem in the pytest process; plain in workers)."""
    from megalm import kernels

    for name, module in modules().items():
        setitem(sys.modules, name, module)
    kernels.clear_cache()
