"""megalm eval: calibration arithmetic, the task format's errors, loss equal to the trainer's,
log-likelihoods equal at tp 2 x pp 2, and the built-in world task above chance after training."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from megalm.checkpoint import Checkpointer
from megalm.cli import main
from megalm.config import Config, ModelConfig, OptimConfig, TrainConfig, load_config
from megalm.distributed import ParallelGroups, build_parallel_groups
from megalm.eval.run import load_evaluator
from megalm.eval.tasks import Example, Scores, TaskError, accuracies, calibrate, class_probabilities, load_task
from megalm.data.corpus import build_world
from megalm.eval.world import world_task
from megalm.testing import corpus_token_files, run_distributed
from megalm.topology import Topology
from megalm.train import build_trainer

ROOT = Path(__file__).resolve().parents[1]
log = math.log


def test_calibration_changes_the_prediction_as_the_formula_says() -> None:
    # The example: class 0 at 0.6, class 1 at 0.4. The content-free prompts ("N/A" 0.9/0.1 and
    # "" 0.7/0.3: mean 0.8/0.2) show the prompt alone favours class 0, so calibration gives
    # 0.6/0.8 = 0.75 and 0.4/0.2 = 2.0, renormalised 0.75/2.75 and 2/2.75: class 1 wins.
    example = Example(choices=(("yes",), ("no",)), label=1, context="x")
    score = Scores([[log(0.6)], [log(0.4)]], [[1], [1]])
    free = [Scores([[log(0.9)], [log(0.1)]], [[1], [1]]), Scores([[log(0.7)], [log(0.3)]], [[1], [1]])]
    assert class_probabilities(score, False) == pytest.approx([0.6, 0.4])
    calibrated = calibrate(class_probabilities(score, False), [class_probabilities(s, False) for s in free])
    assert calibrated == pytest.approx([0.75 / 2.75, 2.0 / 2.75])
    assert accuracies([example], [score], [free]) == {"sum": 0.0, "sum_calibrated": 1.0, "mean": 0.0,
                                                     "mean_calibrated": 1.0}


def test_label_expansion_and_length_normalisation() -> None:
    # Class 0 has two verbalisers at 0.3 each (0.6 together) against class 1's single 0.4: the
    # class total wins though class 1's word is the likeliest word. Per-token means: class 1's word
    # has 4 tokens, log(0.4)/4 > log(0.3): length normalisation turns the choice to class 1.
    score = Scores([[log(0.3), log(0.3)], [log(0.4)]], [[1, 1], [4]])
    assert class_probabilities(score, False) == pytest.approx([0.6, 0.4])
    mean = class_probabilities(score, True)
    expected = [2 * 0.3, 0.4 ** 0.25]
    assert mean == pytest.approx([expected[0] / sum(expected), expected[1] / sum(expected)])
    example = Example(choices=(("a", "b"), ("c",)), label=0, context="x")
    result = accuracies([example], [score], [[Scores([[0.0, 0.0], [0.0]], [[1, 1], [1]])]])
    assert result["sum"] == 1.0 and result["mean"] == 0.0


def _errors(tmp_path: Path, lines: list[str], capsys) -> str:
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(["eval", str(tmp_path), "--task", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


def test_task_file_mistakes_are_one_line_with_the_line_number(tmp_path, capsys) -> None:
    good = json.dumps({"context": "a", "choices": ["b", "c"], "label": 0})
    assert "task.jsonl:3: not valid JSON" in _errors(tmp_path, [good, "", "{oops"], capsys)
    assert "task.jsonl:2: \"label\" must be an integer index" in _errors(
        tmp_path, [good, json.dumps({"context": "a", "choices": ["b", "c"], "label": 2})], capsys)
    assert "task.jsonl:1: unknown key 'choice'" in _errors(tmp_path, [json.dumps({"context": "a", "choice": []})], capsys)
    assert main(["eval", str(tmp_path), "--task", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing.jsonl does not exist" in err
    assert main(["eval", str(tmp_path / "no-run")]) == 2
    assert "no-run does not exist" in capsys.readouterr().err
    examples = load_task(_write(tmp_path, json.loads(good)))
    assert examples[0].prompt() == "a" and examples[0].choices == (("b",), ("c",))
    with pytest.raises(TaskError, match="either"):
        load_task(_write(tmp_path, {"context": "a", "template": "{input}", "input": "b", "choices": ["c", "d"], "label": 0}))


def _write(tmp_path: Path, record: dict) -> Path:
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    return path


def _config(**model) -> Config:
    fields = dict(num_layers=2, hidden_size=32, num_heads=4, vocab_size=200, seq_length=16)
    fields.update(model)
    return Config(
        model=ModelConfig(**fields), optim=OptimConfig(lr=1e-2, warmup_steps=1),
        train=TrainConfig(steps=6, micro_batch_size=2, global_batch_size=4, seed=5, eval_batches=2),
    )


def _train(run_dir: Path, config: Config) -> float:
    """Train and save; the trainer's own evaluation loss at the end."""
    trainer = build_trainer(config, ParallelGroups.single(), None)
    trainer.fit(checkpointer=Checkpointer(trainer, run_dir))
    return trainer.evaluate()


def test_loss_equals_the_trainers_evaluation(tmp_path, capsys) -> None:
    expected = _train(tmp_path / "run", _config())
    evaluator = load_evaluator(tmp_path / "run")
    assert evaluator.loss()["loss"] == pytest.approx(expected, rel=1e-6)
    fresh = build_trainer(_config(), ParallelGroups.single(), None).evaluate()
    assert abs(fresh - expected) > 0.03  # the loaded weights matter (a fresh model: 0.07 higher)
    assert main(["eval", str(tmp_path / "run"), "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["loss"] == pytest.approx(expected, rel=1e-6)
    assert line["perplexity"] == pytest.approx(math.exp(expected), rel=1e-6)


REQUESTS = [([5, 6, 7], [8, 9]), ([1], [2]), (list(range(3, 30)), [30, 31, 32]), ([], [4, 4, 4, 4])]


FAMILIES = ("lm", "prefixlm")
FAKE_TOKENIZER = type("FakeTokenizer", (), {"eos_id": 1, "sep_id": 3})()  # ids only: no text here


def _loglik_worker(rank: int, world_size: int, root: str) -> dict[str, list[float]]:
    out = {}
    for tp, pp, dp, family in ((2, 2, 1, "lm"), (2, 2, 1, "prefixlm"), (1, 2, 2, "prefixlm")):
        groups = build_parallel_groups(Topology(tp, pp, dp), rank, torch.device("cpu"))
        evaluator = load_evaluator(Path(root) / family, groups, tp=tp, pp=pp, batch_size=2)
        evaluator.trainer.tokenizer = FAKE_TOKENIZER
        out[f"{tp}x{pp}x{dp} {family}"] = evaluator.loglikelihoods(REQUESTS)
    return out


def test_loglikelihoods_match_a_plain_forward_and_other_layouts(tmp_path) -> None:
    expected = {}
    for family in FAMILIES:
        _train(tmp_path / family, _config(family=family))
        single = load_evaluator(tmp_path / family, batch_size=3)
        single.trainer.tokenizer = FAKE_TOKENIZER
        expected[family] = single.loglikelihoods(REQUESTS)
        model = single.trainer.model  # the reference: a plain forward of each sequence on its own
        with torch.no_grad():
            for (context, continuation), value in zip(REQUESTS, expected[family]):
                context = (context or [1])[-(16 + 1 - len(continuation)):]  # the end of a long context
                full = torch.tensor([context + continuation])
                prefix = torch.tensor([len(context)]) if family == "prefixlm" else None
                losses = model(full[:, :-1], full[:, 1:], prefix_lengths=prefix)[0]
                assert value == pytest.approx(-float(losses[len(context) - 1:].sum()), abs=1e-5)
        if family == "prefixlm":  # a model fine-tuned on pairs sees each context followed by <sep> (id 3)
            single.config.data.kind = "pairs"
            with_sep = [(context + [3], continuation) for context, continuation in REQUESTS[:2]]
            paired = single.loglikelihoods(REQUESTS[:2])
            single.config.data.kind = "synthetic"
            assert paired == pytest.approx(single.loglikelihoods(with_sep), abs=1e-6)
            assert paired != pytest.approx(expected[family][:2], abs=1e-3)
    for got in run_distributed(_loglik_worker, 4, str(tmp_path), timeout=120):
        assert len(got) == 3
        for layout, values in got.items():
            assert values == pytest.approx(expected[layout.split()[1]], abs=1e-5), layout


def test_world_task_is_well_formed() -> None:
    held, seen = world_task(0), world_task(0, held_out=False)
    assert len(held) == 8 * 4 * 2 and len(seen) == 32 * 8 - len(held)  # 8 people per attribute, 2 languages
    for examples in (held, seen):
        assert {len(e.choices) for e in examples} == {12, 16, 11, 15}
    assert not {e.prompt() for e in held} & {e.prompt() for e in seen}
    world = build_world(0)
    town_held = {p.en for p in world.people if "town" in p.held}
    assert {e.input for e in held if e.template == "{input} lives in"} == town_held
    assert held[0].prompt("N/A").startswith("N/A") and held[0].prompt() != held[0].prompt("N/A")


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory) -> Path:
    """The quickstart's recipe, small: 0.5 MB of corpus, a 1024-piece tokenizer, 100 steps at tp 1."""
    out = tmp_path_factory.mktemp("world")
    data, tokenizer = corpus_token_files(out, 0.5, 1024)
    assert main(["train", str(ROOT / "configs" / "tiny-corpus.yaml"), "--run-dir", str(out / "run"),
                 "parallel.tp=1", "train.steps=100", f"data.paths=[{data}]",
                 f"data.tokenizer={tokenizer}", "model.vocab_size=1024", "log.sample_prompts=[]",
                 "train.eval_interval=0"]) == 0
    return out / "run"


@pytest.mark.slow
def test_world_task_after_a_short_training(corpus_run, capsys) -> None:
    # The facts the corpus states are learned above chance in 100 steps; the held-out ones (only
    # inferable) are scored, but this tiny run does not beat chance on them (docs/generate-eval.md: the figures).
    assert main(["eval", str(corpus_run), "--task", "world-seen", "--task", "world", "--json",
                 "--batch-size", "64"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines() if line.startswith("{")]
    seen, held = lines
    assert (seen["task"], seen["examples"], held["task"], held["examples"]) == ("world-seen", 192, "world", 64)
    for key in ("sum", "mean", "sum_calibrated", "mean_calibrated"):
        assert seen[key] > seen["chance"] + 0.01, (key, seen)
        assert 0.0 <= held[key] <= 1.0
    assert held["chance"] == pytest.approx(sum(2 / n for n in (12, 16, 11, 15)) / 8)


def _tensor_bytes() -> int:
    """Bytes of the distinct CPU tensor storages that Python objects hold (every tensor object is gc-tracked)."""
    import gc
    import warnings

    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance() on torch.distributed's deprecated aliases warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                try:
                    storage = obj.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
                except (RuntimeError, NotImplementedError):  # fake tensors an earlier torch.compile left
                    continue
    return sum(storages.values())


def test_eval_holds_the_weights_and_no_optimizer_state(tmp_path) -> None:
    """megalm eval is forward-only: loading a bf16 checkpoint adds its weights' bytes, not the trainer's fp32
    gradient buckets and masters beside them (10 bytes per parameter in all, 5x the weights)."""
    config = _config(num_layers=2, hidden_size=128, vocab_size=512)
    config.train.precision, config.train.steps = "bf16", 1
    _train(tmp_path / "run", config)
    before = _tensor_bytes()
    evaluator = load_evaluator(tmp_path / "run")
    held = _tensor_bytes() - before
    weights = sum(p.numel() * p.element_size() for chunk in evaluator.trainer.chunks for p in chunk.parameters())
    assert weights == 2 * sum(p.numel() for chunk in evaluator.trainer.chunks for p in chunk.parameters())
    assert weights <= held < 1.25 * weights, (held, weights)
    assert evaluator.loss()["loss"] > 0
    with pytest.raises(RuntimeError, match="built for evaluation"):
        evaluator.trainer.train_step(0)


class _CharTokenizer:
    """A text tokenizer for the few-shot test: one id per character (ids 5..199), eos 1, sep 3."""

    eos_id, sep_id = 1, 3

    def encode(self, text: str) -> list[int]:
        return [5 + ord(char) % 195 for char in text]


def test_few_shot_demonstrations_are_other_examples_seeded(tmp_path) -> None:
    """--shots 3: every scored prompt (and its content-free prompts) starts with 3 distinct demonstrations
    drawn from the task's other examples, never the scored one; the same seed draws the same ones, another
    seed others, and different examples get different demonstrations."""
    count, shots = 7, 3
    records = [{"template": f"q{i} {{input}}?", "input": f"x{i}", "choices": [f"a{i}", f"b{i}"], "label": i % 2}
               for i in range(count)]
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    examples = load_task(path)
    demo_of = {e.prompt() + e.separator + e.answer(): i for i, e in enumerate(examples)}
    _train(tmp_path / "run", _config())
    evaluator = load_evaluator(tmp_path / "run")
    evaluator.trainer.tokenizer = _CharTokenizer()
    contexts: list[str] = []
    encode_pair = evaluator.encode_pair
    evaluator.encode_pair = lambda context, continuation: contexts.append(context) or encode_pair(context, continuation)

    def demonstrations(seed: int) -> list[tuple[int, ...]]:
        """Per scored example, the indices of its demonstrations (checked equal in all its prompts)."""
        contexts.clear()
        result = evaluator.score_task(examples, shots, seed=seed)
        assert result["shots"] == shots and result["examples"] == count
        chosen: dict[int, set] = {}
        for context in contexts:
            *demos, question = context.split("\n")
            scored = int(question[1:question.index(" ")])  # "q{i} ...": every prompt is example i's template
            assert all(line in demo_of for line in demos), (context, "a demonstration that is not an example")
            chosen.setdefault(scored, set()).add(tuple(demo_of[line] for line in demos))
        assert sorted(chosen) == list(range(count))
        assert all(len(drawn) == 1 for drawn in chosen.values()), chosen  # the same demos in every prompt
        return [next(iter(chosen[i])) for i in range(count)]

    first = demonstrations(seed=4)
    for index, demos in enumerate(first):
        assert len(demos) == shots and len(set(demos)) == shots, (index, demos)
        assert index not in demos, f"example {index} is among its own demonstrations {demos}"
    assert len(set(first)) > 1 and len({i for demos in first for i in demos}) > shots  # drawn per example
    assert demonstrations(seed=4) == first
    assert demonstrations(seed=5) != first


# ---- one prompt rule: generate, eval and the lm_eval adapter encode a pairs checkpoint's prompts alike --------
PAIRS_PROMPT = "Where does Mara live?"


def _pairs_checkpoint(root: Path, family: str) -> Path:
    """A tiny LM or PrefixLM fine-tuned (one step) on JSONL pairs, with a real tokenizer."""
    from megalm.config import DataConfig
    from megalm.data.tokenizer import train_tokenizer

    facts = [{"prefix": f"Where does {name} live?", "target": f" {town}"}
             for name in ("Mara", "Tobin", "Lena", "Oskar") for town in ("Bluestone", "Redrock")]
    (root / "pairs.jsonl").write_text("".join(json.dumps(f) + "\n" for f in facts), encoding="utf-8")
    (root / "text.txt").write_text("".join(f["prefix"] + f["target"] + "\n" for f in facts) * 4, encoding="utf-8")
    tokenizer = train_tokenizer([root / "text.txt"], root / "tok", vocab_size=300)
    config = Config(
        model=ModelConfig(num_layers=1, hidden_size=16, num_heads=2, vocab_size=300, seq_length=16, family=family),
        optim=OptimConfig(lr=1e-3, warmup_steps=0),
        train=TrainConfig(steps=1, micro_batch_size=2, global_batch_size=2, seed=3, eval_batches=1),
        data=DataConfig(kind="pairs", paths=[str(root / "pairs.jsonl")], tokenizer=str(tokenizer), split="100"),
    )
    trainer = build_trainer(config, ParallelGroups.single(), None)
    trainer.fit(checkpointer=Checkpointer(trainer, root / "run"))
    return root / "run"


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_and_eval_encode_a_pairs_checkpoints_prompts_alike(family, tmp_path, monkeypatch, capsys) -> None:
    """LM and PrefixLM fine-tuned on pairs both saw `prefix <sep>`: `megalm generate`, the Evaluator's
    scoring contexts and the lm_eval adapter's generation all hand the model those ids (eval once
    left <sep> out for a pairs-trained LM)."""
    import megalm.generate as generation
    from megalm.data.dataset import PairSamples

    run = _pairs_checkpoint(tmp_path, family)
    given: list[list[int]] = []
    real = generation.generate

    def recording(chunks, groups, prompts, sampling, use_cache=True):
        given.extend(list(p) for p in prompts)
        return real(chunks, groups, prompts, sampling, use_cache)

    monkeypatch.setattr(generation, "generate", recording)
    assert main(["generate", str(run), "--prompt", PAIRS_PROMPT, "--prompt", "", "--max-new-tokens", "2"]) == 0
    evaluator = load_evaluator(run)
    tokenizer = evaluator.tokenizer
    expected = tokenizer.encode(PAIRS_PROMPT) + [tokenizer.sep_id]
    record = (tokenizer.encode(PAIRS_PROMPT), tokenizer.encode(" Redrock"))
    sample = PairSamples([record], 16, (0,), tokenizer.pad_id, tokenizer.sep_id, tokenizer.eos_id).sample(0)
    assert sample.tokens[:sample.prefix_length].tolist() == expected  # what training showed the model
    assert given == [expected, [tokenizer.sep_id]]  # megalm generate
    assert evaluator.context_ids(tokenizer.encode(PAIRS_PROMPT)) == expected  # megalm eval's scored context
    assert evaluator.context_ids([]) == [tokenizer.sep_id]
    if importlib.util.find_spec("lm_eval") is not None:  # the lm_eval adapter's generate_until (generate_batches)
        import megalm.eval.harness as harness
        from lm_eval.api.instance import Instance

        given.clear()
        harness.MegalmLM(evaluator=evaluator, batch_size=2).generate_until(
            [Instance("generate_until", {}, (text, {"max_gen_toks": 2}), 0) for text in (PAIRS_PROMPT, "")])
        assert given == [expected, [tokenizer.sep_id]]


def test_a_run_with_fp8_and_tp_comm_overlap_evaluates_and_generates_at_tp_1(tmp_path, capsys) -> None:
    """Training-speed options (train.fp8, parallel.tp_comm_overlap) do not stop eval or generate at another
    layout or precision: both drop them (before: tp_comm_overlap at --tp 1 and fp8 with --precision fp32 were
    config errors). The checkpoint is a bf16 fp8 run; its saved config is made to say tp 2 + sp + overlap, as a
    tp 2 run's would (the weights are layout-free)."""
    config = _config(vocab_size=360)
    config.train.precision, config.train.fp8 = "bf16", "tensorwise"
    _train(tmp_path / "run", config)
    meta_path = next((tmp_path / "run").glob("**/metadata.json"))
    meta = json.loads(meta_path.read_text())
    meta["config"]["parallel"].update(tp=2, sequence_parallel=True, tp_comm_overlap=True)
    meta_path.write_text(json.dumps(meta))
    evaluator = load_evaluator(tmp_path / "run")
    assert evaluator.trainer.config.train.fp8 == "none" and not evaluator.trainer.config.parallel.tp_comm_overlap
    assert math.isfinite(evaluator.loss()["loss"])
    from megalm.data.tokenizer import train_tokenizer

    world = build_world(0)
    (tmp_path / "text.txt").write_text("".join(f"{p.en} lives in {t.en}.\n" for p in world.people for t in world.towns))
    tokenizer = train_tokenizer([tmp_path / "text.txt"], tmp_path / "tok", vocab_size=360)
    assert main(["generate", str(tmp_path / "run"), "--prompt", "Anna lives in", "--max-new-tokens", "3",
                 "--precision", "fp32", "--tokenizer", str(tokenizer)]) == 0
