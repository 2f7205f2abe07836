"""The shipped instruction dataset (examples/data/instructions*.jsonl) for SFT examples.

The files are what ``examples/data/make_instructions.py`` writes today, every row is a well-formed
one-question chat, the four institutions each hold enough rows, and the held-out file shares no
question or answer with the training file.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

from fedfuse.data.stdlib_topics import domain_of

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_instructions", DATA / "make_instructions.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATOR = _generator()


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()]


TRAIN = _rows(GENERATOR.TRAIN_FILE)
EVAL = _rows(GENERATOR.EVAL_FILE)


def test_shipped_files_equal_what_the_generator_writes_now(tmp_path: Path) -> None:
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if running != GENERATOR.GENERATED_WITH:
        pytest.skip(f"the files were generated from Python {GENERATOR.GENERATED_WITH}'s stdlib, this is {running}")
    for path in GENERATOR.write(tmp_path):
        shipped = DATA / path.name
        assert path.read_bytes() == shipped.read_bytes(), (
            f"{shipped} is out of date: run `python examples/data/make_instructions.py`"
        )


@pytest.mark.parametrize("rows", [TRAIN, EVAL], ids=["train", "eval"])
def test_every_row_is_a_user_question_answered_by_the_assistant(rows: list[dict]) -> None:
    for row in rows:
        assert set(row) == {"messages", "institution"}
        messages = row["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in messages)
        assert all(m["content"].strip() == m["content"] and m["content"] for m in messages)
        answer = messages[-1]["content"]
        assert answer.endswith((".", "!", "?")) and len(answer.split()) <= GENERATOR.MAX_ANSWER_WORDS, answer


def test_four_institutions_with_at_least_60_training_rows_each() -> None:
    counts = Counter(row["institution"] for row in TRAIN)
    assert set(counts) == set(GENERATOR.INSTITUTIONS) and len(counts) == 4
    assert min(counts.values()) >= 60, counts
    held_out = Counter(row["institution"] for row in EVAL)
    assert set(held_out) == set(counts) and min(held_out.values()) >= 10, held_out


@pytest.mark.parametrize("rows", [TRAIN, EVAL], ids=["train", "eval"])
def test_each_institution_asks_about_its_own_domain_of_the_stdlib(rows: list[dict]) -> None:
    for row in rows:
        name = row["messages"][0]["content"].split("`")[1]
        assert domain_of(name) == row["institution"], (name, row["institution"])


def test_train_and_eval_share_no_question_and_no_answer() -> None:
    def texts(rows: list[dict], turn: int) -> set[str]:
        return {row["messages"][turn]["content"] for row in rows}

    for turn in (0, 1):
        assert not texts(TRAIN, turn) & texts(EVAL, turn)
        assert len(texts(TRAIN, turn)) == len(TRAIN), "no duplicates within the training file"


def test_the_files_are_small() -> None:
    assert sum((DATA / name).stat().st_size for name in (GENERATOR.TRAIN_FILE, GENERATOR.EVAL_FILE)) < 300_000
