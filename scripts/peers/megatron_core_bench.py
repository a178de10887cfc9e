"""Megatron-Core's row of the side by side (megalm.bench_peers): its GPTModel trains a megalm config's shape.

usage: python scripts/peers/megatron_core_bench.py CONFIG [overrides] --tokens FILE [--steps N] [--warmup N]

The model is megatron.core's GPTModel built from get_gpt_layer_local_spec (Megatron-Core's own modules,
no Transformer Engine): LayerNorm + GELU (tanh, Megatron's fused bias-GELU) + learned positions for a
GPT config, RMSNorm + SwiGLU (its fused SwiGLU) + grouped-query rotary attention (llama3 rope scaling) for a Llama one,
biases and tied embeddings as the config says, the vocabulary padded as megalm pads it. The local
spec's core attention is an unfused softmax(QK^T)V; it is replaced by a subclass that calls torch's
scaled_dot_product_attention (causal: flash attention on a GPU), as megalm and torchtitan use flash
attention (PEER_CORE_ATTENTION=local keeps Megatron's own). On a GPU the model is wrapped in
Megatron-Core's DistributedDataParallel (fp32 gradient buffers, world size 1) and trained with
get_megatron_optimizer (Adam, bf16 parameters with fp32 main parameters, gradient clipping): the
Megatron-LM scheme megalm follows. Without Apex or Transformer Engine its Adam is torch's AdamW (foreach)
and its gradient norm the local multi-tensor fallback: Megatron-Core as pip installs it. On a CPU (the
tests), where that wrapper's CUDA buffers cannot exist, torch's AdamW steps the parameters directly.
Parallel state: world size 1, tp = pp = 1.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # megalm from the checkout

from megalm.bench_peers import print_record, read_token_file, result_record, runner_args, timed_steps  # noqa: E402
from megalm.config import Config, resolved_decay_steps  # noqa: E402
from megalm.distributed import allow_tf32, resolve_device  # noqa: E402
from megalm.optim import lr_at  # noqa: E402
from megalm.testing import free_port  # noqa: E402


def sdpa_core_attention():
    """Megatron-Core's local DotProductAttention with its forward on torch's SDPA (causal, GQA)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class SDPADotProductAttention(DotProductAttention):
        """q, k, v [s, b, heads, d] -> context [s, b, heads * d] through scaled_dot_product_attention."""

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
            context = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.config.attention_dropout if self.training else 0.0,
                scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1])
            s, b = query.shape[0], query.shape[1]
            return context.permute(2, 0, 1, 3).reshape(s, b, -1)

    return SDPADotProductAttention


def build_model(config: Config, device: torch.device):
    """GPTModel of the config's shape with the local layer spec; (model, core attention name)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    model = config.model
    if model.family != "lm" or model.position_embedding not in ("learned", "rotary"):
        raise SystemExit(f"megatron_core_bench: model.family {model.family} with {model.position_embedding} "
                         f"positions is not mapped to Megatron-Core here (lm, learned or rotary)")
    llama = model.norm == "rmsnorm"
    dtype = torch.bfloat16 if config.train.precision == "bf16" else torch.float32
    transformer = TransformerConfig(
        num_layers=model.num_layers, hidden_size=model.hidden_size, num_attention_heads=model.num_heads,
        num_query_groups=model.kv_heads(), ffn_hidden_size=model.ffn_size(), kv_channels=model.head_size(),
        hidden_dropout=model.hidden_dropout, attention_dropout=model.attention_dropout,
        init_method_std=model.init_std, normalization="RMSNorm" if llama else "LayerNorm",
        layernorm_epsilon=model.norm_eps, gated_linear_unit=model.mlp == "swiglu",
        activation_func=F.silu if model.mlp == "swiglu" else F.gelu,
        bias_activation_fusion=model.bias or model.mlp == "swiglu",  # Megatron-LM's default fused bias-GELU / SwiGLU
        add_bias_linear=model.bias, add_qkv_bias=model.has_qkv_bias(), bf16=dtype == torch.bfloat16,
        params_dtype=dtype, pipeline_dtype=dtype, use_cpu_initialization=device.type != "cuda",
        masked_softmax_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
    )
    spec = get_gpt_layer_local_spec(normalization="RMSNorm" if llama else "LayerNorm")
    attention = os.environ.get("PEER_CORE_ATTENTION", "sdpa")
    if attention == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = sdpa_core_attention()
    rotary = model.position_embedding == "rotary"
    if rotary and model.rope_scaling not in ("none", "llama3"):
        raise SystemExit(f"megatron_core_bench: model.rope_scaling {model.rope_scaling} is not mapped (none, llama3)")
    gpt = GPTModel(
        transformer, spec, vocab_size=model.padded_vocab_size(1), max_sequence_length=model.seq_length,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="rope" if rotary else "learned_absolute",
        rotary_base=int(model.rotary_base), rope_scaling=rotary and model.rope_scaling == "llama3",
        rope_scaling_factor=float(model.rope_factor or 8.0) if rotary and model.rope_scaling == "llama3" else 8.0,
    )
    return gpt.to(device), transformer, attention


def init_parallel_state(device: torch.device, seed: int) -> None:
    """torch.distributed and Megatron-Core's parallel state at world size 1 (tp = pp = 1)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # CPU (the tests): Megatron's rotary embedding moves its frequencies to torch.cuda.current_device()
        torch.cuda.current_device = lambda: "cpu"
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                         init_method=f"tcp://127.0.0.1:{free_port()}", world_size=1, rank=0)
    parallel_state.initialize_model_parallel(1, 1)
    torch.manual_seed(seed)
    if device.type == "cuda":
        model_parallel_cuda_manual_seed(seed)


def main() -> int:
    args, config = runner_args(__doc__.split("\n")[0])
    tokens = read_token_file(Path(args.tokens), config, args.warmup + args.steps)
    device = resolve_device(config.train.device)
    allow_tf32(device, config.train.precision)  # as megalm does: fp32 matmuls in TF32 on a GPU
    init_parallel_state(device, config.train.seed)
    import megatron.core

    model, transformer, attention = build_model(config, device)
    optim, decay_steps = config.optim, resolved_decay_steps(config)
    if device.type == "cuda":
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        model = DistributedDataParallel(transformer, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
        optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
            adam_beta1=optim.beta1, adam_beta2=optim.beta2, adam_eps=optim.eps, clip_grad=optim.clip_grad,
            bf16=config.train.precision == "bf16", params_dtype=transformer.params_dtype), [model])
        optimizer_name = "megatron-core Adam (fp32 main params, DDP fp32 grads)"
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=(optim.beta1, optim.beta2),
                                      eps=optim.eps, weight_decay=optim.weight_decay)
        optimizer_name = "torch AdamW (CPU: no Megatron DDP buffers)"
    positions = torch.arange(config.model.seq_length, device=device).unsqueeze(0)

    def step(index: int) -> torch.Tensor:
        micro = tokens.step(index, device)
        if device.type == "cuda":
            model.zero_grad_buffer()
        optimizer.zero_grad()
        total = torch.zeros((), device=device)
        for ids, labels in micro:
            loss = model(ids, positions.expand_as(ids), None, labels=labels).float().mean() / len(micro)
            loss.backward()
            total += loss.detach()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(index, optim, decay_steps)
        if device.type == "cuda":
            model.finish_grad_sync()
            optimizer.step()
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.clip_grad)
            optimizer.step()
        return total

    times, losses, peak = timed_steps(step, args.warmup, args.steps, device)
    print_record(result_record("megatron-core", config, args.config, times, losses, peak, device, args.warmup,
                               version=megatron.core.__version__, attention=attention, optimizer=optimizer_name,
                               spec="local", num_parameters=sum(p.numel() for p in model.parameters())))
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
