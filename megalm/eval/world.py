"""A built-in zero-shot task from the embedded corpus's world (megalm/data/corpus.py).

For every person of the world of a seed, cloze questions on four facts the corpus states (town,
job, favourite colour, food), in English and in Chinese, each with every value of that attribute
as a choice: chance is 1/12, 1/16, 1/11 and 1/15. Each example is a template over the person's name,
so contextual calibration replaces the name by content-free inputs.

What is held out: the corpus generator (megalm/data/corpus.py) never states directly a quarter of
the people's towns, jobs, colours and foods (8 people per attribute, drawn from the seed); those facts
are left to inference from other text (resident lists, daily routines, dialogue replies, meals).
`world` (NAME) scores only these held-out facts (64 examples); `world-seen` (SEEN) the facts the
corpus states (192 examples), i.e. what a short training memorised.
"""

from __future__ import annotations

from megalm.data.corpus import _COLOURS, _FOODS, _JOBS, _article, build_world
from megalm.eval.tasks import Example

NAME, SEEN = "world", "world-seen"


def world_task(seed: int = 0, held_out: bool = True) -> list[Example]:
    """The built-in task's examples for the world of corpus seed `seed`: the facts the corpus holds
    out (held_out=True) or those it states."""
    world = build_world(seed)
    towns_en = tuple((town.en,) for town in world.towns)
    towns_zh = tuple((town.zh,) for town in world.towns)
    jobs_en = tuple((_article(job[0]) + ".",) for job in _JOBS)
    jobs_zh = tuple((job[1],) for job in _JOBS)
    colours_en = tuple((colour[0] + ".",) for colour in _COLOURS)
    colours_zh = tuple((colour[1],) for colour in _COLOURS)
    foods_en = tuple((food[0] + ".",) for food in _FOODS)
    foods_zh = tuple((food[1],) for food in _FOODS)
    examples = []
    for person in world.people:
        for attribute, template, choices, label, separator, name in (
            ("town", "{input} lives in", towns_en, person.town, " ", person.en),
            ("town", "{input}住在", towns_zh, person.town, "", person.zh),
            ("job", "{input} works as", jobs_en, person.job, " ", person.en),
            ("job", "{input}是一名", jobs_zh, person.job, "", person.zh),
            ("colour", "{input}'s favourite colour is", colours_en, person.colour, " ", person.en),
            ("colour", "{input}最喜欢的颜色是", colours_zh, person.colour, "", person.zh),
            ("food", "{input} likes to eat", foods_en, person.food, " ", person.en),
            ("food", "{input}喜欢吃", foods_zh, person.food, "", person.zh),
        ):
            if (attribute in person.held) != held_out:
                continue
            examples.append(Example(choices, label, template=template, input=name, separator=separator))
    return examples
