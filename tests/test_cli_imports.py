"""The CLI's help imports no heavy module: torch, Flower's simulation, matplotlib and the benchmarks load on use.

Each case runs in a fresh interpreter, so modules earlier tests imported do not count. This guards the import
set, not the time (issue 26: ``fedfuse --help`` and ``fedfuse merge --help`` within 1.5 s on an idle machine).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedfuse.cli.bench import BENCHMARKS
from fedfuse.cli.main import COMMANDS
from fedfuse.cli.merge_group import FLAG_FORM, MERGE_COMMANDS

# Tiers are marked per test here: this module mixes e2e and integration and unit tests.

HEAVY = ("torch", "transformers", "peft", "ray", "matplotlib", "flwr.simulation", "datasets", "fedfuse.bench")
"""Modules (with their submodules) no help may import."""

PROBE = """
import json, sys
from typer.testing import CliRunner
from fedfuse.cli.main import app
result = CliRunner().invoke(app, sys.argv[1:])
print(json.dumps({"exit_code": result.exit_code, "output": result.output, "modules": sorted(sys.modules)}))
"""


def _help(*args: str) -> dict:
    """``fedfuse ARGS`` run in a fresh interpreter: its exit code, output and every module it imported."""
    env = {**os.environ, "COLUMNS": "200", "TERM": "dumb"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, timeout=120, check=True
    )
    return json.loads(done.stdout.splitlines()[-1])


def _heavy(modules: list[str], allowed: tuple[str, ...] = ()) -> list[str]:
    """The heavy modules (or their submodules) among ``modules``, less ``allowed``."""
    banned = [name for name in HEAVY if name not in allowed]
    return [module for module in modules if any(module == name or module.startswith(name + ".") for name in banned)]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("args", "listed", "allowed"),
    [
        (["--help"], [command.name for command in COMMANDS], ()),
        (["merge", "--help"], ["models", "adapters", "combine", "recipe"], ()),
        (["bench", "--help"], [command.name for command in BENCHMARKS], ()),
        (["simulate", "--help"], ["--clients", "--strategy", "--run-config", "--ray-address"], ()),
        (["registry", "--help"], ["add"], ()),
    ],
    ids=["top", "merge", "bench", "simulate", "registry"],
)
def test_help_lists_its_commands_without_importing_heavy_modules(args, listed, allowed) -> None:
    result = _help(*args)
    assert result["exit_code"] == 0, result["output"]
    assert [name for name in listed if name not in result["output"]] == []
    assert _heavy(result["modules"], allowed) == []


@pytest.mark.e2e
def test_merge_help_imports_no_torch() -> None:
    assert _heavy(_help("merge", "--help")["modules"]) == []


@pytest.mark.e2e
def test_merge_help_lists_each_declared_subcommand_with_its_help_and_hides_the_flag_form() -> None:
    output = _help("merge", "--help")["output"]
    for command in MERGE_COMMANDS:
        first_line = command.help.splitlines()[0]
        assert (first_line in output) is not command.hidden, command.name
    assert FLAG_FORM not in output


@pytest.mark.e2e
def test_a_merge_subcommand_loads_with_its_declared_help_and_its_options() -> None:
    result = _help("merge", "models", "--help")
    assert result["exit_code"] == 0, result["output"]
    assert "Example: fedfuse merge models --base BASE" in result["output"]
    assert all(flag in result["output"] for flag in ("--base", "--method", "--density", "--sparsifier", "--out"))


@pytest.mark.unit
def test_simulate_clients_default_is_the_simulations() -> None:
    from fedfuse.cli.simulate import DEFAULT_CLIENTS
    from fedfuse.simulation import DEFAULT_CLIENTS as SIMULATION_DEFAULT

    assert DEFAULT_CLIENTS == SIMULATION_DEFAULT


def _assigned_names(node: ast.AST) -> list[str]:
    """The names an assignment statement binds (none for any other node)."""
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return [target.id for target in targets if isinstance(target, ast.Name)]


@pytest.mark.unit
def test_default_clients_is_declared_once() -> None:
    package = Path(__file__).resolve().parents[1] / "fedfuse"
    assigning = [
        path.relative_to(package).as_posix()
        for path in sorted(package.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if "DEFAULT_CLIENTS" in _assigned_names(node)
    ]
    assert assigning == ["defaults.py"]


@pytest.mark.integration
def test_version_prints_without_a_command() -> None:
    from typer.testing import CliRunner

    from fedfuse import __version__
    from fedfuse.cli.main import app

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == __version__


APP_DEFERRED = (
    *("opacus", "datasets", "flwr_datasets", "pandas", "pyarrow", "ray", "flwr.simulation", "fedfuse.bench"),
    *("transformers", "peft"),
)
"""Modules a Flower process of fedfuse loads only when a run uses them (DP accounting, reading or partitioning
data files, Ray, loading a model, attaching LoRA): every ClientApp process of a deployed run (one per message)
and every Ray actor imports the client app first, so each second here is paid per message and per actor; a
message that loads no model (the node-name query, SecAgg+'s share, mask and unmask stages) never pays for
transformers."""


@pytest.mark.e2e
def test_the_apps_import_no_module_that_a_run_may_not_use() -> None:
    probe = "import json, sys, fedfuse.client.app, fedfuse.server.app; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    modules = json.loads(done.stdout.splitlines()[-1])
    assert [m for m in modules if any(m == name or m.startswith(name + ".") for name in APP_DEFERRED)] == []
