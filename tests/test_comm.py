"""Communication accounting: exact calls and bytes per (op, group), restoring torch.distributed,
and the analytic tensor-parallel traffic of one forward/backward of the model.

One 4-rank gloo run (tp=2 x dp=2) does all the distributed work; the tests assert on its results.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megalm.comm import _SPECS, CommCounter, comm_stats_enabled
from megalm.config import ModelConfig
from megalm.distributed import ParallelGroups, build_parallel_groups
from megalm.model.gpt import build_model
from megalm.testing import all_reduce_sequence_parallel_grads, run_distributed
from megalm.topology import Topology

PATCHED = [*_SPECS, "batch_isend_irecv"]

# The model of the tensor-parallel check.
LAYERS, HIDDEN, SEQ, BATCH, VOCAB = 2, 64, 16, 3, 200


def _originals() -> dict:
    return {name: getattr(dist, name) for name in PATCHED if hasattr(dist, name)}


def _restored(originals: dict) -> bool:
    return all(getattr(dist, name) is fn for name, fn in originals.items())


# ---- the distributed run ---------------------------------------------------------------------------
def _known_collectives(groups: ParallelGroups, original_all_reduce) -> tuple[CommCounter, dict]:
    """Every collective type once or more, over tp, dp and the world, with known sizes."""
    rank = groups.rank
    tp_peer = groups.tp_ranks[1 - groups.tp_rank]
    dp_peer = groups.dp_ranks[1 - groups.dp_rank]
    counter = CommCounter(groups)
    with counter.counting():
        for _ in range(3):  # tp all_reduce 3x 40 B
            dist.all_reduce(torch.ones(10), group=groups.tp_group)
        dist.all_reduce(torch.ones(5, dtype=torch.float64), group=groups.dp_group, async_op=True).wait()  # 40 B
        # dp all_gather 2x 24 B (the local piece), both single-tensor names
        dist.all_gather_into_tensor(torch.empty(12), torch.ones(6), group=groups.dp_group)
        dist.all_gather_single(torch.empty(12), torch.ones(6), group=groups.dp_group)
        # tp all_gather (list form) 1x 32 B
        dist.all_gather([torch.empty(4, dtype=torch.int64) for _ in range(2)], torch.ones(4, dtype=torch.int64),
                        group=groups.tp_group)
        # tp reduce_scatter 3x 32 B (the full input): positional, keyword and list forms
        dist.reduce_scatter_tensor(torch.empty(4), torch.ones(8), group=groups.tp_group)
        dist.reduce_scatter_single(output=torch.empty(4), input=torch.ones(8), group=groups.tp_group)
        dist.reduce_scatter(torch.empty(4), [torch.ones(4), torch.ones(4)], group=groups.tp_group)  # list: 32 B
        dist.broadcast(torch.ones(3), src=0)  # world broadcast 12 B
        # tp isend / irecv 1x 28 B each
        recv_buffer = torch.empty(7)
        works = [dist.isend(torch.full((7,), float(rank)), dst=tp_peer, group=groups.tp_group),
                 dist.irecv(recv_buffer, src=tp_peer, group=groups.tp_group)]
        for work in works:
            work.wait()
        assert recv_buffer[0].item() == tp_peer
        # dp send / recv 1x 4 B each (fp16), ordered so the pair does not deadlock
        half = torch.ones(2, dtype=torch.float16)
        if groups.dp_rank == 0:
            dist.send(half, dst=dp_peer, group=groups.dp_group)
            dist.recv(half, src=dp_peer, group=groups.dp_group)
        else:
            dist.recv(half, src=dp_peer, group=groups.dp_group)
            dist.send(half, dst=dp_peer, group=groups.dp_group)
        # batch_isend_irecv over tp: one more isend and irecv of 20 B each (P2POp built while patched)
        ops = [dist.P2POp(dist.isend, torch.ones(5), tp_peer, groups.tp_group),
               dist.P2POp(dist.irecv, torch.empty(5), tp_peer, groups.tp_group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        dist.barrier()  # world barrier 0 B
        with CommCounter(groups).counting() as inner:  # nested: both count, nothing is wrapped twice
            assert dist.all_reduce.original is original_all_reduce
            dist.all_reduce(torch.ones(1, dtype=torch.int32), group=groups.tp_group)  # tp all_reduce 4 B
        nested = {"inner": inner.snapshot(), "still_patched_after_inner": dist.all_reduce is not original_all_reduce}
    return counter, nested


def _model_traffic(groups: ParallelGroups, sequence_parallel: bool) -> dict:
    """Counts of one forward/backward (plus the SP grad all-reduce) of a tp=2 model."""
    cfg = ModelConfig(family="lm", num_layers=LAYERS, hidden_size=HIDDEN, num_heads=4, vocab_size=VOCAB,
                      seq_length=SEQ, position_embedding="learned")
    model = build_model(cfg, groups, seed=7, sequence_parallel=sequence_parallel)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=generator)
    counter = CommCounter(groups)
    with counter.counting():
        model(tokens[:, :-1], labels=tokens[:, 1:]).mean().backward()
        all_reduce_sequence_parallel_grads(model.parameters(), groups)
    return {"snapshot": counter.snapshot(), "format": counter.format()}


def _worker(rank: int, world_size: int) -> dict:
    originals = _originals()
    groups = build_parallel_groups(Topology(tp=2, pp=1, dp=2), rank, torch.device("cpu"))
    counter, nested = _known_collectives(groups, originals["all_reduce"])
    result = {"restored": _restored(originals), **nested}
    dist.all_reduce(torch.ones(10), group=groups.tp_group)  # after the block: not counted
    result.update(snapshot=counter.snapshot(), format=counter.format(), metrics=counter.metrics())
    try:
        with counter.counting():
            raise KeyError("boom")
    except KeyError:
        pass
    result["restored_after_error"] = _restored(originals)
    result["model"] = _model_traffic(groups, sequence_parallel=False)
    result["model_sp"] = _model_traffic(groups, sequence_parallel=True)
    result["restored_at_end"] = _restored(originals)
    return result


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_distributed(_worker, 4)


# ---- known collectives -----------------------------------------------------------------------------
EXPECTED = {
    "tp": {
        "all_reduce": {"calls": 4, "bytes": 3 * 40 + 4},
        "all_gather": {"calls": 1, "bytes": 32},
        "reduce_scatter": {"calls": 3, "bytes": 3 * 32},
        "isend": {"calls": 2, "bytes": 28 + 20},
        "irecv": {"calls": 2, "bytes": 28 + 20},
    },
    "dp": {
        "all_reduce": {"calls": 1, "bytes": 40},
        "all_gather": {"calls": 2, "bytes": 2 * 24},
        "recv": {"calls": 1, "bytes": 4},
        "send": {"calls": 1, "bytes": 4},
    },
    "world": {
        "barrier": {"calls": 1, "bytes": 0},
        "broadcast": {"calls": 1, "bytes": 12},
    },
}


def test_counts_calls_and_bytes_per_op_and_group(results: list[dict]) -> None:
    for rank, result in enumerate(results):
        assert result["snapshot"] == EXPECTED, rank
        assert result["inner"] == {"tp": {"all_reduce": {"calls": 1, "bytes": 4}}}
        assert result["metrics"]["comm/dp/all_gather/bytes"] == 48
    assert results[0]["format"] == (
        "comm: tp all_gather 1x 32 B | tp all_reduce 4x 124 B | tp irecv 2x 48 B | tp isend 2x 48 B | "
        "tp reduce_scatter 3x 96 B | dp all_gather 2x 48 B | dp all_reduce 1x 40 B | dp recv 1x 4 B | "
        "dp send 1x 4 B | world barrier 1x 0 B | world broadcast 1x 12 B"
    )


def test_functions_restored_after_counting_and_errors(results: list[dict]) -> None:
    for result in results:
        assert result["still_patched_after_inner"]
        assert result["restored"] and result["restored_after_error"] and result["restored_at_end"]


# ---- the model's tensor-parallel traffic -------------------------------------------------------------
ACT = SEQ * BATCH * HIDDEN * 4  # one fp32 [s, b, h] activation
TOKENS = SEQ * BATCH * 4  # one fp32 [s, b] per-token value


def test_tensor_parallel_traffic_matches_analytic_count(results: list[dict]) -> None:
    """tp=2, no sequence parallel; every message is a full [s, b, h] activation except the loss's.

    forward:  embedding reduce_from_tp 1 + per layer (attention proj, fc2 reduce_from_tp) 2L
              + cross-entropy: max of the logits [s, b] and (target logit, sum exp) [2, s, b]  = 2L + 3
    backward: per layer copy_to_tp of qkv and fc1 inputs 2L + copy_to_tp of the logits input 1 = 2L + 1
    """
    calls = 4 * LAYERS + 4
    size = (4 * LAYERS + 2) * ACT + 3 * TOKENS
    for result in results:
        assert result["model"]["snapshot"] == {"tp": {"all_reduce": {"calls": calls, "bytes": size}}}
    assert results[0]["model"]["format"] == f"comm: tp all_reduce {calls}x {size / 1000:.0f} KB"


def test_sequence_parallel_traffic_matches_analytic_count(results: list[dict]) -> None:
    """tp=2 with sequence parallel: each all-reduce becomes a reduce-scatter plus an all-gather, and
    the column-parallel GEMMs (qkv, fc1, logits) all-gather their input shard again in backward for
    the weight gradient (they keep the shard, not the gathered input: bytes traded for memory).

    all_gather (bytes: the local [s/tp, b, h] piece): forward qkv, fc1 inputs 2L + logits input 1,
        backward of the embedding, proj and fc2 reduce-scatters 1 + 2L, backward re-gather of the
        qkv, fc1 and logits inputs 2L + 1                                                = 6L + 3
    reduce_scatter (bytes: the full [s, b, h]): forward embedding 1 + proj, fc2 2L,
        backward of the qkv, fc1 and logits all-gathers 2L + 1                          = 4L + 2
    all_reduce: cross-entropy 2 ([s, b] and [2, s, b]) + one flat all-reduce of the replicated
        params' partial grads: per layer ln1, ln2 (2h each), proj and fc2 biases (h each),
        the final norm 2h and the learned positions [s, h]
    """
    sp_grad_numel = LAYERS * 6 * HIDDEN + 2 * HIDDEN + SEQ * HIDDEN
    expected = {
        "tp": {
            "all_gather": {"calls": 6 * LAYERS + 3, "bytes": (6 * LAYERS + 3) * ACT // 2},
            "all_reduce": {"calls": 3, "bytes": 3 * TOKENS + 4 * sp_grad_numel},
            "reduce_scatter": {"calls": 4 * LAYERS + 2, "bytes": (4 * LAYERS + 2) * ACT},
        }
    }
    for result in results:
        assert result["model_sp"]["snapshot"] == expected


# ---- single process: patching, nesting, names --------------------------------------------------------
def test_restored_after_exception_without_process_group() -> None:
    originals = _originals()
    counter = CommCounter(ParallelGroups.single())
    with pytest.raises(ValueError):  # torch: no default process group
        with counter.counting():
            assert dist.all_reduce is not originals["all_reduce"]
            dist.all_reduce(torch.ones(2))
    assert _restored(originals)
    assert counter.snapshot() == {} and counter.format() == "comm: none"  # failed calls are not counted


def test_nesting_never_double_wraps() -> None:
    originals = _originals()
    outer, inner = CommCounter(ParallelGroups.single()), CommCounter(ParallelGroups.single())
    with outer.counting():
        wrapped = dist.all_reduce
        with outer.counting(), inner.counting():  # the same counter twice, and a second one
            assert dist.all_reduce is wrapped and wrapped.original is originals["all_reduce"]
        assert dist.all_reduce is wrapped  # outer still counting
    assert _restored(originals)


def test_disabled_counter_patches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    originals = _originals()
    counter = CommCounter(ParallelGroups.single(), enabled=False)
    with counter.counting():
        assert _restored(originals)
    assert counter.format() == ""
    monkeypatch.delenv("MEGALM_COMM_STATS", raising=False)
    assert not comm_stats_enabled() and comm_stats_enabled(True)
    monkeypatch.setenv("MEGALM_COMM_STATS", "1")
    assert comm_stats_enabled()


def test_group_names_come_from_the_parallel_groups() -> None:
    tp, dp, pp, emb = object(), object(), object(), object()
    groups = ParallelGroups(topology=Topology(2, 2, 2), rank=0, device=torch.device("cpu"),
                            tp_group=tp, dp_group=dp, pp_group=pp, embedding_group=emb)
    counter = CommCounter(groups)
    assert [counter.group_name(g) for g in (tp, dp, pp, emb, None)] == ["tp", "dp", "pp", "embedding", "world"]
    counter._add("isend", pp, 10)
    counter._add("all_reduce", emb, 2_500_000)
    counter._add("all_reduce", tp, 1500)
    assert counter.format() == "comm: tp all_reduce 1x 1.5 KB | pp isend 1x 10 B | embedding all_reduce 1x 2.5 MB"
    counter.reset()
    assert counter.snapshot() == {}
