"""End to end through Flower's simulation engine: real ClientApps train MiniLM, the ServerApp merges.

Tiny settings (2 local steps, 16 tokens, rank-2 LoRA) keep each run to a few seconds of training.
"""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedfuse.client.app import make_client_app
from fedfuse.data import LABEL_NAMES
from fedfuse.messages import UPDATE_RECORD, payload_of, payload_record
from fedfuse.server.checkpoint import load_checkpoint
from fedfuse.settings import RunSettings
from fedfuse.simulation import simulate
from fedfuse.training.models import base_model, global_state
from fedfuse.wire import REASONS

pytestmark = pytest.mark.slow

TINY = {
    "num-server-rounds": 2,
    "local-steps": 2,
    "batch-size": 8,
    "max-length": 16,
    "lora-rank": 2,
    "eval-examples": 64,
    "client-eval-examples": 8,
    "strategy": "ties",
    "sparsifier": "trim",
    "density": 0.3,
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    history = simulate({**TINY, "output-dir": str(out)}, num_clients=3)
    return out, history


def test_two_rounds_of_exact_lora_ties_through_flower(uninterrupted):
    out, history = uninterrupted
    assert [r["round"] for r in history["rounds"]] == [1, 2]
    for record in history["rounds"]:
        assert record["accepted"] == 3 and record["rejected"] == 0
        assert record["uplink_bytes"] > 0 and record["accuracy"] is not None
        assert record["client_accuracy"] is not None
        assert record["accuracy_per_domain"] and set(record["accuracy_per_domain"]) <= set(LABEL_NAMES)
    assert history["initial"]["accuracy"] is not None
    for name in ("report.json", "report.md", "accuracy.png", "uplink.png"):
        assert (out / name).is_file()
    assert json.loads((out / "report.json").read_text())["rounds"][-1]["round"] == 2
    checkpoint = load_checkpoint(out)
    assert checkpoint.round == 2
    base = global_state(base_model(RunSettings.from_run_config(TINY))[0])
    changed = [name for name, t in checkpoint.weights.items() if not torch.equal(t, base[name])]
    assert changed and all("query" in n or "value" in n or n.startswith("classifier.") for n in changed)


def test_resume_after_round_one_reaches_the_same_weights(uninterrupted, tmp_path):
    out, _ = uninterrupted
    stopped = simulate({**TINY, "num-server-rounds": 1, "output-dir": str(tmp_path)}, num_clients=3)
    assert len(stopped["rounds"]) == 1
    resumed = simulate({**TINY, "output-dir": str(tmp_path), "resume": str(tmp_path)}, num_clients=3)
    assert [r["round"] for r in resumed["rounds"]] == [1, 2]
    expected, got = load_checkpoint(out).weights, load_checkpoint(tmp_path).weights
    assert set(expected) == set(got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def _corrupting_client(overrides: dict) -> ClientApp:
    """Partition 0 flips one byte in the middle of its update payload; the others behave."""
    honest = make_client_app(overrides)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = honest(msg, context)
        if int(context.node_config["partition-id"]) != 0:
            return reply
        payload = bytearray(payload_of(reply.content, UPDATE_RECORD))
        payload[len(payload) // 2] ^= 0xFF
        content = RecordDict({**reply.content, UPDATE_RECORD: payload_record(bytes(payload))})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return honest(msg, context)

    return app


def test_an_invalid_update_is_rejected_and_the_round_completes(tmp_path):
    overrides = {**TINY, "num-server-rounds": 1, "output-dir": str(tmp_path), "fraction-evaluate": 0.0}
    history = simulate(overrides, num_clients=3, client_app=_corrupting_client(overrides))
    (record,) = history["rounds"]
    assert record["accepted"] == 2 and record["rejected"] == 1
    (reason,) = record["rejections"]
    assert reason in REASONS
    assert len(record["rejection_messages"]) == 1 and record["rejection_messages"][0]
    assert load_checkpoint(tmp_path).round == 1
    assert "reject" in (tmp_path / "report.md").read_text().lower()


def test_full_fine_tuning_with_fisher_merge_and_error_feedback(tmp_path):
    overrides = {
        **TINY, "num-server-rounds": 1, "mode": "full", "strategy": "fisher", "fisher-batches": 1,
        "sparsifier": "trim", "density": 0.1, "output-dir": str(tmp_path), "fraction-evaluate": 0.0,
    }
    history = simulate(overrides, num_clients=2)
    (record,) = history["rounds"]
    assert record["accepted"] == 2
    dense_bytes = 4 * sum(t.numel() for t in global_state(base_model(RunSettings.from_run_config(overrides))[0]).values())
    assert 0 < record["uplink_bytes"] / 2 < 0.3 * dense_bytes
