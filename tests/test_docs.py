"""README.md and docs/*.md stay true to the code: every `megalm` command and flag they show exists in
the real parser (megalm.cli.build_parser), every `section.key` they name is a real config key, and
every relative link, repository path and `megalm.module.name` they give exists."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from megalm.cli import build_parser
from megalm.config import Config

ROOT = Path(__file__).resolve().parents[1]


def pages(root: Path = ROOT) -> list[Path]:
    """README.md and every page under docs/."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


# ---- extraction ----------------------------------------------------------------------------------

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_INLINE = re.compile(r"`([^`\n]+)`")


def code_snippets(text: str) -> list[str]:
    """Every command-like snippet: each line of a fenced block (continuation lines joined, `#`
    comments cut) and each inline code span outside the blocks."""
    snippets = []
    for block in _FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            snippets.append(re.split(r"(?:^|\s)#", line, maxsplit=1)[0])
    snippets += _INLINE.findall(_FENCE.sub("", text))
    return snippets


# `megalm SUB` starting a command (not a value: `--model megalm`), `python -m megalm.cli SUB` or
# `torchrun ... -m megalm.cli SUB`; a word in capitals (`megalm COMMAND --help`) is a placeholder.
_COMMAND = re.compile(r"(?:(?:^|[;&|(])\s*(?:[A-Z_]+=\S*\s+)*megalm|-m megalm\.cli)\s+(?=[a-z-])")
_END = re.compile(r"\s(?:\||;|&&|>|2>)\s")


def command_uses(snippet: str) -> list[tuple[list[str], list[str]]]:
    """[(command words, flags)] of each `megalm ...` invocation in one snippet."""
    uses = []
    for match in _COMMAND.finditer(snippet):
        rest = _END.split(snippet[match.end():], maxsplit=1)[0]
        tokens = [token.strip("[](),") for token in rest.split()]
        words = []
        while tokens and re.fullmatch(r"[a-z][a-z0-9-]*", tokens[0]) and len(words) < 2:
            words.append(tokens.pop(0))
        flags = [token.split("=", 1)[0] for token in tokens if re.match(r"--?[A-Za-z]", token)]
        uses.append((words, flags))
    return uses


def parser_problems(uses: list[tuple[list[str], list[str]]], parser: argparse.ArgumentParser) -> list[str]:
    """What the parser does not have: an unknown command or a flag no parser on the path accepts."""
    problems = []
    for words, flags in uses:
        current, path = parser, ["megalm"]
        for word in words:
            subparsers = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
            if not subparsers:
                break  # a positional argument (a config path, a checkpoint) rather than a command
            if word not in subparsers[0].choices:
                problems.append(f"`{' '.join([*path, word])}`: no such command (known: {sorted(subparsers[0].choices)})")
                current = None
                break
            current, path = subparsers[0].choices[word], [*path, word]
        if current is None:
            continue
        for flag in flags:
            if flag not in current._option_string_actions:
                problems.append(f"`{' '.join(path)} {flag}`: no such option")
    return problems


def all_options(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of the parser and of all its subcommands, at any depth."""
    options = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                options |= all_options(subparser)
    return options


def loose_flags(text: str) -> list[str]:
    """Flags shown on their own in inline code (`--no-cache`, `--top-k K`), outside any command."""
    return [span.split()[0].split("=", 1)[0] for span in _INLINE.findall(_FENCE.sub("", text))
            if re.match(r"--[a-z][a-z0-9-]*(?:[ =]|$)", span)]


# `section.key` anywhere (prose, code, `key=value`), not inside a module path (`megalm.data.x`,
# `torch.distributed`), a file path (`megalm/train.py`) or a file name (`train.py`, `data.bin`).
_FILE_SUFFIXES = {"py", "yaml", "yml", "md", "sh", "json", "jsonl", "bin", "idx", "pt", "txt", "sbatch", "model",
                  "safetensors"}


def config_keys_named(text: str, sections: set[str]) -> list[str]:
    """Every `section.key` the text names, for the config's own sections."""
    pattern = rf"(?<![\w./-])({'|'.join(sorted(sections))})\.([a-z_][a-z0-9_]*)(?![\w/]|\.\w)"
    return [f"{s}.{k}" for s, k in re.findall(pattern, text) if k not in _FILE_SUFFIXES]


def config_keys() -> dict[str, set[str]]:
    """{section: accepted keys} of the real Config: every field and every alias."""
    config = Config()
    keys = {}
    for section in dataclasses.fields(Config):
        cls = type(getattr(config, section.name))
        keys[section.name] = {f.name for f in dataclasses.fields(cls)} | set(getattr(cls, "ALIASES", {}))
    return keys


_DOTTED = re.compile(r"(?<![\w./-])megalm(?:\.[a-z_][a-z0-9_]*)+")


def python_name_problems(text: str) -> list[str]:
    """Dotted names in code spans (`megalm.data.dataset.pair_prefix`, `python -m megalm.plan.measure`)
    that name no module, or no top-level definition (or class member) in the module's source."""
    problems = []
    for name in sorted({name for snippet in code_snippets(text) for name in _DOTTED.findall(snippet)}):
        parts = name.split(".")
        module = next(i for i in range(len(parts), 0, -1) if _module_exists(".".join(parts[:i])))
        spec = importlib.util.find_spec(".".join(parts[:module]))
        scope = ast.parse(Path(spec.origin).read_text(encoding="utf-8")).body if spec and spec.origin else []
        for part in parts[module:]:
            found = [node for node in scope if part in _defined_names(node)]
            if not found:
                problems.append(f"`{name}`: {'.'.join(parts[:module])} defines no {part!r}")
                break
            scope = found[0].body if isinstance(found[0], ast.ClassDef) else []
    return problems


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _defined_names(node: ast.stmt) -> set[str]:
    """The names one module- or class-level statement defines."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return {n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name)}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return set()


_LINK = re.compile(r"\]\(([^)\s]+)\)")
_REPO_PATH = re.compile(r"(?<![\w./-])((?:megalm|tests|scripts|configs|launch|examples|docs|\.ci)/[\w./-]*)")


def path_problems(page: Path, root: Path = ROOT) -> list[str]:
    """Relative links that lead nowhere, and repository paths in code spans that do not exist; a
    `name/` package also resolves as the module `name.py` (a module split into a package keeps its name)."""
    text = page.read_text(encoding="utf-8")
    problems = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        if not (page.parent / target.split("#", 1)[0]).exists():
            problems.append(f"link ({target}) points at no file")
    for snippet in code_snippets(text):
        for path in _REPO_PATH.findall(snippet):
            path = path.rstrip(".")
            if "*" in path or re.search(r"[A-Z]{3}", path):
                continue  # a glob or a placeholder (RUN_DIR)
            where = root / path
            if not (where.exists() or (path.endswith("/") and where.with_suffix(".py").exists())):
                problems.append(f"`{path}` does not exist")
    return problems


def page_problems(page: Path, parser: argparse.ArgumentParser, root: Path = ROOT) -> list[str]:
    """Every way one page disagrees with the code, each naming the page."""
    text = page.read_text(encoding="utf-8")
    uses = [use for snippet in code_snippets(text) for use in command_uses(snippet)]
    problems = parser_problems(uses, parser)
    known = all_options(parser) | all_options(get_args_parser())  # megalm's and torchrun's options
    problems += [f"`{flag}`: no megalm command (or torchrun) has this option" for flag in loose_flags(text)
                 if flag not in known]
    problems += python_name_problems(text)
    keys = config_keys()
    for key in config_keys_named(text, set(keys)):
        section, name = key.split(".")
        if name not in keys[section]:
            problems.append(f"`{key}` is not a config key (see docs/config.md)")
    problems += path_problems(page, root)
    return [f"{page.relative_to(root)}: {problem}" for problem in dict.fromkeys(problems)]


# ---- the pages -----------------------------------------------------------------------------------


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_commands_flags_keys_and_links_of_every_page_exist(page: Path) -> None:
    problems = page_problems(page, build_parser())
    assert not problems, "\n".join(problems)


def test_the_readme_names_both_commands_and_links_every_doc_page() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "bash scripts/test.sh" in readme  # .ci/run calls "the test command written in README.md"
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "bash examples/quickstart.sh" in readme
    assert len(readme.splitlines()) < 250, "README.md: keep it short, move detail to a docs/ page"
    linked = set(_LINK.findall(readme))
    for page in pages()[1:]:
        assert f"docs/{page.name}" in linked, f"README.md links no docs/{page.name}"


# ---- the checker catches what it must, and only that ---------------------------------------------


def test_extraction_finds_commands_flags_and_keys_in_code_and_prose() -> None:
    text = (
        "Run `megalm train configs/tiny.yaml --dry-run train.steps=3`, or under torchrun:\n\n"
        "```bash\n"
        "torchrun --standalone --nproc-per-node 4 -m megalm.cli generate runs/x --tp 2 \\\n"
        "    --prompt hi   # megalm vs a baseline: a comment\n"
        "megalm data corpus out.jsonl --size-mb 2 | head\n"
        "python -m megalm.eval.harness --model megalm --tasks t\n"
        "```\n\n"
        "With parallel.tp set (and `optim.lr: 1e-3`) megalm.data.dataset, megalm/train.py, train.py "
        "configs/tiny.yaml, PREFIX.bin and checkpoint.async are fine.\n"
    )
    uses = [use for snippet in code_snippets(text) for use in command_uses(snippet)]
    assert uses == [
        (["generate"], ["--tp", "--prompt"]),
        (["data", "corpus"], ["--size-mb"]),
        (["train"], ["--dry-run"]),
    ]
    assert config_keys_named(text, set(config_keys())) == ["train.steps", "parallel.tp", "optim.lr", "checkpoint.async"]


def test_planted_mistakes_in_a_copy_of_a_page_are_each_reported(tmp_path: Path) -> None:
    for entry in ROOT.iterdir():  # the repository, with README.md a copy to plant mistakes in
        if entry.name != "README.md":
            (tmp_path / entry.name).symlink_to(entry)
    page = tmp_path / "README.md"
    original = (ROOT / "README.md").read_text(encoding="utf-8")
    page.write_text(original, encoding="utf-8")
    parser = build_parser()
    assert page_problems(page, parser, tmp_path) == [], "the README itself should be clean"
    planted = {
        "`megalm train configs/tiny.yaml --dryrun`": "`megalm train --dryrun`: no such option",
        "`megalm trian configs/tiny.yaml`": "`megalm trian`: no such command",
        "```bash\nmegalm data corpus x.jsonl --size 2\n```": "`megalm data corpus --size`: no such option",
        "`megalm generate runs/x --tp 2 --top_k 5`": "`megalm generate --top_k`: no such option",
        "Pass `--no-kv-cache` to check.": "`--no-kv-cache`: no megalm command (or torchrun) has this option",
        "Set train.micro_batch to 2.": "`train.micro_batch` is not a config key",
        "`parallel.tensor_parallel=2`": "`parallel.tensor_parallel` is not a config key",
        "```bash\nmegalm train configs/tiny.yaml optim.lrr=3e-4   # a comment\n```": "`optim.lrr` is not a config key",
        "`megalm.data.dataset.pair_prefx`": "`megalm.data.dataset.pair_prefx`: megalm.data.dataset defines no 'pair_prefx'",
        "`python -m megalm.plan.measures`": "`megalm.plan.measures`: megalm.plan defines no 'measures'",
        "[the guide](docs/nowhere.md)": "link (docs/nowhere.md) points at no file",
        "`configs/tiny-typo.yaml`": "`configs/tiny-typo.yaml` does not exist",
    }
    for mistake, report in planted.items():
        page.write_text(original + "\n" + mistake + "\n", encoding="utf-8")
        problems = page_problems(page, parser, tmp_path)
        assert len(problems) == 1 and problems[0].startswith(f"README.md: {report}"), (mistake, problems)
