"""FLOPs per token from the model spec: the matrices a layer really has (fused QKV or query + key_value
with fewer kv heads, GELU's two or SwiGLU's three MLP matrices, an explicit head_dim), per tp rank.

Multiply-adds count 2 FLOPs; norms, biases, activations and rotary are left out (memory-bound, a few
FLOPs per element), as Megatron-LM and the PaLM MFU convention leave them out. Attention scores and
the weighted sum count the full [s, s] square (no causal halving), as Megatron-LM counts them.
"""

from __future__ import annotations

from megalm.config import ModelConfig
from megalm.plan.layout import projection_widths


def layer_matmul_flops(model: ModelConfig, tp: int = 1) -> tuple[float, float]:
    """(weight GEMM FLOPs, attention core FLOPs) of one layer's forward, per token and tp rank.

    With tp > kv_heads each rank computes its replicated kv head itself (the kv projection does not shrink)."""
    h, f, s = model.hidden_size, model.ffn_size(), model.seq_length
    query, kv = projection_widths(model, tp)  # per rank: H d / tp and 2 K_local d
    mlp_matrices = 3 if model.mlp == "swiglu" else 2  # gate, up, down | fc1, fc2
    gemm = 2 * h * (query + kv) + 2 * query * h + mlp_matrices * 2 * h * f // tp
    core = 4 * s * query  # q k^T and probabilities x v over the local query heads
    return float(gemm), float(core)


def forward_flops_per_token(model: ModelConfig) -> float:
    """Model FLOPs of one token's forward (whole model, tp = 1): the layers plus the logits 2 h V."""
    gemm, core = layer_matmul_flops(model, 1)
    return model.num_layers * (gemm + core) + 2 * model.hidden_size * model.vocab_size


def training_flops_per_token(model: ModelConfig) -> float:
    """Model FLOPs per token of one training step (forward + backward = 3 x forward), no recompute.

    With ffn = 4h, every head its own kv, GELU: Megatron's 72 l h^2 (1 + s/(6h) + V/(12 l h)) per token."""
    return 3.0 * forward_flops_per_token(model)
