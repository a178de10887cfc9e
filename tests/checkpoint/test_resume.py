"""Resume: refuses another model shape, continues the data where it stopped, never runs code from a file."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch

from megalm.checkpoint import Checkpointer, CheckpointError
from megalm.checkpoint.state import (
    MODEL_FIELDS, UNCHECKED_MODEL_FIELDS, PieceIndex, model_differences, restore, saved_scalars,
)
from megalm.checkpoint.weights import check_init_from
from megalm.config import Config, ModelConfig, OptimConfig, TrainConfig
from megalm.data.pipeline import build_sampler, build_sources
from megalm.distributed import ParallelGroups
from megalm.metrics import get_logger
from megalm.train import build_trainer

SAVED_STEPS = 2


def make_config(**model) -> Config:
    fields = dict(num_layers=2, hidden_size=32, num_heads=4, vocab_size=200, seq_length=16)
    fields.update(model)
    config = Config(
        model=ModelConfig(**fields),
        optim=OptimConfig(lr=3e-3, warmup_steps=1),
        train=TrainConfig(steps=SAVED_STEPS, micro_batch_size=2, global_batch_size=4, seed=9),
    )
    config.checkpoint.interval_steps = SAVED_STEPS
    return config


def train_and_save(run_dir: Path, config: Config) -> Path:
    trainer = build_trainer(config, ParallelGroups.single(), None)
    trainer.fit(checkpointer=Checkpointer(trainer, run_dir))
    return run_dir / "checkpoints" / f"step_{SAVED_STEPS:08d}"


def resume(run_dir: Path, config: Config):
    trainer = build_trainer(config, ParallelGroups.single(), None)
    return trainer, Checkpointer(trainer, run_dir).resume()


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("learned")
    train_and_save(run_dir, make_config())
    return run_dir


# ---- 1: every shape-bearing model field is compared ------------------------------------------------
@pytest.mark.parametrize("change, expected", [
    ({"seq_length": 32}, r"learned position table rows .*: checkpoint 16, this run 32"),
    ({"max_position_embeddings": 64}, r"learned position table rows .*: checkpoint 16, this run 64"),
    ({"ffn_hidden_size": 64}, r"MLP hidden size .*: checkpoint 128, this run 64"),
    ({"position_embedding": "rotary"}, r"model\.position_embedding: checkpoint 'learned', this run 'rotary'"),
])
def test_resume_with_another_shape_is_refused(learned_run: Path, change: dict, expected: str) -> None:
    with pytest.raises(CheckpointError, match=expected):
        resume(learned_run, make_config(**change))


def test_same_shapes_spelled_differently_resume(learned_run: Path) -> None:
    """An explicit ffn size / position table equal to the derived one is the same model; vocab padding may differ."""
    assert resume(learned_run, make_config(ffn_hidden_size=128, max_position_embeddings=16))[1] == SAVED_STEPS
    config = make_config()
    config.model.make_vocab_size_divisible_by = 8  # 200 padded rows instead of 256: only padding differs
    trainer, step = resume(learned_run, config)
    assert step == SAVED_STEPS and trainer.chunks[0].embedding.word.weight.shape[0] == 200


def test_rotary_resume_compares_the_rotary_base(tmp_path: Path) -> None:
    train_and_save(tmp_path, make_config(position_embedding="rotary"))
    assert resume(tmp_path, make_config(position_embedding="rotary", seq_length=32))[1] == SAVED_STEPS
    with pytest.raises(CheckpointError, match=r"model\.rotary_base .*: checkpoint 10000.0, this run 500.0"):
        resume(tmp_path, make_config(position_embedding="rotary", rotary_base=500.0))


def test_restore_refuses_a_shape_that_is_not_vocabulary_padding(learned_run: Path) -> None:
    """Below the config check: restoring pieces into a longer position table raises, never zero-pads."""
    trainer = build_trainer(make_config(seq_length=32), ParallelGroups.single(), None)
    path = learned_run / "checkpoints" / f"step_{SAVED_STEPS:08d}"
    index = PieceIndex(path, ["rank_00000.pt"])
    scalars = saved_scalars(json.loads((path / "metadata.json").read_text()))
    with pytest.raises(CheckpointError, match=r"embedding\.position.* \(16, 32\) in the checkpoint but \(32, 32\)"):
        restore(trainer.chunks, trainer.optimizer, trainer.groups, index, scalars)


# ---- every ModelConfig field, one by one, on resume and on train.init_from ---------------------------
# The fields that change no tensor, which a checkpoint may differ in (reviewed here, not read from the code).
EXEMPT = {"hidden_dropout", "attention_dropout", "init_std", "make_vocab_size_divisible_by", "prefix_attention"}
# field -> (the saved run's model overrides, this run's other value of the field)
CHANGES = {
    "family": ({}, "prefixlm"),  # refused on resume; a fine-tune may change it (the same weights)
    "num_layers": ({}, 3),
    "hidden_size": ({}, 48),
    "num_heads": ({}, 8),  # the same tensor shapes: only what the qkv rows mean changes
    "ffn_hidden_size": ({}, 64),
    "vocab_size": ({}, 256),  # padded to 256 either way: only the real rows change
    "seq_length": ({}, 32),  # the learned position table's rows (max_position_embeddings unset)
    "max_position_embeddings": ({}, 64),
    "position_embedding": ({}, "rotary"),
    "rotary_base": ({"position_embedding": "rotary"}, 500.0),
    "norm_eps": ({}, 1e-6),
    "hidden_dropout": ({}, 0.1),
    "attention_dropout": ({}, 0.1),
    "init_std": ({}, 0.05),
    "make_vocab_size_divisible_by": ({}, 8),
    "prefix_attention": ({"family": "prefixlm"}, "dense"),
    "document_mask": ({}, True),  # refused on resume (other masks and positions); a fine-tune may change it
    "norm": ({}, "rmsnorm"),
    "mlp": ({}, "swiglu"),
    "num_kv_heads": ({}, 2),
    "head_dim": ({}, 16),  # 8 by default (32 / 4)
    "bias": ({}, False),
    "qkv_bias": ({}, False),
    "tie_embeddings": ({}, False),
    "rope_scaling": ({"position_embedding": "rotary"}, "linear"),
    "rope_factor": ({"position_embedding": "rotary", "rope_scaling": "linear", "rope_factor": 2.0}, 4.0),
    **{name: ({"position_embedding": "rotary", "rope_scaling": "llama3", "rope_factor": 2.0,
               "rope_original_max_positions": 32}, value)
       for name, value in (("rope_low_freq_factor", 2.0), ("rope_high_freq_factor", 8.0),
                           ("rope_original_max_positions", 16))},
    **{name: ({"position_embedding": "rotary", "rope_scaling": "yarn", "rope_factor": 2.0,
               "rope_original_max_positions": 32}, value)
       for name, value in (("rope_attention_factor", 1.5), ("rope_beta_fast", 16.0), ("rope_beta_slow", 2.0))},
}


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory):
    """A saved run per model base (trained once, on first use), by its overrides."""
    runs: dict[str, Path] = {}

    def get(base: dict) -> Path:
        key = json.dumps(base, sort_keys=True)
        if key not in runs:
            runs[key] = tmp_path_factory.mktemp("base")
            train_and_save(runs[key], make_config(**base))
        return runs[key]

    return get


def test_the_exempt_model_fields_are_the_reviewed_ones() -> None:
    assert set(UNCHECKED_MODEL_FIELDS) == EXEMPT and all(UNCHECKED_MODEL_FIELDS.values())
    assert set(MODEL_FIELDS) == {f.name for f in dataclasses.fields(ModelConfig)} - EXEMPT


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(ModelConfig)])
def test_each_model_field_is_checked_on_resume_and_init_from(name: str, saved_runs, tmp_path: Path) -> None:
    """A field that changes a tensor, changed: resume and train.init_from refuse, naming it; a field that
    changes none (EXEMPT), changed: both load (a fine-tune may also change the family and document_mask)."""
    assert name in CHANGES, f"model.{name} is new: add a changed value for it to CHANGES (and EXEMPT if it changes no tensor)"
    base, value = CHANGES[name]
    run_dir = saved_runs(base)
    changed = make_config(**{**base, name: value})
    assert getattr(make_config(**base).model, name) != value
    finetune = make_config(**{**base, name: value})
    finetune.train.init_from = str(run_dir)
    if name in EXEMPT:
        assert resume(run_dir, changed)[1] == SAVED_STEPS
    else:
        with pytest.raises(CheckpointError, match=f"(?s)different model.*model\\.{name}"):
            resume(run_dir, changed)
    if name in EXEMPT or name in ("family", "document_mask"):
        assert check_init_from(finetune) == run_dir / "checkpoints" / f"step_{SAVED_STEPS:08d}"
        assert Checkpointer(build_trainer(finetune, ParallelGroups.single(), None), tmp_path).start() == 0
    else:
        for attempt in (lambda: check_init_from(finetune),  # the CLI's check before any process group
                        lambda: Checkpointer(build_trainer(finetune, ParallelGroups.single(), None), tmp_path).start()):
            with pytest.raises(CheckpointError, match=f"(?s)holds another model .*model\\.{name}"):
                attempt()


def test_a_field_missing_from_an_older_checkpoint_compares_as_its_default() -> None:
    saved = dataclasses.asdict(ModelConfig())
    del saved["norm_eps"]
    assert model_differences(saved, dataclasses.asdict(ModelConfig())) == []
    assert model_differences(saved, dataclasses.asdict(ModelConfig(norm_eps=1e-6))) == [
        "model.norm_eps: checkpoint 1e-05, this run 1e-06"]


# ---- 8: loading a checkpoint never runs code from it ------------------------------------------------
class _WritesMarker:
    """Unpickling this calls open(marker, "w"): what a hostile checkpoint file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _plant(checkpoint: Path, marker: Path) -> Path:
    """Replace rank 0's file by a payload carrying the marker writer, and fix the metadata to match it."""
    file = checkpoint / "rank_00000.pt"
    payload = torch.load(file, weights_only=True)
    payload["rng"]["extra"] = _WritesMarker(marker)
    torch.save(payload, file)
    meta_path = checkpoint / "metadata.json"
    metadata = json.loads(meta_path.read_text())
    metadata["files"][file.name].update(bytes=file.stat().st_size, sha256=hashlib.sha256(file.read_bytes()).hexdigest())
    meta_path.write_text(json.dumps(metadata))
    return file


def test_checkpoint_files_hold_only_tensors_and_plain_types(learned_run: Path) -> None:
    payload = torch.load(learned_run / "checkpoints" / f"step_{SAVED_STEPS:08d}" / "rank_00000.pt", weights_only=True)
    assert payload["rank"] == 0 and payload["pieces"] and torch.is_tensor(payload["rng"]["replicated"])


def test_a_pickle_payload_is_refused_at_resume_not_run(tmp_path: Path) -> None:
    config = make_config()
    file = _plant(train_and_save(tmp_path, config), tmp_path / "marker")
    with pytest.raises(CheckpointError, match=rf"{file} is not a plain megalm checkpoint file: it asks for .*open"):
        resume(tmp_path, config)
    assert not (tmp_path / "marker").exists()


def test_a_pickle_payload_is_refused_by_convert_not_run(tmp_path: Path, capsys) -> None:
    from megalm.cli import main

    file = _plant(train_and_save(tmp_path, make_config()), tmp_path / "marker")
    assert main(["convert", str(file.parent), str(tmp_path / "model.pt")]) != 0
    assert f"{file} is not a plain megalm checkpoint file" in capsys.readouterr().err
    assert not (tmp_path / "marker").exists() and not (tmp_path / "model.pt").exists()


# ---- 2: the data continues at the checkpoint's consumed_samples --------------------------------------
def _logged(run) -> tuple[object, list[str]]:
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    get_logger().addHandler(handler)
    try:
        return run(), messages
    finally:
        get_logger().removeHandler(handler)


def test_resume_with_another_global_batch_continues_at_the_consumed_samples(tmp_path: Path) -> None:
    """8 samples a step for 2 steps, then 4 a step: step 3 reads samples 16..19 (not 8..11), and so on."""
    config = make_config()
    config.train.global_batch_size = 8
    train_and_save(tmp_path, config)  # consumed_samples 16
    config.train.global_batch_size, config.train.steps = 4, SAVED_STEPS + 2
    config.checkpoint.interval_steps = 1
    (trainer, step), messages = _logged(lambda: resume(tmp_path, config))
    assert step == SAVED_STEPS
    reference = build_sampler(config, build_sources(config).train, 0, 1)
    for offset, first in enumerate((16, 20)):
        got, want = trainer.data.micro_batches(step + offset), reference.micro_batches_at(first)
        assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(got, want, strict=True))
    assert any("train.global_batch_size changed from 8 to 4: the data continues at sample 16" in m for m in messages)
    trainer.fit(start_step=step, checkpointer=Checkpointer(trainer, tmp_path))
    saved = json.loads((tmp_path / "checkpoints" / f"step_{SAVED_STEPS + 2:08d}" / "metadata.json").read_text())
    assert saved["consumed_samples"] == 16 + 2 * 4


def test_resume_with_another_seed_says_the_data_order_changes(learned_run: Path) -> None:
    config = make_config()
    config.train.seed = 10
    (_, step), messages = _logged(lambda: resume(learned_run, config))
    assert step == SAVED_STEPS
    assert any("train.seed changed from 9 to 10: the data order changes" in m for m in messages), messages
    _, messages = _logged(lambda: resume(learned_run, make_config()))
    assert not any("changed from" in m for m in messages), messages
