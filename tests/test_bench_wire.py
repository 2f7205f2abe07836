"""``fedfuse bench wire`` at a tiny size: every row, target and file is produced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from fedfuse.bench.wire import wire

pytestmark = pytest.mark.integration

CASES = {"dense", "TIES d=0.05", "TIES d=0.1", "TIES d=0.2", "DARE p=0.8", "DARE p=0.9", "DARE p=0.95"}


def run(*args: str):
    app = typer.Typer()
    app.command()(wire)
    return CliRunner().invoke(app, list(args))


def test_tiny_bench_writes_every_row_target_and_fuzz_result(tmp_path: Path) -> None:
    result = run("--params", "20000", "--repeat", "1", "--out", str(tmp_path), "--fuzz", "200")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "wire.json").read_text())
    rows = report["rows"]
    assert {(r["case"], r["values"]) for r in rows} >= {(c, v) for c in CASES for v in ("float32", "bfloat16")}
    flower = next(r for r in rows if r["case"].startswith("Flower"))
    dense = next(r for r in rows if r["case"] == "dense" and r["values"] == "float32")
    assert abs(dense["bytes_per_param"] - 4) < 0.2 and abs(flower["bytes_per_param"] - 4) < 0.2
    dare = {r["values"]: r for r in rows if r["case"] == "DARE p=0.9"}
    assert dare["bfloat16"]["encodings"] == "dare"
    assert dare["bfloat16"]["bytes"] < dare["float32"]["bytes"] < dense["bytes"]
    assert all(r["encode_ms"] > 0 and r["decode_ms"] > 0 for r in rows)
    assert len(report["targets"]) == 3 and report["fingerprint"]["mbps"] > 0
    assert report["fuzz"]["examples"] == 200 and report["fuzz"]["escaped"] is None
    markdown = (tmp_path / "wire.md").read_text()
    assert "| DARE p=0.9 | bfloat16 | dare |" in markdown
    assert markdown.count("PASS") + markdown.count("FAIL") == 4
    assert "examples/s" in result.output


def test_the_thread_setting_is_restored_afterwards(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    result = run("--params", "2000", "--repeat", "1", "--out", str(tmp_path), "--threads", "1")
    assert result.exit_code == 0, result.output
    assert "(torch threads: 1)" in result.output
    assert torch.get_num_threads() == before


def test_check_flag_fails_when_a_target_is_missed(tmp_path: Path) -> None:
    result = run("--params", "2000", "--repeat", "1", "--out", str(tmp_path), "--check")
    assert "FAIL DARE p=0.9 bf16" in result.output
    assert result.exit_code == 1
