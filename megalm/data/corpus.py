"""A built-in Chinese/English sample corpus, generated deterministically by code.

The text describes a small invented world: a few dozen people with fixed attributes (town, job,
age, colour, food, hobby, belongings, pet, best friend) and a dozen towns, all drawn once from the
seed. Documents state these facts in English, in Chinese, or in both (an English sentence beside
its translation), and mix in arithmetic, counting, days and months, dialogues and small
cause-and-effect stories. A fact never contradicts itself inside one seed, so a small model can
learn the text well below its unigram entropy in a few hundred steps.

Held-out facts: for a quarter of the people (8 of 32), drawn per attribute from the seed, the corpus
never states their town, job, favourite colour or food directly (no "X lives in T", "X是一名...", "X's
favourite colour is ...", "X likes to eat ...", by name or pronoun, in either language, nor as the
answer to a question). The fact is left only to inference from other text: the town from the town's
resident lists, the job from the person's daily routine ("Every morning, X bakes bread"; the job's name
is never said), the colour from a dialogue's reply ("I like blue best"), the food from what the person
eats or buys. The built-in eval task (megalm/eval/world.py) scores these held-out facts.

The word lists, people and towns are in megalm/data/corpus_world.py; the sentence templates, the
documents and `megalm data corpus` are here. All word lists and templates are written for this
project. The Chinese character inventory stays at a few hundred characters so a 2k-piece
sentencepiece vocabulary covers it.

Generation uses only `random.Random` seeded from strings (sha512 based, not `hash()`), lists and
tuples, so the same (num_bytes, seed) gives byte-identical output in any process.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from megalm.data.corpus_world import (
    _COLOURS,
    _COUNTABLES,
    _DAYS,
    _FOODS,
    _HOBBIES,
    _JOBS,
    _LANDMARKS,
    _MONTHS,
    _MONTHS_EN,
    _MONTHS_ZH,
    _ORDINALS,
    _PEOPLE,
    _PET_NAMES,
    _PETS,
    _SEASONS,
    _THINGS,
    _TOWN_SETTINGS,
    _WEATHER,
    Person,
    World,
    _article,
    _count_zh,
    _first_person,
    build_world,
    number_en,
    number_zh,
)

MIN_DOC_CHARS = 50
MAX_DOC_CHARS = 2000

# ----------------------------------------------------------------------------- sentences
# Every generator returns a list of (english, chinese) pairs saying the same thing.
Pair = tuple[str, str]


def _fact(world: World, p: Person, kind: int, named: bool) -> Pair | None:
    """One fact about person p, by name or (named=False) by pronoun; None for a held-out fact."""
    if kind == 2 and "town" in p.held:
        kind = 1  # "lives in T and works as ...": the part not held out, or nothing
    if kind == 2 and "job" in p.held:
        kind = 0
    if kind in _HELD_KINDS and _HELD_KINDS[kind] in p.held:
        return None
    n_en, n_zh = (p.en, p.zh) if named else (("She", "她") if p.female else ("He", "他"))
    pos_en = p.en + "'s" if named else ("Her" if p.female else "His")
    town_en, town_zh = world.towns[p.town].en, world.towns[p.town].zh
    job = _JOBS[p.job]
    if kind == 0:
        return f"{n_en} lives in {town_en}.", f"{n_zh}住在{town_zh}。"
    if kind == 1:
        return f"{n_en} works as {_article(job[0])}.", f"{n_zh}是一名{job[1]}。"
    if kind == 2:
        return (f"{n_en} lives in {town_en} and works as {_article(job[0])}.",
                f"{n_zh}住在{town_zh}，是一名{job[1]}。")
    if kind == 3:
        return f"{n_en} is {number_en(p.age)} years old.", f"{n_zh}今年{number_zh(p.age)}岁。"
    if kind == 4:
        return f"{n_en} is {p.age} years old.", f"{n_zh}今年{p.age}岁。"
    if kind == 5:
        colour = _COLOURS[p.colour]
        return f"{pos_en} favourite colour is {colour[0]}.", f"{n_zh}最喜欢的颜色是{colour[1]}。"
    if kind == 6:
        food = _FOODS[p.food]
        return f"{n_en} likes to eat {food[0]}.", f"{n_zh}喜欢吃{food[1]}。"
    if kind == 7:
        hobby = _HOBBIES[p.hobby]
        return f"{n_en} likes {hobby[0]}.", f"{n_zh}喜欢{hobby[1]}。"
    if kind == 8:
        thing, colour = _THINGS[p.thing], _COLOURS[p.thing_colour]
        return f"{n_en} has {_article(colour[0])} {thing[0]}.", f"{n_zh}有一{thing[2]}{colour[1]}的{thing[1]}。"
    if kind == 9:
        pet, name = _PETS[p.pet], _PET_NAMES[p.pet_name]
        return f"{n_en} has {_article(pet[0])} named {name[0]}.", f"{n_zh}有一{pet[2]}{pet[1]}，名字叫{name[1]}。"
    if kind == 10:
        friend = world.people[p.friend]
        return f"{pos_en} best friend is {friend.en}.", f"{n_zh}最好的朋友是{friend.zh}。"
    return f"Every morning, {p.en} {job[2]}.", f"每天早上，{p.zh}都{job[3]}。"


_NUM_FACTS = 12
_HELD_KINDS = {0: "town", 1: "job", 5: "colour", 6: "food"}  # _fact kinds that state a held-out attribute


def _question(rng: random.Random, world: World, p: Person) -> list[Pair]:
    """A question about p and its answer."""
    kind = rng.randrange(5)
    if (kind == 0 and "town" in p.held) or (kind in (1, 2) and "job" in p.held):
        kind = 3  # the answer would state a held-out fact: ask the age instead
    town = world.towns[p.town]
    if kind == 0:
        return [(f"Where does {p.en} live?", f"{p.zh}住在哪里？"), (f"{p.en} lives in {town.en}.", f"{p.zh}住在{town.zh}。")]
    if kind == 1:
        job = _JOBS[p.job]
        return [(f"What does {p.en} do?", f"{p.zh}做什么工作？"),
                (f"{p.en} is {_article(job[0])}.", f"{p.zh}是一名{job[1]}。")]
    if kind == 2:
        guess = rng.randrange(len(_JOBS))
        job, other = _JOBS[p.job], _JOBS[guess]
        question = (f"Is {p.en} {_article(other[0])}?", f"{p.zh}是{other[1]}吗？")
        if guess == p.job:
            return [question, (f"Yes, {p.en} is {_article(job[0])}.", f"是的，{p.zh}是{job[1]}。")]
        return [question, (f"No, {p.en} is not {_article(other[0])}. {p.en} is {_article(job[0])}.",
                           f"不，{p.zh}不是{other[1]}，{p.zh}是{job[1]}。")]
    if kind == 3:
        return [(f"How old is {p.en}?", f"{p.zh}今年多大？"),
                (f"{p.en} is {number_en(p.age)}.", f"{p.zh}今年{number_zh(p.age)}岁。")]
    other = world.people[rng.randrange(len(world.people))]
    if other.age == p.age:
        return [(f"{p.en} and {other.en} are the same age.", f"{p.zh}和{other.zh}一样大。")]
    older, younger = (p, other) if p.age > other.age else (other, p)
    gap = older.age - younger.age
    return [(f"Who is older, {p.en} or {other.en}?", f"{p.zh}和{other.zh}谁大？"),
            (f"{older.en} is {number_en(gap)} {'year' if gap == 1 else 'years'} older than {younger.en}.",
             f"{older.zh}比{younger.zh}大{_count_zh(gap)}岁。")]


def _cause(rng: random.Random, world: World, p: Person) -> list[Pair]:
    """Small cause and effect sentences that agree with p's facts."""
    he_en, he_zh = ("she", "她") if p.female else ("he", "他")
    kind = rng.randrange(4)
    if kind == 0:
        day = _DAYS[rng.randrange(7)]
        weather = _WEATHER[rng.randrange(len(_WEATHER))]
        return [(f"On {day[0]}, {weather[0]}, so {p.en} {weather[2]}.", f"{day[1]}{weather[1]}，所以{p.zh}{weather[3]}。")]
    if kind == 1:
        food = _FOODS[p.food]
        return [(f"{p.en} was hungry, so {he_en} ate some {food[0]}.", f"{p.zh}饿了，所以{he_zh}吃了一些{food[1]}。")]
    if kind == 2:
        return [(f"{p.en} was tired, so {he_en} went to bed early.", f"{p.zh}累了，所以{he_zh}早早地睡觉了。")]
    friend = world.people[p.friend]
    hobby = _HOBBIES[friend.hobby]
    him_en, him_zh = ("her", "她") if friend.female else ("him", "他")
    return [(f"Because {friend.en} likes {hobby[0]}, {p.en} often joins {him_en}.",
             f"因为{friend.zh}喜欢{hobby[1]}，所以{p.zh}常常和{him_zh}一起{hobby[1]}。")]


def _profile(rng: random.Random, world: World, p: Person) -> list[Pair]:
    """A few facts about one person, by name first, then sometimes by pronoun."""
    kinds = rng.sample(range(_NUM_FACTS), rng.randint(2, 6))
    named = [True] + [rng.random() < 0.6 or k in (10, 11) for k in kinds[1:]]
    out = []
    for kind, by_name in zip(kinds, named):
        fact = _fact(world, p, kind, by_name or not out)  # the first fact kept is by name
        if fact is not None:
            out.append(fact)
    out = out or [_fact(world, p, 3, True)]
    if rng.random() < 0.3:
        out.extend(_cause(rng, world, p))
    if rng.random() < 0.3:
        out.extend(_question(rng, world, p))
    return out


def _town(rng: random.Random, world: World, _: Person) -> list[Pair]:
    """A town: its setting, landmark, food, residents, and distance to another town."""
    index = rng.randrange(len(world.towns))
    t = world.towns[index]
    setting, landmark, food = _TOWN_SETTINGS[t.setting], _LANDMARKS[t.landmark], _FOODS[t.food]
    out = [(f"{t.en} is a small town {setting[0]}.", f"{t.zh}是一个{setting[1]}的小镇。"),
           (f"In {t.en} there is {landmark[0]}.", f"{t.zh}有{landmark[1]}。"),
           (f"People in {t.en} like to eat {food[0]}.", f"{t.zh}的人喜欢吃{food[1]}。")]
    rng.shuffle(out)
    residents = [p for p in world.people if p.town == index]
    if len(residents) == 1 and "town" in residents[0].held:  # no "X lives in T": a held-out fact
        out.append((f"In {t.en} there is only one person: {residents[0].en}.", f"{t.zh}只有一个人：{residents[0].zh}。"))
    elif len(residents) == 1:
        out.append((f"{residents[0].en} lives in {t.en}.", f"{residents[0].zh}住在{t.zh}。"))
    elif residents:
        en = ", ".join(p.en for p in residents[:-1]) + " and " + residents[-1].en
        zh = "、".join(p.zh for p in residents[:-1]) + "和" + residents[-1].zh
        out.append((f"{en} live in {t.en}.", f"{zh}都住在{t.zh}。"))
    other = world.towns[(index + 1 + rng.randrange(len(world.towns) - 1)) % len(world.towns)]
    km = abs(t.milestone - other.milestone)
    unit = "kilometre" if km == 1 else "kilometres"
    out.append((f"From {t.en} to {other.en} it is {number_en(km)} {unit}.", f"从{t.zh}到{other.zh}有{_count_zh(km)}公里。"))
    return out


def _arithmetic(rng: random.Random, _: World, __: Person) -> list[Pair]:
    """Sums, differences and products in words and digits."""
    op = rng.randrange(4)
    if op == 0:
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        c, en_op, zh_op, sym = a + b, "plus", "加", "+"
    elif op == 1:
        a, b = rng.randint(0, 100), rng.randint(0, 50)
        a, b = max(a, b), min(a, b)
        c, en_op, zh_op, sym = a - b, "minus", "减", "-"
    elif op == 2:
        a, b = rng.randint(1, 10), rng.randint(1, 10)
        c, en_op, zh_op, sym = a * b, "times", "乘以", "×"
    else:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        thing = _COUNTABLES[rng.randrange(len(_COUNTABLES))]
        name = _PEOPLE[rng.randrange(len(_PEOPLE))]
        en_a = thing[0] if a == 1 else thing[1]
        en_c = thing[1]
        return [(f"{name[0]} has {number_en(a)} {en_a}, then gets {number_en(b)} more, "
                 f"so now {name[0]} has {number_en(a + b)} {en_c}.",
                 f"{name[1]}有{_count_zh(a)}{thing[3]}{thing[2]}，又得到了{_count_zh(b)}{thing[3]}，"
                 f"所以现在{name[1]}有{_count_zh(a + b)}{thing[3]}{thing[2]}。")]
    style = rng.randrange(3)
    if style == 0:
        return [(f"{number_en(a).capitalize()} {en_op} {number_en(b)} is {number_en(c)}.",
                 f"{number_zh(a)}{zh_op}{number_zh(b)}等于{number_zh(c)}。")]
    if style == 1:
        return [(f"{a} {sym} {b} = {c}", f"{a} {sym} {b} = {c}")]
    return [(f"What is {number_en(a)} {en_op} {number_en(b)}? It is {number_en(c)}.",
             f"{number_zh(a)}{zh_op}{number_zh(b)}等于几？等于{number_zh(c)}。")]


def _counting(rng: random.Random, _: World, __: Person) -> list[Pair]:
    """Counting up, down or by a step, in words or digits."""
    step = rng.choice((1, 1, 1, 2, 5, 10, -1))
    length = rng.randint(4, 10)
    start = rng.randint(0, 100 - abs(step) * (length - 1))
    if step < 0:
        start += length - 1
    numbers = [start + i * step for i in range(length)]
    style = rng.randrange(3)
    if style == 0:
        return [(", ".join(number_en(n) for n in numbers).capitalize() + ".", "、".join(number_zh(n) for n in numbers) + "。")]
    if style == 1:
        digits = ", ".join(str(n) for n in numbers)
        return [(digits, "、".join(str(n) for n in numbers))]
    n = rng.randint(0, 99)
    return [(f"After {number_en(n)} comes {number_en(n + 1)}.", f"{number_zh(n)}后面是{number_zh(n + 1)}。")]


def _calendar(rng: random.Random, _: World, __: Person) -> list[Pair]:
    """Days of the week and months of the year in order."""
    kind = rng.randrange(6)
    if kind == 0:
        return [("The days of the week are " + ", ".join(d[0] for d in _DAYS[:-1]) + " and Sunday.",
                 "一个星期有七天：" + "、".join(d[1] for d in _DAYS[:-1]) + "和星期日。")]
    if kind == 1:
        i = rng.randrange(7)
        today, tomorrow, yesterday = _DAYS[i], _DAYS[(i + 1) % 7], _DAYS[(i - 1) % 7]
        return [(f"Today is {today[0]}, so tomorrow is {tomorrow[0]} and yesterday was {yesterday[0]}.",
                 f"今天是{today[1]}，所以明天是{tomorrow[1]}，昨天是{yesterday[1]}。")]
    if kind == 2:
        i = rng.randrange(12)
        return [(f"{_MONTHS[i][0]} is the {_ORDINALS[i]} month of the year.", f"{_MONTHS[i][1]}是一年中的第{number_zh(i + 1)}个月。")]
    if kind == 3:
        i = rng.randrange(12)
        return [(f"After {_MONTHS[i][0]} comes {_MONTHS[(i + 1) % 12][0]}.", f"{_MONTHS[i][1]}之后是{_MONTHS[(i + 1) % 12][1]}。")]
    if kind == 4:
        season = _SEASONS[rng.randrange(4)]
        months = [_MONTHS[m] for m in season[2]]
        return [(f"The months of {season[0]} are {months[0][0]}, {months[1][0]} and {months[2][0]}.",
                 f"{season[1]}有{months[0][1]}、{months[1][1]}和{months[2][1]}。"),
                (f"In {season[0]} it is {season[3]}.", f"{season[1]}{season[4]}。")]
    return [("A year has twelve months: " + ", ".join(_MONTHS_EN[:-1]) + " and December.",
             "一年有十二个月：" + "、".join(_MONTHS_ZH[:-1]) + "和十二月。")]


def _dialogue(rng: random.Random, world: World, a: Person) -> list[Pair]:
    """Two people meet and talk; every answer agrees with the world."""
    b = world.people[a.friend] if rng.random() < 0.5 else world.people[rng.randrange(len(world.people))]
    if b is a:
        b = world.people[a.friend]
    b_town, b_job, b_food = world.towns[b.town], _JOBS[b.job], _FOODS[b.food]
    lines = [(f"{a.en}: Hello, {b.en}! How are you?", f"{a.zh}：你好，{b.zh}！你好吗？"),
             (f"{b.en}: I am fine, thank you. And you?", f"{b.zh}：我很好，谢谢。你呢？"),
             (f"{a.en}: I am fine too.", f"{a.zh}：我也很好。")]
    topics = rng.sample(range(5), rng.randint(1, 3))
    for topic in topics:
        if topic == 0:
            lines.append((f"{a.en}: Where are you going?", f"{a.zh}：你要去哪里？"))
            lines.append((f"{b.en}: I am going to the market to buy {b_food[0]}.", f"{b.zh}：我要去市场买{b_food[1]}。"))
        elif topic == 1 and "town" in b.held:
            continue  # "Do you live in ...?" would state a held-out fact
        elif topic == 1:
            guess = world.towns[rng.randrange(len(world.towns))]
            lines.append((f"{a.en}: Do you live in {guess.en}?", f"{a.zh}：你住在{guess.zh}吗？"))
            lines.append((f"{b.en}: Yes, I live in {b_town.en}." if guess is b_town else
                          f"{b.en}: No, I live in {b_town.en}.",
                          f"{b.zh}：对，我住在{b_town.zh}。" if guess is b_town else f"{b.zh}：不，我住在{b_town.zh}。"))
        elif topic == 2 and "job" in b.held:  # the routine only, not the job's name
            lines.append((f"{a.en}: What do you do in the morning?", f"{a.zh}：你早上做什么？"))
            lines.append((f"{b.en}: Every morning I {_first_person(b_job[2])}.", f"{b.zh}：每天早上我都{b_job[3]}。"))
        elif topic == 2:
            lines.append((f"{a.en}: What do you do?", f"{a.zh}：你做什么工作？"))
            lines.append((f"{b.en}: I am {_article(b_job[0])}. Every morning I {_first_person(b_job[2])}.",
                          f"{b.zh}：我是{b_job[1]}。每天早上我都{b_job[3]}。"))
        elif topic == 3:
            colour = _COLOURS[b.colour]
            lines.append((f"{a.en} asked, “{b.en}, what colour do you like?” {b.en} said, “I like {colour[0]} best.”",
                          f"{a.zh}问：“{b.zh}，你喜欢什么颜色？”{b.zh}说：“我最喜欢{colour[1]}。”"))
        else:
            pet, name = _PETS[b.pet], _PET_NAMES[b.pet_name]
            lines.append((f"{a.en}: Do you have a pet?", f"{a.zh}：你有宠物吗？"))
            lines.append((f"{b.en}: Yes! I have {_article(pet[0])}. Its name is {name[0]}.",
                          f"{b.zh}：有！我有一{pet[2]}{pet[1]}，它的名字叫{name[1]}。"))
    lines.append((f"{a.en}: Goodbye, {b.en}!", f"{a.zh}：再见，{b.zh}！"))
    return lines


def _story(rng: random.Random, world: World, p: Person) -> list[Pair]:
    """A week in p's life: each day the weather, and what p did because of it."""
    he_en, he_zh = ("she", "她") if p.female else ("he", "他")
    start = rng.randrange(7)
    out = [_fact(world, p, 2, True) or _fact(world, p, 3, True)]
    for offset in range(rng.randint(2, 5)):
        day = _DAYS[(start + offset) % 7]
        weather = _WEATHER[rng.randrange(len(_WEATHER))]
        out.append((f"On {day[0]}, {weather[0]}, so {he_en} {weather[2]}.", f"{day[1]}{weather[1]}，所以{he_zh}{weather[3]}。"))
    out.extend(_cause(rng, world, p))
    return out


# (generator, is a dialogue of separate lines, weight)
_TOPICS: tuple[tuple[Callable[[random.Random, World, Person], list[Pair]], bool, int], ...] = (
    (_profile, False, 6), (_question, False, 2), (_cause, False, 2), (_town, False, 2), (_arithmetic, True, 3),
    (_counting, True, 1), (_calendar, False, 1), (_dialogue, True, 2), (_story, False, 2),
)
_TOPIC_CUMULATIVE = tuple(itertools.accumulate(weight for _, _, weight in _TOPICS))
# document languages: English, Chinese, or English then Chinese; Chinese is denser per character,
# so it is drawn more often to keep the share of Chinese characters near half.
_LANGUAGES = ("en", "zh", "zh", "zh", "bi", "bi")


def _render(pairs: list[Pair], language: str, lines: bool, bilingual_lines: bool) -> str:
    if language == "en":
        return ("\n" if lines else " ").join(en for en, _ in pairs)
    if language == "zh":
        return ("\n" if lines else "").join(zh for _, zh in pairs)
    sep = "\n" if bilingual_lines else " "
    return "\n".join(f"{en}{sep}{zh}" for en, zh in pairs)


def _document(rng: random.Random, world: World) -> str:
    """One document: paragraphs on a few topics in one language mode, 50 to 2000 characters."""
    target = int(MIN_DOC_CHARS * (MAX_DOC_CHARS / MIN_DOC_CHARS) ** rng.random())
    language = _LANGUAGES[rng.randrange(len(_LANGUAGES))]
    bilingual_lines = rng.random() < 0.5
    person = world.people[rng.randrange(len(world.people))]
    main_topic = rng.choices(_TOPICS, cum_weights=_TOPIC_CUMULATIVE)[0]
    paragraphs: list[str] = []
    size = 0
    while size < target:
        topic = main_topic if rng.random() < 0.6 else rng.choices(_TOPICS, cum_weights=_TOPIC_CUMULATIVE)[0]
        if rng.random() < 0.3:
            person = world.people[rng.randrange(len(world.people))]
        generator, lines, _ = topic
        pairs = generator(rng, world, person)
        if lines and len(pairs) == 1:  # grow single-line topics (sums, counting) into a short list
            for _ in range(rng.randint(1, 6)):
                pairs.extend(generator(rng, world, person))
        paragraph = _render(pairs, language, lines, bilingual_lines)
        if paragraphs and size + len(paragraph) + 1 > MAX_DOC_CHARS:
            break
        paragraphs.append(paragraph)
        size += len(paragraph) + 1
    return "\n".join(paragraphs)


def iter_documents(seed: int = 0) -> Iterator[str]:
    """The endless document stream of one seed; generate_documents and write_corpus take prefixes."""
    world = build_world(seed)
    rng = random.Random(f"megalm-corpus-text:{seed}")
    while True:
        yield _document(rng, world)


def generate_documents(num_bytes: int, seed: int = 0) -> Iterator[str]:
    """Documents of one seed until about num_bytes of UTF-8 text (one newline per document counted)."""
    if num_bytes < 0:
        raise ValueError(f"num_bytes={num_bytes} must be >= 0")
    produced = 0
    for document in iter_documents(seed):
        if produced >= num_bytes:
            return
        produced += len(document.encode("utf-8")) + 1
        yield document


_CJK = re.compile(r"[\u4e00-\u9fff]")


def chinese_fraction(text: str) -> float:
    """Share of CJK ideographs among the non-whitespace characters of text."""
    non_space = len(text) - sum(text.count(c) for c in " \n\t")
    return len(_CJK.findall(text)) / non_space if non_space else 0.0


@dataclass
class CorpusSummary:
    path: Path
    documents: int
    bytes: int
    chinese_fraction: float

    def __str__(self) -> str:
        return (f"wrote {self.path}: {self.documents:,} documents, {self.bytes:,} bytes, "
                f"{self.chinese_fraction:.1%} Chinese characters")


def write_corpus(path: str | Path, num_bytes: int = 2_000_000, seed: int = 0, fmt: str = "jsonl") -> CorpusSummary:
    """Write documents until the file holds about num_bytes: JSONL {"text": ...} or one document per line.

    The file is written under a temporary name and renamed, so a reader never sees half a corpus.
    """
    if fmt not in ("jsonl", "txt"):
        raise ValueError(f"fmt={fmt!r}: use 'jsonl' or 'txt'")
    if num_bytes < 0:
        raise ValueError(f"num_bytes={num_bytes} must be >= 0")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    written = documents = cjk = non_space = 0
    try:
        with open(tmp, "wb") as out:
            stream = iter_documents(seed)
            while written < num_bytes:
                document = next(stream)
                if fmt == "jsonl":
                    line = json.dumps({"text": document}, ensure_ascii=False) + "\n"
                else:
                    line = document.replace("\n", " ") + "\n"
                data = line.encode("utf-8")
                out.write(data)
                written += len(data)
                documents += 1
                cjk += len(_CJK.findall(document))
                non_space += len(document) - document.count(" ") - document.count("\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return CorpusSummary(path, documents, written, cjk / non_space if non_space else 0.0)


def cmd_corpus(args: argparse.Namespace) -> int:
    summary = write_corpus(args.out, int(args.size_mb * 1_000_000), seed=args.seed, fmt=args.format)
    print(summary)
    return 0


def register_cli(data_subparsers) -> None:
    """Add `megalm data corpus OUT [--size-mb 2] [--seed 0] [--format jsonl|txt]`."""
    parser = data_subparsers.add_parser(
        "corpus", help="write the built-in Chinese/English sample corpus (deterministic, generated by code)")
    parser.add_argument("out", help="output file, e.g. data/sample.jsonl")
    parser.add_argument("--size-mb", type=float, default=2.0, help="about this many megabytes (10^6 bytes)")
    parser.add_argument("--seed", type=int, default=0, help="world and text seed")
    parser.add_argument("--format", choices=("jsonl", "txt"), default="jsonl",
                        help="jsonl: {\"text\": ...} per line; txt: one document per line, newlines made spaces")
    parser.set_defaults(func=cmd_corpus)
