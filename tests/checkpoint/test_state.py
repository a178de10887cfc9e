"""Optimizer state in checkpoints: fp32 masters, where `step` lives and sits, scalars stored once."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from megalm.checkpoint.state import (
    PieceIndex, collect_pieces, optimizer_scalars, optimizer_view, restore, saved_scalars, steps_of,
)
from megalm.config import Config, ModelConfig, OptimConfig
from megalm.distributed import ParallelGroups
from megalm.model.gpt import build_model_chunks
from megalm.optim import build_optimizer
from megalm.parallel.data import GradientSync
from megalm.parallel.optimizer import MixedPrecisionOptimizer
from tests.fake_apex import GroupStepAdam

GROUPS = ParallelGroups.single()
CONFIG = Config(model=ModelConfig(num_layers=2, hidden_size=32, num_heads=4, vocab_size=200, seq_length=16))


def chunks(dtype: torch.dtype = torch.float32, device: str = "cpu") -> list:
    return [chunk.to(device=device, dtype=dtype) for chunk in build_model_chunks(CONFIG, GROUPS)]


def take_steps(optimizer, params: list[torch.Tensor], steps: int, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for param in params:
            param.grad.copy_(torch.randn(param.grad.shape, generator=generator))
        optimizer.step()


def plain(model: list, cls=torch.optim.AdamW, **kwargs):
    """The optimizer build_optimizer makes (two decay groups), with another class or flags."""
    built = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    groups = [{"params": group["params"], "weight_decay": group["weight_decay"]} for group in built.param_groups]
    optimizer = cls(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, **kwargs)
    for group in groups:
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    return optimizer


def zero1(model: list, cls=torch.optim.AdamW, **kwargs) -> MixedPrecisionOptimizer:
    sync = GradientSync(model, GROUPS, bucket_bytes=4096, shard=True)
    return MixedPrecisionOptimizer(sync, 1e-2, (0.9, 0.95), 1e-8, 0.1, optimizer_class=cls, optimizer_kwargs=kwargs)


def saved(tmp_path: Path, model: list, optimizer) -> tuple[PieceIndex, dict]:
    """What a checkpoint of (model, optimizer) holds: its pieces, indexed, and its optimizer scalars."""
    torch.save({"rank": 0, "pieces": collect_pieces(model, optimizer, GROUPS)}, tmp_path / "rank_00000.pt")
    return PieceIndex(tmp_path, ["rank_00000.pt"]), optimizer_scalars(optimizer)


def state_of(optimizer) -> dict:
    view = optimizer_view(optimizer)
    out = {f"master {i}": m.detach().clone() for i, m in enumerate(view.masters)}
    for index, entry in view.inner.state_dict()["state"].items():
        out.update({f"{index} {key}": value for key, value in entry.items()})
    return out


def assert_same(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        a, b = first[key], second[key]
        assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b), key


# ---- fp32 masters of low-precision weights ----------------------------------------------------------
def test_bf16_weights_resume_from_their_fp32_masters(tmp_path: Path) -> None:
    """bf16 weights with fp32 masters (ZeRO-1): the masters come back exactly, not rounded to bf16,
    the weights are their bf16 casts, and the next step matches bit for bit."""
    model = chunks(torch.bfloat16)
    optimizer = zero1(model, fused=True)
    take_steps(optimizer, optimizer.masters, 3)
    assert any(not torch.equal(m, m.bfloat16().float()) for m in optimizer.masters)  # masters hold more than bf16
    index, scalars = saved(tmp_path, model, optimizer)
    assert {kind for _, kind in index.pieces} == {"param", "master", "exp_avg", "exp_avg_sq"}

    loaded = chunks(torch.bfloat16)
    loaded_optimizer = zero1(loaded, fused=True)
    restore(loaded, loaded_optimizer, GROUPS, index, scalars)
    assert loaded_optimizer.param_groups is loaded_optimizer.optimizer.param_groups  # set_lr still reaches it
    assert_same(state_of(loaded_optimizer), state_of(optimizer))
    for a, b in zip(loaded[0].parameters(), model[0].parameters()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    take_steps(optimizer, optimizer.masters, 1, seed=1)
    take_steps(loaded_optimizer, loaded_optimizer.masters, 1, seed=1)
    assert_same(state_of(loaded_optimizer), state_of(optimizer))
    assert all(torch.equal(a, b) for a, b in zip(loaded[0].parameters(), model[0].parameters()))


def test_checkpoint_without_masters_restores_them_from_the_weights(tmp_path: Path) -> None:
    model = chunks(torch.bfloat16)
    optimizer = zero1(model)
    take_steps(optimizer, optimizer.masters, 2)
    index, scalars = saved(tmp_path, model, optimizer)
    for key in [key for key in index.pieces if key[1] == "master"]:
        del index.pieces[key]
    loaded = chunks(torch.bfloat16)
    loaded_optimizer = zero1(loaded)
    restore(loaded, loaded_optimizer, GROUPS, index, scalars)
    for master, segment in zip(loaded_optimizer.masters, loaded_optimizer.segments):
        weight = segment.param.detach().reshape(-1)[segment.param_lo : segment.param_hi]
        assert torch.equal(master, weight.float())


def test_fp32_zero1_saves_no_masters(tmp_path: Path) -> None:
    """fp32 weights hold their masters' exact values: saving both would only double the bytes."""
    model = chunks()
    optimizer = zero1(model)
    take_steps(optimizer, optimizer.masters, 1)
    index, _ = saved(tmp_path, model, optimizer)
    assert {kind for _, kind in index.pieces} == {"param", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("make", [plain, zero1], ids=["plain", "zero1"])
def test_any_per_parameter_tensor_round_trips(make, tmp_path: Path) -> None:
    """AMSGrad's max_exp_avg_sq is saved and restored like the moments, with no name listed anywhere."""
    model = chunks()
    optimizer = make(model, amsgrad=True, foreach=True)
    take_steps(optimizer, optimizer_view(optimizer).masters, 2)
    index, scalars = saved(tmp_path, model, optimizer)
    assert {kind for _, kind in index.pieces} == {"param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    loaded = chunks()
    loaded_optimizer = make(loaded, amsgrad=True, foreach=True)
    restore(loaded, loaded_optimizer, GROUPS, index, scalars)
    assert_same(state_of(loaded_optimizer), state_of(optimizer))


# ---- where step lives and sits --------------------------------------------------------------------
def test_restored_step_sits_where_the_optimizer_wants_it(tmp_path: Path) -> None:
    """torch keeps `step` on the parameter's device for fused and capturable AdamW (on CPU for the
    others). Restoring through load_state_dict follows that rule; the meta device shows it without a GPU."""
    model = chunks()
    optimizer = plain(model, fused=True)
    take_steps(optimizer, optimizer_view(optimizer).masters, 3)
    index, scalars = saved(tmp_path, model, optimizer)
    assert scalars["param"] == {"step": {"value": 3.0, "dtype": "float32", "shape": []}} and scalars["group"] == {}

    loaded = chunks()
    loaded_optimizer = plain(loaded, fused=True)
    restore(loaded, loaded_optimizer, GROUPS, index, scalars)
    assert_same(state_of(loaded_optimizer), state_of(optimizer))

    on_meta = chunks(device="meta")
    meta_optimizer = plain(on_meta, capturable=True)
    restore(on_meta, meta_optimizer, GROUPS, index, scalars)
    for param in optimizer_view(meta_optimizer).masters:
        step = meta_optimizer.state[param]["step"]
        assert (step.device, step.dtype, step.shape) == (param.device, torch.float32, torch.Size([]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_restored_fused_step_sits_on_the_gpu(tmp_path: Path) -> None:
    model = chunks()
    optimizer = plain(model, fused=True)
    take_steps(optimizer, optimizer_view(optimizer).masters, 2)
    index, scalars = saved(tmp_path, model, optimizer)
    on_gpu = chunks(device="cuda")
    gpu_optimizer = plain(on_gpu, fused=True)
    restore(on_gpu, gpu_optimizer, GROUPS, index, scalars)
    for param in optimizer_view(gpu_optimizer).masters:
        step = gpu_optimizer.state[param]["step"]
        assert step.device == param.device and step.device.type == "cuda" and int(step) == 2


@pytest.mark.parametrize("make", [plain, zero1], ids=["plain", "zero1"])
def test_group_step_is_saved_once_and_restored(make, tmp_path: Path) -> None:
    """apex FusedAdam keeps `step` in each param group (today's code: KeyError at the first save)."""
    model = chunks()
    optimizer = make(model, GroupStepAdam)
    take_steps(optimizer, optimizer_view(optimizer).masters, 3)
    index, scalars = saved(tmp_path, model, optimizer)
    assert scalars == {"class": "tests.fake_apex.GroupStepAdam", "param": {}, "group": {"step": {"value": 3}}}
    loaded = chunks()
    loaded_optimizer = make(loaded, GroupStepAdam)
    restore(loaded, loaded_optimizer, GROUPS, index, scalars)
    inner = optimizer_view(loaded_optimizer).inner
    assert [group.get("step") for group in inner.param_groups] == [3, 3]
    assert_same(state_of(loaded_optimizer), state_of(optimizer))
    take_steps(optimizer, optimizer_view(optimizer).masters, 1, seed=1)  # bias correction continues at step 4
    take_steps(loaded_optimizer, optimizer_view(loaded_optimizer).masters, 1, seed=1)
    assert_same(state_of(loaded_optimizer), state_of(optimizer))


def test_step_moves_between_implementations(tmp_path: Path) -> None:
    """A run saved with apex (group step) resumes with torch AdamW (per-parameter step), and back."""
    (tmp_path / "apex").mkdir()
    (tmp_path / "torch").mkdir()
    model = chunks()
    apex_like = plain(model, GroupStepAdam)
    take_steps(apex_like, optimizer_view(apex_like).masters, 3)
    index, scalars = saved(tmp_path / "apex", model, apex_like)
    torch_model = chunks()
    torch_adamw = plain(torch_model, fused=True)
    restore(torch_model, torch_adamw, GROUPS, index, scalars)
    for param in optimizer_view(torch_adamw).masters:
        state = torch_adamw.state[param]
        assert sorted(state) == ["exp_avg", "exp_avg_sq", "step"]
        assert state["step"].dtype == torch.float32 and state["step"].item() == 3.0
    assert all("step" not in group for group in torch_adamw.param_groups)

    take_steps(torch_adamw, optimizer_view(torch_adamw).masters, 1)
    index, scalars = saved(tmp_path / "torch", torch_model, torch_adamw)
    back_model = chunks()
    back = plain(back_model, GroupStepAdam)
    restore(back_model, back, GROUPS, index, scalars)
    assert [group["step"] for group in back.param_groups] == [4, 4]
    assert all(sorted(state) == ["exp_avg", "exp_avg_sq"] for state in back.state.values())


# ---- scalars stored once ----------------------------------------------------------------------------
def test_scalars_that_differ_between_parameters_are_refused() -> None:
    first, second = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([first, second], foreach=True)
    first.grad, second.grad = torch.ones(2), torch.ones(2)
    optimizer.step()
    second.grad = None  # skipped by this step: its count falls behind
    optimizer.step()
    with pytest.raises(ValueError, match=r"optimizer scalar 'step' differs between parameters"):
        optimizer_scalars(optimizer)


def test_checkpoints_from_before_scalars_were_recorded_load() -> None:
    legacy = saved_scalars({"optimizer_steps": 10})
    assert legacy["param"] == {"step": {"value": 10.0, "dtype": "float32", "shape": []}} and steps_of(legacy) == 10
    assert saved_scalars({"optimizer_steps": 0})["param"] == {}
