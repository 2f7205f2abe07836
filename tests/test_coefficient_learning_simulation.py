"""Federated coefficient learning in a real ``fedfuse simulate`` run (Ray): the report carries the coefficients."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from own_data_helpers import chat_rows, write_jsonl
from tiny_runs import TINY_RUN

from fedfuse.simulation import simulate

pytestmark = pytest.mark.e2e


def test_a_simulated_round_learns_its_coefficients_and_reports_them(tmp_path: Path, tiny_chat_llama_dir: Path):
    write_jsonl(tmp_path / "chat.jsonl", chat_rows(32, institutions=2))
    overrides = {
        **TINY_RUN, "model": str(tiny_chat_llama_dir), "task": "sft", "data": str(tmp_path / "chat.jsonl"),
        "partition": "iid", "max-length": 24, "num-server-rounds": 1, "output-dir": str(tmp_path / "run"),
        "coefficient-learning": "loss", "coefficient-steps": 3, "coefficient-groups": 2,
    }  # fmt: skip
    simulate(overrides, num_clients=2)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    record = report["rounds"][0]["coefficients"]
    assert record["labels"] == ["partition-0", "partition-1"] and record["nodes"] == 2 and not record["dropped"]
    assert [len(row) for row in record["coefficients"]] == [2, 2] and len(record["history"]) == 3
    assert record["bytes_down_candidates"] > 0 and record["bytes_up"] > 0
    assert "Learned merge coefficients" in (tmp_path / "run" / "report.md").read_text()
