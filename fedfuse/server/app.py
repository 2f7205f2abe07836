"""The fedfuse ServerApp: rounds of streaming merges, server-side evaluation, checkpoints, resume, report.

Every round it samples nodes, folds their updates as they arrive (``FedFuseStrategy``), evaluates the
merged model on the held-out test split (overall and per domain), writes an atomic checkpoint to
``<output-dir>/checkpoint`` and prints one line. At the end it writes ``report.json``, ``report.md``
and PNG plots to ``<output-dir>``. ``resume`` continues a run from its last checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedfuse.rounds import PrivacyAccountant, UpdateSpace
from fedfuse.security import Registry
from fedfuse.server.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from fedfuse.server.display import RoundDisplay
from fedfuse.server.evaluation import ServerEvaluator, has_server_evaluation
from fedfuse.server.report import write_report
from fedfuse.server.strategy import FedFuseStrategy
from fedfuse.settings import RunSettings
from fedfuse.training.client_data import run_label_names
from fedfuse.training.models import base_model, global_state, lora_scale, update_shapes

RESUME_MUST_MATCH = (
    "dp",
    "dp-clip-norm",
    "dp-noise-multiplier",
    "model",
    "task",
    "mode",
    "strategy",
    "lora-rank",
    "lora-alpha",
    "lora-target-modules",
    "lora-aggregation",
    "seed",
    "partition",
    "alpha",
)
"""Settings a resumed run must share with the checkpoint (others, such as rounds, may change)."""
RESUME_DEFAULTS = {"server-optimizer": "none"}
"""What a checkpoint written before a key existed had (``server-optimizer`` must match too)."""


def _prefixed(metrics: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The entries ``<prefix><name>`` of a metric record, by name (per-domain accuracy, rejections per reason)."""
    return {key.removeprefix(prefix): value for key, value in metrics.items() if key.startswith(prefix)}


def _round_record(event: Mapping[str, Any]) -> dict[str, Any]:
    train, server, client = event["train"], event["server_eval"], event["client_eval"]
    return {
        "round": event["round"],
        "accuracy": server.get("accuracy"),
        "loss": server.get("loss"),
        "accuracy_per_domain": _prefixed(server, "accuracy.") or None,
        "train_loss": train.get("train-loss"),
        "client_accuracy": client.get("accuracy"),
        "client_loss": client.get("loss"),
        "client_perplexity": client.get("perplexity"),
        "clients": event.get("clients") or {},
        "uplink_bytes": int(train.get("uplink-bytes", 0)),
        "downlink_bytes": int(event["downlink_bytes"]),
        "accepted": int(train.get("accepted", 0)),
        "signatures_verified": int(train.get("signatures-verified", 0)),
        "rejected": int(train.get("rejected", 0)),
        "rejections": {reason: int(n) for reason, n in _prefixed(train, "rejected.").items()},
        "rejection_messages": [f"{r['node'] or '?'}: {r['message']}" for r in event["rejections"]],
        "seconds": round(float(event["seconds"]), 3),
        "phases": dict(event.get("phases") or {}),
        "client_phases": dict(event.get("client_phases") or {}),
        "finished_at": time.time(),
    }


def _evaluation_record(metrics: MetricRecord | None) -> dict[str, Any] | None:
    if metrics is None:
        return None
    return {
        "accuracy": metrics["accuracy"],
        "loss": metrics["loss"],
        "accuracy_per_domain": _prefixed(metrics, "accuracy."),
    }


def resume_state(settings: RunSettings) -> tuple[dict, dict[str, Any], int]:
    """The weights, history and next round of the checkpoint ``resume`` names (``CheckpointError`` if unfit)."""
    checkpoint = resumed_checkpoint(settings)
    return checkpoint.weights, checkpoint.history, checkpoint.round + 1


def resumed_checkpoint(settings: RunSettings) -> Checkpoint:
    """The checkpoint ``resume`` names, checked against the run's settings (``CheckpointError`` if unfit)."""
    checkpoint = load_checkpoint(settings.run.resume)
    ours = settings.to_run_config()
    theirs = {**RESUME_DEFAULTS, **checkpoint.settings}
    keys = RESUME_MUST_MATCH + tuple(RESUME_DEFAULTS)
    different = [key for key in keys if str(theirs.get(key)) != str(ours[key])]
    if different:
        raise CheckpointError(
            "cannot resume: settings differ from the checkpoint's: "
            + ", ".join(f"{k} {theirs.get(k)!r} → {ours[k]!r}" for k in different)
        )
    if settings.merge.server_optimizer != "none" and checkpoint.optimizer is None:
        raise CheckpointError(
            f"cannot resume: the checkpoint holds no server optimizer state for {settings.merge.server_optimizer!r}"
        )
    if checkpoint.round >= settings.run.num_server_rounds:
        raise CheckpointError(
            f"checkpoint already holds round {checkpoint.round} of {settings.run.num_server_rounds}: nothing to resume "
            "(raise num-server-rounds to continue)"
        )
    return checkpoint


def _initial_client_record(event: Mapping[str, Any]) -> dict[str, Any]:
    client = event["client_eval"]
    return {
        "accuracy": None,
        "loss": None,
        "accuracy_per_domain": None,
        "client_accuracy": client.get("accuracy"),
        "client_loss": client.get("loss"),
        "client_perplexity": client.get("perplexity"),
        "clients": event["clients"],
    }


def _accountant(settings: RunSettings, history: dict[str, Any]) -> PrivacyAccountant | None:
    """The run's privacy accountant (None without DP), continuing the checkpoint's when resuming."""
    privacy = settings.privacy
    if not privacy.enabled:
        return None
    previous = history.get("privacy", {}).get("accountant_history", [])
    history["privacy"] = {
        "dp": privacy.dp,
        "clip_norm": privacy.dp_clip_norm,
        "noise_multiplier": privacy.dp_noise_multiplier,
        "delta": privacy.dp_delta,
        "accountant": "opacus RDPAccountant",
        "accountant_history": previous,
    }
    return PrivacyAccountant(privacy.dp_noise_multiplier, privacy.dp_delta, [tuple(e) for e in previous])


def run_server(grid: Grid, context: Context, settings: RunSettings) -> dict[str, Any]:
    """The whole federated run; returns the history written to ``report.json``."""
    started = time.perf_counter()
    if settings.source.task == "classify" and not settings.source.labels:
        settings = settings.replace(labels=",".join(run_label_names(settings)))
    run_dir = Path(settings.run.output_dir)
    model, _ = base_model(settings)
    checkpoint = resumed_checkpoint(settings) if settings.run.resume else None
    if checkpoint is not None:
        weights, history, first_round = checkpoint.weights, checkpoint.history, checkpoint.round + 1
    else:
        weights, first_round = global_state(model), 1
        history = {"settings": settings.to_run_config(), "initial": None, "rounds": []}
    history["settings"] = settings.to_run_config()
    history.setdefault("run_key", str(context.run_id))
    space = UpdateSpace.for_run(settings, update_shapes(settings), lora_scale(settings))
    evaluator = ServerEvaluator(settings) if has_server_evaluation(settings) else None
    display = RoundDisplay(settings.run.num_server_rounds)
    base = global_state(model)
    registry = Registry.load(settings.run.signer_registry) if settings.run.signer_registry else None
    strategy = FedFuseStrategy(
        settings,
        space,
        str(context.run_id),
        base,
        on_reply=display.reply,
        registry=registry,
        run_key=history["run_key"],
    )
    optimizer = strategy.optimizer
    if checkpoint is not None and checkpoint.optimizer is not None and optimizer.enabled:
        try:
            optimizer.load_state(checkpoint.optimizer, checkpoint.optimizer_steps)
        except ValueError as exc:
            raise CheckpointError(f"cannot resume: {exc}") from None
    history["server_optimizer"] = optimizer.describe()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        assert evaluator is not None
        metrics = evaluator(arrays)
        if server_round == 0:
            history["initial"] = _evaluation_record(metrics)
            display.initial(history["initial"])
        return metrics

    accountant = _accountant(settings, history)

    def on_round(event: dict[str, Any]) -> None:
        reporting = time.perf_counter()
        record = _round_record(event)
        if accountant is not None:
            rate = strategy.train_sample_rate if settings.privacy.dp == "central" else 1.0
            record["dp_epsilon"] = accountant.step(rate)
            history["privacy"]["accountant_history"] = [list(entry) for entry in accountant.history]
        history["rounds"].append(record)
        history["wall_seconds"] = history.get("wall_seconds", 0.0) + record["seconds"]
        checkpointing = time.perf_counter()
        state = event["arrays"].to_torch_state_dict()
        history["server_optimizer"] = optimizer.describe()
        history["checkpoint"] = str(
            save_checkpoint(
                run_dir,
                record["round"],
                dict(state),
                history,
                history["settings"],
                keep=settings.run.keep_checkpoints,
                optimizer=optimizer.state_tensors() if optimizer.enabled else None,
                optimizer_steps=optimizer.steps,
            )
        )
        record["phases"]["checkpoint"] = round(time.perf_counter() - checkpointing, 4)
        display.round(record)
        record["phases"]["report"] = round(time.perf_counter() - reporting - record["phases"]["checkpoint"], 4)

    def on_initial(event: dict[str, Any]) -> None:
        history["initial"] = _initial_client_record(event)
        display.initial(history["initial"])

    with display:
        strategy.start(
            grid,
            ArrayRecord(weights),
            num_rounds=settings.run.num_server_rounds,
            timeout=settings.run.timeout,
            evaluate_fn=evaluate if evaluator is not None else None,
            first_round=first_round,
            on_round=on_round,
            on_initial=on_initial,
        )
    history["run_seconds"] = round(time.perf_counter() - started, 3)
    write_report(history, run_dir)
    display.summary(history, run_dir)
    return history


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose settings are the run config with ``overrides`` on top (``fedfuse simulate`` uses them)."""
    app = ServerApp()
    extra = dict(overrides or {})

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, context, RunSettings.from_run_config(context.run_config, **extra))

    return app


app = make_server_app()
"""The ServerApp ``flwr run`` loads (``fedfuse.server.app:app``)."""
