"""LoRA with a frozen shared A (FFA-LoRA, ``lora-aggregation = "frozen-a"``): A, the merge of B, the rules, a node."""

from __future__ import annotations

import math

import pytest
import torch

from fedfuse.algebra import factor_names, lora_delta, to_dense
from fedfuse.algebra.lora import frozen_lora_a
from fedfuse.algebra.low_rank import LowRank
from fedfuse.client import local_round
from fedfuse.client.local_round import Shard, run_local_round
from fedfuse.rounds import RoundEngine, UpdateSpace
from fedfuse.settings import RunSettings, build_merge_strategy
from fedfuse.settings.fields import SettingsError
from fedfuse.wire import Expectation, UpdateHeader, decode_update, encode_update

pytestmark = pytest.mark.unit

MODULES = {"layer.0.q": (6, 5), "layer.1.v": (4, 7)}
"""Module → (out, in) of the adapted base weight."""
RANK, SCALE, SEED, ROUND = 3, 2.0, 7, 4


def test_frozen_a_is_deterministic_and_peft_distributed_and_differs_per_module_round_and_seed() -> None:
    a = frozen_lora_a(SEED, ROUND, "layer.0.q", (RANK, 400))
    assert a.dtype == torch.float32 and a.shape == (RANK, 400)
    assert torch.equal(a, frozen_lora_a(SEED, ROUND, "layer.0.q", (RANK, 400)))
    for other in (
        frozen_lora_a(SEED, ROUND, "layer.1.q", (RANK, 400)),
        frozen_lora_a(SEED, ROUND + 1, "layer.0.q", (RANK, 400)),
        frozen_lora_a(SEED + 1, ROUND, "layer.0.q", (RANK, 400)),
    ):
        assert not torch.equal(a, other)
    # PEFT's lora_A init: kaiming-uniform with a = √5 has bound gain·√(3 / in) = 1/√in
    bound = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5)) * math.sqrt(3 / 400)
    assert bound == pytest.approx(1 / math.sqrt(400))
    assert float(a.abs().max()) <= bound and float(a.abs().max()) > 0.95 * bound
    assert abs(float(a.mean())) < 0.1 * bound and float(a.std()) == pytest.approx(bound / math.sqrt(3), rel=0.1)
    # a rank-2 node's A is the first rows of the run's rank-3 A (hetero ranks stay exact)
    assert torch.equal(frozen_lora_a(SEED, ROUND, "layer.0.q", (2, 400)), a[:2])
    with pytest.raises(ValueError, match="rank >= 1"):
        frozen_lora_a(SEED, ROUND, "m", (0, 4))


def _space(**extra) -> UpdateSpace:
    wire = {factor_names(m)[1]: (out, RANK) for m, (out, _) in MODULES.items()} | {"classifier.bias": (3,)}
    a_shapes = {factor_names(m)[0]: (RANK, fan_in) for m, (_, fan_in) in MODULES.items()}
    return UpdateSpace("lora-frozen-a", wire, SCALE, seed=SEED, lora_a_shapes=a_shapes, **extra)


def _b_updates(count: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    space = _space()
    return [
        {name: torch.randn(shape, generator=generator) for name, shape in space.wire_shapes.items()}
        for _ in range(count)
    ]


def _merge(space: UpdateSpace, updates: list[dict[str, torch.Tensor]], weights: list[int]) -> RoundEngine:
    engine = RoundEngine(build_merge_strategy(RunSettings()), space, round_number=ROUND, run_id="r")
    for node, (tensors, weight) in enumerate(zip(updates, weights, strict=True)):
        header = UpdateHeader(run_id="r", round=ROUND, base_fingerprint="", node_id=str(node), num_examples=weight)
        assert engine.offer(encode_update(tensors, header=header)) is None
    return engine


def test_a_linear_merge_of_b_is_exactly_the_merged_delta_w_of_every_node() -> None:
    space = _space()
    assert space.merge_shapes == space.wire_shapes and not any(n.endswith(".lora_A") for n in space.wire_shapes)
    updates, weights = _b_updates(3), [3, 5, 8]
    merged = _merge(space, updates, weights).merged_factored()
    assert set(merged) == {m + ".weight" for m in MODULES} | {"classifier.bias"}
    total = float(sum(weights))
    for module, (out, fan_in) in MODULES.items():
        change = merged[module + ".weight"]
        assert isinstance(change, LowRank) and change.rank == RANK and change.shape == (out, fan_in)
        a = frozen_lora_a(SEED, ROUND, module, (RANK, fan_in)).double()
        b_name = factor_names(module)[1]  # every node's own ΔWₖ = s·Bₖ·A, averaged in float64
        expected = sum(w / total * SCALE * u[b_name].double() @ a for u, w in zip(updates, weights, strict=True))
        torch.testing.assert_close(change.dense(torch.float64), expected, rtol=1e-6, atol=1e-7)
    bias = sum(w / total * u["classifier.bias"] for u, w in zip(updates, weights, strict=True))
    torch.testing.assert_close(merged["classifier.bias"], bias)


def test_frozen_a_merge_equals_the_exact_lora_merge_when_every_node_sends_the_shared_a() -> None:
    frozen, updates = _space(), _b_updates(2)
    a_of = {m: frozen.frozen_a(m, ROUND) for m in MODULES}
    with_a = [{**u, **{factor_names(m)[0]: a for m, a in a_of.items()}} for u in updates]
    exact = UpdateSpace("lora-exact", {n: tuple(t.shape) for n, t in with_a[0].items()}, SCALE)
    dense = _merge(frozen, updates, [1, 2]).merged_task_vector()
    reference = _merge(exact, with_a, [1, 2]).merged_task_vector()
    assert set(dense) == set(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(dense[name], tensor, rtol=1e-5, atol=1e-6)


def test_the_frozen_a_space_refuses_a_sent_a_a_missing_shape_a_sparsifier_and_no_round() -> None:
    space = _space()
    with pytest.raises(ValueError, match="needs the round number"):
        space.task_vector({n: torch.zeros(s) for n, s in space.wire_shapes.items()})
    with pytest.raises(ValueError, match="do not send A"):
        UpdateSpace(
            "lora-frozen-a", {**space.wire_shapes, "layer.0.q.lora_A": (RANK, 5)}, lora_a_shapes=space.lora_a_shapes
        )
    with pytest.raises(ValueError, match=r"needs the shape \(r, in\)"):
        UpdateSpace("lora-frozen-a", space.wire_shapes, lora_a_shapes={"layer.0.q.lora_A": (RANK, 5)})
    from fedfuse.algebra import Sparsifier

    with pytest.raises(ValueError, match="sparsifier must be none"):
        _space(sparsifier=Sparsifier("trim", 0.5))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"strategy": "ties"}, "TIES's votes on ΔW = s·B·A are not linear in B"),
        ({"strategy": "regmean"}, "needs a linear strategy"),
        ({"strategy": "median"}, "needs a linear strategy"),
        ({"mode": "full"}, "needs mode lora"),
        ({"sparsifier": "dare", "seed-scope": "round"}, "needs sparsifier none"),
    ],
)
def test_settings_refuse_frozen_a_where_a_merge_of_b_is_not_the_merge_of_delta_w(overrides, match) -> None:
    with pytest.raises(SettingsError, match=match):
        RunSettings.from_run_config({"lora-aggregation": "frozen-a", **overrides})


def test_frozen_a_with_a_linear_strategy_is_a_low_rank_merge_that_may_broadcast_factors() -> None:
    for strategy in ("fedavg", "task_arithmetic", "linear"):
        settings = RunSettings.from_run_config({"lora-aggregation": "frozen-a", "strategy": strategy})
        assert settings.merges_low_rank
    RunSettings.from_run_config({"lora-aggregation": "frozen-a", "broadcast": "factors"})


def test_a_frozen_a_node_trains_and_sends_only_b_and_its_a_is_the_shared_one(monkeypatch) -> None:
    from fedfuse.training.run_model import lora_layers, lora_scale, update_shapes

    settings = RunSettings.from_run_config(
        {"local-steps": 1, "batch-size": 4, "max-length": 16, "lora-rank": 4, "client-eval-examples": 4},
        lora_aggregation="frozen-a",
    )
    space = settings.update_space(update_shapes(settings), lora_scale(settings))
    assert space.kind == "lora-frozen-a" and space.frozen_a_modules
    assert all(n.endswith(".lora_B") or n.startswith("classifier.") for n in space.wire_shapes)
    seen: list[dict[str, tuple[torch.Tensor, torch.Tensor, bool, torch.Tensor]]] = []
    real_update = local_round.lora_update

    def spy(model, round_state):  # the trained adapter, just before the node reads its factors
        held = {}
        for module, layer in lora_layers(model).items():
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            drawn = frozen_lora_a(settings.run.seed, 1, module, tuple(a.shape))
            own_delta = lora_delta(a.detach().cpu(), b.detach().cpu(), layer.scaling["default"])  # the node's ΔWₖ
            held[module] = (drawn, a.detach().cpu(), a.requires_grad, own_delta)
        seen.append(held)
        return real_update(model, round_state)

    monkeypatch.setattr(local_round, "lora_update", spy)
    engine = RoundEngine(build_merge_strategy(settings), space, round_number=1, run_id="r", check_sparsifier=True)
    b_sent = []
    for shard in (Shard(0, 2, "rank-2", lora_rank=2), Shard(1, 2, "rank-4")):
        payload = run_local_round(settings, {}, round_number=1, run_id="r", shard=shard).payload
        b_sent.append(decode_update(payload, expect=Expectation(space.wire_shapes)).tensors)
        assert set(b_sent[-1]) == set(space.wire_shapes)  # only B (at the run's rank) and the head
        assert engine.offer(payload) is None
    for held in seen:
        for drawn, a, trainable, _ in held.values():
            assert torch.equal(a, drawn) and not trainable  # the shared A, untouched by training
    weights = [engine.contributions[node].weight for node in ("rank-2", "rank-4")]
    merged = engine.merged_factored()
    module = space.frozen_a_modules[0]
    b_name = factor_names(module)[1]
    assert all(bool(to_dense(b[b_name]).abs().sum() > 0) for b in b_sent), "B was not trained"
    expected = sum(w / sum(weights) * held[module][3] for held, w in zip(seen, weights, strict=True))
    change = merged[module + ".weight"]
    assert isinstance(change, LowRank) and change.rank == settings.training.lora_rank
    torch.testing.assert_close(change.dense(), expected, rtol=1e-5, atol=1e-6)
