"""Kernel selection: torch's LayerNorm and AdamW without apex, apex's on CUDA when it imports."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megalm import kernels
from megalm.model.layers import layer_norm


class FakeFusedLayerNorm(nn.LayerNorm):
    """Stands in for apex.normalization.FusedLayerNorm (same constructor and parameters)."""


class FakeFusedAdam(torch.optim.AdamW):
    """Stands in for apex.optimizers.FusedAdam."""

    def __init__(self, params, adam_w_mode: bool = True, **kwargs) -> None:
        assert adam_w_mode
        super().__init__(params, **kwargs)


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(kernels.ENV_NO_APEX, raising=False)
    kernels.clear_cache()
    yield
    kernels.clear_cache()


@pytest.fixture
def no_apex(monkeypatch: pytest.MonkeyPatch) -> None:
    """apex absent even if the machine has it: None in sys.modules makes the import fail."""
    monkeypatch.setitem(sys.modules, "apex", None)


def _install_fake_apex(monkeypatch: pytest.MonkeyPatch, with_extensions: bool = True) -> None:
    apex = types.ModuleType("apex")
    normalization = types.ModuleType("apex.normalization")
    normalization.FusedLayerNorm = FakeFusedLayerNorm
    optimizers = types.ModuleType("apex.optimizers")
    optimizers.FusedAdam = FakeFusedAdam
    apex.normalization, apex.optimizers = normalization, optimizers
    modules = {"apex": apex, "apex.normalization": normalization, "apex.optimizers": optimizers}
    if with_extensions:
        modules.update(fused_layer_norm_cuda=types.ModuleType("fused_layer_norm_cuda"), amp_C=types.ModuleType("amp_C"))
    else:
        modules.update(fused_layer_norm_cuda=None, amp_C=None)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


def test_without_apex_torch_is_chosen_and_described(no_apex: None) -> None:
    assert not kernels.apex_available()
    for device in ("cpu", "cuda"):
        assert kernels.layer_norm_class(device) is nn.LayerNorm
    assert kernels.adamw_class_and_kwargs("cpu") == (torch.optim.AdamW, {"foreach": True}, "torch AdamW foreach (cpu)")
    assert kernels.adamw_class_and_kwargs(torch.device("cuda", 3)) == (
        torch.optim.AdamW, {"fused": True}, "torch AdamW fused (cuda)"
    )
    assert kernels.describe_kernels("cpu") == (
        "kernels: LayerNorm torch.nn.LayerNorm (apex not installed), AdamW torch AdamW foreach (cpu)"
    )
    assert kernels.describe_kernels("cuda") == (
        "kernels: LayerNorm torch.nn.LayerNorm (apex not installed), AdamW torch AdamW fused (cuda)"
    )


def test_fake_apex_is_chosen_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    _install_fake_apex(monkeypatch)
    assert kernels.apex_available()
    assert kernels.layer_norm_class("cuda") is FakeFusedLayerNorm
    assert kernels.layer_norm_class("cpu") is nn.LayerNorm
    cls, extra, name = kernels.adamw_class_and_kwargs("cuda")
    assert (cls, extra, name) == (FakeFusedAdam, {"adam_w_mode": True}, "apex FusedAdam (adam_w_mode)")
    assert kernels.adamw_class_and_kwargs("cpu")[0] is torch.optim.AdamW
    assert kernels.describe_kernels("cuda") == (
        f"kernels: LayerNorm {__name__}.FakeFusedLayerNorm, AdamW apex FusedAdam (adam_w_mode)"
    )
    assert kernels.describe_kernels("cpu") == (
        "kernels: LayerNorm torch.nn.LayerNorm (apex needs cuda, device is cpu), AdamW torch AdamW foreach (cpu)"
    )
    # The call optim.py makes works with the selected class.
    param = nn.Parameter(torch.ones(3))
    optimizer = cls([{"params": [param], "weight_decay": 0.1}], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, **extra)
    assert isinstance(optimizer, FakeFusedAdam)

    # The model's layer_norm() takes the apex class on CUDA and keeps marking its parameters.
    norm = layer_norm(8, 1e-5, sequence_parallel=True, device_type="cuda")
    assert type(norm) is FakeFusedLayerNorm
    assert [(p.tp_split_dim, p.sequence_parallel) for p in norm.parameters()] == [(None, True), (None, True)]
    # torch's LayerNorm on CPU (megalm's subclass that keeps fp32 statistics for bf16, megalm.model.layers)
    assert type(layer_norm(8, 1e-5, sequence_parallel=False, device_type="cpu")).__mro__[1] is nn.LayerNorm


def test_apex_without_cuda_extensions_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    _install_fake_apex(monkeypatch, with_extensions=False)
    assert not kernels.apex_available()
    assert kernels.layer_norm_class("cuda") is nn.LayerNorm
    assert kernels.adamw_class_and_kwargs("cuda")[0] is torch.optim.AdamW
    assert "fused_layer_norm_cuda missing" in kernels.describe_kernels("cuda")


def test_env_switch_forces_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    _install_fake_apex(monkeypatch)
    monkeypatch.setenv(kernels.ENV_NO_APEX, "1")
    assert not kernels.apex_available()
    assert kernels.layer_norm_class("cuda") is nn.LayerNorm
    assert "disabled by MEGALM_NO_APEX" in kernels.describe_kernels("cuda")


def test_chosen_layer_norm_matches_functional(no_apex: None) -> None:
    torch.manual_seed(0)
    norm = layer_norm(32, 1e-5, sequence_parallel=False)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(5, 3, 32)
    expected = F.layer_norm(x, (32,), norm.weight, norm.bias, 1e-5)
    torch.testing.assert_close(norm(x), expected, rtol=0, atol=0)
    assert [(p.tp_split_dim, p.sequence_parallel) for p in norm.parameters()] == [(None, False), (None, False)]
