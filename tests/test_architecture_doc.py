"""The docs name only files, modules and attributes that exist; the README links the architecture doc, not ../shared.

docs/architecture.md is checked closely (its package tree lists every module); every other page (README.md,
CONTRIBUTING.md, deploy/README.md, docs/**/*.md, found when the test runs) for the paths and names it cites.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
READMES = (ROOT / "README.md", ROOT / "deploy" / "README.md")


def _pages() -> list[Path]:
    """Every page of the docs as it is now: the READMEs, CONTRIBUTING.md and docs/**/*.md."""
    contributing = [ROOT / "CONTRIBUTING.md"] if (ROOT / "CONTRIBUTING.md").is_file() else []
    return [*READMES, *contributing, *sorted((ROOT / "docs").rglob("*.md"))]


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


def _upper_case_string(node: ast.stmt) -> str | None:
    """The string of ``NAME = "..."`` (or ``NAME: str = "..."``) at module level, else None."""
    if isinstance(node, ast.Assign):
        targets, value = node.targets, node.value
    elif isinstance(node, ast.AnnAssign):
        targets, value = [node.target], node.value
    else:
        return None
    named = all(isinstance(target, ast.Name) and target.id.isupper() for target in targets)
    return value.value if named and isinstance(value, ast.Constant) and isinstance(value.value, str) else None


@cache
def _string_constants() -> frozenset[str]:
    """``"fedfuse.…"`` strings the package assigns to upper-case names (entry-point groups, record names)."""
    return frozenset(
        value
        for path in (ROOT / "fedfuse").rglob("*.py")
        for node in ast.parse(path.read_text(encoding="utf-8")).body
        if (value := _upper_case_string(node)) is not None and value.startswith("fedfuse.")
    )


def test_every_path_a_page_names_exists() -> None:
    missing = {
        str(page.relative_to(ROOT)): sorted(
            {p for p in PATH.findall(page.read_text(encoding="utf-8")) if not (ROOT / p.rstrip(".")).exists()}
        )
        for page in _pages()
    }
    assert {page: paths for page, paths in missing.items() if paths} == {}


def test_every_fedfuse_name_a_page_names_is_a_module_an_attribute_or_a_group() -> None:
    unknown = {
        str(page.relative_to(ROOT)): sorted(
            {name for name in DOTTED.findall(page.read_text(encoding="utf-8")) if not _resolves(name)}
            - _string_constants()
        )
        for page in _pages()
    }
    assert {page: names for page, names in unknown.items() if names} == {}


def test_the_readmes_link_the_architecture_doc_and_no_page_links_anything_under_shared() -> None:
    assert {str(p.relative_to(ROOT)): "../shared" in p.read_text(encoding="utf-8") for p in _pages()} == {
        str(p.relative_to(ROOT)): False for p in _pages()
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
    assert "fedfuse.trainers" in _string_constants() and "fedfuse.rounds.nothing" not in _string_constants()
