"""Seeded sketches of task vectors: sketched cosines within the stated tolerance, linear, seeded, fixed size."""

from __future__ import annotations

import math

import pytest
import torch

from fedfuse.algebra import sketch as sketch_module
from fedfuse.algebra.low_rank import LowRank
from fedfuse.algebra.sketch import (
    COSINE_TOLERANCE,
    DEFAULT_DIM,
    SamplePlan,
    UpdateSketch,
    cosine_tolerance,
    sketch_cosine,
    sketch_update,
)
from fedfuse.algebra.sparse import SparseTensor

pytestmark = pytest.mark.unit


def _cosine(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> float:
    dot = sum(float((x[n].double() * y[n].double()).sum()) for n in x)
    nx = math.sqrt(sum(float(t.double().square().sum()) for t in x.values()))
    ny = math.sqrt(sum(float(t.double().square().sum()) for t in y.values()))
    return dot / (nx * ny)


def _pair(seed: int, mix: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Two random updates whose cosine is about ``mix / √(mix² + 1)``."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (64, 96), "a.bias": (96,), "b.weight": (128, 40)}
    x = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    y = {n: mix * t + torch.randn(t.shape, generator=g) for n, t in x.items()}
    return x, y


def test_the_stated_tolerance_is_five_over_root_dim() -> None:
    assert pytest.approx(5 / math.sqrt(4096)) == COSINE_TOLERANCE
    assert cosine_tolerance(1024) == pytest.approx(5 / 32)


@pytest.mark.parametrize("mix", [-2.0, -0.3, 0.0, 0.5, 3.0])
@pytest.mark.parametrize("seed", range(4))
def test_dense_sketch_cosines_are_within_the_tolerance_of_the_exact_ones(seed: int, mix: float) -> None:
    x, y = _pair(seed, mix)
    estimate = sketch_cosine(sketch_update(x, seed=seed), sketch_update(y, seed=seed))
    assert abs(estimate - _cosine(x, y)) <= COSINE_TOLERANCE


def _sparse(tensor: torch.Tensor, keep: torch.Tensor) -> SparseTensor:
    flat = tensor.reshape(-1)
    indices = torch.nonzero(keep.reshape(-1)).reshape(-1)
    return SparseTensor(indices, flat[indices], tensor.shape)


@pytest.mark.parametrize("seed", range(4))
def test_sparse_sketch_cosines_are_within_the_tolerance_and_equal_the_dense_sketch(seed: int) -> None:
    x, y = _pair(seed, 0.7)
    g = torch.Generator().manual_seed(100 + seed)
    keep = {n: torch.rand(t.shape, generator=g) < 0.3 for n, t in x.items()}
    xs = {n: _sparse(t, keep[n]) for n, t in x.items()}
    ys = {n: _sparse(t, keep[n]) for n, t in y.items()}
    dense_x = {n: t.to_dense() for n, t in xs.items()}
    dense_y = {n: t.to_dense() for n, t in ys.items()}
    sx, sy = sketch_update(xs, seed=seed, samples=500), sketch_update(ys, seed=seed)
    assert abs(sketch_cosine(sx, sy) - _cosine(dense_x, dense_y)) <= COSINE_TOLERANCE
    dense = sketch_update(dense_x, seed=seed, samples=500)
    torch.testing.assert_close(sx.vector, dense.vector)
    torch.testing.assert_close(sx.samples, dense.samples)
    assert sx.squared_norm == pytest.approx(dense.squared_norm)


@pytest.mark.parametrize("seed", range(4))
def test_low_rank_sketch_cosines_are_within_the_tolerance_and_equal_the_dense_sketch(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    b1, a1 = torch.randn(120, 4, generator=g), torch.randn(4, 80, generator=g)
    b2, a2 = b1 + 0.5 * torch.randn(120, 4, generator=g), torch.randn(4, 80, generator=g)
    x, y = {"w": LowRank(b1, a1)}, {"w": LowRank(b2, a1 + 0.8 * a2)}
    dx, dy = {"w": x["w"].dense(torch.float64)}, {"w": y["w"].dense(torch.float64)}
    sx, sy = sketch_update(x, seed=seed, samples=300), sketch_update(y, seed=seed)
    assert abs(sketch_cosine(sx, sy) - _cosine(dx, dy)) <= COSINE_TOLERANCE
    dense = sketch_update(dx, seed=seed, samples=300)
    torch.testing.assert_close(sx.vector, dense.vector)
    torch.testing.assert_close(sx.samples, dense.samples)
    assert sx.squared_norm == pytest.approx(float(dx["w"].square().sum()))


def test_chunked_hashing_of_big_tensors_gives_the_same_sketch_for_every_input_form(monkeypatch) -> None:
    """With small chunks, a dense, a sparse and a low-rank input cross chunk and row boundaries alike."""
    monkeypatch.setattr(sketch_module, "CHUNK", 1000)
    g = torch.Generator().manual_seed(0)
    low = LowRank(torch.randn(300, 3, generator=g), torch.randn(3, 70, generator=g))
    dense = low.dense(torch.float64)
    keep = torch.ones(dense.shape, dtype=torch.bool)
    forms = [{"w": low}, {"w": dense}, {"w": _sparse(dense, keep)}]
    sketches = [sketch_update(form, seed=5, samples=200) for form in forms]
    for other in sketches[1:]:
        torch.testing.assert_close(other.vector, sketches[0].vector)
        torch.testing.assert_close(other.samples, sketches[0].samples)


def test_the_sketch_of_a_sum_is_the_sum_of_the_sketches() -> None:
    x, y = _pair(1, 0.2)
    total = {n: x[n] + 2.5 * y[n] for n in x}
    sx, sy, st = (sketch_update(u, seed=9) for u in (x, y, total))
    torch.testing.assert_close(st.vector, sx.vector + 2.5 * sy.vector, rtol=1e-5, atol=1e-6)


def test_sketches_are_determined_by_the_seed_and_the_names() -> None:
    x, _ = _pair(2, 0.0)
    again = sketch_update(x, seed=4, samples=100)
    torch.testing.assert_close(sketch_update(x, seed=4, samples=100).vector, again.vector)
    assert not torch.equal(sketch_update(x, seed=5).vector, again.vector)
    renamed = {f"other.{n}": t for n, t in x.items()}
    assert not torch.equal(sketch_update(renamed, seed=4).vector, again.vector)
    reordered = dict(reversed(list(x.items())))
    torch.testing.assert_close(sketch_update(reordered, seed=4, samples=100).samples, again.samples)


def test_the_norm_is_exact() -> None:
    x, _ = _pair(3, 0.0)
    exact = math.sqrt(sum(float(t.double().square().sum()) for t in x.values()))
    assert sketch_update(x).norm == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("numel", [10, 10_000, 3_000_000])
def test_a_sketch_holds_the_same_bytes_whatever_the_size_of_the_tensor(numel: int) -> None:
    plan = SamplePlan.of({"w": (numel,)}, 4096, 0)
    sketch = UpdateSketch(DEFAULT_DIM, 0, plan)
    sketch.add_tensor("w", torch.ones(numel))
    expected_samples = min(4096, numel)
    assert sketch.vector.numel() == DEFAULT_DIM and sketch.samples.numel() == expected_samples
    assert sketch.nbytes == 8 * (DEFAULT_DIM + expected_samples)


def test_the_sample_plan_splits_by_size_and_is_the_same_for_every_update() -> None:
    plan = SamplePlan.of({"big": (900,), "small": (100,)}, 100, 3)
    assert plan.counts == {"big": 90, "small": 10} and plan.total == 100
    assert torch.equal(plan.positions("big"), SamplePlan.of({"small": (100,), "big": (900,)}, 100, 3).positions("big"))
    assert bool((plan.positions("small") < 100).all())


def test_a_tensor_of_another_size_than_the_plan_says_is_refused() -> None:
    sketch = UpdateSketch(64, 0, SamplePlan.of({"w": (10,)}, 5, 0))
    with pytest.raises(ValueError, match="'w' has 12 entries"):
        sketch.add_tensor("w", torch.ones(12))


def test_sketches_of_another_seed_do_not_compare() -> None:
    x, _ = _pair(0, 0.0)
    with pytest.raises(ValueError, match="sketches differ"):
        sketch_cosine(sketch_update(x, seed=1), sketch_update(x, seed=2))
