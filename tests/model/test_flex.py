"""PrefixLM through FlexAttention (model.prefix_attention=flex) against the dense-mask SDPA reference.

torch 2.13 has no FlexAttention backward on CPU (its public entry point refuses inputs that require
grad there); its eager math path does run backward on CPU, so the `flex_on_cpu` fixture lifts that
device check and these tests run flex eagerly. The eager path applies the mask_mod to every (query,
key) pair, ignoring the block structure, so the BlockMask's tiles are checked on their own against
torch's create_block_mask; the compiled kernel that reads them runs on CUDA (tests/test_gpu.py).
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.attention.flex_attention as torch_flex
from torch.utils._python_dispatch import TorchDispatchMode

from megalm.config import Config, ConfigError, ModelConfig
from megalm.data.pipeline import build_sampler, build_sources
from megalm.distributed import ParallelGroups, build_parallel_groups
from megalm.model.attention import (
    describe_attention, prefix_attention_kernel, prefix_attention_mask, prefix_block_mask, prefix_mask_mod,
    uses_dense_prefix_mask,
)
from megalm.model.gpt import build_model_chunks
from megalm.testing import log_messages, run_distributed
from megalm.topology import Topology
from tests.model.test_recompute import SEQ, make_config, train

# fp32, losses relative and gradients by relative norm: both paths compute the same softmax and differ
# only in summation order (measured ~3e-7); a mask that let one key through wrongly moves them by >1e-3.
TOLERANCE = 1e-5


def lift_cpu_flex_check() -> None:
    """Let flex_attention run its eager math path with gradients on CPU (what torch refuses)."""
    assert hasattr(torch_flex, "_validate_device"), "torch moved FlexAttention's device check: update this helper"
    torch_flex._validate_device = lambda *args, **kwargs: None


@pytest.fixture
def flex_on_cpu(monkeypatch):
    monkeypatch.setattr(torch_flex, "_validate_device", lambda *args, **kwargs: None)


def flex_config(kernel: str, recompute: str = "none", **layout) -> Config:
    """test_recompute's PrefixLM (rotary, 4 layers) without dropout, on the given PrefixLM kernel."""
    config = make_config("prefixlm", recompute, **layout)
    config.model.hidden_dropout = config.model.attention_dropout = 0.0
    config.model.prefix_attention = kernel
    return config


def assert_close(got: dict, want: dict, what) -> None:
    assert len(got["losses"]) == len(want["losses"]) > 0
    for a, b in zip(got["losses"], want["losses"]):
        assert abs(a - b) <= TOLERANCE * abs(b), (what, got["losses"], want["losses"])
    # The first step's gradients (same weights). Later steps start from weights that Adam's first update
    # (about lr * sign(g)) moved apart wherever a gradient is near zero: that measures Adam, not attention.
    for g, w in zip(got["grads"][:1], want["grads"][:1]):
        assert len(g) == len(w) > 0, what
        for index, (a, b) in enumerate(zip(g, w)):
            error = float((a - b).norm() / b.norm())
            assert error <= TOLERANCE, (what, index, error)


# ---- the block mask ------------------------------------------------------------------------------


@pytest.mark.parametrize("seq,block", [(16, 4), (19, 4), (12, 16), (256, 128)])
def test_block_mask_equals_torchs_create_block_mask(seq: int, block: int) -> None:
    """The tile arithmetic gives torch's BlockMask of the same mask_mod, partial and full tiles alike,
    for prefixes of 0, inside a tile, on a tile edge, and the whole sequence; a partial last tile too."""
    prefix = torch.tensor([0, 1, block, block + 1, seq // 2, seq - 1, seq])
    got = prefix_block_mask(prefix, seq, block)
    want = torch_flex.create_block_mask(prefix_mask_mod(prefix), len(prefix), 1, seq, seq, device="cpu", BLOCK_SIZE=block)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.seq_lengths == want.seq_lengths == (seq, seq) and got.BLOCK_SIZE == (block, block)
    # and the mask_mod is the dense mask's rule
    dense = torch_flex.create_mask(got.mask_mod, len(prefix), 1, seq, seq, device="cpu")
    assert torch.equal(dense, prefix_attention_mask(prefix, seq))


# ---- choice and config ---------------------------------------------------------------------------


def test_kernel_choice_and_config_errors() -> None:
    prefix = dict(family="prefixlm")
    assert prefix_attention_kernel(ModelConfig(**prefix), "cuda")[0] == "flex"
    assert prefix_attention_kernel(ModelConfig(**prefix), "cpu")[0] == "dense"  # no CPU flex backward
    assert prefix_attention_kernel(ModelConfig(**prefix, attention_dropout=0.1), "cuda")[0] == "dense"
    assert prefix_attention_kernel(ModelConfig(**prefix, prefix_attention="flex"), "cpu")[0] == "flex"
    assert prefix_attention_kernel(ModelConfig(**prefix, prefix_attention="dense"), "cuda")[0] == "dense"
    assert "FlexAttention (compiled" in describe_attention(ModelConfig(**prefix), "cuda")
    assert "dropout" in describe_attention(ModelConfig(**prefix, attention_dropout=0.1), "cuda")
    assert describe_attention(ModelConfig(), "cuda") == "attention: LM, SDPA is_causal"
    with pytest.raises(ConfigError, match="prefix_attention=flex has no attention dropout"):
        ModelConfig(**prefix, prefix_attention="flex", attention_dropout=0.1)
    with pytest.raises(ConfigError, match="applies to model.family=prefixlm and model.document_mask only"):
        ModelConfig(prefix_attention="flex")
    with pytest.raises(ConfigError, match="must be one of"):
        ModelConfig(**prefix, prefix_attention="flash")


def test_flex_training_on_cpu_says_what_to_do() -> None:
    """Without the lifted check, torch refuses CPU backward; megalm's message names the fix."""
    with pytest.raises(RuntimeError, match="prefix_attention=flex cannot train on cpu.*auto"):
        train(flex_config("flex"), ParallelGroups.single())


# ---- parity through the Trainer ------------------------------------------------------------------


def test_flex_matches_the_dense_mask_through_the_trainer(flex_on_cpu) -> None:
    """Two fp32 steps (losses and every main gradient) of flex against SDPA with the dense mask, with
    and without recompute; the start-up log names the kernel."""
    single = ParallelGroups.single()
    want = train(flex_config("dense"), single)
    with log_messages() as lines:
        got = train(flex_config("flex"), single)
    assert any(line.startswith("attention: PrefixLM, FlexAttention (eager") for line in lines), lines
    assert_close(got, want, "none")
    for mode in ("selective", "full"):
        assert_close(train(flex_config("flex", mode), single), want, mode)


def _parallel_worker(rank: int, world_size: int) -> dict:
    lift_cpu_flex_check()
    groups = build_parallel_groups(Topology(tp=2, pp=2, dp=1), rank, torch.device("cpu"))
    layout = dict(tp=2, pp=2, schedule="interleaved", v=2)  # two chunks per rank: a block mask each
    return {kernel: train(flex_config(kernel, "selective", **layout), groups) for kernel in ("dense", "flex")}


# slow (21 s); flex-vs-dense parity through the Trainer in one process is the fast check
@pytest.mark.slow
def test_flex_matches_the_dense_mask_at_tp2_sp_pp2() -> None:
    """tp=2 with sequence parallel x pp=2, interleaved (v=2), selective recompute: every rank's losses
    and gradients with flex equal the dense mask's, and the losses the single process's."""
    lift_cpu_flex_check()
    single = train(flex_config("dense"), ParallelGroups.single())
    for rank, out in enumerate(run_distributed(_parallel_worker, 4, timeout=240)):
        assert_close(out["flex"], out["dense"], rank)
        for a, b in zip(out["flex"]["losses"], single["losses"]):
            assert abs(a - b) <= TOLERANCE * abs(b), (rank, out["flex"]["losses"], single["losses"])


# ---- no [b, 1, s, s] tensor ------------------------------------------------------------------------


class Shapes(TorchDispatchMode):
    """Shapes of every tensor the model's ops produce, forward and backward. The flex_attention kernel
    counts as one op with its outputs, forward (run with this mode suspended: torch compiles its entry
    point, which a dispatch mode would stop) and backward (a higher-order op, seen as one): what it
    allocates inside is the kernel's business (eagerly on CPU: the math path's scores; compiled on
    CUDA: none, tests/test_gpu.py)."""

    supports_higher_order_operators = True

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple]] = []

    def record(self, op: str, out) -> None:
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.shapes.append((op, tuple(tensor.shape)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.record(str(func), out)
        return out


def square(shapes: Shapes, seq: int) -> list:
    return [(op, shape) for op, shape in shapes.shapes if len(shape) >= 2 and shape[-2:] == (seq, seq)]


def test_no_seq_by_seq_tensor_in_flex_prefixlm(flex_on_cpu, monkeypatch) -> None:
    """Forward and backward of a PrefixLM chunk with flex allocate no tensor ending in [s, s] outside
    the attention kernel (the dense mask path allocates its [b, 1, s, s] mask, as the control)."""
    import megalm.model.layers as layers

    kernel_calls = []

    def flex_kernel(*args):
        with torch.utils._python_dispatch._disable_current_modes():
            out = attention_kernel(*args)
        kernel_calls.append(tuple(out.shape))
        shapes.record("flex_attention", out)
        return out

    attention_kernel = layers.flex_prefix_attention
    monkeypatch.setattr(layers, "flex_prefix_attention", flex_kernel)
    recorded = {}
    for kernel in ("dense", "flex"):
        config = flex_config(kernel)
        (chunk,) = build_model_chunks(config, ParallelGroups.single())
        batch = build_sampler(config, build_sources(config).train, 0, 1).micro_batches(0)[0]
        with Shapes() as shapes:
            chunk(batch.tokens, labels=batch.labels, prefix_lengths=batch.prefix_lengths).sum().backward()
        recorded[kernel] = shapes
    micro, layers_count = config.train.micro_batch_size, config.model.num_layers
    assert (micro, 1, SEQ, SEQ) in [shape for _, shape in square(recorded["dense"], SEQ)]
    assert len(kernel_calls) == layers_count  # every layer ran the flex kernel, forward ...
    assert sum("flex_attention_backward" in op for op, _ in recorded["flex"].shapes) >= layers_count  # ... and backward
    assert square(recorded["flex"], SEQ) == []


# ---- the planner ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_plan_of_a_flex_prefixlm_counts_no_dense_mask(mode: str) -> None:
    """`megalm plan` (CUDA kernels) of a FlexAttention PrefixLM keeps what the causal LM of the same shape
    keeps: flex stores no [b, 1, s, s] mask and, like flash, only q, k, v, the output and the logsumexp
    (measured on an H200 by tests/test_gpu.py: peak 129.20 MiB against the LM's 129.17). The dense
    mask's plan counts at least as much."""
    from megalm.plan import get_numerics, load_cluster, stage_memory
    from megalm.plan.layout import layout_from_config

    def activations(config: Config) -> int:
        config.train.micro_batch_size = 4
        config.model.seq_length = 2048
        layout = layout_from_config(config, gpus=1)
        return stage_memory(config.model, layout, load_cluster("h100-80gb"), get_numerics("megalm"), "bf16", 0).activations

    lm = flex_config("dense", mode)
    lm.model.family, lm.model.prefix_attention = "lm", "auto"
    for kernel in ("flex", "auto"):  # auto on CUDA without attention dropout is flex
        assert uses_dense_prefix_mask(flex_config(kernel).model, "cuda") is False
        assert activations(flex_config(kernel, mode)) == activations(lm), kernel
    assert uses_dense_prefix_mask(flex_config("dense").model, "cuda") and uses_dense_prefix_mask(flex_config("auto").model, "cpu")
    assert activations(flex_config("dense", mode)) >= activations(lm)
