"""Generation: the KV cache gives the no-cache tokens, tp and pp give the tokens of one process, and a
PrefixLM fine-tuned on pairs answers held-out prefixes through `megalm generate` (prompts end in <sep>
as training's prefixes did, in the end-of-training samples too)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from megalm.checkpoint import Checkpointer
from megalm.cli import main
from megalm.config import Config, DataConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from megalm.data.corpus import build_world
from megalm.data.dataset import PairSamples
from megalm.data.tokenizer import Tokenizer, train_tokenizer
from megalm.distributed import ParallelGroups, build_parallel_groups
from megalm.generate import Sampling, decoding_mask, encode_prompt, generate, sample_next
from megalm.model.gpt import build_model, build_model_chunks, prefix_attention_mask
from megalm.testing import run_distributed
from megalm.topology import Topology
from megalm.train import build_trainer

PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22, 23, 24, 25, 26, 27]]
GREEDY = Sampling(10)
SAMPLED = Sampling(10, temperature=1.0, top_k=10, top_p=0.9, seed=4)


def tiny(family: str, position: str, **fields) -> ModelConfig:
    """A tiny model with wide initial weights, so that its logits are far from ties."""
    values = dict(num_layers=2, hidden_size=32, num_heads=4, vocab_size=100, seq_length=24, family=family,
                  position_embedding=position, init_std=0.3)
    values.update(fields)
    return ModelConfig(**values)


# ---- sampling ---------------------------------------------------------------------------------------------
def test_top_k_and_top_p_keep_only_the_likely_tokens() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(400, 1)
    generator = torch.Generator().manual_seed(0)
    assert sample_next(logits, Sampling(4), generator).eq(0).all()  # greedy
    top_k = sample_next(logits, Sampling(4, temperature=1.0, top_k=2), generator)
    assert set(top_k.tolist()) == {0, 1}
    top_p = sample_next(logits, Sampling(4, temperature=1.0, top_p=0.85), generator)  # 0.5 + 0.3 < 0.85
    assert set(top_p.tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="top-p must be in"):
        Sampling(4, top_p=0.0)


# ---- the cache and the masks ------------------------------------------------------------------------------
def test_unpadded_mask_is_training_mask_and_prefill_logits_are_the_forward_logits() -> None:
    for family in ("lm", "prefixlm"):
        mask = decoding_mask(torch.tensor([0]), 5, 9, family == "prefixlm")[0, 0]
        expected = prefix_attention_mask(torch.tensor([5]), 9)[0, 0] if family == "prefixlm" else torch.ones(9, 9).tril().bool()
        assert torch.equal(mask, expected), family
        model = build_model(tiny(family, "rotary"), ParallelGroups.single(), seed=3).eval()
        ids = torch.tensor([PROMPTS[2]])
        with torch.no_grad():
            forward = model(ids, prefix_lengths=torch.tensor([8]) if family == "prefixlm" else None)
            decoded = model.decode(ids, torch.arange(8).unsqueeze(0), decoding_mask(torch.tensor([0]), 8, 8, family == "prefixlm"))
        torch.testing.assert_close(decoded, forward, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,position", [("lm", "learned"), ("prefixlm", "rotary")])
def test_the_cache_gives_the_no_cache_tokens_and_each_row_its_own(family: str, position: str) -> None:
    model = build_model(tiny(family, position), ParallelGroups.single(), seed=3)
    for sampling in (GREEDY, SAMPLED):
        cached = generate(model, ParallelGroups.single(), PROMPTS, sampling)
        assert cached == generate(model, ParallelGroups.single(), PROMPTS, sampling, use_cache=False)
        assert all(len(row) == 10 for row in cached)
    alone = [generate(model, ParallelGroups.single(), [prompt], GREEDY)[0] for prompt in PROMPTS]
    assert generate(model, ParallelGroups.single(), PROMPTS, GREEDY) == alone  # left padding changes nothing


def test_generation_stops_at_eos_and_at_the_context() -> None:
    model = build_model(tiny("lm", "learned"), ParallelGroups.single(), seed=3)
    free = generate(model, ParallelGroups.single(), PROMPTS, GREEDY)
    stop = free[0][3]
    stopped = generate(model, ParallelGroups.single(), PROMPTS, Sampling(10, stop_id=stop))
    for row, ids in zip(free, stopped):
        assert ids == row[: row.index(stop)] if stop in row else ids == row
    long = generate(model, ParallelGroups.single(), [list(range(1, 30))], Sampling(50))[0]
    assert len(long) == 1  # 30 tokens keep their last seq_length - 1 = 23; one more fills the context


# ---- tp and pp give the tokens of one process -------------------------------------------------------------
LAYOUTS = [  # (tp, pp, dp, virtual stages, sequence parallel)
    (2, 2, 1, 1, False),
    (2, 1, 2, 1, True),
    (1, 2, 2, 2, False),
]


def layout_config(family: str, tp: int, pp: int, dp: int, virtual: int, sequence_parallel: bool) -> Config:
    return Config(
        model=tiny(family, "learned", num_layers=4),
        parallel=ParallelConfig(tp=tp, pp=pp, dp=dp, virtual_stages=virtual, sequence_parallel=sequence_parallel),
        train=TrainConfig(micro_batch_size=1, global_batch_size=dp, seed=3),
    )


def _layouts_worker(rank: int, world_size: int, checkpoint: str, out: str) -> dict:
    results = {}
    for layout in LAYOUTS:
        groups = build_parallel_groups(Topology(*layout[:3]), rank, torch.device("cpu"))
        for family in ("lm", "prefixlm"):
            chunks = build_model_chunks(layout_config(family, *layout), groups)
            results[layout, family] = [generate(chunks, groups, PROMPTS, sampling) for sampling in (GREEDY, SAMPLED)]
    # megalm generate itself, pipelined over two data-parallel replicas (it ends the process group)
    main(["generate", checkpoint, "--pp", "2", "--batch-size", "3", "--prompts-file", str(Path(out).parent / "held.jsonl"),
          "--field", "prefix", "--output", out])
    return results


# ---- a PrefixLM fine-tuned on pairs answers held-out prefixes ---------------------------------------------
def fact(name: str, town: str) -> dict:
    return {"prefix": f"{name} lives in {town}. Where does {name} live?", "target": f" {town}"}


@pytest.fixture(scope="module")
def pairs_run(tmp_path_factory) -> dict:
    """A tiny PrefixLM trained on pairs from the embedded corpus's world (where people live), 24
    (person, town) pairs held out; its checkpoint, trainer and held-out facts."""
    root = tmp_path_factory.mktemp("pairs")
    world = build_world(0)
    combos = [(person.en, town.en) for person in world.people for town in world.towns]
    random.Random(0).shuffle(combos)
    held, seen = combos[:24], combos[24:]
    (root / "train.jsonl").write_text("".join(json.dumps(fact(*c)) + "\n" for c in seen), encoding="utf-8")
    (root / "held.jsonl").write_text("".join(json.dumps(fact(*c)) + "\n" for c in held), encoding="utf-8")
    text = "".join(f"{f['prefix']}{f['target']}\n" for f in map(lambda c: fact(*c), combos))
    (root / "text.txt").write_text(text, encoding="utf-8")
    tokenizer = train_tokenizer([root / "text.txt"], root / "tok", vocab_size=360)
    config = Config(
        model=ModelConfig(num_layers=2, hidden_size=64, num_heads=4, vocab_size=360, seq_length=32, family="prefixlm"),
        optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=10),
        train=TrainConfig(steps=150, micro_batch_size=16, global_batch_size=16, seed=1),
        data=DataConfig(kind="pairs", paths=[str(root / "train.jsonl")], tokenizer=str(tokenizer), split="100"),
    )
    config.log.sample_prompts = [fact(*c)["prefix"] for c in held]
    trainer = build_trainer(config, ParallelGroups.single(), None)
    checkpointer = Checkpointer(trainer, root / "run")
    records = trainer.fit(checkpointer=checkpointer)  # saves at the last step, then prints the samples
    assert records[-1]["loss"] < 0.1, records[-1]
    return {"root": root, "run": root / "run", "trainer": trainer, "held": held, "tokenizer": Tokenizer.load(tokenizer)}


def correct(completions: list[str], held: list[tuple[str, str]]) -> int:
    return sum(text.strip() == town for text, (_, town) in zip(completions, held))


def test_prompts_are_encoded_as_training_encoded_the_prefixes(pairs_run: dict) -> None:
    tokenizer = pairs_run["tokenizer"]
    name, town = pairs_run["held"][0]
    record = (tokenizer.encode(fact(name, town)["prefix"]), tokenizer.encode(fact(name, town)["target"]))
    sample = PairSamples([record], 32, (0,), tokenizer.pad_id, tokenizer.sep_id, tokenizer.eos_id).sample(0)
    prompt = encode_prompt(tokenizer, fact(name, town)["prefix"], pairs=True)
    assert prompt[-1] == tokenizer.sep_id == 3
    assert sample.tokens[: sample.prefix_length].tolist() == prompt


def test_a_prefixlm_fine_tuned_on_pairs_answers_held_out_prefixes(pairs_run: dict, capsys) -> None:
    held = pairs_run["held"]
    capsys.readouterr()
    assert main(["generate", str(pairs_run["run"]), "--prompts-file", str(pairs_run["root"] / "held.jsonl"),
                 "--field", "prefix", "--max-new-tokens", "8"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == [fact(*c)["prefix"] for c in held]
    assert correct([line["completion"] for line in lines], held) >= 22, lines  # 24 of 24 measured (greedy)
    # The end-of-training samples (temperature 0.7, top-k 20) encode the prompts the same way: 20 of 24
    # measured; 13 of 24 when they did not end the prompts with <sep>.
    assert correct(pairs_run["trainer"].print_samples(), held) >= 18


def test_tp_and_pp_give_the_tokens_of_one_process(pairs_run: dict) -> None:
    out = pairs_run["root"] / "pp2.jsonl"
    results = run_distributed(_layouts_worker, 4, str(pairs_run["run"]), str(out), timeout=240)
    single = ParallelGroups.single()
    for family in ("lm", "prefixlm"):
        reference = build_model_chunks(layout_config(family, 1, 1, 1, 1, False), single)
        expected = [generate(reference, single, PROMPTS, sampling) for sampling in (GREEDY, SAMPLED)]
        for layout in LAYOUTS:
            for rank, result in enumerate(results):
                assert result[layout, family] == expected, (layout, family, rank)
    # megalm generate at pp 2 x dp 2 prints what one process prints
    one = pairs_run["root"] / "one.jsonl"
    assert main(["generate", str(pairs_run["run"]), "--prompts-file", str(pairs_run["root"] / "held.jsonl"),
                 "--field", "prefix", "--output", str(one)]) == 0
    assert out.read_text(encoding="utf-8") == one.read_text(encoding="utf-8")
    assert len(one.read_text(encoding="utf-8").splitlines()) == len(pairs_run["held"])


# ---- mistakes: one line each ------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,expected", [
    ([], "no prompts: give --prompt TEXT"),
    (["--prompts-file", "missing.txt"], "is not a file"),
    (["--prompts-file", "BAD"], ":2: not a JSON string or an object with the field 'prompt'"),
    (["--prompt", "x", "--top-p", "1.5"], "top-p must be in (0, 1]"),
    (["--prompt", "x", "--tp", "3"], "--tp 3 x --pp 1 does not divide the 1 processes"),
])
def test_mistakes_are_one_line(extra: list[str], expected: str, pairs_run: dict, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt field"}\n', encoding="utf-8")
    extra = [str(bad) if item == "BAD" else str(tmp_path / item) if item == "missing.txt" else item for item in extra]
    capsys.readouterr()
    assert main(["generate", str(pairs_run["run"]), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err


def test_a_directory_without_a_checkpoint_is_refused(tmp_path: Path, capsys) -> None:
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint={tmp_path} holds no complete checkpoint" in err, err


def test_harness_is_greedy_generates_from_the_context_the_loglikelihood_scores(pairs_run: dict) -> None:
    # A PrefixLM fine-tuned on pairs scores an empty context's continuation after <sep> alone; the
    # harness's is_greedy must generate from those same ids (it once generated after eos <sep>).
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed")
    from lm_eval.api.instance import Instance

    from megalm.eval.harness import MegalmLM
    from megalm.eval.run import load_evaluator

    evaluator = load_evaluator(pairs_run["run"], batch_size=4)
    tokenizer = evaluator.tokenizer
    assert evaluator.context_ids([]) == [tokenizer.sep_id]
    chunks, groups = evaluator.trainer.chunks, evaluator.trainer.groups
    own = generate(chunks, groups, [[tokenizer.sep_id]], Sampling(max_new_tokens=4))[0]
    other = generate(chunks, groups, [[tokenizer.eos_id, tokenizer.sep_id]], Sampling(max_new_tokens=4))[0]
    text = tokenizer.decode(own[:2])
    _, continuation = evaluator.encode_pair("", text)
    assert continuation == own[:len(continuation)] != other[:len(continuation)]  # the two contexts disagree
    (_, greedy), = MegalmLM(evaluator=evaluator, batch_size=4).loglikelihood([Instance("loglikelihood", {}, ("", text), 0)])
    assert greedy
