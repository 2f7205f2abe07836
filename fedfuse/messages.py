"""The one contract between the fedfuse ServerApp and ClientApp: what a round's messages carry.

Built and parsed only here, by the server, the ClientApp and the tier gateway:

- :class:`RoundInstruction` — the config of a train or evaluate message (``server-round``, as Flower
  names it, plus the run id and the round's model version, under the key ``base-fingerprint``);
- :class:`TrainReply` — an encoded update or partial state (one uint8 ``Array``, so Flower's chunked
  transport applies), when the node signs its signature, and the client's phase timings (unsigned
  diagnostics, :mod:`fedfuse.timing`). Node, tier, number of examples and client metrics live in the
  payload's header, which the signature covers;
- :class:`EvaluateReply` — a client's local evaluation (example count and metrics) and which data it used;
- the model sync (:func:`sync_records`, :func:`read_sync`) — what brings a node to the round's model
  version: nothing, the broadcast deltas it lacks (dense or as factors), or the whole change;
- :class:`NodeName` — a node's stable name (its institution or partition), asked once per node with a
  ``query`` message, so the server samples and folds nodes in an order that survives a resume
  (Flower's node ids are drawn at random by each simulation);
- :class:`CoefficientRequest` / :class:`CoefficientReply` — the extra stages of a round that learns its merge
  coefficients (the candidates once, then K×G coefficients per step; a value, a K×G gradient and a count back)
  or picks its λ (the round's change once with the candidate λs; a loss per λ and a count back).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.typing import ConfigRecordValues
from flwr.common.constant import ErrorCode

from fedfuse.rejections import ROUND_REASONS, Rejected
from fedfuse.rounds.broadcast import Delta
from fedfuse.rounds.engine import PayloadKind
from fedfuse.rounds.versions import Step, Sync, VersionMismatch
from fedfuse.security import UpdateSignature
from fedfuse.timing import reported_phases

UPDATE_RECORD = "fedfuse.update"
PARTIAL_RECORD = "fedfuse.partial"
PAYLOAD_KEY = "payload"
METRICS_RECORD = "metrics"
CONFIG_RECORD = "config"
ARRAYS_RECORD = "arrays"
RESIDUAL_RECORD = "fedfuse.residual"
SYNC_RECORD = "fedfuse.sync"
"""The arrays of a model sync (``state/<name>``, ``step<i>/<name>``, ``step<i>/<name>@B`` ...)."""
SYNC_CONFIG_RECORD = "fedfuse.sync.config"
"""The sync's versions (``version``, ``sources``, ``targets``), its kind and its bfloat16 arrays' keys."""
SIGNATURE_RECORD = "fedfuse.signature"
TIMING_RECORD = "fedfuse.timing"
SECAGG_RECORD = "fedfuse.secagg"
"""A secure-aggregation stage: the server's request (``stage``, setup, what it forwards) or a node's reply."""
SECAGG_CLEAR_METRICS = ("train-loss", "train-seconds")
"""What a node tells the server in the clear beside its keys and name (documented in the security guide)."""
SECAGG_VECTOR_RECORD = "fedfuse.secagg.vector"
"""A ``mask`` reply's masked vector, as a uint8 Array (Flower's chunked transport carries large arrays)."""
SECAGG_STATE_RECORD = "fedfuse.secagg.state"
"""What a node keeps in ``Context.state`` between the stages of one secure round (its secrets, its input)."""
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


def _to_array(tensor: torch.Tensor) -> Array:
    """A tensor as a Flower Array (bfloat16, which numpy lacks, travels as its int16 bits)."""
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return Array(tensor.detach().cpu().contiguous().numpy())


def sync_records(sync: Sync) -> tuple[ArrayRecord, ConfigRecord]:
    """A model sync as one ArrayRecord and its ConfigRecord (versions, the bfloat16 arrays' keys)."""
    arrays: dict[str, torch.Tensor] = {}
    if sync.state is not None:
        arrays = {f"state/{name}": tensor for name, tensor in sync.state.items()}
    for index, step in enumerate(sync.steps):
        arrays.update({f"step{index}/{name}": tensor for name, tensor in step.delta.arrays().items()})
    config: dict[str, ConfigRecordValues] = {
        "version": sync.version,
        "kind": "state" if sync.state is not None else "steps",
        "sources": [step.source for step in sync.steps],
        "targets": [step.target for step in sync.steps],
        "bfloat16": [key for key, tensor in arrays.items() if tensor.dtype == torch.bfloat16],
    }
    return ArrayRecord({key: _to_array(tensor) for key, tensor in arrays.items()}), ConfigRecord(config)


def read_sync(content: RecordDict) -> Sync | None:
    """The model sync a message carries, or None (a message from before versions, or a plain Flower one)."""
    record = content.array_records.get(SYNC_RECORD)
    config = content.config_records.get(SYNC_CONFIG_RECORD)
    if record is None or config is None:
        return None
    bf16 = set(cast(list[str], config.get("bfloat16", [])))
    arrays = {}
    for key, array in record.items():
        tensor = torch.from_numpy(array.numpy())  # np.load gives a fresh, writable array: no second copy
        arrays[key] = tensor.view(torch.bfloat16) if key in bf16 else tensor
    version = str(config["version"])
    if config.get("kind") == "state":
        prefix = "state/"
        return Sync(version, state={key.removeprefix(prefix): t for key, t in arrays.items()})
    sources, targets = cast(list[str], config.get("sources", [])), cast(list[str], config.get("targets", []))
    steps = []
    for index, (source, target) in enumerate(zip(sources, targets, strict=True)):
        prefix = f"step{index}/"
        delta = Delta.from_arrays({k.removeprefix(prefix): t for k, t in arrays.items() if k.startswith(prefix)})
        steps.append(Step(source, target, delta))
    return Sync(version, tuple(steps))


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_EXCEPTION_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning)\b.*)$")
MAX_REASON = 300


def short_reason(text: str | None) -> str:
    """A client's error as one short line: terminal colour codes removed, the exception line of a traceback kept.

    Flower passes a failed ClientApp's whole traceback (with Ray's colour codes in simulation); a
    report needs the last ``SomeError: message`` line, capped at :data:`MAX_REASON` characters.
    """
    lines = [line.strip() for line in _ANSI.sub("", text or "").splitlines() if line.strip()]
    if not lines:
        return "the client reported an error"
    exceptions = [i for i, line in enumerate(lines) if _EXCEPTION_LINE.match(line)]
    index = exceptions[-1] if exceptions else len(lines) - 1
    line = lines[index]
    if line.endswith(":") and index + 1 < len(lines):  # Flower's "ClientAppException:" with the message below
        line = f"{line} {lines[index + 1]}"
    return line if len(line) <= MAX_REASON else line[: MAX_REASON - 1] + "…"


class ReplyRejected(Rejected):
    """A reply that cannot be handed to the round engine: the client failed, or it carries no payload."""

    allowed: ClassVar[dict[str, str]] = {
        reason: ROUND_REASONS[reason] for reason in ("client_error", "node_unavailable", "no_payload")
    }


def reply_error_reason(message: Message) -> str:
    """``node_unavailable`` (the SuperLink answered for a lost node), ``version_mismatch`` or ``client_error``."""
    if message.error.code == ErrorCode.NODE_UNAVAILABLE:
        return "node_unavailable"
    return "version_mismatch" if VersionMismatch.reason + ":" in (message.error.reason or "") else "client_error"


def instruction_destinations(instructions: Iterable[Message]) -> dict[str, int]:
    """Message id → destination node of instructions the grid has pushed (it assigns the ids on push)."""
    return {m.metadata.message_id: int(m.metadata.dst_node_id) for m in instructions if m.metadata.message_id}


def reply_node(reply: Message, destinations: Mapping[str, int]) -> int:
    """The node a reply answers for, from the instruction it replies to (``destinations``: message id → node).

    An error the SuperLink makes itself (the node stopped sending heartbeats) comes from the SuperLink's
    own node id; only the instruction it answers names the node. Other replies come from that node.
    """
    return int(destinations.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id))


@dataclass(frozen=True)
class RoundInstruction:
    """What the server tells a node with each train or evaluate message."""

    server_round: int
    run_id: str = ""
    base_fingerprint: str = ""
    run_key: str = ""
    """Names the run across resumes (the first Flower run's id): nodes key the state they keep on disk by it."""

    def to_config(self, extra: Mapping[str, ConfigRecordValues] | None = None) -> ConfigRecord:
        """As the message's config record (``extra``: the run's own train/evaluate config)."""
        return ConfigRecord(
            {
                **dict(extra or {}),
                "server-round": self.server_round,
                "run-id": self.run_id,
                "base-fingerprint": self.base_fingerprint,
                "run-key": self.run_key,
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
            str(config.get("run-key", "")),
        )


@dataclass(frozen=True)
class TrainReply:
    """A node's answer to a train message: one payload and, optionally, its signature and phase timings."""

    kind: PayloadKind
    payload: bytes
    signature: UpdateSignature | None = None
    timing: Mapping[str, float] = field(default_factory=dict)
    """Seconds per client phase (:data:`fedfuse.timing.CLIENT_PHASES` and ``total``); not signed, never trusted."""

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
        if self.timing:
            records[TIMING_RECORD] = MetricRecord({name: float(value) for name, value in self.timing.items()})
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
                timing = content.metric_records.get(TIMING_RECORD)
                phases = reported_phases(dict(timing)) if timing is not None else {}
                return cls(kind, arrays[PAYLOAD_KEY].numpy().tobytes(), _signature(content), phases)
        raise ReplyRejected("no_payload", "reply carries neither an update nor a partial state")

    @classmethod
    def from_message(cls, message: Message) -> TrainReply:
        """Parse a reply (raises :class:`ReplyRejected` ``client_error``/``node_unavailable`` on an error reply)."""
        if message.has_error():
            raise ReplyRejected(reply_error_reason(message), short_reason(message.error.reason))
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
            raise ReplyRejected(reply_error_reason(message), short_reason(message.error.reason))
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


IDENTIFY_QUERY = "identify"
"""The ``fedfuse`` entry of the config record of a query message that asks a node for its name."""


@dataclass(frozen=True)
class NodeName:
    """A node's answer to the identify query: the stable name it trains and reports under."""

    name: str

    @staticmethod
    def query(node_id: int) -> Message:
        """The query message that asks node ``node_id`` for its name."""
        content = RecordDict({CONFIG_RECORD: ConfigRecord({"fedfuse": IDENTIFY_QUERY})})
        return Message(content=content, dst_node_id=node_id, message_type="query")

    @staticmethod
    def is_query(message: Message) -> bool:
        """Whether ``message`` is the identify query."""
        config = message.content.config_records.get(CONFIG_RECORD)
        return config is not None and config.get("fedfuse") == IDENTIFY_QUERY

    def reply_to(self, message: Message) -> Message:
        """The Flower reply to the query ``message``."""
        return Message(content=RecordDict({CONFIG_RECORD: ConfigRecord({"node": self.name})}), reply_to=message)

    @classmethod
    def from_message(cls, message: Message) -> NodeName | None:
        """The name in a reply, or None when the node answered with an error or without a name."""
        if message.has_error():
            return None
        config = message.content.config_records.get(CONFIG_RECORD)
        name = None if config is None else config.get("node")
        return cls(name) if isinstance(name, str) and name else None


def secagg_records(record: Mapping[str, object]) -> RecordDict:
    """A stage reply as content: its fields in a ConfigRecord, a masked vector moved into an ArrayRecord.

    The ConfigRecord keeps the vector's SHA-256 (``masked-sha256``), so a signature over it binds the vector.
    """
    fields = dict(record)
    masked = fields.pop("masked", None)
    content = RecordDict()
    if isinstance(masked, bytes):
        fields["masked-sha256"] = hashlib.sha256(masked).hexdigest()
        vector = Array(np.frombuffer(masked, dtype=np.uint8).copy())
        content[SECAGG_VECTOR_RECORD] = ArrayRecord({PAYLOAD_KEY: vector})
    content[SECAGG_RECORD] = ConfigRecord(fields)  # type: ignore[arg-type]
    return content


def read_secagg(content: RecordDict) -> dict[str, object] | None:
    """A stage reply's fields (the masked vector back as bytes); None if absent.

    Raises ``ValueError`` when the vector does not match the SHA-256 its (signed) fields name.
    """
    record = content.config_records.get(SECAGG_RECORD)
    if record is None:
        return None
    fields: dict[str, object] = dict(record)
    vector = content.array_records.get(SECAGG_VECTOR_RECORD)
    digest = fields.get("masked-sha256")
    if vector is not None and PAYLOAD_KEY in vector and isinstance(digest, str):
        masked = vector[PAYLOAD_KEY].numpy().tobytes()
        if hashlib.sha256(masked).hexdigest() != digest:
            raise ValueError("the masked vector does not match its SHA-256 (changed in transit)")
        fields["masked"] = masked
    return fields


COEFFICIENTS_RECORD = "fedfuse.coefficients"
"""A coefficient stage: the server's request (stage, round, coefficients, …) or a node's reply (values, gradient)."""
COEFFICIENTS_ARRAYS = "fedfuse.coefficients.arrays"
"""The candidates (``<k>/<name>``, factored ``<k>/<name>@B`` / ``@A``) or the round's change (``0/<name>``)."""
COEFFICIENT_STAGES = ("setup", "step", "lambda")


@dataclass(frozen=True)
class CoefficientRequest:
    """A coefficient stage sent to a contributing node (a ``train`` message that trains nothing).

    ``setup`` carries the K candidates (one :class:`~fedfuse.rounds.Delta` each, with every name's layer group)
    and the first coefficients; ``step`` only the K×G coefficients (row-major); ``lambda`` the round's change
    (one Delta) and the candidate λs. ``version`` is the model version the node must hold (the round's).
    """

    stage: str
    server_round: int
    run_key: str
    version: str
    objective: str = "loss"
    shape: tuple[int, int] = (0, 0)
    coefficients: tuple[float, ...] = ()
    lambdas: tuple[float, ...] = ()
    labels: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    groups: tuple[int, ...] = ()
    batch_size: int = 8
    vectors: tuple[Delta, ...] = ()

    def config(self) -> ConfigRecord:
        """The request's fields as a ConfigRecord (everything but the arrays)."""
        return ConfigRecord(
            {
                "stage": self.stage, "server-round": self.server_round, "run-key": self.run_key,
                "version": self.version, "objective": self.objective, "shape": list(self.shape),
                "coefficients": [float(v) for v in self.coefficients], "lambdas": [float(v) for v in self.lambdas],
                "labels": list(self.labels), "names": list(self.names), "groups": list(self.groups),
                "batch-size": self.batch_size,
            }
        )  # fmt: skip

    def arrays(self) -> ArrayRecord:
        """The vectors' arrays, ``<k>/<array name>`` (empty for a ``step``)."""
        arrays = {f"{k}/{name}": _to_array(t) for k, v in enumerate(self.vectors) for name, t in v.arrays().items()}
        return ArrayRecord(arrays)

    def to_message(self, node: int, arrays: ArrayRecord | None = None) -> Message:
        """The train message to ``node`` (``arrays``: the vectors' record, shared by every node's message)."""
        content = RecordDict({COEFFICIENTS_RECORD: self.config()})
        if self.vectors:
            content[COEFFICIENTS_ARRAYS] = arrays if arrays is not None else self.arrays()
        return Message(content=content, dst_node_id=node, message_type="train")

    @classmethod
    def from_content(cls, content: RecordDict) -> CoefficientRequest | None:
        """The request a message carries, or None (any other message); ``ValueError`` when malformed."""
        config = content.config_records.get(COEFFICIENTS_RECORD)
        if config is None:
            return None
        try:
            request = cls(
                str(config["stage"]), int(cast(int, config["server-round"])), str(config["run-key"]),
                str(config["version"]), str(config.get("objective", "loss")),
                cast(tuple[int, int], tuple(int(v) for v in cast(list[int], config.get("shape", [0, 0])))),
                tuple(float(v) for v in cast(list[float], config.get("coefficients", []))),
                tuple(float(v) for v in cast(list[float], config.get("lambdas", []))),
                tuple(str(v) for v in cast(list[str], config.get("labels", []))),
                tuple(str(v) for v in cast(list[str], config.get("names", []))),
                tuple(int(v) for v in cast(list[int], config.get("groups", []))),
                int(cast(int, config.get("batch-size", 8))),
                _vectors(content.array_records.get(COEFFICIENTS_ARRAYS)),
            )  # fmt: skip
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed coefficient request: {exc}") from None
        if request.stage not in COEFFICIENT_STAGES:
            raise ValueError(f"unknown coefficient stage {request.stage!r}")
        return request


def _vectors(record: ArrayRecord | None) -> tuple[Delta, ...]:
    """The ``<k>/<name>`` arrays of a request back as one Delta per k, in k order."""
    if record is None:
        return ()
    grouped: dict[int, dict[str, torch.Tensor]] = {}
    for key, array in record.items():
        index, _, name = key.partition("/")
        grouped.setdefault(int(index), {})[name] = torch.from_numpy(array.numpy())
    if sorted(grouped) != list(range(len(grouped))):
        raise ValueError(f"coefficient vectors are numbered {sorted(grouped)}, not 0..{len(grouped) - 1}")
    return tuple(Delta.from_arrays(grouped[k]) for k in range(len(grouped)))


@dataclass(frozen=True)
class CoefficientReply:
    """A node's answer to a coefficient stage: aggregate numbers only (no per-example output).

    ``step``/``setup``: ``values`` = (the objective's mean,), ``gradient`` its K×G gradient (row-major);
    ``lambda``: one mean loss per candidate λ. ``count`` is the positions (or rows) scored; ``rows`` says which
    rows the node used (``validation``, or ``train`` when it holds none out).
    """

    stage: str
    values: tuple[float, ...]
    gradient: tuple[float, ...] = ()
    count: int = 0
    rows: str = "validation"

    def reply_to(self, message: Message) -> Message:
        """The Flower reply to ``message``."""
        record = ConfigRecord(
            {"stage": self.stage, "values": [float(v) for v in self.values],
             "gradient": [float(v) for v in self.gradient], "count": int(self.count), "rows": self.rows}
        )  # fmt: skip
        return Message(content=RecordDict({COEFFICIENTS_RECORD: record}), reply_to=message)

    @classmethod
    def from_message(cls, message: Message, stage: str, values: int, gradient: int) -> CoefficientReply:
        """Parse a reply expecting ``values`` values and ``gradient`` gradient entries (``ValueError`` otherwise)."""
        if message.has_error():
            raise ReplyRejected(reply_error_reason(message), short_reason(message.error.reason))
        record = message.content.config_records.get(COEFFICIENTS_RECORD)
        if record is None:
            raise ValueError("the reply carries no coefficient record")
        try:
            reply = cls(
                str(record["stage"]),
                tuple(float(v) for v in cast(list[float], record["values"])),
                tuple(float(v) for v in cast(list[float], record.get("gradient", []))),
                int(cast(int, record["count"])),
                str(record.get("rows", "validation")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed coefficient reply: {exc}") from None
        numbers = reply.values + reply.gradient
        if reply.stage != stage or len(reply.values) != values or len(reply.gradient) != gradient:
            raise ValueError(
                f"expected a {stage!r} reply with {values} values and {gradient} gradient entries; got a "
                f"{reply.stage!r} reply with {len(reply.values)} and {len(reply.gradient)}"
            )
        if reply.count <= 0 or not all(np.isfinite(numbers)):
            raise ValueError(f"the reply's count ({reply.count}) is not positive or its numbers are not finite")
        return reply
