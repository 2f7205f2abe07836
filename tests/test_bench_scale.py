"""``fedfuse bench scale`` on its smallest grid: two simulations, the files, the ratios and the sampled count.

K = 7 of N = 25 is a fraction (0.28) whose product with N is 7.000000000000001 in floating point: a
server that rounds it up samples 8, and the accepted-updates check (from report.json) catches it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedfuse.cli.main import app

# Tiers are marked per test here: this module mixes e2e and integration tests.


@pytest.mark.e2e
@pytest.mark.slow  # two simulations, each starting Ray and its actors: ~2.5 min on this shared 2-core machine
def test_smallest_grid_writes_points_ratios_and_accepts_exactly_k_per_round(tmp_path: Path) -> None:
    out = tmp_path / "scale"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "scale",
            "--clients",
            "8,25",
            "--sampled",
            "7",
            "--sampled-grid",
            "",
            "--rounds",
            "2",
            "--local-steps",
            "1",
            "--eval-examples",
            "16",
            "--in-process",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "scale.json").read_text())
    rows = report["rows"]
    assert [(r["sweep"], r["clients"], r["sampled"]) for r in rows] == [("clients", 8, 7), ("clients", 25, 7)]
    for row in rows:
        assert row["accepted"] == [7, 7] and row["rejected"] == [0, 0], row
        assert len(row["round_seconds"]) == 2 and row["median_round_seconds"] == row["round_seconds"][1]
        assert row["peak_rss_bytes"] > row["rss_growth_bytes"] > 0 and row["server_cpu_seconds"] > 0
        history = json.loads((out / "runs" / f"n{row['clients']}-k7" / "report.json").read_text())
        assert [r["accepted"] for r in history["rounds"]] == [7, 7]
        assert history["settings"]["fraction-train"] == 7 / row["clients"]
    smallest, largest = rows
    assert smallest["round_ratio"] == 1.0 and smallest["rss_ratio"] == 1.0
    assert largest["round_ratio"] == largest["median_round_seconds"] / smallest["median_round_seconds"]
    assert largest["rss_ratio"] == largest["peak_rss_bytes"] / smallest["peak_rss_bytes"]
    assert report["checks"][0] == {"pass": True, "check": "every round accepted exactly K updates"}
    assert len(report["checks"]) == 2
    assert (out / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "scale.md").read_text()
    assert "| clients | 25 | 7 | 7 |" in markdown and "PASS every round accepted exactly K updates" in markdown
    assert "fedfuse bench scale" in result.output


@pytest.mark.integration
def test_sampling_more_clients_than_there_are_is_refused_before_anything_runs(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "scale", "--clients", "4", "--sampled", "8", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "K=8 > N=4" in result.output
    assert not (tmp_path / "scale.json").exists()
