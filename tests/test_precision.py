"""Megatron-style mixed precision: dtypes of every tensor, bytes per parameter, fp32 accumulation, kernels.

In bf16/fp16 the model's parameters are low precision and read directly by the matmuls; the
weight gradients accumulate in fp32 main-grad buckets; the optimizer keeps fp32 masters and
moments. The bytes a rank holds are summed from the real tensors and compared with the table in
docs/precision.md and the planner (megalm.plan) exactly.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megalm.comm import CommCounter
from megalm.config import Config, ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from megalm.distributed import ParallelGroups, build_parallel_groups
from megalm.model import layers
from megalm.model.gpt import build_model
from megalm.model.layers import layer_norm
from megalm.parallel.data import GradientSync
from megalm.plan import Layout, get_numerics, layout_from_config, load_cluster, stage_memory
from megalm.plan.collectives import p2p_message_bytes
from megalm.testing import run_distributed
from megalm.topology import Topology
from megalm.train import build_trainer

ROOT = Path(__file__).resolve().parents[1]
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ---- fp32 accumulation of gradient buckets (issue 12, item 6) -------------------------------------
class _Scalar(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2, dtype=dtype))


def _accumulate_worker(rank: int, world_size: int, dtype: torch.dtype, shard: bool) -> list[float]:
    groups = (
        build_parallel_groups(Topology(dp=world_size), rank, torch.device("cpu"))
        if world_size > 1
        else ParallelGroups.single()
    )
    module = _Scalar(dtype)
    sync = GradientSync([module], groups, reduce_dtype=torch.bfloat16, shard=shard)
    # One gradient of 1.0, then 64 of 2^-9: each is below half a bf16 ulp of 1.0 (2^-8), so a bf16
    # accumulator stays at 1.0, while fp32 keeps them all: 1 + 64 * 2^-9 = 1.125, exact in bf16 too.
    contributions = [1.0] + [2.0**-9] * 64
    sync.start_step(len(contributions))
    for value in contributions:
        (module.weight * value).sum().backward()
    sync.finish()
    if shard:
        return [v for b in sync.buckets for v in b.shard_main.tolist()]
    return sync.main_grad(module.weight).tolist()


@pytest.mark.parametrize("world_size,dtype,shard", [
    (1, torch.float32, False), (1, torch.bfloat16, False), (2, torch.float32, False), (2, torch.bfloat16, True),
])
def test_bf16_wire_keeps_small_increments_over_many_microbatches(world_size, dtype, shard) -> None:
    """grad_reduce_dtype=bf16 casts only for the wire: the buckets accumulate in fp32."""
    if world_size == 1:
        results = [_accumulate_worker(0, 1, dtype, shard)]
    else:
        results = run_distributed(_accumulate_worker, world_size, dtype, shard)
    for values in results:
        assert values == [1.125 * world_size] * len(values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp32_gradients_accumulate_in_place_in_the_bucket(dtype: torch.dtype) -> None:
    """An fp32 parameter's micro-batch gradients go straight into its bucket view (autograd's own
    in-place accumulation): no gradient tensor of its own per micro-batch, no extra add. A bf16
    parameter's arrive in bf16 and are added into the fp32 view (its .grad is dropped)."""
    module = _Scalar(dtype)
    sync = GradientSync([module], ParallelGroups.single())
    sync.start_step(2)
    view = sync.main_grad(module.weight)
    for value in (1.0, 2.0):
        (module.weight * value).sum().backward()
        if dtype == torch.float32:
            assert module.weight.grad is view
        else:
            assert module.weight.grad is None
    assert view.tolist() == [3.0, 3.0]
    # Someone replacing the fp32 .grad between micro-batches loses nothing: the hook adds it in.
    sync.start_step(2)
    (module.weight * 1.0).sum().backward()
    module.weight.grad = None
    (module.weight * 2.0).sum().backward()
    sync.finish()
    assert sync.main_grad(module.weight).tolist() == [3.0, 3.0]


# ---- dtypes and bytes per parameter ----------------------------------------------------------------
def _config(dp: int, precision: str, zero: int) -> Config:
    return Config(
        model=ModelConfig(num_layers=4, hidden_size=32, num_heads=4, vocab_size=300, seq_length=16),
        parallel=ParallelConfig(tp=1, pp=1, dp=dp, zero_stage=zero, bucket_size_mb=0.004),
        optim=OptimConfig(lr=1e-3, warmup_steps=0),
        train=TrainConfig(steps=2, micro_batch_size=1, global_batch_size=2 * dp, seed=3, precision=precision),
    )


def documented_bytes_per_parameter() -> dict[tuple[str, bool], str]:
    """docs/precision.md's "Bytes per parameter" table: (precision, ZeRO-1) -> total as an expression in dp."""
    text = (ROOT / "docs" / "precision.md").read_text(encoding="utf-8")
    section = text[text.index("### Bytes per parameter"):]
    table: dict[tuple[str, bool], str] = {}
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        cells = [c.strip().strip("`*") for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not re.match(r"^(fp32|bf16|fp16)", cells[0]):
            continue
        for precision in re.findall(r"fp32|bf16|fp16", cells[0].split("+")[0]):
            table[(precision, "ZeRO-1" in cells[0])] = cells[-1]
    return table


def _eval_bytes(expression: str, dp: int) -> float:
    if not set(expression) <= set("0123456789 +/*().dp"):
        raise AssertionError(f"unexpected docs/precision.md entry {expression!r}")
    return eval(expression, {"__builtins__": {}}, {"dp": dp})  # digits, + / * and dp only (checked above)


def _held_tensors(trainer) -> dict[str, list[torch.Tensor]]:
    """Every persistent tensor a rank holds for its parameters, by role (storages counted once)."""
    optimizer, sync = trainer.optimizer, trainer.sync
    moments = [v for s in optimizer.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return {
        "param": list(trainer.params),
        "main_grad": [b.grad for b in sync.buckets] + [b.shard_main for b in sync.buckets if b.shard_main is not None],
        "master": [m for m, s in zip(optimizer.masters, optimizer.segments) if m is not s.param],
        "moments": moments,
    }


def _bytes_worker(rank: int, world_size: int) -> dict:
    groups = (
        build_parallel_groups(Topology(dp=world_size), rank, torch.device("cpu"))
        if world_size > 1
        else ParallelGroups.single()
    )
    out = {}
    for precision in ("fp32", "bf16", "fp16"):
        for zero in (0, 1):
            trainer = build_trainer(_config(world_size, precision, zero), groups, None)
            for step in range(2):
                trainer.train_step(step)
            held = _held_tensors(trainer)
            storages = {}
            for role, tensors in held.items():
                for tensor in tensors:
                    storages.setdefault(tensor.untyped_storage().data_ptr(), (role, tensor))
            # Anything else alive on the parameters: a leftover .grad would be a hidden copy.
            leftover = [p.grad for p in trainer.params if p.grad is not None]
            assert all(g.untyped_storage().data_ptr() in storages for g in leftover), "a .grad outside the buckets"
            out[(precision, zero)] = {
                "bytes": sum(t.untyped_storage().nbytes() for _, t in storages.values()),
                "dtypes": {role: sorted({str(t.dtype) for t in ts}) for role, ts in held.items()},
                "params": sum(p.numel() for p in trainer.params),
                "padded": sum(b.numel for b in trainer.sync.buckets),
                "grad_none": all(p.grad is None for p in trainer.params),
            }
    return out


@pytest.fixture(scope="module")
def held_bytes() -> dict[int, list[dict]]:
    return {1: [_bytes_worker(0, 1)], 2: run_distributed(_bytes_worker, 2)}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_params_fp32_main_grads_masters_and_moments(held_bytes, precision) -> None:
    low = str(LOW[precision])
    for world_size, ranks in held_bytes.items():
        for per_rank in ranks:
            for zero in (0, 1):
                dtypes = per_rank[(precision, zero)]["dtypes"]
                assert dtypes["param"] == [low], (world_size, zero)
                assert dtypes["main_grad"] == ["torch.float32"]
                assert dtypes["master"] == ["torch.float32"] and dtypes["moments"] == ["torch.float32"]
                assert per_rank[(precision, zero)]["grad_none"]  # the low-precision .grad is freed in the hook


def test_fp32_without_zero_holds_no_master_copy(held_bytes) -> None:
    for ranks in held_bytes.values():
        for per_rank in ranks:
            assert per_rank[("fp32", 0)]["dtypes"]["master"] == []  # each parameter is its own master


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("zero", [0, 1])
def test_bytes_per_parameter_equal_docs_and_planner(held_bytes, precision, zero) -> None:
    table = documented_bytes_per_parameter()
    cluster, numerics = load_cluster("a100-80gb"), get_numerics("megalm")
    param_bytes = 4 if precision == "fp32" else 2
    for dp, ranks in held_bytes.items():
        measured = [per_rank[(precision, zero)] for per_rank in ranks]
        params, padded = measured[0]["params"], measured[0]["padded"]
        # docs/precision.md: per-rank bytes per parameter. Summed over the dp ranks the ZeRO-1 shards add up to the
        # whole model, so the sum is exact: dp x table x params, plus the buckets' padding (< dp elements
        # per bucket) in the fp32 bucket, the parameter bucket and the fp32 shard of the last rank.
        pad = padded - params
        expected = _eval_bytes(table[(precision, zero == 1)], dp) * dp * params
        expected += pad * (dp * (4 + param_bytes) + 4) if zero else 0
        assert sum(m["bytes"] for m in measured) == pytest.approx(expected, abs=1e-6), (dp, table)
        # Planner: dp rank 0 exactly (weights + gradients + optimizer + buffers; no p2p at pp = 1).
        config = _config(dp, precision, zero)
        layout = Layout(1, 1, dp, 1, config.train.global_batch_size, "1f1b", 1, "none", zero, False, None,
                        config.parallel.bucket_size_mb)
        plan = stage_memory(config.model, layout, cluster, numerics, precision, 0)
        assert plan.weights + plan.grads + plan.optimizer + plan.buffers == measured[0]["bytes"]


# ---- fp32 statistics inside low-precision kernels -------------------------------------------------
def test_layer_norm_keeps_fp32_statistics_for_bf16() -> None:
    """torch's CPU LayerNorm saves bf16 mean/rstd for bf16 weights; megalm's passes fp32 weights to keep fp32."""
    torch.manual_seed(0)
    x = (torch.randn(64, 4, 256) * 3 + 5).bfloat16()
    grad_out = torch.randn(64, 4, 256).bfloat16()
    norm = layer_norm(256, 1e-5, False, "cpu")
    with torch.no_grad():
        norm.weight.copy_((1 + 0.1 * torch.randn(256)).bfloat16())  # bf16 values: the same in both runs
        norm.bias.copy_((0.1 * torch.randn(256)).bfloat16())
    reference = layer_norm(256, 1e-5, False, "cpu")
    reference.load_state_dict(norm.state_dict())

    def input_grad(module, dtype):
        inp = x.to(dtype).requires_grad_(True)
        module.to(dtype)(inp).backward(grad_out.to(dtype))
        return inp.grad.float()

    exact = input_grad(reference, torch.float32)
    ours = input_grad(norm, torch.bfloat16)
    plain = torch.nn.LayerNorm(256, eps=1e-5).bfloat16()
    plain.load_state_dict(norm.state_dict())
    torch_bf16 = input_grad(plain, torch.bfloat16)
    scale = exact.abs().max()
    # ours: the bf16 rounding of inputs and output only (< 2^-8); bf16 statistics roughly double it
    assert (ours - exact).abs().max() / scale < 2**-8
    assert (torch_bf16 - exact).abs().max() / scale > (ours - exact).abs().max() / scale * 1.5


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_float64_model_runs_on_cpu_and_matches_fp32(position: str) -> None:
    """A model cast with .double() (numerical checks against other implementations) stays fp64 end to
    end on CPU: LayerNorm up-casts only bf16/fp16 weights, so no "mixed dtype" error; its loss and
    gradients equal the fp32 model's to fp32 rounding."""
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, vocab_size=100, seq_length=8,
                      position_embedding=position, hidden_dropout=0.0, attention_dropout=0.0, init_std=0.1)
    model = build_model(cfg, ParallelGroups.single(), 5)
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 100, (2, 9), generator=generator)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    double = copy.deepcopy(model).double()
    loss32, loss64 = model(inputs, labels=labels).mean(), double(inputs, labels=labels).mean()
    assert loss64.dtype == torch.float64 and loss32.dtype == torch.float32
    assert abs(loss64.item() - loss32.item()) <= 1e-5 * abs(loss64.item())
    loss32.backward()
    loss64.backward()
    for (name, p32), (_, p64) in zip(model.named_parameters(), double.named_parameters()):
        assert p64.grad.dtype == torch.float64, name
        assert (p32.grad.double() - p64.grad).norm() <= 1e-4 * p64.grad.norm(), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_layer_norm_passes_fp32_weights_only_for_low_precision(dtype: torch.dtype, monkeypatch) -> None:
    """The CPU kernel sees fp32 weights for bf16/fp16 (fp32 statistics), the module's own otherwise."""
    seen: list[torch.dtype] = []
    original = layers.F.layer_norm

    def spy(x, shape, weight=None, bias=None, eps=1e-5):
        seen.append(weight.dtype)
        return original(x, shape, weight, bias, eps)

    monkeypatch.setattr(layers.F, "layer_norm", spy)
    norm = layer_norm(16, 1e-5, False, "cpu").to(dtype)
    out = norm(torch.randn(4, 16, dtype=dtype))
    assert out.dtype == dtype
    assert seen == [torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype]


@pytest.mark.parametrize("masked", [False, True])
def test_cpu_attention_softmax_runs_in_fp32_for_bf16(masked: bool) -> None:
    """SDPA on bf16 inputs: mean error about 1.4x the bf16 rounding of its output (softmax statistics
    in fp32; like flash attention, probabilities are rounded to bf16 before the product with V),
    where a bf16 softmax gives about 3x."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 4, 128, 32).bfloat16() for _ in range(3))
    mask = (torch.rand(2, 1, 128, 128) > 0.3) | torch.eye(128, dtype=torch.bool) if masked else None
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=mask is None)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    rounding = (exact.bfloat16().float() - exact).abs().mean()
    assert (out.float() - exact).abs().mean() <= 1.6 * rounding
    # the same attention with a bf16 softmax is clearly worse: the check can tell them apart
    keep = mask if masked else torch.ones(128, 128, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2) * 32**-0.5).masked_fill(~keep, float("-inf"))
    assert (torch.softmax(scores, -1) @ v).float().sub(exact).abs().mean() > 2.5 * rounding


# ---- low-precision activations and collectives ------------------------------------------------------
def _activation_worker(rank: int, world_size: int) -> dict:
    groups = build_parallel_groups(Topology(tp=2), rank, torch.device("cpu"))
    config = _config(1, "bf16", 0)
    config.parallel.tp, config.parallel.sequence_parallel = 2, True
    trainer = build_trainer(config, groups, None)
    seen: list[tuple[str, str, int]] = []
    originals = {}
    names = [n for n in ("all_reduce", "all_gather_single", "all_gather_into_tensor", "reduce_scatter_single",
                         "reduce_scatter_tensor") if hasattr(dist, n)]
    for name in names:
        original = getattr(dist, name)
        originals[name] = original

        def recording(tensor, *args, _name=name, _original=original, **kwargs):
            seen.append((_name, str(tensor.dtype), tuple(tensor.shape)))
            return _original(tensor, *args, **kwargs)

        setattr(dist, name, recording)
    outputs: list[str] = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(str(o.dtype)) if torch.is_tensor(o) else None)
             for chunk in trainer.chunks for m in chunk.modules() if not isinstance(m, type(trainer.chunks[0]))]
    try:
        trainer.train_step(0)
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
        for hook in hooks:
            hook.remove()
    return {"collectives": seen, "outputs": outputs}


def _two_rank_worker(rank: int, world_size: int) -> dict:
    """One 2-rank spawn for the two tests below (a spawn costs seconds)."""
    return {"tp": _activation_worker(rank, world_size), "pp": _pipeline_message_worker(rank, world_size)}


@functools.lru_cache(maxsize=None)
def two_rank_results() -> list[dict]:
    return run_distributed(_two_rank_worker, 2)


def test_bf16_activations_and_tp_collectives_stay_bf16() -> None:
    """tp=2 with sequence parallel: every module output and every activation collective ([s, b, h]) is bf16."""
    for result in (r["tp"] for r in two_rank_results()):
        activation = [dtype for _, dtype, shape in result["collectives"] if len(shape) == 3 and shape[-1] == 32]
        assert len(activation) >= 4 * 4 and set(activation) == {"torch.bfloat16"}
        assert set(result["outputs"]) == {"torch.bfloat16"}


def _pipeline_message_worker(rank: int, world_size: int) -> dict:
    """pp=2, one train_step per precision: every pipeline message the executor hands the transport
    (kind, what, dtype, bytes) and the p2p calls and bytes the CommCounter saw on the pp group."""
    groups = build_parallel_groups(Topology(pp=2), rank, torch.device("cpu"))
    out = {}
    for precision in ("bf16", "fp16", "fp32"):
        trainer = build_trainer(_pipeline_config(precision), groups, None)
        transport, messages = trainer.executor.transport, []
        start = transport.start

        def recording_start(transfers, _start=start, _messages=messages):
            _messages.extend((t.kind, t.key[0], t.tensor.dtype, t.tensor.numel() * t.tensor.element_size())
                             for t in transfers)
            return _start(transfers)

        transport.start = recording_start
        counter = CommCounter(groups)
        with counter.counting():
            trainer.train_step(0)
        p2p = {op: stats for op, stats in counter.snapshot().get("pp", {}).items() if op in ("isend", "irecv")}
        out[precision] = {"messages": messages, "comm": p2p}
    return out


def _pipeline_config(precision: str) -> Config:
    config = _config(1, precision, 0)
    config.parallel.pp, config.train.global_batch_size = 2, 4  # 4 micro-batches of 1
    return config


def test_pipeline_messages_travel_in_the_activation_dtype_with_the_planned_bytes() -> None:
    """bf16/fp16 runs send their activations and gradients between stages in bf16/fp16 (not fp32: twice
    the bytes), and each message has the bytes `megalm plan` counts for it (p2p_message_bytes)."""
    results = [r["pp"] for r in two_rank_results()]
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        config = _pipeline_config(precision)
        planned = p2p_message_bytes(config.model, layout_from_config(config), precision)
        assert planned == {"fp32": 4, "bf16": 2, "fp16": 2}[precision] * 16 * 1 * 32  # [s, b, h] = [16, 1, 32]
        micro_batches = 4
        for rank, result in enumerate(results):
            messages = result[precision]["messages"]
            sent = "act" if rank == 0 else "grad"  # the first stage sends activations, the last their gradients
            assert sorted((kind, what) for kind, what, _, _ in messages) == sorted(
                [("send", sent)] * micro_batches + [("recv", "grad" if sent == "act" else "act")] * micro_batches)
            assert {(message_dtype, size) for _, _, message_dtype, size in messages} == {(dtype, planned)}, (
                precision, rank)
            assert result[precision]["comm"] == {op: {"calls": micro_batches, "bytes": micro_batches * planned}
                                                 for op in ("irecv", "isend")}, (precision, rank)


# ---- fp16: gradients are unscaled before the norm, clipping and the step --------------------------------
def _first_update(precision: str, loss_scale: float = 1.0, weights_from=None) -> tuple:
    """One production train_step with no clipping: (the reported grad norm, the main gradient the
    optimizer step reads for each parameter name, the weights it started from by name)."""
    config = _config(1, precision, 0)
    config.optim.clip_grad, config.optim.loss_scale = 0.0, loss_scale
    trainer = build_trainer(config, ParallelGroups.single(), None)
    named = {name: param for chunk in trainer.chunks for name, param in chunk.named_parameters()}
    if weights_from is not None:  # the same (fp16-rounded) weights as the fp16 run
        with torch.no_grad():
            for name, param in named.items():
                param.copy_(weights_from[name])
    start = {name: param.detach().float().clone() for name, param in named.items()}
    names = {id(param): name for name, param in named.items()}
    optimizer, seen = trainer.optimizer, []
    step = optimizer.step

    def recording_step(*args, **kwargs):
        seen.append({names[id(segment.param)]: master.grad.clone()
                     for master, segment in zip(optimizer.masters, optimizer.segments)})
        return step(*args, **kwargs)

    optimizer.step = recording_step
    result = trainer.train_step(0)
    assert not result.skipped and len(seen) == 1 and len(seen[0]) == len(named)
    return result.grad_norm, seen[0], start


def test_fp16_gradients_are_unscaled_before_the_norm_and_the_step() -> None:
    """fp16 with a static loss scale of 2^4 and 2^12: the grad norm it reports and the gradients its
    optimizer step reads are the true (unscaled) ones: those of an fp32 run on the same weights and data."""
    low_norm, low_grads, fp16_weights = _first_update("fp16", 2.0**4)
    high_norm, high_grads, _ = _first_update("fp16", 2.0**12)
    true_norm, true_grads, _ = _first_update("fp32", weights_from=fp16_weights)
    assert 1e-3 < true_norm < 1e3
    for norm, grads in ((low_norm, low_grads), (high_norm, high_grads)):
        assert norm == pytest.approx(true_norm, rel=2e-3)
        assert grads.keys() == true_grads.keys()
        for name, true in true_grads.items():
            assert (grads[name].view_as(true) - true).norm() <= 1e-2 * true.norm() + 1e-6, name
    assert high_norm == pytest.approx(low_norm, rel=1e-3)  # the scale itself leaves no trace


# ---- resume in bf16: the fp32 masters are saved, so resuming is bit for bit -------------------------
@pytest.mark.parametrize("world_size,zero", [(1, 0), (2, 1)])
def test_bf16_resume_is_bitwise_identical(world_size: int, zero: int, tmp_path: Path) -> None:
    """bf16 weights, fp32 masters and moments, losses: equal bit for bit after a resume (the production
    checkpoint path of tests/test_checkpoint.py, in bf16)."""
    from tests.test_checkpoint import BITWISE_SAVE, BITWISE_STEPS, _bitwise_worker

    layout, implementations = (1, 1, world_size, zero), ("fused",)
    if world_size == 1:
        results = [_bitwise_worker(0, 1, layout, str(tmp_path), implementations, "bf16")]
    else:
        results = run_distributed(_bitwise_worker, world_size, layout, str(tmp_path), implementations, "bf16",
                                  timeout=400)
    expected = {"fused": {"implementation": ("fused", "fused"), "start": BITWISE_SAVE, "losses_equal": True,
                          "weights_equal": True, "state_differences": [], "scales_equal": True,
                          "scaler_equal": True, "skipped": [False] * BITWISE_STEPS}}
    for result in results:
        assert result == expected
