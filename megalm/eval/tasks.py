"""Tasks for `megalm eval`: the JSONL format, few-shot prompts and the scoring arithmetic.

One example per line, a JSON object:

    {"context": "Lena lives in", "choices": ["Bluestone", "Pinewood"], "label": 0}
    {"template": "Review: {input}\\nSentiment:", "input": "a fine film",
     "choices": [["good", "great"], ["bad", "awful"]], "label": 0}

- `context` is the text the choices continue; or `template` with `{input}` and `input` (the context is
  the template filled with the input; contextual calibration fills it with content-free inputs).
- `choices`: one entry per class; an entry is a string or a list of strings (label expansion: several
  verbaliser words, the class's probability is the sum of its words').
- `label`: the index of the right class. Optional `separator` (default " "): joins context and choice.

A class's score (Yuan 1.0's zero/few-shot recipe): each verbaliser's log-likelihood given the
context, summed over its tokens ("sum") or averaged per token ("mean", length-normalised); a word's
probability is softmax over all the example's words; a class's is its words' total. Contextual
calibration divides the class probabilities by those the same prompt gives with the input replaced
by content-free strings ("N/A", "": their mean), then renormalises.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from megalm.data.pipeline import DataError

DEFAULT_CONTENT_FREE = ("N/A", "")
_KEYS = {"context", "template", "input", "choices", "label", "separator"}


class TaskError(DataError):
    """A task file that cannot be read: names the file, the line and what to fix."""


@dataclass(frozen=True)
class Example:
    """One multiple-choice or cloze example: a context and the verbalisers of each class."""

    choices: tuple[tuple[str, ...], ...]  # per class, its verbaliser words
    label: int
    context: Optional[str] = None
    template: Optional[str] = None
    input: Optional[str] = None
    separator: str = " "

    def prompt(self, input_text: Optional[str] = None) -> str:
        """The context; with input_text, the template filled with it (a content-free prompt)."""
        if input_text is None:
            return self.context if self.context is not None else self.template.replace("{input}", self.input)
        if self.template is not None:
            return self.template.replace("{input}", input_text)
        return input_text  # no template: the whole context is the input

    def answer(self) -> str:
        """The right class's first verbaliser (what a few-shot demonstration shows)."""
        return self.choices[self.label][0]


def parse_example(record: object, where: str) -> Example:
    """An Example from one decoded JSONL record; TaskError naming `where` (file:line) if malformed."""
    if not isinstance(record, dict):
        raise TaskError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - _KEYS)
    if unknown:
        raise TaskError(f"{where}: unknown key {unknown[0]!r}; the keys are {', '.join(sorted(_KEYS))}")
    context, template, input_text = record.get("context"), record.get("template"), record.get("input")
    if (context is None) == (template is None):
        raise TaskError(f"{where}: give either \"context\" or \"template\" (with \"input\"), not both or neither")
    if template is not None and ("{input}" not in str(template) or not isinstance(input_text, str)):
        raise TaskError(f"{where}: a \"template\" must contain {{input}} and come with a string \"input\"")
    for name, value in (("context", context), ("template", template)):
        if value is not None and not isinstance(value, str):
            raise TaskError(f"{where}: \"{name}\" must be a string")
    choices = record.get("choices")
    if not isinstance(choices, list) or len(choices) < 2:
        raise TaskError(f"{where}: \"choices\" must be a list of at least 2 classes")
    classes = []
    for index, entry in enumerate(choices):
        words = [entry] if isinstance(entry, str) else entry
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w for w in words):
            raise TaskError(f"{where}: choice {index} must be a non-empty string or a list of them (its verbalisers)")
        classes.append(tuple(words))
    label = record.get("label")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(classes):
        raise TaskError(f"{where}: \"label\" must be an integer index into the {len(classes)} choices, got {label!r}")
    separator = record.get("separator", " ")
    if not isinstance(separator, str):
        raise TaskError(f"{where}: \"separator\" must be a string")
    return Example(tuple(classes), label, context, template, input_text, separator)


def load_task(path: str | Path) -> list[Example]:
    """The examples of a JSONL task file (blank lines skipped); TaskError with file:line on a bad line."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist; give a JSONL file of examples (see docs/generate-eval.md, Task files)")
    examples = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise TaskError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
            examples.append(parse_example(record, f"{path}:{number}"))
    if not examples:
        raise TaskError(f"task file {path} holds no examples")
    return examples


def few_shot_prefix(examples: Sequence[Example], index: int, shots: int, seed: int = 0) -> str:
    """`shots` demonstrations (other examples with their right answer, one per line) for example `index`."""
    if shots <= 0:
        return ""
    others = [i for i in range(len(examples)) if i != index]
    if shots > len(others):
        raise TaskError(f"--shots {shots} needs more than {shots} examples in the task; it has {len(examples)}")
    chosen = random.Random(f"megalm-eval-shots:{seed}:{index}").sample(others, shots)
    return "".join(
        examples[i].prompt() + examples[i].separator + examples[i].answer() + "\n" for i in chosen
    )


@dataclass
class Scores:
    """Per example: each verbaliser's summed log-likelihood and token count, grouped by class."""

    logliks: list[list[float]] = field(default_factory=list)  # [class][word]
    lengths: list[list[int]] = field(default_factory=list)


def class_probabilities(scores: Scores, normalise: bool) -> list[float]:
    """Class probabilities: softmax over all words' (summed or per-token mean) log-likelihoods,
    each class the total of its words' (label expansion)."""
    values = [
        [ll / n if normalise else ll for ll, n in zip(lls, lens)]
        for lls, lens in zip(scores.logliks, scores.lengths)
    ]
    top = max(v for words in values for v in words)
    mass = [sum(math.exp(v - top) for v in words) for words in values]
    total = sum(mass)
    return [m / total for m in mass]


def calibrate(probabilities: Sequence[float], content_free: Sequence[Sequence[float]]) -> list[float]:
    """Contextual calibration: divide by the mean class probabilities of the content-free prompts, renormalise."""
    reference = [sum(column) / len(content_free) for column in zip(*content_free)]
    scaled = [p / max(r, 1e-30) for p, r in zip(probabilities, reference)]
    total = sum(scaled)
    return [s / total for s in scaled]


def argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def accuracies(
    examples: Sequence[Example], scores: Sequence[Scores], content_free: Sequence[Sequence[Scores]]
) -> dict[str, float]:
    """Accuracy of the four scorings: sum / mean log-likelihood, uncalibrated and calibrated."""
    out = {}
    for name, normalise in (("sum", False), ("mean", True)):
        plain = calibrated = 0
        for example, score, free in zip(examples, scores, content_free):
            probabilities = class_probabilities(score, normalise)
            plain += argmax(probabilities) == example.label
            reference = [class_probabilities(s, normalise) for s in free]
            calibrated += argmax(calibrate(probabilities, reference)) == example.label
        out[name] = plain / len(examples)
        out[f"{name}_calibrated"] = calibrated / len(examples)
    return out


def chance(examples: Sequence[Example]) -> float:
    """Expected accuracy of a uniform random guess."""
    return sum(1 / len(e.choices) for e in examples) / len(examples)
