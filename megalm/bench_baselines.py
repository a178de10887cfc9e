"""The models `megalm bench` times megalm against: a plain PyTorch GPT, and transformers' GPT-2 of the same shape.

The plain baseline is a nanoGPT-style single-device GPT in [b, s, h] layout that `load_from_megalm`
gives megalm's exact weights (so the test can check it is the same model); `make_baseline_step`
trains it the way a plain PyTorch loop does. `TransformersGPT2` wraps Hugging Face's GPT2LMHeadModel
(the optional `hf` extra) and is trained by the same step; for a Llama-style spec (RMSNorm, SwiGLU,
rotary: `transformers_baseline` decides from the fields) `TransformersLlama` wraps LlamaForCausalLM,
or Qwen2ForCausalLM when only q, k and v have biases.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megalm.config import Config, ModelConfig
from megalm.data.batch import Batch
from megalm.model.gpt import prefix_attention_mask
from megalm.model.layers import apply_rotary
from megalm.model.rope import hf_rope_parameters, rotary_cos_sin

IGNORE_INDEX = -100


# ---- the plain single-device baseline: a nanoGPT-style GPT in [b, s, h] layout -------------------
def _rotary_tables(seq_len: int, head_dim: int, base: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [s, d]: megalm's rotary tables in the baseline's layout (same positions, same math)."""
    cos, sin = rotary_cos_sin(seq_len, head_dim, base, device)  # [s, 1, 1, d]
    return cos[:, 0, 0], sin[:, 0, 0]


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [b, nh, s, d] by position: the baseline's [b, nh, s, d] layout of megalm's apply_rotary."""
    return apply_rotary(x, cos, sin)


class BaselineAttention(nn.Module):
    """Causal (or prefix-masked) self-attention with one fused qkv projection, q|k|v blocks."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_size()
        self.dropout = cfg.attention_dropout
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor], rotary: Optional[tuple]) -> torch.Tensor:
        batch, seq_len, hidden = x.shape  # [b, s, h]
        q, k, v = self.qkv(x).split(hidden, dim=2)
        q, k, v = (t.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if rotary is not None:  # [b, nh, s, d]
            q, k = _apply_rotary(q, *rotary), _apply_rotary(k, *rotary)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=mask is None
        )
        return self.proj(out.transpose(1, 2).reshape(batch, seq_len, hidden))


class BaselineMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.ffn_size())
        self.fc2 = nn.Linear(cfg.ffn_size(), cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class BaselineBlock(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = BaselineAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = BaselineMLP(cfg)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor], rotary: Optional[tuple]) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln1(x), mask, rotary))
        return x + self.dropout(self.mlp(self.ln2(x)))


class BaselineGPT(nn.Module):
    """A plain GPT LM / PrefixLM: token (+ learned position) embedding, blocks, final norm, tied output."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # the real vocab, no padding
        self.position_embedding = (
            nn.Embedding(cfg.max_positions(), cfg.hidden_size) if cfg.position_embedding == "learned" else None
        )
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.blocks = nn.ModuleList(BaselineBlock(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)

    def forward(
        self, tokens: torch.Tensor, labels: torch.Tensor, prefix_lengths: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Summed cross-entropy over the labels that are not IGNORE_INDEX; tokens, labels [b, s]."""
        seq_len = tokens.shape[1]
        x = self.token_embedding(tokens)  # [b, s, h]
        if self.position_embedding is not None:
            x = x + self.position_embedding.weight[:seq_len]
        x = self.dropout(x)
        mask = prefix_attention_mask(prefix_lengths, seq_len) if self.cfg.family == "prefixlm" else None
        rotary = None
        if self.cfg.position_embedding == "rotary":
            rotary = _rotary_tables(seq_len, self.cfg.head_size(), self.cfg.rotary_base, tokens.device)
        for block in self.blocks:
            x = block(x, mask, rotary)
        logits = F.linear(self.final_norm(x), self.token_embedding.weight)  # [b, s, V]
        return F.cross_entropy(
            logits.float().view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )


def build_baseline(cfg: ModelConfig, seed: int, device: torch.device) -> BaselineGPT:
    """A BaselineGPT with GPT-2 style init: N(0, init_std), residual projections / sqrt(2 layers)."""
    model = BaselineGPT(cfg)
    generator = torch.Generator().manual_seed(seed)
    scaled_std = cfg.init_std / math.sqrt(2.0 * cfg.num_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif ".ln" in name or name.startswith("final_norm"):
                param.fill_(1.0)
            else:
                std = scaled_std if name.endswith(("proj.weight", "fc2.weight")) else cfg.init_std
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model.to(device)


def load_from_megalm(baseline: BaselineGPT, megalm_model: nn.Module) -> BaselineGPT:
    """Copy the weights of a full (tp = pp = 1) megalm GPTModel into `baseline`, in place.

    megalm's fused qkv rows are ordered (head, q|k|v, head_dim); the baseline's (q|k|v, head,
    head_dim). The padded vocabulary rows of megalm's embedding are dropped.
    """
    groups = getattr(megalm_model, "groups", None)
    if groups is None or groups.tp_size != 1 or groups.pp_size != 1:
        raise ValueError("load_from_megalm needs a full megalm model (tp = pp = 1); gather the shards first")
    cfg = baseline.cfg
    heads, head_dim, hidden = cfg.num_heads, cfg.head_size(), cfg.hidden_size
    source = {name: t.detach() for name, t in megalm_model.state_dict().items()}

    def qkv(t: torch.Tensor) -> torch.Tensor:
        return t.view(heads, 3, head_dim, *t.shape[1:]).transpose(0, 1).reshape(3 * hidden, *t.shape[1:])

    target = {"token_embedding.weight": source["embedding.word.weight"][: cfg.vocab_size]}
    if baseline.position_embedding is not None:
        target["position_embedding.weight"] = source["embedding.position"]
    for i in range(cfg.num_layers):
        for kind in ("weight", "bias"):
            src, dst = f"layers.{i}.", f"blocks.{i}."
            for part in ("ln1", "ln2", "attn.proj", "mlp.fc1", "mlp.fc2"):
                target[f"{dst}{part}.{kind}"] = source[f"{src}{part}.{kind}"]
            target[f"{dst}attn.qkv.{kind}"] = qkv(source[f"{src}attn.qkv.{kind}"])
    for kind in ("weight", "bias"):
        target[f"final_norm.{kind}"] = source[f"final_norm.{kind}"]
    baseline.load_state_dict(target, strict=True)
    return baseline


def build_baseline_optimizer(model: nn.Module, config: Config, device: torch.device) -> torch.optim.AdamW:
    """torch.optim.AdamW (fused on CUDA, foreach on CPU); no weight decay on 1-D params."""
    optim = config.optim
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, **extra)


class _TransformersBaseline(nn.Module):
    """A transformers causal LM (`self.model`) of megalm's shape (`self.cfg`), with the plain baseline's loss."""

    def forward(
        self, tokens: torch.Tensor, labels: torch.Tensor, prefix_lengths: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Summed cross-entropy over the labels that are not IGNORE_INDEX; tokens, labels [b, s]."""
        mask = prefix_attention_mask(prefix_lengths, tokens.shape[1]) if self.cfg.family == "prefixlm" else None
        logits = self.model(input_ids=tokens, attention_mask=mask, use_cache=False).logits  # [b, s, V]
        return F.cross_entropy(
            logits.float().view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )


class TransformersGPT2(_TransformersBaseline):
    """Hugging Face `transformers`' GPT2LMHeadModel of megalm's shape (the optional third phase).

    Same layers, hidden size, heads, FFN, vocabulary (unpadded), tied (or untied) output layer, LayerNorm eps,
    dropouts and tanh GeLU ("gelu_new"), attention through SDPA. GPT-2 has learned absolute
    positions only: a rotary megalm config is timed against learned positions (the difference is
    an [s, h] add against megalm's rotations of q and k). GPT-2 is causal; a PrefixLM run passes
    the prefix mask as a [b, 1, s, s] boolean attention mask, which transformers applies as given.
    Its own weight init; the loss is computed here, as the plain baseline computes it.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.cfg = cfg
        config = GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.max_positions(), n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.ffn_size(), activation_function="gelu_new",
            resid_pdrop=cfg.hidden_dropout, embd_pdrop=cfg.hidden_dropout, attn_pdrop=cfg.attention_dropout,
            layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, use_cache=False,
            bos_token_id=None, eos_token_id=None,
        )
        self.model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")



class TransformersLlama(_TransformersBaseline):
    """transformers' LlamaForCausalLM of megalm's shape (Qwen2ForCausalLM when q, k, v alone have biases).

    Same layers, hidden size, heads and kv heads, head_dim, SwiGLU width, vocabulary (unpadded), tied or
    untied output, RMSNorm eps, rotary base and scaling, biases, attention dropout; attention through
    SDPA. Llama has no hidden dropout (megalm's model.hidden_dropout is then left out of the comparison).
    Its own weight init; the loss is computed here, as the plain baseline computes it."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        import transformers

        self.cfg = cfg
        qwen2 = cfg.has_qkv_bias() and not cfg.bias
        shape = dict(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size(),
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads(),
            max_position_embeddings=max(cfg.max_positions(), cfg.seq_length), rms_norm_eps=cfg.norm_eps,
            tie_word_embeddings=cfg.tie_embeddings, rope_parameters=hf_rope_parameters(cfg)["rope_parameters"],
            attention_dropout=cfg.attention_dropout, initializer_range=cfg.init_std, use_cache=False,
            bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )
        if qwen2:  # Qwen2: biases on q, k, v only, head_dim = hidden / heads
            config = transformers.Qwen2Config(**shape)
            model_class = transformers.Qwen2ForCausalLM
        else:
            config = transformers.LlamaConfig(**shape, head_dim=cfg.head_size(), attention_bias=cfg.bias,
                                              mlp_bias=cfg.bias)
            model_class = transformers.LlamaForCausalLM
        self.model = model_class._from_config(config, attn_implementation="sdpa")


    def blocks(self) -> nn.ModuleList:
        return self.model.model.layers


def _gpt_mismatch(cfg: ModelConfig, tied: bool) -> list[str]:
    """The fields in which `cfg` is not a GPT (LayerNorm, GeLU, multi-head of width h / heads, biases,
    unscaled positions; tied output when `tied`)."""
    gpt = dict(norm="layernorm", mlp="gelu", bias=True, rope_scaling="none", **({"tie_embeddings": True} if tied else {}))
    differ = [f"{name}={getattr(cfg, name)}" for name, value in gpt.items() if getattr(cfg, name) != value]
    if cfg.grouped_attention():
        differ.append(f"num_kv_heads={cfg.kv_heads()}")
    if cfg.has_qkv_bias() != cfg.bias:
        differ.append(f"qkv_bias={cfg.has_qkv_bias()}")
    if cfg.head_size() * cfg.num_heads != cfg.hidden_size:
        differ.append(f"head_dim={cfg.head_size()}")
    if cfg.document_mask:  # the baselines attend across the documents of a packed sample
        differ.append("document_mask=True")
    return differ


def plain_baseline_mismatch(cfg: ModelConfig) -> Optional[str]:
    """Why the plain baseline (a GPT) does not have this spec's shape, or None when it does."""
    differ = _gpt_mismatch(cfg, tied=True)
    if not differ:
        return None
    return (f"the plain baseline is a GPT (LayerNorm, GeLU, multi-head, biases, tied output); this model has "
            f"{', '.join(differ)}")


def transformers_baseline(cfg: ModelConfig) -> tuple[str, Callable[[ModelConfig, int, torch.device], nn.Module]]:
    """(label, builder) of the transformers model of this spec's shape: Llama (Qwen2 when q, k, v alone have
    biases) for RMSNorm + SwiGLU + rotary, GPT-2 for a GPT; ValueError naming the fields for neither."""
    if cfg.document_mask:
        raise ValueError("model.document_mask=True: the transformers baselines attend across the documents of a "
                         "packed sample, which is other work")
    if cfg.norm == "rmsnorm" and cfg.mlp == "swiglu" and cfg.position_embedding == "rotary":
        qwen2 = cfg.has_qkv_bias() and not cfg.bias
        if qwen2 and cfg.head_size() * cfg.num_heads != cfg.hidden_size:
            raise ValueError(f"Qwen2 (biases on q, k, v only) has head_dim = hidden / heads, but model.head_dim="
                             f"{cfg.head_size()}")
        if cfg.bias and not cfg.has_qkv_bias():
            raise ValueError("Llama's attention_bias covers q, k, v and o together: model.bias=true with "
                             "model.qkv_bias=false has no transformers counterpart")
        return ("transformers Qwen2" if qwen2 else "transformers Llama"), build_transformers_llama
    differ = _gpt_mismatch(cfg, tied=False)
    if not differ:
        return "transformers GPT-2", build_transformers_gpt2
    raise ValueError(f"no transformers model of this shape: Llama needs norm=rmsnorm, mlp=swiglu and rotary "
                     f"positions, GPT-2 a GPT, but this model has norm={cfg.norm}, mlp={cfg.mlp}, "
                     f"position_embedding={cfg.position_embedding} ({', '.join(differ)})")


def transformers_missing() -> Optional[str]:
    """Why the transformers phase cannot run here (None when it can)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "Hugging Face transformers is not installed (pip install 'megalm[hf]')"
    return None


def build_transformers_gpt2(cfg: ModelConfig, seed: int, device: torch.device) -> TransformersGPT2:
    """transformers' own init, drawn from `seed` without disturbing the process's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TransformersGPT2(cfg).to(device)


def build_transformers_llama(cfg: ModelConfig, seed: int, device: torch.device) -> TransformersLlama:
    """transformers' own init, drawn from `seed` without disturbing the process's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TransformersLlama(cfg).to(device)


BaselineBatch = tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]  # tokens, labels, prefix_lengths


def baseline_batches(batches: list[Batch]) -> list[BaselineBatch]:
    """The same micro-batches with the loss mask folded into the labels (IGNORE_INDEX)."""
    return [
        (b.tokens, b.labels.masked_fill(b.loss_mask == 0, IGNORE_INDEX), b.prefix_lengths) for b in batches
    ]


def make_baseline_step(
    model: BaselineGPT, optimizer: torch.optim.Optimizer, config: Config, data: list[list[BaselineBatch]]
) -> Callable[[int], torch.Tensor]:
    """One optimizer step of the baseline: accumulate over the micro-batches, clip, AdamW.

    The learning rate stays at optim.lr: megalm's schedule changes values, not work.
    """
    device = next(model.parameters()).device
    params = list(model.parameters())
    clip = config.optim.clip_grad
    bf16 = config.train.precision == "bf16"

    def step(index: int) -> torch.Tensor:
        batches = data[index]
        # Mean over the step's loss tokens, as megalm computes it (PrefixLM micro-batches differ).
        num_tokens = sum((labels != IGNORE_INDEX).sum() for _, labels, _ in batches)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for tokens, labels, prefix_lengths in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(tokens, labels, prefix_lengths) / num_tokens
            loss.backward()
            loss_sum += loss.detach()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        optimizer.step()
        return loss_sum

    return step
