"""The fedfuse ServerApp: rounds of streaming merges, server-side evaluation, checkpoints, resume, report.

Every round it samples nodes, folds their updates as they arrive (``FedFuseStrategy``), evaluates the
merged model on the held-out test split (overall and per domain), writes an atomic checkpoint to
``<output-dir>/checkpoint`` and prints one line. At the end it writes ``report.json``, ``report.md``
and PNG plots to ``<output-dir>``. ``resume`` continues a run from its last checkpoint. ``tracking``
sends the settings, rounds and outputs to TensorBoard or MLflow (``fedfuse.server.tracking``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedfuse.rounds import ModelChange, PrivacyAccountant, base_version
from fedfuse.security import Registry
from fedfuse.server.display import RoundDisplay
from fedfuse.server.evaluation import ServerEvaluator, has_server_evaluation
from fedfuse.server.history import EvaluationRecord, RoundRecord, RunHistory
from fedfuse.server.memory import resident_bytes, return_large_frees_to_the_system, server_memory
from fedfuse.server.report import write_report
from fedfuse.server.round_loop import InitialEvaluation, RoundOutcome
from fedfuse.server.run_checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from fedfuse.server.strategy import FedFuseStrategy
from fedfuse.server.tracking import NoTracker, Tracker, final_model_files, open_tracker, round_metrics
from fedfuse.settings import RunSettings
from fedfuse.training.client_datasets import run_label_names
from fedfuse.training.run_model import base_identity, fresh_base_model, global_state, lora_scale, update_shapes

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


def resume_state(settings: RunSettings) -> tuple[dict, dict[str, Any], int]:
    """The stored weights (or change), history and next round of the checkpoint ``resume`` names."""
    checkpoint = resumed_checkpoint(settings)
    return checkpoint.weights, checkpoint.history, checkpoint.round + 1


def resumed_checkpoint(settings: RunSettings) -> Checkpoint:
    """The checkpoint ``resume`` names, checked against the run's settings (``CheckpointError`` if unfit)."""
    checkpoint = load_checkpoint(settings.run.resume)
    ours = {**settings.to_run_config(), "partition": settings.source.partition_scheme}
    theirs = {**RESUME_DEFAULTS, **checkpoint.settings}
    if theirs.get("partition") == "auto":  # "auto" resolves alike for the same task and data (checked too)
        theirs["partition"] = settings.source.partition_scheme
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


def _accountant(settings: RunSettings, history: RunHistory) -> PrivacyAccountant | None:
    """The run's privacy accountant (None without DP), continuing the checkpoint's when resuming."""
    privacy = settings.privacy
    if not privacy.enabled:
        return None
    previous = (history.privacy or {}).get("accountant_history", [])
    history.privacy = {
        "dp": privacy.dp,
        "clip_norm": privacy.dp_clip_norm,
        "noise_multiplier": privacy.dp_noise_multiplier,
        "delta": privacy.dp_delta,
        "accountant": "opacus RDPAccountant",
        "accountant_history": previous,
    }
    return PrivacyAccountant(privacy.dp_noise_multiplier, privacy.dp_delta, [tuple(e) for e in previous])


class RunRecorder:
    """What the ServerApp does between rounds: evaluate on the server, account privacy, checkpoint, report.

    Holds the run's history (written to ``report.json``); the strategy calls :meth:`on_round` after each
    round and :meth:`on_initial` after the clients' evaluation of the initial model.
    """

    def __init__(
        self, settings: RunSettings, history: RunHistory, strategy: FedFuseStrategy, tracker: Tracker | None = None
    ) -> None:
        self.settings = settings
        self.tracker = tracker or NoTracker()
        self.history = history
        self.strategy = strategy
        self.run_dir = Path(settings.run.output_dir)
        self.display = RoundDisplay(settings.run.num_server_rounds)
        self.evaluator = ServerEvaluator(settings) if has_server_evaluation(settings) else None
        self.accountant = _accountant(settings, history)
        self.rss_start = 0

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Server-side evaluation of the run's model on the held-out split (round 0: the initial model).

        The model is base + the strategy's change (no weights travel through the round loop).
        """
        assert self.evaluator is not None
        metrics = self.evaluator(self.strategy.model.tensors)
        if server_round == 0:
            self.history.initial = EvaluationRecord.of_server(metrics)
            self._initial(self.history.to_json()["initial"])
        return metrics

    def on_initial(self, evaluation: InitialEvaluation) -> None:
        """The clients' evaluation of the initial model (runs without server-side evaluation)."""
        self.history.initial = EvaluationRecord.of_clients(evaluation)
        self._initial(self.history.to_json()["initial"])

    def _initial(self, initial: dict[str, Any]) -> None:
        """Print the initial model's evaluation and track it as step 0."""
        self.display.initial(initial)
        self.tracker.log_round(0, round_metrics(initial))

    def on_round(self, outcome: RoundOutcome) -> None:
        """Record a finished round, account its privacy, checkpoint it atomically and print its line."""
        reporting = time.perf_counter()
        record = RoundRecord.of(outcome)
        if self.accountant is not None and self.history.privacy is not None:
            rate = self.strategy.train_sample_rate if self.settings.privacy.dp == "central" else 1.0
            record.dp_epsilon = self.accountant.step(rate)
            self.history.privacy["accountant_history"] = [list(entry) for entry in self.accountant.history]
        self.history.add_round(record)
        checkpointing = time.perf_counter()
        self._checkpoint(record.round)
        record.phases["checkpoint"] = round(time.perf_counter() - checkpointing, 4)
        latest = self.history.to_json()["rounds"][-1]
        self.display.round(latest)
        self.tracker.log_round(record.round, round_metrics(latest))
        record.phases["report"] = round(time.perf_counter() - reporting - record.phases["checkpoint"], 4)

    def _checkpoint(self, round_number: int) -> None:
        optimizer = self.strategy.optimizer
        self.history.server_optimizer = optimizer.describe()
        self.history.server_memory = server_memory(self.rss_start)
        model = self.strategy.model
        self.history.checkpoint = str(
            save_checkpoint(
                self.run_dir,
                round_number,
                model.tensors,
                self.history.to_json(),
                self.history.settings,
                keep=self.settings.run.keep_checkpoints,
                optimizer=optimizer.state_tensors() if optimizer.enabled else None,
                optimizer_steps=optimizer.steps,
                kind="change",
                version=model.version,
            )
        )


def _start(
    settings: RunSettings, context: Context
) -> tuple[RunSettings, ModelChange, RunHistory, int, Checkpoint | None]:
    """The run's settings (labels resolved), its model change, history and first round (from ``resume``)."""
    if settings.source.task == "classify" and not settings.source.labels:
        settings = settings.replace(labels=",".join(run_label_names(settings)))
    checkpoint = resumed_checkpoint(settings) if settings.run.resume else None
    if checkpoint is not None:
        history = RunHistory.from_json(checkpoint.history)
        history.run_key = history.run_key or str(context.run_id)
        change, first_round = _resumed_change(settings, checkpoint), checkpoint.round + 1
    else:
        history = RunHistory(settings.to_run_config(), str(context.run_id))
        change, first_round = ModelChange(base_version(base_identity(settings))), 1
    history.settings = settings.to_run_config()
    return settings, change, history, first_round, checkpoint


def _resumed_change(settings: RunSettings, checkpoint: Checkpoint) -> ModelChange:
    """The checkpoint's change and version (one written before model versions is turned into a change once)."""
    if checkpoint.kind == "change" and checkpoint.version:
        return ModelChange(checkpoint.version, dict(checkpoint.weights))
    model, _ = fresh_base_model(settings)
    change = checkpoint.change_from(global_state(model))
    del model
    return ModelChange(base_version({**base_identity(settings), "resumed-round": str(checkpoint.round)}), change)


def _strategy(settings: RunSettings, context: Context, history: RunHistory, change: ModelChange) -> FedFuseStrategy:
    """fedfuse's strategy for this run: its update space, signer registry, run key and model change."""
    space = settings.update_space(update_shapes(settings), lora_scale(settings))
    registry = Registry.load(settings.run.signer_registry) if settings.run.signer_registry else None
    return FedFuseStrategy(settings, space, str(context.run_id), change, registry=registry, run_key=history.run_key)


def _resume_optimizer(strategy: FedFuseStrategy, checkpoint: Checkpoint | None) -> None:
    """Continue the server optimizer's moments from the checkpoint (a resumed run steps as an uninterrupted one)."""
    optimizer = strategy.optimizer
    if checkpoint is not None and checkpoint.optimizer is not None and optimizer.enabled:
        try:
            optimizer.load_state(checkpoint.optimizer, checkpoint.optimizer_steps)
        except ValueError as exc:
            raise CheckpointError(f"cannot resume: {exc}") from None


def run_server(grid: Grid, context: Context, settings: RunSettings) -> dict[str, Any]:
    """The whole federated run; returns the history written to ``report.json``.

    The server never loads the base model's weights to merge (only their names and shapes); with
    server-side evaluation its evaluator holds one copy.
    """
    started = time.perf_counter()
    return_large_frees_to_the_system()
    rss_start = resident_bytes()
    settings, change, history, first_round, checkpoint = _start(settings, context)
    strategy = _strategy(settings, context, history, change)
    _resume_optimizer(strategy, checkpoint)
    history.server_optimizer = strategy.optimizer.describe()
    tracker = open_tracker(settings)
    tracker.log_params(history.settings)
    recorder = RunRecorder(settings, history, strategy, tracker)
    recorder.rss_start = rss_start
    strategy.on_reply = recorder.display.reply
    try:
        with recorder.display:
            strategy.start(
                grid,
                ArrayRecord(),
                num_rounds=settings.run.num_server_rounds,
                timeout=settings.run.timeout,
                evaluate_fn=recorder.evaluate if recorder.evaluator is not None else None,
                first_round=first_round,
                on_round=recorder.on_round,
                on_initial=recorder.on_initial,
            )
    except BaseException:
        tracker.close(failed=True)
        raise
    history.run_seconds = round(time.perf_counter() - started, 3)
    history.server_memory = server_memory(rss_start)
    document = history.to_json()
    paths = write_report(document, recorder.run_dir)
    recorder.display.summary(document, recorder.run_dir)
    _track_outputs(tracker, paths.values(), history)
    return document


def _track_outputs(tracker: Tracker, report: Iterable[Path], history: RunHistory) -> None:
    """The report and plots, then the final checkpoint (under ``checkpoint/``), as the run's artifacts."""
    tracker.log_artifacts(report)
    last_round = history.rounds[-1].round if history.rounds else 0
    tracker.log_artifacts(final_model_files(history.checkpoint, last_round), "checkpoint")
    tracker.close()


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
