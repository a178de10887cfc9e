"""The trainer in one process: bf16 mixed precision trains like fp32; the data stream is layout-independent."""

from __future__ import annotations

import logging

import pytest
import torch

from megalm.config import load_config
from megalm.data.pipeline import build_sampler, build_sources
from megalm.distributed import ParallelGroups
from megalm.metrics import get_logger
from megalm.train import build_trainer
from tests.test_cli import ROOT


def _curve(*overrides: str) -> list[float]:
    config = load_config(ROOT / "configs" / "tiny.yaml", ["train.steps=40", *overrides])
    trainer = build_trainer(config, ParallelGroups.single(), None)
    return [record["loss"] for record in trainer.fit()]


def test_bf16_follows_fp32() -> None:
    fp32 = _curve()
    bf16 = _curve("train.precision=bf16")
    assert bf16 != fp32  # bf16 parameters really changed the arithmetic
    assert bf16[-1] < bf16[0] - 0.5
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.05


def test_global_batch_is_the_same_at_any_dp() -> None:
    """dp ranks' micro-batches together are exactly the single process's samples, in order."""
    config = load_config(ROOT / "configs" / "tiny-prefixlm.yaml")
    source = build_sources(config).train
    single = build_sampler(config, source, 0, 1).micro_batches(step=3)
    split = [b for rank in range(4) for b in build_sampler(config, source, rank, 4).micro_batches(step=3)]
    for field in ("tokens", "labels", "loss_mask", "prefix_lengths"):
        whole = torch.cat([getattr(b, field) for b in single])
        assert torch.equal(whole, torch.cat([getattr(b, field) for b in split]))
    # Labels are the next tokens, and prefix labels are masked out.
    first = single[0]
    assert torch.equal(first.tokens[:, 1:], first.labels[:, :-1])
    assert first.loss_mask[0, : int(first.prefix_lengths[0]) - 1].sum() == 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_non_finite_loss_is_skipped_and_logged(precision: str) -> None:
    """checkpoint.on_nan=skip (the default) without a loss scaler: the step is skipped and logged, not a crash."""
    config = load_config(ROOT / "configs" / "tiny.yaml", ["train.steps=2", f"train.precision={precision}"])
    assert config.checkpoint.on_nan == "skip"
    trainer = build_trainer(config, ParallelGroups.single(), None)
    with torch.no_grad():
        trainer.chunks[0].embedding.word.weight.fill_(float("nan"))
    before = [p.detach().clone() for p in trainer.params]
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger, level = get_logger(), get_logger().level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        records = trainer.fit()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [r["skipped"] for r in records] == [True, True]
    assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(before, trainer.params))  # no update
    assert any("step      1/2" in m and "skipped (non-finite loss, checkpoint.on_nan=skip)" in m for m in messages), messages
