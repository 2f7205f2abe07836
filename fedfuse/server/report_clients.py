"""The federated part of a run's report: clients' local evaluation per round, and each client's figures.

Real federations have no central test set: each round the clients evaluate the merged model on their
own validation rows and the server keeps the example-weighted mean and every client's values. The
report shows both, and which data each client trained on (rows and SHA-256 of its file, never rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fedfuse.rounds import Contribution

MISSING = "—"
CLIENT_METRICS = {
    "train-loss": "train_loss",
    "train-seconds": "train_seconds",
    "data-rows": "data_rows",
    "data-sha256": "data_sha256",
    "empty-batches": "empty_batches",
}
"""Header metrics of an accepted update that go into the report's per-client record, by record name."""


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        return None
    return float(value)


def _fixed(value: Any, digits: int) -> str:
    number = _number(value)
    return MISSING if number is None else f"{number:.{digits}f}"


def federated_rows(history: Mapping[str, Any]) -> list[list[str]]:
    """One row per evaluated round (round 0 included when the clients evaluated the initial model)."""
    records = []
    initial = history.get("initial") or {}
    if _number(initial.get("client_loss")) is not None:
        records.append((0, initial))
    records += [(int(r.get("round", i + 1)), r) for i, r in enumerate(history.get("rounds") or [])]
    return [
        [
            str(number),
            _fixed(r.get("client_loss"), 4),
            _fixed(r.get("client_perplexity"), 2),
            _fixed(r.get("client_accuracy"), 4),
            str(len(r.get("clients") or {})),
        ]
        for number, r in records
        if _number(r.get("client_loss")) is not None
    ]


def client_rows(record: Mapping[str, Any]) -> list[list[str]]:
    """Each client of one round: data rows and fingerprint, training and local evaluation figures."""
    rows = []
    for node, values in sorted((record.get("clients") or {}).items()):
        digest = str(values.get("data_sha256") or "")
        rows.append(
            [
                node,
                str(values.get("data_rows", MISSING)),
                digest[:12] or MISSING,
                str(values.get("num_examples", MISSING)),
                _fixed(values.get("train_loss"), 4),
                _fixed(values.get("train_seconds"), 1),
                str(values.get("eval_examples", MISSING)),
                _fixed(values.get("loss"), 4),
                _fixed(values.get("perplexity"), 2),
                _fixed(values.get("accuracy"), 4),
            ]
        )
    return rows


def federated_section(
    history: Mapping[str, Any], table: Callable[[Sequence[str], Sequence[Sequence[str]]], list[str]]
) -> list[str]:
    """Markdown lines: federated evaluation per round, then the clients of the last round."""
    lines: list[str] = []
    rows = federated_rows(history)
    if rows:
        lines += ["## Federated evaluation (clients' local validation, example-weighted)", ""]
        lines += table(("round", "loss", "perplexity", "accuracy", "clients"), rows)
    rounds = history.get("rounds") or []
    if rounds and rounds[-1].get("clients"):
        lines += [f"## Clients in round {rounds[-1].get('round', len(rounds))}", ""]
        lines += table(
            (
                "client",
                "data rows",
                "data sha256",
                "train examples",
                "train loss",
                "train s",
                "eval examples",
                "loss",
                "perplexity",
                "accuracy",
            ),
            client_rows(rounds[-1]),
        )
    return lines


def federated_series(history: Mapping[str, Any], key: str) -> list[tuple[int, float]]:
    """Points (round, value) of a federated metric (``client_loss``, ``client_accuracy``), round 0 included."""
    records = []
    if history.get("initial"):
        records.append((0, history["initial"]))
    records += [(int(r.get("round", i + 1)), r) for i, r in enumerate(history.get("rounds") or [])]
    return [(number, float(r[key])) for number, r in records if _number(r.get(key)) is not None]


def train_record(contribution: Contribution) -> dict[str, Any]:
    """One accepted contribution as the report's per-client record (from its signed header)."""
    record: dict[str, Any] = {"num_examples": contribution.num_examples}
    for key, name in CLIENT_METRICS.items():
        if key in contribution.metrics:
            record[name] = contribution.metrics[key]
    return record
