"""FP8 linears (train.fp8): y = x W^T with both GEMM operands in float8 and dynamic scales, via torch._scaled_mm.

Each of a linear's three GEMMs (forward y = x W^T, input gradient dx = dy W, weight gradient dW = dy^T x)
casts its two operands to float8 just before the GEMM, each with a scale taken from its current absolute
maximum (dynamic scaling: no amax history, nothing stored between steps), and `torch._scaled_mm` multiplies
the float8 operands, applies the two scales and writes the result in the input's dtype (bf16). The
parameters, fp32 main gradients, master weights and checkpoints are the bf16 run's: only the GEMMs change.
The layer saves its bf16 input and weight for backward, as F.linear does (the activation memory the planner
counts is unchanged), and quantises them again there, along the axis each backward GEMM needs.

Recipes (as torchao's float8 training names them):

    tensorwise  one fp32 scale per tensor; x and W in e4m3 (more mantissa), dy in e5m2 (more range: one
                scale must cover the whole gradient tensor, whose values span more octaves than weights or
                activations do)
    rowwise     one scale per row of each operand along the GEMM's reduced dimension: x per token, W per
                output feature in forward, W per input feature and dy per token for dx, dy per output
                feature and x per input feature for dW. Every operand in e4m3: per-row scales already
                follow the range, and CUDA's row-wise scaled GEMM takes e4m3 operands. Scales are rounded
                up to powers of two (as torchao's rowwise recipe), so scaling itself is exact.

Why torch._scaled_mm and not torchao: torchao is not a dependency, and its float8 linear swaps modules
(Float8Linear) where megalm's tensor-parallel layers own their collectives; the three casts and GEMMs fit
in one autograd function here. torch._scaled_mm's rules, which this file follows: the first operand
row-major, the second column-major, fp32 scales ([] tensorwise, [M, 1] and [1, N] row-wise), and on CUDA
every dimension a multiple of 16. The feature dimensions (hidden, ffn, q/k/v widths per tp rank) are
checked before training (megalm.config.validation); the token dimension (sequence x micro-batch, or one
token while generating) is zero-padded up to a multiple of 16 here, which changes no result.

On CPU torch has a float8 _scaled_mm too: the CPU run computes the same quantisation and the same GEMM as
the GPU, so the CPU tests exercise this code, not an emulation. A CUDA GPU needs compute capability 8.9
(Ada, Hopper) or newer for float8 GEMMs (check_fp8_device).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
ALIGNMENT = 16  # torch._scaled_mm on CUDA: every dimension a multiple of 16
MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (8.9), Hopper (9.0) and newer
_AMAX_FLOOR = 1e-12  # an all-zero operand still gets a finite scale


def quantise(t: torch.Tensor, dtype: torch.dtype, dim: Optional[int], power_of_two: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(t / scale cast to `dtype`, fp32 scale): scale = amax(|t|) / dtype's max over the whole tensor (dim None,
    a 0-d scale) or along `dim` (kept as a size-1 dimension); power_of_two rounds it up to 2^k."""
    work = t.float()
    amax = work.abs().amax() if dim is None else work.abs().amax(dim=dim, keepdim=True)
    fp8_max = torch.finfo(dtype).max
    scale = amax.clamp(min=_AMAX_FLOOR) / fp8_max
    if power_of_two:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return (work / scale).clamp(-fp8_max, fp8_max).to(dtype), scale


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    """t [rows, k] with zero rows appended up to a multiple of ALIGNMENT (zero rows add nothing to any GEMM)."""
    pad = -t.shape[0] % ALIGNMENT
    return F.pad(t, (0, 0, 0, pad)) if pad else t


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix laid out column-major (_scaled_mm's second operand)."""
    return t.t().contiguous().t()


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
               out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b with scales applied, a row-major [m, k], b column-major [k, n]; row-wise scales [m, 1] and [1, n]
    with unit stride along their long side (a transposed [1, n] scale has stride n: reshape, not .t())."""
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)


def fp8_gemms(recipe: str, x2d: torch.Tensor, weight: torch.Tensor, grad2d: Optional[torch.Tensor] = None):
    """The quantised operands of the forward GEMM (grad2d None: {"forward": ...}) or of the two backward GEMMs
    ({"input": ..., "weight": ...}), each (a, b, scale_a, scale_b) with a row-major and b column-major as
    _scaled_mm takes them (x2d and grad2d already padded to 16 rows)."""
    if recipe not in ("tensorwise", "rowwise"):
        raise ValueError(f"fp8 recipe must be 'tensorwise' or 'rowwise', got {recipe!r}")
    if recipe == "rowwise" and grad2d is None:
        xq, x_scale = quantise(x2d, E4M3, -1, True)  # per token [m, 1]
        wq, w_scale = quantise(weight, E4M3, -1, True)  # per output feature [n, 1]
        return {"forward": (xq, wq.t(), x_scale, w_scale.reshape(1, -1))}
    if recipe == "rowwise":  # each operand again, along the dimension its backward GEMM reduces
        gq, g_scale = quantise(grad2d, E4M3, -1, True)  # dy per token [m, 1]
        wq, w_scale = quantise(weight, E4M3, 0, True)  # W per input feature [1, k]
        gq_out, g_out_scale = quantise(grad2d, E4M3, 0, True)  # dy per output feature [1, n]
        xq, x_scale = quantise(x2d, E4M3, 0, True)  # x per input feature [1, k]
        return {"input": (gq, _column_major(wq), g_scale, w_scale),
                "weight": (gq_out.t().contiguous(), _column_major(xq), g_out_scale.reshape(-1, 1), x_scale)}
    xq, x_scale = quantise(x2d, E4M3, None)
    wq, w_scale = quantise(weight, E4M3, None)
    if grad2d is None:
        return {"forward": (xq, wq.t(), x_scale, w_scale)}
    gq, g_scale = quantise(grad2d, E5M2, None)
    return {"input": (gq, _column_major(wq), g_scale, w_scale),
            "weight": (gq.t().contiguous(), _column_major(xq), g_scale, x_scale)}


class _Fp8Linear(torch.autograd.Function):
    """x W^T with all three GEMMs in float8 (see the module docstring); saves x and W as F.linear does."""

    @staticmethod
    def forward(ctx, x, weight, recipe):
        # x: [..., k], weight: [n, k] -> [..., n] in x's dtype
        ctx.recipe = recipe
        ctx.save_for_backward(x, weight)
        x2d = x.reshape(-1, x.shape[-1])
        a, b, scale_a, scale_b = fp8_gemms(recipe, _pad_rows(x2d), weight)["forward"]
        y = _scaled_mm(a, b, scale_a, scale_b, x.dtype)[: x2d.shape[0]]
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_input, need_weight = ctx.needs_input_grad[:2]
        rows = x.numel() // x.shape[-1]
        x2d = _pad_rows(x.reshape(rows, x.shape[-1]))
        grad2d = _pad_rows(grad.reshape(rows, grad.shape[-1]))
        gemms = fp8_gemms(ctx.recipe, x2d, weight, grad2d)
        grad_input = grad_weight = None
        if need_input:  # dy [m, n] @ W [n, k]
            grad_input = _scaled_mm(*gemms["input"], x.dtype)[:rows].view(x.shape)
        if need_weight:  # dy^T [n, m] @ x [m, k], in the weight's dtype (as autograd hands F.linear's)
            grad_weight = _scaled_mm(*gemms["weight"], weight.dtype)
        return grad_input, grad_weight, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], recipe: str) -> torch.Tensor:
    """F.linear(x, weight, bias) with the GEMMs in float8 (`recipe`: tensorwise or rowwise); the bias is added
    afterwards in x's dtype."""
    y = _Fp8Linear.apply(x, weight, recipe)
    return y if bias is None else y + bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], fp8: str = "none") -> torch.Tensor:
    """F.linear, or with fp8 "tensorwise" / "rowwise" its float8 version (fp8_linear)."""
    if fp8 == "none":
        return F.linear(x, weight, bias)
    return fp8_linear(x, weight, bias, fp8)


def check_fp8_device(fp8: str, device: torch.device) -> None:
    """Raise before training when float8 GEMMs cannot run on `device` (a CUDA GPU older than compute capability 8.9)."""
    if fp8 == "none" or device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise RuntimeError(
            f"train.fp8={fp8} needs float8 tensor cores (CUDA compute capability >= 8.9: Ada, Hopper or newer), "
            f"but {name} has compute capability {capability[0]}.{capability[1]}: set train.fp8=none"
        )

