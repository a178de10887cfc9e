"""parallel.tp_comm_overlap: sequence-parallel collectives in pieces overlapped with the GEMMs (tp_overlap).

Against the plain sequence-parallel path on the same ranks: the chunked column and row linears (outputs
and every gradient), the model's loss and gradients after one step (and against one process), and the
production Trainer's losses over 30 steps (the issue's bar: equal to 1e-6 relative). CommCounter shows
the collectives really are issued in pieces, so a silent fallback to the plain path fails the tests.
"""

from __future__ import annotations

import functools

import pytest
import torch

from megalm.comm import CommCounter
from megalm.config import ConfigError, ModelConfig, load_config, validate
from megalm.distributed import ParallelGroups, build_parallel_groups
from megalm.model.gpt import build_model
from megalm.parallel.data import GradientSync
from megalm.parallel.tensor import ColumnParallelLinear, RowParallelLinear, column_parallel_linears, gather_full_tensor, parallel_logits
from megalm.testing import run_distributed
from megalm.topology import Topology
from megalm.train import build_trainer
from tests.test_cli import ROOT

CHUNKS = 4
STEPS = 30  # the issue's bar at tp 2; tp 4 runs TP4_STEPS (four processes on a CI machine's few cores)
TP4_STEPS = 10
SEED = 7


# ---- configuration ------------------------------------------------------------------------------
def _tiny(*overrides: str):
    return load_config(ROOT / "configs" / "tiny.yaml", list(overrides))


def test_overlap_is_off_by_default_and_four_pieces_when_on() -> None:
    assert _tiny().parallel.overlap_chunks() == 1
    config = _tiny("parallel.tp=2", "parallel.sequence_parallel=true", "parallel.tp_comm_overlap=true")
    validate(config, 2)
    assert config.parallel.overlap_chunks() == 4
    config = _tiny("parallel.tp=2", "parallel.sequence_parallel=true", "parallel.tp_comm_overlap=true",
                   "parallel.tp_comm_overlap_chunks=2")
    validate(config, 2)
    assert config.parallel.overlap_chunks() == 2


@pytest.mark.parametrize("overrides, words", [
    (["parallel.tp_comm_overlap=true"], ["parallel.tp=1", "parallel.sequence_parallel=true"]),
    (["parallel.tp=2", "parallel.tp_comm_overlap=true"], ["parallel.sequence_parallel=false", "tp_comm_overlap=false"]),
    (["parallel.tp_comm_overlap_chunks=2"], ["tp_comm_overlap_chunks=2", "set parallel.tp_comm_overlap=true"]),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.tp_comm_overlap=true",
      "parallel.tp_comm_overlap_chunks=1"], ["must be >= 2", "got 1"]),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.tp_comm_overlap=true",
      "parallel.tp_comm_overlap_chunks=3"], ["model.seq_length=64", "2 x 1 x 3 = 6", "60 or 66"]),
])
def test_config_errors_name_the_keys_and_the_fix(overrides: list[str], words: list[str]) -> None:
    with pytest.raises(ConfigError) as error:
        validate(_tiny(*overrides), 2 if "parallel.tp=2" in overrides else 1)
    for word in words:
        assert word in str(error.value), (word, str(error.value))


# ---- the chunked linears against the plain path -----------------------------------------------------
def _fill(module_params, generator: torch.Generator) -> None:
    with torch.no_grad():
        for param in module_params:
            param.copy_(torch.randn(param.shape, generator=generator))


def _linear_cases(groups: ParallelGroups, chunks: int) -> dict:
    """Per case: (output, input grad, parameter grads...) and the tp collectives of one forward + backward."""
    tp, rank = groups.tp_size, groups.tp_rank
    s, b, h, width, vocab = 16, 3, 8, 12, 16
    split = dict(sequence_parallel=True, overlap_chunks=chunks)
    out = {}
    for case in ("column", "column_skip_bias", "column_pair", "row", "logits"):
        generator = torch.Generator().manual_seed(100 + rank)
        if case.startswith("column"):
            layers = [ColumnParallelLinear(h, width, groups, skip_bias_add=case == "column_skip_bias", **split)]
            if case == "column_pair":  # two weights reading one input: one shared (chunked) gather
                layers.append(ColumnParallelLinear(h, 2 * width, groups, **split))
            x = torch.randn(s // tp, b, h, generator=generator)
        elif case == "row":
            layers = [RowParallelLinear(width, h, groups, **split)]
            x = torch.randn(s, b, width // tp, generator=generator)
        else:
            layers = [torch.nn.Linear(h, vocab // tp, bias=False)]  # the vocab-split output weight
            x = torch.randn(s // tp, b, h, generator=generator)
        params = [p for layer in layers for p in layer.parameters()]
        _fill(params, generator)
        x.requires_grad_(True)
        counter = CommCounter(groups)
        with counter.counting():
            if case == "column_pair":
                ys = column_parallel_linears(x, layers)
            elif case == "logits":
                ys = [parallel_logits(x, layers[0].weight, groups.tp_group, True, chunks)]
            elif case == "column_skip_bias":
                y, bias = layers[0](x)
                ys = [y + bias]
            else:
                ys = [layers[0](x)]
            loss = sum((y * torch.randn(y.shape, generator=generator)).sum() for y in ys)
            loss.backward()
        out[case] = {"tensors": [y.detach() for y in ys] + [x.grad] + [p.grad for p in params],
                     "comm": counter.snapshot()["tp"]}
    return out


def _linear_worker(rank: int, world_size: int) -> dict:
    groups = build_parallel_groups(Topology(tp=world_size), rank, torch.device("cpu"))
    return {chunks: _linear_cases(groups, chunks) for chunks in (1, 2, CHUNKS)}


def _expected_calls(case: str, chunks: int) -> dict:
    """tp collectives of one forward + backward: column: all-gather in pieces (forward), the shard's
    all-gather (backward) and the input gradient's reduce-scatter in pieces; row: the output's
    reduce-scatter in pieces (forward) and the gradient's all-gather in pieces (backward)."""
    if case == "row":
        return {"all_gather": chunks, "reduce_scatter": chunks}
    return {"all_gather": chunks + 1, "reduce_scatter": chunks}


@functools.lru_cache(maxsize=None)
def linear_results(tp: int) -> list[dict]:
    return run_distributed(_linear_worker, tp)


@pytest.mark.parametrize("tp", [2, 4])
def test_chunked_linears_match_the_plain_path_and_issue_pieces(tp: int) -> None:
    """Outputs and input / weight / bias gradients equal the plain path's (bit for bit at tp 2; at tp 4 one
    row of a piece is a smaller GEMM, equal to rounding), in the same bytes cut into `chunks` calls."""
    for rank, per_rank in enumerate(linear_results(tp)):
        plain = per_rank[1]
        for chunks in (2, CHUNKS):
            for case, got in per_rank[chunks].items():
                ref = plain[case]
                assert len(got["tensors"]) == len(ref["tensors"])
                for index, (a, c) in enumerate(zip(got["tensors"], ref["tensors"])):
                    if tp == 2:
                        assert torch.equal(a, c), (rank, chunks, case, index, (a - c).abs().max())
                    else:
                        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
                for op, calls in _expected_calls(case, chunks).items():
                    assert got["comm"][op]["calls"] == calls, (case, chunks, got["comm"])
                    assert got["comm"][op]["bytes"] == ref["comm"][op]["bytes"], (case, chunks, got["comm"])
                assert ref["comm"]["reduce_scatter"]["calls"] == 1, (case, ref["comm"])  # the plain path: whole


# ---- the model and the Trainer -------------------------------------------------------------------------
MODELS = {
    "gpt": ModelConfig(num_layers=2, hidden_size=64, num_heads=4, vocab_size=200, seq_length=32),
    "llama-like prefixlm": ModelConfig(
        family="prefixlm", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=200,
        seq_length=32, position_embedding="rotary", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False,
        prefix_attention="dense",
    ),
}


def _model_step(groups: ParallelGroups, name: str, chunks: int) -> dict:
    """Loss, full gradients and tp collectives of one forward + backward."""
    cfg = MODELS[name]
    sp = groups.tp_size > 1
    model = build_model(cfg, groups, SEED, sequence_parallel=sp, overlap_chunks=chunks)
    sync = GradientSync([model], groups)
    sync.start_step(1)
    generator = torch.Generator().manual_seed(123)
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.seq_length + 1), generator=generator)
    prefix = torch.tensor([1, 5, 11]) if cfg.family == "prefixlm" else None
    counter = CommCounter(groups)
    with counter.counting():
        loss = model(tokens[:, :-1], labels=tokens[:, 1:], prefix_lengths=prefix).mean()
        loss.backward()
    sync.finish()
    grads = {n: gather_full_tensor(p.grad, p.tp_split_dim, groups, getattr(p, "tp_replicas", 1))
             for n, p in model.named_parameters()}
    return {"loss": loss.detach(), "grads": grads, "comm": counter.snapshot().get("tp", {})}


def _trainer_losses(groups: ParallelGroups, tp: int, overlap: bool) -> list[float]:
    steps = TP4_STEPS if tp == 4 else STEPS
    overrides = [f"train.steps={steps}", "train.global_batch_size=8", f"parallel.tp={tp}"]
    if tp > 1:
        overrides.append("parallel.sequence_parallel=true")
    if overlap:
        overrides.append("parallel.tp_comm_overlap=true")
    trainer = build_trainer(_tiny(*overrides), groups, None)
    return [trainer.train_step(step).loss for step in range(steps)]


def _model_worker(rank: int, world_size: int) -> dict:
    groups = build_parallel_groups(Topology(tp=world_size), rank, torch.device("cpu"))
    out = {name: {chunks: _model_step(groups, name, chunks) for chunks in (1, CHUNKS)} for name in MODELS}
    out["trainer"] = {overlap: _trainer_losses(groups, world_size, overlap) for overlap in (False, True)}
    return out


@functools.lru_cache(maxsize=None)
def model_results(tp: int) -> list[dict]:
    return run_distributed(_model_worker, tp, timeout=600)


@functools.lru_cache(maxsize=None)
def single_process() -> dict:
    single = ParallelGroups.single()
    out = {name: _model_step(single, name, 1) for name in MODELS}
    out["trainer"] = _trainer_losses(single, 1, False)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_model_step_with_overlap_matches_plain_and_one_process(tp: int) -> None:
    """One step's loss and every gradient: as the plain sequence-parallel path (to 1e-6), as one process
    (to 1e-5, as tests/parallel/test_tensor.py); each linear's collectives in CHUNKS pieces."""
    reference = single_process()
    layers = MODELS["gpt"].num_layers
    for rank, per_rank in enumerate(model_results(tp)):
        for name in MODELS:
            plain, got, ref = per_rank[name][1], per_rank[name][CHUNKS], reference[name]
            assert abs(got["loss"].item() - plain["loss"].item()) <= 1e-6 * abs(plain["loss"].item()), (rank, name)
            assert abs(got["loss"].item() - ref["loss"].item()) <= 1e-5 * abs(ref["loss"].item()), (rank, name)
            for key, grad in got["grads"].items():
                rows = slice(0, 200) if key in ("embedding.word.weight", "output.weight") else slice(None)
                assert _rel(grad, plain["grads"][key]) <= 1e-6, (rank, name, key)
                assert _rel(grad[rows], ref["grads"][key][rows]) <= 1e-5, (rank, name, key)
            # per layer: 2 column sites (qkv / query+key_value, fc1 / gate+up) and 2 row sites; plus the logits
            extra = (CHUNKS - 1) * (4 * layers + 1)
            for op in ("all_gather", "reduce_scatter"):
                assert got["comm"][op]["calls"] == plain["comm"][op]["calls"] + extra, (name, op, got["comm"])
                assert got["comm"][op]["bytes"] == plain["comm"][op]["bytes"], (name, op)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_trainer_losses_with_overlap_equal_the_plain_path(tp: int) -> None:
    """The production Trainer at tp with sequence parallel, 30 steps (10 at tp 4): losses equal to 1e-6 relative
    with and without tp_comm_overlap (the issue's bar; measured: equal bit for bit), and near one process's
    (tensor parallelism sums in another order, which Adam carries on)."""
    reference = single_process()["trainer"]
    for rank, per_rank in enumerate(model_results(tp)):
        plain, overlapped = per_rank["trainer"][False], per_rank["trainer"][True]
        assert len(overlapped) == (TP4_STEPS if tp == 4 else STEPS)
        for step, (a, c) in enumerate(zip(overlapped, plain)):
            assert abs(a - c) <= 1e-6 * abs(c), (rank, step, a, c)
        assert max(abs(a - c) / abs(c) for a, c in zip(overlapped, reference)) <= 1e-4
        assert overlapped[-1] < overlapped[0] - (0.5 if tp == 2 else 0.1)  # it trains


# ---- under train.compile --------------------------------------------------------------------------------
def _compiled_worker(rank: int, world_size: int) -> dict:
    from megalm.model import compile as compile_module
    from tests.model.test_compile import _graph_counts, make_config, train

    compile_module.DEFAULT_BACKEND = "aot_eager"  # Dynamo's graphs with eager's kernels: comparable bit for bit
    groups = build_parallel_groups(Topology(tp=2), rank, torch.device("cpu"))
    out = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        config = make_config("lm", compile=compiled, tp=2)
        config.parallel.tp_comm_overlap = True
        counter = CommCounter(groups)
        with counter.counting():
            result = train(config, groups)
        del result["trainer"]
        out[compiled] = {**result, "graph_counts": _graph_counts(), "comm": counter.snapshot()["tp"]}
    return out


@pytest.mark.slow
def test_compiled_layers_keep_the_chunked_collectives_eager() -> None:
    """train.compile (aot_eager) with tp_comm_overlap at tp 2: the chunked functions run eagerly between the
    graphs (a layer is still 5 graphs around its 4 linears' collectives), issue the same pieces, and the
    losses and gradients are eager's bit for bit."""
    from tests.model.test_compile import assert_bitwise

    for rank, out in enumerate(run_distributed(_compiled_worker, 2, timeout=600, collective_timeout=600)):
        assert_bitwise(out[True], out[False], rank)
        assert out[True]["graph_counts"] == {"graphs": 5, "frames": 5, "breaks": 4}, out[True]["graph_counts"]
        assert out[True]["comm"] == out[False]["comm"]
