"""train.compile: torch.compile per transformer layer (megalm.model.compile).

Parity: the compiled model trains like the eager one in fp32 on CPU (losses and gradients within a
few float32 ulps, inductor reorders float operations), its parameters keep their names, every layer
reuses one compiled graph, and the compile time reaches the log and the metrics. Dropout: the masks
of split activations are eager's own, those of replicated ones are drawn inside the graph from the
default generator (deterministic from the saved RNG state, identical across tp ranks). Recompute
(selective, full) around compiled layers is bit for bit the compiled run that stores.

Inductor compiles C++ with gcc on CPU: tens of seconds cold (the on-disk cache makes reruns a few
seconds), so the default run compiles one tiny model with inductor; the rest uses the aot_eager
backend (same graph capture, graph breaks and autograd, no code generation), or is marked slow.
"""

from __future__ import annotations

import functools
import json
import logging

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from megalm.config import (
    Config, ConfigError, DataConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig, load_config, validate,
)
from megalm.distributed import ParallelGroups, build_parallel_groups
from megalm.model import compile as compile_module
from megalm.model.gpt import build_model
from megalm.model.layers import bias_dropout_add, bias_gelu
from megalm.parallel.random import ParallelRNG
from megalm.parallel.tensor import ColumnParallelLinear, RowParallelLinear
from megalm.testing import run_distributed
from megalm.topology import Topology
from megalm.train import build_trainer

SEQ, HIDDEN, HEADS, MICRO, LAYERS = 16, 32, 4, 2, 4
STEPS = 2


def make_config(family: str = "lm", compile: bool = True, dropout: float = 0.0, recompute: str = "none",
                tp: int = 1, pp: int = 1) -> Config:
    return Config(
        model=ModelConfig(family=family, num_layers=LAYERS, hidden_size=HIDDEN, num_heads=HEADS, vocab_size=200,
                          seq_length=SEQ, hidden_dropout=dropout, attention_dropout=dropout,
                          position_embedding="rotary" if family == "prefixlm" else "learned"),
        parallel=ParallelConfig(tp=tp, pp=pp, dp=1, sequence_parallel=tp > 1, recompute=recompute),
        optim=OptimConfig(lr=1e-2, warmup_steps=0, clip_grad=0.0),  # raw gradients: no clipping
        train=TrainConfig(steps=STEPS, micro_batch_size=MICRO, global_batch_size=MICRO * 2, seed=7, compile=compile),
        data=DataConfig(),
    )


def train(config: Config, groups: ParallelGroups, run_dir=None) -> dict:
    """Losses and this rank's fp32 main gradients of each step, through the Trainer."""
    validate(config, groups.topology.world_size)
    trainer = build_trainer(config, groups, run_dir)
    losses, grads = [], []
    for step in range(STEPS):
        result = trainer.train_step(step)
        trainer.record(result)
        losses.append(result.loss)
        grads.append([g.clone() for g in trainer.optimizer.grads()])
    trainer.metrics.close()
    return {"losses": losses, "grads": grads, "trainer": trainer}


def assert_close(got: dict, want: dict, what, rtol: float, atol: float) -> None:
    for a, b in zip(got["losses"], want["losses"]):
        assert abs(a - b) <= atol + rtol * abs(b), (what, a, b)
    for step, (g, w) in enumerate(zip(got["grads"], want["grads"])):
        assert len(g) == len(w) > 0
        for index, (a, b) in enumerate(zip(g, w)):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol,
                                       msg=lambda m: f"{what} step {step} grad {index}: {m}")


def assert_bitwise(got: dict, want: dict, what) -> None:
    assert got["losses"] == want["losses"], what
    for g, w in zip(got["grads"], want["grads"]):
        assert len(g) == len(w) > 0
        for index, (a, b) in enumerate(zip(g, w)):
            assert torch.equal(a, b), (what, index, (a - b).abs().max().item())


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no graphs, guards or recompile counts left by another test
    (past torch's recompile limit a layer would silently run eagerly)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def aot_eager(monkeypatch):
    """train.compile with the aot_eager backend: Dynamo's graphs and AOTAutograd, no code generation."""
    monkeypatch.setattr(compile_module, "DEFAULT_BACKEND", "aot_eager")


# ---- inductor parity (the one inductor compile of the default run) ---------------------------------
@pytest.mark.slow
def test_compiled_layers_train_like_eager_fp32(tmp_path, caplog) -> None:
    """Two Trainer steps, fp32, dropout 0: losses and gradients of every parameter within float32
    rounding of eager's (tolerance: inductor fuses and reorders reductions, LayerNorm statistics,
    softmax and GEMM epilogues, each worth a few ulps; across 4 layers forward and backward that stays
    below 1e-5 relative, while a wrong bias, mask or residual moves gradients by 1e-2 or more). All
    four layers share one compiled graph, and the compile time is logged and written to the metrics."""
    from torch._dynamo.utils import counters

    single = ParallelGroups.single()
    want = train(make_config(compile=False), single)
    counters.clear()
    with caplog.at_level(logging.INFO, logger="megalm"):
        got = train(make_config(compile=True), single, tmp_path)
    assert counters["stats"]["unique_graphs"] == 1  # 4 layers, one graph: compile time does not grow with depth
    assert_close(got, want, "compile", rtol=1e-5, atol=1e-6)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step" in r]
    assert steps[0]["compile_s"] > 0 and steps[1]["compile_s"] == steps[0]["compile_s"]  # step 2 compiles nothing
    assert any("s compiling the transformer layers at step 1" in m for m in caplog.messages), caplog.messages
    # Parameters keep their names: a compiled model saves and loads eager checkpoints.
    eager_state = want["trainer"].model.state_dict()
    assert list(got["trainer"].model.state_dict()) == list(eager_state)
    got["trainer"].model.load_state_dict(eager_state)


# ---- config -------------------------------------------------------------------------------------------
def test_compile_config_is_validated(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  compile: sometimes\n")
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(path)
    config = make_config()
    config.train.engine = "deepspeed"
    with pytest.raises(ConfigError, match="train.compile=true runs with train.engine=megalm only"):
        validate(config, 1)


# ---- skip bias add and the fused element-wise functions ---------------------------------------------
def test_skip_bias_add_returns_the_bias_apart() -> None:
    """The layers hand back their bias with the same parameters; added back, the output is the
    unfused one (column-parallel: the bias left the GEMM). A row-parallel layer at tp 1 keeps it in
    the GEMM; at tp > 1 it hands the bias on, which the tp-parity tests compare with tp 1."""
    torch.manual_seed(0)
    single = ParallelGroups.single()
    x = torch.randn(5, 2, 8)
    for cls in (ColumnParallelLinear, RowParallelLinear):
        plain, skip = cls(8, 12, single), cls(8, 12, single, skip_bias_add=True)
        for layer in (plain, skip):
            torch.nn.init.normal_(layer.weight, generator=torch.Generator().manual_seed(1))
            torch.nn.init.normal_(layer.bias, generator=torch.Generator().manual_seed(2))
        assert list(dict(skip.named_parameters())) == ["weight", "bias"]
        y, bias = skip(x)
        if cls is RowParallelLinear:  # tp 1: nothing to reduce, so the bias stays in the GEMM, as unfused
            assert bias is None and torch.equal(y, plain(x))
        else:
            assert bias is skip.bias
            torch.testing.assert_close(y + bias, plain(x), rtol=1e-6, atol=1e-6)


def test_fused_functions_are_the_unfused_ops_eagerly() -> None:
    torch.manual_seed(0)
    y, bias, residual = torch.randn(4, 2, 8), torch.randn(8), torch.randn(4, 2, 8)
    assert torch.equal(bias_gelu(y, bias), F.gelu(y + bias, approximate="tanh"))
    rng = ParallelRNG(3, ParallelGroups.single())
    torch.manual_seed(5)
    got = bias_dropout_add(y, bias, residual, 0.3, True, rng, split=False)
    torch.manual_seed(5)
    assert torch.equal(got, residual + F.dropout(y + bias, 0.3, training=True))
    assert torch.equal(bias_dropout_add(y, bias, residual, 0.3, False, rng, split=True), residual + (y + bias))


# ---- graphs, graph breaks and recompiles at tp = 1 (aot_eager: Dynamo's graphs are inductor's) ---------
def _graph_counts() -> dict:
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "frames": counters["frames"]["total"],
            "breaks": sum(counters["graph_break"].values())}


def _train_counting(config: Config) -> dict:
    """train() plus Dynamo's counts after each step and the shapes of the tensors saved for backward."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # compile afresh: a graph cached by the previous run would count nothing
    counters.clear()
    validate(config, 1)
    trainer = build_trainer(config, ParallelGroups.single(), None)
    losses, grads, counts, saved = [], [], [], set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.add((tuple(tensor.shape), tensor.dtype))
        return tensor

    for step in range(STEPS):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            losses.append(trainer.train_step(step).loss)
        grads.append([g.clone() for g in trainer.optimizer.grads()])
        counts.append(_graph_counts())
    return {"losses": losses, "grads": grads, "counts": counts, "saved": saved}


def test_tp1_layers_compile_to_one_graph_without_breaks(aot_eager) -> None:
    """The single-GPU / data-parallel case (tp = 1, no dropout, as configs/gpt-125m.yaml): every layer is
    one graph with no graph break, the 4 layers reuse it (one frame compiled), and step 2 (4 micro-batches
    per step) compiles nothing more; with each recompute mode. Selective recompute of the dropout-free
    attention core is torch's checkpoint traced into the layer's graph (it used to run eagerly: 4 graphs
    and 2 breaks per layer), bit for bit the stored run, and really reruns the core: PrefixLM (the dense
    mask on CPU, same graphs as LM) keeps SDPA's float [b, 1, s, s] additive mask only when stored."""
    runs = {mode: _train_counting(make_config("prefixlm", recompute=mode)) for mode in ("none", "selective", "full")}
    for mode, got in runs.items():
        assert got["counts"] == [{"graphs": 1, "frames": 1, "breaks": 0}] * STEPS, (mode, got["counts"])
    assert_bitwise(runs["selective"], runs["none"], "traced selective recompute")
    assert_bitwise(runs["full"], runs["none"], "full recompute of compiled layers")
    additive_mask = ((MICRO, 1, SEQ, SEQ), torch.float32)
    assert additive_mask in runs["none"]["saved"] and additive_mask not in runs["selective"]["saved"]


def test_selective_recompute_without_dropout_is_bitwise_eagerly() -> None:
    """The checkpoint without generator state (nothing random in the core) reruns the core exactly."""
    single = ParallelGroups.single()
    for family in ("lm", "prefixlm"):
        stored = train(make_config(family, compile=False), single)
        assert_bitwise(train(make_config(family, compile=False, recompute="selective"), single), stored, family)


# ---- dropout and recompute under compile (aot_eager: the same graphs, eager's kernels) --------------
@pytest.mark.parametrize("family", ["lm", pytest.param("prefixlm", marks=pytest.mark.slow)])
def test_recompute_around_compiled_layers_is_bitwise(family: str, aot_eager) -> None:
    """Dropout on: selective and full recompute of compiled layers give the compiled stored run's
    losses and gradients bit for bit (checkpoint restores the default generator, megalm rewinds the
    tp-distinct one); with eager's kernels and masks, the compiled run is eager's bit for bit too. The
    attention core, eager for its tp-distinct masks, is the layer's one graph break: 2 graphs (the break
    resumes inside Attention.forward; without nested_graph_breaks it was 4 graphs, 2 breaks)."""
    from torch._dynamo.utils import counters

    single = ParallelGroups.single()
    eager = train(make_config(family, compile=False, dropout=0.1), single)
    counters.clear()
    stored = train(make_config(family, dropout=0.1), single)
    assert _graph_counts() == {"graphs": 2, "frames": 2, "breaks": 1}, _graph_counts()
    assert_bitwise(stored, eager, (family, "aot_eager vs eager"))
    for mode in ("selective", "full"):
        assert_bitwise(train(make_config(family, dropout=0.1, recompute=mode), single), stored, (family, mode))


@pytest.mark.slow
def test_recompute_around_inductor_layers_is_bitwise() -> None:
    """The same with inductor and its own replicated masks (tp = 1: the hidden dropout is in the
    graph): the rerun of a compiled layer draws the forward's masks, so selective and full recompute
    equal the compiled stored run bit for bit. Without dropout too, where the selectively recomputed
    core is traced into the layer's graph and inductor generates its rerun."""
    single = ParallelGroups.single()
    for dropout in (0.1, 0.0):
        stored = train(make_config(dropout=dropout), single)
        for mode in ("selective", "full"):
            assert_bitwise(train(make_config(dropout=dropout, recompute=mode), single), stored, (dropout, mode))


def _parallel_worker(rank: int, world_size: int, backend: str) -> dict:
    compile_module.DEFAULT_BACKEND = backend
    groups = build_parallel_groups(Topology(tp=2, pp=2, dp=1), rank, torch.device("cpu"))
    out = {}
    for dropout in (0.0, 0.1):
        for compile in (False, True):
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            result = train(make_config("lm", compile=compile, dropout=dropout, tp=2, pp=2), groups)
            del result["trainer"]
            result["graph_counts"] = _graph_counts()
            out[(dropout, compile)] = result
    return out


@functools.lru_cache(maxsize=None)
def parallel_results(backend: str) -> list[dict]:
    return run_distributed(_parallel_worker, 4, backend, timeout=600, collective_timeout=600)


@pytest.mark.slow
def test_compiled_layers_at_tp2_sp_pp2_aot_eager() -> None:
    """tp=2 with sequence parallel x pp=2: the collectives stay eager between the compiled graphs, and
    with eager's kernels every rank's losses and gradients are eager's bit for bit, dropout included
    (with sequence parallel every dropout in a layer is on a split activation: eager's masks). A layer
    breaks only where it must: around its 4 collectives (5 graphs), plus the attention core and the 2
    hidden dropouts when they draw from the tp-distinct stream; breaks in nested calls resume there
    (Dynamo's nested_graph_breaks; without it the same layer was 9 graphs in 15 frames, 11 with dropout)."""
    expected = {0.0: {"graphs": 5, "frames": 5, "breaks": 4}, 0.1: {"graphs": 8, "frames": 8, "breaks": 7}}
    for rank, out in enumerate(parallel_results("aot_eager")):
        for dropout in (0.0, 0.1):
            assert_bitwise(out[(dropout, True)], out[(dropout, False)], (rank, dropout))
            assert out[(dropout, True)]["graph_counts"] == expected[dropout], (rank, dropout)


@pytest.mark.slow
def test_compiled_layers_at_tp2_sp_pp2_inductor() -> None:
    """The same layout with inductor: within float32 rounding of eager, dropout included (all masks
    are eager's under sequence parallel), on every rank."""
    for rank, out in enumerate(parallel_results("inductor")):
        for dropout in (0.0, 0.1):
            assert_close(out[(dropout, True)], out[(dropout, False)], (rank, dropout), rtol=1e-5, atol=1e-6)


# ---- inductor's own dropout masks (slow: more inductor compiles) -------------------------------------
def _dropout_model(groups: ParallelGroups, sp: bool = False):
    cfg = make_config(dropout=0.2, tp=groups.tp_size).model
    model = build_model(cfg, groups, 7, sequence_parallel=sp)
    compile_module.compile_layers([model], "inductor")
    model.train()
    return model


def _forward_backward(model, seed: int, rng_state: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.rng.load_state_dict(rng_state)
    torch.manual_seed(seed)
    model.zero_grad()
    tokens = torch.randint(0, 200, (MICRO, SEQ), generator=torch.Generator().manual_seed(11))
    hidden = model.embedding(tokens)
    for layer in model.layers.values():
        hidden = layer(hidden, None, None)
    hidden.square().mean().backward()
    return hidden.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.slow
def test_inductor_dropout_is_deterministic_from_the_saved_rng_state() -> None:
    """Inductor draws the replicated masks itself: the same generator states (what a checkpoint
    saves) give the same outputs and gradients bit for bit, another seed gives other masks, and the
    drop rate is the configured one."""
    model = _dropout_model(ParallelGroups.single())
    state = model.rng.state_dict()
    first = _forward_backward(model, 5, state)
    again = _forward_backward(model, 5, state)
    other = _forward_backward(model, 6, state)
    assert torch.equal(first[0], again[0]) and all(torch.equal(a, b) for a, b in zip(first[1], again[1]))
    assert not torch.equal(first[0], other[0])
    fused = torch.compile(bias_dropout_add, backend="inductor")  # what a layer's graph holds, alone
    x = torch.ones(64, 8, HIDDEN)
    torch.manual_seed(1)
    out = fused(x, torch.zeros(HIDDEN), torch.zeros_like(x), 0.2, True, model.rng, False)
    dropped = (out == 0).float().mean().item()
    assert abs(dropped - 0.2) < 0.02, dropped  # inductor's masks drop at the configured rate
    assert torch.allclose(out[out != 0], torch.tensor(1 / 0.8))  # and rescale the rest


@pytest.mark.slow
def test_inductor_resume_is_exact(tmp_path) -> None:
    """Dropout 0.1 (hidden dropout inside the graph from inductor's seeds, attention dropout eager):
    save at step 2, resume in a new Trainer, train to 4: the losses of 4 uninterrupted steps, bit for
    bit, since the generators whose state draws the masks are what the checkpoint saves."""
    from megalm.checkpoint import Checkpointer

    def config() -> Config:
        c = make_config(dropout=0.1)
        c.train.steps, c.checkpoint.interval_steps = 4, 2
        return c

    single = ParallelGroups.single()
    expected = [r["loss"] for r in build_trainer(config(), single, None).fit()]
    first = build_trainer(config(), single, None)
    first.fit(steps=2, checkpointer=Checkpointer(first, tmp_path))
    resumed = build_trainer(config(), single, None)
    checkpointer = Checkpointer(resumed, tmp_path)
    start = checkpointer.resume()
    assert start == 2
    assert [r["loss"] for r in resumed.fit(start_step=start, checkpointer=checkpointer)] == expected[2:]


def _replicated_worker(rank: int, world_size: int) -> torch.Tensor:
    groups = build_parallel_groups(Topology(tp=2), rank, torch.device("cpu"))
    model = _dropout_model(groups, sp=False)
    return _forward_backward(model, 5, model.rng.state_dict())[0]


@pytest.mark.slow
def test_inductor_replicated_dropout_agrees_across_tp() -> None:
    """tp=2 without sequence parallel: the residual stream is replicated and its hidden dropout
    runs inside the compiled graph; any difference between the two ranks' masks would make their
    outputs differ (attention dropout stays tp-distinct, eager)."""
    ranks = run_distributed(_replicated_worker, 2, timeout=600, collective_timeout=600)
    assert torch.equal(ranks[0], ranks[1])


@pytest.mark.slow
def test_inductor_fuses_the_element_wise_functions() -> None:
    """bias + GeLU and bias + dropout + residual (with and without dropout) each become one kernel."""
    import torch._inductor.metrics as metrics

    rng = ParallelRNG(1, ParallelGroups.single())
    y, bias, residual = torch.randn(16, 4, 32), torch.randn(32), torch.randn(16, 4, 32)
    for function, args in ((bias_gelu, (y, bias)), (bias_dropout_add, (y, bias, residual, 0.1, True, rng, False)),
                           (bias_dropout_add, (y, bias, residual, 0.0, True, rng, False))):
        torch._dynamo.reset()
        metrics.reset()
        torch.compile(function, backend="inductor")(*args)
        assert metrics.generated_kernel_count == 1, (function.__name__, args[3:4], metrics.generated_kernel_count)
