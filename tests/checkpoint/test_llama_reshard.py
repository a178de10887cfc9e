"""Resume and train.init_from reshard the Llama-family layouts (query and key/value weights, SwiGLU's gate
and up, the untied output layer) at other tp and pp, including tp > num_kv_heads, where each key/value head
has copies on several tp ranks and the checkpoint holds one.

A grouped-query model (8 heads, 2 key/value heads) is trained at tp 2 x pp 2 and saved; it resumes at
tp 4 (replicated key/value heads) and at tp 1: every full tensor loaded equals the checkpoint's bit for bit,
saving again at the new layout writes the same full tensors (weights and Adam moments), and the loss
curve continues as the un-resharded run's. A fine-tune (train.init_from) at tp 4 x pp 1 starts from the
same full weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megalm.checkpoint import Checkpointer
from megalm.checkpoint.state import PieceIndex
from megalm.checkpoint.weights import find_checkpoint
from megalm.config import Config, ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from megalm.distributed import ParallelGroups, build_parallel_groups
from megalm.parallel.tensor import gather_full_tensor
from megalm.testing import run_distributed
from megalm.topology import Topology
from megalm.train import build_trainer

SAVE, END, VOCAB = 6, 9, 200


def make_config(tp=1, pp=1, init_from=None) -> Config:
    config = Config(
        model=ModelConfig(norm="rmsnorm", mlp="swiglu", num_heads=8, num_kv_heads=2, hidden_size=64, ffn_hidden_size=96,
                          num_layers=4, vocab_size=VOCAB, seq_length=16, position_embedding="rotary", bias=False,
                          tie_embeddings=False, rope_scaling="llama3", rope_factor=4.0, rope_original_max_positions=8),
        parallel=ParallelConfig(tp=tp, pp=pp, sequence_parallel=tp > 1),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        train=TrainConfig(steps=END, micro_batch_size=2, global_batch_size=4, seed=9,
                          init_from=None if init_from is None else str(init_from)),
    )
    config.checkpoint.interval_steps = SAVE
    config.checkpoint.save_at_end = False  # the run continues past its checkpoint: the un-resharded continuation
    return config


def full_state(trainer) -> dict[str, torch.Tensor]:
    out = {}
    for chunk in trainer.chunks:
        for name, param in chunk.named_parameters():
            full = gather_full_tensor(param.data, param.tp_split_dim, trainer.groups, getattr(param, "tp_replicas", 1))
            out[name] = full[:VOCAB] if name in ("embedding.word.weight", "output.weight") else full
    return out


def _worker(rank: int, world_size: int, layout: tuple, root: str, mode: str) -> dict:
    tp, pp = layout
    groups = build_parallel_groups(Topology(tp=tp, pp=pp), rank, torch.device("cpu"))
    return run(groups, layout, Path(root), mode)


def run(groups: ParallelGroups, layout: tuple, root: Path, mode: str) -> dict:
    tp, pp = layout
    if mode == "save":
        trainer = build_trainer(make_config(tp, pp), groups, None)
        records = trainer.fit(steps=END, checkpointer=Checkpointer(trainer, root))
        return {"losses": [r["loss"] for r in records][SAVE:]}
    if mode == "init_from":
        config = make_config(tp, pp, init_from=root)
        trainer = build_trainer(config, groups, None)
        assert Checkpointer(trainer, root / f"finetune-{tp}x{pp}").start() == 0
        return {"weights": full_state(trainer)}
    trainer = build_trainer(make_config(tp, pp), groups, None)
    start = Checkpointer(trainer, root).resume()
    Checkpointer(trainer, root / f"resaved-{tp}x{pp}").save(start)
    weights = full_state(trainer)
    records = trainer.fit(steps=END, start_step=start)
    return {"start": start, "weights": weights, "losses": [r["loss"] for r in records]}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, list[float]]:
    root = tmp_path_factory.mktemp("llama-source")
    saved = run_distributed(_worker, 4, (2, 2), str(root), "save", timeout=300)
    return root, saved[-1]["losses"]  # the last stage's ranks log the loss


def _index(checkpoint: Path) -> PieceIndex:
    return PieceIndex(checkpoint, json.loads((checkpoint / "metadata.json").read_text())["files"])


@pytest.mark.parametrize("layout, world", [((4, 1), 4), ((1, 1), 1)], ids=["tp4-replicated-kv", "tp1"])
def test_resume_reshards_the_llama_layout(layout: tuple, world: int, source) -> None:
    root, continuation = source
    checkpoint = root / "checkpoints" / f"step_{SAVE:08d}"
    index = _index(checkpoint)
    if world == 1:
        results = [run(ParallelGroups.single(), layout, root, "resume")]
    else:
        results = run_distributed(_worker, world, layout, str(root), "resume", timeout=300)
    assert results[0]["start"] == SAVE
    names = {name for name, kind in index.pieces if kind == "param"}
    assert {"layers.0.attn.query.weight", "layers.0.attn.key_value.weight", "layers.0.mlp.gate.weight",
            "layers.0.mlp.up.weight", "output.weight"} <= names
    for result in results:
        for name, weight in result["weights"].items():
            expected = index.full(name, "param")
            expected = expected[:VOCAB] if name in ("embedding.word.weight", "output.weight") else expected
            assert torch.equal(weight, expected), (layout, name)
    assert results[0]["losses"] == pytest.approx(continuation, rel=1e-5)
    resaved = _index(root / f"resaved-{layout[0]}x{layout[1]}" / "checkpoints" / f"step_{SAVE:08d}")
    assert set(resaved.pieces) == set(index.pieces)
    for name, kind in sorted(index.pieces):
        assert torch.equal(resaved.full(name, kind)[:VOCAB], index.full(name, kind)[:VOCAB]), (name, kind)


def test_init_from_reshards_the_llama_layout_at_tp4(source) -> None:
    root, _ = source
    index = _index(find_checkpoint(root))  # the checkpoint init_from loads: the run's latest
    results = run_distributed(_worker, 4, (4, 1), str(root), "init_from", timeout=300)
    for result in results:
        for name, weight in result["weights"].items():
            expected = index.full(name, "param")
            expected = expected[:VOCAB] if name in ("embedding.word.weight", "output.weight") else expected
            assert torch.equal(weight, expected), name
