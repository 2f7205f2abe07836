"""The fedfuse ClientApp: train on the local share, reply with an encoded task vector; evaluate locally.

Node config (``--node-config`` of a SuperNode; set by Flower in simulation): ``partition-id`` and
``num-partitions`` pick the local share; ``institution`` (optional) names the node in updates and
seeds (default ``partition-<id>``); ``tier`` (optional) groups nodes for tiered merging;
``data`` / ``eval-data`` (optional) are the institution's own training and validation files (JSONL,
CSV, Parquet or a save_to_disk folder; see ``fedfuse.training.client_datasets``);
``lora-rank`` (optional, at most the run's ``lora-rank``) is the node's own LoRA rank (its factors
travel padded to the run's rank, see ``fedfuse.client.local_round.to_run_rank``);
``gateway-members`` (optional, >= 2) makes the node a tier gateway that trains that many members on
slices of its share and replies with their merged partial state; ``signing-key`` (optional) is the path
of the institution's Ed25519 update-signing key: every payload is then signed (run, round, model
version, node, payload hash) and the signature travels next to it.
Each train and evaluate message carries a model sync; the node applies it to the run's change it keeps
under its ``state-dir``, keyed by the run key (:mod:`fedfuse.client.node_model`), and trains from base +
change. Error-feedback residuals live in ``Context.state`` between rounds of a run and under the same
``state-dir`` (see :mod:`fedfuse.client.residuals`), so they survive a resume.

The app is a training handler plus the mods any Flower app can add
(:mod:`fedfuse.client.mods`): ``signing_mod`` (the node config's key) and the uplink
(``task_vector_mod``'s options from the run config), so the uplink is written once. Simulation-only
devices (attackers, :mod:`fedfuse.client.attacks`) are added by ``fedfuse simulate`` and the benches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedfuse.automerge.objectives import Rows
from fedfuse.client.coefficient_mod import NodeModel, coefficient_mod
from fedfuse.client.gateway import run_gateway_round
from fedfuse.client.local_round import (
    DatasetLoader,
    Shard,
    client_datasets,
    evaluate_locally,
    round_model,
    train_locally,
    uplink_of,
)
from fedfuse.client.mods import signing_mod, trained_content, uplink_mod
from fedfuse.client.node_model import load_change, model_folder, round_weights, synced_change
from fedfuse.client.residuals import ResidualSlot
from fedfuse.client.secure_mod import secure_aggregation_mod
from fedfuse.messages import (
    RESIDUAL_RECORD,
    TIMING_RECORD,
    CoefficientRequest,
    EvaluateReply,
    NodeName,
    RoundInstruction,
    TrainReply,
)
from fedfuse.rounds import Delta, apply_delta
from fedfuse.settings import RunSettings
from fedfuse.training.client_datasets import NodeData
from fedfuse.training.device import client_device
from fedfuse.training.run_model import base_parameters

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


def run_settings(context: Context, overrides: Mapping[str, Any]) -> RunSettings:
    """The run's settings: its run config with ``overrides`` on top."""
    return RunSettings.from_run_config(context.run_config, **overrides)


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
    slots = [
        ResidualSlot.for_round(
            context,
            f"{RESIDUAL_RECORD}.member-{member}",
            round_number=instruction.server_round,
            run_key=instruction.run_key,
            node=shard.node_name,
        )
        for member in range(members)
    ]
    spec = settings.compression.sparsifier_spec
    feedback = [slot.restore(context, spec) if settings.uses_error_feedback else None for slot in slots]
    result = run_gateway_round(
        settings,
        changed,
        round_number=instruction.server_round,
        run_id=instruction.run_id,
        shard=shard,
        members=members,
        tier=tier,
        error_feedback=feedback,
        model_version=instruction.base_fingerprint,
    )
    for slot, store in zip(slots, feedback, strict=False):
        if store is not None:
            slot.keep(context, store)
    return TrainReply("partial", result.payload)


def train_handler(overrides: Mapping[str, Any] | None = None, *, datasets: DatasetLoader = client_datasets):
    """fedfuse's training handler: train on the node's share, reply with the update for the uplink mod.

    ``datasets`` loads the shard's data (a simulation may wrap it). A gateway node replies with its
    members' merged partial state instead, which the uplink mod passes on to be signed.
    """
    extra = dict(overrides or {})

    def train(msg: Message, context: Context) -> Message:
        settings = run_settings(context, extra)
        instruction = RoundInstruction.from_message(msg)
        shard = shard_of(context, settings)
        change = synced_change(msg.content, model_folder(context, instruction.run_key, shard.node_name))
        instruction = replace(instruction, base_fingerprint=change.version)
        changed = round_weights(base_parameters(settings), change)
        tier = str(context.node_config.get("tier", ""))
        members = int(context.node_config.get("gateway-members", 0) or 0)
        if members:
            return _gateway_reply(settings, context, changed, instruction, shard, tier, members).reply_to(msg)
        trained = train_locally(
            settings,
            changed,
            round_number=instruction.server_round,
            shard=shard,
            datasets=datasets,
            model_version=change.version,
        )
        content = trained_content(
            trained.update,
            node=shard.header_node,
            institution=shard.node_name,
            base_fingerprint=trained.base_fingerprint,
            tier=tier,
            timing=trained.phases.as_dict(),
        )
        return Message(content=content, reply_to=msg)

    return train


def _timed(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The outermost mod of fedfuse's app: the train handler's ``total`` seconds in the reply's timing."""
    started = time.perf_counter()
    reply = call_next(msg, context)
    timing = reply.content.metric_records.get(TIMING_RECORD) if not reply.has_error() else None
    if timing is not None:
        timing.setdefault("sign", 0.0)
        timing["total"] = time.perf_counter() - started
    return reply


def _honest_only(overrides: Mapping[str, Any]) -> Mod:
    """Refuses a run config that asks for simulated attackers: this app has none (they are simulation devices)."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type == MessageType.TRAIN and run_settings(context, overrides).attack.attack != "none":
            raise ValueError(
                "attack is simulation-only: run it with fedfuse simulate or fedfuse bench robust "
                "(or clientapp = fedfuse.client.attacks:app)"
            )
        return call_next(msg, context)

    return mod


def node_model_loader(overrides: Mapping[str, Any] | None = None, *, datasets: DatasetLoader = client_datasets):
    """The node's model at the round's version (base + the change it keeps, as training builds it) and its rows.

    The rows are those local training holds out (``validation``); a node that holds none out scores its
    training rows and says so (``rows = "train"`` in its replies).
    """
    extra = dict(overrides or {})

    def load(msg: Message, context: Context, request: CoefficientRequest) -> NodeModel:
        settings = run_settings(context, extra)
        torch.set_num_threads(settings.training.client_threads)
        shard = shard_of(context, settings)
        change = load_change(model_folder(context, request.run_key, shard.node_name))
        if change is None or change.version != request.version:
            raise ValueError("this node does not hold the round's model version (it was not synced this round)")
        base = base_parameters(settings)
        model, _, tokenizer = round_model(settings, round_weights(base, change))
        data = datasets(settings, shard, tokenizer)
        tokens, source = (data.eval, "validation") if len(data.eval) else (data.train, "train")
        rows = Rows(tokens.input_ids, tokens.attention_mask, tokens.labels, causal=tokens.labels.ndim == 2)

        def land(delta: Delta) -> dict[str, torch.Tensor]:
            moved = {name: t.clone() for name, t in change.tensors.items()}
            apply_delta(moved, delta)
            return round_weights(base, replace(change, tensors=moved))

        return NodeModel(model.to(client_device(settings)), rows, source, land)

    return load


def client_mods(overrides: Mapping[str, Any] | None = None, *, datasets: DatasetLoader = client_datasets) -> list[Mod]:
    """fedfuse's train mods: coefficient and SecAgg+ stages, timing, signing (node config ``signing-key``), uplink."""
    extra = dict(overrides or {})
    uplink = uplink_mod(lambda context: uplink_of(run_settings(context, extra)), resumable=True)
    signing = signing_mod(None, lambda context: shard_of(context).node_name)
    coefficients = coefficient_mod(node_model_loader(extra, datasets=datasets))
    return [coefficients, secure_aggregation_mod, _timed, signing, uplink]


def make_client_app(
    overrides: Mapping[str, Any] | None = None,
    *,
    simulated: Sequence[Mod] = (),
    datasets: DatasetLoader = client_datasets,
) -> ClientApp:
    """A ClientApp whose settings are the run config with ``overrides`` on top (``fedfuse simulate`` uses them).

    ``simulated`` mods sit between the uplink and the training handler, and ``datasets`` loads each
    shard's data: simulation-only devices (:func:`fedfuse.client.attacks.attacker_client_app`) use them.
    """
    app = ClientApp()
    extra = dict(overrides or {})

    devices = list(simulated) or [_honest_only(extra)]
    app.train(mods=[*client_mods(extra, datasets=datasets), *devices])(train_handler(extra, datasets=datasets))

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        if not NodeName.is_query(msg):
            raise ValueError("the fedfuse ClientApp answers only the identify query")
        return NodeName(shard_of(context).node_name).reply_to(msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        settings = run_settings(context, extra)
        shard = shard_of(context)
        run_key = RoundInstruction.from_message(msg).run_key
        change = synced_change(msg.content, model_folder(context, run_key, shard.node_name))
        changed = round_weights(base_parameters(settings), change)
        result, source = evaluate_locally(settings, changed, shard)
        metrics = {"accuracy": result.accuracy, "loss": result.loss}
        if settings.source.task in CAUSAL_TASKS:
            metrics["perplexity"] = math.exp(min(result.loss, 50.0))
        reply = EvaluateReply(shard.node_name, result.examples, metrics, source.rows, source.sha256)
        return reply.reply_to(msg)

    return app


app = make_client_app()
"""The ClientApp ``flwr run`` loads (``fedfuse.client.app:app``)."""
