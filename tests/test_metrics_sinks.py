"""Observability: the documented metrics.jsonl schema, TensorBoard event files, Weights & Biases
(a fake module), the config errors when either package is missing, and the step line's ETA."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest

from megalm.cli import check_before_start, main
from megalm.config import ConfigError, load_config, validate
from megalm.distributed import ParallelGroups
from megalm.metrics import TENSORBOARD_TAGS, build_metrics_writer, format_duration, read_metrics
from megalm.testing import log_messages
from megalm.train import build_trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
# Three steps, evaluation at step 2 and at the last step: every step-record key appears.
RUN = ["train.steps=3", "optim.warmup_steps=1", "train.eval_interval=2", "log.interval=1"]


def _train(run_dir: Path, *overrides: str) -> list[dict]:
    config = load_config(TINY, [*RUN, *overrides])
    trainer = build_trainer(config, ParallelGroups.single(), run_dir)
    try:
        return trainer.fit()
    finally:
        trainer.metrics.close()


def _documented(table: str) -> list[str]:
    """The keys of one table of docs/metrics.md (the rows under its '## table' heading)."""
    text = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    section = text.split(f"## {table}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", section, re.MULTILINE)


def _matches(key: str, documented: list[str]) -> bool:
    return any(re.fullmatch(re.sub(r"[A-Z]+", "[a-z0-9_]+", pattern), key) for pattern in documented)


def test_documented_jsonl_keys_are_exactly_what_the_trainer_writes(tmp_path: Path) -> None:
    _train(tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    start, steps = lines[0], lines[1:]
    assert start["event"] == "start" and sorted(start) == sorted(_documented("Start record"))
    documented = _documented("Step record")
    fixed = [key for key in documented if "/" not in key]
    written = set().union(*(record.keys() for record in steps))
    only_compiled = {"compile_s"}  # train.compile runs only (tests/model/test_compile.py checks it is written)
    assert sorted(written) == sorted(set(fixed) - only_compiled)  # every documented key written, none undocumented
    assert "valid_loss" not in steps[0] and "valid_loss" in steps[1] and "valid_loss" in steps[2]
    # comm/GROUP/OP/... rows: the counter's flat keys fit them
    assert _matches("comm/tp/all_reduce/calls", documented) and _matches("comm/dp/all_gather/bytes", documented)
    assert not _matches("comm/tp/all_reduce/seconds", documented)
    # the TensorBoard tag table names every numeric key and the code's mapping
    tags = dict(re.findall(r"^\| `([^`]+)` \| `([^`]+)` \|$", (ROOT / "docs" / "metrics.md").read_text(), re.MULTILINE))
    assert tags == TENSORBOARD_TAGS
    assert set(tags) == set(fixed) - {"step", "straggler_host"}  # a hostname is no scalar


def test_tensorboard_event_files_hold_the_logged_scalars(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard extra: pip install 'megalm[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(tmp_path, "log.tensorboard=true")
    records = read_metrics(tmp_path / "metrics.jsonl")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for key, tag in [("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm"),
                     ("tokens_per_s", "perf/tokens_per_s"), ("peak_memory_gb", "memory/peak_gb"),
                     ("loss_scale", "train/loss_scale"), ("eta_s", "perf/eta_s")]:
        assert tag in tags, tag
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2, 3]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in records], rel=1e-6)
    valid = events.Scalars("valid/loss")
    assert [(s.step, s.value) for s in valid] == [(r["step"], pytest.approx(r["valid_loss"], rel=1e-6))
                                                  for r in records if "valid_loss" in r]
    assert "perf/mfu" not in tags and "memory/peak_reserved_gb" not in tags  # null on CPU: not written
    other_rank = build_metrics_writer(load_config(TINY, ["log.tensorboard=true"]).log, tmp_path / "r1", rank=1)
    assert other_rank.path is None and other_rank.sinks == [] and not (tmp_path / "r1").exists()  # rank 0 only


def _fake_wandb(calls: list) -> types.ModuleType:
    module = types.ModuleType("wandb")

    def init(**kwargs):
        calls.append(("init", kwargs))
        return types.SimpleNamespace(id=kwargs["id"] or "run123")

    module.init = init
    module.log = lambda data, step: calls.append(("log", step, dict(data)))
    module.finish = lambda: calls.append(("finish",))
    return module


def test_wandb_gets_each_step_and_a_resumed_run_continues_its_id(tmp_path: Path, monkeypatch) -> None:
    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    records = _train(tmp_path, "log.wandb_project=megalm-test")
    name, init = calls[0]
    assert name == "init" and init["project"] == "megalm-test" and init["id"] is None
    assert init["name"] == tmp_path.name and init["config"]["train"]["steps"] == 3 and init["resume"] == "allow"
    logs = [call for call in calls if call[0] == "log"]
    assert [step for _, step, _ in logs] == [1, 2, 3]
    assert [data["train/loss"] for _, _, data in logs] == [r["loss"] for r in records]
    assert "valid/loss" in logs[1][2] and "perf/mfu" not in logs[0][2]  # null values are left out
    assert calls[-1] == ("finish",)
    assert (tmp_path / "wandb_id").read_text().strip() == "run123"
    calls.clear()
    _train(tmp_path, "log.wandb_project=megalm-test")
    assert calls[0][1]["id"] == "run123"


@pytest.mark.parametrize(
    "override, package, message",
    [
        ("log.tensorboard=true", "tensorboard",
         "log.tensorboard=true needs the tensorboard package: pip install 'megalm[tensorboard]'"),
        ("log.wandb_project=p", "wandb", "log.wandb_project='p' needs the wandb package: pip install wandb"),
    ],
)
def test_a_missing_package_is_one_config_error_line(override, package, message, monkeypatch, capsys) -> None:
    """`megalm check` / `train` (and the launcher, through check_before_start) refuse a sink whose package is
    missing; loading the config does not, so eval, generate and plan of a run's config work without it."""
    monkeypatch.setitem(sys.modules, package, None)  # import fails
    config = load_config(TINY, [override])
    validate(config, 1)  # what megalm eval and megalm generate do with a run's config
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.log.check_packages()
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_before_start(config, Path("unused-run-dir"))
    assert main(["check", str(TINY), override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megalm: config error: ") and message in err and "\n" not in err
    assert main(["plan", str(TINY), override, "--gpus", "1"]) == 0


def test_step_line_shows_an_eta(tmp_path: Path) -> None:
    with log_messages() as messages:
        records = _train(tmp_path, "train.steps=4")
    lines = [message for message in messages if message.startswith("step ")]
    assert len(lines) == 4 and all(re.search(r"\| ETA \d+(s|m\d\ds)$", line) for line in lines)
    assert records[-1]["eta_s"] == 0.0
    assert records[0]["eta_s"] == pytest.approx(3 * records[0]["step_time_s"])
    assert 0 < records[2]["eta_s"] < 10 * max(r["step_time_s"] for r in records[1:3])


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0.4, 45, 725, 3 * 3600 + 7 * 60 + 20, 2 * 86400 + 4 * 3600)] == [
        "0s", "45s", "12m05s", "3h07m", "2d04h"
    ]


def test_a_resumed_run_replaces_the_tensorboard_steps_after_its_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard extra: pip install 'megalm[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megalm.metrics import TensorBoardSink

    first = TensorBoardSink(tmp_path)
    for step in range(1, 5):  # the interrupted run logged steps 1-4; its checkpoint was at step 2
        first.write({"step": step, "loss": float(step)})
    first.close()
    resumed = TensorBoardSink(tmp_path)
    for step in (3, 4):
        resumed.write({"step": step, "loss": 10.0 + step})
    resumed.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]
