"""A wheel that installs (issue 26): ``python -m build`` gives an sdist and, built from it, a wheel with the
entry point and every data file fedfuse reads; installed into a fresh virtualenv it answers ``fedfuse --help``
and runs the README's first command, ``fedfuse simulate`` with no arguments, on the embedded default.

The virtualenv sees this interpreter's site-packages (torch and the other dependencies preinstalled, as the
issue allows) and pip runs with ``--no-index``: nothing is downloaded, and a dependency missing here fails the
install loudly. Every command runs from a temporary folder without ``PYTHONPATH``, so the venv's fedfuse is the
one imported, never the source tree.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _package_files() -> list[str]:
    """Every file of the package in the source tree (modules and data files), as paths in the wheel."""
    return sorted(
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "fedfuse").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo")
    )


def _run(command: list[str | Path], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """``command`` from ``cwd`` without PYTHONPATH (so nothing of the source tree is importable); must succeed."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{command}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sdist and the wheel ``python -m build`` makes (the wheel is built from the sdist), built once.

    ``--no-isolation`` builds with this interpreter's setuptools instead of downloading one (the dependency check
    still holds it to ``[build-system] requires``).
    """
    out = tmp_path_factory.mktemp("dist")
    build = [sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT]
    _run(build, cwd=out, timeout=300)
    (sdist,) = out.glob("fedfuse-*.tar.gz")
    (wheel,) = out.glob("fedfuse-*.whl")
    return {"sdist": sdist, "wheel": wheel}


@pytest.fixture(scope="module")
def venv(dist: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv over this interpreter's site-packages, with the wheel installed from the file alone."""
    folder = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", folder], cwd=folder, timeout=120)
    python = folder / "bin" / "python"
    install = [python, "-m", "pip", "install", "--no-index", "--no-input", "--disable-pip-version-check"]
    _run([*install, dist["wheel"]], cwd=folder, timeout=300)
    return folder


def test_the_wheel_carries_the_entry_point_and_every_file_of_the_package(dist: dict[str, Path]) -> None:
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        names = set(wheel.namelist())
        (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
        scripts = wheel.read(entry_points).decode()
    data_files = [name for name in _package_files() if not name.endswith(".py")]
    assert "fedfuse/eval/task_files/_skill_template.yaml" in data_files
    assert [name for name in _package_files() if name not in names] == []
    for name, target in PYPROJECT["project"]["scripts"].items():
        assert f"{name} = {target}" in scripts


def test_the_sdist_carries_the_package_and_the_example_data(dist: dict[str, Path]) -> None:
    with tarfile.open(dist["sdist"]) as sdist:
        top = sdist.getnames()[0].split("/")[0]
        names = {name.removeprefix(f"{top}/") for name in sdist.getnames()}
    expected = [*_package_files(), "pyproject.toml", "README.md", "MANIFEST.in", "examples/data/instructions.jsonl"]
    assert [name for name in expected if name not in names] == []
    assert not any(name.endswith(".pyc") or "__pycache__" in name for name in names)


def test_the_installed_fedfuse_is_the_venvs_and_answers_help(venv: Path, tmp_path: Path) -> None:
    where = _run([venv / "bin" / "python", "-c", "import fedfuse; print(fedfuse.__file__)"], tmp_path, 120)
    assert Path(where.stdout.strip()).resolve().is_relative_to(venv.resolve())
    assert not Path(where.stdout.strip()).resolve().is_relative_to(ROOT)
    shown = _run([venv / "bin" / "fedfuse", "--help"], tmp_path, 120)
    assert all(command in shown.stdout for command in ("simulate", "merge", "export"))
    tasks = _run(
        [venv / "bin" / "python", "-c", "from fedfuse.eval.tasks import TEMPLATE; print(TEMPLATE)"], tmp_path, 120
    )
    assert Path(tasks.stdout.strip()).is_file() and Path(tasks.stdout.strip()).is_relative_to(venv.resolve())


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_fedfuse_simulate_with_no_arguments_runs_from_the_venv(venv: Path, tmp_path: Path) -> None:
    """The README's first command as a new user runs it once fedfuse is installed: ``fedfuse simulate``, no arguments.

    The embedded default (MiniLM, stdlib topics, 4 LoRA clients, 4 rounds) must end with a checkpoint and a
    report, and global accuracy must clearly rise over the rounds; its output, the first screen a new user
    sees, shows no warning (the known third-party notices are silenced, see fedfuse/known_warnings.py and
    tests/test_first_screen.py). Its wall time is a benchmark figure (README), not asserted here.
    """
    done = _run([venv / "bin" / "fedfuse", "simulate"], tmp_path, 900)
    report = json.loads((tmp_path / "runs" / "fedfuse" / "report.json").read_text(encoding="utf-8"))
    accuracy = [report["initial"]["accuracy"]] + [r["accuracy"] for r in report["rounds"]]
    assert len(accuracy) == 5
    assert accuracy[-1] >= accuracy[0] + 0.3, accuracy
    assert accuracy[-1] > accuracy[1] > accuracy[0], accuracy
    assert all(r["accepted"] == 4 and r["rejected"] == 0 for r in report["rounds"])
    assert "round 4/4" in done.stderr
    output = (done.stdout + done.stderr).splitlines()
    assert [line for line in output if re.search(r"warning|DEPRECATED", line, re.IGNORECASE)] == []
    for name in ("report.md", "accuracy.png", "uplink.png", "checkpoint/state.json"):
        assert (tmp_path / "runs" / "fedfuse" / name).is_file()
