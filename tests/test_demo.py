"""``fedfuse demo`` (the README's offline merge example) runs, writes loadable merges, shows TIES beating FedAvg."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedfuse.cli.main import app

pytestmark = pytest.mark.integration


def test_demo_merges_every_method_and_ties_is_closest_to_the_ideal(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path)], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    errors = {}
    for method in ("fedavg", "task_arithmetic", "ties", "dare_ties"):
        assert (tmp_path / f"merged-{method}" / "model.safetensors").is_file()
        assert (tmp_path / f"merged-{method}" / "config.json").is_file()
        row = re.search(rf"│ {method}\s+│[^\n]*", result.output)
        assert row is not None, result.output
        cells = [cell.strip() for cell in row.group(0).split("│") if cell.strip()]
        assert cells[-1] == "yes"
        errors[method] = float(cells[-2])
    assert errors["ties"] < errors["fedavg"] < errors["task_arithmetic"]
