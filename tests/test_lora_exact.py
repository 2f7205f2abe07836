"""Exact LoRA merging: the server merges ΔWₖ = s·BₖAₖ, not averaged factors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from fedfuse.algebra import (
    factor_names,
    factors_to_deltas,
    lora_delta,
    lora_modules,
    naive_factor_average,
    svd_refactor,
)
from fedfuse.algebra.low_rank import LowRank
from fedfuse.rounds import RoundEngine, UpdateSpace
from fedfuse.settings import RunSettings
from fedfuse.strategies import get_strategy
from fedfuse.wire import UpdateHeader, encode_update

pytestmark = pytest.mark.unit

OUT, IN, RANK, SCALE = 24, 16, 4, 2.0
MODULE = "encoder.layer.0.attention.self.query"


def random_factors(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(RANK, IN, generator=generator), torch.randn(OUT, RANK, generator=generator)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_lora_delta_is_scaled_product():
    a, b = random_factors(0)
    assert torch.allclose(lora_delta(a, b, SCALE), SCALE * b @ a)


def test_lora_delta_rejects_factors_that_do_not_chain():
    with pytest.raises(ValueError, match="do not chain"):
        lora_delta(torch.zeros(4, 16), torch.zeros(24, 3), 1.0)


def test_unpaired_factor_is_named():
    with pytest.raises(ValueError, match=r"without their partner.*m1"):
        lora_modules(["m1.lora_A", "m2.lora_A", "m2.lora_B"])


def test_factors_become_deltas_under_the_base_weight_name_and_other_tensors_pass():
    a, b = random_factors(1)
    a_name, b_name = factor_names(MODULE)
    head = torch.ones(3)
    out = factors_to_deltas({a_name: a, b_name: b, "classifier.bias": head}, SCALE)
    assert set(out) == {MODULE + ".weight", "classifier.bias"}
    assert torch.equal(out["classifier.bias"], head)


@hsettings(max_examples=25, deadline=None)
@given(
    seeds=st.lists(st.integers(0, 10_000), min_size=2, max_size=5, unique=True),
    weights=st.lists(st.floats(0.1, 10.0), min_size=5, max_size=5),
)
def test_naive_factor_average_differs_from_the_exact_mean_of_products(seeds, weights):
    pairs = [random_factors(seed) for seed in seeds]
    weights = weights[: len(pairs)]
    total = sum(weights)
    exact = sum(w / total * lora_delta(a, b, SCALE) for (a, b), w in zip(pairs, weights, strict=False))
    naive = naive_factor_average(pairs, weights, SCALE)
    assert relative_error(naive, exact) > 1e-2


def _payload(node: str, a: torch.Tensor, b: torch.Tensor, examples: int, fingerprint: str) -> bytes:
    a_name, b_name = factor_names(MODULE)
    header = UpdateHeader(run_id="run", round=1, base_fingerprint=fingerprint, node_id=node, num_examples=examples)
    return encode_update({a_name: a, b_name: b}, header=header)


@pytest.mark.parametrize("aggregation", ["exact", "factors"])
def test_server_merge_of_encoded_factors(aggregation):
    """Through the wire and the round engine: exact gives Σ pₖ s BₖAₖ (1e-5), factors does not."""
    settings = RunSettings.from_run_config(
        strategy="fedavg", lora_aggregation=aggregation, lora_rank=RANK, lora_alpha=SCALE * RANK
    )
    a_name, b_name = factor_names(MODULE)
    space = settings.update_space({a_name: (RANK, IN), b_name: (OUT, RANK)}, scale=SCALE)
    merge_round = RoundEngine(get_strategy("fedavg"), space, round_number=1, run_id="run", base_fingerprint="fp")
    pairs = [random_factors(seed) for seed in (10, 11, 12)]
    examples = [100, 300, 50]
    for k, ((a, b), n) in enumerate(zip(pairs, examples, strict=False)):
        assert merge_round.offer(_payload(f"node-{k}", a, b, n, "fp")) is None
    merged = merge_round.merged_task_vector()[MODULE + ".weight"]
    exact = sum(n / sum(examples) * lora_delta(a, b, SCALE) for (a, b), n in zip(pairs, examples, strict=False))
    if aggregation == "exact":
        assert relative_error(merged, exact) < 1e-5
    else:
        assert relative_error(merged, exact) > 1e-2
        assert relative_error(merged, naive_factor_average(pairs, examples, SCALE)) < 1e-5


def test_exact_lora_ties_trims_each_delta_on_the_server():
    settings = RunSettings.from_run_config(
        strategy="ties", sparsifier="trim", density=0.25, lora_rank=RANK, lora_alpha=SCALE * RANK
    )
    a_name, b_name = factor_names(MODULE)
    captured = []

    class CapturingSpace(UpdateSpace):
        def merge_input(self, update):
            tensors, fisher = super().merge_input(update)
            captured.append(tensors[MODULE + ".weight"])
            return tensors, fisher

    space = settings.update_space({a_name: (RANK, IN), b_name: (OUT, RANK)}, scale=SCALE)
    space = CapturingSpace(space.kind, space.wire_shapes, space.scale, space.sparsifier, space.seed, space.seed_scope)
    merge_round = RoundEngine(get_strategy("ties"), space, round_number=1)
    a, b = random_factors(3)
    assert merge_round.offer(_payload("n", a, b, 10, "fp")) is None
    assert captured[0].indices.numel() == int(0.25 * OUT * IN)


def test_svd_refactor_recovers_a_low_rank_delta_and_reports_the_error_of_a_truncation():
    a, b = random_factors(4)
    delta = lora_delta(a, b, SCALE)
    exact = svd_refactor(delta, RANK)
    assert exact.relative_error < 1e-5
    assert relative_error(exact.lora_b @ exact.lora_a, delta) < 1e-5
    truncated = svd_refactor(delta, 1)
    assert 0.0 < truncated.relative_error < 1.0
    assert truncated.lora_a.shape == (1, IN) and truncated.lora_b.shape == (OUT, 1)


@pytest.mark.parametrize(("strategy", "folds"), [("fedavg", True), ("task_arithmetic", True), ("ties", False)])
def test_linear_merges_fold_exact_lora_updates_as_factors_and_others_form_delta_w(strategy, folds):
    """FedAvg and task arithmetic keep the round's ΔW as stacked factors (no product per update); TIES forms ΔW."""
    settings = RunSettings.from_run_config(strategy=strategy, lora_rank=RANK, lora_alpha=SCALE * RANK)
    a_name, b_name = factor_names(MODULE)
    space = settings.update_space({a_name: (RANK, IN), b_name: (OUT, RANK)}, scale=SCALE)
    engines = [RoundEngine(get_strategy(strategy), space, round_number=1, fold_factors=fold) for fold in (True, False)]
    for k, seed in enumerate((20, 21)):
        a, b = random_factors(seed)
        for engine in engines:
            assert engine.offer(_payload(f"node-{k}", a, b, 10 + k, "fp")) is None
    assert engines[0].folds_factors is folds
    factored = engines[0].merged_factored()[MODULE + ".weight"]
    assert isinstance(factored, LowRank) is folds
    dense = engines[1].merged_task_vector()[MODULE + ".weight"]
    got = factored.dense() if isinstance(factored, LowRank) else factored
    assert relative_error(got, dense) < 1e-6
