"""Low-rank matrices as factors: exact stacked sums, norms, SVD truncation, linear merges folded as factors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfuse.algebra.low_rank import LowRank, factors_are_smaller, frobenius_norm, stack, truncate
from fedfuse.algebra.robust import scale_update, update_norm
from fedfuse.strategies import get_strategy
from fedfuse.strategies.factored import FactoredState

pytestmark = pytest.mark.unit


def _factors(seed: int, out: int, inner: int, rank: int) -> LowRank:
    generator = torch.Generator().manual_seed(seed)
    return LowRank(torch.randn(out, rank, generator=generator), torch.randn(rank, inner, generator=generator))


@settings(max_examples=25, deadline=None)
@given(
    seeds=st.lists(st.integers(0, 10_000), min_size=1, max_size=5),
    out=st.integers(1, 12),
    inner=st.integers(1, 12),
    rank=st.integers(1, 4),
)
def test_stacked_factors_are_the_exact_sum_of_the_products(seeds, out, inner, rank):
    terms = [_factors(seed, out, inner, rank) for seed in seeds]
    stacked = stack(terms)
    assert stacked.rank == rank * len(terms)
    expected = sum(term.b.double() @ term.a.double() for term in terms)
    torch.testing.assert_close(stacked.dense(torch.float64), expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), out=st.integers(1, 16), inner=st.integers(1, 16), rank=st.integers(1, 6))
def test_the_frobenius_norm_from_factors_is_the_norm_of_the_product(seed, out, inner, rank):
    matrix = _factors(seed, out, inner, rank)
    assert frobenius_norm(matrix) == pytest.approx(float(torch.linalg.matrix_norm(matrix.dense().double())), rel=1e-6)


def test_update_norm_and_scaling_treat_factors_as_their_product():
    matrix = _factors(3, 6, 5, 2)
    update = {"w": matrix, "bias": torch.ones(3)}
    dense = {"w": matrix.dense(), "bias": torch.ones(3)}
    assert update_norm(update) == pytest.approx(update_norm(dense), rel=1e-6)
    scaled = scale_update(update, 0.5)["w"]
    assert isinstance(scaled, LowRank)
    torch.testing.assert_close(scaled.dense(), matrix.dense() * 0.5)


def test_factors_are_smaller_only_below_the_matrix_size():
    assert factors_are_smaller((576, 576), 8) and not factors_are_smaller((576, 576), 288)
    assert not factors_are_smaller((4, 4), 2)  # 2·(4 + 4) = 16 = 4·4: no saving


def test_truncation_keeps_a_low_rank_matrix_and_reports_what_it_leaves_out():
    exact = _factors(1, 20, 16, 3).dense()
    kept = truncate(exact, 3)
    assert kept.relative_error < 1e-5
    torch.testing.assert_close(kept.factors.dense() + kept.residual, exact)
    cut = truncate(exact, 1)
    assert 0.0 < cut.relative_error < 1.0
    torch.testing.assert_close(cut.factors.dense() + cut.residual, exact, rtol=1e-5, atol=1e-5)
    assert cut.relative_error == pytest.approx(
        float(torch.linalg.matrix_norm(cut.residual) / torch.linalg.matrix_norm(exact)), rel=1e-6
    )


@pytest.mark.parametrize(("method", "params"), [("fedavg", {}), ("task_arithmetic", {"lam": 0.7}), ("linear", {})])
def test_a_linear_merge_of_factored_updates_equals_the_dense_merge(method, params):
    strategy = get_strategy(method, **params)
    factored, dense = FactoredState(strategy), strategy.new_state()
    for k, weight in enumerate((3.0, 1.0, 2.5)):
        matrix = _factors(10 + k, 24, 20, 2)
        head = torch.full((4,), float(k))
        factored.add({"layer.weight": matrix, "head": head}, weight=weight)
        dense.add({"layer.weight": matrix.dense(), "head": head}, weight=weight)
    merged = factored.finalize_factored()
    assert isinstance(merged["layer.weight"], LowRank) and merged["layer.weight"].rank == 6
    expected = dense.finalize()
    torch.testing.assert_close(merged["layer.weight"].dense(), expected["layer.weight"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged["head"], expected["head"])


def test_factors_that_would_outgrow_the_matrix_are_flushed_into_the_dense_statistic_as_one_product():
    strategy = get_strategy("fedavg")
    factored, dense = FactoredState(strategy), strategy.new_state()
    for k in range(7):  # rank 2 × (8 + 8) = 32 < 8 × 8 = 64: one update's factors fit, two do not
        matrix = _factors(k, 8, 8, 2)
        factored.add({"w": matrix}, weight=1.0 + k)
        dense.add({"w": matrix.dense()}, weight=1.0 + k)
        held = sum(term.numel for term in factored.terms.get("w", []))
        assert held < 64, "the buffer never holds more entries than the matrix"
    assert "w" in factored.dense.shapes, "earlier updates were flushed into S"
    merged = factored.finalize_factored()
    assert isinstance(merged["w"], torch.Tensor)
    torch.testing.assert_close(merged["w"], dense.finalize()["w"], rtol=1e-5, atol=1e-5)


def test_a_factored_state_travels_as_the_methods_dense_partial_state():
    strategy = get_strategy("fedavg")
    left, right, reference = FactoredState(strategy), FactoredState(strategy), strategy.new_state()
    for k in range(4):
        matrix = _factors(20 + k, 30, 10, 2)
        (left if k % 2 else right).add({"w": matrix}, weight=2.0)
        reference.add({"w": matrix.dense()}, weight=2.0)
    partial = strategy.new_state()
    partial._load(right.to_tensors())  # what a gateway's partial state decodes to
    partial.total_weight, partial.num_updates = right.total_weight, right.num_updates
    left.combine(partial)
    torch.testing.assert_close(left.finalize()["w"], reference.finalize()["w"], rtol=1e-5, atol=1e-5)


def test_only_linear_methods_fold_factors():
    with pytest.raises(ValueError, match="not linear"):
        FactoredState(get_strategy("ties"))


def test_a_factored_update_of_another_shape_is_refused_and_changes_nothing():
    state = FactoredState(get_strategy("fedavg"))
    state.add({"w": _factors(1, 8, 6, 1), "b": torch.ones(2)}, weight=1.0)
    with pytest.raises(ValueError, match="earlier updates had"):
        state.add({"w": _factors(2, 6, 8, 1), "b": torch.ones(2)}, weight=1.0)
    assert state.num_updates == 1 and len(state.terms["w"]) == 1
