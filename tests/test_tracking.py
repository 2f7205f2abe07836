"""Experiment tracking (issue 26): runs read back with TensorBoard's event reader and MLflow's own client.

Unit: the trackers with fake rounds, the metric names, the settings' refusals. Integration: two rounds of
the real ServerApp path (``run_server`` over the in-process seeded grid) tracked by each backend, and a
failing tracker that costs the run nothing. End-to-end: a tiny simulated federation on Ray with each
backend through ``fedfuse simulate --tracking``, and the import set of an untracked run.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pytest
from flwr.app import Context, RecordDict
from mlflow.tracking import MlflowClient
from seeded_grid import SeededGrid
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # type: ignore[import-untyped]
from tiny_runs import SEEDED_RUN, TINY_RUN
from typer.testing import CliRunner

import fedfuse.settings.run as run_settings
from fedfuse.cli.main import app as cli
from fedfuse.server import tracking
from fedfuse.server.app import run_server
from fedfuse.server.tracking import (
    MlflowTracker,
    NoTracker,
    SafeTracker,
    TensorBoardTracker,
    flat_params,
    open_tracker,
    round_metrics,
)
from fedfuse.settings import RunSettings, SettingsError
from fedfuse.training.run_model import lora_scale, update_shapes

ROUNDS: list[dict[str, Any]] = [
    {
        "round": 1,
        "accuracy": 0.5,
        "accuracy_per_domain": {"heart": 0.25},
        "train_loss": 2.0,
        "accepted": 2,
        "phases": {"train": 1.5},
        "rejections": {"stale": 1},
        "rejection_messages": ["node 3: stale"],
        "finished_at": 1.7e9,
        "clients": {"institution-1": {"train_loss": 2.5, "data_sha256": "ab12"}, "institution-2 (node 2)": {"loss": 1}},
    },
    {"round": 2, "accuracy": 0.75, "train_loss": 1.0, "accepted": 2, "loss": None, "dp": True, "clients": {}},
]
"""Two fake round records, as ``report.json`` holds them."""
PARAMS = {"strategy": "ties", "density": 0.3, "gradient-checkpointing": False, "local-steps": 2}


def _fake_outputs(folder: Path) -> list[Path]:
    """A report.md, a report.json and a PNG plot, as a run leaves them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.md").write_text("# fedfuse run\n", encoding="utf-8")
    (folder / "report.json").write_text(json.dumps({"rounds": ROUNDS}), encoding="utf-8")
    figure = plt.figure(figsize=(1, 1))
    figure.savefig(folder / "accuracy.png", format="png")
    plt.close(figure)
    return [folder / "report.md", folder / "report.json", folder / "accuracy.png"]


def _track(tracker, folder: Path) -> None:
    tracker.log_params(PARAMS)
    for record in ROUNDS:
        tracker.log_round(int(record["round"]), round_metrics(record))
    tracker.log_artifacts(_fake_outputs(folder))
    tracker.close()


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard's own reader finds under ``log_dir``: tag → [(step, value)]."""
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _text(log_dir: Path, tag: str) -> str:
    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    return events.Tensors(f"{tag}/text_summary")[0].tensor_proto.string_val[0].decode()


def _experiment_id(client: MlflowClient) -> str:
    experiment = client.get_experiment_by_name("fedfuse")
    assert experiment is not None, "no experiment 'fedfuse' in the store"
    return experiment.experiment_id


def _artifacts(client: MlflowClient, run_id: str, folder: str | None = None) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, folder)}


@pytest.mark.unit
def test_round_metrics_are_the_records_numbers_with_clients_under_client_node() -> None:
    assert round_metrics(ROUNDS[0]) == {
        "accuracy": 0.5,
        "accuracy_per_domain/heart": 0.25,
        "train_loss": 2.0,
        "accepted": 2.0,
        "phases/train": 1.5,
        "rejections/stale": 1.0,
        "client/institution-1/train_loss": 2.5,
        "client/institution-2 _node 2_/loss": 1.0,
    }
    assert round_metrics(ROUNDS[1]) == {"accuracy": 0.75, "train_loss": 1.0, "accepted": 2.0}
    assert round_metrics({"accuracy": float("nan"), "round": 3}) == {}


@pytest.mark.unit
def test_params_are_flat_strings() -> None:
    assert flat_params(PARAMS) == {
        "strategy": "ties",
        "density": "0.3",
        "gradient-checkpointing": "false",
        "local-steps": "2",
    }


@pytest.mark.unit
def test_tensorboard_tracker_writes_scalars_per_step_the_settings_and_the_report(tmp_path) -> None:
    _track(TensorBoardTracker(str(tmp_path / "tb")), tmp_path / "out")
    scalars = _scalars(tmp_path / "tb")
    assert scalars["accuracy"] == [(1, 0.5), (2, 0.75)]
    assert scalars["accepted"] == [(1, 2.0), (2, 2.0)]
    assert scalars["client/institution-1/train_loss"] == [(1, 2.5)]
    assert "| `strategy` | `ties` |" in _text(tmp_path / "tb", "settings")
    assert _text(tmp_path / "tb", "artifacts/report.md") == "# fedfuse run\n"
    assert "report.json" in _text(tmp_path / "tb", "artifacts")
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["artifacts/accuracy.png"]


@pytest.mark.unit
@pytest.mark.parametrize("store", ["file", "sqlite"])
def test_mlflow_tracker_logs_params_metric_history_and_artifacts(store, tmp_path, monkeypatch) -> None:
    if store == "file":  # MLflow 3 keeps its file store only on request (maintenance mode)
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = (tmp_path / "mlruns").as_uri()
    else:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "tiny")
    _track(tracker, tmp_path / "out")
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert run.data.params == flat_params(PARAMS)
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "accuracy")] == [(1, 0.5), (2, 0.75)]
    history = client.get_metric_history(tracker.run_id, "client/institution-1/train_loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.5)]
    assert _artifacts(client, tracker.run_id) == {"report.md", "report.json", "accuracy.png"}
    if store == "sqlite":  # artifacts beside the database, not in the current folder
        assert (tmp_path / "mlartifacts").is_dir() and not Path("mlartifacts").exists()


@pytest.mark.unit
def test_a_failing_tracker_warns_and_the_caller_goes_on(caplog) -> None:
    class Broken(NoTracker):
        def log_round(self, step, metrics) -> None:
            raise OSError("disk full")

    with caplog.at_level(logging.WARNING, logger=tracking.__name__):
        SafeTracker(Broken(), "mlflow").log_round(1, {"accuracy": 0.5})
    assert "tracking mlflow: log_round failed (OSError: disk full); the run goes on" in caplog.text


@pytest.mark.unit
def test_the_settings_refuse_an_unknown_backend_and_a_missing_library(tmp_path, monkeypatch) -> None:
    with pytest.raises(SettingsError, match=r"^tracking must be one of none, tensorboard, mlflow; got 'wandb'$"):
        RunSettings.from_run_config({"tracking": "wandb"})
    missing = {"mlflow"}
    real = run_settings.importlib.util.find_spec
    monkeypatch.setattr(run_settings.importlib.util, "find_spec", lambda n: None if n in missing else real(n))
    settings = RunSettings.from_run_config({"tracking": "mlflow"})  # clients read the same config: no refusal
    with pytest.raises(SettingsError, match=r"tracking 'mlflow' needs mlflow, not installed: pip install 'fedfuse\["):
        settings.run.check_tracking_installed()
    with pytest.raises(SettingsError, match="needs mlflow"):
        open_tracker(settings)
    missing = {"alembic"}  # the default sqlite store needs SQLAlchemy and Alembic; a server store does not
    with pytest.raises(SettingsError, match="needs alembic"):
        settings.run.check_tracking_installed()
    settings.replace(tracking_uri="http://127.0.0.1:5000").run.check_tracking_installed()
    RunSettings().run.check_tracking_installed()


@pytest.mark.unit
def test_the_default_store_is_beside_the_run_output(tmp_path) -> None:
    out = tmp_path / "run"
    assert RunSettings.from_run_config({"output-dir": str(out)}).run.tracking == "none"
    board = RunSettings.from_run_config({"output-dir": str(out), "tracking": "tensorboard"})
    assert board.run.tracking_target == str(out / "tensorboard")
    flow = RunSettings.from_run_config({"output-dir": str(out), "tracking": "mlflow"})
    assert flow.run.tracking_target == f"sqlite:///{out / 'mlflow.db'}"
    given = flow.replace(tracking_uri="http://127.0.0.1:5000")
    assert given.run.tracking_target == "http://127.0.0.1:5000"
    assert isinstance(open_tracker(RunSettings()), NoTracker)


@pytest.mark.unit
def test_a_store_that_cannot_open_leaves_the_run_untracked_with_a_warning(caplog) -> None:
    settings = RunSettings.from_run_config({"tracking": "mlflow", "tracking-uri": "nosuchscheme://x"})
    with caplog.at_level(logging.WARNING, logger=tracking.__name__):
        assert isinstance(open_tracker(settings), NoTracker)
    assert "tracking mlflow: cannot open nosuchscheme://x" in caplog.text


@pytest.mark.integration
@pytest.mark.parametrize("args", [["--tracking", "wandb"], ["--tracking", "mlflow"]], ids=["unknown", "missing"])
def test_simulate_refuses_tracking_it_cannot_do_before_anything_starts(args, monkeypatch) -> None:
    real = run_settings.importlib.util.find_spec
    monkeypatch.setattr(run_settings.importlib.util, "find_spec", lambda n: None if n == "mlflow" else real(n))
    result = CliRunner().invoke(cli, ["simulate", *args, "--rounds", "1"], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    expected = "tracking must be one of" if args[1] == "wandb" else "pip install 'fedfuse[tracking]'"
    assert expected in " ".join(result.output.split()).replace("│", "").replace("  ", " ")


SEEDED = SEEDED_RUN
"""Two rounds of fedfuse's ServerApp over the seeded grid (three nodes send seeded updates, no training)."""


def _serve(out: Path, **extra: object) -> dict:
    settings = RunSettings.from_run_config({**SEEDED, "output-dir": str(out), **extra})
    grid = SeededGrid(dict(settings.update_space(update_shapes(settings), lora_scale(settings)).wire_shapes))
    context = Context(run_id=5, node_id=0, node_config={}, state=RecordDict(), run_config={})
    return run_server(grid, context, settings)  # type: ignore[arg-type]


REPORT = {"report.json", "report.md", "accuracy.png", "uplink.png", "diagnostics.png"}
"""A run's report files (diagnostics.png: the last round's pairwise cosines, issue 27)."""
FINAL = {"checkpoint/state.json", "checkpoint/weights-round-0002.safetensors"}


@pytest.mark.integration
def test_two_server_rounds_tracked_in_tensorboard(server_identity, tmp_path) -> None:
    history = _serve(tmp_path / "run", tracking="tensorboard")
    scalars = _scalars(tmp_path / "run" / "tensorboard")
    assert scalars["accepted"] == [(1, 3.0), (2, 3.0)]
    assert scalars["uplink_bytes"] == [(r["round"], float(r["uplink_bytes"])) for r in history["rounds"]]
    assert [step for step, _ in scalars["client/11/train_loss"]] == [1, 2]
    assert "| `tracking` | `tensorboard` |" in _text(tmp_path / "run" / "tensorboard", "settings")
    listed = _text(tmp_path / "run" / "tensorboard", "artifacts/checkpoint")
    assert "weights-round-0002.safetensors" in listed and "state.json" in listed


@pytest.mark.integration
def test_two_server_rounds_tracked_in_mlflow_beside_the_run(server_identity, tmp_path) -> None:
    history = _serve(tmp_path / "run", tracking="mlflow")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    [run] = client.search_runs([_experiment_id(client)])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params == flat_params(history["settings"]) and run.data.params["tracking"] == "mlflow"
    steps = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "accepted")]
    assert steps == [(1, 3.0), (2, 3.0)]
    per_client = client.get_metric_history(run.info.run_id, "client/12/train_loss")
    assert [m.step for m in per_client] == [1, 2]
    assert _artifacts(client, run.info.run_id) == REPORT | {"checkpoint"}
    assert _artifacts(client, run.info.run_id, "checkpoint") == FINAL


@pytest.mark.integration
def test_a_tracker_that_fails_every_call_costs_the_run_nothing(server_identity, tmp_path, monkeypatch, caplog) -> None:
    def broken(self, *args) -> None:
        raise RuntimeError("store went away")

    for name in ("log_params", "log_round", "log_artifacts", "close"):
        monkeypatch.setattr(TensorBoardTracker, name, broken)
    with caplog.at_level(logging.WARNING, logger=tracking.__name__):
        history = _serve(tmp_path / "run", tracking="tensorboard")
    assert [r["accepted"] for r in history["rounds"]] == [3, 3]
    assert {p.name for p in (tmp_path / "run").iterdir()} >= REPORT | {"checkpoint"}
    assert caplog.text.count("store went away") == 1 + 2 + 2 + 1


@pytest.mark.integration
def test_an_untracked_run_writes_no_tracking_files(server_identity, tmp_path) -> None:
    _serve(tmp_path / "run")
    assert {p.name for p in (tmp_path / "run").iterdir()} == REPORT | {"checkpoint"}


@pytest.mark.e2e
@pytest.mark.parametrize("backend", ["mlflow"])
def test_a_tiny_simulated_federation_tracked_by_each_backend(backend, tmp_path) -> None:
    """``fedfuse simulate --tracking BACKEND``: 2 clients, 2 rounds on Ray, read back with the backend's reader.

    One backend runs here: the flag's path from the CLI to the server is the same for both, and each backend's
    read-back of real server rounds is tested on the in-process grid above (integration tier).
    """
    out = tmp_path / backend
    tiny = " ".join(f"{key}={value}" for key, value in TINY_RUN.items())
    args = ["simulate", "--tracking", backend, "-n", "2", "-r", "2", "-o", str(out), "--run-config", tiny]
    result = CliRunner().invoke(cli, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    history = json.loads((out / "report.json").read_text(encoding="utf-8"))
    accuracy = [(0, history["initial"]["accuracy"])] + [(r["round"], r["accuracy"]) for r in history["rounds"]]
    if backend == "tensorboard":
        scalars = _scalars(out / "tensorboard")
        assert scalars["accuracy"] == [(step, pytest.approx(value)) for step, value in accuracy]
        assert {tag.split("/")[0] for tag in scalars} >= {"accuracy", "train_loss", "client", "phases"}
        return
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    [run] = client.search_runs([_experiment_id(client)])
    metric = client.get_metric_history(run.info.run_id, "accuracy")
    assert [(m.step, m.value) for m in metric] == [(step, pytest.approx(value)) for step, value in accuracy]
    assert run.data.params["num-server-rounds"] == "2" and run.data.params["tracking"] == "mlflow"
    assert any(name.startswith("client/") for name in run.data.metrics)
    assert _artifacts(client, run.info.run_id) == REPORT | {"checkpoint"}
    assert _artifacts(client, run.info.run_id, "checkpoint") == FINAL


@pytest.mark.e2e
def test_an_untracked_run_imports_no_tracking_library() -> None:
    probe = (
        "import sys; from fedfuse.server.app import run_server; from fedfuse.cli.main import app;"
        "from fedfuse.server.tracking import open_tracker; from fedfuse.settings import RunSettings;"
        "open_tracker(RunSettings()); print(sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('mlflow', 'tensorboard') or m.startswith('torch.utils.tensorboard')))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=os.environ)
    assert done.stdout.strip() == "[]"
