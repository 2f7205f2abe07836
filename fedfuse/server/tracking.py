"""Experiment tracking: a run's settings, rounds and outputs in TensorBoard or MLflow.

``tracking = "tensorboard" | "mlflow"`` (run config; default ``none``) makes the ServerApp open one
:class:`Tracker` per run: the settings go in as params (flat, strings), every round's federated and
per-client metrics as step metrics (step = round; round 0 is the initial model), and at the end the
report, the plots and the final checkpoint as artifacts. The libraries are imported only when their
backend is chosen, and a tracker that fails logs a warning: the run, its checkpoints and report go on.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from fedfuse.server.run_checkpoint import optimizer_file, weights_file
from fedfuse.settings import RunSettings

EXPERIMENT = "fedfuse"
"""The MLflow experiment fedfuse's runs go to (created on first use)."""
NOT_METRICS = ("round", "finished_at", "rejection_messages")
"""Entries of a round record that are not step metrics (the step itself, a timestamp, free text)."""
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-./ ]")

log = logging.getLogger(__name__)
T = TypeVar("T")


class Tracker(Protocol):
    """Where a run's settings, rounds and outputs are logged (TensorBoard, MLflow or nowhere)."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log the run's settings (flat run-config keys)."""

    def log_round(self, step: int, metrics: Mapping[str, float]) -> None:
        """Log one round's metrics at ``step`` (the round number; 0 = the initial model)."""

    def log_artifacts(self, paths: Iterable[Path], folder: str = "") -> None:
        """Keep these files with the run (under ``folder``)."""

    def close(self, failed: bool = False) -> None:
        """End the run (``failed``: it stopped with an error)."""


class NoTracker:
    """``tracking = "none"``: logs nothing."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Nothing."""

    def log_round(self, step: int, metrics: Mapping[str, float]) -> None:
        """Nothing."""

    def log_artifacts(self, paths: Iterable[Path], folder: str = "") -> None:
        """Nothing."""

    def close(self, failed: bool = False) -> None:
        """Nothing."""


def metric_name(name: str) -> str:
    """A name both backends accept: characters other than letters, digits, ``_-./`` and space become ``_``."""
    return _UNSAFE.sub("_", name)


def flat_params(settings: Mapping[str, Any]) -> dict[str, str]:
    """The run's settings as params: flat keys, string values (booleans as ``true``/``false``)."""
    return {key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in settings.items()}


def round_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """A round record's numbers by name: ``accuracy``, ``phases/train``, ``client/<node>/<metric>``, ...

    ``record`` is a round (or the initial evaluation) of ``report.json``: nested numbers are joined with
    ``/``; text, lists, booleans, missing and non-finite values are left out.
    """
    metrics: dict[str, float] = {}
    for key, value in record.items():
        if key not in NOT_METRICS:
            metrics.update(_numbers("client" if key == "clients" else key, value))
    return metrics


def _numbers(name: str, value: Any) -> Iterator[tuple[str, float]]:
    if isinstance(value, Mapping):
        for key, inner in value.items():
            yield from _numbers(f"{name}/{key}", inner)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        yield metric_name(name), float(value)


def final_model_files(checkpoint: str | None, round_number: int) -> list[Path]:
    """The run's final checkpoint: ``state.json`` and the last round's weights (and optimizer state)."""
    if not checkpoint:
        return []
    state = Path(checkpoint)
    candidates = (state, state.parent / weights_file(round_number), state.parent / optimizer_file(round_number))
    return [path for path in candidates if path.is_file()]


class TensorBoardTracker:
    """Event files in a folder (``torch.utils.tensorboard``): scalars per round, settings and report as text."""

    def __init__(self, log_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir.removeprefix("file:"))

    def log_params(self, params: Mapping[str, Any]) -> None:
        """The settings as one markdown table (TensorBoard's Text tab)."""
        rows = [f"| `{key}` | `{value}` |" for key, value in flat_params(params).items()]
        self.writer.add_text("settings", "\n".join(["| key | value |", "|---|---|", *rows]), 0)

    def log_round(self, step: int, metrics: Mapping[str, float]) -> None:
        """Each metric as a scalar at ``step``."""
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def log_artifacts(self, paths: Iterable[Path], folder: str = "") -> None:
        """Markdown as text, PNG plots as images, and every file's path as text (TensorBoard keeps no files)."""
        from matplotlib.image import imread

        listed = []
        for path in paths:
            tag = "/".join(part for part in ("artifacts", folder, path.name) if part)
            if path.suffix == ".md":
                self.writer.add_text(tag, path.read_text(encoding="utf-8"), 0)
            elif path.suffix == ".png":
                self.writer.add_image(tag, imread(str(path))[..., :3], 0, dataformats="HWC")
            listed.append(f"- `{path.resolve()}`")
        self.writer.add_text("/".join(part for part in ("artifacts", folder) if part), "\n".join(listed), 0)
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        """Flush and close the event file."""
        self.writer.close()


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def default_artifact_location(uri: str) -> str | None:
    """For a sqlite store: ``mlartifacts`` beside the database (else MLflow's choice, the current folder)."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///"))  # sqlite:///relative.db, sqlite:////absolute.db
    return (database.resolve().parent / "mlartifacts").as_uri()


class MlflowTracker:
    """One MLflow run in experiment ``fedfuse`` of a tracking store (``MlflowClient``; no global state)."""

    def __init__(self, uri: str, run_name: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            experiment_id = self.client.create_experiment(EXPERIMENT, default_artifact_location(uri))
        self.run_id: str = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """The settings as params (MLflow takes 100 per batch)."""
        from mlflow.entities import Param

        entries = [Param(key, value) for key, value in flat_params(params).items()]
        for chunk in _chunks(entries, 100):
            self.client.log_batch(self.run_id, params=list(chunk))

    def log_round(self, step: int, metrics: Mapping[str, float]) -> None:
        """The metrics at ``step`` (MLflow takes 1000 per batch)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(name, value, now, step) for name, value in metrics.items()]
        for chunk in _chunks(entries, 1000):
            self.client.log_batch(self.run_id, metrics=list(chunk))

    def log_artifacts(self, paths: Iterable[Path], folder: str = "") -> None:
        """Copy the files into the run's artifact store."""
        for path in paths:
            self.client.log_artifact(self.run_id, str(path), artifact_path=folder or None)

    def close(self, failed: bool = False) -> None:
        """Mark the run FINISHED (or FAILED)."""
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class SafeTracker:
    """A tracker whose failures are warnings: tracking never costs the run its checkpoints or report."""

    def __init__(self, inner: Tracker, name: str) -> None:
        self.inner, self.name = inner, name

    def _call(self, what: str, *args: Any) -> None:
        try:
            getattr(self.inner, what)(*args)
        except Exception as exc:  # any backend error: warn, the run goes on
            log.warning("tracking %s: %s failed (%s: %s); the run goes on", self.name, what, type(exc).__name__, exc)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """The inner tracker's, warning on failure."""
        self._call("log_params", params)

    def log_round(self, step: int, metrics: Mapping[str, float]) -> None:
        """The inner tracker's, warning on failure."""
        self._call("log_round", step, metrics)

    def log_artifacts(self, paths: Iterable[Path], folder: str = "") -> None:
        """The inner tracker's, warning on failure."""
        self._call("log_artifacts", list(paths), folder)

    def close(self, failed: bool = False) -> None:
        """The inner tracker's, warning on failure."""
        self._call("close", failed)


def open_tracker(settings: RunSettings) -> Tracker:
    """The run's tracker (a missing library is a ``SettingsError``; a store that cannot open, a warning)."""
    run = settings.run
    if run.tracking == "none":
        return NoTracker()
    run.check_tracking_installed()
    target = run.tracking_target
    try:
        inner: Tracker = (
            TensorBoardTracker(target)
            if run.tracking == "tensorboard"
            else MlflowTracker(target, Path(run.output_dir).resolve().name)
        )
    except Exception as exc:  # the store is unreachable or refuses: go on untracked
        log.warning(
            "tracking %s: cannot open %s (%s: %s); the run goes on untracked",
            run.tracking,
            target,
            type(exc).__name__,
            exc,
        )
        return NoTracker()
    log.info("tracking %s: %s", run.tracking, target)
    return SafeTracker(inner, run.tracking)
