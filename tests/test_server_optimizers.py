"""Server optimizers (FedAvgM, FedAdam, FedYogi) on the merged task vector, as in Reddi et al. 2021.

Differential against Flower's own strategies on the same arrays, the identities (``none`` and FedAvgM
with β₁ = 0, η = 1 are plain merging), exact resume of the optimizer state, the settings' one-line
refusals, and two rounds plus a resume through the real ServerApp path (``run_server`` over an
in-process Grid whose nodes send seeded updates instead of training).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedYogi
from hypothesis import given, settings
from hypothesis import strategies as st
from seeded_grid import SeededGrid

from fedfuse.algebra.server_optim import ServerOptimizerRule, server_step
from fedfuse.messages import TrainReply
from fedfuse.rounds import ModelChange, RoundEngine, ServerOptimizer, UpdateSpace
from fedfuse.server.app import run_server
from fedfuse.server.run_checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fedfuse.server.strategy import FedFuseStrategy
from fedfuse.settings import RunSettings, SettingsError
from fedfuse.strategies import get_strategy
from fedfuse.training.run_model import lora_scale, update_shapes
from fedfuse.wire import UpdateHeader, encode_update, fingerprint

# Tiers are marked per test here: this module mixes integration and unit tests.

SHAPES = {"layer.weight": (5, 4), "layer.bias": (4,)}


def deltas(seed: int, steps: int, shapes: dict[str, tuple[int, ...]] = SHAPES) -> list[dict[str, torch.Tensor]]:
    """``steps`` seeded pseudo-gradients, fp32."""
    generator = torch.Generator().manual_seed(seed)
    return [{name: torch.randn(shape, generator=generator) for name, shape in shapes.items()} for _ in range(steps)]


def run_steps(optimizer: ServerOptimizer, weights: dict[str, torch.Tensor], pseudo_gradients) -> dict:
    """Weights after applying each pseudo-gradient through ``optimizer`` (x ← x + step)."""
    for delta in pseudo_gradients:
        change = optimizer.step(delta)
        weights = {name: weights[name] + change.get(name, 0.0) for name in weights}
    return weights


# --- (1) differential against Flower's FedAvgM, FedAdam, FedYogi (flwr/serverapp/strategy/*.py) ------------------


def flower_weights(strategy: FedAvg, current: dict[str, np.ndarray], delta: dict[str, np.ndarray], server_round: int):
    """Drive Flower's own aggregate_train with FedAvg's aggregate fixed at current + Δ (what its replies average to)."""
    aggregated = ArrayRecord({name: Array(current[name] + delta[name]) for name in current})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FedAvg, "aggregate_train", lambda self, server_round, replies: (aggregated, None))
        arrays, _ = type(strategy).aggregate_train(strategy, server_round, [])
    assert arrays is not None
    return {name: arrays[name].numpy() for name in current}


@pytest.mark.unit
@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi"])
def test_the_update_rule_matches_flowers_strategy_on_the_same_arrays(name) -> None:
    eta, beta1, beta2, tau = 0.3, 0.8, 0.95, 1e-2
    flower: FedAvg
    if name == "fedavgm":
        flower = FedAvgM(server_learning_rate=eta, server_momentum=beta1)
    elif name == "fedadam":
        flower = FedAdam(eta=eta, beta_1=beta1, beta_2=beta2, tau=tau)
    else:
        flower = FedYogi(eta=eta, beta_1=beta1, beta_2=beta2, tau=tau)
    ours = ServerOptimizer(ServerOptimizerRule(name, eta, momentum=beta1, beta2=beta2, tau=tau))
    x = {n: torch.randn(s, generator=torch.Generator().manual_seed(7)) for n, s in SHAPES.items()}
    theirs = {n: t.numpy().copy() for n, t in x.items()}
    if name == "fedavgm":
        flower.current_arrays = ArrayRecord({n: Array(a) for n, a in theirs.items()})  # what its first configure sets
    for server_round, delta in enumerate(deltas(3, 4), start=1):
        if name != "fedavgm":
            flower.current_arrays = dict(theirs)  # FedOpt.configure_train keeps the broadcast arrays
        # Flower forms Δ as aggregate − current in fp32: give both sides that very Δ
        pseudo = {n: (theirs[n] + delta[n].numpy()) - theirs[n] for n in theirs}
        theirs = flower_weights(flower, theirs, {n: delta[n].numpy() for n in theirs}, server_round)
        if name == "fedadam":  # flwr/serverapp/strategy/fedadam.py: η·√(1 − β₂ᵗ⁺¹)/(1 − β₁ᵗ⁺¹); the paper has none
            ours.rule = ServerOptimizerRule(
                name,
                eta * math.sqrt(1 - beta2 ** (server_round + 1)) / (1 - beta1 ** (server_round + 1)),
                momentum=beta1,
                beta2=beta2,
                tau=tau,
            )
        x = run_steps(ours, x, [{n: torch.from_numpy(p) for n, p in pseudo.items()}])
        for n in SHAPES:
            np.testing.assert_allclose(
                x[n].numpy(), theirs[n], rtol=1e-6, atol=1e-6, err_msg=f"{name} round {server_round}"
            )


@pytest.mark.unit
def test_the_functions_are_the_papers_formulas_on_numbers() -> None:
    rule = ServerOptimizerRule("fedyogi", 0.5, momentum=0.5, beta2=0.75, tau=0.25)
    step, m, v = server_step(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([1.0]), rule)
    # m = 0.5·1 + 0.5·2 = 1.5; v = 1 − 0.25·4·sign(1 − 4) = 2; step = 0.5·1.5/(√2 + 0.25)
    assert m.item() == 1.5 and v.item() == 2.0
    assert step.item() == pytest.approx(0.5 * 1.5 / (math.sqrt(2) + 0.25))
    step, m, v = server_step(
        torch.tensor([2.0]), torch.tensor([1.0]), None, ServerOptimizerRule("fedavgm", 0.5, momentum=0.5)
    )
    assert (m.item(), v, step.item()) == (0.5 + 2.0, None, 0.5 * 2.5)  # m = β₁·m + Δ, step η·m


# --- (2) identities ----------------------------------------------------------------------------------------------


def header(node: int, examples: int) -> UpdateHeader:
    return UpdateHeader(
        "run-a", 1, fingerprint({n: torch.zeros(s) for n, s in SHAPES.items()}), node, num_examples=examples
    )


def round_engine(strategy_name: str, seed: int, count: int) -> RoundEngine:
    base = {n: torch.zeros(s) for n, s in SHAPES.items()}
    engine = RoundEngine(
        get_strategy(strategy_name), UpdateSpace.full(SHAPES), round_number=1, run_id="run-a",
        base_fingerprint=fingerprint(base),
    )  # fmt: skip
    for node, tau in enumerate(deltas(seed, count), start=1):
        assert engine.offer(encode_update(tau, header=header(node, 3 + node))) is None
    return engine


@pytest.mark.unit
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    count=st.integers(1, 4),
    strategy_name=st.sampled_from(["fedavg", "ties", "task_arithmetic"]),
)
def test_none_and_fedavgm_without_momentum_at_lr_one_leave_the_merge_unchanged(seed, count, strategy_name) -> None:
    weights = {n: t * 0.5 for n, t in deltas(seed + 1, 1)[0].items()}
    plain = round_engine(strategy_name, seed, count).finalize(weights)
    identity = ServerOptimizer(ServerOptimizerRule("fedavgm", 1.0, momentum=0.0))
    for optimizer in (ServerOptimizer(None), identity):
        got = optimizer.apply(round_engine(strategy_name, seed, count), weights)
        assert got is not None and plain is not None
        assert all(torch.equal(got[n], plain[n]) for n in SHAPES), optimizer.describe()


@pytest.mark.unit
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), steps=st.integers(1, 5))
def test_fedavgm_without_momentum_at_lr_one_steps_by_the_pseudo_gradient_itself(seed, steps) -> None:
    optimizer = ServerOptimizer(ServerOptimizerRule("fedavgm", 1.0, momentum=0.0))
    for delta in deltas(seed, steps):
        change = optimizer.step(delta)
        assert all(torch.equal(change[n], delta[n]) for n in SHAPES)
    assert optimizer.steps == steps


@pytest.mark.unit
def test_a_round_that_accepted_nothing_takes_no_step() -> None:
    optimizer = ServerOptimizer(ServerOptimizerRule("fedadam", 0.1))
    engine = RoundEngine(get_strategy("fedavg"), UpdateSpace.full(SHAPES))
    assert optimizer.apply(engine, {n: torch.zeros(s) for n, s in SHAPES.items()}) is None
    assert optimizer.steps == 0 and not optimizer.m


# --- (3) exact resume of the optimizer state --------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi"])
def test_state_saved_after_step_two_resumes_steps_three_and_four_bit_for_bit(name, tmp_path) -> None:
    rule = ServerOptimizerRule(name, 0.05)
    gradients = deltas(11, 4)
    start = {n: torch.zeros(s) for n, s in SHAPES.items()}
    uninterrupted = run_steps(ServerOptimizer(rule), start, gradients)
    first = ServerOptimizer(rule)
    after_two = run_steps(first, start, gradients[:2])
    save_checkpoint(tmp_path, 2, after_two, {}, {}, optimizer=first.state_tensors(), optimizer_steps=first.steps)
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.optimizer is not None and checkpoint.optimizer_steps == 2
    resumed = ServerOptimizer(rule)
    resumed.load_state(checkpoint.optimizer, checkpoint.optimizer_steps)
    final = run_steps(resumed, checkpoint.weights, gradients[2:])
    assert all(torch.equal(final[n], uninterrupted[n]) for n in SHAPES)
    assert resumed.steps == 4 and set(resumed.v) == (set(SHAPES) if rule.adaptive else set())


@pytest.mark.unit
def test_only_the_last_optimizer_state_is_kept_and_a_damaged_one_is_refused(tmp_path) -> None:
    weights = {n: torch.zeros(s) for n, s in SHAPES.items()}
    for round_number in (1, 2):
        state = {"layer.bias::m": torch.full((4,), float(round_number))}
        save_checkpoint(tmp_path, round_number, weights, {}, {}, keep=0, optimizer=state, optimizer_steps=round_number)
    folder = tmp_path / "checkpoint"
    assert sorted(p.name for p in folder.glob("optimizer-*")) == ["optimizer-round-0002.safetensors"]
    assert load_checkpoint(tmp_path, round_number=1).optimizer is None, "an earlier round has no optimizer state"
    save_checkpoint(tmp_path / "plain", 1, weights, {}, {})
    assert load_checkpoint(tmp_path / "plain").optimizer is None
    (folder / "optimizer-round-0002.safetensors").write_bytes(b"damaged")
    with pytest.raises(CheckpointError, match="optimizer state"):
        load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="unexpected tensor"):
        ServerOptimizer(ServerOptimizerRule("fedavgm", 1.0)).load_state({"layer.bias::v": torch.zeros(4)}, 1)


@pytest.mark.unit
def test_a_checkpoint_from_before_server_optimizers_resumes_as_none_and_refuses_another(tmp_path) -> None:
    from fedfuse.server.app import resumed_checkpoint

    old = {k: v for k, v in RunSettings().to_run_config().items() if not k.startswith("server-")}
    save_checkpoint(tmp_path, 1, {n: torch.zeros(s) for n, s in SHAPES.items()}, {"rounds": []}, old)
    ours = {"num-server-rounds": 2, "resume": str(tmp_path)}
    assert resumed_checkpoint(RunSettings.from_run_config(ours)).round == 1
    with pytest.raises(CheckpointError, match="server-optimizer 'none' → 'fedyogi'"):
        resumed_checkpoint(RunSettings.from_run_config({**ours, "server-optimizer": "fedyogi"}))


# --- (4) settings ----------------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"server-optimizer": "adam"}, "server-optimizer"),
        ({"server-optimizer": "fedadam", "server-lr": 0}, "server-lr"),
        ({"server-optimizer": "fedadam", "server-lr": -0.1}, "server-lr"),
        ({"server-optimizer": "fedadam", "server-lr": "nan"}, "server-lr"),
        ({"server-optimizer": "fedadam", "server-lr": "fast"}, "server-lr"),
        ({"server-optimizer": "fedavgm", "server-momentum": 1.0}, "server-momentum"),
        ({"server-optimizer": "fedavgm", "server-momentum": -0.5}, "server-momentum"),
        ({"server-optimizer": "fedyogi", "server-beta2": 1.0}, "server-beta2"),
        ({"server-optimizer": "fedyogi", "server-tau": 0.0}, "server-tau"),
        ({"server-optimizer": "fedadam", "server-tau": "inf"}, "server-tau"),
        ({"server-optimizer": "fedavgm", "server-beta2": 0.9}, "server-beta2"),
        ({"server-lr": 0.5}, "server-lr"),
        ({"server-momentum": 0.5}, "server-momentum"),
    ],
)
def test_bad_values_are_refused_in_one_line_naming_the_key(values, key) -> None:
    with pytest.raises(SettingsError) as refused:
        RunSettings.from_run_config(values)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(key), message


@pytest.mark.unit
def test_settings_resolve_the_rule_and_round_trip() -> None:
    assert RunSettings().merge.server_rule is None
    lrs = {
        name: RunSettings.from_run_config({"server-optimizer": name}).merge.server_rule
        for name in ("fedavgm", "fedadam", "fedyogi")
    }
    assert {name: rule.lr for name, rule in lrs.items() if rule} == {"fedavgm": 1.0, "fedadam": 0.1, "fedyogi": 0.01}
    chosen = RunSettings.from_run_config(
        {"server-optimizer": "fedyogi", "server-lr": "0.02", "server-beta2": 0.9, "server-tau": 1e-4}
    )
    assert chosen.merge.server_rule == ServerOptimizerRule("fedyogi", 0.02, momentum=0.9, beta2=0.9, tau=1e-4)
    assert RunSettings.from_run_config(chosen.to_run_config()) == chosen


# --- (5) through the server: tiers, full mode, and run_server with checkpoint and resume -----------------------------


@pytest.mark.integration
def test_full_mode_rounds_through_the_strategy_step_the_optimizer_and_tiers_stay_exact(server_identity) -> None:
    """The optimizer sits at the top server, after the (flat or tiered) merge: both give the same weights."""
    settings = RunSettings.from_run_config(mode="full", strategy="fedavg", server_optimizer="fedadam")
    base = {n: torch.zeros(s) for n, s in SHAPES.items()}
    results = []
    for tiers in ({}, {11: "region-a", 12: "region-b", 13: "region-a"}):
        strategy = FedFuseStrategy(settings, settings.update_space(SHAPES, scale=1.0), "run", ModelChange("v:0"))
        grid, arrays = SeededGrid(SHAPES, tiers=tiers), ArrayRecord(base)
        expected = ServerOptimizer(settings.merge.server_rule)
        for server_round in (1, 2):
            messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
            replies = grid.pull_messages(grid.push_messages(messages))
            change = expected.step(round_engine_of(strategy, server_round, replies))
            before = {n: strategy.model.tensors.get(n, base[n]).clone() for n in SHAPES}
            new_arrays, metrics = strategy.aggregate_train(server_round, iter(replies))
            assert new_arrays is not None and metrics["accepted"] == 3
            got = strategy.model.tensors  # the run's change to the (zero) base: its weights
            for n in SHAPES:
                torch.testing.assert_close(got[n], before[n] + change[n], rtol=0, atol=1e-7)
        assert strategy.optimizer.steps == 2
        results.append(arrays.to_torch_state_dict())
    for n in SHAPES:
        torch.testing.assert_close(results[1][n], results[0][n], rtol=1e-5, atol=1e-6)  # fp32 sums in another order


def round_engine_of(strategy: FedFuseStrategy, server_round: int, replies: list[Message]) -> dict[str, torch.Tensor]:
    """The round's plain merged task vector, from a second engine fed the same replies."""
    assert strategy._reference is not None
    engine = strategy._round_engine(server_round, strategy._reference)
    for reply in replies:
        parsed = TrainReply.from_message(reply)
        engine.offer(parsed.payload, kind=parsed.kind, sender=str(reply.metadata.src_node_id))
    return engine.merged_task_vector()


E2E = {
    "task": "classify",
    "labels": "cardiac,respiratory,musculoskeletal",
    "lora-rank": 2,
    "max-length": 16,
    "fraction-evaluate": 0.0,
    "strategy": "fedavg",
    "server-optimizer": "fedadam",
    "timeout": 30.0,
}


def serve(out, rounds: int, **extra) -> dict:
    settings = RunSettings.from_run_config({**E2E, "num-server-rounds": rounds, "output-dir": str(out), **extra})
    grid = SeededGrid(settings.update_space(update_shapes(settings), lora_scale(settings)).wire_shapes)
    context = Context(run_id=5, node_id=0, node_config={}, state=RecordDict(), run_config={})
    return run_server(grid, context, settings)  # type: ignore[arg-type]


@pytest.mark.integration
def test_two_fedadam_rounds_in_lora_space_through_run_server_resume_bit_for_bit(server_identity, tmp_path) -> None:
    history = serve(tmp_path / "whole", 2)
    assert [r["accepted"] for r in history["rounds"]] == [3, 3]
    recorded = json.loads((tmp_path / "whole" / "report.json").read_text())["server_optimizer"]
    assert recorded == {"name": "fedadam", "lr": 0.1, "momentum": 0.9, "beta2": 0.99, "tau": 0.001, "steps": 2}
    whole = load_checkpoint(tmp_path / "whole")
    assert whole.optimizer and whole.optimizer_steps == 2 and any(k.endswith(".weight::v") for k in whole.optimizer)
    serve(tmp_path / "split", 1)
    with pytest.raises(CheckpointError, match="server-optimizer 'fedadam' → 'none'"):
        serve(tmp_path / "split", 2, **{"server-optimizer": "none", "resume": str(tmp_path / "split")})
    resumed = serve(tmp_path / "split", 2, resume=str(tmp_path / "split"))
    assert [r["round"] for r in resumed["rounds"]] == [1, 2] and resumed["server_optimizer"]["steps"] == 2
    split = load_checkpoint(tmp_path / "split")
    assert [n for n in whole.weights if not torch.equal(whole.weights[n], split.weights[n])] == []
    assert split.optimizer is not None and set(split.optimizer) == set(whole.optimizer)
    assert all(torch.equal(split.optimizer[k], whole.optimizer[k]) for k in whole.optimizer)
    plain = (
        load_checkpoint(tmp_path / "plain") if serve(tmp_path / "plain", 2, **{"server-optimizer": "none"}) else None
    )
    assert plain is not None and plain.optimizer is None
    assert any(not torch.equal(plain.weights[n], whole.weights[n]) for n in whole.weights), "fedadam changed nothing"
