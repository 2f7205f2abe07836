"""The fedfuse ClientApp: train on the local share, reply with an encoded task vector; evaluate locally.

Node config (``--node-config`` of a SuperNode; set by Flower in simulation): ``partition-id`` and
``num-partitions`` pick the local share; ``institution`` (optional) names the node in updates and
seeds (default ``partition-<id>``); ``tier`` (optional) groups nodes for tiered merging;
``data`` / ``eval-data`` (optional) are the institution's own training and validation files (JSONL,
CSV, Parquet or a save_to_disk folder; see ``fedfuse.training.client_data``);
``lora-rank`` (optional, at most the run's ``lora-rank``) is the node's own LoRA rank (its factors
travel padded to the run's rank, see ``fedfuse.client.local_round.to_run_rank``);
``gateway-members`` (optional, >= 2) makes the node a tier gateway that trains that many members on
slices of its share and replies with their merged partial state; ``signing-key`` (optional) is the path
of the institution's Ed25519 update-signing key: every payload is then signed (run, round, base
fingerprint, node, payload hash) and the signature travels next to it.
Error-feedback residuals live in ``Context.state`` between rounds of a run and, keyed by the run key
the server sends, under the node's ``state-dir`` (see :mod:`fedfuse.client.residuals`), so they
survive a resume.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedfuse.client.error_feedback import ErrorFeedback
from fedfuse.client.gateway import run_gateway_round
from fedfuse.client.local_round import Shard, evaluate_locally, run_local_round
from fedfuse.client.residuals import ResidualFiles, keep_feedback, restore_feedback
from fedfuse.messages import ARRAYS_RECORD, RESIDUAL_RECORD, EvaluateReply, NodeName, RoundInstruction, TrainReply
from fedfuse.security import UpdateSignature, load_signing_key, sign_update
from fedfuse.settings import RunSettings
from fedfuse.training.client_data import NodeData

CAUSAL_TASKS = ("lm", "sft")


def shard_of(context: Context, settings: RunSettings | None = None) -> Shard:
    """The node's share of the data and its name, from the node config.

    Unsigned, the node's payloads name its Flower node id (the server binds each update to the
    node that sent it); signed, they name the institution whose key signs them. The node's LoRA rank
    is its node config ``lora-rank``, else the run's ``lora-node-ranks`` entry for its partition id.
    """
    config = context.node_config
    try:
        partition_id = int(config["partition-id"])
        num_partitions = int(config["num-partitions"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            "node config needs integer 'partition-id' and 'num-partitions' "
            f'(e.g. --node-config "partition-id=0 num-partitions=2"); got {dict(config)}'
        ) from exc
    name = str(config.get("institution", "") or f"partition-{partition_id}")
    node_data = NodeData(str(config.get("data", "") or ""), str(config.get("eval-data", "") or ""))
    signed = bool(str(config.get("signing-key", "") or ""))
    try:
        lora_rank = int(config.get("lora-rank", 0) or 0)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"node config lora-rank must be an integer, got {config.get('lora-rank')!r}") from exc
    if not lora_rank and settings is not None:
        lora_rank = settings.training.node_rank(partition_id)
    sender = "" if signed else str(context.node_id)
    return Shard(partition_id, num_partitions, name, node_data=node_data, sender=sender, lora_rank=lora_rank)


def _residual_files(context: Context, instruction: RoundInstruction, shard: Shard, record: str) -> ResidualFiles | None:
    """Where the node keeps this store's residuals on disk for the run (None when the server names no run key)."""
    return ResidualFiles.of(context, instruction.run_key, shard.node_name, record) if instruction.run_key else None


def _error_feedback(
    settings: RunSettings, context: Context, record: str, instruction: RoundInstruction, shard: Shard
) -> ErrorFeedback | None:
    """The residual store under ``record`` left by the previous round (None when the run uses no feedback)."""
    if not settings.uses_error_feedback:
        return None
    files = _residual_files(context, instruction, shard, record)
    spec = settings.compression.sparsifier_spec
    return restore_feedback(context, record, spec, round_number=instruction.server_round, files=files)


def _keep_residual(
    context: Context, record: str, feedback: ErrorFeedback | None, instruction: RoundInstruction, shard: Shard
) -> None:
    if feedback is not None:
        files = _residual_files(context, instruction, shard, record)
        keep_feedback(context, record, feedback, round_number=instruction.server_round, files=files)


def _signature(context: Context, shard: Shard, instruction: RoundInstruction, payload: bytes) -> UpdateSignature | None:
    """The signature of ``payload`` when the node has a signing key, else None."""
    key_path = str(context.node_config.get("signing-key", "") or "")
    if not key_path:
        return None
    return sign_update(
        load_signing_key(key_path),
        institution=shard.node_name,
        run_id=instruction.run_id,
        round_number=instruction.server_round,
        base_fingerprint=instruction.base_fingerprint,
        payload=payload,
    )


def _gateway_reply(
    settings: RunSettings,
    context: Context,
    changed: dict,
    instruction: RoundInstruction,
    shard: Shard,
    tier: str,
    members: int,
) -> TrainReply:
    """A gateway's reply: its members trained and merged into one partial state (each with its own residual)."""
    records = [f"{RESIDUAL_RECORD}.member-{member}" for member in range(members)]
    feedback = [_error_feedback(settings, context, record, instruction, shard) for record in records]
    result = run_gateway_round(
        settings,
        changed,
        round_number=instruction.server_round,
        run_id=instruction.run_id,
        shard=shard,
        members=members,
        tier=tier,
        error_feedback=feedback,
    )
    for record, store in zip(records, feedback, strict=False):
        _keep_residual(context, record, store, instruction, shard)
    return TrainReply("partial", result.payload, _signature(context, shard, instruction, result.payload))


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose settings are the run config with ``overrides`` on top (``fedfuse simulate`` uses them)."""
    app = ClientApp()
    extra = dict(overrides or {})

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        settings = RunSettings.from_run_config(context.run_config, **extra)
        instruction = RoundInstruction.from_message(msg)
        changed = dict(msg.content.array_records[ARRAYS_RECORD].to_torch_state_dict())
        shard = shard_of(context, settings)
        tier = str(context.node_config.get("tier", ""))
        members = int(context.node_config.get("gateway-members", 0) or 0)
        if members:
            return _gateway_reply(settings, context, changed, instruction, shard, tier, members).reply_to(msg)
        started = time.perf_counter()
        feedback = _error_feedback(settings, context, RESIDUAL_RECORD, instruction, shard)
        result = run_local_round(
            settings,
            changed,
            round_number=instruction.server_round,
            run_id=instruction.run_id,
            shard=shard,
            error_feedback=feedback,
            tier=tier,
        )
        _keep_residual(context, RESIDUAL_RECORD, feedback, instruction, shard)
        signing = time.perf_counter()
        signature = _signature(context, shard, instruction, result.payload)
        timing = {**result.phases, "sign": time.perf_counter() - signing, "total": time.perf_counter() - started}
        return TrainReply("update", result.payload, signature, timing).reply_to(msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        if not NodeName.is_query(msg):
            raise ValueError("the fedfuse ClientApp answers only the identify query")
        return NodeName(shard_of(context).node_name).reply_to(msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        settings = RunSettings.from_run_config(context.run_config, **extra)
        changed = dict(msg.content.array_records[ARRAYS_RECORD].to_torch_state_dict())
        shard = shard_of(context)
        result, source = evaluate_locally(settings, changed, shard)
        metrics = {"accuracy": result.accuracy, "loss": result.loss}
        if settings.source.task in CAUSAL_TASKS:
            metrics["perplexity"] = math.exp(min(result.loss, 50.0))
        reply = EvaluateReply(shard.node_name, result.examples, metrics, source.rows, source.sha256)
        return reply.reply_to(msg)

    return app


app = make_client_app()
"""The ClientApp ``flwr run`` loads (``fedfuse.client.app:app``)."""
