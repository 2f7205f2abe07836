"""One round policy for every server path: what fedfuse's run enforces, ``FedMerge`` enforces too.

``RunSettings.round_policy`` and ``FedMerge``'s arguments describe the same :class:`RoundPolicy`; the round
engine, the server optimizer and central DP come from it on every path (fedfuse's ServerApp strategy,
``FedMerge`` in a Flower app, the tier gateway, ``fedfuse bench robust``). Replies here are Flower
messages built by hand, as in ``tests/test_flower_interop.py``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from seeded_grid import LoopbackGrid

from fedfuse.algebra.server_optim import ServerOptimizerRule
from fedfuse.flower import FedMerge, task_vector_mod
from fedfuse.rounds import CentralDP, ModelChange, RoundPolicy, ServerOptimizer, UpdateSpace
from fedfuse.server.strategy import FedFuseStrategy
from fedfuse.settings import RunSettings
from fedfuse.strategies import get_strategy

# Tiers are marked per test here: this module mixes integration and unit tests.

SHAPES = {"w": (4, 3), "b": (3,)}


ONE_NODE = {"min_available_nodes": 1, "min_train_nodes": 1}
"""Flower's FedAvg waits for two connected nodes by default; some rounds here have one."""


def _weights(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def _round(strategy: FedMerge, round_weights: dict[str, torch.Tensor], tuned: dict[int, tuple[dict, int]]):
    """One round of standard replies (trained weights, num-examples) through ``strategy``."""
    messages = strategy.configure_train(1, ArrayRecord(round_weights), ConfigRecord(), LoopbackGrid(list(tuned)))
    by_node = {message.metadata.dst_node_id: message for message in messages}
    replies = [
        Message(
            RecordDict({"arrays": ArrayRecord(weights), "metrics": MetricRecord({"num-examples": examples})}),
            reply_to=by_node[node],
        )
        for node, (weights, examples) in tuned.items()
    ]
    return strategy.aggregate_train(1, iter(replies))


@pytest.mark.unit
def test_a_runs_settings_and_fedmerges_arguments_describe_the_same_policy() -> None:
    settings = RunSettings.from_run_config(
        {"clip-norm": 2.0, "max-num-examples": 500, "max-update-bytes": 10_000, "server-optimizer": "fedavgm"}
    )
    strategy = FedMerge(
        "fedavg",
        sparsifier="none",
        clip_norm=2.0,
        max_num_examples=500,
        max_update_bytes=10_000,
        server_optimizer="fedavgm",
    )
    assert strategy.policy == settings.round_policy
    assert settings.round_policy.server_optimizer == ServerOptimizerRule("fedavgm", 1.0, momentum=0.9)


@pytest.mark.integration
def test_fedmerge_clips_every_update_and_caps_claimed_examples_as_a_fedfuse_run_does(server_identity) -> None:
    round_weights = _weights(0)
    strategy = FedMerge("fedavg", clip_norm=1.0, max_num_examples=100)
    tuned = {1: (_weights(1, scale=10.0), 50), 2: (_weights(2, scale=10.0), 10_000)}
    arrays, metrics = _round(strategy, round_weights, tuned)
    assert metrics["clipped"] == 2 and metrics["capped"] == 1 and metrics["accepted"] == 2
    merged = arrays.to_torch_state_dict()
    expected = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    for weights, examples in tuned.values():
        tau = {name: weights[name] - round_weights[name] for name in SHAPES}
        norm = torch.sqrt(sum((t.double() ** 2).sum() for t in tau.values())).item()
        for name in SHAPES:
            expected[name] += min(examples, 100) * tau[name] / norm
    for name in SHAPES:
        torch.testing.assert_close(merged[name], round_weights[name] + expected[name] / 150, rtol=1e-5, atol=1e-6)


@pytest.mark.integration
def test_fedmerge_refuses_a_payload_over_its_size_cap_before_parsing_it(server_identity) -> None:
    round_weights = _weights(0)
    strategy = FedMerge("fedavg", max_update_bytes=64, **ONE_NODE)
    (message,) = strategy.configure_train(1, ArrayRecord(round_weights), ConfigRecord(), LoopbackGrid([3]))
    context = Context(run_id=1, node_id=3, node_config={}, state=RecordDict(), run_config={})

    def train(msg: Message, ctx: Context) -> Message:
        content = RecordDict({"arrays": ArrayRecord(_weights(5)), "metrics": MetricRecord({"num-examples": 4})})
        return Message(content, reply_to=msg)

    reply = task_vector_mod(sparsifier="none", wire_dtype="float32")(message, context, train)
    arrays, _ = strategy.aggregate_train(1, iter([reply]))
    assert arrays is None and [r.reason for r in strategy.last_rejections] == ["too_large"]


@pytest.mark.integration
def test_fedmerge_checks_the_declared_sparsifier_of_fedfuse_payloads_when_it_is_given_one(server_identity) -> None:
    round_weights = _weights(0)
    results = {}
    for declared in ("none", "trim"):
        strategy = FedMerge("fedavg", sparsifier=declared, density=0.5, **ONE_NODE)
        (message,) = strategy.configure_train(1, ArrayRecord(round_weights), ConfigRecord(), LoopbackGrid([3]))
        context = Context(run_id=1, node_id=3, node_config={}, state=RecordDict(), run_config={})

        def train(msg: Message, ctx: Context) -> Message:
            content = RecordDict({"arrays": ArrayRecord(_weights(5)), "metrics": MetricRecord({"num-examples": 4})})
            return Message(content, reply_to=msg)

        reply = task_vector_mod(sparsifier="trim", density=0.5, wire_dtype="float32")(message, context, train)
        strategy.aggregate_train(1, iter([reply]))
        results[declared] = [r.reason for r in strategy.last_rejections]
    assert results == {"none": ["sparsifier_mismatch"], "trim": []}


@pytest.mark.integration
def test_fedmerge_steps_a_server_optimizer_on_the_merge_across_rounds(server_identity) -> None:
    round_weights = _weights(0)
    strategy = FedMerge("fedavg", server_optimizer="fedavgm", server_lr=1.0, server_momentum=0.5, **ONE_NODE)
    plain = ServerOptimizer(ServerOptimizerRule("fedavgm", 1.0, momentum=0.5))
    weights = round_weights
    for server_round in (1, 2):
        tuned = {1: ({n: t + 0.1 * server_round for n, t in weights.items()}, 10)}
        arrays, _ = _round(strategy, weights, tuned)
        change = plain.step({n: torch.full(s, 0.1 * server_round) for n, s in SHAPES.items()})
        got = arrays.to_torch_state_dict()
        for name in SHAPES:
            torch.testing.assert_close(got[name], weights[name] + change[name], rtol=1e-5, atol=1e-6)
        weights = dict(got)
    assert strategy.optimizer.steps == 2


@pytest.mark.integration
def test_fedmerge_central_dp_noises_the_merge_as_the_round_engine_does(server_identity) -> None:
    round_weights = _weights(0)
    tuned = {1: (_weights(1), 10), 2: (_weights(2), 10)}
    dp = {"dp": "central", "dp_clip_norm": 0.5, "dp_noise_multiplier": 1.0, "dp_noise_seed": 3}
    noisy, _ = _round(FedMerge("fedavg", weighting="uniform", **dp), round_weights, tuned)
    again, _ = _round(FedMerge("fedavg", weighting="uniform", **dp), round_weights, tuned)
    clipped, metrics = _round(FedMerge("fedavg", weighting="uniform", clip_norm=0.5), round_weights, tuned)
    assert metrics["clipped"] == 2
    a, b, c = (record.to_torch_state_dict() for record in (noisy, again, clipped))
    for name in SHAPES:
        assert torch.equal(a[name], b[name]), "the noise is seeded by dp_noise_seed"
        assert not torch.allclose(a[name], c[name]), "central DP adds noise to the clipped mean"
    with pytest.raises(ValueError, match="weighting 'uniform'"):
        FedMerge("fedavg", **dp)


@pytest.mark.unit
def test_fedfuses_own_strategy_and_fedmerge_build_their_engines_from_the_runs_policy() -> None:
    settings = RunSettings.from_run_config(mode="full", strategy="fedavg", clip_norm=3.0, server_optimizer="fedadam")
    strategy = FedFuseStrategy(settings, settings.update_space(SHAPES, 1.0), "run", ModelChange("v:0"))
    assert isinstance(strategy, FedMerge)
    assert strategy.policy == settings.round_policy
    assert strategy.optimizer.rule == settings.merge.server_rule
    engine = settings.round_engine(UpdateSpace.full(SHAPES), round_number=1, run_id="run", base_fingerprint="f")
    assert engine.bounds.clip_norm == 3.0 and engine.bind_senders


@pytest.mark.unit
def test_a_round_policy_refuses_bad_values_in_one_line() -> None:
    with pytest.raises(ValueError, match="weighting must be one of"):
        RoundPolicy(weighting="examples")
    with pytest.raises(ValueError, match="clip_norm must be >= 0"):
        RoundPolicy(clip_norm=-1.0)
    with pytest.raises(ValueError, match="pass clip_norm, server_optimizer inside policy=, not next to it"):
        FedMerge("fedavg", policy=RoundPolicy(), clip_norm=1.0, server_optimizer="fedavgm")
    with pytest.raises(ValueError, match="central DP clips at its clip norm"):
        RoundPolicy(weighting="uniform", clip_norm=1.0, central_dp=CentralDP(2.0, 1.0))
    policy = RoundPolicy(weighting="uniform", clip_norm=2.0, central_dp=CentralDP(2.0, 1.0))
    gateway = policy.engine(get_strategy("fedavg"), UpdateSpace.full(SHAPES), gateway=True)
    server = policy.engine(get_strategy("fedavg"), UpdateSpace.full(SHAPES))
    assert gateway.privacy is None and server.privacy is not None, "a gateway clips; only the server adds noise"
    unbound = dataclasses.replace(policy, bind_senders=False)
    assert not unbound.engine(get_strategy("fedavg"), UpdateSpace.full(SHAPES)).bind_senders


@pytest.mark.unit
def test_the_benchmarks_rounds_step_the_runs_server_optimizer(monkeypatch) -> None:
    """``fedfuse bench robust`` merges through the run's policy: its server optimizer steps every round."""
    from tiny_runs import TINY_RUN

    from fedfuse.bench.rounds import run_rounds

    steps: list[str | None] = []
    original = ServerOptimizer.apply

    def spy(self: ServerOptimizer, engine, round_weights):
        steps.append(None if self.rule is None else self.rule.name)
        return original(self, engine, round_weights)

    monkeypatch.setattr(ServerOptimizer, "apply", spy)
    settings = RunSettings.from_run_config(
        {**TINY_RUN, "mode": "full", "num-server-rounds": 2, "server-optimizer": "fedavgm"}
    )
    result = run_rounds(settings, clients=2)
    assert steps == ["fedavgm", "fedavgm"] and [m["accepted"] for m in result.metrics] == [2, 2]


@pytest.mark.unit
def test_fedmerge_takes_its_sparsifiers_declared_parameters_by_name() -> None:
    strategy = FedMerge("ties", sparsifier="breadcrumbs", density=0.5, sparsifier_params={"gamma": 0.2})
    assert strategy.sparsifier.kind == "breadcrumbs" and strategy.sparsifier.params["gamma"] == 0.2
    with pytest.raises(ValueError, match="has no parameter 'floor'"):
        FedMerge("ties", sparsifier="trim", sparsifier_params={"floor": 0.1})
