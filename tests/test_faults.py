"""Faults survived with real processes: a client that raises or is late, and a server killed with SIGKILL.

Each test runs Flower's simulation engine for real (Ray actors); the kill test runs ``fedfuse simulate``
as its own process group and kills all of it, Ray included, then resumes with ``--resume``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from federation import kill_tree
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from seeded_grid import SeededGrid
from tiny_runs import TINY_RUN

from fedfuse.client.app import make_client_app
from fedfuse.messages import EvaluateReply, TrainReply
from fedfuse.rejections import Rejected
from fedfuse.rounds import ModelChange
from fedfuse.server.run_checkpoint import load_checkpoint
from fedfuse.server.strategy import FedFuseStrategy
from fedfuse.server.streaming import stream_replies
from fedfuse.settings import RunSettings
from fedfuse.simulation import simulate

# Tiers are marked per test here: this module mixes e2e and integration tests.

pytestmark = pytest.mark.slow

TINY = {**TINY_RUN, "num-server-rounds": 1, "min-train-nodes": 2}


def _faulty_client(overrides: dict, fault) -> ClientApp:
    """The fedfuse ClientApp, except that partition 0 runs ``fault`` instead of training."""
    honest = make_client_app(overrides)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if int(context.node_config["partition-id"]) == 0:
            fault()
        return honest(msg, context)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return honest(msg, context)

    return app


def _raise() -> None:
    raise ValueError("the local disk is on fire")


@pytest.mark.e2e
def test_a_client_that_raises_is_recorded_in_one_short_line_and_the_round_completes(tmp_path) -> None:
    overrides = {**TINY, "output-dir": str(tmp_path)}
    history = simulate(overrides, num_clients=3, client_app=_faulty_client(overrides, _raise))
    (record,) = history["rounds"]
    assert record["accepted"] == 2 and record["rejections"] == {"client_error": 1}
    (message,) = record["rejection_messages"]
    assert "the local disk is on fire" in message
    assert "\x1b" not in message and "Traceback" not in message and len(message) < 400
    assert load_checkpoint(tmp_path).round == 1


def _silent_past_the_deadline(out: Path, longest_s: float = 45.0) -> None:
    """Answer nothing until the round is over (its checkpoint is written), at most ``longest_s``.

    The simulation waits for this client before it shuts down, so sleeping a fixed 45 s would add the
    rest of the 45 s to the run; the reply still comes after the round's deadline closed the round.
    """
    end = time.monotonic() + longest_s
    while time.monotonic() < end and not (out / "checkpoint" / "state.json").exists():
        time.sleep(0.2)


@pytest.mark.e2e
def test_a_client_past_the_round_deadline_is_dropped_and_recorded(tmp_path) -> None:
    overrides = {**TINY, "output-dir": str(tmp_path), "timeout": 25.0}
    started = time.perf_counter()
    silent = _faulty_client(overrides, lambda: _silent_past_the_deadline(tmp_path))
    history = simulate(overrides, num_clients=3, client_app=silent)
    (record,) = history["rounds"]
    assert record["accepted"] == 2 and record["rejections"] == {"timed_out": 1}
    assert "deadline of 25 s" in record["rejection_messages"][0]
    assert time.perf_counter() - started < 120


KILL_RUN = {
    **TINY_RUN,
    "mode": "full",
    "strategy": "ties",
    "sparsifier": "trim",
    "density": 0.2,
    "num-server-rounds": 3,
}


def _command(out: Path, *extra: str) -> list[str]:
    config = " ".join(f"{key}={value}" for key, value in KILL_RUN.items())
    return [sys.executable, "-m", "fedfuse.cli.main", "simulate", "--clients", "3", "--output-dir", str(out),
            "--run-config", config, *extra]  # fmt: skip


def _finished_round(out: Path) -> int:
    state = out / "checkpoint" / "state.json"
    try:
        return int(json.loads(state.read_text())["round"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.e2e
def test_a_server_killed_at_a_random_moment_resumes_to_bit_identical_weights(tmp_path) -> None:
    """Error feedback on: clients' residuals must survive the kill too (kept on the node, keyed by run)."""
    environment = {key: value for key, value in os.environ.items() if key != "FEDFUSE_STATE_DIR"}
    straight = tmp_path / "straight"
    done = subprocess.run(_command(straight), env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        _command(killed), env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while _finished_round(killed) < 1 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        time.sleep(random.Random(os.getpid()).uniform(0.0, 4.0))  # somewhere in round 2, or its checkpoint write
    finally:
        kill_tree(process)
    reached = _finished_round(killed)
    assert 1 <= reached < 3, f"the kill came too late to test anything (round {reached} finished)"
    resumed = subprocess.run(
        _command(killed, "--resume", str(killed)), env=environment, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    expected, got = load_checkpoint(straight), load_checkpoint(killed)
    assert got.round == expected.round == 3
    assert [name for name in expected.weights if not torch.equal(expected.weights[name], got.weights[name])] == []
    leftovers = [p.name for p in (killed / "checkpoint").iterdir() if ".fedfuse-" in p.name]
    assert leftovers == []
    assert (killed / "node-state").is_dir(), "the nodes kept their error-feedback residuals under the run folder"


SHAPES = {"layer.weight": (5, 4), "layer.bias": (4,)}


def _round_with_node_12_lost() -> tuple[FedFuseStrategy, SeededGrid, list[Message], dict[str, torch.Tensor]]:
    """A FedAvg round's strategy, its grid (node 12 missed its heartbeats), instructions and base weights."""
    settings = RunSettings.from_run_config(mode="full", strategy="fedavg")
    base = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    strategy = FedFuseStrategy(settings, settings.update_space(SHAPES, scale=1.0), "run", ModelChange("v:0"))
    grid = SeededGrid(SHAPES)
    grid.unavailable = {12}
    return strategy, grid, list(strategy.configure_train(1, ArrayRecord(base), ConfigRecord(), grid)), base


@pytest.mark.integration
def test_a_node_the_superlink_reports_unavailable_is_dropped_once_as_that_node(server_identity) -> None:
    """Flower's SuperLink answers for a node that missed its heartbeats, from the SuperLink's own id.

    The node must be rejected once, as ``node_unavailable`` — not a ``client_error`` from "node 1" plus a
    ``timed_out`` for the silent node (what a deployed run recorded when the SuperLink noticed the loss first).
    """
    strategy, grid, messages, _ = _round_with_node_12_lost()
    replies = grid.pull_messages(grid.push_messages(messages))
    lost = next(reply for reply in replies if reply.has_error())
    assert lost.metadata.src_node_id not in grid.nodes  # the SuperLink's own id, as Flower sends it
    arrays, metrics = strategy.aggregate_train(1, iter(replies))
    assert arrays is not None and metrics["accepted"] == 2
    assert [(r.node, r.reason) for r in strategy.last_rejections] == [("institution-12", "node_unavailable")]
    for parse in (TrainReply.from_message, EvaluateReply.from_message):
        with pytest.raises(Rejected) as raised:
            parse(lost)
        assert raised.value.reason == "node_unavailable" and "heartbeat" in str(raised.value)


@pytest.mark.integration
def test_a_node_reported_unavailable_is_dropped_once_when_the_replies_stream_in(server_identity) -> None:
    """As above, with the replies streamed as the ServerApp gets them (``stream_replies``).

    The grid pushes the instructions, and so gives them their message ids, only when the first reply is
    asked for: the node a SuperLink-made reply answers for is known only from then on.
    """
    strategy, grid, messages, base = _round_with_node_12_lost()
    arrays, metrics = strategy.aggregate_train(1, stream_replies(grid, messages, timeout=30), arrays=ArrayRecord(base))
    assert arrays is not None and metrics["accepted"] == 2
    assert [(r.node, r.reason) for r in strategy.last_rejections] == [("institution-12", "node_unavailable")]
