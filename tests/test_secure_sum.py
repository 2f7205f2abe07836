"""A secure sum of the nodes' statistics is the plain merge: property tests over every covered strategy.

Each node computes its own statistics (``node_statistics``) and lays them out as ring elements; the ring sum
(what SecAgg+ unmasks: the masks cancel, as tests/test_secagg_protocol.py proves) is read back as one state.
Its merge equals the merge the server would compute from the updates themselves, within the fixed point's
stated error — for dense updates, round-seeded DARE (only the kept entries travel) and RegMean's Grams.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CONFIG_IDS, STRATEGY_CONFIGS, make_strategy

from fedfuse.algebra import Sparsifier, dare_seed_fn, sparsify_update
from fedfuse.rounds import RoundPolicy, UpdateSpace
from fedfuse.rounds.bounds import UpdateBounds
from fedfuse.rounds.secure_sum import (
    StatisticsLayout,
    node_statistics,
    own_partial,
    own_update,
    round_supports,
    update_supports,
)
from fedfuse.secagg.protocol import SecAggParams
from fedfuse.secagg.ring import FixedPoint, ring_sum
from fedfuse.settings import RunSettings, SettingsError
from fedfuse.strategies import get_strategy
from fedfuse.wire import UpdateHeader, encode_update

pytestmark = pytest.mark.unit

SHAPES = {"layer.weight": (6, 5), "layer.bias": (6,), "head.weight": (3, 6)}
NODES = 5


def _payload(node: int, sparsifier: Sparsifier, *, fisher: bool = False, grams: bool = False) -> bytes:
    generator = torch.Generator().manual_seed(node)
    tau = {name: 0.1 * torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
    kept = sparsify_update(tau, sparsifier, dare_seed_fn(3, 2, f"node-{node}", sparsifier.seed_scope))
    diag = {name: torch.rand(shape, generator=generator) + 0.05 for name, shape in SHAPES.items()} if fisher else None
    gram = None
    if grams:
        inputs = torch.randn(20, 5, generator=generator)
        head_inputs = torch.randn(20, 6, generator=generator)
        gram = {"layer.weight": inputs.T @ inputs / 20, "head.weight": head_inputs.T @ head_inputs / 20}
    header = UpdateHeader("run", 2, "base", f"node-{node}", num_examples=10 + 3 * node, sparsifier=sparsifier)
    return encode_update(kept, header=header, fisher=diag, grams=gram)


def _plain_and_secure(strategy, payloads: list[bytes], sparsifier: Sparsifier, bits: int = 32):
    fixed = FixedPoint.for_nodes(bits, 1024.0, len(payloads))
    plain = strategy.new_state()
    total, layouts = None, set()
    for payload in payloads:
        update = own_update(payload)
        shapes = {name: tuple(t.shape) for name, t in update.tensors.items()}
        plain.add(update.tensors, weight=update.header.num_examples, fisher=update.fisher, gram=update.grams)
        state = node_statistics(update, UpdateSpace.full(shapes), strategy, UpdateBounds())
        supports = update_supports(update.tensors)
        layout = StatisticsLayout.of(state, supports)
        layouts.add(layout.describe())
        vector, clipped = layout.encode(state, supports, fixed)
        assert clipped == 0
        total = vector if total is None else ring_sum(total, vector)
    assert len(layouts) == 1, "every node lays its statistics out the same way"
    supports = round_supports(sparsifier, 3, 2, SHAPES)
    layout.check(strategy, SHAPES)
    summed, clipped = layout.to_state(strategy, total, fixed, supports)
    assert clipped == 0 and summed.num_updates == len(payloads)
    return plain.finalize(), summed.finalize(), fixed


@pytest.mark.parametrize("config", STRATEGY_CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize(
    "sparsifier", [Sparsifier(), Sparsifier.of("dare", 0.4, seed_scope="round")], ids=["dense", "dare-round"]
)
def test_the_secure_sum_of_node_statistics_merges_like_the_updates(config, sparsifier):
    strategy = make_strategy(config)
    needs_fisher = strategy.capabilities.needs_fisher
    payloads = [_payload(node, sparsifier, fisher=needs_fisher) for node in range(NODES)]
    plain, secure, fixed = _plain_and_secure(strategy, payloads, sparsifier)
    for name, tensor in plain.items():
        scale = max(1.0, float(tensor.abs().max()))
        torch.testing.assert_close(secure[name], tensor, rtol=1e-5, atol=1e-5 * scale)
    assert fixed.error_bound(NODES) < 2e-6  # per summed statistic: 5 × ½ × 1024 / 2³¹


def test_regmean_grams_are_summed_securely_too():
    strategy = get_strategy("regmean")
    payloads = [_payload(node, Sparsifier(), grams=True) for node in range(NODES)]
    plain, secure, _ = _plain_and_secure(strategy, payloads, Sparsifier())
    for name, tensor in plain.items():
        torch.testing.assert_close(secure[name], tensor, rtol=1e-4, atol=1e-5)


def test_round_seeded_dare_sends_only_the_kept_entries_and_the_server_derives_the_same_support():
    sparsifier = Sparsifier.of("dare", 0.25, seed_scope="round")
    update = own_update(_payload(1, sparsifier))
    state = node_statistics(update, UpdateSpace.full(SHAPES), get_strategy("fedavg"), UpdateBounds())
    supports = update_supports(update.tensors)
    layout = StatisticsLayout.of(state, supports)
    dense = sum(int(np.prod(shape)) for shape in SHAPES.values())
    assert layout.float_length < 0.4 * dense
    derived = round_supports(sparsifier, 3, 2, SHAPES)
    assert all(torch.equal(derived[name], supports[name]) for name in supports)


def test_a_node_own_trim_gives_a_layout_the_server_cannot_derive():
    """Client-chosen TIES trims reveal where a node's update is large: they never lay out alike."""
    trim = Sparsifier.of("trim", 0.3)
    layouts = set()
    for node in range(2):
        update = own_update(_payload(node, trim))
        state = node_statistics(update, UpdateSpace.full(SHAPES), get_strategy("ties"), UpdateBounds())
        layouts.add(StatisticsLayout.of(state, update_supports(update.tensors)).describe())
    assert len(layouts) == 2


def test_clipping_and_the_example_cap_run_on_the_node():
    update = own_update(_payload(0, Sparsifier()))
    bounds = UpdateBounds(clip_norm=0.01, max_num_examples=4)
    state = node_statistics(update, UpdateSpace.full(SHAPES), get_strategy("fedavg"), bounds)
    assert state.total_weight == 4 and bounds.clipped == 1
    merged = state.finalize()
    assert float(torch.sqrt(sum((t.double() ** 2).sum() for t in merged.values()))) == pytest.approx(0.01, rel=1e-4)


def test_values_beyond_the_clipping_range_are_counted():
    update = own_update(_payload(0, Sparsifier()))
    state = node_statistics(update, UpdateSpace.full(SHAPES), get_strategy("fedavg"), UpdateBounds())
    layout = StatisticsLayout.of(state, {})
    _, clipped = layout.encode(state, {}, FixedPoint.for_nodes(32, 0.05, 4))
    assert clipped > 0


@pytest.mark.parametrize(
    ("overrides", "refusal"),
    [
        ({"strategy": "median", "mode": "full", "sparsifier": "none"}, "robust"),
        ({"strategy": "ties", "mode": "full", "sparsifier": "trim"}, "seed-scope round"),
        ({"strategy": "fedavg", "mode": "full", "sparsifier": "dare", "seed-scope": "node"}, "seed-scope round"),
        ({"strategy": "fedavg", "mode": "lora", "lora-aggregation": "exact", "sparsifier": "none"}, "frozen-a"),
        (
            {"strategy": "fedavg", "mode": "full", "sparsifier": "none", "dp": "central", "weighting": "uniform"},
            "dp local",
        ),
    ],
)
def test_the_run_settings_refuse_what_secure_aggregation_cannot_sum(overrides, refusal):
    with pytest.raises(SettingsError, match=refusal):
        RunSettings.from_run_config({}, **{"secure-aggregation": "secagg+", **overrides})


@pytest.mark.parametrize(
    "overrides",
    [
        {"strategy": "ties", "mode": "full", "sparsifier": "none"},
        {"strategy": "fisher", "mode": "full", "sparsifier": "dare", "seed-scope": "round", "fisher-batches": 1},
        {"strategy": "fedavg", "mode": "lora", "lora-aggregation": "frozen-a", "sparsifier": "none"},
        {"strategy": "fedavg", "mode": "full", "sparsifier": "none", "dp": "local", "weighting": "uniform"},
    ],
)
def test_the_run_settings_accept_every_covered_merge(overrides):
    settings = RunSettings.from_run_config({}, **{"secure-aggregation": "secagg+", "secagg-bits": 24, **overrides})
    assert settings.round_policy.secure_aggregation == SecAggParams(0, 0, 24, 1024.0)


def test_a_tier_gateway_partial_state_is_its_secure_input_and_the_sum_is_the_flat_merge():
    """Members are summed in the clear inside the gateway; gateways and nodes are summed securely."""
    strategy = get_strategy("ties")
    payloads = [_payload(node, Sparsifier()) for node in range(4)]
    policy = RoundPolicy(max_num_examples=0, bind_senders=False)
    gateway = policy.engine(strategy, UpdateSpace.full(SHAPES), round_number=2, run_id="run")
    for payload in payloads[:3]:
        assert gateway.offer(payload) is None
    partial = gateway.encode_partial(UpdateHeader("run", 2, "base", "gateway-a", num_examples=40, tier="a"))
    fixed = FixedPoint.for_nodes(32, 1024.0, 2)
    inputs = [own_partial(partial, strategy)]
    update = own_update(payloads[3])
    inputs.append(node_statistics(update, UpdateSpace.full(SHAPES), strategy, UpdateBounds()))
    layouts = [StatisticsLayout.of(state, {}) for state in inputs]
    assert layouts[0] == layouts[1]
    total = ring_sum(*(layout.encode(state, {}, fixed)[0] for layout, state in zip(layouts, inputs, strict=True)))
    summed, _ = layouts[0].to_state(strategy, total, fixed, {})
    flat = strategy.new_state()
    for payload in payloads:
        decoded = own_update(payload)
        flat.add(decoded.tensors, weight=decoded.header.num_examples)
    assert summed.num_updates == 4
    for name, tensor in flat.finalize().items():
        torch.testing.assert_close(summed.finalize()[name], tensor, rtol=1e-5, atol=1e-5)
