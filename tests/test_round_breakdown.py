"""Round breakdown: phases summed per name; the compute bound is training over clients at once plus evaluation."""

from __future__ import annotations

import math

import pytest

from fedfuse.bench.breakdown import breakdown, breakdown_table, median_ratio, round_walls
from fedfuse.timing import Phases, reported_phases

pytestmark = pytest.mark.unit


def test_phases_sum_every_block_of_the_same_name_also_when_it_raises() -> None:
    phases = Phases()
    for _ in range(3):
        with phases("train"):
            pass
    with pytest.raises(RuntimeError), phases("encode"):
        raise RuntimeError("boom")
    phases.add("train", 2.0)
    assert set(phases.seconds) == {"train", "encode"}
    assert 2.0 <= phases.seconds["train"] < 2.1 and phases.seconds["encode"] >= 0


def test_reported_phases_keep_only_finite_non_negative_numbers() -> None:
    raw = {"train": 1, "sign": 0.5, "bad": -1.0, "nan": math.nan, "flag": True, "text": "3"}
    assert reported_phases(raw) == {"train": 1.0, "sign": 0.5}


def _history() -> dict:
    def record(number: int, finished_at: float, seconds: float, train: float) -> dict:
        return {
            "round": number,
            "finished_at": finished_at,
            "seconds": seconds,
            "phases": {"broadcast": 0.5, "wait": 8.0, "evaluation": 1.0, "checkpoint": 0.2},
            "client_phases": {"train": train, "total": train + 2.0, "replies": 4},
        }

    return {"rounds": [record(1, 100.0, 30.0, 16.0), record(2, 112.0, 11.0, 16.0), record(3, 126.0, 13.0, 20.0)]}


def test_round_walls_run_from_one_round_end_to_the_next() -> None:
    assert round_walls(_history()["rounds"]) == pytest.approx([30.0, 12.0, 14.0])


def test_the_bound_divides_training_by_the_clients_that_run_at_once_and_adds_evaluation() -> None:
    rows = breakdown(_history(), parallel=2)
    assert [row.at_once for row in rows] == [2, 2, 2]
    assert rows[1].bound == pytest.approx(16.0 / 2 + 1.0)
    assert rows[1].ratio == pytest.approx(12.0 / 9.0)
    assert rows[2].client_mean["train"] == pytest.approx(5.0)
    assert median_ratio(rows) == pytest.approx((12.0 / 9.0 + 14.0 / 11.0) / 2)
    assert breakdown(_history(), parallel=8)[1].bound == pytest.approx(16.0 / 4 + 1.0)


def test_the_table_has_a_column_per_round_and_a_row_per_reported_phase() -> None:
    columns, rows = breakdown_table(breakdown(_history(), parallel=2))
    assert columns == ["", "round 1", "round 2", "round 3"]
    names = [row[0] for row in rows]
    assert all(len(row) == 4 for row in rows)
    assert "client train (mean)" in names and "server evaluation" in names and "server finalize" not in names
    assert rows[names.index("wall / bound")][2] == f"{12.0 / 9.0:.3f}"
