"""Kernel selection: torch's LayerNorm and AdamW without apex, apex's on CUDA when it imports."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megalm import kernels
from megalm.model.layers import layer_norm
from tests import fake_apex
from tests.fake_apex import FakeFusedLayerNorm, GroupStepAdam


class FakeFusedAdam(torch.optim.AdamW):
    """Stands in for apex.optimizers.FusedAdam, CUDA-only like the real one (no megalm_device_types)."""

    def __init__(self, params, adam_w_mode: bool = True, **kwargs) -> None:
        assert adam_w_mode
        super().__init__(params, **kwargs)


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(kernels.ENV_NO_APEX, raising=False)
    monkeypatch.delenv(kernels.ENV_ADAMW, raising=False)
    kernels.clear_cache()
    yield
    kernels.clear_cache()


@pytest.fixture
def no_apex(monkeypatch: pytest.MonkeyPatch) -> None:
    """apex absent even if the machine has it: None in sys.modules makes the import fail."""
    monkeypatch.setitem(sys.modules, "apex", None)


def _install_fake_apex(monkeypatch: pytest.MonkeyPatch, with_extensions: bool = True, adam: type = FakeFusedAdam) -> None:
    for name, module in fake_apex.modules(with_extensions, adam).items():
        monkeypatch.setitem(sys.modules, name, module)


def test_without_apex_torch_is_chosen_and_described(no_apex: None) -> None:
    assert not kernels.apex_available()
    for device in ("cpu", "cuda"):
        assert kernels.layer_norm_class(device) is nn.LayerNorm
    assert kernels.adamw_class_and_kwargs("cpu") == (torch.optim.AdamW, {"fused": True}, "torch AdamW fused (cpu)")
    assert kernels.adamw_class_and_kwargs(torch.device("cuda", 3)) == (
        torch.optim.AdamW, {"fused": True}, "torch AdamW fused (cuda)"
    )
    assert kernels.describe_kernels("cpu") == (
        "kernels: LayerNorm torch.nn.LayerNorm (apex not installed), AdamW torch AdamW fused (cpu)"
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
    assert (cls, extra, name) == (FakeFusedAdam, {"adam_w_mode": True}, "apex FusedAdam (adam_w_mode, cuda)")
    assert kernels.adamw_class_and_kwargs("cpu")[0] is torch.optim.AdamW
    assert kernels.describe_kernels("cuda") == (
        "kernels: LayerNorm tests.fake_apex.FakeFusedLayerNorm, AdamW apex FusedAdam (adam_w_mode, cuda)"
    )
    assert kernels.describe_kernels("cpu") == (
        "kernels: LayerNorm torch.nn.LayerNorm (apex needs cuda, device is cpu), AdamW torch AdamW fused (cpu)"
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


# ---- AdamW implementation choice -------------------------------------------------------------------
def test_each_implementation_is_honoured(no_apex: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """auto takes torch's fused kernels wherever torch has them (cpu included), foreach elsewhere."""
    assert kernels.adamw_class_and_kwargs("cpu", "auto")[1] == {"fused": True}
    assert kernels.adamw_class_and_kwargs("cpu", "fused") == (torch.optim.AdamW, {"fused": True}, "torch AdamW fused (cpu)")
    assert kernels.adamw_class_and_kwargs("cpu", "foreach") == (
        torch.optim.AdamW, {"foreach": True}, "torch AdamW foreach (cpu)"
    )
    assert kernels.adamw_class_and_kwargs("meta", "auto")[1] == {"foreach": True}  # torch has no fused meta kernels
    with pytest.raises(ValueError, match=r"'fused': torch .* has no fused AdamW for meta .*use auto or foreach"):
        kernels.adamw_class_and_kwargs("meta", "fused")
    with pytest.raises(ValueError, match=r"'apex' is not usable: apex not installed; use auto, fused or foreach"):
        kernels.adamw_class_and_kwargs("cuda", "apex")
    with pytest.raises(ValueError, match=r"implementation='adam' is not an AdamW implementation: use one of auto"):
        kernels.adamw_class_and_kwargs("cpu", "adam")
    # The environment variable chooses when no implementation is passed (the production call sites).
    monkeypatch.setenv(kernels.ENV_ADAMW, "foreach")
    assert kernels.adamw_class_and_kwargs("cpu")[1] == {"foreach": True}
    assert kernels.describe_kernels("cpu").endswith("AdamW torch AdamW foreach (cpu)")
    assert kernels.adamw_class_and_kwargs("cpu", "fused")[1] == {"fused": True}  # an explicit choice wins
    monkeypatch.setenv(kernels.ENV_ADAMW, "Fast")
    with pytest.raises(ValueError, match=r"MEGALM_ADAMW='fast' is not an AdamW implementation"):
        kernels.adamw_class_and_kwargs("cpu")


def test_apex_is_cuda_only_unless_the_class_declares_other_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    _install_fake_apex(monkeypatch)
    with pytest.raises(ValueError, match=r"'apex' is not usable: apex FusedAdam needs cuda, device is cpu"):
        kernels.adamw_class_and_kwargs("cpu", "apex")
    _install_fake_apex(monkeypatch, adam=GroupStepAdam)  # declares megalm_device_types = ("cuda", "cpu")
    kernels.clear_cache()
    assert kernels.adamw_class_and_kwargs("cpu") == (GroupStepAdam, {"adam_w_mode": True}, "apex FusedAdam (adam_w_mode, cpu)")
    assert kernels.adamw_class_and_kwargs("cpu", "fused")[0] is torch.optim.AdamW
    monkeypatch.setenv(kernels.ENV_NO_APEX, "1")
    with pytest.raises(ValueError, match=r"'apex' is not usable: apex disabled by MEGALM_NO_APEX"):
        kernels.adamw_class_and_kwargs("cpu", "apex")


def _one_run(cls: type, extra: dict, steps: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(0)
    weight, bias = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(4))
    groups = [{"params": [weight], "weight_decay": 0.1}, {"params": [bias], "weight_decay": 0.0}]
    optimizer = cls(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, **extra)
    for _ in range(steps):
        weight.grad, bias.grad = torch.randn(6, 4), torch.randn(4)
        optimizer.step()
    return [weight.detach(), bias.detach()]


@pytest.mark.parametrize("cls, extra", [
    (torch.optim.AdamW, {"fused": True}), (GroupStepAdam, {"adam_w_mode": True})
], ids=["torch-fused", "apex-stand-in"])
def test_implementations_compute_the_same_adamw(cls: type, extra: dict) -> None:
    """torch's fused AdamW and the apex stand-in agree with torch's foreach AdamW to rounding."""
    reference = _one_run(torch.optim.AdamW, {"foreach": True})
    for got, want in zip(_one_run(cls, extra), reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_stand_in_keeps_step_in_the_param_group() -> None:
    weight = nn.Parameter(torch.ones(3))
    optimizer = GroupStepAdam([{"params": [weight]}, {"params": []}], lr=1e-3)
    for _ in range(3):
        weight.grad = torch.ones(3)
        optimizer.step()
    assert optimizer.param_groups[0]["step"] == 3 and "step" not in optimizer.param_groups[1]
    assert sorted(optimizer.state[weight]) == ["exp_avg", "exp_avg_sq"]
