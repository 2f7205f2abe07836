"""docs/architecture.md names only files, modules and attributes that exist, and the README links it, not ../shared."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
READMES = (ROOT / "README.md", ROOT / "deploy" / "README.md")

PATH = re.compile(r"(?<![\w/.-])((?:fedfuse|tests)/[\w/.-]*)")
"""A repository path the doc names: ``fedfuse/rounds/engine.py``, ``fedfuse/server/``, ``tests/test_layers.py``."""

DOTTED = re.compile(r"(?<![\"\w.])fedfuse(?:\.\w+)+")
"""A dotted name ``fedfuse.x.y``; one written in double quotes is a string (entry-point group, record name)."""


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _module_file(parts: list[str]) -> Path | None:
    """The file of module ``fedfuse.<parts>`` (a module or a package), or None."""
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def _top_level_names(path: Path) -> frozenset[str]:
    """Names a module defines or imports at top level (classes, functions, assignments, imports)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return frozenset(names)


def _resolves(dotted: str) -> bool:
    """``fedfuse.a.b`` is a module, or a module plus one top-level name defined or imported in it."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        found = _module_file(parts[:split])
        if found is not None:
            rest = parts[split:]
            return not rest or (len(rest) == 1 and rest[0] in _top_level_names(found))
    return False


def _tree_modules() -> set[str]:
    """The modules the package tree (the doc's first ``text`` block) lists, as paths from the repo root."""
    block = _doc().split("```text\n", 1)[1].split("```", 1)[0]
    listed, folder = set(), ""
    for line in block.splitlines():
        first = line.split()[0] if line.strip() else ""
        if line.startswith("fedfuse/"):
            folder = first
        elif first.endswith(".py"):
            listed.add(folder + first)
    return listed


def test_every_path_the_doc_names_exists() -> None:
    missing = sorted({path for path in PATH.findall(_doc()) if not (ROOT / path.rstrip(".")).exists()})
    assert missing == []


def test_every_fedfuse_module_or_attribute_the_doc_names_exists() -> None:
    names = set(DOTTED.findall(_doc()))
    assert names, "the doc names no fedfuse.x module: the pattern is wrong"
    assert sorted(name for name in names if not _resolves(name)) == []


def test_the_package_tree_lists_every_module_and_only_modules_that_exist() -> None:
    package = {str(path.relative_to(ROOT)) for path in (ROOT / "fedfuse").rglob("*.py") if path.name != "__init__.py"}
    listed = _tree_modules()
    assert {"not in the tree": sorted(package - listed), "not in the package": sorted(listed - package)} == {
        "not in the tree": [],
        "not in the package": [],
    }


def test_the_readmes_link_the_architecture_doc_and_nothing_under_shared() -> None:
    assert {str(p.relative_to(ROOT)): "../shared" in p.read_text(encoding="utf-8") for p in READMES} == {
        str(p.relative_to(ROOT)): False for p in READMES
    }
    assert "docs/architecture.md" in READMES[0].read_text(encoding="utf-8")


def test_the_checks_catch_a_name_that_does_not_exist() -> None:
    assert _resolves("fedfuse.rounds.engine.RoundEngine") and _resolves("fedfuse.wire")
    assert not _resolves("fedfuse.rounds.aggregator") and not _resolves("fedfuse.wire.NoSuchThing")
    assert not _resolves("fedfuse.rounds.engine.RoundEngine.offer")
    assert PATH.findall("see `fedfuse/server/aggregator.py` and tests/test_x.py.") == [
        "fedfuse/server/aggregator.py",
        "tests/test_x.py.",
    ]
    assert DOTTED.findall('group `"fedfuse.trainers"` and `fedfuse.rounds`') == ["fedfuse.rounds"]
