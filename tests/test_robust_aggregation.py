"""Robust aggregation: median, trimmed mean, (multi-)Krum and norm clipping, spilled to disk, bounded memory.

The algebra is checked against independent references (numpy's median, scipy's trim_mean, a brute-force
Krum over explicit distances); the spilled state against the same functions on stacked updates, chunk
boundaries included; the engine against an attacker that sends −10× its update.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfuse.algebra import SparseTensor, factor_names, factors_to_deltas, ties_trim
from fedfuse.algebra.robust import (
    clip_factor,
    coordinate_median,
    krum_scores,
    krum_selection,
    pairwise_sq_distances,
    scale_update,
    trimmed_mean,
    update_norm,
)
from fedfuse.rounds import RoundEngine, UpdateSpace
from fedfuse.strategies import build_strategy, get_strategy, method_spec
from fedfuse.strategies import spilled as spilled_module
from fedfuse.wire import UpdateHeader, encode_partial, encode_update, fingerprint

pytestmark = pytest.mark.unit

PROPERTY = settings(max_examples=40, deadline=None)
ROBUST = ("median", "trimmed_mean", "krum", "multi_krum")

rows_strategy = st.integers(1, 9).flatmap(
    lambda k: st.integers(1, 12).flatmap(
        lambda n: st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=k * n, max_size=k * n).map(
            lambda values: torch.tensor(values, dtype=torch.float32).reshape(k, n)
        )
    )
)


@PROPERTY
@given(rows_strategy)
def test_coordinate_median_is_numpys_median_whatever_the_row_order(rows: torch.Tensor) -> None:
    expected = np.median(rows.double().numpy(), axis=0)
    got = coordinate_median(rows)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-6, atol=1e-4)
    assert torch.equal(coordinate_median(rows.flip(0)), got)


@PROPERTY
@given(rows_strategy, st.sampled_from([0.0, 0.1, 0.25, 0.4]))
def test_trimmed_mean_is_scipys_trim_mean_and_order_free(rows: torch.Tensor, trim: float) -> None:
    count = rows.shape[0]
    cut = min(int(trim * count), (count - 1) // 2)
    expected = scipy.stats.trim_mean(rows.double().numpy(), cut / count, axis=0) if count > 1 else rows[0].numpy()
    got = trimmed_mean(rows, trim)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5, atol=1e-3)
    assert torch.equal(trimmed_mean(rows.flip(0), trim), got)


def _brute_force_krum(rows: torch.Tensor, byzantine: int) -> list[float]:
    """Krum's scores from explicit pairwise distances, one row at a time (the paper's definition)."""
    count = len(rows)
    neighbours = max(1, count - byzantine - 2)
    scores = []
    for i in range(count):
        distances = sorted(float(((rows[i] - rows[j]) ** 2).sum()) for j in range(count) if j != i)
        scores.append(sum(distances[:neighbours]))
    return scores


@PROPERTY
@given(st.integers(3, 9), st.integers(0, 3), st.integers(0, 10_000))
def test_krum_scores_from_a_gram_matrix_match_the_definition(count: int, byzantine: int, seed: int) -> None:
    rows = torch.randn(count, 20, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    scores = krum_scores(pairwise_sq_distances(rows @ rows.T), byzantine)
    np.testing.assert_allclose(scores.numpy(), _brute_force_krum(rows, byzantine), rtol=1e-9, atol=1e-9)


def test_krum_keeps_the_honest_cluster_and_multi_krum_averages_it() -> None:
    honest = torch.randn(6, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.1 + 1
    rows = torch.cat([honest, -10 * honest[:2]])
    distances = pairwise_sq_distances(rows @ rows.T)
    krum = krum_selection(distances, byzantine=2, select=1)
    assert int(krum.argmax()) < 6 and float(krum.sum()) == 1.0
    multi = krum_selection(distances, byzantine=2, select=0)
    assert set(torch.nonzero(multi).flatten().tolist()) == set(range(6))


def test_clipping_scales_only_updates_over_the_norm_and_keeps_sparse_supports() -> None:
    dense = torch.tensor([3.0, 4.0])
    sparse = SparseTensor(torch.tensor([1, 4]), torch.tensor([12.0, 0.0]), torch.Size([5]))
    update = {"a": dense, "b": sparse}
    assert update_norm(update) == pytest.approx(13.0)
    factor = clip_factor(13.0, 6.5)
    scaled = scale_update(update, factor)
    assert update_norm(scaled) == pytest.approx(6.5)
    assert torch.equal(scaled["b"].indices, sparse.indices)
    assert clip_factor(1.0, 6.5) == 1.0
    with pytest.raises(ValueError, match="max_norm"):
        clip_factor(1.0, 0.0)


def _updates(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {"w": torch.randn(7, 5, generator=generator), "b": torch.randn(5, generator=generator)} for _ in range(count)
    ]


@pytest.mark.parametrize("name", ROBUST)
def test_a_spilled_merge_equals_the_function_on_stacked_updates_across_chunk_boundaries(name, monkeypatch) -> None:
    updates = _updates(5)
    full = build_strategy(name).new_state()
    for k, update in enumerate(updates):
        full.add(update, weight=k + 1)
    expected = full.finalize()
    monkeypatch.setattr(spilled_module, "CHUNK_BYTES", 5 * 4 * 3)  # three entries of five rows per chunk
    chunked = build_strategy(name).new_state()
    for k, update in enumerate(updates):
        chunked.add(update, weight=k + 1)
    got = chunked.finalize(release=True)
    for tensor in ("w", "b"):
        torch.testing.assert_close(got[tensor], expected[tensor], rtol=1e-6, atol=1e-6)
    stacked = torch.stack([u["w"].reshape(-1) for u in updates])
    reference = {"median": coordinate_median(stacked), "trimmed_mean": trimmed_mean(stacked, 0.25)}.get(name)
    if reference is not None:
        torch.testing.assert_close(got["w"].reshape(-1), reference)


def test_krum_over_spilled_updates_returns_one_clients_update() -> None:
    updates = _updates(6, seed=3)
    state = get_strategy("krum", byzantine=1).new_state()
    for update in updates:
        state.add(update)
    merged = state.finalize(release=True)
    assert any(torch.equal(merged["w"], u["w"]) and torch.equal(merged["b"], u["b"]) for u in updates)


@pytest.mark.parametrize("name", ROBUST)
def test_robust_methods_are_declared_non_monoids_and_refuse_partial_states(name) -> None:
    assert not method_spec(name).capabilities.mergeable
    state = build_strategy(name).new_state().add(_updates(1)[0])
    other = build_strategy(name).new_state()
    with pytest.raises(ValueError, match="not a monoid"):
        state.combine(other)
    with pytest.raises(ValueError, match="not a monoid"):
        state.to_tensors()


def test_the_spill_file_is_unlinked_from_the_start_and_freed_by_release(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    state = get_strategy("median").new_state()
    for update in _updates(3):
        state.add(update)
    assert os.listdir(tmp_path) == []  # nothing to leave behind, even if the process is killed now
    descriptor = state._rows.file.fileno()
    assert os.fstat(descriptor).st_size == 3 * (35 + 5) * 4
    state.finalize(release=True)
    with pytest.raises(OSError):
        os.fstat(descriptor)
    with pytest.raises(ValueError, match="spent"):
        state.add(_updates(1)[0])


def test_an_update_with_other_tensors_is_refused_and_the_state_is_untouched() -> None:
    state = get_strategy("trimmed_mean").new_state()
    first, second = _updates(2)
    state.add(first).add(second)
    with pytest.raises(ValueError, match="same tensors"):
        state.add({"w": first["w"]})
    with pytest.raises(ValueError, match="shape"):
        state.add({"w": first["w"][:3], "b": first["b"]})
    assert state.num_updates == 2
    torch.testing.assert_close(state.finalize()["w"], (first["w"] + second["w"]) / 2)


def test_a_failed_write_leaves_the_spilled_rows_as_they_were(monkeypatch) -> None:
    state = get_strategy("median").new_state()
    first, second, third = _updates(3)
    state.add(first)
    rows = state._rows
    real_write = rows.file.write
    calls = []

    def write_then_fail(data):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_write(data)

    monkeypatch.setattr(rows.file, "write", write_then_fail)
    with pytest.raises(OSError, match="No space"):
        state.add(second)
    monkeypatch.setattr(rows.file, "write", real_write)
    state.add(third)
    assert state.num_updates == 2
    torch.testing.assert_close(state.finalize()["w"], (first["w"] + third["w"]) / 2)


def test_a_sparse_update_is_spilled_with_its_zeros() -> None:
    dense = _updates(2)
    trimmed = {name: ties_trim(t, 0.3) for name, t in _updates(1, seed=9)[0].items()}
    state = get_strategy("median").new_state()
    for update in (*dense, trimmed):
        state.add(update)
    stacked = torch.stack([dense[0]["w"], dense[1]["w"], trimmed["w"].to_dense()])
    torch.testing.assert_close(state.finalize()["w"], stacked.median(dim=0).values)


SHAPES = {"layer.weight": (8, 6), "layer.bias": (6,)}
BASE = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
FINGERPRINT = fingerprint(BASE)


def _engine(strategy, space=None, **options) -> RoundEngine:
    return RoundEngine(
        strategy,
        space or UpdateSpace.full(SHAPES),
        round_number=1,
        run_id="run",
        base_fingerprint=FINGERPRINT,
        max_bytes="auto",
        **options,
    )


def _payload(node: int, tensors, examples: int = 10) -> bytes:
    return encode_update(tensors, header=UpdateHeader("run", 1, FINGERPRINT, node, num_examples=examples))


def _honest(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: 1.0 + 0.1 * torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


@pytest.mark.parametrize(
    ("name", "options"), [("median", {}), ("trimmed_mean", {}), ("krum", {}), ("fedavg", {"clip_norm": 4.0})]
)
def test_one_client_of_four_sending_minus_ten_times_its_update_cannot_drag_a_robust_merge(name, options) -> None:
    honest = [_honest(seed) for seed in range(3)]
    attacker = {key: -10 * value for key, value in _honest(7).items()}
    engine = _engine(get_strategy(name), **options)
    for node, tensors in enumerate([*honest, attacker]):
        assert engine.offer(_payload(node, tensors)) is None
    merged = engine.merged_task_vector()
    clean = {key: sum(h[key] for h in honest) / 3 for key in SHAPES}
    attacked_fedavg = {key: (sum(h[key] for h in honest) + attacker[key]) / 4 for key in SHAPES}
    for key in SHAPES:
        distance = float((merged[key] - clean[key]).norm())
        assert distance < 0.35 * float((attacked_fedavg[key] - clean[key]).norm()), (name, key, distance)
    if "clip_norm" in options:
        assert engine.metrics()["clipped"] == 4 and max(engine.bounds.norms) > 4.0


def test_robust_methods_merge_exact_lora_updates_in_delta_w_space() -> None:
    module = "layer"
    a_name, b_name = factor_names(module)
    shapes = {a_name: (2, 6), b_name: (8, 2), "layer.bias": (6,)}
    space = UpdateSpace("lora-exact", shapes, scale=2.0)
    engine = RoundEngine(get_strategy("median"), space, round_number=1, run_id="run", base_fingerprint=FINGERPRINT)
    deltas = []
    for node in range(3):
        generator = torch.Generator().manual_seed(node)
        factors = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
        deltas.append(factors_to_deltas(factors, 2.0))
        assert engine.offer(_payload(node, factors)) is None
    merged = engine.merged_task_vector()
    expected = torch.stack([d["layer.weight"] for d in deltas]).median(dim=0).values
    torch.testing.assert_close(merged["layer.weight"], expected)


def test_the_engine_refuses_a_gateways_partial_state_for_a_robust_method() -> None:
    partial = get_strategy("fedavg").new_state().add(_honest(1), weight=3)
    payload = encode_partial(partial, header=UpdateHeader("run", 1, FINGERPRINT, "gw", num_examples=3))
    rejection = _engine(get_strategy("median")).offer(payload, kind="partial")
    assert rejection is not None and rejection.reason == "incompatible_update" and "monoid" in rejection.message


def test_an_inflated_example_count_is_capped_and_counted() -> None:
    engine = _engine(get_strategy("fedavg"), max_num_examples=100)
    assert engine.offer(_payload(0, _honest(0), examples=100)) is None
    assert engine.offer(_payload(1, {k: v * 0 for k, v in _honest(1).items()}, examples=10**9)) is None
    merged = engine.merged_task_vector()
    torch.testing.assert_close(merged["layer.bias"], _honest(0)["layer.bias"] / 2)
    assert engine.metrics()["capped"] == 1
