"""Fused kernels: NVIDIA apex's FusedLayerNorm and FusedAdam when usable, torch's otherwise.

LayerNorm: apex.normalization.FusedLayerNorm on CUDA when apex (and its CUDA extension) imports,
torch.nn.LayerNorm otherwise. AdamW, chosen by `implementation` (auto | fused | foreach | apex, or
the MEGALM_ADAMW environment variable when no implementation is passed):
- auto: apex FusedAdam(adam_w_mode=True) where apex is usable on the device, else torch AdamW
  fused=True wherever torch has fused kernels for the device (cpu, cuda, xpu, mps, ...), else foreach;
- fused / foreach: torch AdamW with that flag (an error where torch lacks fused kernels);
- apex: apex FusedAdam (an error naming why when apex is not usable on the device).
All compute the same AdamW, so results agree within floating-point precision; `describe_kernels`
says which was taken. MEGALM_NO_APEX=1 rules apex out (auto then takes torch's; apex is an error).
An apex class runs on CUDA only; a stand-in class (tests) may declare other device types in a
`megalm_device_types` attribute, e.g. ("cuda", "cpu").
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any, Optional

import torch
from torch import nn

ENV_NO_APEX = "MEGALM_NO_APEX"
ENV_ADAMW = "MEGALM_ADAMW"
ADAMW_IMPLEMENTATIONS = ("auto", "fused", "foreach", "apex")

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


def _torch_fused_device_types() -> list[str]:
    """Device types with torch's fused AdamW kernels (cpu included since torch 2.4)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return list(_get_fused_kernels_supported_devices())


def _apex_adam_for(device_type: str) -> tuple[Optional[type], str]:
    """(apex FusedAdam class or None, why not) on `device_type`."""
    cls, why = _apex("adam")
    if cls is None:
        return None, why
    allowed = tuple(getattr(cls, "megalm_device_types", ("cuda",)))
    if device_type not in allowed:
        return None, f"apex FusedAdam needs {' or '.join(allowed)}, device is {device_type}"
    return cls, ""


def adamw_implementation(implementation: Optional[str] = None) -> str:
    """The AdamW implementation asked for: `implementation`, else $MEGALM_ADAMW, else auto (validated)."""
    source = "implementation"
    if implementation is None:
        implementation, source = os.environ.get(ENV_ADAMW, "").strip().lower() or "auto", ENV_ADAMW
    if implementation not in ADAMW_IMPLEMENTATIONS:
        raise ValueError(
            f"{source}={implementation!r} is not an AdamW implementation: use one of {', '.join(ADAMW_IMPLEMENTATIONS)}"
        )
    return implementation


def adamw_class_and_kwargs(
    device: torch.device | str, implementation: Optional[str] = None
) -> tuple[type[torch.optim.Optimizer], dict[str, Any], str]:
    """(optimizer class, extra constructor kwargs, name) of the AdamW to use on `device`.

    Call as cls(param_groups, lr=..., betas=..., eps=..., weight_decay=..., **kwargs). See the
    module docstring for the choice; an implementation that cannot run on `device` is a ValueError
    that says why and what to choose instead.
    """
    device_type = _device_type(device)
    choice = adamw_implementation(implementation)
    if choice in ("auto", "apex"):
        apex_cls, why = _apex_adam_for(device_type)
        if apex_cls is not None:
            return apex_cls, {"adam_w_mode": True}, f"apex FusedAdam (adam_w_mode, {device_type})"
        if choice == "apex":
            raise ValueError(f"AdamW implementation 'apex' is not usable: {why}; use auto, fused or foreach")
    fused_devices = _torch_fused_device_types()
    if choice in ("auto", "fused") and device_type in fused_devices:
        return torch.optim.AdamW, {"fused": True}, f"torch AdamW fused ({device_type})"
    if choice == "fused":
        raise ValueError(
            f"AdamW implementation 'fused': torch {torch.__version__} has no fused AdamW for {device_type} "
            f"(it has for {', '.join(fused_devices)}); use auto or foreach"
        )
    return torch.optim.AdamW, {"foreach": True}, f"torch AdamW foreach ({device_type})"


def describe_kernels(device: torch.device | str, implementation: Optional[str] = None) -> str:
    """One start-up log line naming the LayerNorm and AdamW implementations and why."""
    device_type = _device_type(device)
    norm_cls = layer_norm_class(device_type)
    norm = f"{norm_cls.__module__}.{norm_cls.__qualname__}"
    if norm_cls is nn.LayerNorm:
        norm = "torch.nn.LayerNorm"
        _, why = _apex("layer_norm")
        norm += f" ({why})" if why else f" (apex needs cuda, device is {device_type})"
    _, _, adam = adamw_class_and_kwargs(device_type, implementation)
    return f"kernels: LayerNorm {norm}, AdamW {adam}"
