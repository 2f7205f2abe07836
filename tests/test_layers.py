"""The layers import only downward: algebra → strategies → wire → rounds → settings → client/server glue → cli/bench."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[1] / "fedfuse"

ALLOWED = {
    "rejections": set(),
    "timing": set(),
    "algebra": set(),
    "secagg": set(),
    "strategies": {"algebra"},
    "wire": {"algebra", "strategies", "rejections"},
    "rounds": {"algebra", "strategies", "wire", "rejections", "secagg"},
    "settings": {"algebra", "strategies", "wire", "rejections", "rounds", "checkpoints", "secagg"},
    "client": {
        "algebra",
        "strategies",
        "wire",
        "rejections",
        "rounds",
        "settings",
        "messages",
        "security",
        "training",
        "data",
        "models",
        "checkpoints",
        "known_warnings",
        "timing",
        "secagg",
        "automerge",
    },
    "server": {
        "algebra",
        "strategies",
        "wire",
        "rejections",
        "rounds",
        "settings",
        "messages",
        "security",
        "training",
        "data",
        "models",
        "checkpoints",
        "known_warnings",
        "timing",
        "secagg",
        "automerge",
    },
    "flower": {"client", "server", "secagg"},
    "automerge": {
        "algebra",
        "strategies",
        "wire",
        "checkpoints",
        "offline",
        "training",
        "models",
        "data",
        "settings",
        "eval",  # the lm-eval scorer runs fedfuse eval's harness (eval imports only models)
    },
}
"""For each layer, the fedfuse top-level modules/packages it may import (itself always)."""


def _fedfuse_imports(path: Path) -> set[str]:
    """The top-level fedfuse modules a file imports (``fedfuse.wire.header`` → ``wire``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        names |= {module.split(".")[1] for module in modules if module.startswith("fedfuse.")}
    return names


def _files(layer: str) -> list[Path]:
    single = PACKAGE / f"{layer}.py"
    return [single] if single.exists() else sorted((PACKAGE / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_the_layers_below_it(layer: str) -> None:
    offending = {
        str(path.relative_to(PACKAGE)): sorted(_fedfuse_imports(path) - ALLOWED[layer] - {layer})
        for path in _files(layer)
    }
    assert {path: names for path, names in offending.items() if names} == {}


def test_the_client_never_imports_the_server_and_the_server_never_imports_the_client() -> None:
    assert all("server" not in _fedfuse_imports(path) for path in _files("client"))
    assert all("client" not in _fedfuse_imports(path) for path in _files("server"))


MAX_BODY_LINES = 60
"""The most lines a function's body (after its signature and docstring) may take outside the benches."""


def _body_lines(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return 0 if not body else (function.end_lineno or 0) - body[0].lineno + 1


def test_no_function_body_is_longer_than_60_lines_outside_bench() -> None:
    """With ruff's C901 and PLR0915 (pyproject.toml), the complexity gate: long functions are split by job."""
    long = {
        f"{path.relative_to(PACKAGE)}:{node.name}": lines
        for path in PACKAGE.rglob("*.py")
        if "bench" not in path.relative_to(PACKAGE).parts
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (lines := _body_lines(node)) > MAX_BODY_LINES
    }
    assert long == {}
