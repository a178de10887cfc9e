"""torchtitan's row of the side by side (megalm.bench_peers): its Llama 3 model trains a megalm config's shape.

usage: python scripts/peers/torchtitan_bench.py CONFIG [overrides] --tokens FILE [--steps N] [--warmup N]

torchtitan has Llama-style models only: a GPT config (LayerNorm, GELU, learned positions) is refused
with a PEER_RESULT row that says so. A Llama config becomes torchtitan.models.llama3's Llama3Model,
configured as its own flavors are (torchtitan.models.llama3._build_llama3_layers: fused QKV,
RMSNorm, SwiGLU, complex rotary with llama3 scaling, depth-scaled init) with the config's layers,
hidden, heads, kv heads, ffn, padded vocabulary, rope theta and factor and tied embeddings. Attention
is torchtitan's FlexAttention with its block-causal mask (torchtitan 0.3 no longer offers SDPA for its
language models; PEER_TITAN_ATTENTION=flex_flash picks the flash backend of FlexAttention on Hopper;
PEER_TITAN_ATTENTION=sdpa swaps in torchtitan's ScaledDotProductAttention module, causal, no mask: the
default on a CPU, where FlexAttention has no backward).
Training follows torchtitan's single-device path: fp32 parameters under torch.autocast(bfloat16)
(training.mixed_precision_param), fused AdamW with the config's settings, gradient-norm clipping, the
loss in fp32, each transformer block compiled with torch.compile as its `compile` option does
(PEER_TITAN_COMPILE=0 turns that off; off on a CPU; where compiling fails, the row is measured eager
and says so). The learning rate follows megalm.optim.lr_at.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # megalm from the checkout

from megalm.bench_peers import print_record, read_token_file, result_record, runner_args, timed_steps  # noqa: E402
from megalm.config import Config, resolved_decay_steps  # noqa: E402
from megalm.distributed import resolve_device  # noqa: E402
from megalm.optim import lr_at  # noqa: E402


def llama_mismatch(config: Config) -> str | None:
    """Why torchtitan's Llama 3 cannot be this config's model, or None."""
    model = config.model
    wanted = {"family": "lm", "norm": "rmsnorm", "mlp": "swiglu", "position_embedding": "rotary", "bias": False}
    wrong = [f"model.{key}={getattr(model, key)!r}" for key, value in wanted.items() if getattr(model, key) != value]
    if model.rope_scaling not in ("none", "llama3"):
        wrong.append(f"model.rope_scaling={model.rope_scaling!r}")
    if wrong:
        return (f"torchtitan has no model for {', '.join(wrong)} (its Llama 3 is RMSNorm, SwiGLU, rotary, "
                f"no biases): no torchtitan row for this config")
    return None


def build_model(config: Config, device: torch.device, attention: str):
    """torchtitan's Llama3Model of the config's shape, initialised by its init_states, fp32 on `device`."""
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.llama3 import Llama3Model, _build_llama3_layers

    model = config.model
    dim, vocab = model.hidden_size, model.padded_vocab_size(1)
    if model.head_size() != dim // model.num_heads:
        raise SystemExit(f"torchtitan_bench: model.head_dim {model.head_size()} != hidden / heads: not mapped")
    llama3 = model.rope_scaling == "llama3"
    rope = ComplexRoPE.Config(
        dim=model.head_size(), max_seq_len=model.seq_length, theta=model.rotary_base,
        scaling="llama" if llama3 else "none", scaling_factor=model.rope_factor if llama3 else 8.0,
        low_freq_factor=model.rope_low_freq_factor, high_freq_factor=model.rope_high_freq_factor,
        original_max_position_embeddings=model.rope_original_max_positions or 8192)
    s = dim**-0.5
    cfg = Llama3Model.Config(
        dim=dim, vocab_size=vocab, enable_weight_tying=model.tie_embeddings,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim,
                                        param_init={"weight": lambda w: torch.nn.init.normal_(w, std=1.0)}),
        norm=RMSNorm.Config(normalized_shape=dim, eps=model.norm_eps,
                            param_init={"weight": torch.nn.init.ones_}),
        lm_head=Linear.Config(in_features=dim, out_features=vocab, param_init={
            "weight": lambda w: torch.nn.init.trunc_normal_(w, std=s, a=-3 * s, b=3 * s),
            "bias": torch.nn.init.zeros_}),
        layers=_build_llama3_layers(n_layers=model.num_layers, dim=dim, n_heads=model.num_heads,
                                    n_kv_heads=model.kv_heads(), hidden_dim=model.ffn_size(), rope=rope,
                                    fuse_qkv=True, attn_backend="flex" if attention == "sdpa" else attention),
    )
    for layer in cfg.layers:  # the blocks' norms take the config's epsilon too
        layer.attention_norm.eps = layer.ffn_norm.eps = model.norm_eps
        if attention == "sdpa":
            from torchtitan.models.common.attention import ScaledDotProductAttention

            layer.attention.inner_attention = ScaledDotProductAttention.Config()
    with torch.device(device):
        built = cfg.build()
    built.init_states(buffer_device=device)
    return built


def main() -> int:
    args, config = runner_args(__doc__.split("\n")[0])
    import torchtitan  # noqa: F401 - where it is not installed, fail here, by name

    from importlib.metadata import version

    extra = {"version": version("torchtitan")}
    reason = llama_mismatch(config)
    if reason is not None:
        print_record({"system": "torchtitan", "config": args.config, "skipped": reason, **extra})
        return 0
    tokens = read_token_file(Path(args.tokens), config, args.warmup + args.steps)
    device = resolve_device(config.train.device)
    attention = os.environ.get("PEER_TITAN_ATTENTION", "flex" if device.type == "cuda" else "sdpa")
    compiled = os.environ.get("PEER_TITAN_COMPILE", "1" if device.type == "cuda" else "0") == "1"
    extra.update(attention=attention, optimizer="torch AdamW (fused), fp32 params + autocast")
    failure = None
    try:
        times, losses, peak, count = train(config, tokens, device, attention, compiled, args.warmup, args.steps)
    except Exception as error:  # noqa: BLE001 - a compile failure costs the row its compile, not the row
        if not compiled or isinstance(error, torch.cuda.OutOfMemoryError):
            raise
        failure = f"{type(error).__name__}: {str(error)[:300]}"
    if failure is not None:  # out of the except block: the failed model's frames are gone, its memory free
        print(f"torchtitan_bench: compiled blocks failed ({failure}); measuring eager", file=sys.stderr, flush=True)
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        compiled = f"failed ({failure.split(':')[0]}), eager"
        times, losses, peak, count = train(config, tokens, device, attention, False, args.warmup, args.steps)
    print_record(result_record("torchtitan", config, args.config, times, losses, peak, device, args.warmup,
                               num_parameters=count, compile=compiled, **extra))
    return 0


def train(config: Config, tokens, device: torch.device, attention: str, compiled: bool, warmup: int,
          steps: int) -> tuple[list[float], list[float], int, int]:
    """Build, and time torchtitan's single-device training step: (step seconds, losses, peak bytes, parameters)."""
    torch.manual_seed(config.train.seed)
    model = build_model(config, device, attention)
    if compiled:
        for block in model.layers.values():
            block.compile(fullgraph=True)
    optim, decay_steps = config.optim, resolved_decay_steps(config)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=device.type == "cuda")
    bf16 = config.train.precision == "bf16"
    positions = torch.arange(config.model.seq_length, device=device).unsqueeze(0)

    def step(index: int) -> torch.Tensor:
        micro = tokens.step(index, device)
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for ids, labels in micro:
            pos = positions.expand_as(ids)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(ids, pos, None if attention == "sdpa" else model.get_attention_masks(pos))
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()) / len(micro)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.clip_grad, foreach=True)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(index, optim, decay_steps)
        optimizer.step()
        return total

    times, losses, peak = timed_steps(step, warmup, steps, device)
    return times, losses, peak, sum(p.numel() for p in model.parameters())
if __name__ == "__main__":
    sys.exit(main())
