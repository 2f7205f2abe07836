"""The fedfuse ClientApp: train on the local share, reply with an encoded task vector; evaluate locally.

Node config (``--node-config`` of a SuperNode; set by Flower in simulation): ``partition-id`` and
``num-partitions`` pick the local share; ``institution`` (optional) names the node in updates and
seeds (default ``partition-<id>``); ``tier`` (optional) groups nodes for tiered merging;
``data`` / ``eval-data`` (optional) are the institution's own training and validation files (JSONL,
CSV, Parquet or a save_to_disk folder; see ``fedfuse.training.client_data``);
``gateway-members`` (optional, >= 2) makes the node a tier gateway that trains that many members on
slices of its share and replies with their merged partial state; ``signing-key`` (optional) is the path
of the institution's Ed25519 update-signing key: every payload is then signed (run, round, base
fingerprint, node, payload hash) and the signature travels next to it.
Error-feedback residuals live in ``Context.state`` between rounds of a run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fedfuse.client.error_feedback import ErrorFeedback
from fedfuse.client.gateway import run_gateway_round
from fedfuse.client.local_round import (
    Shard,
    evaluate_locally,
    finite_metrics,
    run_local_round,
)
from fedfuse.data.files import DataSource
from fedfuse.messages import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    METRICS_RECORD,
    PARTIAL_RECORD,
    RESIDUAL_RECORD,
    SIGNATURE_RECORD,
    UPDATE_RECORD,
    payload_record,
)
from fedfuse.security import load_signing_key, sign_update
from fedfuse.settings import RunSettings
from fedfuse.training.client_data import NodeData

CAUSAL_TASKS = ("lm", "sft")


def shard_of(context: Context) -> Shard:
    """The node's share of the data and its name, from the node config."""
    config = context.node_config
    try:
        partition_id = int(config["partition-id"])
        num_partitions = int(config["num-partitions"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            "node config needs integer 'partition-id' and 'num-partitions' "
            f"(e.g. --node-config \"partition-id=0 num-partitions=2\"); got {dict(config)}"
        ) from exc
    name = str(config.get("institution", "") or f"partition-{partition_id}")
    node_data = NodeData(str(config.get("data", "") or ""), str(config.get("eval-data", "") or ""))
    return Shard(partition_id, num_partitions, name, node_data=node_data)


def source_config(node: str, tier: str, source: DataSource) -> ConfigRecord:
    """The reply's config record: node and tier names, and which data the node used (rows, SHA-256)."""
    return ConfigRecord({"node": node, "tier": tier, "data-rows": source.rows, "data-sha256": source.sha256})


def _error_feedback(settings: RunSettings, context: Context) -> ErrorFeedback | None:
    if not settings.uses_error_feedback:
        return None
    feedback = ErrorFeedback(settings.sparsifier_spec)
    stored = context.state.array_records.get(RESIDUAL_RECORD)
    if stored is not None:
        feedback.load_state_dict(stored.to_torch_state_dict())
    return feedback


def _signature(context: Context, shard: Shard, config, payload: bytes) -> dict[str, ConfigRecord]:
    """The signature record for ``payload`` when the node has a signing key, else nothing."""
    key_path = str(context.node_config.get("signing-key", "") or "")
    if not key_path:
        return {}
    signed = sign_update(
        load_signing_key(key_path), institution=shard.node_name, run_id=str(config["run-id"]),
        round_number=int(config["round"]), base_fingerprint=str(config["base-fingerprint"]), payload=payload,
    )
    return {SIGNATURE_RECORD: ConfigRecord(signed.to_config())}


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose settings are the run config with ``overrides`` on top (``fedfuse simulate`` uses them)."""
    app = ClientApp()
    extra = dict(overrides or {})

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        settings = RunSettings.from_run_config(context.run_config, **extra)
        config = msg.content.config_records[CONFIG_RECORD]
        round_state = msg.content.array_records[ARRAYS_RECORD].to_torch_state_dict()
        shard = shard_of(context)
        tier = str(context.node_config.get("tier", ""))
        gateway_members = int(context.node_config.get("gateway-members", 0) or 0)
        if gateway_members:
            payload, examples, loss = run_gateway_round(
                settings, dict(round_state), round_number=int(config["round"]), run_id=str(config["run-id"]),
                shard=shard, members=gateway_members,
            )
            metrics = MetricRecord(
                finite_metrics({"num-examples": examples, "train-loss": loss, "uplink-bytes": len(payload)})
            )
            reply = RecordDict({
                PARTIAL_RECORD: payload_record(payload),
                METRICS_RECORD: metrics,
                CONFIG_RECORD: ConfigRecord({"node": shard.node_name, "tier": tier}),
                **_signature(context, shard, config, payload),
            })
            return Message(content=reply, reply_to=msg)
        feedback = _error_feedback(settings, context)
        result = run_local_round(
            settings,
            dict(round_state),
            round_number=int(config["round"]),
            run_id=str(config["run-id"]),
            shard=shard,
            error_feedback=feedback,
        )
        if feedback is not None:
            context.state.array_records[RESIDUAL_RECORD] = ArrayRecord(feedback.state_dict())
        metrics = MetricRecord(finite_metrics({
            "num-examples": result.num_examples, "train-loss": result.train_loss, "uplink-bytes": len(result.payload),
            "train-seconds": result.train_seconds,
        }))
        reply = RecordDict(
            {
                UPDATE_RECORD: payload_record(result.payload),
                METRICS_RECORD: metrics,
                CONFIG_RECORD: source_config(shard.node_name, tier, result.source),
                **_signature(context, shard, config, result.payload),
            }
        )
        return Message(content=reply, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        settings = RunSettings.from_run_config(context.run_config, **extra)
        round_state = msg.content.array_records[ARRAYS_RECORD].to_torch_state_dict()
        shard = shard_of(context)
        result, source = evaluate_locally(settings, dict(round_state), shard)
        values = {"accuracy": result.accuracy, "loss": result.loss, "num-examples": result.examples}
        if settings.task in CAUSAL_TASKS:
            values["perplexity"] = math.exp(min(result.loss, 50.0))
        config = source_config(shard.node_name, str(context.node_config.get("tier", "")), source)
        return Message(content=RecordDict({METRICS_RECORD: MetricRecord(values), CONFIG_RECORD: config}), reply_to=msg)

    return app


app = make_client_app()
"""The ClientApp ``flwr run`` loads (``fedfuse.client.app:app``)."""
