"""``secure_aggregation_mod``: a node's side of SecAgg+ as a Flower mod (fedfuse's ClientApp, or any app).

A train message carrying a ``"fedfuse.secagg"`` record runs one stage of the protocol
(:mod:`fedfuse.secagg.protocol`). ``advertise`` comes with the round's training instruction: the mods after
this one train and encode the update as usual (the uplink), then this mod reads that payload back, computes
the node's own merge statistics under the round policy the server names (weight, example cap, clipping:
:func:`fedfuse.rounds.secure_sum.node_statistics`), encodes them in the ring and keeps them in
``Context.state`` with the node's secrets; the update itself never leaves the node. ``share``, ``mask`` and
``unmask`` are answered from that state alone. With a ``signing-key`` in the node config every stage reply is
signed (run, round, model version, node, the reply's canonical bytes). List it first:
``ClientApp(mods=[secure_aggregation_mod, signing_mod(...), task_vector_mod()])``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedfuse.client.mods import _failed, _run_id, round_base
from fedfuse.messages import (
    SECAGG_CLEAR_METRICS,
    SECAGG_RECORD,
    SECAGG_STATE_RECORD,
    SIGNATURE_RECORD,
    TrainReply,
    array_record,
    secagg_records,
)
from fedfuse.rejections import Rejected
from fedfuse.rounds import UpdateSpace
from fedfuse.rounds.bounds import UpdateBounds
from fedfuse.rounds.secure_sum import StatisticsLayout, node_statistics, own_partial, own_update, update_supports
from fedfuse.secagg.protocol import NodeSession, RoundSetup, SecAggAborted, canonical
from fedfuse.security import load_signing_key, sign_update
from fedfuse.strategies import MergeStrategy, build_strategy
from fedfuse.strategies.state import StatisticsState
from fedfuse.wire.container import unpack
from fedfuse.wire.header import parse_header
from fedfuse.wire.partial import PARTIAL_FORMAT


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Answer a SecAgg+ stage; any other message passes through."""
    request = msg.content.config_records.get(SECAGG_RECORD)
    if msg.metadata.message_type != MessageType.TRAIN or request is None:
        return call_next(msg, context)
    stage = str(request.get("stage", ""))
    try:
        if stage == "advertise":
            answer = _advertise(msg, context, call_next, request)
            if isinstance(answer, Message):
                return answer
        else:
            answer = _later_stage(stage, context, request)
        kept = context.state.config_records[SECAGG_STATE_RECORD]
        content = secagg_records({"stage": stage, **answer})
        _sign(context, kept, content[SECAGG_RECORD], content)
        if stage == "unmask":
            del context.state.config_records[SECAGG_STATE_RECORD]
    except (ValueError, KeyError, SecAggAborted, Rejected) as exc:
        return _failed(msg, f"secure aggregation ({stage or 'no stage'}): {exc}")
    return Message(content=content, reply_to=msg)


def _advertise(
    msg: Message, context: Context, call_next: ClientAppCallable, request: Mapping[str, Any]
) -> dict[str, Any] | Message:
    """Train (the mods after this one), turn the update into ring-encoded statistics, keep them, advertise keys."""
    setup = RoundSetup.from_config(request)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    parsed = TrainReply.from_content(reply.content)
    strategy = build_strategy(**_strategy_arguments(str(request["strategy"])))
    if parsed.kind == "partial":  # a tier gateway: its members' statistics, summed in the clear inside it
        state, supports, header = _gateway_statistics(parsed.payload, strategy)
    else:
        update = own_update(parsed.payload)
        bounds = UpdateBounds(
            float(str(request["clip-norm"])), int(str(request["max-num-examples"])), str(request["weighting"])
        )
        shapes = {name: tuple(t.shape) for name, t in update.tensors.items()}
        state = node_statistics(update, UpdateSpace.full(shapes), strategy, bounds)
        supports, header = update_supports(update.tensors), update.header
    layout = StatisticsLayout.of(state, supports)
    vector, _ = layout.encode(state, supports, setup.fixed)
    session = NodeSession(setup, int(context.node_id))
    context.state.config_records[SECAGG_STATE_RECORD] = ConfigRecord(
        {
            **session.to_state(),
            "input": vector.tobytes(),
            "run-id": _run_id(msg),
            "base": round_base(msg, array_record(msg.content.array_records, "arrays")),
            "name": str(header.node_id),
        }
    )
    metrics = header.metrics
    clear = {key: float(metrics[key]) for key in SECAGG_CLEAR_METRICS if isinstance(metrics.get(key), (int, float))}
    return {**session.advertise(), "layout": layout.describe(), "node": str(header.node_id), **clear}


def _gateway_statistics(payload: bytes, strategy: MergeStrategy) -> tuple[StatisticsState, dict[str, Any], Any]:
    """A gateway's partial state as its statistics (dense: its members' supports differ) and its header."""
    document, _ = unpack(payload, None)
    header = parse_header(document, PARTIAL_FORMAT, extra_keys={"state"}).header
    state = own_partial(payload, strategy)
    if not isinstance(state, StatisticsState):
        raise ValueError(f"strategy {strategy.name!r} keeps no summed statistics: it cannot be summed securely")
    return state, {}, header


def _strategy_arguments(identity_text: str) -> dict[str, Any]:
    """``build_strategy`` arguments from the identity the server sent (``{"strategy": name, **params}``)."""
    identity = json.loads(identity_text)
    name = identity.pop("strategy")
    dtype = str(identity.pop("dtype", "float32"))
    identity.pop("device", None)  # the node computes its statistics where it is
    return {"name": name, "params": identity, "dtype": dtype}


def _later_stage(stage: str, context: Context, request: Mapping[str, Any]) -> dict[str, Any]:
    """``share``, ``mask`` or ``unmask`` from the session kept in ``Context.state``."""
    kept = context.state.config_records.get(SECAGG_STATE_RECORD)
    if kept is None:
        raise ValueError("no secure round in progress on this node (it restarted, or the server skipped a stage)")
    session = NodeSession.from_state(kept)
    if int(str(request.get("round", session.setup.round))) != session.setup.round:
        raise ValueError("the stage names another round than the one in progress")
    if stage == "share":
        answer = session.share(request)
    elif stage == "mask":
        vector = np.frombuffer(bytes(kept["input"]), dtype=np.dtype(session.setup.fixed.dtype).newbyteorder("<"))  # type: ignore[arg-type]
        answer = session.masked_input(request, vector.astype(session.setup.fixed.dtype))
    elif stage == "unmask":
        answer = session.unmask(request)
    else:
        raise ValueError(f"unknown secure-aggregation stage {stage!r}")
    kept.update(session.to_state())
    return answer


def _sign(context: Context, kept: ConfigRecord, record: Any, content: RecordDict) -> None:
    """Sign the stage reply with the node's ``signing-key`` (none: unsigned, as fedfuse's own app leaves it)."""
    key_path = str(context.node_config.get("signing-key", "") or "")
    if not key_path:
        return
    setup = RoundSetup.from_config(json.loads(str(kept["setup"])))
    signature = sign_update(
        load_signing_key(key_path),
        institution=str(kept["name"]),
        run_id=str(kept["run-id"]),
        round_number=setup.round,
        base_fingerprint=str(kept["base"]),
        payload=canonical(record),
    )
    content[SIGNATURE_RECORD] = ConfigRecord(dict(signature.to_config()))
