"""Tiers: nodes grouped by a ``tier`` (in signed headers) merge exactly like a flat round; gateways send partials."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity
from tiny_runs import TINY_RUN

from fedfuse.client.app import make_client_app
from fedfuse.messages import CONFIG_RECORD, NodeName, TrainReply
from fedfuse.rounds import ModelChange
from fedfuse.server.strategy import FedFuseStrategy
from fedfuse.settings import RunSettings, build_merge_strategy
from fedfuse.simulation import simulate
from fedfuse.wire import UpdateHeader, encode_update

# Tiers are marked per test here: this module mixes e2e and integration and unit tests.

SHAPES = {"w": (6, 5), "b": (5,)}


class NodeList:
    """What ``configure_train`` needs of a Grid: the connected node ids, and their answers to the name query."""

    def __init__(self) -> None:
        self.pending: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return [11, 12, 13, 14]

    def push_messages(self, messages):
        ids = []
        for message in messages:
            ids.append(f"query-{message.metadata.dst_node_id}")
            message.metadata.__dict__["_message_id"] = ids[-1]  # what Flower's in-memory Grid does on push
            self.pending[ids[-1]] = NodeName(f"institution-{message.metadata.dst_node_id}").reply_to(message)
        return ids

    def pull_messages(self, message_ids):
        return [self.pending.pop(i) for i in message_ids if i in self.pending]


def _replies(strategy: FedFuseStrategy, tiers: list[str]) -> list[Message]:
    base = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    messages = list(strategy.configure_train(1, ArrayRecord(base), ConfigRecord(), NodeList()))
    fingerprint = messages[0].content.config_records[CONFIG_RECORD]["base-fingerprint"]
    replies = []
    for k, (tier, message) in enumerate(zip(tiers, messages, strict=True)):
        generator = torch.Generator().manual_seed(k)
        tau = {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
        header = UpdateHeader(
            run_id="run",
            round=1,
            base_fingerprint=fingerprint,
            node_id=str(message.metadata.dst_node_id),
            num_examples=10 + k,
            metrics={"train-loss": 1.0},
            tier=tier,
        )
        replies.append(TrainReply("update", encode_update(tau, header=header)).reply_to(message))
    return replies


@pytest.fixture
def server_identity(monkeypatch):
    """Messages can only be built inside a Flower task; pose as the server of run 1."""
    for field, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, field, value)


@pytest.mark.integration
@pytest.mark.parametrize("name", ["fedavg", "ties", "task_arithmetic"])
def test_tiered_merge_equals_the_flat_merge(name, server_identity):
    settings = RunSettings.from_run_config(strategy=name, mode="full")
    results = {}
    for tiers in (["", "", "", ""], ["region-a", "region-b", "region-a", "region-c"]):
        space = settings.update_space(SHAPES, scale=1.0)
        base = {n: torch.zeros(s) for n, s in SHAPES.items()}
        strategy = FedFuseStrategy(settings, space, "run", ModelChange("v:0"))
        _, metrics = strategy.aggregate_train(1, iter(_replies(strategy, tiers)))
        assert metrics["accepted"] == 4 and metrics["tiers"] == len(set(tiers))
        results[len(set(tiers))] = {n: base[n] + t for n, t in strategy.model.tensors.items()}
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


@pytest.mark.e2e
@pytest.mark.slow
def test_a_gateway_forwards_its_members_partial_state_through_flower(tmp_path):
    overrides = {
        **TINY_RUN,
        "num-server-rounds": 1,
        "strategy": "ties",
        "sparsifier": "trim",
        "density": 0.3,
        "output-dir": str(tmp_path),
    }
    history = simulate(overrides, num_clients=3, client_app=_tiered_client(overrides))
    (record,) = history["rounds"]
    assert record["accepted"] == 3 and record["rejected"] == 0
    assert record["accuracy"] is not None


@pytest.mark.unit
def test_a_gateway_keeps_each_members_error_feedback(tmp_path):
    """Each member of a gateway carries its own trimmed-away residual, as it would as a plain client."""
    from fedfuse.client.error_feedback import ErrorFeedback
    from fedfuse.client.gateway import run_gateway_round
    from fedfuse.client.local_round import Shard
    from fedfuse.wire import decode_partial

    settings = RunSettings.from_run_config(
        mode="full",
        strategy="fedavg",
        sparsifier="trim",
        density=0.05,
        local_steps=1,
        batch_size=4,
        max_length=8,
        eval_examples=8,
        client_eval_examples=4,
    )
    assert settings.uses_error_feedback
    stores = [ErrorFeedback(settings.compression.sparsifier_spec) for _ in range(2)]
    result = run_gateway_round(
        settings,
        {},
        round_number=1,
        run_id="run",
        shard=Shard(0, 2, "gw"),
        members=2,
        tier="region-a",
        error_feedback=stores,
    )
    residual_norms = [sum(float(t.norm()) for t in store.residual.values()) for store in stores]
    assert all(norm > 0 for norm in residual_norms)
    assert stores[0].residual.keys() == stores[1].residual.keys()
    assert not all(torch.equal(stores[0].residual[k], stores[1].residual[k]) for k in stores[0].residual)
    partial = decode_partial(
        result.payload, strategy=build_merge_strategy(settings), expect=_partial_expectation(settings)
    )
    assert partial.header.tier == "region-a" and partial.state.num_updates == 2


def _partial_expectation(settings):
    from fedfuse.training.run_model import lora_scale, update_shapes
    from fedfuse.wire import Expectation

    return Expectation(settings.update_space(update_shapes(settings), lora_scale(settings)).merge_shapes)
