"""docs/config.md is generated from megalm/config/sections.py and must not drift; `megalm --help` lists every command."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from megalm import config_doc
from megalm.cli import build_parser, main
from megalm.config import _SECTIONS, sections

ROOT = Path(__file__).resolve().parents[1]


def test_the_committed_reference_is_the_generators_output() -> None:
    committed = (ROOT / config_doc.DOC_PATH).read_text(encoding="utf-8")
    assert committed == config_doc.render(), f"docs/config.md is stale: run `{config_doc.COMMAND}` and commit it"


def test_the_source_path_named_in_messages_is_the_file_read() -> None:
    assert (ROOT / config_doc.SOURCE_PATH).resolve() == Path(sections.__file__).resolve()


def test_every_field_has_a_row_with_type_default_and_meaning() -> None:
    text = config_doc.render()
    for section, cls in _SECTIONS.items():
        for field in dataclasses.fields(cls):
            row = re.search(rf"^\| `{section}\.{field.name}` \| (.+?) \| (.+?) \| (.+) \|$", text, re.MULTILINE)
            assert row, f"{section}.{field.name} has no row"
            assert all(cell.strip() for cell in row.groups()), row.group(0)
    assert "| `train.init_from` | str or null | `null` | Fine-tune from weights" in text
    assert "| `parallel.schedule` | `1f1b` \\| `gpipe` \\| `interleaved` | `1f1b` |" in text  # choices, pipes escaped
    assert "| `optim.eps` | float | `1e-08` | AdamW's epsilon |" in text


def test_a_field_without_a_comment_is_an_error_naming_it(monkeypatch) -> None:
    text, comments = config_doc._source()
    line = next(n for n, comment in comments.items() if comment == "transformer layers")
    monkeypatch.setattr(config_doc, "_source", lambda: (text, {n: c for n, c in comments.items() if n != line}))
    with pytest.raises(config_doc.ConfigDocError, match=r"model\.num_layers has no comment in megalm/config/sections\.py"):
        config_doc.render()


def test_comments_above_a_field_and_at_its_end_both_count() -> None:
    comments = config_doc.field_comments(_SECTIONS["parallel"])
    assert comments["recompute"].startswith("Activation recompute (docs/precision.md")
    assert comments["recompute_layers"].startswith("full only: recompute the first N layers")  # not the block above


def test_config_doc_command_writes_and_checks(tmp_path: Path, capsys) -> None:
    out = tmp_path / "config.md"
    assert main(["config-doc", "--output", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == config_doc.render()
    assert main(["config-doc", "--check", str(out)]) == 0
    out.write_text(out.read_text(encoding="utf-8").replace("transformer layers", "layers"), encoding="utf-8")
    capsys.readouterr()
    assert main(["config-doc", "--check", str(out)]) == 1
    assert "is out of date with megalm/config/sections.py: run `megalm config-doc --output docs/config.md`" in capsys.readouterr().err


def test_top_level_help_lists_every_command_on_one_line(capsys) -> None:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    described = {action.dest: action.help for action in commands._choices_actions}
    assert set(described) == set(commands.choices)  # every command in the table has a description
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for name, help_text in described.items():
        assert help_text and "\n" not in help_text, name
        assert re.search(rf"^ +{re.escape(name)} +{re.escape(help_text)}$", text, re.MULTILINE), (name, text)
