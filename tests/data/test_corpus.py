"""The built-in sample corpus: deterministic, sized, bilingual, consistent and learnable."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from megalm.data import corpus, corpus_world
from megalm.data.corpus import (
    MAX_DOC_CHARS,
    build_world,
    chinese_fraction,
    generate_documents,
    number_en,
    number_zh,
    register_cli,
    write_corpus,
)

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_BYTES = 500_000


@pytest.fixture(scope="module")
def documents() -> list[str]:
    return list(generate_documents(SAMPLE_BYTES, seed=0))


def _digest(num_bytes: int, seed: int) -> str:
    return hashlib.sha256("\x00".join(generate_documents(num_bytes, seed)).encode()).hexdigest()


def test_same_seed_same_text_even_with_another_hash_seed() -> None:
    expected = _digest(200_000, seed=3)
    assert _digest(200_000, seed=3) == expected
    code = ("import hashlib; from megalm.data.corpus import generate_documents; "
            "print(hashlib.sha256('\\x00'.join(generate_documents(200_000, 3)).encode()).hexdigest())")
    for hash_seed in ("1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=str(ROOT))
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                             check=True, timeout=60)
        assert out.stdout.strip() == expected


def test_seed_changes_world_and_text(documents: list[str]) -> None:
    other = list(generate_documents(SAMPLE_BYTES, seed=1))
    assert other[:20] != documents[:20]
    assert build_world(0) != build_world(1)
    assert build_world(0) == build_world(0)


def test_generated_size_is_close_to_request(documents: list[str]) -> None:
    produced = sum(len(d.encode("utf-8")) + 1 for d in documents)
    assert SAMPLE_BYTES <= produced < SAMPLE_BYTES + 3 * MAX_DOC_CHARS + 1
    assert list(generate_documents(0)) == []
    with pytest.raises(ValueError, match="num_bytes"):
        list(generate_documents(-1))


def test_document_lengths_vary_between_bounds(documents: list[str]) -> None:
    lengths = np.array([len(d) for d in documents])
    assert lengths.min() >= 40 and lengths.max() <= MAX_DOC_CHARS
    assert np.percentile(lengths, 10) < 200 and np.percentile(lengths, 90) > 1000
    assert any("\n" in d for d in documents)


def test_jsonl_corpus_parses_and_matches_the_stream(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "corpus.jsonl"
    summary = write_corpus(path, num_bytes=300_000, seed=2, fmt="jsonl")
    data = path.read_bytes()
    assert summary.path == path and summary.bytes == len(data)
    assert 300_000 <= summary.bytes < 300_000 + 4 * MAX_DOC_CHARS
    texts = [json.loads(line)["text"] for line in data.decode("utf-8").splitlines()]
    assert len(texts) == summary.documents
    assert texts == _first(len(texts), seed=2)
    assert "\\u" not in data.decode("utf-8")  # ensure_ascii=False: Chinese stays readable
    assert [p.name for p in path.parent.iterdir()] == ["corpus.jsonl"]  # no temporary file left behind
    assert write_corpus(tmp_path / "again.jsonl", 300_000, seed=2).bytes == summary.bytes
    assert (tmp_path / "again.jsonl").read_bytes() == data


def _first(count: int, seed: int) -> list[str]:
    stream = corpus.iter_documents(seed)
    return [next(stream) for _ in range(count)]


def test_txt_corpus_has_one_document_per_line(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    summary = write_corpus(path, num_bytes=200_000, seed=0, fmt="txt")
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) - 1 == summary.documents
    assert lines[:20] == [d.replace("\n", " ") for d in _first(20, seed=0)]
    with pytest.raises(ValueError, match="fmt"):
        write_corpus(tmp_path / "x", 10, fmt="csv")


def test_about_half_the_characters_are_chinese(documents: list[str], tmp_path: Path) -> None:
    fraction = chinese_fraction("\n".join(documents))
    assert 0.4 <= fraction <= 0.6
    summary = write_corpus(tmp_path / "c.jsonl", SAMPLE_BYTES, seed=0)
    assert summary.chinese_fraction == pytest.approx(fraction, abs=0.01)
    modes = Counter(("zh" if chinese_fraction(d) > 0.6 else "en" if chinese_fraction(d) < 0.05 else "mixed")
                    for d in documents)
    assert min(modes.values()) > len(documents) / 10  # English, Chinese and mixed documents all occur


def test_character_inventory_is_modest_with_fullwidth_punctuation(documents: list[str]) -> None:
    text = "".join(documents)
    cjk = {ch for ch in text if "\u4e00" <= ch <= "\u9fff"}
    assert 150 < len(cjk) < 800
    assert len(set(text)) < 1000
    for mark in "，。！？：“”、":
        assert mark in text


def test_facts_are_stated_in_both_languages_and_never_contradicted(documents: list[str]) -> None:
    world = build_world(0)
    text = "\n".join(documents)
    names = [p.en for p in world.people] + [p.zh for p in world.people]
    in_both = 0
    stated = [person for person in world.people if "town" not in person.held]  # held out: test below
    for person in world.people:
        town = world.towns[person.town]
        in_both += f"{person.en} lives in {town.en}" in text and f"{person.zh}住在{town.zh}" in text
        if any(person.en in other and person.en != other for other in names):
            continue
        if any(person.zh in other and person.zh != other for other in names):
            continue
        assert set(re.findall(re.escape(person.en) + r" lives in (\w+)", text)) <= {town.en}
        assert set(re.findall(re.escape(person.zh) + r"住在(\w\w)", text)) - {"哪里"} <= {town.zh}
        assert set(re.findall(re.escape(person.en) + r" is (\d+) years old", text)) <= {str(person.age)}
    assert in_both >= 0.75 * len(stated)
    # The English sentence and its translation side by side, on one line.
    person = stated[0]
    town = world.towns[person.town]
    assert f"{person.en} lives in {town.en}. {person.zh}住在{town.zh}。" in text or \
        f"{person.en} lives in {town.en}.\n{person.zh}住在{town.zh}。" in text


def _direct_statements(world, person, attribute: str) -> list[str]:
    """The sentences that state one of a person's facts directly, by name, in English and Chinese."""
    town, job = world.towns[person.town], corpus_world._JOBS[person.job]
    colour, food = corpus_world._COLOURS[person.colour], corpus_world._FOODS[person.food]
    return {
        "town": [f"{person.en} lives in {town.en}", f"{person.zh}住在{town.zh}", f"I live in {town.en}"],
        "job": [f"{person.en} works as {corpus_world._article(job[0])}", f"{person.en} is {corpus_world._article(job[0])}",
                f"{person.zh}是一名{job[1]}", f"{person.zh}是{job[1]}", f"{person.en} is not"],
        "colour": [f"{person.en}'s favourite colour is {colour[0]}", f"{person.zh}最喜欢的颜色是{colour[1]}"],
        "food": [f"{person.en} likes to eat {food[0]}", f"{person.zh}喜欢吃{food[1]}"],
    }[attribute]


def test_held_out_facts_are_never_stated_but_left_to_inference(documents: list[str]) -> None:
    world = build_world(0)
    assert build_world(0).people[0].held == world.people[0].held and build_world(1) != world
    text = "\n".join(documents)
    for attribute in corpus_world.HELD_ATTRIBUTES:
        held = [p for p in world.people if attribute in p.held]
        assert len(held) == corpus_world.HELD_PER_ATTRIBUTE
        for person in held:
            direct = [s for s in _direct_statements(world, person, attribute)
                      if not s.startswith("I live") and s in text]
            assert not direct, (person.en, direct)
            assert person.en in text and person.zh in text  # the person still appears
        stated = [p for p in world.people if attribute not in p.held]
        found = sum(any(s in text for s in _direct_statements(world, p, attribute)) for p in stated)
        assert found >= 0.9 * len(stated), (attribute, found)
    # What is left to infer from: the routine (not the job's name), resident lists, meals.
    person = next(p for p in world.people if "job" in p.held)
    assert f"Every morning, {person.en} {corpus_world._JOBS[person.job][2]}." in text
    person = next(p for p in world.people if "food" in p.held)
    assert f"{person.en} was hungry, so {'she' if person.female else 'he'} ate some " \
        f"{corpus_world._FOODS[person.food][0]}." in text


def test_arithmetic_is_correct(documents: list[str]) -> None:
    text = "\n".join(documents)
    sums = re.findall(r"^(\d+) ([+×-]) (\d+) = (\d+)$", text, flags=re.M)
    assert len(sums) > 50
    for a, op, b, c in sums:
        a, b, c = int(a), int(b), int(c)
        assert c == (a + b if op == "+" else a - b if op == "-" else a * b)
    words = {number_en(n): n for n in range(101)}
    spelled = re.findall(r"([A-Za-z-]+) plus ([a-z-]+) is ([a-z-]+)\.", text)
    assert spelled
    for a, b, c in spelled:
        assert words[a.lower()] + words[b] == words[c]


def test_number_words() -> None:
    assert [number_en(n) for n in (0, 13, 20, 34, 100)] == ["zero", "thirteen", "twenty", "thirty-four", "one hundred"]
    assert [number_zh(n) for n in (0, 7, 10, 12, 20, 34, 100)] == ["零", "七", "十", "十二", "二十", "三十四", "一百"]


def _cross_entropy(train: str, held_out: str) -> tuple[float, float]:
    """Held-out bits per character under smoothed unigram and bigram character models."""
    vocab = {ch: i for i, ch in enumerate(sorted(set(train)))}
    unknown = len(vocab)
    size = unknown + 1
    train_ids = np.array([vocab[ch] for ch in train])
    test_ids = np.array([vocab.get(ch, unknown) for ch in held_out])
    unigram = (np.bincount(train_ids, minlength=size) + 1.0) / (len(train_ids) + size)
    pairs = np.bincount(train_ids[:-1] * size + train_ids[1:], minlength=size * size).reshape(size, size)
    context = pairs.sum(axis=1, keepdims=True)
    weight = 0.9  # interpolate with the unigram so unseen pairs keep some probability
    bigram = weight * pairs / np.maximum(context, 1) + (1 - weight + weight * (context == 0)) * unigram[None, :]
    h_unigram = -np.log2(unigram[test_ids]).mean()
    h_bigram = -np.log2(bigram[test_ids[:-1], test_ids[1:]]).mean()
    return float(h_unigram), float(h_bigram)


def test_character_bigram_beats_unigram_on_held_out_documents(documents: list[str]) -> None:
    train = "\n".join(d for i, d in enumerate(documents) if i % 10)
    held_out = "\n".join(d for i, d in enumerate(documents) if i % 10 == 0)
    h_unigram, h_bigram = _cross_entropy(train, held_out)
    assert h_unigram > 5.0
    assert h_bigram < 0.7 * h_unigram, (h_unigram, h_bigram)


def test_generation_is_fast() -> None:
    start = time.perf_counter()
    produced = sum(len(d.encode("utf-8")) for d in generate_documents(2_000_000, seed=5))
    rate = produced / (time.perf_counter() - start) / 1e6
    assert rate > 2.0, f"{rate:.1f} MB/s"  # about 25 MB/s on a laptop core; 50 MB must take seconds


def test_register_cli_writes_the_corpus(tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser(prog="megalm")
    data = parser.add_subparsers(dest="command", required=True).add_parser("data").add_subparsers(
        dest="data_command", required=True)
    register_cli(data)
    out = tmp_path / "c.txt"
    args = parser.parse_args(["data", "corpus", str(out), "--size-mb", "0.1", "--seed", "4", "--format", "txt"])
    assert args.func(args) == 0
    assert "documents" in capsys.readouterr().out
    assert 100_000 <= out.stat().st_size < 110_000
    assert "\n" not in out.read_text(encoding="utf-8").rstrip("\n").split("\n")[0]


def test_megalm_data_corpus_command(tmp_path: Path, capsys) -> None:
    from megalm import cli

    out = tmp_path / "c.jsonl"
    assert cli.main(["data", "corpus", str(out), "--size-mb", "0.05"]) == 0
    assert "Chinese" in capsys.readouterr().out
    assert json.loads(out.read_text(encoding="utf-8").splitlines()[0])["text"]
