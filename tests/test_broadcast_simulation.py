"""Model versions through real simulated federations: factor broadcasts, nodes that miss rounds or lose their state."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable
from own_data_helpers import chat_rows, tiny_chat_llama, write_jsonl
from tiny_runs import TINY_RUN

from fedfuse.client.app import make_client_app
from fedfuse.client.residuals import STATE_DIR_ENV
from fedfuse.messages import RoundInstruction
from fedfuse.server.run_checkpoint import load_checkpoint
from fedfuse.simulation import simulate

pytestmark = pytest.mark.e2e


def _chat_run(tmp_path: Path, name: str, **overrides: object) -> dict[str, object]:
    model = tmp_path / "tiny-chat-llama"
    if not model.is_dir():
        tiny_chat_llama(model)
        write_jsonl(tmp_path / "chat.jsonl", chat_rows(48, institutions=3))
    return {
        **TINY_RUN,
        "model": str(model),
        "task": "sft",
        "data": str(tmp_path / "chat.jsonl"),
        "partition": "iid",
        "max-length": 24,
        "learning-rate": 0.02,
        "output-dir": str(tmp_path / name),
        **overrides,
    }


def test_the_factor_broadcast_is_exact_and_smaller_and_nodes_that_missed_rounds_catch_up(tmp_path):
    """3 institutions, 2 sampled a round: the one left out is sent the deltas it missed next time."""
    runs = {}
    for broadcast in ("dense", "factors"):
        rounds = {"num-server-rounds": 3, "fraction-train": 0.6}
        runs[broadcast] = simulate(_chat_run(tmp_path, broadcast, broadcast=broadcast, **rounds), num_clients=3)
    for history in runs.values():
        assert [r["accepted"] for r in history["rounds"]] == [2, 2, 2]
        assert all(not r["rejections"] for r in history["rounds"]), [r["rejections"] for r in history["rounds"]]
    dense, factors = (load_checkpoint(tmp_path / name).weights for name in ("dense", "factors"))
    assert set(dense) == set(factors) and any(name.endswith("q_proj.weight") for name in factors)
    for name, tensor in dense.items():  # the same merges sent two ways land on the same bits, round after round
        assert torch.equal(factors[name], tensor), name
    sent = {name: [r["broadcast"] for r in history["rounds"]] for name, history in runs.items()}
    assert all(b["mode"] == "factors" and b["factored"] > 0 for b in sent["factors"])
    assert all(f["delta_bytes"] < d["delta_bytes"] for f, d in zip(sent["factors"], sent["dense"], strict=True))
    assert runs["factors"]["rounds"][2]["downlink_bytes"] < runs["dense"]["rounds"][2]["downlink_bytes"]


def _forget_model_before_round_2(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Partition 1 loses the model change it keeps on disk before round 2 (a node moved to a new machine)."""
    node = int(context.node_config["partition-id"])
    if msg.metadata.message_type == "train" and node == 1 and RoundInstruction.from_message(msg).server_round == 2:
        for folder in Path(os.environ[STATE_DIR_ENV]).glob("*/partition-1/model"):
            shutil.rmtree(folder)
    return call_next(msg, context)


def test_a_node_that_lost_its_model_is_refused_once_and_re_synced(tmp_path):
    overrides = _chat_run(tmp_path, "run", **{"num-server-rounds": 3})
    app = make_client_app(overrides, simulated=[_forget_model_before_round_2])
    history = simulate(overrides, num_clients=2, client_app=app)
    rounds = history["rounds"]
    assert rounds[0]["accepted"] == 2 and not rounds[0]["rejections"]
    assert rounds[1]["rejections"] == {"version_mismatch": 1}, rounds[1]["rejection_messages"]
    assert "version_mismatch: this node holds" in rounds[1]["rejection_messages"][0]
    assert rounds[2]["accepted"] == 2 and not rounds[2]["rejections"], "re-synced with the whole change"
    change_bytes = sum(t.numel() * 4 for t in load_checkpoint(tmp_path / "run").weights.values())
    assert rounds[2]["broadcast"]["bytes_per_node"] >= change_bytes * 0.9  # the whole change (at round 2)
