"""The GPT model against an independent reference, PrefixLM masking, init over pipeline stages,
and the 245B config's per-rank shard (counted on the meta device, one shard materialised).

The reference GPT below is written from the math, in [b, s, h] layout, and shares nothing with
megalm but the parameter names of the state dict it is given.
"""

from __future__ import annotations

import concurrent.futures
import gc
import math
import multiprocessing
import resource
import time
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from megalm.config import ModelConfig, load_config
from megalm.data.batch import prefix_loss_mask
from megalm.distributed import ParallelGroups
from megalm.model.gpt import build_model, count_parameters, materialize_model
from megalm.model.init import fill_normal_shard_, init_kind
from megalm.topology import Topology

SEED = 11
VOCAB = 200  # padded to 256: the padded rows must stay out of the softmax
SEQ = 16
CONFIG_245B = Path(__file__).resolve().parents[2] / "configs" / "yuan-245b.yaml"


def small_config(family: str = "lm", position: str = "learned", num_layers: int = 2, **extra) -> ModelConfig:
    return ModelConfig(
        family=family,
        num_layers=num_layers,
        hidden_size=64,
        num_heads=4,
        vocab_size=VOCAB,
        seq_length=SEQ,
        position_embedding=position,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **extra,
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ---- 1. an independent reference GPT ----------------------------------------------------------
def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _rotate(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding of x [b, s, nh, d], pairing dimension i with i + d/2 (rotate-half)."""
    seq, dim = x.shape[1], x.shape[-1]
    half = dim // 2
    freq = torch.tensor([base ** (-2.0 * i / dim) for i in range(half)], dtype=torch.float64)
    angle = (torch.arange(seq, dtype=torch.float64)[:, None] * freq[None, :]).float()  # [s, d/2]
    cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _allowed(batch: int, seq: int, prefix_lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """[b, s, s] bool: query i may attend to key j."""
    allowed = torch.zeros(batch, seq, seq, dtype=torch.bool)
    for b in range(batch):
        prefix = 0 if prefix_lengths is None else int(prefix_lengths[b])
        for i in range(seq):
            for j in range(seq):
                allowed[b, i, j] = j <= i or j < prefix
    return allowed


def reference_losses(
    params: dict[str, torch.Tensor],
    cfg: ModelConfig,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    prefix_lengths: Optional[torch.Tensor],
) -> torch.Tensor:
    """Per-token cross-entropy [b, s] of a pre-LayerNorm GPT, written out by hand."""
    batch, seq = tokens.shape
    h, nh = cfg.hidden_size, cfg.num_heads
    d = h // nh

    def norm(x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.layer_norm(x, (h,), params[prefix + ".weight"], params[prefix + ".bias"], cfg.norm_eps)

    def linear(x: torch.Tensor, prefix: str) -> torch.Tensor:
        return x @ params[prefix + ".weight"].t() + params[prefix + ".bias"]

    x = params["embedding.word.weight"][tokens]  # [b, s, h]
    if cfg.position_embedding == "learned":
        x = x + params["embedding.position"][:seq].unsqueeze(0)
    allowed = _allowed(batch, seq, prefix_lengths if cfg.family == "prefixlm" else None)  # [b, s, s]
    for layer in range(cfg.num_layers):
        p = f"layers.{layer}"
        qkv = linear(norm(x, p + ".ln1"), p + ".attn.qkv").view(batch, seq, nh, 3, d)  # rows (head, q|k|v, d)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]  # [b, s, nh, d]
        if cfg.position_embedding == "rotary":
            q, k = _rotate(q, cfg.rotary_base), _rotate(k, cfg.rotary_base)
        scores = torch.einsum("bind,bjnd->bnij", q, k) / math.sqrt(d)  # [b, nh, s, s]
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        attn = torch.einsum("bnij,bjnd->bind", probs, v).reshape(batch, seq, h)
        x = x + linear(attn, p + ".attn.proj")
        x = x + linear(_gelu_tanh(linear(norm(x, p + ".ln2"), p + ".mlp.fc1")), p + ".mlp.fc2")
    x = norm(x, "final_norm")
    logits = (x @ params["embedding.word.weight"].t())[..., : cfg.vocab_size]  # [b, s, V]
    return F.cross_entropy(logits.reshape(-1, cfg.vocab_size), labels.reshape(-1), reduction="none").view(batch, seq)


def make_batch(batch: int = 3, seq: int = SEQ, seed: int = 5):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, seq + 1), generator=generator)
    prefix = torch.tensor([1, 6, 12])[:batch]
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), prefix


def _perturb_(model: torch.nn.Module) -> None:
    """Make every parameter generic (LayerNorms are ones and biases zeros at init)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize(
    "family, position",
    [("lm", "learned"), ("lm", "rotary"), ("prefixlm", "learned"), ("prefixlm", "rotary")],
)
def test_matches_reference_gpt(family: str, position: str) -> None:
    cfg = small_config(family, position, init_std=0.1)
    assert cfg.padded_vocab_size(1) > VOCAB
    model = build_model(cfg, ParallelGroups.single(), SEED)
    _perturb_(model)
    params = {name: t.detach().clone().requires_grad_(True) for name, t in model.state_dict().items()}
    assert params.keys() == dict(model.named_parameters()).keys()

    tokens, labels, prefix = make_batch()
    # Weights per token: every position's loss gradient is checked, not just their mean.
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(9))

    losses = model(tokens, labels=labels, prefix_lengths=prefix if family == "prefixlm" else None)
    ref_losses = reference_losses(params, cfg, tokens, labels, prefix)
    assert losses.shape == ref_losses.shape == labels.shape
    assert _rel(losses.detach(), ref_losses.detach()) <= 1e-5
    loss, ref_loss = (losses * weights).sum(), (ref_losses * weights).sum()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())

    loss.backward()
    ref_loss.backward()
    for name, param in model.named_parameters():
        ref_grad = params[name].grad
        assert ref_grad is not None and ref_grad.norm() > 0, name
        assert _rel(param.grad, ref_grad) <= 1e-5, (name, _rel(param.grad, ref_grad))
    # Padded vocabulary rows take no part in the loss.
    assert model.embedding.word.weight.grad[VOCAB:].abs().max() == 0


def test_rotary_tables_are_computed_once_per_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    import megalm.model.gpt as gpt

    calls = []
    original = gpt.rotary_tables
    monkeypatch.setattr(gpt, "rotary_tables", lambda *args: calls.append(args) or original(*args))
    model = build_model(small_config(position="rotary"), ParallelGroups.single(), SEED)
    tokens, labels, _ = make_batch()
    first = model(tokens, labels=labels)
    second = model(tokens, labels=labels)
    model(tokens[:, : SEQ // 2], labels=labels[:, : SEQ // 2])  # another length: its own tables
    assert [args[1] for args in calls] == [SEQ, SEQ // 2]
    assert torch.equal(first, second)


def test_logits_without_labels_are_sequence_first() -> None:
    cfg = small_config()
    model = build_model(cfg, ParallelGroups.single(), SEED)
    tokens, labels, _ = make_batch()
    logits = model(tokens)
    assert logits.shape == (SEQ, tokens.shape[0], cfg.padded_vocab_size(1))
    # The per-token loss is cross-entropy over the real vocabulary of these logits.
    real_logits = logits[..., :VOCAB].transpose(0, 1).reshape(-1, VOCAB)  # [b * s, V]
    expected = F.cross_entropy(real_logits, labels.reshape(-1), reduction="none")
    assert torch.allclose(model(tokens, labels=labels).reshape(-1), expected, rtol=1e-5, atol=1e-6)


# ---- 2. PrefixLM: a mask and a loss mask ------------------------------------------------------
def _logits(model, tokens: torch.Tensor, prefix: Optional[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, prefix_lengths=prefix)[:, 0]  # [s, v]


@pytest.fixture(scope="module")
def prefix_and_causal_models():
    prefixlm = build_model(small_config("prefixlm"), ParallelGroups.single(), SEED).eval()
    lm = build_model(small_config("lm"), ParallelGroups.single(), SEED).eval()
    return prefixlm, lm


def test_prefixlm_is_causal_after_the_prefix(prefix_and_causal_models) -> None:
    model, _ = prefix_and_causal_models
    prefix_len = 6
    tokens, _, _ = make_batch(batch=1)
    prefix = torch.tensor([prefix_len])
    base = _logits(model, tokens, prefix)
    for i in range(prefix_len, SEQ):
        changed = tokens.clone()
        changed[0, i] = (changed[0, i] + 1) % VOCAB
        logits = _logits(model, changed, prefix)
        assert torch.allclose(logits[:i], base[:i], rtol=0, atol=1e-6), i
        assert not torch.allclose(logits[i], base[i], rtol=0, atol=1e-5), i


def test_prefix_is_bidirectional_unlike_lm(prefix_and_causal_models) -> None:
    prefixlm, lm = prefix_and_causal_models
    prefix_len, position = 6, 4
    tokens, _, _ = make_batch(batch=1)
    prefix = torch.tensor([prefix_len])
    changed = tokens.clone()
    changed[0, position] = (changed[0, position] + 1) % VOCAB

    diff = (_logits(prefixlm, changed, prefix) - _logits(prefixlm, tokens, prefix)).abs().amax(dim=-1)  # [s]
    # The whole prefix sees the changed token, including the positions before it, and so does
    # everything after it.
    assert (diff[:prefix_len] > 1e-5).all(), diff
    assert (diff[position:] > 1e-5).all(), diff

    lm_diff = (_logits(lm, changed, None) - _logits(lm, tokens, None)).abs().amax(dim=-1)
    assert (lm_diff[:position] <= 1e-6).all(), lm_diff
    assert (lm_diff[position:] > 1e-5).all(), lm_diff


def test_prefix_loss_mask_ignores_prefix_labels(prefix_and_causal_models) -> None:
    model, _ = prefix_and_causal_models
    tokens, labels, prefix = make_batch()
    mask = prefix_loss_mask(prefix, SEQ)
    assert mask.tolist() == [[float(t + 1 >= int(p)) for t in range(SEQ)] for p in prefix]
    assert mask.sum(dim=1).tolist() == [SEQ - int(p) + 1 for p in prefix]

    def masked_loss(lab: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (model(tokens, labels=lab, prefix_lengths=prefix) * mask).sum()

    base = masked_loss(labels)
    relabelled = torch.where(mask.bool(), labels, (labels + 17) % VOCAB)
    assert not torch.equal(relabelled, labels)
    assert torch.equal(masked_loss(relabelled), base)
    # Contrast: a label that counts does change the loss.
    counted = labels.clone()
    counted[2, SEQ - 1] = (counted[2, SEQ - 1] + 1) % VOCAB
    assert not torch.equal(masked_loss(counted), base)


def test_prefixlm_requires_prefix_lengths(prefix_and_causal_models) -> None:
    model, _ = prefix_and_causal_models
    tokens, _, _ = make_batch()
    with pytest.raises(ValueError, match="prefix_lengths"):
        model(tokens)


# ---- 3. layout-independent init over pipeline stages -----------------------------------------
def test_pipeline_stages_hold_the_same_parameters_as_pp1() -> None:
    cfg = small_config(num_layers=4)
    full = build_model(cfg, ParallelGroups.single(), SEED)
    full_params = dict(full.named_parameters())
    topology = Topology(tp=1, pp=2, dp=1)
    stages = [
        build_model(cfg, ParallelGroups(topology=topology, rank=r, device=torch.device("cpu")), SEED) for r in (0, 1)
    ]
    first, last = stages
    assert list(first.layers) == ["0", "1"] and list(last.layers) == ["2", "3"]
    assert first.output_weight is None and last.embedding is None and first.final_norm is None

    seen = set()
    for stage in stages:
        for name, param in stage.named_parameters():
            if name == "output_weight":
                continue
            assert torch.equal(param, full_params[name]), name
            seen.add(name)
    assert seen == set(full_params)
    assert torch.equal(last.output_weight, first.embedding.word.weight)
    assert last.output_weight.data_ptr() != first.embedding.word.weight.data_ptr()

    # Running the stages one after the other gives the pp=1 losses.
    tokens, labels, _ = make_batch()
    with torch.no_grad():
        staged = last(first(tokens), labels=labels)
        assert torch.allclose(staged, full(tokens, labels=labels), rtol=1e-6, atol=1e-6)


def test_init_is_a_function_of_seed_and_name() -> None:
    """Each parameter's values come from (seed, its name): parameters of equal shape in different
    layers differ, each equals what its name alone gives, and another seed changes all of them."""
    cfg = small_config(num_layers=3, init_std=0.02)
    model = build_model(cfg, ParallelGroups.single(), SEED)
    other_seed = dict(build_model(cfg, ParallelGroups.single(), SEED + 1).named_parameters())
    drawn = {name: p.detach() for name, p in model.named_parameters() if init_kind(name).endswith("normal")}
    assert len(drawn) == 1 + 1 + 4 * 3  # word and position embeddings; qkv, proj, fc1, fc2 per layer
    names = sorted(drawn)
    for i, first in enumerate(names):
        std = cfg.init_std / math.sqrt(2 * cfg.num_layers) if init_kind(first) == "scaled_normal" else cfg.init_std
        alone = torch.empty(drawn[first].shape)
        fill_normal_shard_(alone, tuple(alone.shape), (0,) * alone.dim(), SEED, first, std)
        assert torch.equal(drawn[first], alone), first
        assert not torch.equal(drawn[first], other_seed[first]), first
        for second in names[i + 1 :]:
            a, b = drawn[first].flatten(), drawn[second].flatten()
            n = min(a.numel(), b.numel())
            assert not torch.equal(a[:n], b[:n]), (first, second)  # e.g. layers.0 vs layers.1 qkv


# ---- 4. the 245B config: one rank's shard -----------------------------------------------------
def _groups_245b(cfg, pp: int, tp: int, dp: int = 0) -> ParallelGroups:
    par = cfg.parallel
    topology = Topology(tp=par.tp, pp=par.pp, dp=par.dp)
    return ParallelGroups(topology=topology, rank=topology.rank(pp=pp, dp=dp, tp=tp), device=torch.device("cpu"))


def expected_rank_parameters(model_cfg: ModelConfig, tp: int, pp: int, pp_rank: int) -> int:
    """Parameters held by one rank of stage `pp_rank`, from the architecture."""
    h, ffn = model_cfg.hidden_size, model_cfg.ffn_size()
    vocab_shard = model_cfg.padded_vocab_size(tp) // tp * h
    per_layer = (
        2 * 2 * h  # ln1, ln2 (replicated)
        + (3 * h * h + 3 * h) // tp  # qkv weight and bias, split by output rows
        + h * h // tp + h  # proj: split by input columns, bias replicated
        + (ffn * h + ffn) // tp  # fc1
        + ffn * h // tp + h  # fc2
    )
    count = model_cfg.num_layers // pp * per_layer
    if pp_rank == 0:
        count += vocab_shard + model_cfg.max_positions() * h  # word shard + learned positions
    if pp_rank == pp - 1:
        count += 2 * h + vocab_shard  # final norm + the output layer's copy of the embedding
    return count


def expected_full_parameters(model_cfg: ModelConfig, tp: int) -> int:
    """The whole model, the tied output layer counted once."""
    h, ffn, layers = model_cfg.hidden_size, model_cfg.ffn_size(), model_cfg.num_layers
    per_layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (ffn * h + ffn) + (ffn * h + h)
    return model_cfg.padded_vocab_size(tp) * h + model_cfg.max_positions() * h + layers * per_layer + 2 * h


@pytest.fixture(scope="module")
def cfg_245b():
    cfg = load_config(CONFIG_245B)
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp) == (8, 38, 7)
    assert cfg.model.padded_vocab_size(8) == 53248
    return cfg


@pytest.mark.parametrize("pp_rank, tp_rank, dp_rank", [(0, 0, 0), (19, 3, 2), (37, 7, 6)])
def test_245b_rank_shard_on_meta(cfg_245b, pp_rank: int, tp_rank: int, dp_rank: int) -> None:
    par = cfg_245b.parallel
    groups = _groups_245b(cfg_245b, pp_rank, tp_rank, dp_rank)
    assert (groups.pp_rank, groups.tp_rank, groups.dp_rank) == (pp_rank, tp_rank, dp_rank)
    model = build_model(cfg_245b.model, groups, cfg_245b.train.seed, materialize=False)
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())
    assert count_parameters(model) == expected_rank_parameters(cfg_245b.model, par.tp, par.pp, pp_rank)
    assert list(model.layers) == [str(2 * pp_rank), str(2 * pp_rank + 1)]


def test_245b_full_parameter_count(cfg_245b) -> None:
    par, model_cfg = cfg_245b.parallel, cfg_245b.model
    total = 0
    for pp_rank in range(par.pp):
        stage = build_model(model_cfg, _groups_245b(cfg_245b, pp_rank, tp=0), 0, materialize=False)
        for param in stage.parameters():
            if getattr(param, "embedding_copy", False):
                continue  # the last stage's copy of the tied embedding
            total += param.numel() * (par.tp if param.tp_split_dim is not None else 1)
    print(f"yuan-245b: {total:,} parameters ({total / 1e9:.2f}B)")
    assert total == expected_full_parameters(model_cfg, par.tp)
    assert abs(total - 245e9) <= 0.01 * 245e9


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _materialize_245b_shard(config_path: str, pp_rank: int, tp_rank: int, probes: list) -> dict:
    """In a fresh process: build one rank's shard on meta, materialise it, measure peak RSS."""
    cfg = load_config(config_path)
    groups = _groups_245b(cfg, pp_rank, tp_rank)
    seed = cfg.train.seed
    model = build_model(cfg.model, groups, seed, materialize=False)
    shard_bytes = sum(p.numel() * 4 for p in model.parameters())
    gc.collect()
    try:  # reset the peak-RSS counter, so that VmHWM below is the peak during materialisation
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass
    rss_before_kib = _proc_status_kib("VmRSS")
    hwm_before_kib = _proc_status_kib("VmHWM")
    start = time.perf_counter()
    materialize_model(model, torch.device("cpu"), seed)
    seconds = time.perf_counter() - start
    hwm_after_kib = max(_proc_status_kib("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)

    params = dict(model.named_parameters())
    samples = []
    for name, rows, cols in probes:
        local = params[name][rows[0] : rows[1], cols[0] : cols[1]].detach().clone()
        split_dim = params[name].tp_split_dim
        full_shape = tuple(
            s * (groups.tp_size if d == split_dim else 1) for d, s in enumerate(params[name].shape)
        )
        samples.append((name, local, full_shape))
    norms_ok = all(
        torch.equal(p, torch.ones_like(p)) if n.endswith("ln1.weight") or n.endswith("ln2.weight") else True
        for n, p in params.items()
    )
    return {
        "shard_bytes": shard_bytes,
        "rss_before_kib": rss_before_kib,
        "hwm_before_kib": hwm_before_kib,
        "hwm_after_kib": hwm_after_kib,
        "seconds": seconds,
        "samples": samples,
        "norms_ok": norms_ok,
        "layers": list(model.layers),
        "all_cpu": all(p.device.type == "cpu" for p in model.parameters()),
    }


@pytest.mark.slow
def test_245b_middle_shard_materializes_within_its_size(cfg_245b) -> None:
    pp_rank, tp_rank = 19, 3
    model_cfg = cfg_245b.model
    h, layers = model_cfg.hidden_size, model_cfg.num_layers
    # (name, rows, cols) of the local shard; the ranges cross 512-wide init tiles.
    probes = [
        ("layers.38.attn.qkv.weight", (500, 530), (1020, 1030)),
        ("layers.39.mlp.fc2.weight", (16370, 16384), (7, 700)),
    ]
    context = multiprocessing.get_context("spawn")
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        result = pool.submit(_materialize_245b_shard, str(CONFIG_245B), pp_rank, tp_rank, probes).result(timeout=600)
    wall = time.perf_counter() - start

    shard_bytes = result["shard_bytes"]
    assert shard_bytes == 4 * expected_rank_parameters(model_cfg, 8, 38, pp_rank)
    growth = (result["hwm_after_kib"] - result["rss_before_kib"]) * 1024
    print(
        f"245B shard pp={pp_rank} tp={tp_rank}: {shard_bytes / 2**30:.2f} GiB fp32, peak RSS growth "
        f"{growth / 2**30:.2f} GiB, materialise {result['seconds']:.1f}s, subprocess {wall:.1f}s"
    )
    assert growth <= shard_bytes * 1.15 + 300 * 2**20, (growth, shard_bytes)
    assert result["all_cpu"] and result["norms_ok"]
    assert result["layers"] == ["38", "39"]

    # The shard is the tp_rank-th slice of the full tensor that (seed, name) defines.
    qkv, fc2 = "layers.38.attn.qkv.weight", "layers.39.mlp.fc2.weight"
    std = {qkv: model_cfg.init_std, fc2: model_cfg.init_std / math.sqrt(2 * layers)}  # fc2: residual-scaled
    full_shapes = {qkv: (3 * h, h), fc2: (h, 4 * h)}
    shard_offsets = {qkv: (tp_rank * 3 * h // 8, 0), fc2: (0, tp_rank * 4 * h // 8)}  # qkv rows, fc2 columns
    for (name, rows, cols), (got_name, local, full_shape) in zip(probes, result["samples"]):
        assert got_name == name and full_shape == full_shapes[name]
        expected = torch.empty(rows[1] - rows[0], cols[1] - cols[0])
        offsets = (shard_offsets[name][0] + rows[0], shard_offsets[name][1] + cols[0])
        fill_normal_shard_(expected, full_shape, offsets, cfg_245b.train.seed, name, std[name])
        assert torch.equal(local, expected), name
        assert 0.5 * std[name] < local.std().item() < 2 * std[name], name
