"""A run's history is typed while the run goes and serialized in one place (``RunHistory.to_json``).

The checkpoint, ``report.json`` and ``fedfuse simulate`` see the JSON; a resumed run reads it back, and what
it reads back serializes to the same JSON, whatever an older checkpoint lacked.
"""

from __future__ import annotations

import json

import pytest
from flwr.app import ArrayRecord, MetricRecord

from fedfuse.rejections import Rejection
from fedfuse.server.history import EvaluationRecord, RoundRecord, RunHistory
from fedfuse.server.round_loop import InitialEvaluation, RoundOutcome

pytestmark = pytest.mark.unit


def _outcome(round_number: int) -> RoundOutcome:
    return RoundOutcome(
        round=round_number,
        arrays=ArrayRecord(),
        train={"accepted": 2, "rejected": 1, "rejected.non_finite": 1, "uplink-bytes": 300, "train-loss": 0.5},
        client_eval={"accuracy": 0.75, "loss": 0.6},
        server_eval={"accuracy": 0.8, "loss": 0.4, "accuracy.cardiac": 0.9},
        rejections=[Rejection("hospital-b", "non_finite", "tensor 'w' has NaN or infinite values")],
        clients={"hospital-a": {"num_examples": 10}},
        downlink_bytes=1200,
        seconds=1.23456,
        phases={"wait": 1.0},
        client_phases={"train": 0.8},
    )


def test_a_round_record_reads_the_engines_counts_and_the_evaluations_of_its_outcome() -> None:
    record = RoundRecord.of(_outcome(3))
    assert (record.round, record.accepted, record.rejected, record.rejections) == (3, 2, 1, {"non_finite": 1})
    assert (record.accuracy, record.accuracy_per_domain, record.client_accuracy) == (0.8, {"cardiac": 0.9}, 0.75)
    assert record.rejection_messages == ["hospital-b: tensor 'w' has NaN or infinite values"]
    assert (record.uplink_bytes, record.downlink_bytes, record.seconds, record.train_loss) == (300, 1200, 1.235, 0.5)


def test_the_history_round_trips_through_its_json_as_a_checkpoint_and_a_resume_see_it() -> None:
    history = RunHistory({"strategy": "fedavg"}, "run-1")
    history.initial = EvaluationRecord.of_clients(InitialEvaluation({"accuracy": 0.5}, {"a": {"eval_examples": 4}}))
    history.privacy = {"dp": "central", "accountant_history": [[1.0, 0.5, 1]]}
    for number in (1, 2):
        record = RoundRecord.of(_outcome(number))
        record.dp_epsilon = 0.1 * number
        history.add_round(record)
    document = json.loads(json.dumps(history.to_json()))
    assert RunHistory.from_json(document).to_json() == document
    assert document["wall_seconds"] == 2 * 1.235 and [r["dp_epsilon"] for r in document["rounds"]] == [0.1, 0.2]


def test_a_server_evaluated_initial_model_keeps_three_keys_and_dp_epsilon_appears_only_with_dp() -> None:
    history = RunHistory({}, "run-1", initial=EvaluationRecord.of_server(MetricRecord({"accuracy": 0.5, "loss": 1.0})))
    history.add_round(RoundRecord.of(_outcome(1)))
    document = history.to_json()
    assert document["initial"] == {"accuracy": 0.5, "loss": 1.0, "accuracy_per_domain": {}}
    assert "dp_epsilon" not in document["rounds"][0] and "privacy" not in document


def test_an_older_checkpoints_history_reads_back_with_defaults_for_what_it_lacks() -> None:
    old = {"settings": {"strategy": "ties"}, "initial": None, "rounds": [{"round": 1, "accepted": 3, "retired": 1}]}
    history = RunHistory.from_json(old)
    assert history.run_key == "" and history.rounds[0].accepted == 3 and history.rounds[0].rejections == {}
