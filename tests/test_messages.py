"""The reply contract: one typed reply, built and parsed in fedfuse.messages, carrying nothing twice."""

from __future__ import annotations

import pytest
import torch

from fedfuse.messages import (
    PARTIAL_RECORD,
    SIGNATURE_RECORD,
    TIMING_RECORD,
    UPDATE_RECORD,
    EvaluateReply,
    ReplyRejected,
    RoundInstruction,
    TrainReply,
)
from fedfuse.security import UpdateSignature
from fedfuse.wire import Expectation, UpdateHeader, decode_update, encode_update

pytestmark = pytest.mark.unit

SIGNATURE = UpdateSignature("hospital-a", "run", 3, "fp", "c2ln")


def _payload() -> bytes:
    header = UpdateHeader("run", 3, "fp", "hospital-a", num_examples=12, metrics={"train-loss": 0.5}, tier="eu")
    return encode_update({"w": torch.ones(2, 2)}, header=header)


def test_a_train_reply_carries_only_its_payload_and_signature() -> None:
    content = TrainReply("update", _payload(), SIGNATURE).to_content()
    assert set(content.array_records) == {UPDATE_RECORD}
    assert set(content.config_records) == {SIGNATURE_RECORD}
    assert not content.metric_records


@pytest.mark.parametrize("kind", ["update", "partial"])
def test_a_train_reply_parses_back_to_what_was_sent(kind) -> None:
    sent = TrainReply(kind, _payload(), SIGNATURE)
    content = sent.to_content()
    assert set(content.array_records) == {UPDATE_RECORD if kind == "update" else PARTIAL_RECORD}
    assert TrainReply.from_content(content) == sent


def test_a_train_reply_carries_the_clients_phase_timings_beside_the_payload() -> None:
    sent = TrainReply("update", _payload(), None, {"train": 1.5, "encode": 0.25, "total": 2.0})
    content = sent.to_content()
    assert dict(content.metric_records[TIMING_RECORD]) == {"train": 1.5, "encode": 0.25, "total": 2.0}
    assert TrainReply.from_content(content) == sent


def test_timings_that_are_not_finite_non_negative_numbers_are_dropped() -> None:
    content = TrainReply("update", _payload(), None, {"train": 1.0}).to_content()
    record = content.metric_records[TIMING_RECORD]
    record["encode"], record["sign"], record["data"] = -1.0, float("nan"), float("inf")
    assert TrainReply.from_content(content).timing == {"train": 1.0}


def test_node_tier_examples_and_metrics_travel_in_the_signed_header_only() -> None:
    reply = TrainReply.from_content(TrainReply("update", _payload()).to_content())
    header = decode_update(reply.payload, expect=Expectation({"w": (2, 2)})).header
    assert (header.node_id, header.tier, header.num_examples, header.metrics) == (
        "hospital-a",
        "eu",
        12,
        {"train-loss": 0.5},
    )
    assert reply.signature is None


def test_a_reply_without_payload_is_refused_as_no_payload() -> None:
    with pytest.raises(ReplyRejected) as refused:
        TrainReply.from_content(EvaluateReply("n", 3, {"loss": 1.0}).to_content())
    assert refused.value.reason == "no_payload"


def test_an_incomplete_signature_record_counts_as_unsigned() -> None:
    content = TrainReply("update", _payload(), SIGNATURE).to_content()
    del content.config_records[SIGNATURE_RECORD]["signature"]
    assert TrainReply.from_content(content).signature is None


def test_the_round_instruction_uses_flowers_server_round_key() -> None:
    config = RoundInstruction(4, "run", "fp").to_config({"lr": 0.1})
    assert dict(config) == {"lr": 0.1, "server-round": 4, "run-id": "run", "base-fingerprint": "fp", "run-key": ""}


def test_an_evaluate_reply_round_trips_with_flowers_num_examples_key() -> None:
    sent = EvaluateReply("hospital-a", 40, {"accuracy": 0.75, "loss": 0.9}, data_rows=400, data_sha256="ab")
    content = sent.to_content()
    assert content.metric_records["metrics"]["num-examples"] == 40

    class Reply:
        def __init__(self, content):
            self.content = content

        def has_error(self) -> bool:
            return False

    assert EvaluateReply.from_message(Reply(content)) == sent
