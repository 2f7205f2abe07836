"""Flower client mods that give any ClientApp fedfuse's uplink, with no change to its training code.

``ClientApp(mods=[task_vector_mod(sparsifier="trim", density=0.1)])``: the app still replies with its
trained weights under ``"arrays"`` and ``num-examples`` in its MetricRecord; the mod replaces the
weights by a fedfuse update payload — the task vector against the weights the node received, TIES
trimmed or seeded-DARE dropped, with error feedback kept in ``Context.state`` — which
:class:`fedfuse.server.fedmerge.FedMerge` folds directly. ``signing_mod(key_path)``, listed before it,
signs that payload with the institution's Ed25519 key. Evaluate messages pass through untouched.
"""

from __future__ import annotations

import math

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode

from fedfuse.algebra import Sparsifier, dare_seed_fn, name_mismatch
from fedfuse.client.error_feedback import shrink_update
from fedfuse.client.residuals import keep_feedback, restore_feedback
from fedfuse.messages import RESIDUAL_RECORD, TrainReply, array_record, record_tensors
from fedfuse.security import load_signing_key, sign_update
from fedfuse.wire import UPDATE_VALUE_DTYPES, UpdateHeader, encode_update, fingerprint

IDENTITY_RECORD = "fedfuse.identity"
"""Where ``signing_mod`` tells ``task_vector_mod`` (in ``Context.state``) which institution signs."""


def _failed(msg: Message, reason: str) -> Message:
    """An error reply (Flower's convention for a mod whose precondition fails)."""
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


def _server_round(msg: Message) -> int | None:
    for config in msg.content.config_records.values():
        value = config.get("server-round")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _node_name(context: Context, explicit: str | None) -> str:
    """The name updates are sent under: the signing institution, ``explicit``, or the Flower node id."""
    identity = context.state.config_records.get(IDENTITY_RECORD)
    if identity is not None:
        return str(identity["institution"])
    return explicit or str(context.node_id)


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
    """
    kind = sparsifier
    spec = Sparsifier(kind, 1.0 if kind == "none" else density, seed_scope=seed_scope)  # type: ignore[arg-type]
    if wire_dtype not in UPDATE_VALUE_DTYPES:
        raise ValueError(f"wire_dtype must be one of {', '.join(UPDATE_VALUE_DTYPES)}; got {wire_dtype!r}")

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        sent = array_record(msg.content.array_records, arrayrecord_key)
        round_number = _server_round(msg)
        if sent is None or round_number is None:
            return _failed(msg, "task_vector_mod needs one ArrayRecord and a 'server-round' in the train message")
        received = record_tensors(sent)
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        trained = array_record(reply.content.array_records, arrayrecord_key)
        metrics = next(iter(reply.content.metric_records.values()), None)
        examples = None if metrics is None else metrics.get(weighted_by_key)
        if trained is None or not isinstance(examples, (int, float)) or not math.isfinite(examples):
            return _failed(msg, f"task_vector_mod needs the reply's ArrayRecord and a number {weighted_by_key!r}")
        weights = record_tensors(trained)
        problem = name_mismatch(received, weights, missing="missing in the reply", extra="not received")
        if problem:
            return _failed(msg, f"task_vector_mod: the reply's arrays differ from the received ones ({problem})")
        tau = {name: weights[name].to(torch.float32) - received[name].to(torch.float32) for name in received}
        node = _node_name(context, node_name)
        seed_for = dare_seed_fn(seed, round_number, node, seed_scope)
        feedback = restore_feedback(context, RESIDUAL_RECORD, spec) if error_feedback else None
        tensors = shrink_update(tau, spec, seed_for, feedback)
        if feedback is not None:
            keep_feedback(context, RESIDUAL_RECORD, feedback)
        assert metrics is not None
        header = UpdateHeader(
            run_id=str(msg.metadata.run_id),
            round=round_number,
            base_fingerprint=fingerprint(received),
            node_id=node,
            num_examples=int(examples),
            sparsifier=spec,
            metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)},
        )
        payload = encode_update(tensors, header=header, value_dtype=wire_dtype)
        content = TrainReply("update", payload).to_content()
        for key, record in reply.content.items():
            if not isinstance(record, ArrayRecord):
                content[key] = record
        return Message(content=content, reply_to=msg)

    return mod


def signing_mod(key_path: str, institution: str | None = None, *, arrayrecord_key: str = "arrays") -> Mod:
    """A mod that signs the fedfuse update of the mods after it with the institution's Ed25519 key.

    ``institution`` (default: the node config's ``institution``) is the name the coordinator's
    registry holds the key under; the update is sent under that name. List it before
    ``task_vector_mod``: ``ClientApp(mods=[signing_mod(key), task_vector_mod()])``.
    """
    key = load_signing_key(key_path)

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        name = institution or str(context.node_config.get("institution", "") or "")
        if not name:
            return _failed(msg, "signing_mod needs an institution name (argument or node config 'institution')")
        sent = array_record(msg.content.array_records, arrayrecord_key)
        round_number = _server_round(msg)
        if sent is None or round_number is None:
            return _failed(msg, "signing_mod needs one ArrayRecord and a 'server-round' in the train message")
        base = fingerprint(record_tensors(sent))
        context.state.config_records[IDENTITY_RECORD] = ConfigRecord({"institution": name})
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        try:
            unsigned = TrainReply.from_content(reply.content)
        except ValueError:
            return _failed(msg, "signing_mod found no fedfuse payload to sign: list task_vector_mod after it")
        signature = sign_update(
            key,
            institution=name,
            run_id=str(msg.metadata.run_id),
            round_number=round_number,
            base_fingerprint=base,
            payload=unsigned.payload,
        )
        signed: RecordDict = TrainReply(unsigned.kind, unsigned.payload, signature).to_content()
        for record_key, record in reply.content.items():
            if record_key not in signed:
                signed[record_key] = record
        return Message(content=signed, reply_to=msg)

    return mod
