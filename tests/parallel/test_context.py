"""Context parallelism's core against single-process references: the load-balanced split, attention across it
(causal, PrefixLM, per-document, grouped-query), and the loss rule.

Every distributed case runs at cp = 2 and cp = 4 on gloo ranks in float64: each rank takes its cp_split part
of the same full q, k, v and output gradient, and the parts put back together (cp_unsplit) must equal full
attention computed in one process, outputs and the gradients of q, k and v, within 1e-6 relative. The
references use their own masks: is_causal, megalm.model.attention's PrefixLM mask, and a document mask
spelled out from the eos positions.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalm.model.attention import prefix_attention_mask
from megalm.data.batch import document_ids as document_ids_from_eos
from megalm.model.attention import document_positions
from megalm.parallel.context import (
    attention_mask,
    context_parallel_attention,
    cp_chunks,
    cp_gather,
    cp_loss,
    cp_positions,
    cp_split,
    cp_unsplit,
)
from megalm.testing import run_distributed

SEQ = 24  # cp = 2: 4 chunks of 6; cp = 4: 8 chunks of 3
BATCH, HEAD_DIM, EOS = 2, 8, 0
TOLERANCE = 1e-6

# PrefixLM prefix lengths per sample (b = 2), named by where they fall at cp = 2 (chunk 6) / cp = 4 (chunk 3).
PREFIXES = {
    "zero_and_whole": [0, SEQ],
    "inside_first_chunk": [2, 1],  # inside chunk 0 at both cp
    "inside_a_later_chunk": [8, 20],  # inside chunk 1 / 3 at cp = 2 (ranks 1, 0); inside chunk 2 / 6 at cp = 4
    "spanning_chunks_and_ranks": [9, 17],  # covers ranks 0 and 1 (cp = 2), ranks 0-2 and part of 3 (cp = 4)
    "whole_sequence": [SEQ, SEQ],
}
# Per-document cases: the eos positions (each eos ends its document) of each of the two samples.
DOCUMENTS = {
    "on_chunk_edges": [[5, 11], [2, 5, 17]],  # documents start at 6, 12 (and 3, 6, 18): chunk edges at cp 2 and 4
    "off_chunk_edges": [[3, 13], [7, 15, 22]],
    "one_token_documents": [[0, 7, 8], [10, 11, 23]],  # position 0, 8 and 11 are documents of one token
    "longer_than_two_chunks": [[0, 20], [15]],  # 1..20 spans 4 chunks at cp = 2 (chunk 6), 7 at cp = 4
    "no_boundary": [[], [SEQ - 1]],
}
HEADS = [(4, 4), (8, 2)]  # (query heads, key/value heads): plain, and grouped-query attention


def _tokens(eos_positions: list[list[int]]) -> torch.Tensor:
    """[b, SEQ] token ids: EOS at the given positions, other ids elsewhere."""
    tokens = torch.arange(1, SEQ + 1).repeat(BATCH, 1)
    for sample, positions in enumerate(eos_positions):
        tokens[sample, positions] = EOS
    return tokens


def _reference_document_mask(eos_positions: list[list[int]]) -> torch.Tensor:
    """[b, 1, S, S]: query i sees key j when j <= i and no document ends at j..i-1 (spelled out, pair by pair)."""
    mask = torch.zeros(BATCH, 1, SEQ, SEQ, dtype=torch.bool)
    for sample, ends in enumerate(eos_positions):
        for i in range(SEQ):
            for j in range(i + 1):
                mask[sample, 0, i, j] = not any(j <= end < i for end in ends)
    return mask


def _cases() -> list[dict]:
    """Every (mask, data, heads) case, with the kind the cp attention is asked for (a wrong one: the controls)."""
    cases = []
    for heads, kv_heads in HEADS:
        base = {"heads": heads, "kv_heads": kv_heads}
        cases.append({**base, "name": "causal", "kind": "causal", "ref_mask": None})
        for name, lengths in PREFIXES.items():
            prefix = torch.tensor(lengths)
            cases.append({**base, "name": f"prefix_{name}", "kind": "prefix", "prefix_lengths": prefix,
                          "ref_mask": prefix_attention_mask(prefix, SEQ)})  # fmt: skip
        for name, ends in DOCUMENTS.items():
            cases.append({**base, "name": f"document_{name}", "kind": "document", "tokens": _tokens(ends),
                          "ref_mask": _reference_document_mask(ends)})  # fmt: skip
    # Negative controls: plain causal attention under a PrefixLM or a document reference must not match.
    for control in ("prefix_spanning_chunks_and_ranks", "document_off_chunk_edges", "document_longer_than_two_chunks"):
        case = next(c for c in cases if c["name"] == control and c["heads"] == 8)
        cases.append({**case, "name": f"control_causal_under_{control}", "kind": "causal", "control": True})
    for index, case in enumerate(cases):
        generator = torch.Generator().manual_seed(1000 + index)
        h, kvh = case["heads"], case["kv_heads"]
        case["q"] = torch.randn(BATCH, h, SEQ, HEAD_DIM, generator=generator, dtype=torch.float64)
        case["k"] = torch.randn(BATCH, kvh, SEQ, HEAD_DIM, generator=generator, dtype=torch.float64)
        case["v"] = torch.randn(BATCH, kvh, SEQ, HEAD_DIM, generator=generator, dtype=torch.float64)
        case["grad"] = torch.randn(BATCH, h, SEQ, HEAD_DIM, generator=generator, dtype=torch.float64)
    return cases


CASES = _cases()


def _reference(case: dict) -> dict[str, torch.Tensor]:
    """Full attention in one process under the reference mask: output and the gradients of q, k, v."""
    q, k, v = (case[name].clone().requires_grad_(True) for name in "qkv")
    if case["ref_mask"] is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=case["ref_mask"], enable_gqa=q.shape[1] != k.shape[1])
    out.backward(case["grad"])
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()


def _cp_attention(case: dict, group, cp: int, cp_rank: int) -> dict[str, torch.Tensor]:
    """This rank's output and q/k/v gradients of cp attention on its parts of the case's tensors."""
    q, k, v = (cp_split(case[name], cp, cp_rank, dim=2).clone().requires_grad_(True) for name in "qkv")
    document_ids = document_ids_from_eos(case["tokens"], EOS) if "tokens" in case else None
    out = context_parallel_attention(
        q, k, v, group, kind=case["kind"], prefix_lengths=case.get("prefix_lengths"), document_ids=document_ids
    )
    out.backward(cp_split(case["grad"], cp, cp_rank, dim=2))
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _attention_worker(rank: int, world_size: int, cases: list[dict]) -> dict:
    group = dist.new_group(list(range(world_size)))
    results = [_cp_attention(case, group, world_size, rank) for case in cases]
    # cp_gather puts the parts back together (no grad: outputs).
    with torch.no_grad():
        x = torch.arange(BATCH * SEQ * 3, dtype=torch.float64).view(BATCH, SEQ, 3)
        gathered = [cp_gather(cp_split(x, world_size, rank, dim), group, dim) for dim in (1,)]
        s_first = x.transpose(0, 1).contiguous()
        gathered.append(cp_gather(cp_split(s_first, world_size, rank, 0), group, 0))
    return {"attention": results, "gathered": gathered}


@pytest.fixture(scope="module", params=[2, 4], ids=["cp2", "cp4"])
def cp_run(request: pytest.FixtureRequest) -> tuple[int, list[dict]]:
    cp = request.param
    return cp, run_distributed(_attention_worker, cp, CASES, timeout=300.0, collective_timeout=120.0)


def _owners(cp: int, lo: int, hi: int) -> set[int]:
    """The cp ranks holding any of the global positions lo..hi-1."""
    return {rank for rank in range(cp) if any(lo <= p < hi for p in cp_positions(SEQ, cp, rank).tolist())}


def test_cases_cover_the_brief() -> None:
    names = {case["name"] for case in CASES}
    assert {"causal", "prefix_zero_and_whole", "prefix_whole_sequence", "document_one_token_documents"} <= names
    assert sum(case["name"].startswith("control_") for case in CASES) == 3
    assert any(case["kv_heads"] < case["heads"] for case in CASES)
    lengths = [n for lengths in PREFIXES.values() for n in lengths]
    assert 0 in lengths and SEQ in lengths
    for cp in (2, 4):
        chunk = SEQ // (2 * cp)
        # PrefixLM: a prefix ending inside one chunk, and one whose tokens lie on several chunks and ranks.
        assert any(0 < n < chunk for n in lengths)
        assert any(n > chunk and n % chunk and len(_owners(cp, 0, n)) > 1 for n in lengths)
        # Documents: starts on and off chunk edges, a one-token document, a document longer than two chunks.
        ends = [sample for samples in DOCUMENTS.values() for sample in samples]
        spans = [(a + 1, b + 1) for sample in ends for a, b in zip([-1, *sample], sample)]
        assert any(start > 0 and start % chunk == 0 for start, _ in spans)
        assert any(start % chunk for start, _ in spans)
        assert any(end - start == 1 for start, end in spans)
        assert any(end - start > 2 * chunk for start, end in spans)


def test_cp_attention_equals_full_attention(cp_run: tuple[int, list[dict]]) -> None:
    cp, per_rank = cp_run
    worst = {}
    for index, case in enumerate(CASES):
        want = _reference(case)
        for name in ("out", "dq", "dk", "dv"):
            got = cp_unsplit([per_rank[rank]["attention"][index][name] for rank in range(cp)], dim=2)
            assert got.shape == want[name].shape, (case["name"], name)
            error = _relative(got, want[name])
            label = f"{case['name']} h{case['heads']}/kv{case['kv_heads']} {name}"
            if case.get("control"):
                worst[label] = error
                continue
            assert error < TOLERANCE, f"cp={cp} {label}: relative difference {error:.2e}"
        if case.get("control"):  # forcing the plain causal mask must fail the comparison
            assert max(worst[f"{case['name']} h{case['heads']}/kv{case['kv_heads']} {n}"] for n in ("out", "dq")) > 1e-3


def test_cp_gather_restores_the_sequence(cp_run: tuple[int, list[dict]]) -> None:
    cp, per_rank = cp_run
    x = torch.arange(BATCH * SEQ * 3, dtype=torch.float64).view(BATCH, SEQ, 3)
    for rank in range(cp):
        assert torch.equal(per_rank[rank]["gathered"][0], x)
        assert torch.equal(per_rank[rank]["gathered"][1], x.transpose(0, 1))


def test_cp_one_is_plain_attention() -> None:
    # group None: the same function is full attention under the same mask, in one process.
    for case in [c for c in CASES if not c.get("control")][:: 3]:
        want = _reference(case)
        got = _cp_attention(case, None, 1, 0)
        for name in ("out", "dq", "dk", "dv"):
            assert _relative(got[name], want[name]) < TOLERANCE, (case["name"], name)


# ---- the split --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cp", [1, 2, 3, 4, 8])
def test_split_positions_round_trip(cp: int) -> None:
    seq = 2 * cp * 3
    x = torch.randn(seq, 2, 5)
    for dim, tensor in ((0, x), (1, x.transpose(0, 1)), (2, x.permute(1, 2, 0))):
        parts = [cp_split(tensor, cp, rank, dim) for rank in range(cp)]
        assert all(part.shape[dim] == seq // cp for part in parts)
        assert torch.equal(cp_unsplit(parts, dim), tensor)
    positions = [cp_positions(seq, cp, rank) for rank in range(cp)]
    # The positions are those of the tokens the split gives the rank, and cover the sequence once.
    for rank in range(cp):
        assert torch.equal(positions[rank], cp_split(torch.arange(seq), cp, rank, 0))
    assert sorted(torch.cat(positions).tolist()) == list(range(seq))
    if cp > 1:
        chunk = seq // (2 * cp)
        for rank in range(cp):
            first, second = cp_chunks(cp, rank)
            assert (first, second) == (rank, 2 * cp - 1 - rank)
            assert positions[rank].tolist() == [*range(first * chunk, (first + 1) * chunk),
                                                *range(second * chunk, (second + 1) * chunk)]  # fmt: skip
        # Load balance: every rank's queries see the same number of causal keys.
        visible = [int(sum(p + 1 for p in positions[rank].tolist())) for rank in range(cp)]
        assert len(set(visible)) == 1


def test_concrete_split() -> None:
    assert cp_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert cp_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert cp_positions(16, 4, 1).tolist() == [2, 3, 12, 13]
    assert cp_split(torch.arange(8), 2, 1, 0).tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize("seq, cp", [(10, 2), (12, 4), (14, 2), (30, 4)])
def test_indivisible_length_names_both_numbers(seq: int, cp: int) -> None:
    with pytest.raises(ValueError, match=rf"sequence length {seq} is not divisible by 2 x cp = {2 * cp} \(cp = {cp}\)"):
        cp_split(torch.zeros(seq), cp, 0, 0)
    with pytest.raises(ValueError, match=rf"sequence length {seq} is not divisible"):
        cp_positions(seq, cp, 0)
    with pytest.raises(ValueError, match=r"cp rank 5 is outside 0\.\."):
        cp_positions(2 * cp * 2, cp, 5)
    assert cp_positions(7, 1, 0).tolist() == list(range(7))  # cp = 1: any length


def test_document_ids_and_positions_follow_the_tokens() -> None:
    tokens = _tokens(DOCUMENTS["one_token_documents"])
    ids = document_ids_from_eos(tokens, EOS)
    assert ids[0, :10].tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 2, 3]  # eos at 0, 7, 8 end documents 0, 1, 2
    positions = document_positions(ids)
    assert positions[0, :10].tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 0, 0]
    assert positions[1, 10:14].tolist() == [10, 0, 0, 1]
    # Per-document positions of a rank's tokens are the full ones indexed by its global positions.
    for cp in (2, 4):
        for rank in range(cp):
            assert torch.equal(cp_split(positions, cp, rank, 1), positions[:, cp_positions(SEQ, cp, rank)])
    # The mask from global positions is the reference mask (cp = 1: all positions).
    everything = torch.arange(SEQ)
    mask = attention_mask(everything, everything, "document", document_ids=ids)
    assert torch.equal(mask, _reference_document_mask(DOCUMENTS["one_token_documents"]))
    with pytest.raises(ValueError, match="document_ids"):
        attention_mask(everything, everything, "document")
    with pytest.raises(ValueError, match="prefix_lengths"):
        attention_mask(everything, everything, "prefix")
    with pytest.raises(ValueError, match="not one of causal, prefix, document"):
        attention_mask(everything, everything, "sliding")  # type: ignore[arg-type]


# ---- the loss rule --------------------------------------------------------------------------------
def _loss_cases() -> list[dict]:
    generator = torch.Generator().manual_seed(7)
    losses = torch.rand(BATCH, SEQ, generator=generator, dtype=torch.float64) * 5
    some = torch.rand(BATCH, SEQ, generator=generator) < 0.6
    # Only the first chunk (of 2 x cp) carries loss tokens: cp rank 1 and beyond hold none.
    only_first = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    only_first[:, :3] = True
    poisoned = losses.clone()
    poisoned[~only_first] = float("inf")  # a masked token's loss must not reach the sum
    return [
        {"name": "random_mask", "losses": losses, "mask": some},
        {"name": "ranks_without_loss_tokens", "losses": poisoned, "mask": only_first},
        {"name": "no_loss_token_anywhere", "losses": losses, "mask": torch.zeros(BATCH, SEQ, dtype=torch.bool)},
    ]


LOSS_CASES = _loss_cases()


def _loss_worker(rank: int, world_size: int, cases: list[dict]) -> list[dict]:
    group = dist.new_group(list(range(world_size)))
    results = []
    for case in cases:
        losses = cp_split(case["losses"], world_size, rank, 1).clone().requires_grad_(True)
        share, loss = cp_loss(losses, cp_split(case["mask"], world_size, rank, 1), group)
        share.backward()
        total = share.detach().clone()
        dist.all_reduce(total, group=group)
        results.append({"share": share.detach(), "loss": loss, "sum_of_shares": total, "grad": losses.grad})
    return results


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_loss_is_the_whole_sequence_mean(cp: int) -> None:
    per_rank = run_distributed(_loss_worker, cp, LOSS_CASES, timeout=120.0, collective_timeout=120.0)
    for index, case in enumerate(LOSS_CASES):
        losses = case["losses"].clone().requires_grad_(True)
        mask = case["mask"]
        count = int(mask.sum())
        want = torch.where(mask, losses, 0.0).sum() / max(count, 1)  # the cp = 1 rule: global sum / global count
        want.backward()
        for rank in range(cp):
            got = per_rank[rank][index]
            assert torch.isfinite(got["loss"]) and torch.isfinite(got["share"]), (case["name"], rank)
            assert math.isclose(got["loss"].item(), want.item(), rel_tol=1e-12, abs_tol=1e-15), (case["name"], rank)
            assert math.isclose(got["sum_of_shares"].item(), want.item(), rel_tol=1e-12, abs_tol=1e-15)
            if not cp_split(mask, cp, rank, 1).any():
                assert got["share"].item() == 0.0 and not got["grad"].any(), (case["name"], rank)
        grad = cp_unsplit([per_rank[rank][index]["grad"] for rank in range(cp)], dim=1)
        assert torch.isfinite(grad).all() and torch.allclose(grad, losses.grad, rtol=1e-12, atol=0), case["name"]
    # The guards above must see a rank with no loss token at all.
    assert not cp_split(LOSS_CASES[1]["mask"], cp, cp - 1, 1).any()
    assert per_rank[0][2]["loss"].item() == 0.0
    # Not a per-rank mean: with unequal counts the mean of per-rank means differs from the loss.
    case = LOSS_CASES[0]
    means = [torch.where(m, l, 0.0).sum() / m.sum() for l, m in
             ((cp_split(case["losses"], cp, r, 1), cp_split(case["mask"], cp, r, 1)) for r in range(cp))]  # fmt: skip
    assert abs(sum(means).item() / cp - per_rank[0][0]["loss"].item()) > 1e-6


# ---- config errors and dropout streams ----------------------------------------------------------------------


def test_config_refuses_what_cp_cannot_run() -> None:
    """A length not divisible by 2 x cp names both numbers; the DeepSpeed engine and train.compile are refused
    with cp > 1; dp derives from tp x cp x pp."""
    from megalm.config import Config, ConfigError, ModelConfig, ParallelConfig, TrainConfig, validate

    def config(seq=32, cp=2, **train) -> Config:
        return Config(model=ModelConfig(seq_length=seq), parallel=ParallelConfig(cp=cp),
                      train=TrainConfig(micro_batch_size=1, global_batch_size=4, **train))

    with pytest.raises(ConfigError, match=r"model.seq_length=30 .*2 x parallel.cp = 8"):
        validate(config(seq=30, cp=4), 4)
    with pytest.raises(ConfigError, match="train.engine=megalm only"):
        validate(config(engine="deepspeed"), 2)
    with pytest.raises(ConfigError, match="train.compile=true is not supported with parallel.cp=2"):
        validate(config(compile=True), 2)
    topology = validate(config(cp=2), 8)
    assert (topology.cp, topology.dp) == (2, 4)
    with pytest.raises(ConfigError, match="tp x pp x cp"):
        validate(config(cp=4), 6)


def _dropout_worker(rank: int, world_size: int) -> dict:
    from megalm.config import ModelConfig
    from megalm.distributed import build_parallel_groups
    from megalm.model.gpt import build_model
    from megalm.topology import Topology

    groups = build_parallel_groups(Topology(cp=world_size), rank, torch.device("cpu"))
    model = build_model(ModelConfig(num_layers=1, hidden_size=16, num_heads=2, vocab_size=32, seq_length=64,
                                    hidden_dropout=0.5, attention_dropout=0.5), groups, 3)
    model.train()
    model.rng.seed_replicated()
    tokens = cp_split(torch.arange(64).remainder(30).add(1).unsqueeze(0), world_size, rank, 1)
    hidden = model.embedding(tokens)  # [s / cp, 1, h] after dropout
    with model.rng.tp_distinct():  # the attention's dropout stream
        attention = torch.rand(8)
    return {"dropped": hidden == 0, "attention": attention}


def test_cp_ranks_draw_their_own_dropout_masks() -> None:
    """The replicated stream (hidden dropout) and the tp-distinct one (attention dropout) are seeded per cp rank:
    the two ranks' masks over their (different) tokens differ, where one shared seed would make them equal."""
    results = run_distributed(_dropout_worker, 2, timeout=120)
    assert results[0]["dropped"].any() and results[1]["dropped"].any()
    assert not torch.equal(results[0]["dropped"], results[1]["dropped"])
    assert not torch.equal(results[0]["attention"], results[1]["attention"])
