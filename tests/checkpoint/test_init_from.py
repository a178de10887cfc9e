"""train.init_from: a fine-tune starts from a checkpoint's weights alone, at any layout and precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megalm.checkpoint import Checkpointer, CheckpointError
from megalm.checkpoint.state import PieceIndex, named_params, optimizer_view
from megalm.checkpoint.weights import check_init_from, find_checkpoint, init_differences
from megalm.cli import check_before_start, main
from megalm.config import Config, ConfigError, config_to_dict, ModelConfig, OptimConfig, ParallelConfig, TrainConfig, validate
from megalm.data.pipeline import build_sampler, build_sources
from megalm.distributed import ParallelGroups, build_parallel_groups
from megalm.metrics import read_metrics
from megalm.optim import lr_at
from megalm.testing import log_messages, run_distributed
from megalm.topology import Topology
from megalm.train import build_trainer

ROOT = Path(__file__).resolve().parents[2]
SOURCE_STEPS = 8


def make_config(tp=1, pp=1, dp=1, zero=0, init_from=None, precision="fp32", **model) -> Config:
    fields = dict(num_layers=2, hidden_size=32, num_heads=4, vocab_size=200, seq_length=16)
    fields.update(model)
    return Config(
        model=ModelConfig(**fields),
        parallel=ParallelConfig(tp=tp, pp=pp, dp=dp, zero_stage=zero),
        optim=OptimConfig(lr=1e-2, warmup_steps=1),
        train=TrainConfig(steps=SOURCE_STEPS, micro_batch_size=2, global_batch_size=4, seed=9, precision=precision,
                          init_from=None if init_from is None else str(init_from)),
    )


def finetune_config(init_from, **kwargs) -> Config:
    """A fine-tune: another learning rate and schedule, 2 steps, the same data stream from sample 0."""
    config = make_config(init_from=init_from, **kwargs)
    config.optim = OptimConfig(lr=1e-3, warmup_steps=2, decay_style="linear")
    config.train.steps = 2
    return config


def train_source(run_dir: Path, config: Config, groups: ParallelGroups = None) -> Path:
    """Train `config` for SOURCE_STEPS and save at the end; the checkpoint's path."""
    trainer = build_trainer(config, groups or ParallelGroups.single(), None)
    trainer.fit(steps=SOURCE_STEPS, checkpointer=Checkpointer(trainer, run_dir))
    return run_dir / "checkpoints" / f"step_{SOURCE_STEPS:08d}"


def first_batch_loss(trainer, config: Config) -> float:
    """`trainer`'s model evaluated on the first global batch of `config`'s training data."""
    trainer.valid = build_sampler(config, build_sources(config).train, 0, 1)
    return trainer.evaluate()


def source_evaluation(source_run: Path, source: Config, finetune: Config) -> tuple[float, float]:
    """(the source checkpoint's loss, a fresh model's loss) on the fine-tune's first batch, at 1x1x1."""
    trained = build_trainer(source, ParallelGroups.single(), None)
    assert Checkpointer(trained, source_run).resume() == SOURCE_STEPS  # the ordinary (resharding) resume
    fresh = build_trainer(source, ParallelGroups.single(), None)
    return first_batch_loss(trained, finetune), first_batch_loss(fresh, finetune)


def full_weights(checkpoint: Path, kind: str = "param") -> dict[str, torch.Tensor]:
    index = PieceIndex(checkpoint, json.loads((checkpoint / "metadata.json").read_text())["files"])
    return {name: index.full(name, kind) for name, k in index.pieces if k == kind}


def logged(run) -> tuple[object, list[str]]:
    with log_messages() as messages:
        return run(), messages


@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> Path:
    """An fp32 LM trained at 1x1x1 for 8 steps; its run directory."""
    run_dir = tmp_path_factory.mktemp("source")
    train_source(run_dir, make_config())
    return run_dir


# ---- the first loss is the source's evaluation loss, at another layout ------------------------------------
def _finetune_worker(rank: int, world_size: int, root: str, scenario: str) -> dict:
    root_dir = Path(root)
    cpu = torch.device("cpu")
    if scenario == "1x1x1->2x2x1":  # the source was trained in the test process; its checkpoint directory named
        groups = build_parallel_groups(Topology(tp=2, pp=2, dp=1), rank, cpu)
        config = finetune_config(find_checkpoint(root_dir / "source"), tp=2, pp=2)
    else:  # a source trained here at tp 2 x dp 2, fine-tuned at pp 2 x dp 2 with ZeRO-1; its run directory named
        train_source(root_dir / "source", make_config(tp=2, dp=2), build_parallel_groups(Topology(2, 1, 2), rank, cpu))
        groups = build_parallel_groups(Topology(tp=1, pp=2, dp=2), rank, cpu)
        config = finetune_config(root_dir / "source", pp=2, dp=2, zero=1)
    trainer = build_trainer(config, groups, None)
    start = Checkpointer(trainer, root_dir / "finetune").start()
    fresh_optimizer = not optimizer_view(trainer.optimizer).inner.state
    records = trainer.fit(steps=1, start_step=start)
    return {"start": start, "fresh_optimizer": fresh_optimizer, "loss": records[0]["loss"], "lr": records[0]["lr"]}


@pytest.mark.parametrize("scenario", [
    "1x1x1->2x2x1",
    # slow: 15 s more; the dp and ZeRO-1 pieces' resharding itself is tested faster in tests/test_checkpoint.py
    pytest.param("2x1x2->1x2x2-zero1", marks=pytest.mark.slow),
])
def test_first_loss_equals_the_source_evaluation_at_another_layout(scenario: str, source_run: Path,
                                                                    tmp_path: Path) -> None:
    if scenario.startswith("1x1x1"):
        (tmp_path / "source").symlink_to(source_run)
    results = run_distributed(_finetune_worker, 4, str(tmp_path), scenario, timeout=240)
    assert len({json.dumps(r, sort_keys=True) for r in results}) == 1  # every rank saw the same step
    source = make_config() if scenario.startswith("1x1x1") else make_config(tp=2, dp=2)
    finetune = finetune_config(None)
    expected, fresh = source_evaluation(tmp_path / "source", source, finetune)
    assert abs(expected - fresh) > 0.1  # the source's weights are far from a fresh model's on this batch
    got = results[0]
    assert got["start"] == 0 and got["fresh_optimizer"]
    assert got["lr"] == lr_at(0, finetune.optim, 2)  # the fine-tune's own schedule, from its step 0
    assert got["loss"] == pytest.approx(expected, rel=1e-5)


# ---- resume wins over init_from; --no-resume starts over from it -----------------------------------------
def test_a_run_with_its_own_checkpoint_resumes_instead(source_run: Path, tmp_path: Path) -> None:
    config = finetune_config(source_run)
    trainer = build_trainer(config, ParallelGroups.single(), None)
    checkpointer = Checkpointer(trainer, tmp_path)
    assert checkpointer.start() == 0
    trainer.fit(start_step=0, checkpointer=checkpointer)  # saves step 2 of the fine-tune
    own = full_weights(tmp_path / "checkpoints" / "step_00000002")
    source = full_weights(find_checkpoint(source_run))

    def weights(trainer) -> dict[str, torch.Tensor]:
        return {name: param.detach().clone() for name, param in named_params(trainer.chunks)}

    resumed = build_trainer(config, ParallelGroups.single(), None)
    step, messages = logged(lambda: Checkpointer(resumed, tmp_path).start())
    assert step == 2
    assert any(f"train.init_from={source_run} not used: this run directory has a checkpoint of its own" in m
               for m in messages), messages
    assert all(torch.equal(value, own[name]) for name, value in weights(resumed).items())
    check_before_start(config, tmp_path)  # resuming: init_from is not even checked
    restarted = build_trainer(config, ParallelGroups.single(), None)
    step, messages = logged(lambda: Checkpointer(restarted, tmp_path).start(resume=False))
    assert step == 0
    assert any(m.startswith(f"initialised the model weights from {find_checkpoint(source_run)} (step 8 of its run")
               for m in messages), messages
    assert all(torch.equal(value, source[name]) for name, value in weights(restarted).items())
    assert not any(torch.equal(value, own[name]) for name, value in weights(restarted).items())


def test_megalm_train_fine_tunes_then_resumes_its_own_checkpoint(source_run: Path, tmp_path: Path, capsys) -> None:
    """Through the CLI: a fine-tune starts at step 0 from init_from; started again it resumes its own checkpoint."""
    run_dir = tmp_path / "ft"
    args = ["train", str(ROOT / "configs" / "tiny.yaml"), "model.hidden_size=32", "model.vocab_size=200",
            "model.seq_length=16", "train.micro_batch_size=2", "train.global_batch_size=4", "optim.warmup_steps=1",
            "optim.decay_steps=3", "train.steps=2",
            f"train.init_from={source_run}", "--run-dir", str(run_dir)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"initialised the model weights from {find_checkpoint(source_run)} (step 8 of its run" in out
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "step" in r] == [1, 2]
    assert main(args[:-3] + ["train.steps=3", *args[-3:]]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "not used: this run directory has a checkpoint of its own" in out
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "step" in r][-1] == 3


# ---- precision: weights are read in the run's precision --------------------------------------------------
def test_bf16_finetune_of_fp32_weights_keeps_them_as_masters(source_run: Path, tmp_path: Path) -> None:
    trainer = build_trainer(finetune_config(source_run, precision="bf16"), ParallelGroups.single(), None)
    assert Checkpointer(trainer, tmp_path).start() == 0
    source = full_weights(find_checkpoint(source_run))
    view = optimizer_view(trainer.optimizer)
    masters = {id(segment.param): master for master, segment in zip(view.masters, view.segments)}
    for name, param in named_params(trainer.chunks):
        assert param.dtype == torch.bfloat16
        assert torch.equal(param, source[name].to(torch.bfloat16)), name
        assert torch.equal(masters[id(param)].view_as(param), source[name]), name  # exact fp32, not the rounded weight


def test_fp32_finetune_of_a_bf16_run_starts_from_its_masters(tmp_path: Path) -> None:
    checkpoint = train_source(tmp_path / "source", make_config(precision="bf16"))
    masters, weights = full_weights(checkpoint, "master"), full_weights(checkpoint)
    assert any(not torch.equal(masters[n], weights[n].float()) for n in masters)  # the masters carry more bits
    trainer = build_trainer(finetune_config(checkpoint), ParallelGroups.single(), None)
    assert Checkpointer(trainer, tmp_path / "ft").start() == 0
    for name, param in named_params(trainer.chunks):
        assert param.dtype == torch.float32 and torch.equal(param, masters[name]), name


# ---- another data kind and family: the weights are the same model's ---------------------------------------
def test_an_lm_fine_tunes_as_a_prefixlm_on_pairs(tmp_path: Path) -> None:
    from megalm.data.tokenizer import train_tokenizer

    lines = [f"{a} plus {b} is {a + b}" for a in range(30) for b in range(30)]
    (tmp_path / "text.txt").write_text("\n".join(lines), encoding="utf-8")
    tokenizer = train_tokenizer([tmp_path / "text.txt"], tmp_path / "tok", vocab_size=280)
    checkpoint = train_source(tmp_path / "source", make_config(vocab_size=280))  # synthetic LM data
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prefix": f"{a} plus {b} is", "target": f" {a + b}"}) + "\n"
                             for a in range(12) for b in range(12)), encoding="utf-8")
    config = finetune_config(tmp_path / "source", vocab_size=280, family="prefixlm")
    config.data.kind, config.data.paths, config.data.tokenizer = "pairs", [str(pairs)], str(tokenizer)
    check_before_start(config, tmp_path / "ft")
    trainer = build_trainer(config, ParallelGroups.single(), None)
    step, messages = logged(lambda: Checkpointer(trainer, tmp_path / "ft").start())
    assert step == 0
    assert any("model.family lm -> prefixlm, data.kind synthetic -> pairs" in m for m in messages), messages
    source = full_weights(checkpoint)
    assert all(torch.equal(param, source[name]) for name, param in named_params(trainer.chunks))
    records = trainer.fit(start_step=0)
    assert len(records) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


# ---- mistakes: one line, before any training -------------------------------------------------------------
def test_another_model_shape_is_refused_naming_every_field(source_run: Path) -> None:
    config = finetune_config(source_run, hidden_size=64, ffn_hidden_size=128, position_embedding="learned")
    with pytest.raises(CheckpointError) as raised:
        check_init_from(config)
    message = str(raised.value)
    assert "\n" not in message
    assert "model.hidden_size: checkpoint 32, this run 64" in message
    assert "MLP hidden size" not in message  # 4 x 32 = 128 = the explicit 128: the same size
    assert "set these to the checkpoint's values" in message
    config = finetune_config(source_run, num_layers=4, vocab_size=256, seq_length=32)
    message = str(pytest.raises(CheckpointError, check_init_from, config).value)
    for expected in ("model.num_layers: checkpoint 2, this run 4", "model.vocab_size: checkpoint 200, this run 256",
                     "learned position table rows (model.max_position_embeddings, or model.seq_length when unset): "
                     "checkpoint 16, this run 32"):
        assert expected in message, message


def test_another_tokenizer_is_refused() -> None:
    class Tok:
        hash = "b" * 64

    config = make_config()
    metadata = {"config": config_to_dict(config), "tokenizer_hash": "a" * 64}
    assert init_differences(metadata, config) == []
    assert init_differences(metadata, config, Tok()) == [
        "tokenizer hash: checkpoint aaaaaaaaaaaa, this run bbbbbbbbbbbb (data.tokenizer)"
    ]


@pytest.mark.parametrize("make, expected", [
    (lambda tmp: tmp / "missing", r"train.init_from=.*missing does not exist: give a checkpoint directory"),
    (lambda tmp: tmp, r"train.init_from=.* holds no complete checkpoint \(none in .*\): give a checkpoint directory"),
    (lambda tmp: (tmp / "f").write_text("x") and tmp / "f", r"train.init_from=.*f is a file, not a directory"),
    (lambda tmp: (tmp / "step_00000005").mkdir() or tmp / "step_00000005",
     r"train.init_from=.*step_00000005 is an incomplete checkpoint \(metadata.json is missing\)"),
])
def test_a_path_without_a_checkpoint_is_refused(make, expected: str, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=expected):
        find_checkpoint(make(tmp_path))


@pytest.mark.parametrize("init_from, expected", [
    ("missing", "does not exist"),
    ("source", "holds another model than this run's: model.hidden_size: checkpoint 32, this run 64; "),
])
def test_the_cli_refuses_before_training(init_from: str, expected: str, source_run: Path, tmp_path: Path,
                                         capsys) -> None:
    path = source_run if init_from == "source" else tmp_path / init_from
    run_dir = tmp_path / "run"
    code = main(["train", str(ROOT / "configs" / "tiny.yaml"), f"train.init_from={path}", "--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("megalm: error: train.init_from") and expected in err
    assert len(err.strip().splitlines()) == 1
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()


def test_config_checks(source_run: Path) -> None:
    with pytest.raises(ConfigError, match=r"train.init_from must be a path or null, got ''"):
        TrainConfig(init_from="")
    config = finetune_config(source_run)
    config.train.engine = "deepspeed"
    validate(config, 1)  # the DeepSpeed engine loads train.init_from too (tests/test_deepspeed.py)
