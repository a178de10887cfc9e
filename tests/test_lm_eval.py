"""The lm-evaluation-harness adapter (megalm/eval/harness.py): a harness task defined here (local
JSONL, no network) runs on a tiny checkpoint through the registered `megalm` model and reports the
accuracy megalm's own Evaluator gives; the three request kinds equal megalm's own functions."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'megalm[lmeval]')")
for _name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # nothing may try the network
    os.environ[_name] = "1"

from lm_eval.api.instance import Instance  # noqa: E402

from megalm.checkpoint import Checkpointer  # noqa: E402
from megalm.cli import main  # noqa: E402
from megalm.config import Config, ConfigError, DataConfig, ModelConfig, OptimConfig, TrainConfig  # noqa: E402
from megalm.data.tokenizer import train_tokenizer  # noqa: E402
from megalm.distributed import ParallelGroups  # noqa: E402
from megalm.eval.run import load_evaluator  # noqa: E402
from megalm.eval.tasks import Example  # noqa: E402
from megalm.generate import Sampling, encode_prompt, generate  # noqa: E402
from megalm.testing import run_distributed  # noqa: E402
from megalm.train import build_trainer  # noqa: E402

PEOPLE = ("Mara", "Tobin", "Lena", "Oskar", "Nina", "Hugo", "Ada", "Milo", "Iris", "Jonas")
TOWNS = ("Bluestone", "Pinewood", "Redrock", "Goldhill")
DOCS = [{"question": f"{name} lives in", "choices": list(TOWNS), "label": i % len(TOWNS)}
        for i, name in enumerate(PEOPLE)]
# Every task reads the same local JSONL (no hub download); only the request kind and its fields differ.
TASK_HEADER = """task: megalm_towns{suffix}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {{data}}
  cache_dir: {{cache}}
test_split: test
output_type: {output_type}
"""
ACCURACY = """metric_list:
  - metric: {metric}
    aggregation: mean
    higher_is_better: true
"""
TASK = TASK_HEADER.format(suffix="", output_type="multiple_choice") + """doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
""" + ACCURACY.format(metric="acc")
ROLLING_TASK = TASK_HEADER.format(suffix="_text", output_type="loglikelihood_rolling") + """doc_to_text: ""
doc_to_target: "{{{{question}}}} {{{{choices[label]}}}}. {{{{question}}}} {{{{choices[0]}}}}."
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
GENERATION_TASK = TASK_HEADER.format(suffix="_say", output_type="generate_until") + """doc_to_text: "{{{{question}}}}"
doc_to_target: " {{{{choices[label]}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 4
  do_sample: false
""" + ACCURACY.format(metric="exact_match")
ALL_KINDS = "megalm_towns,megalm_towns_text,megalm_towns_say"  # loglikelihood, rolling and generation requests


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A tiny LM with a real tokenizer, 6 steps on synthetic tokens; a harness task file beside it."""
    root = tmp_path_factory.mktemp("lmeval")
    text = "".join(f"{name} lives in {town}. {name} likes {town}.\n" for name in PEOPLE for town in TOWNS)
    (root / "text.txt").write_text(text * 3, encoding="utf-8")
    tokenizer = train_tokenizer([root / "text.txt"], root / "tok", vocab_size=320)
    config = Config(
        model=ModelConfig(num_layers=2, hidden_size=32, num_heads=4, vocab_size=320, seq_length=16),
        optim=OptimConfig(lr=1e-2, warmup_steps=1),
        train=TrainConfig(steps=6, micro_batch_size=2, global_batch_size=4, seed=5, eval_batches=1),
        data=DataConfig(tokenizer=str(tokenizer)),
    )
    trainer = build_trainer(config, ParallelGroups.single(), None)
    trainer.fit(checkpointer=Checkpointer(trainer, root / "run"))
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    (root / "tasks").mkdir()
    for name, text in (("towns", TASK), ("towns_text", ROLLING_TASK), ("towns_say", GENERATION_TASK)):
        (root / "tasks" / f"{name}.yaml").write_text(text.format(data=root / "docs.jsonl", cache=root / "hf"))
    return {"root": root, "run": root / "run", "tasks": root / "tasks"}


def test_a_harness_task_reports_megalms_own_accuracy(tiny) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import megalm.eval.harness  # noqa: F401  registers the model name "megalm"

    results = lm_eval.simple_evaluate(
        model="megalm", model_args=f"path={tiny['run']},batch_size=8", tasks=["megalm_towns"],
        task_manager=TaskManager(include_path=str(tiny["tasks"]), include_defaults=False), log_samples=True,
    )
    harness = results["results"]["megalm_towns"]["acc,none"]
    evaluator = load_evaluator(tiny["run"], batch_size=8)
    examples = [Example(tuple((c,) for c in d["choices"]), d["label"], context=d["question"]) for d in DOCS]
    own = evaluator.score_task(examples)
    assert harness == pytest.approx(own["sum"], abs=1e-12)
    # and request by request: the harness's log-likelihoods are megalm's
    samples = results["samples"]["megalm_towns"]
    expected = evaluator.loglikelihoods([evaluator.encode_pair(d["question"], " " + town)
                                         for d in DOCS for town in d["choices"]])
    got = [float(r[0]) for s in sorted(samples, key=lambda s: s["doc_id"]) for r in s["filtered_resps"]]
    assert got == pytest.approx(expected, abs=1e-9)
    assert len(set(round(v, 6) for v in got)) > len(TOWNS)  # not a constant


def test_rolling_and_generation_requests_equal_megalms_functions(tiny) -> None:
    from megalm.eval.harness import MegalmLM

    evaluator = load_evaluator(tiny["run"], batch_size=4)
    lm = MegalmLM(evaluator=evaluator, batch_size=4)
    tokenizer = evaluator.tokenizer
    text = " ".join(f"{name} lives in Redrock." for name in PEOPLE[:4])  # longer than seq_length 16
    ids = [tokenizer.eos_id] + tokenizer.encode(text)
    assert len(ids) > 2 * 16
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    # reference: one request per token, each with as much preceding text as the window holds
    per_token = evaluator.loglikelihoods([(ids[max(0, i - 16):i], [ids[i]]) for i in range(1, len(ids))])
    windows = lm.rolling_windows(text)
    assert sum(len(c) for _, c in windows) == len(ids) - 1 and all(len(a) + len(c) <= 17 for a, c in windows)
    assert len(windows) > 2 and all(len(a) + len(c) == 17 for a, c in windows[1:])  # as much context as fits
    assert rolling[0] == pytest.approx(sum(evaluator.loglikelihoods(windows)), abs=1e-9)
    first = windows[0][1]  # the first window predicts its tokens from all the text before: per-token equal
    assert sum(per_token[:len(first)]) == pytest.approx(sum(evaluator.loglikelihoods(windows[:1])), abs=1e-4)

    prompt = "Lena lives in"
    out = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": ["\n"], "max_gen_toks": 6}), 0)])
    encoded = encode_prompt(tokenizer, prompt, False)
    own = generate(evaluator.trainer.chunks, evaluator.trainer.groups, [encoded],
                   Sampling(max_new_tokens=6, stop_id=tokenizer.eos_id))[0]
    assert out[0] == tokenizer.decode(own).split("\n")[0]

    context, continuation = evaluator.encode_pair(prompt, tokenizer.decode(own[:2]))
    (loglik, greedy), = lm.loglikelihood([Instance("loglikelihood", {}, (prompt, tokenizer.decode(own[:2])), 0)])
    assert loglik == pytest.approx(evaluator.loglikelihoods([(context, continuation)])[0], abs=1e-9)
    assert greedy == (continuation == own[:len(continuation)]) and greedy  # the greedy continuation is
    (_, greedy), = lm.loglikelihood([Instance("loglikelihood", {}, (prompt, " Zzz"), 0)])
    assert not greedy
    with pytest.raises(Exception, match="not supported"):
        lm.generate_until([Instance("generate_until", {}, (prompt, {"num_beams": 4}), 0)])


def test_megalm_eval_lm_eval_tasks_command(tiny, capsys) -> None:
    assert main(["eval", str(tiny["run"]), "--lm-eval-tasks", "megalm_towns", "--lm-eval-include",
                 str(tiny["tasks"]), "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    own = load_evaluator(tiny["run"]).score_task(
        [Example(tuple((c,) for c in d["choices"]), d["label"], context=d["question"]) for d in DOCS])
    assert line["eval"] == "lm_eval" and line["task"] == "megalm_towns"
    assert line["acc,none"] == pytest.approx(own["sum"], abs=1e-12)


def _lm_eval_lines(text: str) -> dict[str, dict]:
    """The `megalm eval --json` lm_eval result lines, by task."""
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return {line["task"]: line for line in lines if line["eval"] == "lm_eval"}


def _lm_eval_worker(rank: int, world_size: int, run: str, tasks: str, tp: int, pp: int) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["eval", run, "--lm-eval-tasks", ALL_KINDS, "--lm-eval-include", tasks, "--tp", str(tp),
                     "--pp", str(pp), "--batch-size", "4", "--limit", "5", "--json"]) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def one_process(tiny) -> dict[str, dict]:
    """`megalm eval --lm-eval-tasks` of the three request kinds in one process (it also fills the
    tasks' dataset cache before several ranks read it)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["eval", str(tiny["run"]), "--lm-eval-tasks", ALL_KINDS, "--lm-eval-include", str(tiny["tasks"]),
                     "--batch-size", "4", "--limit", "5", "--json"]) == 0
    return _lm_eval_lines(out.getvalue())


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 2), (1, 2)])  # 4 ranks: tp 2 x pp 2, then pp 2 x dp 2
def test_lm_eval_tasks_under_torchrun_score_as_one_process(tiny, one_process, tp: int, pp: int) -> None:
    """Every rank runs the model in its tp and pp groups and the dp replicas share the sequences and the
    generation batches; rank 0 alone reports, the scores of one process."""
    one = one_process
    outputs = run_distributed(_lm_eval_worker, 4, str(tiny["run"]), str(tiny["tasks"]), tp, pp, timeout=400)
    assert all(not _lm_eval_lines(text) for text in outputs[1:])  # rank 0 reports, once
    many = _lm_eval_lines(outputs[0])
    assert sorted(many) == sorted(one) == sorted(ALL_KINDS.split(","))
    for task, line in one.items():
        numbers = {key: value for key, value in line.items() if isinstance(value, float)}
        assert numbers and {k: v for k, v in many[task].items() if isinstance(v, float)} == pytest.approx(
            numbers, rel=1e-6, abs=1e-9), task
    assert 1.0 < one["megalm_towns_text"]["word_perplexity,none"] < math.inf  # a score that could differ


def test_lm_evals_default_cuda_device_runs_on_the_cpu_without_a_gpu(tiny, monkeypatch, caplog) -> None:
    # lm_eval's command line passes device="cuda:0" unless told otherwise; without CUDA megalm's model
    # once died inside torch.cuda. It runs on the CPU and says so; an unknown device is a clear error.
    from megalm.eval.harness import MegalmLM

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="megalm"):
        lm = MegalmLM(path=str(tiny["run"]), device="cuda:0", batch_size=4)
    assert lm.device == torch.device("cpu") and lm.evaluator.trainer.groups.device == torch.device("cpu")
    assert any("'cuda:0'" in r.message and "--device cpu" in r.message for r in caplog.records), caplog.text
    (loglik, _), = lm.loglikelihood([Instance("loglikelihood", {}, ("Lena lives in", " Redrock"), 0)])
    assert math.isfinite(loglik) and loglik < 0
    with pytest.raises(ConfigError, match="lm_eval device 'tpu'.*--device cpu"):
        MegalmLM(path=str(tiny["run"]), device="tpu")


@pytest.mark.slow  # lm_eval's command line indexes all its built-in tasks (about 7 s)
@pytest.mark.filterwarnings("ignore:'megalm.eval.harness' found in sys.modules")
def test_lm_evals_own_command_line_with_the_model_registered(tiny, monkeypatch) -> None:
    out = tiny["root"] / "harness-cli"
    monkeypatch.setattr(sys, "argv", ["lm_eval", "--model", "megalm", "--model_args", f"path={tiny['run']}",
                                      "--tasks", "megalm_towns", "--include_path", str(tiny["tasks"]),
                                      "--output_path", str(out)])
    runpy.run_module("megalm.eval.harness", run_name="__main__")
    written = json.loads(next(out.rglob("results*.json")).read_text())
    own = load_evaluator(tiny["run"]).score_task(
        [Example(tuple((c,) for c in d["choices"]), d["label"], context=d["question"]) for d in DOCS])
    assert written["results"]["megalm_towns"]["acc,none"] == pytest.approx(own["sum"], abs=1e-12)
