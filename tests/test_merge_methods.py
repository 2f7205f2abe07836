"""The survey's methods beyond TIES: linear, task negation, model stock, SLERP, breadcrumbs and DELLA.

References are written from mergekit's formulas (mergekit/merge_methods/*.py, mergekit/sparsify.py);
the differential test against mergekit itself is tests/test_mergekit_differential.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fedfuse.algebra import SparseTensor, Sparsifier, dare_seed_fn, sparsify_update, to_dense
from fedfuse.algebra.magnitude_drops import (
    breadcrumbs_counts,
    breadcrumbs_drop,
    della_drop,
    della_probabilities,
    l1_rescale,
)
from fedfuse.cli.main import app
from fedfuse.offline import MergeInputError, merge_models
from fedfuse.settings.fields import SettingsError
from fedfuse.settings.merge import MergeSettings
from fedfuse.strategies import TreeLeaf, build_strategy, method_spec, reduce_tree
from fedfuse.wire import Expectation, UpdateHeader, decode_update, encode_update

# Tiers are marked per test here: this module mixes integration and unit tests.


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --- sparsifiers ---------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("numel", "density", "gamma", "expected"),
    [(100, 0.5, 0.01, (49, 1)), (100, 0.9, 0.2, (0, 10)), (10, 0.5, 0.0, (5, 0)), (100, 1.0, 0.05, (0, 0))],
)
def test_breadcrumbs_drops_the_outliers_and_the_smallest_as_mergekit_counts(numel, density, gamma, expected) -> None:
    assert breadcrumbs_counts(numel, density, gamma) == expected


@pytest.mark.unit
def test_breadcrumbs_keeps_exactly_the_band_of_middle_magnitudes() -> None:
    tau = randn(10, 10)
    kept = breadcrumbs_drop(tau, density=0.3, gamma=0.05)
    order = tau.reshape(-1).abs().argsort()
    assert set(kept.indices.tolist()) == set(order[65:95].tolist())
    assert torch.equal(kept.values, tau.reshape(-1)[kept.indices])


@pytest.mark.unit
def test_l1_rescale_restores_the_l1_norm_of_the_full_tensor() -> None:
    tau = randn(50)
    kept = breadcrumbs_drop(tau, density=0.4, gamma=0.1, rescale="l1")
    assert math.isclose(float(kept.values.abs().sum()), float(tau.abs().sum()), rel_tol=1e-5)
    assert torch.equal(l1_rescale(tau, torch.zeros(3)), torch.zeros(3))


@pytest.mark.unit
def test_della_keep_probabilities_rise_with_magnitude_rank_from_d_minus_to_d_plus_epsilon() -> None:
    tau = randn(4, 9)
    p = della_probabilities(tau, density=0.5, epsilon=0.2)
    for row, probs in zip(tau, p, strict=True):
        order = row.abs().argsort()
        assert torch.all(probs[order].diff() > 0)
        assert math.isclose(float(probs.min()), 0.3, abs_tol=1e-6)
        assert math.isclose(float(probs.max()), 0.7, abs_tol=1e-6)


@pytest.mark.unit
def test_della_is_seeded_and_its_inverse_rescale_is_unbiased() -> None:
    tau = randn(6, 40, seed=3)
    a, b = della_drop(tau, 0.4, 0.1, seed=5), della_drop(tau, 0.4, 0.1, seed=5)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
    assert not torch.equal(della_drop(tau, 0.4, 0.1, seed=6).indices, a.indices)
    p = della_probabilities(tau, 0.4, 0.1).reshape(-1)
    torch.testing.assert_close(a.values, tau.reshape(-1)[a.indices] / p[a.indices])
    mean = torch.stack([to_dense(della_drop(tau, 0.4, 0.1, seed=s)) for s in range(3000)]).mean(0)
    assert float((mean - tau).abs().max()) < 0.2 * float(tau.abs().max())


@pytest.mark.unit
@pytest.mark.parametrize(("density", "epsilon"), [(0.1, 0.15), (0.9, 0.15), (0.5, -0.1)])
def test_della_needs_every_probability_inside_zero_one(density, epsilon) -> None:
    with pytest.raises(ValueError, match="DELLA needs density ± epsilon"):
        Sparsifier("della", density, epsilon=epsilon)


@pytest.mark.unit
def test_dare_with_an_l1_rescale_keeps_its_seeded_support() -> None:
    tau = {"w": randn(30, 7)}
    dropped = sparsify_update(tau, Sparsifier("dare", 0.3, rescale="l1"), dare_seed_fn(1, 2, "n"))["w"]
    plain = sparsify_update(tau, Sparsifier("dare", 0.3), dare_seed_fn(1, 2, "n"))["w"]
    assert isinstance(dropped, SparseTensor) and isinstance(plain, SparseTensor)
    assert torch.equal(dropped.indices, plain.indices) and dropped.dare_seed == plain.dare_seed
    assert math.isclose(float(dropped.values.abs().sum()), float(tau["w"].abs().sum()), rel_tol=1e-5)


@pytest.mark.unit
def test_sparsifier_fields_a_kind_does_not_use_keep_their_defaults() -> None:
    assert Sparsifier("trim", 0.2, gamma=0.3, epsilon=0.01) == Sparsifier("trim", 0.2)
    with pytest.raises(ValueError, match="needs a random drop"):
        Sparsifier("trim", 0.2, rescale="inverse")


@pytest.mark.unit
@pytest.mark.parametrize(
    "sparsifier",
    [
        Sparsifier("breadcrumbs", 0.3, gamma=0.05),
        Sparsifier("della", 0.4, epsilon=0.1, rescale="l1"),
        Sparsifier("dare", 0.5, rescale="none"),
    ],
    ids=["breadcrumbs", "della", "dare"],
)
def test_new_sparsifiers_cross_the_wire_with_their_parameters(sparsifier) -> None:
    tau = {"w": randn(12, 5), "b": randn(5, seed=1)}
    update = sparsify_update(tau, sparsifier, dare_seed_fn(0, 1, "node"))
    header = UpdateHeader("run", 1, "f" * 64, "node", sparsifier=sparsifier)
    shapes = {name: t.shape for name, t in tau.items()}
    decoded = decode_update(encode_update(update, header=header), expect=Expectation(shapes, sparsifier=sparsifier))
    assert decoded.header.sparsifier == sparsifier
    for name, tensor in update.items():
        assert torch.equal(to_dense(decoded.tensors[name]), to_dense(tensor))


# --- strategies ----------------------------------------------------------------------------------


def fold(name: str, taus: list[dict[str, torch.Tensor]], weights: list[float], **params):
    state = build_strategy(name, params).new_state()
    for tau, weight in zip(taus, weights, strict=True):
        state.add(tau, weight)
    return state


@pytest.mark.unit
def test_linear_normalized_is_fedavg_and_unnormalized_scales_the_base_as_mergekit() -> None:
    base = {"w": randn(4, 3)}
    taus = [{"w": randn(4, 3, seed=k + 1)} for k in range(3)]
    weights = [0.5, 1.5, -0.25]
    models = [base["w"] + t["w"] for t in taus]
    normalized = fold("linear", taus, weights).finalize()["w"]
    weighted_sum = sum(w * m for w, m in zip(weights, models, strict=True))
    torch.testing.assert_close(base["w"] + normalized, weighted_sum / sum(weights))
    raw = fold("linear", taus, weights, normalize=False).finalize(base=base)["w"]
    torch.testing.assert_close(base["w"] + raw, weighted_sum)
    with pytest.raises(ValueError, match="needs the base tensors"):
        fold("linear", taus, weights, normalize=False).finalize()


@pytest.mark.unit
def test_task_arithmetic_negates_a_task_with_a_negative_weight() -> None:
    taus = [{"w": randn(5, seed=1)}, {"w": randn(5, seed=2)}]
    merged = fold("task_arithmetic", taus, [1.0, -1.0]).finalize()["w"]
    torch.testing.assert_close(merged, taus[0]["w"] - taus[1]["w"])


@pytest.mark.unit
@pytest.mark.parametrize("name", ["fedavg", "ties", "model_stock"])
def test_methods_without_signed_weights_refuse_a_negative_one(name) -> None:
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        build_strategy(name).new_state().add({"w": torch.ones(2)}, -1.0)


@pytest.mark.unit
def test_ties_without_normalize_keeps_the_agreeing_sum() -> None:
    taus = [{"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([3.0, 1.0])}, {"w": torch.tensor([-1.0, -1.0])}]
    merged = fold("ties", taus, [1.0, 1.0, 1.0], normalize=False).finalize()["w"]
    assert torch.equal(merged, torch.tensor([4.0, -3.0]))


def as_sparse(tensor: torch.Tensor) -> SparseTensor:
    flat = tensor.reshape(-1)
    return SparseTensor(torch.nonzero(flat).reshape(-1), flat[flat != 0], tensor.shape)


def mergekit_model_stock(w0: torch.Tensor, ws: list[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    """mergekit ModelStockMergeTask.execute, line for line (norm product clamped at 1e-6)."""
    if filter_wise:
        w0v, wsv = (w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]) if w0.dim() == 1 else (w0, ws)
    else:
        w0v, wsv = w0.view(-1), [w.view(-1) for w in ws]
    offsets = [w - w0v for w in wsv]
    cos = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            product = torch.norm(offsets[i], dim=-1) * torch.norm(offsets[j], dim=-1)
            cos.append(((offsets[i] * offsets[j]).sum(dim=-1) / product.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(wsv)
    t = (n * c) / (1 + (n - 1) * c)
    return (t * (sum(wsv) / n) + (1 - t) * w0v).reshape(w0.shape)


@pytest.mark.unit
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
def test_model_stock_equals_mergekit_including_rows_a_model_left_unchanged(filter_wise, sparse) -> None:
    w0 = randn(6, 5)
    taus = [randn(6, 5, seed=k + 1) for k in range(4)]
    taus[1][2] = 0.0  # one model did not change row 2
    expected = mergekit_model_stock(w0, [w0 + t for t in taus], filter_wise) - w0
    updates = [{"w": as_sparse(t)} if sparse else {"w": t} for t in taus]
    merged = fold("model_stock", updates, [1.0] * 4, filter_wise=filter_wise).finalize()["w"]
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.unit
def test_model_stock_of_one_update_is_that_update_and_a_tier_tree_equals_flat() -> None:
    tau = {"w": randn(3, 4)}
    torch.testing.assert_close(fold("model_stock", [tau], [2.0]).finalize()["w"], tau["w"])
    items = [TreeLeaf({"w": randn(3, 4, seed=k)}, 1.0 + k) for k in range(5)]
    strategy = build_strategy("model_stock", {"filter_wise": True})
    tree = reduce_tree(strategy, [[items[0], items[1]], [[items[2]], items[3], items[4]]]).finalize()["w"]
    flat = fold("model_stock", [c.update for c in items], [c.weight for c in items], filter_wise=True).finalize()
    torch.testing.assert_close(tree, flat["w"], rtol=1e-5, atol=1e-6)


def mergekit_slerp(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """mergekit.merge_methods.slerp.slerp (DOT_THRESHOLD 0.9995, eps 1e-8), in numpy as there."""
    c0, c1 = v0.copy(), v1.copy()
    n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
    v0 = v0 / n0 if n0 > 1e-8 else v0
    v1 = v1 / n1 if n1 > 1e-8 else v1
    dot = np.sum(v0 * v1)
    if np.abs(dot) > 0.9995:
        return (1 - t) * c0 + t * c1
    theta = np.arccos(dot)
    return np.sin(theta - theta * t) / np.sin(theta) * c0 + np.sin(theta * t) / np.sin(theta) * c1


@pytest.mark.unit
@pytest.mark.parametrize(("t", "scale"), [(0.3, 2.0), (0.7, 2.0), (0.5, 1e-3)], ids=["t=0.3", "t=0.7", "colinear"])
def test_slerp_follows_mergekit_on_the_angle_between_the_two_models(t, scale) -> None:
    base = {"w": randn(8, 4)}
    tau = {"w": scale * randn(8, 4, seed=9)}
    merged = fold("slerp", [tau], [1.0], t=t).finalize(base=base)["w"]
    expected = mergekit_slerp(t, base["w"].numpy(), (base["w"] + tau["w"]).numpy())
    torch.testing.assert_close(base["w"] + merged, torch.from_numpy(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_slerp_merges_exactly_one_model_and_is_not_mergeable() -> None:
    state = fold("slerp", [{"w": torch.ones(2)}, {"w": torch.ones(2)}], [1.0, 1.0])
    with pytest.raises(ValueError, match="exactly one other model"):
        state.finalize(base={"w": torch.zeros(2)})
    assert not method_spec("slerp").capabilities.mergeable


@pytest.mark.unit
@pytest.mark.parametrize(
    ("strategy", "params"), [("slerp", ""), ("linear", "normalize=false")], ids=["slerp", "linear-unnormalized"]
)
def test_a_federated_run_refuses_methods_that_need_the_base_weights(strategy, params) -> None:
    with pytest.raises(SettingsError, match="merges offline only"):
        MergeSettings(strategy=strategy, strategy_params=params)


# --- offline merge -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("methods")
    base = {"a.weight": randn(16, 8), "a.bias": randn(8, seed=1)}
    models = [{n: t + 0.1 * randn(*t.shape, seed=10 + k) for n, t in base.items()} for k in range(3)]
    save_file(base, root / "base.safetensors")
    for k, model in enumerate(models):
        save_file(model, root / f"m{k}.safetensors")
    return {"root": root, "base": base, "models": models, "paths": [root / f"m{k}.safetensors" for k in range(3)]}


OFFLINE_CASES = [
    ("breadcrumbs_ties", {"density": 0.5, "sparsifier_options": {"gamma": 0.05}}, {"gamma": 0.05}),
    ("della_linear", {"density": 0.5, "seed": 4, "sparsifier_options": {"epsilon": 0.2}}, {"epsilon": 0.2}),
    ("model_stock", {}, {}),
]


@pytest.mark.unit
@pytest.mark.parametrize(("method", "kwargs", "options"), OFFLINE_CASES, ids=[c[0] for c in OFFLINE_CASES])
def test_offline_merges_of_the_new_methods_equal_the_in_memory_merge(tmp_path, checkpoints, method, kwargs, options):
    kind = method_spec(method).default_sparsifier
    sparsifier = Sparsifier(kind, kwargs.get("density", 1.0), **options)  # type: ignore[arg-type]
    merge_models(checkpoints["root"] / "base.safetensors", checkpoints["paths"], method=method, out=tmp_path, **kwargs)
    out = load_file(tmp_path / "model.safetensors")
    state = build_strategy(method).new_state()
    for k, model in enumerate(checkpoints["models"]):
        tau = {n: model[n] - checkpoints["base"][n] for n in model}
        state.add(sparsify_update(tau, sparsifier, dare_seed_fn(kwargs.get("seed", 0), 0, k)))
    for name, delta in state.finalize().items():
        torch.testing.assert_close(out[name], checkpoints["base"][name] + delta, rtol=0, atol=1e-6)


@pytest.mark.unit
def test_an_offline_slerp_interpolates_the_base_and_one_model(tmp_path, checkpoints) -> None:
    merge_models(
        checkpoints["root"] / "base.safetensors",
        checkpoints["paths"][:1],
        method="slerp",
        params={"t": 0.4},
        out=tmp_path,
    )
    out = load_file(tmp_path / "model.safetensors")
    for name, base in checkpoints["base"].items():
        expected = mergekit_slerp(0.4, base.reshape(-1).numpy(), checkpoints["models"][0][name].reshape(-1).numpy())
        torch.testing.assert_close(out[name].reshape(-1), torch.from_numpy(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.unit
def test_options_of_another_sparsifier_are_refused_in_one_line(checkpoints, tmp_path: Path) -> None:
    base = checkpoints["root"] / "base.safetensors"
    with pytest.raises(MergeInputError, match="epsilon applies to the della sparsifier"):
        merge_models(
            base,
            checkpoints["paths"],
            method="ties",
            density=0.3,
            sparsifier_options={"epsilon": 0.1},
            out=tmp_path / "x",
        )
    with pytest.raises(MergeInputError, match="partial"):
        merge_models(base, checkpoints["paths"][:1], method="slerp", partial_out=tmp_path / "p.fedfuse")


@pytest.mark.integration
def test_the_cli_merges_a_task_negation_with_a_negative_weight(checkpoints, tmp_path: Path) -> None:
    root = checkpoints["root"]
    args = ["merge", "--base", str(root / "base.safetensors"), "-m", str(checkpoints["paths"][0])]
    args += ["-m", str(checkpoints["paths"][1]), "--method", "task_arithmetic", "-w", "1", "-w", "-1"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "neg"), "--quiet"])
    assert result.exit_code == 0, result.output
    out = load_file(tmp_path / "neg" / "model.safetensors")
    m0, m1 = checkpoints["models"][0], checkpoints["models"][1]
    for name, base in checkpoints["base"].items():
        torch.testing.assert_close(out[name], base + (m0[name] - base) - (m1[name] - base))
    bad = CliRunner().invoke(
        app, [*args[:-4], "--method", "fedavg", "-w", "1", "-w", "-1", "--out", str(tmp_path / "b")]
    )
    assert bad.exit_code == 2 and "must be finite and >= 0" in bad.output
