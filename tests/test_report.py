"""Run report: the files write_report leaves, what the markdown says, and the terminal summary table."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from fedfuse.server.report import MISSING, format_bytes_mb, summary_table, write_report

pytestmark = pytest.mark.unit

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FILES = {"json": "report.json", "markdown": "report.md", "accuracy_plot": "accuracy.png", "uplink_plot": "uplink.png"}


def make_history(rounds: int = 3, evaluated: bool = True) -> dict[str, Any]:
    """A run of ``rounds`` rounds over two domains; ``evaluated=False`` is a run with server evaluation off."""
    records = []
    for number in range(1, rounds + 1):
        accuracy = 0.3 + 0.1 * number if evaluated else None
        records.append(
            {
                "round": number,
                "accuracy": accuracy,
                "loss": 2.0 - 0.3 * number if evaluated else None,
                "accuracy_per_domain": {"email": accuracy + 0.05, "gui": accuracy - 0.05} if evaluated else None,
                "train_loss": 2.1 - 0.3 * number,
                "client_accuracy": None,
                "uplink_bytes": 1_234_567 * number,
                "downlink_bytes": 9_999_999,
                "accepted": 4,
                "rejected": 1 if number == 2 else 0,
                "rejections": {"wrong_round": 1} if number == 2 else {},
                "seconds": 12.3,
            }
        )
    return {
        "settings": {"strategy": "fedavg", "mode": "lora", "num-server-rounds": rounds},
        "initial": {"accuracy": 0.11, "loss": 2.3, "accuracy_per_domain": {"email": 0.1, "gui": 0.2}}
        if evaluated
        else None,
        "rounds": records,
        "wall_seconds": 95.2,
        "checkpoint": "runs/x/checkpoint/state.json",
    }


def round_lines(markdown: str) -> list[str]:
    """The rows of the per-round table (the lines after its header, up to the blank line)."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| round | accuracy |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Path]]:
    history = make_history()
    return history, write_report(history, tmp_path_factory.mktemp("run") / "report")


def test_write_report_writes_the_four_files_into_a_new_folder(report):
    _, paths = report
    assert set(paths) == set(FILES)
    for key, name in FILES.items():
        assert paths[key].name == name
        assert paths[key].is_file()
    assert sorted(p.name for p in paths["json"].parent.iterdir()) == sorted(FILES.values()), "no .tmp left behind"


def test_report_json_round_trips_to_the_history(report):
    history, paths = report
    text = paths["json"].read_text()
    assert json.loads(text) == history
    assert text == json.dumps(history, indent=2, sort_keys=True) + "\n"


def test_markdown_has_a_row_per_round_and_the_final_accuracy(report):
    history, paths = report
    markdown = paths["markdown"].read_text()
    rows = round_lines(markdown)
    assert [row.split("|")[1].strip() for row in rows] == ["1", "2", "3"]
    final = f"{history['rounds'][-1]['accuracy']:.4f}"
    assert final in rows[-1]
    assert f"Final accuracy: {final} (round 3)" in markdown


def test_markdown_shows_settings_megabytes_domains_and_rejections(report):
    _, paths = report
    markdown = paths["markdown"].read_text()
    assert "| strategy | fedavg |" in markdown
    assert "| num-server-rounds | 3 |" in markdown
    assert format_bytes_mb(1_234_567 * 3) in round_lines(markdown)[-1]
    assert "| domain | initial (round 0) | round 3 | change |" in markdown
    assert "| email | 0.1000 | 0.6500 | +0.5500 |" in markdown
    assert "| wrong_round | 1 |" in markdown


@pytest.mark.parametrize("key", ["accuracy_plot", "uplink_plot"])
def test_plots_are_png_files_of_more_than_a_kilobyte(report, key):
    _, paths = report
    data = paths[key].read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 1024


def test_a_run_without_server_evaluation_still_gets_every_file(tmp_path):
    history = make_history(evaluated=False)
    paths = write_report(history, tmp_path)
    for path in paths.values():
        assert path.is_file()
    for key in ("accuracy_plot", "uplink_plot"):
        assert paths[key].read_bytes().startswith(PNG_SIGNATURE)
    markdown = paths["markdown"].read_text()
    for row in round_lines(markdown):
        accuracy, loss = (cell.strip() for cell in row.split("|")[2:4])
        assert accuracy == loss == MISSING
    assert "No server evaluation per domain." in markdown
    assert "## Rejections by reason" in markdown


def test_an_older_report_in_the_folder_is_replaced(tmp_path):
    write_report(make_history(rounds=3), tmp_path)
    shorter = make_history(rounds=1)
    paths = write_report(shorter, tmp_path)
    assert json.loads(paths["json"].read_text()) == shorter
    assert len(round_lines(paths["markdown"].read_text())) == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_an_interrupted_run_says_how_far_it_got(tmp_path):
    history = make_history(rounds=2)
    history["settings"]["num-server-rounds"] = 5
    del history["checkpoint"]
    markdown = write_report(history, tmp_path)["markdown"].read_text()
    assert "Interrupted: 2 of 5 rounds finished." in markdown
    assert "Checkpoint" not in markdown


def test_a_run_with_no_round_yet_is_reported(tmp_path):
    paths = write_report({"settings": {}, "initial": None, "rounds": []}, tmp_path)
    assert "No round finished." in paths["markdown"].read_text()
    assert paths["accuracy_plot"].read_bytes().startswith(PNG_SIGNATURE)
    assert summary_table({"rounds": []}).row_count == 0


def test_write_report_does_not_modify_the_history(tmp_path):
    history = make_history()
    before = copy.deepcopy(history)
    write_report(history, tmp_path)
    assert history == before


def test_summary_table_has_one_row_per_round_and_the_markdown_columns():
    table = summary_table(make_history(rounds=3))
    assert table.title == "fedfuse run summary"
    assert table.row_count == 3
    assert [column.header for column in table.columns] == [
        "round",
        "accuracy",
        "loss",
        "train loss",
        "uplink MB",
        "downlink MB",
        "accepted",
        "rejected",
        "seconds",
    ]
    assert list(table.columns[1].cells) == ["0.4000", "0.5000", "0.6000"]


def test_format_bytes_mb_uses_decimal_megabytes_with_two_decimals():
    assert format_bytes_mb(0) == "0.00"
    assert format_bytes_mb(1_000_000) == "1.00"
    assert format_bytes_mb(9_999_999) == "10.00"
    assert format_bytes_mb(123_456) == "0.12"
