"""Kernel launches and the loss's memory traffic, counted from megalm's own layer code on CPU.

The planner's time model (megalm.plan.model) needs how many kernels one transformer layer launches in
forward and backward (each costs the host a fixed time: Python, autograd, the dispatcher and the CUDA
launch) and how many bytes the loss's element-wise kernels move per logits element. Both are read from
the code, not guessed: `count_kernels` runs one training forward and backward of a tiny 1-layer and 2-layer
megalm model on CPU under a TorchDispatchMode and counts every aten operator that launches a kernel (views,
aliases and allocations launch none); a layer is the difference of the two models, the rest (embedding,
final norm, logits, loss) the once-per-micro-batch head. Backward also counts the one kernel per parameter
tensor that megalm's gradient sync runs in its post-accumulate hook (megalm.parallel.data: the micro-batch's
gradient added into the fp32 main-gradient bucket).

The planner reads `RECORDED` (regenerate with `python -m megalm.plan.kernels`); a spec not in it is counted
on first use. `tests/test_plan_kernels.py` recounts every recorded entry, so the constants cannot drift from
the code. CPU and CUDA run the same operators at the module level (the SDPA call is one operator on both, a
linear is one GEMM), so the counts describe an eager CUDA step; `train.compile` (fused element-wise kernels)
is not modelled: a compiled layer is planned as eager, an upper bound on its launches.
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from megalm.config import ModelConfig
from megalm.plan.layout import layer_gemms

# dispatcher operators that are not views but launch no kernel (type promotion, alias-like reshapes, allocation)
NO_KERNEL = frozenset({
    "aten.promote_types.default", "aten._unsafe_view.default", "aten.empty.memory_format",
    "aten.empty_strided.default", "aten.new_empty.default", "aten.lift_fresh.default", "aten.result_type.Tensor",
    "aten.result_type.Scalar", "aten.is_same_size.default", "aten._has_compatible_shallow_copy_type.default",
})
VOCAB = 1000  # the tiny model's vocabulary (padded to 1024): no layer tensor has the logits' size


@dataclass(frozen=True)
class KernelCounts:
    """Kernels per micro-batch of one transformer layer and of the head, and the loss's traffic."""

    layer_forward: int
    layer_backward: int  # with one main-gradient accumulation per parameter tensor
    head_forward: int  # embedding, positions, final norm, logits and loss: once per micro-batch
    head_backward: int
    loss_bytes_per_logit: float  # bytes the loss's element-wise kernels read and write per logits element


def spec_key(model: ModelConfig, precision: str) -> tuple:
    """The fields of a model spec (and the precision's casts) that change which kernels a step launches."""
    return (model.family, model.norm, model.mlp, model.position_embedding, model.bias, model.has_qkv_bias(),
            model.grouped_attention(), model.hidden_dropout > 0, model.attention_dropout > 0, model.document_mask,
            "fp32" if precision == "fp32" else "low")


# python -m megalm.plan.kernels (torch 2.13, CPU): spec_key -> counts
RECORDED: dict[tuple, KernelCounts] = {
    ('lm', 'layernorm', 'gelu', 'learned', True, True, False, False, False, False, 'low'): KernelCounts(14, 35, 17, 18, 74),
    ('lm', 'layernorm', 'gelu', 'learned', True, True, False, False, False, False, 'fp32'): KernelCounts(10, 31, 15, 15, 80),
    ('lm', 'layernorm', 'gelu', 'learned', True, True, False, True, True, False, 'low'): KernelCounts(42, 48, 21, 19, 74),
    ('prefixlm', 'layernorm', 'gelu', 'learned', True, True, False, False, False, False, 'low'): KernelCounts(17, 35, 21, 18, 74),
    ('lm', 'rmsnorm', 'swiglu', 'rotary', False, False, True, False, False, False, 'low'): KernelCounts(43, 78, 31, 27, 74),
    ('lm', 'rmsnorm', 'swiglu', 'rotary', False, False, True, False, False, False, 'fp32'): KernelCounts(33, 68, 29, 24, 80),
    ('lm', 'rmsnorm', 'swiglu', 'rotary', False, False, True, True, True, False, 'low'): KernelCounts(73, 93, 35, 28, 74),
    ('prefixlm', 'rmsnorm', 'swiglu', 'rotary', False, False, True, False, False, False, 'low'): KernelCounts(46, 78, 35, 27, 74),
    ('lm', 'rmsnorm', 'swiglu', 'rotary', True, True, False, False, False, False, 'low'): KernelCounts(42, 83, 31, 27, 74),
}


def _launches(func) -> bool:
    return not func.is_view and str(func) not in NO_KERNEL


def _count(model: ModelConfig, precision: str, num_layers: int, fp8: str = "none") -> tuple[int, int, float, int]:
    """(forward kernels, backward kernels, loss bytes per logits element, parameter tensors) of a tiny model."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from megalm.config import Config, ParallelConfig, TrainConfig
    from megalm.data.batch import document_ids
    from megalm.data.tokenizer import EOS_ID
    from megalm.distributed import ParallelGroups
    from megalm.model.gpt import build_model_chunks

    logits_numel = 2 * 64 * 1024

    class Counting(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.kernels, self.loss_bytes = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if _launches(func):
                self.kernels += 1
                tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
                if "mm" not in str(func) and any(t.numel() == logits_numel for t in tensors):
                    self.loss_bytes += sum(t.numel() * t.element_size() for t in tensors if t.numel() == logits_numel)
            return out

    tiny = ModelConfig(
        family=model.family, num_layers=num_layers, hidden_size=128, num_heads=4, vocab_size=VOCAB, seq_length=64,
        hidden_dropout=0.1 if model.hidden_dropout > 0 else 0.0,
        attention_dropout=0.1 if model.attention_dropout > 0 else 0.0, position_embedding=model.position_embedding,
        norm=model.norm, mlp=model.mlp, num_kv_heads=2 if model.grouped_attention() else None, bias=model.bias,
        qkv_bias=model.has_qkv_bias(), document_mask=model.document_mask)
    config = Config(model=tiny, parallel=ParallelConfig(),
                    train=TrainConfig(micro_batch_size=2, global_batch_size=2, precision=precision, seed=5, fp8=fp8))
    torch.manual_seed(0)
    (chunk,) = build_model_chunks(config, ParallelGroups.single())
    chunk.train()
    generator = torch.Generator().manual_seed(11)
    tokens = torch.randint(2, VOCAB, (2, 64), generator=generator)
    labels = torch.randint(0, VOCAB, (2, 64), generator=generator)
    prefix = torch.tensor([17, 40]) if model.family == "prefixlm" else None
    documents = None
    if model.document_mask:
        tokens[:, [16, 17, 32]] = EOS_ID
        documents = document_ids(tokens, EOS_ID)
    forward, backward = Counting(), Counting()
    with forward:
        loss = chunk(tokens, labels=labels, prefix_lengths=prefix, document_ids=documents).float().sum()
    with backward:
        loss.backward()
    params = sum(1 for _ in chunk.parameters())
    return (forward.kernels, backward.kernels + params, (forward.loss_bytes + backward.loss_bytes) / logits_numel,
            params)


def count_kernels(model: ModelConfig, precision: str = "bf16") -> KernelCounts:
    """Count, on CPU, the kernels of one layer and of the head for the model's spec (shapes do not matter)."""
    one_f, one_b, loss_bytes, _ = _count(model, precision, 1)
    two_f, two_b, _, _ = _count(model, precision, 2)
    layer_f, layer_b = two_f - one_f, two_b - one_b
    return KernelCounts(layer_f, layer_b, one_f - layer_f, one_b - layer_b, loss_bytes)


def count_fp8_kernels(model: ModelConfig, fp8: str) -> tuple[float, float]:
    """(forward, backward) kernels one train.fp8 linear adds to a bf16 one, counted on CPU as count_kernels does."""
    per_layer = []
    for mode in ("none", fp8):
        one_f, one_b, _, _ = _count(model, "bf16", 1, mode)
        two_f, two_b, _, _ = _count(model, "bf16", 2, mode)
        per_layer.append((two_f - one_f, two_b - one_b))
    linears = len(layer_gemms(model, 1, 1))
    (bf16_f, bf16_b), (fp8_f, fp8_b) = per_layer
    return (fp8_f - bf16_f) / linears, (fp8_b - bf16_b) / linears


_COUNTED: dict[tuple, KernelCounts] = {}  # specs not recorded, counted once per process


def kernel_counts(model: ModelConfig, precision: str) -> KernelCounts:
    """The recorded counts of the model's spec, or (a spec not recorded) counted now, once per process."""
    key = spec_key(model, precision)
    if key in RECORDED:
        return RECORDED[key]
    if key not in _COUNTED:
        _COUNTED[key] = count_kernels(model, precision)
    return _COUNTED[key]


def recorded_specs() -> list[tuple[ModelConfig, str]]:
    """The specs whose counts are recorded: GPT (LayerNorm, GELU, learned positions, biases) and Llama (RMSNorm,
    SwiGLU, rotary, grouped attention, no biases) in bf16 and fp32, LM and PrefixLM, with and without dropout."""
    gpt = ModelConfig(num_layers=2, hidden_size=128, num_heads=4, vocab_size=VOCAB, seq_length=64)
    llama = ModelConfig(num_layers=2, hidden_size=128, num_heads=4, vocab_size=VOCAB, seq_length=64, norm="rmsnorm",
                        mlp="swiglu", position_embedding="rotary", num_kv_heads=2, bias=False)
    specs = []
    for base in (gpt, llama):
        for precision in ("bf16", "fp32"):
            specs.append((base, precision))
        specs.append((ModelConfig(**{**base.__dict__, "hidden_dropout": 0.1, "attention_dropout": 0.1}), "bf16"))
        specs.append((ModelConfig(**{**base.__dict__, "family": "prefixlm"}), "bf16"))
    specs.append((ModelConfig(**{**llama.__dict__, "num_kv_heads": None, "bias": True}), "bf16"))  # Qwen-like MHA
    return specs


def main(argv: Optional[list[str]] = None) -> int:
    """Print the RECORDED table for the recorded specs (paste it into this file)."""
    argparse.ArgumentParser(description=main.__doc__).parse_args(argv)
    seen = Counter()
    for model, precision in recorded_specs():
        key = spec_key(model, precision)
        if seen[key]:
            continue
        seen[key] += 1
        c = count_kernels(model, precision)
        print(f"    {key!r}: KernelCounts({c.layer_forward}, {c.layer_backward}, {c.head_forward}, {c.head_backward}, "
              f"{c.loss_bytes_per_logit:g}),")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
