"""A run's history, typed: what each round and the initial evaluation recorded, serialized in one place.

The ServerApp fills a :class:`RunHistory` from each :class:`~fedfuse.server.round_loop.RoundOutcome`; the
checkpoint, ``report.json`` and ``fedfuse simulate`` see only :meth:`RunHistory.to_json` (flat JSON with
the field names below), and a resumed run reads it back with :meth:`RunHistory.from_json`, which tolerates
the keys older checkpoints lack. The report renders that JSON, so a ``report.json`` can be re-rendered.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import MetricRecord

from fedfuse.server.round_loop import InitialEvaluation, RoundOutcome

JSON = dict[str, Any]


def _prefixed(metrics: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The entries ``<prefix><name>`` of a metric record, by name (per-domain accuracy, rejections per reason)."""
    return {key.removeprefix(prefix): value for key, value in metrics.items() if key.startswith(prefix)}


def _known(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``data`` that are fields of dataclass ``cls`` (a newer or older file's extras ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {key: value for key, value in data.items() if key in names}


@dataclass
class EvaluationRecord:
    """An evaluation of one model: on the server's held-out split, on the clients' own rows, or both."""

    accuracy: float | None = None
    loss: float | None = None
    accuracy_per_domain: dict[str, float] | None = None
    client_accuracy: float | None = None
    client_loss: float | None = None
    client_perplexity: float | None = None
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def of_server(cls, metrics: MetricRecord) -> EvaluationRecord:
        """The server's evaluation of the initial model."""
        return cls(metrics["accuracy"], metrics["loss"], _prefixed(metrics, "accuracy."))  # type: ignore[arg-type]

    @classmethod
    def of_clients(cls, evaluation: InitialEvaluation) -> EvaluationRecord:
        """The clients' evaluation of the initial model (runs without a server-side test set)."""
        client = evaluation.client_eval
        return cls(
            client_accuracy=client.get("accuracy"),
            client_loss=client.get("loss"),
            client_perplexity=client.get("perplexity"),
            clients=dict(evaluation.clients),
        )


@dataclass
class RoundRecord(EvaluationRecord):
    """One finished round: its evaluations, what was merged and refused, bytes, timings and privacy spent."""

    round: int = 0
    train_loss: float | None = None
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    accepted: int = 0
    signatures_verified: int = 0
    rejected: int = 0
    rejections: dict[str, int] = field(default_factory=dict)
    rejection_messages: list[str] = field(default_factory=list)
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    client_phases: dict[str, float] = field(default_factory=dict)
    finished_at: float = 0.0
    broadcast: dict[str, Any] = field(default_factory=dict)
    """How the round's change went to the nodes: mode, delta and per-node bytes, relative error, version."""
    secure_aggregation: dict[str, Any] = field(default_factory=dict)
    """A secure round's counts: survivors, dropped, threshold, degree, clipped values, error bound, bytes."""
    dp_epsilon: float | None = None
    diagnostics: dict[str, Any] = field(default_factory=dict)
    """Mergeability diagnostics (``DiagnosticsReport.to_json``): absent from JSON when none were made."""
    coefficients: dict[str, Any] = field(default_factory=dict)
    """Learned merge coefficients (labels, K×G values, objective per step, bytes): absent from JSON when off."""
    lambda_search: dict[str, Any] = field(default_factory=dict)
    """The round's λ search (candidates, weighted losses, ``lambda`` chosen, bytes): absent from JSON when off."""

    @classmethod
    def of(cls, outcome: RoundOutcome) -> RoundRecord:
        """The record of a round the strategy just finished."""
        train, server, client = outcome.train, outcome.server_eval, outcome.client_eval
        return cls(
            round=outcome.round,
            accuracy=server.get("accuracy"),
            loss=server.get("loss"),
            accuracy_per_domain=_prefixed(server, "accuracy.") or None,
            train_loss=train.get("train-loss"),
            client_accuracy=client.get("accuracy"),
            client_loss=client.get("loss"),
            client_perplexity=client.get("perplexity"),
            clients=dict(outcome.clients),
            uplink_bytes=int(train.get("uplink-bytes", 0)),
            downlink_bytes=int(outcome.downlink_bytes),
            accepted=int(train.get("accepted", 0)),
            signatures_verified=int(train.get("signatures-verified", 0)),
            rejected=int(train.get("rejected", 0)),
            rejections={reason: int(n) for reason, n in _prefixed(train, "rejected.").items()},
            rejection_messages=[f"{r.node or '?'}: {r.message}" for r in outcome.rejections],
            seconds=round(float(outcome.seconds), 3),
            phases=dict(outcome.phases),
            client_phases=dict(outcome.client_phases),
            finished_at=time.time(),
            broadcast=dict(outcome.broadcast),
            secure_aggregation=_prefixed(train, "secagg-"),
            diagnostics=dict(outcome.diagnostics),
            coefficients=dict(outcome.coefficients),
            lambda_search=dict(outcome.lambda_search),
        )


@dataclass
class RunHistory:
    """Everything ``report.json`` holds about a run, round by round."""

    settings: JSON
    run_key: str
    initial: EvaluationRecord | None = None
    rounds: list[RoundRecord] = field(default_factory=list)
    server_optimizer: JSON = field(default_factory=dict)
    privacy: JSON | None = None
    """DP's mechanism and the accountant's history (``accountant_history``), when the run is private."""
    checkpoint: str | None = None
    wall_seconds: float = 0.0
    run_seconds: float | None = None
    server_memory: JSON = field(default_factory=dict)
    """The ServerApp's resident memory: ``rss_start_bytes`` (before it loaded anything), ``rss_peak_bytes``."""

    def add_round(self, record: RoundRecord) -> None:
        """Append a finished round and add its seconds to the run's wall time."""
        self.rounds.append(record)
        self.wall_seconds += record.seconds

    def to_json(self) -> JSON:
        """The history as JSON (what the checkpoint, ``report.json`` and ``fedfuse simulate`` hand on)."""
        document = dataclasses.asdict(self)
        if self.initial is not None and self.initial.accuracy is not None and not self.initial.clients:
            document["initial"] = {key: document["initial"][key] for key in ("accuracy", "loss", "accuracy_per_domain")}
        for record in document["rounds"]:
            if record["dp_epsilon"] is None:
                del record["dp_epsilon"]
            if not record["diagnostics"]:
                del record["diagnostics"]
            for optional in ("coefficients", "lambda_search"):
                if not record[optional]:
                    del record[optional]
        return {key: value for key, value in document.items() if value is not None or key == "initial"}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunHistory:
        """A history read back from a checkpoint (keys an older checkpoint lacks take their defaults)."""
        fields = _known(cls, data)
        initial = fields.get("initial")
        fields["initial"] = None if initial is None else EvaluationRecord(**_known(EvaluationRecord, initial))
        fields["rounds"] = [RoundRecord(**_known(RoundRecord, record)) for record in fields.get("rounds") or []]
        fields.setdefault("settings", {})
        fields.setdefault("run_key", "")
        return cls(**fields)
