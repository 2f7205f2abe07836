"""``flwr run .`` from the repository root runs the fedfuse apps on Flower's local simulation SuperLink."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import psutil
import pytest
from tiny_runs import TINY_RUN

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("flwr") is None, reason="the flwr command is not installed"),
]


def _stop_processes_mentioning(marker: str) -> None:
    """Stop the local SuperLink (and its simulation process) that flwr started for this FLWR_HOME."""
    victims = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(process.info["cmdline"] or []):
                victims.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for process in victims:
        process.terminate()
    _, alive = psutil.wait_procs(victims, timeout=10)
    for process in alive:
        process.kill()


def test_flwr_run_from_the_repo_root(tmp_path):
    home, out = tmp_path / "flwr-home", tmp_path / "run"
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    settings = {**TINY_RUN, "num-server-rounds": 1, "eval-examples": 64}
    run_config = " ".join(f"{key}={value}" for key, value in settings.items()) + f' output-dir="{out}"'
    try:
        done = subprocess.run(
            ["flwr", "run", ".", "--stream", "--run-config", run_config],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
    finally:
        _stop_processes_mentioning(str(home))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [r["accepted"] for r in report["rounds"]] == [2]
    assert (out / "checkpoint" / "state.json").is_file()
