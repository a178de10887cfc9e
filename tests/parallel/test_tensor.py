"""Tensor parallelism: tp=2 and tp=4 (with and without sequence parallel) against tp=1.

Each case builds the model from the same seed at the given layout, runs one forward/backward on
the same batch, gathers parameters and gradients to full shape and compares them with the tp=1
model run in this process. Also checks layout-independent init and dropout-mask placement.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from megalm.config import ModelConfig
from megalm.data.batch import prefix_loss_mask
from megalm.distributed import ParallelGroups, build_parallel_groups
from megalm.model.gpt import build_model
from megalm.parallel.tensor import gather_full_tensor, vocab_parallel_cross_entropy
from megalm.parallel.data import GradientSync
from megalm.testing import run_distributed
from megalm.topology import Topology

SEED = 7
VOCAB = 200  # padded to 256 at tp 1 and 2, to 512 at tp 4: padding must not change anything

CASES = [
    # (family, sequence_parallel, position_embedding)
    ("lm", False, "learned"),
    ("lm", True, "learned"),
    ("lm", False, "rotary"),
    ("prefixlm", False, "learned"),
    ("prefixlm", True, "rotary"),
]


def model_config(family: str, position: str, dropout: float = 0.0) -> ModelConfig:
    return ModelConfig(
        family=family,
        num_layers=2,
        hidden_size=64,
        num_heads=4,
        vocab_size=VOCAB,
        seq_length=16,
        position_embedding=position,
        hidden_dropout=dropout,
        attention_dropout=dropout,
    )


def make_batch(family: str, batch: int = 3, seq: int = 16):
    generator = torch.Generator().manual_seed(123)
    tokens = torch.randint(0, VOCAB, (batch, seq + 1), generator=generator)
    prefix = torch.tensor([1, 5, 11])[:batch] if family == "prefixlm" else None
    mask = prefix_loss_mask(prefix, seq) if prefix is not None else torch.ones(batch, seq)
    return tokens[:, :-1], tokens[:, 1:], mask, prefix


def run_case(groups: ParallelGroups, family: str, sp: bool, position: str) -> dict:
    """Loss, full params and full grads of one forward/backward at this layout."""
    cfg = model_config(family, position)
    model = build_model(cfg, groups, SEED, sequence_parallel=sp)
    sync = GradientSync([model], groups)  # the trainer's path: sums sequence-parallel grads over tp
    sync.start_step(1)
    tokens, labels, mask, prefix = make_batch(family)
    losses = model(tokens, labels=labels, prefix_lengths=prefix)
    loss = (losses * mask).sum() / mask.sum()
    loss.backward()
    sync.finish()
    params, grads = {}, {}
    for name, p in model.named_parameters():
        params[name] = gather_full_tensor(p.data, p.tp_split_dim, groups)
        grads[name] = gather_full_tensor(p.grad, p.tp_split_dim, groups)
    return {"loss": loss.detach(), "params": params, "grads": grads}


def _tp_worker(rank: int, world_size: int) -> dict:
    topology = Topology(tp=world_size, pp=1, dp=1)
    groups = build_parallel_groups(topology, rank, torch.device("cpu"))
    return {case: run_case(groups, *case) for case in CASES}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _real_rows(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The embedding's rows for real vocabulary ids (padding depends on tp)."""
    return tensor[:VOCAB] if name == "embedding.word.weight" else tensor


@pytest.fixture(scope="module")
def reference() -> dict:
    groups = ParallelGroups.single()
    torch.manual_seed(0)
    return {case: run_case(groups, *case) for case in CASES}


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_matches_tp1(tp: int, reference: dict) -> None:
    results = run_distributed(_tp_worker, tp)
    for case in CASES:
        ref = reference[case]
        for rank, per_rank in enumerate(results):
            got = per_rank[case]
            assert abs(got["loss"].item() - ref["loss"].item()) <= 1e-5 * abs(ref["loss"].item()), (case, rank)
            assert got["grads"].keys() == ref["grads"].keys()
            for name in ref["grads"]:
                # Layout-independent init: same full weights at every tp.
                full_param = _real_rows(name, got["params"][name])
                assert torch.equal(full_param, _real_rows(name, ref["params"][name])), (case, name)
                grad, ref_grad = _real_rows(name, got["grads"][name]), _real_rows(name, ref["grads"][name])
                assert _rel(grad, ref_grad) <= 1e-5, (case, rank, name, _rel(grad, ref_grad))
            # Padded vocabulary rows never receive gradient.
            assert got["grads"]["embedding.word.weight"][VOCAB:].abs().max() == 0


def test_sequence_parallel_really_splits() -> None:
    """Guard against a silent fallback: with SP the residual stream is [s/tp, b, h]."""
    shapes = run_distributed(_sp_shape_worker, 2)
    assert shapes == [(8, 3, 64), (8, 3, 64)]


def _sp_shape_worker(rank: int, world_size: int) -> tuple:
    groups = build_parallel_groups(Topology(tp=world_size), rank, torch.device("cpu"))
    model = build_model(model_config("lm", "learned"), groups, SEED, sequence_parallel=True)
    seen = []
    model.final_norm.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    tokens, labels, _, _ = make_batch("lm")
    model(tokens, labels=labels)
    return seen[0]


def _dropout_worker(rank: int, world_size: int, sp: bool) -> dict:
    groups = build_parallel_groups(Topology(tp=world_size), rank, torch.device("cpu"))
    cfg = model_config("lm", "learned", dropout=0.2)
    model = build_model(cfg, groups, SEED, sequence_parallel=sp)
    model.train()
    captured = {}
    model.final_norm.register_forward_hook(lambda mod, inp, out: captured.setdefault("hidden", inp[0].detach()))
    torch.manual_seed(99)  # the replicated stream: same seed on every tp rank
    tokens, labels, _, _ = make_batch("lm")
    model(tokens, labels=labels).sum().backward()
    with model.layers["0"].rng.tp_distinct():
        distinct_draw = torch.rand(8)
    replicated_draw = torch.rand(8)
    return {"hidden": captured["hidden"], "distinct": distinct_draw, "replicated": replicated_draw}


@pytest.mark.parametrize("sp", [False, True])
def test_dropout_masks_follow_the_split(sp: bool) -> None:
    """Replicated activations get equal masks across tp ranks; split activations get different ones."""
    ranks = run_distributed(_dropout_worker, 2, sp)
    assert torch.equal(ranks[0]["replicated"], ranks[1]["replicated"])
    assert not torch.equal(ranks[0]["distinct"], ranks[1]["distinct"])
    if sp:
        # Each rank holds a different sequence shard of the residual stream.
        assert ranks[0]["hidden"].shape[0] == 8
    else:
        # Attention dropout differs per rank (local heads), yet the residual stream stays replicated:
        # any disagreement in the hidden-dropout masks would make these differ.
        assert torch.equal(ranks[0]["hidden"], ranks[1]["hidden"])


HIDDEN_P, ATTENTION_P = 0.3, 0.1  # different, so a swap of the two shows


def _recording_dropout(records: list):
    """F.dropout that also records (kind, p, mask of dropped elements)."""
    real = torch.nn.functional.dropout

    def dropout(x, p=0.5, training=True, inplace=False):
        out = real(x, p, training, inplace)
        records.append(("hidden", p, ((out == 0) & (x != 0)).detach() if not inplace else None))
        return out

    return dropout


def _recording_attention(records: list):
    """F.scaled_dot_product_attention that also records the dropout mask it applied to the
    attention probabilities: the same call is replayed from the same generator state with
    v = identity, which returns the dropped, rescaled probabilities themselves."""
    real = torch.nn.functional.scaled_dot_product_attention

    def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        before = torch.get_rng_state()
        out = real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)
        if dropout_p > 0:
            after = torch.get_rng_state()
            torch.set_rng_state(before)
            seq = q.shape[-2]
            identity = torch.eye(seq, dtype=v.dtype).expand(*v.shape[:-1], seq)
            probs = real(q, k, identity, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)
            torch.set_rng_state(after)
            assert torch.allclose(probs @ v, out, atol=1e-6)  # the replay is the mask the model used
            allowed = torch.ones(seq, seq, dtype=torch.bool).tril() if is_causal else torch.ones(seq, seq).bool()
            records.append(("attention", dropout_p, ((probs == 0) & allowed).detach()))
        return out

    return attention


def _mask_worker(rank: int, world_size: int, sp: bool) -> list:
    """The dropout masks the model itself draws in one training forward: (kind, p, mask) in call order."""
    from unittest import mock

    groups = build_parallel_groups(Topology(tp=world_size), rank, torch.device("cpu"))
    cfg = dataclasses.replace(model_config("lm", "learned"), hidden_dropout=HIDDEN_P, attention_dropout=ATTENTION_P)
    model = build_model(cfg, groups, SEED, sequence_parallel=sp)
    model.train()
    records: list = []
    functional = torch.nn.functional
    with mock.patch.object(functional, "dropout", _recording_dropout(records)), \
            mock.patch.object(functional, "scaled_dot_product_attention", _recording_attention(records)):
        torch.manual_seed(99)  # the replicated stream: same seed on every tp rank
        tokens, labels, _, _ = make_batch("lm")
        model(tokens, labels=labels)
    return records


@pytest.mark.parametrize("sp", [False, True])
def test_the_models_own_dropout_masks_across_tp_ranks(sp: bool) -> None:
    """Attention dropout (local heads) draws a different mask on each tp rank; hidden and embedding
    dropout draw the same mask where the activation is replicated and a different one on sequence-
    parallel shards; each site uses its own probability (hidden_dropout vs attention_dropout)."""
    ranks = run_distributed(_mask_worker, 2, sp)
    kinds = [kind for kind, _, _ in ranks[0]]
    # embedding, then per layer: attention, hidden (after attention), hidden (after the MLP)
    assert kinds == ["hidden"] + ["attention", "hidden", "hidden"] * 2
    for rank_records in ranks:
        assert [kind for kind, _, _ in rank_records] == kinds
        for kind, p, mask in rank_records:
            expected = HIDDEN_P if kind == "hidden" else ATTENTION_P
            assert p == expected, (kind, p)
            rate = mask.float().mean().item() if kind == "hidden" else mask.sum().item() / (mask.numel() * 17 / 32)
            assert abs(rate - expected) < 0.05, (kind, rate)  # the mask really drops at that rate
    for site, ((kind, _, mask0), (_, _, mask1)) in enumerate(zip(ranks[0], ranks[1])):
        assert mask0.shape == mask1.shape
        distinct = kind == "attention" or sp
        assert torch.equal(mask0, mask1) != distinct, (site, kind, "masks should differ" if distinct else "equal")


def test_dropout_changes_output_when_training() -> None:
    groups = ParallelGroups.single()
    model = build_model(model_config("lm", "learned", dropout=0.2), groups, SEED)
    tokens, labels, _, _ = make_batch("lm")
    model.train()
    a = model(tokens, labels=labels)
    b = model(tokens, labels=labels)
    model.eval()
    c = model(tokens, labels=labels)
    d = model(tokens, labels=labels)
    assert not torch.equal(a, b)
    assert torch.equal(c, d)


def test_bad_split_is_a_clear_error() -> None:
    groups = dataclasses.replace(ParallelGroups.single(), topology=Topology(tp=3, world_size=3))
    with pytest.raises(ValueError, match="not divisible by tensor-parallel size 3"):
        build_model(model_config("lm", "learned"), groups, SEED)


def _primitives_worker(rank: int, world_size: int) -> dict:
    """Forward values and input gradients of each conjugate pair, against hand-written expectations."""
    from megalm.parallel import tensor as T

    group = build_parallel_groups(Topology(tp=world_size), rank, torch.device("cpu")).tp_group
    full = torch.arange(24, dtype=torch.float32).view(4, 3, 2)  # [s, b, h], same on every rank
    shard = full.chunk(world_size, dim=0)[rank]
    out = {}
    for name, op, x, expected in [
        ("copy_to_tp", T.copy_to_tp, full, full),
        ("reduce_from_tp", T.reduce_from_tp, full, full * world_size),
        ("gather_from_sequence", T.gather_from_sequence, shard, full),
        ("reduce_scatter_to_sequence", T.reduce_scatter_to_sequence, full, shard * world_size),
        ("scatter_to_sequence", T.scatter_to_sequence, full, shard),
        ("gather_from_tp", T.gather_from_tp, full[..., rank : rank + 1], full[..., :world_size]),
    ]:
        x = x.clone().requires_grad_(True)
        y = op(x, group)
        weight = torch.full_like(y, float(rank + 1))  # a gradient that differs per rank
        (y * weight).sum().backward()
        out[name] = (torch.equal(y, expected), x.grad)
    return out


def _two_rank_worker(rank: int, world_size: int) -> dict:
    """One 2-rank run for the tests below (a spawn costs seconds)."""
    return {"primitives": _primitives_worker(rank, world_size),
            "sequence_parallel_linear": _sequence_parallel_linear_worker(rank, world_size),
            "large_logits": _large_logits_cross_entropy(
                build_parallel_groups(Topology(tp=world_size), rank, torch.device("cpu")))}


@functools.lru_cache(maxsize=None)
def two_rank_results() -> list[dict]:
    return run_distributed(_two_rank_worker, 2)


def test_communication_primitives_and_their_conjugates() -> None:
    world = 2
    ranks = [result["primitives"] for result in two_rank_results()]
    total = sum(range(1, world + 1))  # gradients summed over ranks: 1 + 2
    for rank, out in enumerate(ranks):
        assert all(ok for ok, _ in out.values()), {k: ok for k, (ok, _) in out.items()}
        grads = {name: grad for name, (_, grad) in out.items()}
        assert torch.all(grads["copy_to_tp"] == total)  # backward all-reduce
        assert torch.all(grads["reduce_from_tp"] == rank + 1)  # backward identity
        assert torch.all(grads["gather_from_sequence"] == total)  # backward reduce-scatter
        # backward all-gather: each sequence shard of the gradient comes from the rank that owns it
        expected = torch.cat([torch.full((2, 3, 2), float(r + 1)) for r in range(world)])
        assert torch.equal(grads["reduce_scatter_to_sequence"], expected)
        assert torch.equal(grads["scatter_to_sequence"], expected)
        assert torch.all(grads["gather_from_tp"] == rank + 1)  # backward split of the last dim


def _sequence_parallel_linear_worker(rank: int, world_size: int) -> dict:
    """The sequence-parallel column-parallel linear against gather_from_sequence + F.linear (the path it
    replaced), on rank-distinct shards: outputs and gradients, bytes kept for backward, collectives."""
    import torch.nn.functional as F

    from megalm.comm import CommCounter
    from megalm.parallel import tensor as T
    from megalm.parallel.tensor import ColumnParallelLinear
    from megalm.plan.measure import SavedBytes

    groups = build_parallel_groups(Topology(tp=world_size), rank, torch.device("cpu"))
    s, b, h, out_features = 8, 3, 16, 24
    generator = torch.Generator().manual_seed(100 + rank)
    out = {}
    for dtype, autocast, skip in [(torch.float32, False, False), (torch.float32, False, True),
                                  (torch.bfloat16, False, False), (torch.float32, True, False)]:
        layer = ColumnParallelLinear(h, out_features, groups, sequence_parallel=True, skip_bias_add=skip).to(dtype)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator))
        shard = torch.randn(s // world_size, b, h, generator=generator).to(dtype)
        grad_out = torch.randn(s, b, out_features // world_size, generator=generator).to(dtype)

        def run(new: bool) -> tuple:
            x = shard.clone().requires_grad_(True)
            layer.zero_grad(set_to_none=True)
            counter = CommCounter(groups)
            with counter.counting(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                with SavedBytes(layer) as saved:
                    if new:
                        y = layer(x)
                        y = y[0] + y[1] if skip else y
                    else:
                        y = F.linear(T.gather_from_sequence(x, groups.tp_group), layer.weight, layer.bias)
                y.backward(grad_out.to(y.dtype))
            return (y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone(), saved.total,
                    counter.snapshot())

        out[(str(dtype), autocast, skip)] = {"new": run(True), "old": run(False), "shard_bytes":
                                             shard.numel() * shard.element_size()}
    return out


def test_sequence_parallel_linear_keeps_the_shard_and_matches_the_gather_path() -> None:
    """Under sequence parallel a column-parallel linear keeps only its [s/tp, b, h] input shard for
    backward (the gather + F.linear path kept the gathered [s, b, h]), all-gathers it again in backward,
    and its output and input / weight / bias gradients are that path's bit for bit (the same GEMMs, the
    same reductions), fp32, bf16 and under autocast. With skip_bias_add the caller adds the bias, so
    only the output and bias gradient are compared to within rounding."""
    for rank, out in enumerate(result["sequence_parallel_linear"] for result in two_rank_results()):
        for key, result in out.items():
            (*new, new_saved, new_comm), (*old, old_saved, old_comm) = result["new"], result["old"]
            names = ("output", "input grad", "weight grad", "bias grad")
            for name, a, c in zip(names, new, old):
                if key[2] and name in ("output", "bias grad"):  # bias added outside the GEMM
                    torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)
                else:
                    assert torch.equal(a, c), (rank, key, name, (a - c).abs().max())
            # parameters are not counted; the shard (and nothing else) is what backward keeps
            assert new_saved == result["shard_bytes"], (rank, key, new_saved)
            if not key[1]:  # (under autocast the old path kept a bf16 copy of the gathered input and weight)
                assert old_saved == 2 * result["shard_bytes"], (rank, key, old_saved)  # gathered: tp shards
            shard_bytes = result["shard_bytes"]
            assert old_comm == {"tp": {"all_gather": {"calls": 1, "bytes": shard_bytes},
                                       "reduce_scatter": {"calls": 1, "bytes": 2 * shard_bytes}}}
            # backward all-gathers the shard again: one more all-gather of the local piece
            assert new_comm == {"tp": {"all_gather": {"calls": 2, "bytes": 2 * shard_bytes},
                                       "reduce_scatter": {"calls": 1, "bytes": 2 * shard_bytes}}}, (key, new_comm)


# ---- the vocab-parallel cross-entropy on large logits ----------------------------------------------
LARGE_VOCAB, LARGE_REAL_VOCAB = 16, 13  # 3 padded entries: the last shard at tp=2 holds them


def _large_logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits [s, b, v] around +1e4, -1e4 and +3e4 per token (exp overflows or underflows fp32 and
    fp64 there unless the max is subtracted first), targets and per-token loss weights."""
    generator = torch.Generator().manual_seed(21)
    s, b = 6, 2
    offsets = torch.tensor([1e4, -1e4, 3e4])[torch.arange(s * b) % 3].view(s, b, 1)
    logits = offsets + 4 * torch.randn(s, b, LARGE_VOCAB, generator=generator)
    target = torch.randint(0, LARGE_REAL_VOCAB, (s, b), generator=generator)
    weights = torch.rand(s, b, generator=generator)
    return logits, target, weights


def _large_logits_cross_entropy(groups: ParallelGroups) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss and this rank's logits gradient [s, b, v/tp] from the production cross-entropy."""
    logits, target, weights = _large_logits()
    shard = logits.chunk(groups.tp_size, dim=-1)[groups.tp_rank].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(shard, target, groups, LARGE_REAL_VOCAB)
    (loss * weights).sum().backward()
    return loss.detach(), shard.grad


def test_cross_entropy_of_large_logits_matches_float64_at_tp1_and_tp2() -> None:
    """Logits around 1e4 (in fp32): loss and gradient equal a float64 reference at tp=1 and tp=2,
    padded entries get no gradient (the max of the logits is subtracted before exp)."""
    logits, target, weights = _large_logits()
    exact = logits.double()[..., :LARGE_REAL_VOCAB].requires_grad_(True)
    exact_loss = torch.nn.functional.cross_entropy(exact.flatten(0, 1), target.flatten(), reduction="none")
    (exact_loss * weights.double().flatten()).sum().backward()
    exact_loss = exact_loss.view(target.shape)
    exact_grad = torch.cat([exact.grad, torch.zeros(*target.shape, LARGE_VOCAB - LARGE_REAL_VOCAB,
                                                    dtype=torch.float64)], dim=-1)
    assert exact_loss.min() > 0.01  # not a trivial case: every token's loss is far from 0
    single = [_large_logits_cross_entropy(ParallelGroups.single())]
    two = [result["large_logits"] for result in two_rank_results()]
    for tp, results in ((1, single), (2, two)):
        for rank, (loss, grad) in enumerate(results):
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), (tp, rank)
            torch.testing.assert_close(loss.double(), exact_loss, rtol=1e-5, atol=1e-5, msg=f"tp={tp} loss")
            torch.testing.assert_close(grad.double(), exact_grad.chunk(tp, dim=-1)[rank], rtol=1e-5, atol=1e-6,
                                       msg=f"tp={tp} rank {rank} gradient")
