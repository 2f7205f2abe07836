"""The README's first command, ``fedfuse simulate`` with no arguments, as a user runs it.

The embedded default (MiniLM, stdlib topics, 4 LoRA clients, 4 rounds) must end with a checkpoint and a
report, and global accuracy must clearly rise over the rounds; its output, the first screen a new user
sees, shows no warning (the known third-party notices are silenced, see fedfuse/known_warnings.py and
tests/test_first_screen.py). Its wall time is a benchmark figure
(README), not asserted here: this machine is shared.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.timeout(1200)
def test_fedfuse_simulate_with_no_arguments(tmp_path):
    done = subprocess.run(
        ["fedfuse", "simulate"],  # the console script, as the README types it
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "runs" / "fedfuse" / "report.json").read_text())
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
