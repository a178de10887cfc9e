"""LR schedule, parameter groups, and the global gradient norm across tensor-parallel shards."""

from __future__ import annotations

import math

import pytest
import torch

from megalm.config import OptimConfig
from megalm.distributed import ParallelGroups, build_parallel_groups
from megalm.model.gpt import build_model
from megalm.optim import build_optimizer, clip_grad_norm_, global_grad_norm, lr_at
from megalm.testing import all_reduce_sequence_parallel_grads, run_distributed
from megalm.topology import Topology
from tests.parallel.test_tensor import SEED, make_batch, model_config


def test_warmup_then_cosine_to_min_lr() -> None:
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_style="cosine")
    assert lr_at(0, cfg, 110) == pytest.approx(1e-4)
    assert lr_at(9, cfg, 110) == pytest.approx(1e-3)
    assert lr_at(10, cfg, 110) == pytest.approx(1e-3)
    assert lr_at(60, cfg, 110) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way: cos = 0
    assert lr_at(110, cfg, 110) == pytest.approx(1e-4)
    assert lr_at(500, cfg, 110) == pytest.approx(1e-4)  # flat after the decay


def test_linear_and_constant_decay() -> None:
    linear = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, decay_style="linear")
    assert [lr_at(s, linear, 4) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    constant = OptimConfig(lr=0.5, min_lr=0.0, warmup_steps=2, decay_style="constant")
    assert [lr_at(s, constant, 10) for s in range(4)] == pytest.approx([0.25, 0.5, 0.5, 0.5])


def test_no_weight_decay_on_biases_and_norms() -> None:
    model = build_model(model_config("lm", "learned"), ParallelGroups.single(), SEED)
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def _norm_after_backward(groups: ParallelGroups, sp: bool) -> torch.Tensor:
    model = build_model(model_config("prefixlm", "learned"), groups, SEED, sequence_parallel=sp)
    tokens, labels, mask, prefix = make_batch("prefixlm")
    ((model(tokens, labels=labels, prefix_lengths=prefix) * mask).sum() / mask.sum()).backward()
    all_reduce_sequence_parallel_grads(model.parameters(), groups)
    return global_grad_norm(list(model.parameters()), groups)


def _norm_worker(rank: int, world_size: int) -> list[float]:
    groups = build_parallel_groups(Topology(tp=world_size), rank, torch.device("cpu"))
    return [float(_norm_after_backward(groups, sp)) for sp in (False, True)]


def test_global_grad_norm_counts_each_parameter_once_across_tp() -> None:
    """Split shards are summed over tp, replicated LayerNorms and biases counted once."""
    reference = float(_norm_after_backward(ParallelGroups.single(), sp=False))
    for rank_norms in run_distributed(_norm_worker, 2):
        for norm in rank_norms:
            assert norm == pytest.approx(reference, rel=1e-5)


def test_clipping_scales_to_max_norm() -> None:
    param = torch.nn.Parameter(torch.zeros(4))
    param.tp_split_dim = None
    param.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    norm = clip_grad_norm_([param], 1.0, ParallelGroups.single())
    assert norm == pytest.approx(5.0)
    assert param.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    param.grad = torch.tensor([0.3, 0.4, 0.0, 0.0])
    clip_grad_norm_([param], 1.0, ParallelGroups.single())
    assert param.grad.tolist() == pytest.approx([0.3, 0.4, 0.0, 0.0])  # below the limit: untouched
    assert math.isclose(clip_grad_norm_([param], 0.0, ParallelGroups.single()), 0.5, rel_tol=1e-6)
