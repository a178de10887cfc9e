"""The optional DeepSpeed engine: the mpu adapter and config (no DeepSpeed needed), then parity runs.

The parity tests need the extra (`pip install megalm[deepspeed]`) and skip without it. On CPU,
DeepSpeed uses its CPU accelerator over gloo; the first run JIT-compiles DeepSpeed's small
shared-memory comm op (about a minute, then cached under ~/.cache/torch_extensions).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from megalm.config import ConfigError, load_config, resolved_decay_steps
from megalm.distributed import ParallelGroups, build_parallel_groups
from megalm.engines.deepspeed_engine import (
    INSTALL_HINT,
    DeepSpeedMPU,
    check_supported,
    deepspeed_config,
    import_deepspeed,
    model_parallel_ranks,
    parameter_groups,
)
from megalm.testing import run_distributed
from megalm.topology import Topology
from tests.test_cli import ROOT

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not HAS_DEEPSPEED, reason=f"DeepSpeed is not installed (optional extra: {INSTALL_HINT})"
)

LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 1, 2), (2, 1, 2), (4, 1, 2), (2, 2, 2), (1, 3, 2)]  # (tp, pp, dp)


class _Group:
    """A stand-in process group that remembers its ranks (for tests without torch.distributed)."""

    def __init__(self, ranks: list[int]) -> None:
        self.ranks = tuple(ranks)

    def __repr__(self) -> str:
        return f"_Group{self.ranks}"


def _hand_built(topology: Topology, rank: int) -> tuple[ParallelGroups, _Group, _Group]:
    """ParallelGroups as build_parallel_groups makes them, with stand-in groups (None for size 1)."""
    lists = {
        "tp": topology.tp_group_ranks(rank),
        "dp": topology.dp_group_ranks(rank),
        "pp": topology.pp_group_ranks(rank),
    }
    made = {name: _Group(ranks) if len(ranks) > 1 else None for name, ranks in lists.items()}
    groups = ParallelGroups(
        topology=topology,
        rank=rank,
        device=torch.device("cpu"),
        tp_group=made["tp"],
        dp_group=made["dp"],
        pp_group=made["pp"],
        tp_ranks=tuple(lists["tp"]),
        dp_ranks=tuple(lists["dp"]),
        pp_ranks=tuple(lists["pp"]),
    )
    return groups, _Group([rank]), _Group(model_parallel_ranks(topology, rank))


def _members(group: _Group) -> tuple[int, ...]:
    return group.ranks


@pytest.mark.parametrize("tp,pp,dp", LAYOUTS)
def test_mpu_answers_match_the_topology(tp: int, pp: int, dp: int) -> None:
    topology = Topology(tp, pp, dp)
    for rank in range(topology.world_size):
        groups, self_group, mp_group = _hand_built(topology, rank)
        mpu = DeepSpeedMPU(groups, self_group, mp_group)
        coords = topology.coords(rank)
        assert (mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size()) == (coords.tp, tp)
        assert (mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()) == (coords.dp, dp)
        assert (mpu.get_pipeline_model_parallel_rank(), mpu.get_pipeline_model_parallel_world_size()) == (coords.pp, pp)
        # Every group contains this rank, has the dimension's size, and puts the rank at its coordinate.
        for get_group, get_rank, size in (
            (mpu.get_tensor_model_parallel_group, mpu.get_tensor_model_parallel_rank, tp),
            (mpu.get_data_parallel_group, mpu.get_data_parallel_rank, dp),
            (mpu.get_pipeline_model_parallel_group, mpu.get_pipeline_model_parallel_rank, pp),
            (mpu.get_model_parallel_group, mpu.get_model_parallel_rank, tp * pp),
        ):
            members = _members(get_group())
            assert len(members) == size and members[get_rank()] == rank
        assert mpu.get_model_parallel_world_size() == tp * pp
        assert mpu.get_data_parallel_group_ranks() == topology.dp_group_ranks(rank)
        src = mpu.get_tensor_model_parallel_src_rank()
        assert src == topology.tp_group_ranks(rank)[0] and topology.coords(src).tp == 0
        # A size-1 dimension is the one-rank group, never None (None would mean the world to DeepSpeed).
        if dp == 1:
            assert mpu.get_data_parallel_group() is self_group
        if tp == 1 and pp == 1:
            assert mpu.get_model_parallel_group() is self_group


def test_model_parallel_groups_partition_the_world() -> None:
    topology = Topology(tp=2, pp=3, dp=2)
    groups = {tuple(model_parallel_ranks(topology, rank)) for rank in range(topology.world_size)}
    assert sorted(r for g in groups for r in g) == list(range(topology.world_size))
    for group in groups:  # one dp coordinate each, every (pp, tp) pair once
        assert len({topology.coords(r).dp for r in group}) == 1
        assert len({(topology.coords(r).pp, topology.coords(r).tp) for r in group}) == 6


def test_mpu_without_one_rank_group_says_how_to_build_it() -> None:
    groups, _, _ = _hand_built(Topology(tp=2, dp=1), 0)
    mpu = DeepSpeedMPU(groups)
    assert mpu.get_tensor_model_parallel_rank() == 0  # ranks and sizes need no group
    with pytest.raises(RuntimeError, match=r"DeepSpeedMPU\.create"):
        mpu.get_data_parallel_group()


def test_mpu_hides_the_ulysses_switch() -> None:
    """DeepSpeed ignores an mpu's groups when it has initialize_sequence_parallel (Ulysses mode)."""
    mpu = DeepSpeedMPU(ParallelGroups.single(), _Group([0]))
    assert not hasattr(mpu, "initialize_sequence_parallel")
    assert not hasattr(mpu, "_init_tp_mesh_device")


def _real_groups_worker(rank: int, world_size: int, tp: int) -> list[tuple[int, int, float]]:
    topology = Topology.from_world_size(world_size, tp=tp)
    mpu = DeepSpeedMPU.create(build_parallel_groups(topology, rank, torch.device("cpu")))
    answers = []
    for group, group_rank, size in (
        (mpu.get_tensor_model_parallel_group(), mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size()),
        (mpu.get_data_parallel_group(), mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()),
        (mpu.get_pipeline_model_parallel_group(), mpu.get_pipeline_model_parallel_rank(), mpu.get_pipeline_model_parallel_world_size()),
        (mpu.get_model_parallel_group(), mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size()),
    ):
        assert group is not None
        assert (dist.get_rank(group), dist.get_world_size(group)) == (group_rank, size)
        total = torch.tensor([float(rank)])
        dist.all_reduce(total, group=group)
        answers.append((group_rank, size, total.item()))
    return answers


@pytest.mark.parametrize("world_size,tp", [(4, 2), (2, 2), (2, 1)])
def test_mpu_groups_are_real_process_groups(world_size: int, tp: int) -> None:
    """torch.distributed agrees with the adapter, and each group sums exactly its members' ranks."""
    topology = Topology.from_world_size(world_size, tp=tp)
    results = run_distributed(_real_groups_worker, world_size, tp)
    for rank, answers in enumerate(results):
        expected = [
            sum(topology.tp_group_ranks(rank)),
            sum(topology.dp_group_ranks(rank)),
            sum(topology.pp_group_ranks(rank)),
            sum(model_parallel_ranks(topology, rank)),
        ]
        assert [total for _, _, total in answers] == expected


# ---- the config dict -----------------------------------------------------------------------------------


def _config(*overrides: str):
    return load_config(ROOT / "configs" / "tiny.yaml", list(overrides))


def test_deepspeed_config_mirrors_megalm() -> None:
    config = _config("optim.clip_grad=0.5", "optim.weight_decay=0.1", "optim.beta2=0.98", "parallel.bucket_size_mb=1")
    ds = deepspeed_config(config, dp_size=2, zero_stage=2)
    # tiny.yaml: micro batch 4, global batch 16 -> 2 accumulation steps at dp 2
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (16, 4, 2)
    assert ds["gradient_clipping"] == 0.5
    adam = ds["optimizer"]
    assert adam["type"] == "AdamW" and adam["params"]["torch_adam"] is True  # no DeepSpeed op to compile
    assert adam["params"]["betas"] == [0.9, 0.98] and adam["params"]["weight_decay"] == 0.1
    assert adam["params"]["lr"] == config.optim.lr and adam["params"]["eps"] == config.optim.eps
    zero = ds["zero_optimization"]
    assert zero["stage"] == 2 and zero["reduce_bucket_size"] == 2**20 // 4  # 1 MB of fp32 gradients
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and "torch_autocast" not in ds
    assert deepspeed_config(config, dp_size=4, zero_stage=1)["gradient_accumulation_steps"] == 1


def test_bf16_is_autocast_over_fp32_weights() -> None:
    ds = deepspeed_config(_config("train.precision=bf16"), dp_size=1, zero_stage=1)
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert not ds["bf16"]["enabled"]  # DeepSpeed's bf16 mode would store bf16 weights


def test_batch_sizes_that_do_not_divide_are_rejected() -> None:
    with pytest.raises(ConfigError, match="global_batch_size"):
        deepspeed_config(_config(), dp_size=3, zero_stage=1)


@pytest.mark.parametrize(
    "overrides,zero_stage,message",
    [
        ((), 3, "stage 0, 1 or 2"),
        (("parallel.tp=2", "parallel.sequence_parallel=true"), 1, "sequence_parallel"),
        (("train.precision=fp16",), 1, "fp16"),
    ],
)
def test_unsupported_settings_fail_early(overrides: tuple, zero_stage: int, message: str) -> None:
    config = _config(*overrides)
    topology = Topology.from_world_size(2 * config.parallel.tp, tp=config.parallel.tp)
    with pytest.raises(ConfigError, match=message):
        check_supported(config, ParallelGroups(topology, 0, torch.device("cpu")), zero_stage)


def test_pipeline_parallelism_is_out_of_scope() -> None:
    config = _config("parallel.pp=2")
    with pytest.raises(ConfigError, match="pipeline"):
        check_supported(config, ParallelGroups(Topology(pp=2), 0, torch.device("cpu")), 1)


def test_parameter_groups_decay_matrices_only() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay, no_decay = parameter_groups(model, 0.1)
    assert [p.dim() for p in decay["params"]] == [2] and decay["weight_decay"] == 0.1
    assert [p.dim() for p in no_decay["params"]] == [1, 1, 1] and no_decay["weight_decay"] == 0.0


def test_engine_refuses_a_model_already_hooked_for_gradient_sync() -> None:
    from megalm.engines.deepspeed_engine import build_deepspeed_engine

    model = torch.nn.Linear(2, 2)
    model.weight.register_post_accumulate_grad_hook(lambda param: None)
    with pytest.raises(RuntimeError, match="GradientSync"):
        build_deepspeed_engine(_config(), ParallelGroups.single(), [model], 1)


def test_missing_deepspeed_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # makes `import deepspeed` fail
    with pytest.raises(ImportError, match=r"pip install megalm\[deepspeed\]"):
        import_deepspeed()


def test_megalm_never_imports_deepspeed_unasked() -> None:
    code = "import sys, megalm.engines.deepspeed_engine, megalm.train; print('deepspeed' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "False"


# ---- parity with megalm's own engine (needs DeepSpeed) -------------------------------------------------

STEPS = 4
PARITY_OVERRIDES = (f"train.steps={STEPS}", "optim.warmup_steps=2", "optim.clip_grad=0.3")


def _reference(*overrides: str) -> list[tuple[float, float]]:
    """megalm's own engine in one process: (loss, grad norm) of the first steps."""
    from megalm.train import build_trainer

    trainer = build_trainer(_config(*PARITY_OVERRIDES, *overrides), ParallelGroups.single(), None)
    return [(result.loss, result.grad_norm) for result in (trainer.train_step(step) for step in range(STEPS))]


def _deepspeed_worker(rank: int, world_size: int, tp: int, zero_stage: int, overrides: tuple) -> list[tuple[float, float]]:
    from megalm.data.pipeline import build_sampler, build_sources
    from megalm.engines.deepspeed_engine import build_deepspeed_engine
    from megalm.model.gpt import build_model_chunks
    from megalm.optim import lr_at

    config = _config(*PARITY_OVERRIDES, f"parallel.tp={tp}", *overrides)
    groups = build_parallel_groups(Topology.from_world_size(world_size, tp=tp), rank, torch.device("cpu"))
    chunks = build_model_chunks(config, groups)
    chunks[0].rng.seed_replicated()
    runner = build_deepspeed_engine(config, groups, chunks, zero_stage)
    data = build_sampler(config, build_sources(config).train, groups.dp_rank, groups.dp_size)
    out = []
    for step in range(STEPS):
        result = runner.train_step(data.micro_batches(step), lr_at(step, config.optim, resolved_decay_steps(config)))
        out.append((result.loss, result.grad_norm))
    return out


def _assert_close(got: list[tuple[float, float]], want: list[tuple[float, float]], tol: float = 1e-5) -> None:
    for (loss, norm), (ref_loss, ref_norm) in zip(got, want, strict=True):
        assert abs(loss - ref_loss) < tol, (got, want)
        assert abs(norm - ref_norm) < tol, (got, want)


@needs_deepspeed
@pytest.mark.slow
def test_zero1_at_dp2_matches_megalm_single_process() -> None:
    results = run_distributed(_deepspeed_worker, 2, 1, 1, (), timeout=600)
    assert results[0] == results[1]  # every dp rank reports the same global loss and norm
    _assert_close(results[0], _reference())


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("world_size,zero_stage", [(4, 2), (2, 1), (4, 0)])
def test_zero_with_tensor_parallel_matches_megalm(world_size: int, zero_stage: int) -> None:
    """tp=2 through the mpu: a clipped global norm over tp shards; (2, 1) is dp=1, a one-rank dp group;
    stage 0 is DeepSpeed's plain all-reduce, whose clipping goes through the mpu's model-parallel group."""
    results = run_distributed(_deepspeed_worker, world_size, 2, zero_stage, (), timeout=600)
    _assert_close(results[0], _reference())


@needs_deepspeed
@pytest.mark.slow
def test_bf16_prefixlm_zero2_matches_megalm() -> None:
    """DeepSpeed's bf16 here is autocast over fp32 weights; megalm's is bf16 weights with fp32 main
    gradients and masters (Megatron-style). The two round differently (as do AdamW on DeepSpeed's flat
    fp32 partition and megalm's per-tensor AdamW, ~5e-7 in fp32); 5e-4 is above the loss gap measured
    between megalm bf16 layouts (2e-4, tests/test_precision_parity.py) and well below a real error."""
    overrides = ("train.precision=bf16", "model.family=prefixlm")
    results = run_distributed(_deepspeed_worker, 2, 1, 2, overrides, timeout=600)
    _assert_close(results[0], _reference(*overrides), tol=5e-4)
    fp32 = _reference("model.family=prefixlm")
    assert max(abs(a[0] - b[0]) for a, b in zip(results[0], fp32)) > 1e-5  # autocast really ran


def _recompute_worker(rank: int, world_size: int) -> dict[str, list[tuple[float, float]]]:
    dropout = ("model.hidden_dropout=0.1", "model.attention_dropout=0.1")
    return {mode: _deepspeed_worker(rank, world_size, 2, 2, (f"parallel.recompute={mode}", *dropout))
            for mode in ("none", "selective", "full")}


@needs_deepspeed
@pytest.mark.slow  # three DeepSpeed engines on 4 ranks: about a minute on two cores
def test_recompute_under_deepspeed_matches_the_run_without_it() -> None:
    """Recompute lives in megalm's layers, so it runs under the DeepSpeed engine too: with dropout on, at
    tp 2 (the tp-distinct dropout stream) x dp 2 with ZeRO-2, the recomputed forward redraws the stored
    run's masks, so losses and clipped norms equal the run without recompute bit for bit."""
    results = run_distributed(_recompute_worker, 4, timeout=600)[0]
    assert results["selective"] == results["none"] and results["full"] == results["none"]
    assert max(abs(a[0] - b[0]) for a, b in zip(results["none"], _reference())) > 1e-4  # dropout really ran


# ---- FlexAttention PrefixLM and train.init_from under DeepSpeed ----------------------------------------------

FLEX = ("model.family=prefixlm", "model.prefix_attention=flex")


def _counted_flex(calls: list) -> None:
    """Lift torch's CPU check on FlexAttention's backward (tests/model/test_flex.py) and count the flex calls."""
    from megalm.model import layers
    from tests.model.test_flex import lift_cpu_flex_check

    lift_cpu_flex_check()
    real = layers.flex_prefix_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    layers.flex_prefix_attention = counted


def _flex_worker(rank: int, world_size: int) -> tuple[list[tuple[float, float]], int]:
    calls: list = []
    _counted_flex(calls)
    return _deepspeed_worker(rank, world_size, 1, 2, FLEX), len(calls)


@needs_deepspeed
@pytest.mark.slow
def test_flex_prefixlm_under_deepspeed_matches_megalm(monkeypatch) -> None:
    """A PrefixLM on FlexAttention's block mask, ZeRO-2 at dp 2: the losses and clipped norms of megalm's
    own engine on the same kernel, weights and data."""
    from megalm.model import layers
    from tests.model.test_flex import torch_flex

    results = run_distributed(_flex_worker, 2, timeout=600)
    (got, calls), _ = results
    assert calls > 0  # the flex kernel ran under DeepSpeed
    monkeypatch.setattr(torch_flex, "_validate_device", lambda *args, **kwargs: None)
    reference_calls: list = []
    real = layers.flex_prefix_attention
    monkeypatch.setattr(layers, "flex_prefix_attention",
                        lambda *args, **kwargs: reference_calls.append(1) or real(*args, **kwargs))
    want = _reference(*FLEX)
    assert reference_calls
    _assert_close(got, want)


def _init_from_worker(rank: int, world_size: int, source: str) -> list[tuple[float, float]]:
    from megalm.train import build_trainer

    config = _config(*PARITY_OVERRIDES, "train.engine=deepspeed", "parallel.zero_stage=2", f"train.init_from={source}")
    groups = build_parallel_groups(Topology.from_world_size(world_size, tp=1), rank, torch.device("cpu"))
    trainer = build_trainer(config, groups, None)
    return [(result.loss, result.grad_norm) for result in (trainer.train_step(step) for step in range(STEPS))]


@needs_deepspeed
@pytest.mark.slow
def test_deepspeed_starts_from_train_init_from(tmp_path) -> None:
    """train.init_from under DeepSpeed loads the checkpoint's weights before ZeRO copies them into its fp32
    partitions: every step (not only the first) equals megalm's engine started from the same checkpoint."""
    from megalm.checkpoint import Checkpointer
    from megalm.train import build_trainer

    source = build_trainer(_config("train.steps=3", "train.seed=7"), ParallelGroups.single(), None)
    source.fit(checkpointer=Checkpointer(source, tmp_path / "source"))
    config = _config(*PARITY_OVERRIDES, f"train.init_from={tmp_path / 'source'}")
    reference = build_trainer(config, ParallelGroups.single(), None)
    Checkpointer(reference, tmp_path / "reference").start()
    want = [(result.loss, result.grad_norm) for result in (reference.train_step(step) for step in range(STEPS))]
    assert abs(want[0][0] - _reference()[0][0]) > 1e-3  # the checkpoint's weights are not the fresh ones
    results = run_distributed(_init_from_worker, 2, str(tmp_path / "source"), timeout=600)
    assert results[0] == results[1]
    _assert_close(results[0], want)
