"""Faults survived with real processes: clients that raise, answer late or corrupt their update; a lost node.

The federation test runs Flower's simulation engine for real (Ray actors). The server killed with SIGKILL
and resumed is in tests/test_simulation.py, beside the uninterrupted run it must match bit for bit.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
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
from fedfuse.wire import REASONS

# Tiers are marked per test here: this module mixes e2e and integration tests.

pytestmark = pytest.mark.slow

TINY = {**TINY_RUN, "num-server-rounds": 1, "min-train-nodes": 2}
DEADLINE_S = 45.0  # the three honest-enough clients share one actor: ~15 s here, ~30 s beside a second test worker


def _corrupted(reply: Message, msg: Message) -> Message:
    """``reply`` with one byte in the middle of its update payload flipped (the signature left as it was)."""
    sent = TrainReply.from_content(reply.content)
    payload = bytearray(sent.payload)
    payload[len(payload) // 2] ^= 0xFF
    return TrainReply(sent.kind, bytes(payload), sent.signature).reply_to(msg)


def _silent_past_the_deadline(out: Path, longest_s: float = 90.0) -> None:
    """Answer nothing until the round is over (its checkpoint is written), at most ``longest_s``.

    The simulation waits for this client before it shuts down, so sleeping a fixed 90 s would add the
    rest of the 90 s to the run; the reply still comes after the round's deadline closed the round.
    """
    end = time.monotonic() + longest_s
    while time.monotonic() < end and not (out / "checkpoint" / "state.json").exists():
        time.sleep(0.2)


def _faulty_clients(overrides: dict, out: Path) -> ClientApp:
    """The fedfuse ClientApp, except that partition 0 raises, 1 answers past the deadline and 2 corrupts its update."""
    honest = make_client_app(overrides)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        if partition == 0:
            raise ValueError("the local disk is on fire")
        if partition == 1:
            _silent_past_the_deadline(out)
        reply = honest(msg, context)
        return _corrupted(reply, msg) if partition == 2 else reply

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return honest(msg, context)

    return app


@pytest.mark.e2e
def test_a_client_that_raises_one_past_the_deadline_and_one_corrupt_update_are_dropped_and_the_round_completes(
    tmp_path,
) -> None:
    """One federation of five, three of them faulty: each is recorded in one short line with its own reason."""
    overrides = {**TINY, "output-dir": str(tmp_path), "timeout": DEADLINE_S}
    started = time.perf_counter()
    history = simulate(overrides, num_clients=5, client_app=_faulty_clients(overrides, tmp_path))
    (record,) = history["rounds"]
    assert record["accepted"] == 2 and record["rejected"] == 3
    corrupt = set(record["rejections"]) - {"client_error", "timed_out"}
    assert record["rejections"] == {"client_error": 1, "timed_out": 1, **dict.fromkeys(corrupt, 1)}
    assert len(corrupt) == 1 and corrupt <= set(REASONS), record["rejections"]
    messages = record["rejection_messages"]
    assert len(messages) == 3 and all(messages)
    assert [m for m in messages if "the local disk is on fire" in m and "Traceback" not in m and "\x1b" not in m]
    assert all(len(m) < 400 for m in messages)
    assert [m for m in messages if f"deadline of {DEADLINE_S:g} s" in m]
    assert load_checkpoint(tmp_path).round == 1
    assert "reject" in (tmp_path / "report.md").read_text().lower()
    assert time.perf_counter() - started < 150, "a hang guard: the late client was not let go"


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
