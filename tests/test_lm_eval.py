"""The lm-evaluation-harness adapter (megalm/eval/harness.py): a harness task defined here (local
JSONL, no network) runs on a tiny checkpoint through the registered `megalm` model and reports the
accuracy megalm's own Evaluator gives; the three request kinds equal megalm's own functions."""

from __future__ import annotations

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
from megalm.train import build_trainer  # noqa: E402

PEOPLE = ("Mara", "Tobin", "Lena", "Oskar", "Nina", "Hugo", "Ada", "Milo", "Iris", "Jonas")
TOWNS = ("Bluestone", "Pinewood", "Redrock", "Goldhill")
DOCS = [{"question": f"{name} lives in", "choices": list(TOWNS), "label": i % len(TOWNS)}
        for i, name in enumerate(PEOPLE)]
TASK = """task: megalm_towns
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


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
    (root / "tasks" / "towns.yaml").write_text(TASK.format(data=root / "docs.jsonl", cache=root / "hf"))
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


@pytest.mark.slow
@pytest.mark.nightly  # lm_eval's command line indexes all its built-in tasks (about 7 s)
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
