"""The one contract between the fedfuse ServerApp and ClientApp: what a round's messages carry.

Built and parsed only here, by the server, the ClientApp and the tier gateway:

- :class:`RoundInstruction` — the config of a train or evaluate message (``server-round``, as Flower
  names it, plus the run id and the fingerprint of the round's weights);
- :class:`TrainReply` — an encoded update or partial state (one uint8 ``Array``, so Flower's chunked
  transport applies) and, when the node signs, its signature. Nothing else: node, tier, number of
  examples and client metrics live in the payload's header, which the signature covers;
- :class:`EvaluateReply` — a client's local evaluation (example count and metrics) and which data it used.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.typing import ConfigRecordValues

from fedfuse.rejections import ROUND_REASONS, Rejected
from fedfuse.rounds.engine import PayloadKind
from fedfuse.security import UpdateSignature

UPDATE_RECORD = "fedfuse.update"
PARTIAL_RECORD = "fedfuse.partial"
PAYLOAD_KEY = "payload"
METRICS_RECORD = "metrics"
CONFIG_RECORD = "config"
ARRAYS_RECORD = "arrays"
RESIDUAL_RECORD = "fedfuse.residual"
SIGNATURE_RECORD = "fedfuse.signature"
PAYLOAD_RECORDS: dict[PayloadKind, str] = {"update": UPDATE_RECORD, "partial": PARTIAL_RECORD}


def array_record(records: Mapping[str, ArrayRecord], key: str, *, ignore: Iterable[str] = ()) -> ArrayRecord | None:
    """The ArrayRecord under ``key``, else the only one there is besides ``ignore`` (Flower's one-record convention)."""
    if key in records:
        return records[key]
    others = [name for name in records if name not in set(ignore)]
    return records[others[0]] if len(others) == 1 else None


def record_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ArrayRecord's arrays as writable torch tensors in their own dtypes, by name."""
    return {name: torch.from_numpy(array.numpy().copy()) for name, array in record.items()}


class ReplyRejected(Rejected):
    """A reply that cannot be handed to the round engine: the client failed, or it carries no payload."""

    allowed: ClassVar[dict[str, str]] = {reason: ROUND_REASONS[reason] for reason in ("client_error", "no_payload")}


@dataclass(frozen=True)
class RoundInstruction:
    """What the server tells a node with each train or evaluate message."""

    server_round: int
    run_id: str = ""
    base_fingerprint: str = ""

    def to_config(self, extra: Mapping[str, ConfigRecordValues] | None = None) -> ConfigRecord:
        """As the message's config record (``extra``: the run's own train/evaluate config)."""
        return ConfigRecord(
            {
                **dict(extra or {}),
                "server-round": self.server_round,
                "run-id": self.run_id,
                "base-fingerprint": self.base_fingerprint,
            }
        )

    @classmethod
    def from_message(cls, message: Message) -> RoundInstruction:
        """Read it from a train or evaluate message."""
        config = message.content.config_records[CONFIG_RECORD]
        return cls(
            int(cast(int, config["server-round"])),
            str(config.get("run-id", "")),
            str(config.get("base-fingerprint", "")),
        )


@dataclass(frozen=True)
class TrainReply:
    """A node's answer to a train message: one payload and, optionally, its signature."""

    kind: PayloadKind
    payload: bytes
    signature: UpdateSignature | None = None

    def to_content(self) -> RecordDict:
        """As Flower message content."""
        records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {
            PAYLOAD_RECORDS[self.kind]: ArrayRecord(
                {PAYLOAD_KEY: Array(np.frombuffer(self.payload, dtype=np.uint8).copy())}
            )
        }
        if self.signature is not None:
            signed: dict[str, ConfigRecordValues] = dict(self.signature.to_config())
            records[SIGNATURE_RECORD] = ConfigRecord(signed)
        return RecordDict(records)

    def reply_to(self, message: Message) -> Message:
        """The Flower reply to ``message``."""
        return Message(content=self.to_content(), reply_to=message)

    @classmethod
    def from_content(cls, content: RecordDict) -> TrainReply:
        """Parse message content (raises :class:`ReplyRejected` ``no_payload`` when there is none)."""
        for kind, record in PAYLOAD_RECORDS.items():
            arrays = content.array_records.get(record)
            if arrays is not None and PAYLOAD_KEY in arrays:
                return cls(kind, arrays[PAYLOAD_KEY].numpy().tobytes(), _signature(content))
        raise ReplyRejected("no_payload", "reply carries neither an update nor a partial state")

    @classmethod
    def from_message(cls, message: Message) -> TrainReply:
        """Parse a reply (raises :class:`ReplyRejected` ``client_error`` when the client reported an error)."""
        if message.has_error():
            raise ReplyRejected("client_error", message.error.reason or "the client reported an error")
        return cls.from_content(message.content)


def _signature(content: RecordDict) -> UpdateSignature | None:
    """The reply's signature; an incomplete record counts as none (a run that needs one rejects it)."""
    signed = content.config_records.get(SIGNATURE_RECORD)
    if signed is None:
        return None
    try:
        return UpdateSignature.from_config(signed)
    except Rejected:
        return None


@dataclass(frozen=True)
class EvaluateReply:
    """A node's answer to an evaluate message: examples, metrics, and the data it used."""

    node: str
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    data_rows: int | None = None
    data_sha256: str | None = None

    def to_content(self) -> RecordDict:
        """As Flower message content (metrics under Flower's ``num-examples`` convention)."""
        config: dict[str, ConfigRecordValues] = {"node": self.node}
        if self.data_sha256 is not None:
            config.update({"data-rows": int(self.data_rows or 0), "data-sha256": self.data_sha256})
        metrics = MetricRecord({**{k: float(v) for k, v in self.metrics.items()}, "num-examples": self.num_examples})
        return RecordDict({METRICS_RECORD: metrics, CONFIG_RECORD: ConfigRecord(config)})

    def reply_to(self, message: Message) -> Message:
        """The Flower reply to ``message``."""
        return Message(content=self.to_content(), reply_to=message)

    @classmethod
    def from_message(cls, message: Message) -> EvaluateReply:
        """Parse a reply (raises :class:`ReplyRejected` on a client error or a reply without metrics)."""
        if message.has_error():
            raise ReplyRejected("client_error", message.error.reason or "the client reported an error")
        content = message.content
        if METRICS_RECORD not in content.metric_records:
            raise ReplyRejected("no_payload", "evaluate reply carries no metrics")
        metrics = content.metric_records[METRICS_RECORD]
        config = content.config_records.get(CONFIG_RECORD) or ConfigRecord()
        sha = config.get("data-sha256")
        return cls(
            node=str(config.get("node", "")) or "?",
            num_examples=int(cast(float, metrics.get("num-examples", 0))),
            metrics={key: float(cast(float, value)) for key, value in metrics.items() if key != "num-examples"},
            data_rows=None if sha is None else int(cast(int, config.get("data-rows", 0))),
            data_sha256=None if sha is None else str(sha),
        )
