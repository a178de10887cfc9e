"""A checkpoint saved under context parallelism resumes at another cp (and tp, pp), and `megalm eval` and
`megalm generate` load it at cp=1.

A GQA model trains at cp=2 with ZeRO-1 (its optimizer states sharded over dp x cp = 2 ranks) and saves at step SAVE. It resumes at cp=1 on one process and at cp=4 (and at tp=2 x cp=2): every full weight equals
the checkpoint's bit for bit, the data continues at the saved position (the start step), and the loss curve
continues the uninterrupted cp=2 run's. The evaluator loads the final checkpoint at cp=1 and computes the
cp=2 run's validation loss; generation rebuilds the config at cp=1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megalm.checkpoint import Checkpointer
from megalm.checkpoint.state import PieceIndex
from megalm.config import Config, ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from megalm.distributed import ParallelGroups, build_parallel_groups
from megalm.eval.evaluator import load_evaluator
from megalm.testing import full_weights, run_distributed
from megalm.topology import Topology
from megalm.train import build_trainer

SAVE, END, VOCAB, SEQ = 3, 5, 96, 32


def make_config(cp=1, tp=1, pp=1, zero=0) -> Config:
    config = Config(
        model=ModelConfig(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, vocab_size=VOCAB, seq_length=SEQ,
                          position_embedding="rotary", norm="rmsnorm", mlp="swiglu", hidden_dropout=0.0,
                          attention_dropout=0.0),
        parallel=ParallelConfig(tp=tp, pp=pp, cp=cp, zero_stage=zero, sequence_parallel=tp > 1),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        train=TrainConfig(steps=END, micro_batch_size=2, global_batch_size=4, seed=9, eval_batches=2),
    )
    config.checkpoint.interval_steps = SAVE
    config.checkpoint.save_at_end = False  # one checkpoint, at SAVE: resume and the evaluator both load it
    return config


def _worker(rank: int, world_size: int, layout: tuple, root: str, mode: str) -> dict:
    cp, tp, pp, zero = layout
    groups = build_parallel_groups(Topology(tp=tp, pp=pp, cp=cp), rank, torch.device("cpu"))
    return run(groups, layout, Path(root), mode)


def _rows(weights: dict) -> dict:
    return {n: (w[:VOCAB] if n in ("embedding.word.weight", "output.weight") else w) for n, w in weights.items()}


def run(groups: ParallelGroups, layout: tuple, root: Path, mode: str) -> dict:
    trainer = build_trainer(make_config(*layout), groups, None)
    if mode == "save":
        trainer.fit(steps=SAVE, checkpointer=Checkpointer(trainer, root))
        valid = trainer.evaluate()  # of the weights the checkpoint holds
        records = trainer.fit(steps=END, start_step=SAVE)
        return {"losses": [r["loss"] for r in records], "valid": valid}
    start = Checkpointer(trainer, root).resume()
    weights = _rows(full_weights(trainer))
    consumed = trainer.data.consumed_samples(start)
    records = trainer.fit(steps=END, start_step=start)
    return {"start": start, "consumed": consumed, "weights": weights, "losses": [r["loss"] for r in records]}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("cp-source")
    saved = run_distributed(_worker, 2, (2, 1, 1, 1), str(root), "save", timeout=300)
    assert saved[0] == saved[1]  # cp ranks report one loss (all-reduced)
    return root, saved[0]


@pytest.mark.parametrize("layout, world", [((1, 1, 1, 0), 1), ((4, 1, 1, 1), 4), ((2, 2, 1, 0), 4)],
                         ids=["cp1", "cp4-zero1", "tp2-cp2"])
def test_resume_at_another_cp_continues_the_loss_curve(layout: tuple, world: int, source) -> None:
    root, saved = source
    checkpoint = root / "checkpoints" / f"step_{SAVE:08d}"
    metadata = json.loads((checkpoint / "metadata.json").read_text())
    assert metadata["layout"]["cp"] == 2
    index = PieceIndex(checkpoint, metadata["files"])
    if world == 1:
        results = [run(ParallelGroups.single(), layout, root, "resume")]
    else:
        results = run_distributed(_worker, world, layout, str(root), "resume", timeout=300)
    for result in results:
        assert result["start"] == SAVE and result["consumed"] == SAVE * 4
        for name, weight in result["weights"].items():
            expected = index.full(name, "param")
            expected = expected[:VOCAB] if name in ("embedding.word.weight", "output.weight") else expected
            assert torch.equal(weight, expected), (layout, name)
        assert result["losses"] == pytest.approx(saved["losses"], rel=1e-5), layout
    print(f"resume cp2 -> {layout}: losses {results[0]['losses']} vs {saved['losses']}")


def test_eval_and_generate_load_a_cp_trained_checkpoint_at_cp1(source, monkeypatch) -> None:
    root, saved = source
    evaluator = load_evaluator(root)  # the run's checkpoint, at SAVE
    assert evaluator.config.parallel.cp == 1 and evaluator.trainer.groups.cp_size == 1
    result = evaluator.loss("valid")
    print(f"valid loss: cp2 trainer {saved['valid']:.6f}, cp1 evaluator {result['loss']:.6f}")
    assert result["loss"] == pytest.approx(saved["valid"], rel=1e-5)

    from megalm import generate as generate_module
    from megalm.cli import main

    monkeypatch.setattr(generate_module, "_load_tokenizer", lambda *args: _Tokenizer())
    out = root / "generated.jsonl"
    assert main(["generate", str(root), "--prompt", "abc", "--prompt", "hello", "--max-new-tokens", "4",
                 "--output", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [len(line["ids"]) for line in lines] == [4, 4] and all(0 <= i < VOCAB for line in lines for i in line["ids"])
    # greedy: the first new token is the argmax of the cp=1 evaluator model's logits after the prompt
    chunk = evaluator.trainer.chunks[0]
    with torch.no_grad():
        logits = chunk(torch.tensor([_Tokenizer().encode("abc")]))  # [s, b, v] at tp 1
    assert lines[0]["ids"][0] == int(logits[-1, 0, :VOCAB].argmax())


class _Tokenizer:
    """Characters as ids: enough for `megalm generate` on a model trained on synthetic ids."""

    stop_ids, eos_id, sep_id, hash = (), 1, None, None

    def encode(self, text: str) -> list[int]:
        return [2 + ord(c) % (VOCAB - 2) for c in text]

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))
