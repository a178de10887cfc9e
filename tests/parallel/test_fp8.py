"""FP8 linears (train.fp8): torch._scaled_mm's GEMMs against an fp32 reference on the same quantised operands
and against bf16 F.linear; the tiny model trains like bf16 through the real Trainer (tp 1, and tp 2 with
sequence parallel); the configs fp8 cannot run are refused before training."""

from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from megalm.config import ConfigError, load_config, validate
from megalm.distributed import ParallelGroups, build_parallel_groups
from megalm.model import compile as compile_module
from megalm.model.gpt import build_model_chunks
from megalm.parallel import fp8
from megalm.parallel.fp8 import check_fp8_device, fp8_linear
from megalm.testing import run_distributed
from megalm.topology import Topology
from megalm.train import build_trainer
from tests.test_cli import ROOT

RECIPES = ["tensorwise", "rowwise"]
STEPS = 30


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def _dequantised(t: torch.Tensor, dtype: torch.dtype, dim: Optional[int], power_of_two: bool) -> torch.Tensor:
    """t rounded to float8 `dtype` under its amax scale (whole tensor, or one scale per slice along `dim`), in fp32."""
    work = t.float()
    amax = work.abs().amax() if dim is None else work.abs().amax(dim=dim, keepdim=True)
    scale = amax.clamp(min=1e-12) / torch.finfo(dtype).max
    if power_of_two:
        scale = 2.0 ** torch.ceil(torch.log2(scale))
    return (work / scale).to(dtype).float() * scale


def _reference(recipe: str, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor):
    """(y, dx, dW) in fp32 math from operands quantised as the recipe says, rounded to bf16 at the end."""
    x2d, g2d = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
    if recipe == "tensorwise":
        xq, wq = _dequantised(x2d, fp8.E4M3, None, False), _dequantised(weight, fp8.E4M3, None, False)
        gq = _dequantised(g2d, fp8.E5M2, None, False)
        y, dx, dw = xq @ wq.t(), gq @ wq, gq.t() @ xq
    else:  # each GEMM's operands scaled per slice along the dimension that GEMM reduces over
        y = _dequantised(x2d, fp8.E4M3, 1, True) @ _dequantised(weight, fp8.E4M3, 1, True).t()
        dx = _dequantised(g2d, fp8.E4M3, 1, True) @ _dequantised(weight, fp8.E4M3, 0, True)
        dw = _dequantised(g2d, fp8.E4M3, 0, True).t() @ _dequantised(x2d, fp8.E4M3, 0, True)
    return y.view(*x.shape[:-1], -1).bfloat16(), dx.view(x.shape).bfloat16(), dw.bfloat16()


def _operands(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    # 15 tokens: the GEMM pads them to 16 rows; features spread over octaves, as real activations are
    x = (torch.randn(3, 5, 64, generator=generator) * torch.logspace(-2, 1, 64)).bfloat16()
    weight = (torch.randn(48, 64, generator=generator) * 0.02).bfloat16()
    bias = torch.randn(48, generator=generator).bfloat16()
    grad = (torch.randn(3, 5, 48, generator=generator) * torch.logspace(-3, 0, 48)).bfloat16()
    return x, weight, bias, grad


def _run(linear, x, weight, bias, grad):
    x, weight, bias = (t.clone().requires_grad_() for t in (x, weight, bias))
    y = linear(x, weight, bias)
    y.backward(grad)
    return y.detach(), x.grad, weight.grad, bias.grad


@pytest.mark.parametrize("recipe", RECIPES)
def test_fp8_linear_matches_fp32_math_on_the_quantised_operands(recipe: str) -> None:
    x, weight, bias, grad = _operands()
    y, dx, dw, db = _run(lambda *a: fp8_linear(*a, recipe), x, weight, bias, grad)
    ref_y, ref_dx, ref_dw = _reference(recipe, x, weight, grad)
    assert (y.dtype, dx.dtype, dw.dtype) == (torch.bfloat16,) * 3  # gradients come back in the parameters' dtype
    # the bias is added in bf16 after the GEMM: one more bf16 rounding than the reference's
    assert torch.allclose(y, (ref_y.float() + bias.float()).bfloat16(), rtol=2**-7, atol=1e-5)
    assert torch.allclose(dx, ref_dx, rtol=2**-8, atol=1e-6), (dx - ref_dx).abs().max()
    assert torch.allclose(dw, ref_dw, rtol=2**-8, atol=1e-6), (dw - ref_dw).abs().max()
    assert torch.equal(db, grad.float().sum((0, 1)).bfloat16())  # bias gradient: high precision, as F.linear's


@pytest.mark.parametrize("recipe", RECIPES)
def test_fp8_linear_is_close_to_bf16_but_not_equal(recipe: str) -> None:
    x, weight, bias, grad = _operands(1)
    got = _run(lambda *a: fp8_linear(*a, recipe), x, weight, bias, grad)
    want = _run(F.linear, x, weight, bias, grad)
    errors = [_rel(g, w) for g, w in zip(got, want)]
    assert errors[0] < 0.03 and errors[1] < 0.1 and errors[2] < 0.1, errors
    assert min(errors[:3]) > 1e-3, errors  # the float8 rounding is really there


def test_rowwise_scales_follow_each_row() -> None:
    """A token 1e5 times smaller than the others keeps its precision row-wise; tensorwise it falls into e4m3's
    subnormals (one scale for the whole tensor)."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(4, 64, generator=generator).bfloat16()
    weight = (torch.randn(48, 64, generator=generator) * 0.02).bfloat16()
    x[0] *= 1e-5
    want = F.linear(x, weight)[0]
    rowwise, tensorwise = (fp8_linear(x, weight, None, recipe)[0] for recipe in ("rowwise", "tensorwise"))
    assert _rel(rowwise, want) < 0.05 and _rel(tensorwise, want) > 0.2, (_rel(rowwise, want), _rel(tensorwise, want))


def _curve(*overrides: str, steps: int = STEPS) -> list[float]:
    config = load_config(ROOT / "configs" / "tiny.yaml", [f"train.steps={steps}", "train.precision=bf16", *overrides])
    trainer = build_trainer(config, ParallelGroups.single(), None)
    return [record["loss"] for record in trainer.fit()]


@pytest.fixture(scope="module")
def bf16_curve() -> list[float]:
    return _curve()


@pytest.mark.parametrize("recipe", RECIPES)
def test_tiny_model_trains_like_bf16(recipe: str, bf16_curve: list[float]) -> None:
    curve = _curve(f"train.fp8={recipe}")
    assert len(curve) == len(bf16_curve) == STEPS
    assert curve != bf16_curve  # the float8 GEMMs really ran
    assert curve[-1] < curve[0] - 0.5
    assert abs(curve[-1] - bf16_curve[-1]) <= 0.05 * bf16_curve[-1], (curve[-1], bf16_curve[-1])


def test_parameters_and_state_dict_are_the_bf16_models() -> None:
    """fp8 changes the GEMMs only: same parameter names, dtypes and values as the bf16 model."""
    configs = [load_config(ROOT / "configs" / "tiny.yaml", ["train.precision=bf16", f"train.fp8={fp8}"])
               for fp8 in ("none", "rowwise")]
    plain, quantised = (build_model_chunks(config, ParallelGroups.single())[0].state_dict() for config in configs)
    assert plain.keys() == quantised.keys()
    assert all(torch.equal(plain[name], quantised[name]) and quantised[name].dtype == torch.bfloat16
               for name in plain)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_fp8_layers_are_one_graph_and_match_eager(fresh_dynamo, monkeypatch) -> None:
    """train.compile traces the fp8 linear (autograd function, _scaled_mm) into the layer's graph: at tp 1 one
    graph, no break; with the aot_eager backend (eager's kernels) the losses are eager's bit for bit. (Rowwise
    only: tensorwise runs the same function with other quantise arguments.)"""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(compile_module, "DEFAULT_BACKEND", "aot_eager")
    eager = _curve("train.fp8=rowwise", steps=3)
    counters.clear()
    compiled = _curve("train.fp8=rowwise", "train.compile=true", steps=3)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])
    assert compiled == eager


@pytest.mark.slow
def test_inductor_fp8_layers_train_like_eager(fresh_dynamo) -> None:
    """With inductor (what train.compile runs): the generated quantisation code trains like eager's."""
    eager = _curve("train.fp8=rowwise", steps=10)
    compiled = _curve("train.fp8=rowwise", "train.compile=true", steps=10)
    assert max(abs(a - b) / b for a, b in zip(compiled, eager)) < 1e-3, (compiled, eager)


def _tp_worker(rank: int, world_size: int, overrides: list[str]) -> list[float]:
    config = load_config(ROOT / "configs" / "tiny.yaml", [f"train.steps={STEPS}", "train.precision=bf16",
                                                          f"parallel.tp={world_size}", *overrides])
    groups = build_parallel_groups(Topology(tp=world_size), rank, torch.device("cpu"))
    trainer = build_trainer(config, groups, None)
    return [record["loss"] for record in trainer.fit()]


@pytest.mark.slow
def test_tp2_sequence_parallel_fp8_trains_like_bf16(bf16_curve: list[float]) -> None:
    """tp 2 with sequence parallel (the column linears' all-gather conjugate + fp8 GEMM) against one bf16 process."""
    ranks = run_distributed(_tp_worker, 2, ["parallel.sequence_parallel=true", "train.fp8=rowwise"], timeout=600)
    assert ranks[0] == ranks[1]
    assert ranks[0] != bf16_curve
    assert abs(ranks[0][-1] - bf16_curve[-1]) <= 0.05 * bf16_curve[-1], (ranks[0][-1], bf16_curve[-1])


# ---- configs fp8 cannot run ------------------------------------------------------------------------------


def _validate(*overrides: str, world_size: int = 1) -> None:
    validate(load_config(ROOT / "configs" / "tiny.yaml", ["train.precision=bf16", *overrides]), world_size)


def test_fp8_defaults_to_none_and_bf16_configs_validate() -> None:
    assert load_config(ROOT / "configs" / "tiny.yaml").train.fp8 == "none"
    for recipe in RECIPES:
        _validate(f"train.fp8={recipe}")
        _validate(f"train.fp8={recipe}", "parallel.tp=2", "parallel.sequence_parallel=true", world_size=2)


def test_unknown_recipe_is_refused() -> None:
    with pytest.raises(ConfigError, match="train.fp8"):
        _validate("train.fp8=delayed")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_fp8_needs_bf16(precision: str) -> None:
    with pytest.raises(ConfigError, match=f"train.fp8=rowwise needs train.precision=bf16, got {precision}"):
        _validate("train.fp8=rowwise", f"train.precision={precision}")


def test_fp8_refuses_deepspeed() -> None:
    with pytest.raises(ConfigError, match="train.fp8=tensorwise runs with train.engine=megalm only"):
        _validate("train.fp8=tensorwise", "train.engine=deepspeed")


def test_fp8_refuses_tp_comm_overlap() -> None:
    """The chunked overlap GEMMs are high precision: the pair is a config error, and the layers refuse it too."""
    overlap = ("parallel.tp=2", "parallel.sequence_parallel=true", "parallel.tp_comm_overlap=true")
    _validate(*overlap, world_size=2)
    with pytest.raises(ConfigError, match="train.fp8=rowwise with parallel.tp_comm_overlap=true.*"
                                          "set parallel.tp_comm_overlap=false"):
        _validate("train.fp8=rowwise", *overlap, world_size=2)
    from megalm.parallel.tensor import RowParallelLinear
    with pytest.raises(ValueError, match="use one of train.fp8 and parallel.tp_comm_overlap"):
        RowParallelLinear(32, 32, ParallelGroups.single(), sequence_parallel=True, device="meta", fp8="tensorwise",
                          overlap_chunks=2)


def test_fp8_names_each_width_not_a_multiple_of_16() -> None:
    with pytest.raises(ConfigError, match=r"at parallel.tp=1: model.hidden_size = 72 \(make model.hidden_size a "
                                          r"multiple of 16\); the attention width per tp rank \(num_heads x head_dim / tp\) = 72 \(make "
                                          r"num_heads x head_dim a multiple of 16\); or set train.fp8=none$"):
        _validate("train.fp8=rowwise", "model.hidden_size=72")  # both widths named
    # per tp rank: 96 / 4 = 24 attention features, 384 / 4 = 96 MLP features (fine)
    with pytest.raises(ConfigError, match=r"at parallel.tp=4: the attention width per tp rank \(num_heads x head_dim "
                                          r"/ tp\) = 24 \(make num_heads x head_dim a multiple of 64\); or set"):
        _validate("train.fp8=tensorwise", "model.hidden_size=96", "parallel.tp=4", world_size=4)
    with pytest.raises(ConfigError, match=r"the MLP width per tp rank \(ffn_hidden_size / tp\) = 40 \(make "
                                          r"model.ffn_hidden_size a multiple of 32 such as 64 or 96\)"):
        _validate("train.fp8=tensorwise", "model.ffn_hidden_size=80", "parallel.tp=2", world_size=2)
    with pytest.raises(ConfigError, match=r"the key/value width per tp rank .* = 8 \(make 2 x num_kv_heads x head_dim "
                                          r"a multiple of 16\)"):  # one key/value head of width 4 (hidden 64, 16 heads)
        _validate("train.fp8=tensorwise", "model.num_heads=16", "model.num_kv_heads=1")
    _validate("model.hidden_size=72")  # without fp8 the same size is fine


def test_gpu_without_fp8_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(RuntimeError, match=r"train.fp8=rowwise needs .* NVIDIA A100 has compute capability 8.0: "
                                           r"set train.fp8=none"):
        check_fp8_device("rowwise", torch.device("cuda", 0))
    # the model build runs the check (on the meta device: nothing touches a GPU)
    config = load_config(ROOT / "configs" / "tiny.yaml", ["train.precision=bf16", "train.fp8=tensorwise"])
    with pytest.raises(RuntimeError, match="compute capability 8.0"):
        build_model_chunks(config, ParallelGroups.single("cuda"), materialize=False)
    check_fp8_device("none", torch.device("cuda", 0))  # fp8 off: no check
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_device("rowwise", torch.device("cuda", 0))  # Hopper
