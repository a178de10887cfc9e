"""The package's shape: short modules, no import cycle among megalm's own modules, a docstring everywhere."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "megalm"
MAX_LINES = 600


def _module_name(path: Path, root: Path) -> str:
    """megalm/data/corpus.py -> megalm.data.corpus; megalm/data/__init__.py -> megalm.data."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {_module_name(path, package.parent): path for path in sorted(package.rglob("*.py"))}


def _imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """The megalm modules that `path` imports anywhere in its body (top level, in functions, relative).

    `from megalm.a import b` counts as importing megalm.a.b when that is a module, else megalm.a;
    importing a submodule does not count as importing the package that holds it (a package's
    __init__ may re-export its submodules without that being a cycle)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {module for module in found if module in known and module != name}


def _import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = _modules(package)
    known = set(modules)
    return {name: _imported_modules(path, name, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """An import cycle (a path a -> ... -> a from its first module by name), if there is one."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        ring = error.args[1][:0:-1]  # graphlib reads graph[a] as a's predecessors: its cycle runs backwards
        start = ring.index(min(ring))
        return [ring[start:] + ring[:start + 1]]
    return []


def test_no_module_is_longer_than_600_lines() -> None:
    lengths = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in _modules().items()}
    too_long = {name: lines for name, lines in lengths.items() if lines > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines (split them along their seams): {too_long}"


def test_no_import_cycle_among_megalm_modules() -> None:
    cycles = _cycles(_import_graph())
    assert not cycles, "import cycles in megalm: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_every_package_and_module_has_a_docstring() -> None:
    missing = [
        name for name, path in _modules().items()
        if not ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    ]
    assert not missing, f"modules without a docstring (say in one line what is there): {missing}"


def _write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root / "megalm"


@pytest.mark.parametrize("statement", [
    "import megalm.a",
    "from megalm.a import f",
    "from megalm import a",
    "from .. import a",
    "from ..a import f",
    "def g():\n    from megalm.a import f",
])
def test_the_cycle_finder_sees_every_kind_of_import(tmp_path: Path, statement: str) -> None:
    package = _write(tmp_path, {
        "megalm/__init__.py": '"""p."""\n',
        "megalm/a.py": '"""a."""\nfrom megalm.sub.b import h\n',
        "megalm/sub/__init__.py": '"""sub."""\n',
        "megalm/sub/b.py": f'"""b."""\n{statement}\n',
    })
    assert _cycles(_import_graph(package)) == [["megalm.a", "megalm.sub.b", "megalm.a"]]


def test_a_package_reexporting_its_submodules_is_no_cycle(tmp_path: Path) -> None:
    package = _write(tmp_path, {
        "megalm/__init__.py": '"""p."""\n',
        "megalm/config/__init__.py": '"""c."""\nfrom megalm.config.fields import E\nfrom .loading import load\n',
        "megalm/config/fields.py": '"""f."""\n',
        "megalm/config/loading.py": '"""l."""\nfrom megalm.config.fields import E\n',
        "megalm/user.py": '"""u."""\nfrom megalm.config import load\n',
    })
    graph = _import_graph(package)
    assert graph["megalm.config"] == {"megalm.config.fields", "megalm.config.loading"}
    assert graph["megalm.user"] == {"megalm.config"}
    assert _cycles(graph) == []
