"""The config reference (docs/config.md), generated from megalm/config/sections.py so that it cannot drift.

Every field of every section is listed with its YAML key, type (allowed values where the section
has a choice list), default and meaning. The meaning is the field's comment in
megalm/config/sections.py: the comment lines right above the field and the comment at the end of its
line, so a new field is documented where it is declared, in the style the file already has:

    seed: int = 1234  # seeds initialisation, dropout and the data order

A field without a comment is an error here (and so in the test that compares docs/config.md with
this output). Regenerate after changing a field: `megalm config-doc --output docs/config.md`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import io
import sys
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

from megalm.config import ConfigError
from megalm.config import sections as config_sections

DOC_PATH = "docs/config.md"
SOURCE_PATH = "megalm/config/sections.py"  # where every section and field is declared, with its comment
COMMAND = f"megalm config-doc --output {DOC_PATH}"


class ConfigDocError(ConfigError):
    """A config field that the reference cannot describe (no comment)."""


@functools.lru_cache(maxsize=None)
def _source() -> tuple[str, dict[int, str]]:
    """megalm/config/sections.py's text and its comments by line number."""
    text = Path(config_sections.__file__).read_text(encoding="utf-8")
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    return text, comments


def field_comments(cls: type) -> dict[str, str]:
    """{field name: its comment} for one section class: the comment lines just above the field
    (up to a blank line or another statement) followed by the comment at the end of its line(s)."""
    text, comments = _source()
    lines = text.splitlines()
    tree = ast.parse(text)
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    out = {}
    for statement in node.body:
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        above = []
        line = statement.lineno - 1
        while line >= 1 and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        trailing = [comments[n] for n in range(statement.lineno, statement.end_lineno + 1) if n in comments]
        out[statement.target.id] = " ".join(part for part in above + trailing if part)
    return out


def _type_name(annotation: Any, choices: Optional[tuple[str, ...]]) -> str:
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0]
    if choices:
        name = " \\| ".join(f"`{choice}`" for choice in choices)
    elif typing.get_origin(annotation) is list:
        name = f"list of {typing.get_args(annotation)[0].__name__}"
    else:
        name = annotation.__name__
    return f"{name} or null" if optional else name


def _default_text(field: dataclasses.Field) -> str:
    if field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        value = field.default
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return f"`{value!r}`"


def _cell(text: str) -> str:
    """Text for a markdown table cell: pipes escaped (outside and inside code spans alike)."""
    return text.replace("|", "\\|")


def section_rows(cls: type) -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) of every field of one section; ConfigDocError for an undocumented one."""
    comments = field_comments(cls)
    hints = typing.get_type_hints(cls)
    aliases = {field: alias for alias, field in cls.ALIASES.items()}
    rows = []
    for field in dataclasses.fields(cls):
        meaning = comments.get(field.name, "")
        if not meaning:
            raise ConfigDocError(
                f"{cls.SECTION}.{field.name} has no comment in {SOURCE_PATH}: describe it there "
                f"(`{field.name}: ... = ...  # what it means`), then run `{COMMAND}`"
            )
        if field.name in aliases and f"{cls.SECTION}.{aliases[field.name]}" not in meaning:
            meaning += f" (also accepted as `{cls.SECTION}.{aliases[field.name]}`)"
        rows.append((
            f"`{cls.SECTION}.{field.name}`", _type_name(hints[field.name], cls.CHOICES.get(field.name)),
            _default_text(field), _cell(meaning),
        ))
    return rows


def render() -> str:
    """docs/config.md: every section and field of megalm/config/sections.py."""
    out = [
        "# Config reference",
        "",
        f"<!-- Generated from {SOURCE_PATH} by `{COMMAND}`; do not edit by hand: "
        "tests/test_config_doc.py fails when this file and the generator disagree. -->",
        "",
        "A config is YAML with one mapping per section below; `base: other.yaml` inherits another file, and",
        "`section.key=value` on the command line overrides one key (`megalm train CONFIG optim.lr=3e-4`).",
        "Loading is strict: an unknown key, a wrong type or a value out of range is an error naming the key.",
        "`null` means unset: the meaning says what is used instead. The resolved config of a run is written",
        "to `RUN_DIR/config.yaml` and into every checkpoint.",
        "",
    ]
    for name, cls in config_sections._SECTIONS.items():
        doc = " ".join((cls.__doc__ or "").split())
        out += [f"## `{name}`", "", doc, "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        out += [f"| {key} | {kind} | {default} | {meaning} |" for key, kind, default, meaning in section_rows(cls)]
        out.append("")
    return "\n".join(out)


def cmd_config_doc(args: argparse.Namespace) -> int:
    """Print the reference, write it (--output), or check a file against it (--check)."""
    text = render()
    if args.check:
        path = Path(args.check)
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != text:
            print(f"megalm: {path} is out of date with {SOURCE_PATH}: run `{COMMAND}`", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}")
        return 0
    sys.stdout.write(text)
    return 0


def register_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "config-doc", help="print the config reference (every key, type, default, meaning) as markdown",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--output", help=f"write it to this file, e.g. {DOC_PATH}")
    target.add_argument("--check", metavar="FILE", help="exit 1 unless FILE equals the generated reference")
    parser.set_defaults(func=cmd_config_doc)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megalm.config_doc", description=__doc__)
    register_cli(parser.add_subparsers(dest="command", required=True))
    return cmd_config_doc(parser.parse_args(["config-doc", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    sys.exit(main())
