"""Fused kernels: NVIDIA apex's FusedLayerNorm and FusedAdam when usable, torch's otherwise.

On CUDA with apex (and its CUDA extensions) importable: apex.normalization.FusedLayerNorm and
apex.optimizers.FusedAdam(adam_w_mode=True). Otherwise torch.nn.LayerNorm and torch.optim.AdamW,
fused=True on CUDA and foreach=True on CPU. Both paths compute the same LayerNorm and AdamW, so
results agree within floating-point precision either way; `describe_kernels` says which was taken.
MEGALM_NO_APEX=1 forces the torch implementations (to compare the two, or to rule apex out).
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any, Optional

import torch
from torch import nn

ENV_NO_APEX = "MEGALM_NO_APEX"

# apex piece -> (module, class, compiled extension it needs at run time). Without the extension
# apex imports fine but fails when the class is first used, so both must import.
_APEX_PIECES = {
    "layer_norm": ("apex.normalization", "FusedLayerNorm", "fused_layer_norm_cuda"),
    "adam": ("apex.optimizers", "FusedAdam", "amp_C"),
}


def _apex_disabled() -> bool:
    return os.environ.get(ENV_NO_APEX, "").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def _probe_apex(piece: str, disabled: bool) -> tuple[Optional[type], str]:
    """(apex class or None, why not) for one piece; cached: imports are a property of the process."""
    if disabled:
        return None, f"apex disabled by {ENV_NO_APEX}"
    module_name, class_name, extension = _APEX_PIECES[piece]
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return None, "apex not installed"
    try:
        importlib.import_module(extension)
    except ImportError:
        return None, f"apex built without CUDA extensions ({extension} missing)"
    return cls, ""


def clear_cache() -> None:
    """Forget the apex probe (tests that inject or remove a fake apex call this)."""
    _probe_apex.cache_clear()


def _apex(piece: str) -> tuple[Optional[type], str]:
    return _probe_apex(piece, _apex_disabled())


def apex_available() -> bool:
    """True when apex's FusedLayerNorm and FusedAdam both import with their CUDA extensions."""
    return all(_apex(piece)[0] is not None for piece in _APEX_PIECES)


def _device_type(device: torch.device | str) -> str:
    return torch.device(device).type


def layer_norm_class(device_type: torch.device | str) -> type[nn.Module]:
    """apex FusedLayerNorm on CUDA when apex is usable, else torch.nn.LayerNorm (same constructor)."""
    apex_cls, _ = _apex("layer_norm")
    if _device_type(device_type) == "cuda" and apex_cls is not None:
        return apex_cls
    return nn.LayerNorm


def adamw_class_and_kwargs(device: torch.device | str) -> tuple[type[torch.optim.Optimizer], dict[str, Any], str]:
    """(optimizer class, extra constructor kwargs, name) of the AdamW to use on `device`.

    Call as cls(param_groups, lr=..., betas=..., eps=..., weight_decay=..., **kwargs): apex
    FusedAdam with adam_w_mode=True (decoupled decay, like torch AdamW) on CUDA when apex is usable;
    torch AdamW with fused=True on CUDA, foreach=True on CPU otherwise.
    """
    device_type = _device_type(device)
    apex_cls, _ = _apex("adam")
    if device_type == "cuda" and apex_cls is not None:
        return apex_cls, {"adam_w_mode": True}, "apex FusedAdam (adam_w_mode)"
    if device_type == "cuda":
        return torch.optim.AdamW, {"fused": True}, "torch AdamW fused (cuda)"
    return torch.optim.AdamW, {"foreach": True}, f"torch AdamW foreach ({device_type})"


def describe_kernels(device: torch.device | str) -> str:
    """One start-up log line naming the LayerNorm and AdamW implementations and why."""
    device_type = _device_type(device)
    norm_cls = layer_norm_class(device_type)
    norm = f"{norm_cls.__module__}.{norm_cls.__qualname__}"
    if norm_cls is nn.LayerNorm:
        norm = "torch.nn.LayerNorm"
        _, why = _apex("layer_norm")
        norm += f" ({why})" if why else f" (apex needs cuda, device is {device_type})"
    _, _, adam = adamw_class_and_kwargs(device_type)
    return f"kernels: LayerNorm {norm}, AdamW {adam}"
