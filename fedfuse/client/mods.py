"""Flower client mods that give any ClientApp fedfuse's uplink, with no change to its training code.

``ClientApp(mods=[task_vector_mod(sparsifier="trim", density=0.1)])``: the app still replies with its
trained weights under ``"arrays"`` and ``num-examples`` in its MetricRecord; the mod replaces the
weights by a fedfuse update payload — the task vector against the weights the node received, TIES
trimmed or seeded-DARE dropped, with error feedback kept in ``Context.state`` — which
:class:`fedfuse.server.fedmerge.FedMerge` folds directly. ``signing_mod(key_path)``, listed before it,
signs that payload with the institution's Ed25519 key. Evaluate messages pass through untouched.

fedfuse's own ClientApp is its training handler plus these same mods. A handler may add, next to
(or instead of) ``"arrays"`` (see :func:`trained_content`): ``fedfuse.task-vector`` (τ, formed against
weights it holds beyond the ones it received) or ``fedfuse.factors`` (LoRA factors, sent as they
are), ``fisher`` (the Fisher diagonal, named as ``FedMerge`` reads it), ``fedfuse.grams`` (Gram
matrices), ``fedfuse.uplink`` (example count, node, institution, tier, base fingerprint) and
``fedfuse.header-metrics`` (the header's metrics, strings included). The encoding itself is
:func:`fedfuse.client.uplink.encode_uplink`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.app.typing import ConfigRecordValues
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode

from fedfuse.algebra import Sparsifier, name_mismatch
from fedfuse.client.residuals import ResidualSlot
from fedfuse.client.uplink import LocalDP, TrainedUpdate, UpdateFacts, Uplink, encode_uplink
from fedfuse.messages import (
    CONFIG_RECORD,
    PAYLOAD_RECORDS,
    RESIDUAL_RECORD,
    TIMING_RECORD,
    TrainReply,
    array_record,
    record_tensors,
)
from fedfuse.security import load_signing_key, sign_update
from fedfuse.wire import fingerprint
from fedfuse.wire.header import MetricValue

IDENTITY_RECORD = "fedfuse.identity"
"""Where ``signing_mod`` tells ``task_vector_mod`` (in ``Context.state``) which institution signs."""
TASK_VECTOR_RECORD = "fedfuse.task-vector"
FACTORS_RECORD = "fedfuse.factors"
FISHER_RECORD = "fisher"
"""The Fisher diagonal's ArrayRecord: the name ``FedMerge`` reads from standard replies (``fisher_key``)."""
GRAM_RECORD = "fedfuse.grams"
UPLINK_RECORD = "fedfuse.uplink"
HEADER_METRICS_RECORD = "fedfuse.header-metrics"
_HANDLER_RECORDS = (
    TASK_VECTOR_RECORD,
    FACTORS_RECORD,
    FISHER_RECORD,
    GRAM_RECORD,
    UPLINK_RECORD,
    HEADER_METRICS_RECORD,
)


def _failed(msg: Message, reason: str) -> Message:
    """An error reply (Flower's convention for a mod whose precondition fails)."""
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


def _server_round(msg: Message) -> int | None:
    for config in msg.content.config_records.values():
        value = config.get("server-round")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _instruction(msg: Message, key: str) -> str:
    """A string the server's round config names (fedfuse's own strategy sends ``run-key``, ``base-fingerprint``)."""
    config = msg.content.config_records.get(CONFIG_RECORD)
    return str(config.get(key, "") or "") if config is not None else ""


def _run_id(msg: Message) -> str:
    """The run an update belongs to: the ``run-id`` the server names (fedfuse's strategy), else Flower's run id."""
    return _instruction(msg, "run-id") or str(msg.metadata.run_id)


def round_base(msg: Message, sent: ArrayRecord | None) -> str:
    """The model version a reply is signed for: as the server names it, else the fingerprint of ``sent`` weights."""
    named = _instruction(msg, "base-fingerprint")
    if named or sent is None:
        return named
    return fingerprint(record_tensors(sent))


def _node_name(context: Context, explicit: str | None) -> str:
    """The name updates are sent under: the signing institution, ``explicit``, or the Flower node id."""
    identity = context.state.config_records.get(IDENTITY_RECORD)
    if identity is not None:
        return str(identity["institution"])
    return explicit or str(context.node_id)


def trained_content(
    update: TrainedUpdate,
    *,
    node: str,
    institution: str,
    base_fingerprint: str,
    tier: str = "",
    timing: Mapping[str, float] | None = None,
) -> RecordDict:
    """A training handler's reply that ``task_vector_mod`` turns into a fedfuse update (fedfuse's own ClientApp).

    The update's tensors travel as τ or LoRA factors, with its Fisher and Gram records; the facts of its
    header as a ConfigRecord; ``timing`` (seconds per phase so far) as the reply's timing record.
    """
    records: dict[str, ArrayRecord | ConfigRecord | MetricRecord] = {
        FACTORS_RECORD if update.kind == "factors" else TASK_VECTOR_RECORD: ArrayRecord(update.tensors),
        UPLINK_RECORD: ConfigRecord(
            {
                "num-examples": update.num_examples,
                "node": node,
                "institution": institution,
                "tier": tier,
                "base-fingerprint": base_fingerprint,
            }
        ),
        HEADER_METRICS_RECORD: ConfigRecord(cast(dict[str, ConfigRecordValues], dict(update.metrics))),
    }
    if update.fisher is not None:
        records[FISHER_RECORD] = ArrayRecord(update.fisher)
    if update.grams is not None:
        records[GRAM_RECORD] = ArrayRecord(update.grams)
    if timing:
        records[TIMING_RECORD] = MetricRecord({name: float(value) for name, value in timing.items()})
    return RecordDict(records)


def read_update(
    reply: RecordDict, received: Callable[[], dict[str, torch.Tensor]], arrayrecord_key: str, weighted_by_key: str
) -> TrainedUpdate | str:
    """The update a handler's reply carries (see the module docstring), or why there is none."""
    facts = reply.config_records.get(UPLINK_RECORD) or ConfigRecord()
    metrics = next((r for k, r in reply.metric_records.items() if k != TIMING_RECORD), None)
    examples = facts.get("num-examples", None if metrics is None else metrics.get(weighted_by_key))
    arrays = reply.array_records
    if FACTORS_RECORD in arrays or TASK_VECTOR_RECORD in arrays:
        kind = "factors" if FACTORS_RECORD in arrays else "task-vector"
        tensors = record_tensors(arrays[FACTORS_RECORD if kind == "factors" else TASK_VECTOR_RECORD])
    else:
        kind = "task-vector"
        trained = array_record(arrays, arrayrecord_key, ignore=(FISHER_RECORD, GRAM_RECORD))
        if trained is None or not isinstance(examples, (int, float)) or not math.isfinite(examples):
            return f"task_vector_mod needs the reply's ArrayRecord and a number {weighted_by_key!r}"
        weights, base = record_tensors(trained), received()
        problem = name_mismatch(base, weights, missing="missing in the reply", extra="not received")
        if problem:
            return f"task_vector_mod: the reply's arrays differ from the received ones ({problem})"
        tensors = {name: weights[name].to(torch.float32) - base[name].to(torch.float32) for name in base}
    if not isinstance(examples, (int, float)) or not math.isfinite(examples):
        return f"task_vector_mod needs a number {weighted_by_key!r} in the reply's metrics"
    return TrainedUpdate(
        tensors,
        int(examples),
        kind,  # type: ignore[arg-type]
        _header_metrics(reply, metrics),
        record_tensors(arrays[FISHER_RECORD]) if FISHER_RECORD in arrays else None,
        record_tensors(arrays[GRAM_RECORD]) if GRAM_RECORD in arrays else None,
    )


def _header_metrics(reply: RecordDict, metrics: MetricRecord | None) -> dict[str, MetricValue]:
    """The handler's header metrics, else the finite numbers of its MetricRecord."""
    given = reply.config_records.get(HEADER_METRICS_RECORD)
    if given is not None:
        return {key: cast(MetricValue, value) for key, value in given.items()}
    values = {} if metrics is None else metrics
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def task_vector_mod(
    *,
    sparsifier: str = "trim",
    density: float = 0.1,
    wire_dtype: str = "float16",
    error_feedback: bool = True,
    seed: int = 0,
    seed_scope: str = "node",
    node_name: str | None = None,
    arrayrecord_key: str = "arrays",
    weighted_by_key: str = "num-examples",
    local_dp: LocalDP | None = None,
) -> Mod:
    """A mod that turns a ClientApp's trained weights into a fedfuse task-vector update.

    Parameters
    ----------
    sparsifier : {"trim", "dare", "none"}
        TIES trim (top-|τ|), seeded DARE drop, or dense.
    density : float
        Kept fraction of each tensor (trim / dare).
    wire_dtype : {"float16", "bfloat16", "float32"}
        Value dtype on the wire.
    error_feedback : bool
        Carry what the sparsifier dropped into the next round (residual in ``Context.state``).
    seed, seed_scope
        DARE masks seeded per node and round (``"round"``: one mask per round for every node).
    node_name : str, optional
        Name the update is sent under (default: the Flower node id; the signing institution when
        ``signing_mod`` is used). An unsigned update must name its own Flower node.
    arrayrecord_key, weighted_by_key
        Where the reply's weights and its example count are (Flower's defaults).
    local_dp : LocalDP, optional
        Clip each task vector and add Gaussian noise on the node (local differential privacy).
    """
    kind = sparsifier
    spec = Sparsifier.of(kind, density, seed_scope=seed_scope)  # a registered kind; "none" ignores density
    uplink = Uplink(spec, wire_dtype, error_feedback, seed, seed_scope, local_dp)
    return uplink_mod(
        lambda context: uplink, node_name=node_name, arrayrecord_key=arrayrecord_key, weighted_by_key=weighted_by_key
    )


def uplink_mod(
    uplink_for: Callable[[Context], Uplink],
    *,
    node_name: str | None = None,
    arrayrecord_key: str = "arrays",
    weighted_by_key: str = "num-examples",
    resumable: bool = False,
) -> Mod:
    """``task_vector_mod`` with its options read per message (fedfuse's ClientApp: from the run config).

    ``resumable``: only the previous round's residual counts, and, when the server names a run key
    (fedfuse's own strategy), it is kept under the node's ``state-dir`` so a resumed run continues it.
    """

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        sent = array_record(msg.content.array_records, arrayrecord_key)
        round_number = _server_round(msg)
        if sent is None or round_number is None:
            return _failed(msg, "task_vector_mod needs one ArrayRecord and a 'server-round' in the train message")
        received = _once(lambda: record_tensors(sent))
        reply = call_next(msg, context)
        if reply.has_error() or any(record in reply.content.array_records for record in PAYLOAD_RECORDS.values()):
            return reply  # failed, or a handler that encodes its own payload (a tier gateway's partial state)
        update = read_update(reply.content, received, arrayrecord_key, weighted_by_key)
        if isinstance(update, str):
            return _failed(msg, update)
        started = time.perf_counter()
        facts = _facts(msg, context, reply.content, round_number, node_name, received)
        uplink = uplink_for(context)
        slot = _residual_slot(msg, context, facts, resumable)
        feedback = (
            slot.restore(context, uplink.sparsifier)
            if uplink.uses_error_feedback and update.kind == "task-vector"
            else None
        )
        payload = encode_uplink(update, facts, uplink, feedback)
        if feedback is not None:
            slot.keep(context, feedback)
        return Message(content=_update_content(reply.content, payload, time.perf_counter() - started), reply_to=msg)

    return mod


def _once(load: Callable[[], dict[str, torch.Tensor]]) -> Callable[[], dict[str, torch.Tensor]]:
    """``load`` run at most once (a handler that sends τ itself never needs the received tensors)."""
    cache: list[dict[str, torch.Tensor]] = []

    def get() -> dict[str, torch.Tensor]:
        if not cache:
            cache.append(load())
        return cache[0]

    return get


def _facts(
    msg: Message,
    context: Context,
    reply: RecordDict,
    round_number: int,
    node_name: str | None,
    received: Callable[[], dict[str, torch.Tensor]],
) -> UpdateFacts:
    """Who sends the update for which round: the signer, the handler's node, or the Flower node id."""
    given = reply.config_records.get(UPLINK_RECORD) or ConfigRecord()
    node = _node_name(context, node_name or str(given.get("node", "") or "") or None)
    base = str(given.get("base-fingerprint", "") or "") or fingerprint(received())
    institution = str(given.get("institution", "") or "")
    tier = str(given.get("tier", ""))
    return UpdateFacts(_run_id(msg), round_number, base, node, institution, tier)


def _residual_slot(msg: Message, context: Context, facts: UpdateFacts, resumable: bool) -> ResidualSlot:
    if not resumable:
        return ResidualSlot(RESIDUAL_RECORD)
    run_key = _instruction(msg, "run-key")
    return ResidualSlot.for_round(
        context, RESIDUAL_RECORD, round_number=facts.round_number, run_key=run_key, node=facts.seed_name
    )


def _update_content(reply: RecordDict, payload: bytes, encode_seconds: float) -> RecordDict:
    """The reply with the payload instead of the trained tensors (other records kept; ``encode`` timed)."""
    timing_record = reply.metric_records.get(TIMING_RECORD)
    timing = {k: float(cast(float, v)) for k, v in timing_record.items()} if timing_record is not None else {}
    if timing:
        timing["encode"] = timing.get("encode", 0.0) + encode_seconds
    content = TrainReply("update", payload, timing=timing).to_content()
    for key, record in reply.items():
        if not isinstance(record, ArrayRecord) and key not in _HANDLER_RECORDS and key not in content:
            content[key] = record
    return content


def signing_mod(
    key_path: str | None,
    institution: str | Callable[[Context], str] | None = None,
    *,
    arrayrecord_key: str = "arrays",
) -> Mod:
    """A mod that signs the fedfuse update of the mods after it with the institution's Ed25519 key.

    ``institution`` (default: the node config's ``institution``; a callable reads it from the
    ``Context``) is the name the coordinator's registry holds the key under; the update is sent under
    that name. List it before ``task_vector_mod``: ``ClientApp(mods=[signing_mod(key), task_vector_mod()])``.
    ``key_path=None`` reads the key's path from the node config's ``signing-key`` and leaves the
    replies of a node without one unsigned (fedfuse's own ClientApp). The signature binds the base
    fingerprint the server names for the round (``base-fingerprint``), else that of the received arrays.
    """
    fixed_key = load_signing_key(key_path) if key_path is not None else None

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        node_key = str(context.node_config.get("signing-key", "") or "")
        if fixed_key is None and not node_key:
            return call_next(msg, context)
        name = institution(context) if callable(institution) else institution
        name = name or str(context.node_config.get("institution", "") or "")
        if not name:
            return _failed(msg, "signing_mod needs an institution name (argument or node config 'institution')")
        sent = array_record(msg.content.array_records, arrayrecord_key)
        round_number = _server_round(msg)
        if sent is None or round_number is None:
            return _failed(msg, "signing_mod needs one ArrayRecord and a 'server-round' in the train message")
        base = round_base(msg, sent)
        context.state.config_records[IDENTITY_RECORD] = ConfigRecord({"institution": name})
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        try:
            unsigned = TrainReply.from_content(reply.content)
        except ValueError:
            return _failed(msg, "signing_mod found no fedfuse payload to sign: list task_vector_mod after it")
        started = time.perf_counter()
        signature = sign_update(
            fixed_key or load_signing_key(node_key),
            institution=name,
            run_id=_run_id(msg),
            round_number=round_number,
            base_fingerprint=base,
            payload=unsigned.payload,
        )
        timing = {**unsigned.timing, "sign": time.perf_counter() - started} if unsigned.timing else {}
        signed: RecordDict = TrainReply(unsigned.kind, unsigned.payload, signature, timing).to_content()
        for record_key, record in reply.content.items():
            if record_key not in signed:
                signed[record_key] = record
        return Message(content=signed, reply_to=msg)

    return mod
