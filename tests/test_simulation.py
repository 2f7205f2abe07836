"""End to end through Flower's simulation engine: real ClientApps train MiniLM, the ServerApp merges.

Tiny settings (2 local steps, 16 tokens, rank-2 LoRA) keep each run to a few seconds of training.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from federation import kill_tree
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from tiny_runs import TINY_RUN

from fedfuse.algebra import to_dense
from fedfuse.client.app import make_client_app
from fedfuse.client.residuals import STATE_DIR_ENV
from fedfuse.data import LABEL_NAMES
from fedfuse.messages import RESIDUAL_RECORD, TrainReply
from fedfuse.server.run_checkpoint import load_checkpoint
from fedfuse.settings import RunSettings
from fedfuse.simulation import simulate
from fedfuse.training.run_model import base_model, global_state
from fedfuse.wire import Expectation, decode_update

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TINY = {
    **{key: value for key, value in TINY_RUN.items() if key != "fraction-evaluate"},
    "num-server-rounds": 3,
    "eval-examples": 64,
    "strategy": "ties",
    "sparsifier": "trim",
    "density": 0.3,
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    history = simulate({**TINY, "output-dir": str(out)}, num_clients=3)
    return out, history


def test_three_rounds_of_exact_lora_ties_through_flower(uninterrupted):
    out, history = uninterrupted
    assert [r["round"] for r in history["rounds"]] == [1, 2, 3]
    for record in history["rounds"]:
        assert record["accepted"] == 3 and record["rejected"] == 0
        assert record["uplink_bytes"] > 0 and record["accuracy"] is not None
        assert record["client_accuracy"] is not None
        assert record["accuracy_per_domain"] and set(record["accuracy_per_domain"]) <= set(LABEL_NAMES)
    assert history["initial"]["accuracy"] is not None
    for name in ("report.json", "report.md", "accuracy.png", "uplink.png"):
        assert (out / name).is_file()
    assert json.loads((out / "report.json").read_text())["rounds"][-1]["round"] == 3
    checkpoint = load_checkpoint(out)
    assert checkpoint.round == 3
    base = global_state(base_model(RunSettings.from_run_config(TINY))[0])
    changed = [name for name, t in checkpoint.weights.items() if not torch.equal(t, base[name])]
    assert changed and all("query" in n or "value" in n or n.startswith("classifier.") for n in changed)


def test_every_round_reports_where_its_time_went(uninterrupted):
    _, history = uninterrupted
    for record in history["rounds"]:
        server, client = record["phases"], record["client_phases"]
        assert {"broadcast", "wait", "decode_fold", "finalize", "evaluation", "checkpoint", "report"} <= set(server)
        assert client["replies"] == 3
        assert {"build", "data", "train", "encode", "sign", "total"} <= set(client)
        assert client["total"] >= client["train"] > 0
        assert sum(server.values()) <= record["seconds"] + server["checkpoint"] + server["report"] + 0.05


def _command(out: Path, *extra: str) -> list[str]:
    """``fedfuse simulate`` of the uninterrupted run's settings into ``out``, as its own process."""
    config = " ".join(f"{key}={value}" for key, value in TINY.items())
    return [sys.executable, "-m", "fedfuse.cli.main", "simulate", "--clients", "3", "--output-dir", str(out),
            "--run-config", config, *extra]  # fmt: skip


def _finished_round(out: Path) -> int:
    state = out / "checkpoint" / "state.json"
    try:
        return int(json.loads(state.read_text())["round"])
    except (OSError, ValueError, KeyError):
        return 0


def test_a_server_killed_at_a_random_moment_resumes_to_bit_identical_weights(uninterrupted, tmp_path):
    """``fedfuse simulate`` SIGKILLed with its Ray cluster somewhere in round 2 (or its checkpoint write), resumed.

    Nodes are sampled and folded in the order of their names, so the resumed run sums exactly as the
    uninterrupted one did; error feedback is on (trim), so the nodes' residuals must survive the kill too.
    """
    out, _ = uninterrupted
    environment = {key: value for key, value in os.environ.items() if key != STATE_DIR_ENV}
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        _command(killed), env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while _finished_round(killed) < 1 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        time.sleep(random.Random(os.getpid()).uniform(0.0, 1.0))  # a round takes over 1 s here: within round 2
    finally:
        kill_tree(process)
    reached = _finished_round(killed)
    assert 1 <= reached < 3, f"the kill came too late to test anything (round {reached} finished)"
    resumed = subprocess.run(
        _command(killed, "--resume", str(killed)), env=environment, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    expected, got = load_checkpoint(out), load_checkpoint(killed)
    assert got.round == expected.round == 3
    assert set(expected.weights) == set(got.weights)
    assert [name for name in expected.weights if not torch.equal(expected.weights[name], got.weights[name])] == []
    leftovers = [p.name for p in (killed / "checkpoint").iterdir() if ".fedfuse-" in p.name]
    assert leftovers == []
    assert (killed / "node-state").is_dir(), "the nodes kept their error-feedback residuals under the run folder"


def _recording_client(overrides: dict, out: Path) -> ClientApp:
    """The fedfuse ClientApp, plus a record per node and round of what error feedback did.

    Each record holds the ``fedfuse.residual`` state before and after the round and the payload
    sent. From round 2 on it also holds the payload and residual of the same round replayed with
    no stored residual (training is seeded by run, round and node): their sum is that round's true
    task vector τ.
    """
    honest = make_client_app(overrides)
    app = ClientApp()

    def residual(context: Context) -> dict[str, torch.Tensor]:
        stored = context.state.array_records.get(RESIDUAL_RECORD)
        return {} if stored is None else dict(stored.to_torch_state_dict())

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        partition = context.node_config["partition-id"]
        round_number = 1 + len(list(out.glob(f"partition-{partition}-round-*.pt")))
        record = {"before": residual(context)}
        replay = None
        if record["before"]:
            replay = copy.deepcopy(context)
            del replay.state.array_records[RESIDUAL_RECORD]
            replay.node_config["state-dir"] = replay_dir = str(out / f"no-residuals-{partition}-{round_number}")
            for model in Path(os.environ[STATE_DIR_ENV]).glob(f"*/partition-{partition}/model"):  # same model,
                shutil.copytree(model, Path(replay_dir) / model.relative_to(os.environ[STATE_DIR_ENV]))  # no residual
        reply = honest(msg, context)
        record |= {"after": residual(context), "sent": TrainReply.from_content(reply.content).payload}
        if replay is not None:
            replayed = honest(msg, replay)
            replay_sent = TrainReply.from_content(replayed.content).payload
            record |= {"replay_after": residual(replay), "replay_sent": replay_sent}
        torch.save(record, out / f"partition-{partition}-round-{round_number}.pt")
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return honest(msg, context)

    return app


def _sent(payload: bytes, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    update = decode_update(payload, expect=Expectation(shapes))
    return {name: to_dense(tensor).float() for name, tensor in update.tensors.items()}


def test_full_fine_tuning_with_fisher_merge_and_error_feedback(tmp_path):
    overrides = {
        **TINY,
        "num-server-rounds": 2,
        "mode": "full",
        "strategy": "fisher",
        "fisher-batches": 1,
        "sparsifier": "trim",
        "density": 0.1,
        "output-dir": str(tmp_path / "run"),
        "fraction-evaluate": 0.0,
    }
    records = tmp_path / "records"
    records.mkdir()
    history = simulate(overrides, num_clients=2, client_app=_recording_client(overrides, records))
    assert [record["round"] for record in history["rounds"]] == [1, 2]
    base = global_state(base_model(RunSettings.from_run_config(overrides))[0])
    dense_bytes = 4 * sum(t.numel() for t in base.values())
    for record in history["rounds"]:
        assert record["accepted"] == 2
        assert 0 < record["uplink_bytes"] / 2 < 0.3 * dense_bytes
    for partition in (0, 1):
        first = torch.load(records / f"partition-{partition}-round-1.pt")
        second = torch.load(records / f"partition-{partition}-round-2.pt")
        assert first["before"] == {} and first["after"], "round 1 starts without a residual and stores one"
        r1 = first["after"]
        assert second["before"].keys() == r1.keys()
        for name in r1:
            torch.testing.assert_close(second["before"][name], r1[name], rtol=0, atol=0)
        shapes = {name: tuple(t.shape) for name, t in r1.items()}
        sent, replay_sent = _sent(second["sent"], shapes), _sent(second["replay_sent"], shapes)
        r2, replay_r2 = second["after"], second["replay_after"]
        r1_norm = sum(float(t.norm()) ** 2 for t in r1.values()) ** 0.5
        assert r1_norm > 1e-3, "round 1 dropped nothing, so there is no feedback to prove"
        for name in r1:
            tau = replay_sent[name] + replay_r2[name]
            # What was sent plus what is still owed is τ₂ + r₁: the round-1 residual entered round 2.
            torch.testing.assert_close(sent[name] + r2[name], tau + r1[name], rtol=1e-5, atol=1e-6, msg=name)
        moved = sum(float((sent[name] - replay_sent[name]).norm()) ** 2 for name in r1) ** 0.5
        assert moved > 1e-3, "the residual did not change what round 2 sent"
