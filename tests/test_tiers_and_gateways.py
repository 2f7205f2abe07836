"""Tiers: nodes grouped by a ``tier`` key are merged per tier and combined, exactly; gateways send partial states."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from fedfuse.client.app import make_client_app
from fedfuse.messages import CONFIG_RECORD, METRICS_RECORD, UPDATE_RECORD, payload_record
from fedfuse.server.strategy import FedFuseStrategy
from fedfuse.server.update_space import UpdateSpace
from fedfuse.settings import RunSettings
from fedfuse.simulation import simulate
from fedfuse.wire import UpdateHeader, encode_update

SHAPES = {"w": (6, 5), "b": (5,)}


class NodeList:
    """The one Grid method ``configure_train`` needs: the connected node ids."""

    def get_node_ids(self) -> list[int]:
        return [11, 12, 13, 14]


def _replies(strategy: FedFuseStrategy, tiers: list[str]) -> list[Message]:
    base = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    messages = list(strategy.configure_train(1, ArrayRecord(base), ConfigRecord(), NodeList()))
    fingerprint = messages[0].content.config_records[CONFIG_RECORD]["base-fingerprint"]
    replies = []
    for k, tier in enumerate(tiers):
        generator = torch.Generator().manual_seed(k)
        tau = {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
        header = UpdateHeader(run_id="run", round=1, base_fingerprint=fingerprint, node_id=f"n{k}", num_examples=10 + k)
        content = RecordDict({
            UPDATE_RECORD: payload_record(encode_update(tau, header=header)),
            CONFIG_RECORD: ConfigRecord({"tier": tier}),
            METRICS_RECORD: MetricRecord({"num-examples": 10 + k, "train-loss": 1.0}),
        })
        replies.append(Message(content=content, dst_node_id=0, message_type="train"))
    return replies


@pytest.fixture
def server_identity(monkeypatch):
    """Messages can only be built inside a Flower task; pose as the server of run 1."""
    for field, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, field, value)


@pytest.mark.parametrize("name", ["fedavg", "ties", "task_arithmetic"])
def test_tiered_merge_equals_the_flat_merge(name, server_identity):
    settings = RunSettings(strategy=name, mode="full")
    results = {}
    for tiers in (["", "", "", ""], ["region-a", "region-b", "region-a", "region-c"]):
        space = UpdateSpace(settings, SHAPES, scale=1.0)
        base = {n: torch.zeros(s) for n, s in SHAPES.items()}
        strategy = FedFuseStrategy(settings, space, "run", base)
        arrays, metrics = strategy.aggregate_train(1, iter(_replies(strategy, tiers)))
        assert metrics["accepted"] == 4 and metrics["tiers"] == len(set(tiers))
        results[len(set(tiers))] = arrays.to_torch_state_dict()
    flat, tiered = results[1], results[3]
    for key in SHAPES:
        torch.testing.assert_close(tiered[key], flat[key], rtol=1e-6, atol=1e-5)  # fp32 sums in another order


def _tiered_client(overrides: dict) -> ClientApp:
    """Partition 0 is a gateway with two members in tier region-a; the others are plain nodes in region-b."""
    inner = make_client_app(overrides)
    app = ClientApp()

    def with_tier(context: Context) -> Context:
        gateway = int(context.node_config["partition-id"]) == 0
        context.node_config["tier"] = "region-a" if gateway else "region-b"
        if gateway:
            context.node_config["gateway-members"] = 2
        return context

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return inner(msg, with_tier(context))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return inner(msg, with_tier(context))

    return app


@pytest.mark.slow
def test_a_gateway_forwards_its_members_partial_state_through_flower(tmp_path):
    overrides = {
        "num-server-rounds": 1, "local-steps": 2, "batch-size": 8, "max-length": 16, "lora-rank": 2,
        "eval-examples": 32, "client-eval-examples": 8, "strategy": "ties", "sparsifier": "trim", "density": 0.3,
        "fraction-evaluate": 0.0, "output-dir": str(tmp_path),
    }
    history = simulate(overrides, num_clients=3, client_app=_tiered_client(overrides))
    (record,) = history["rounds"]
    assert record["accepted"] == 3 and record["rejected"] == 0
    assert record["accuracy"] is not None
