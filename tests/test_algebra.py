"""Specification of the tensor algebra: task vectors, sparse tensors, TIES trim, seeded DARE, seeds."""

from __future__ import annotations

import hashlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils.merge_utils import random_pruning

from fedfuse.algebra import (
    SparseTensor,
    Sparsifier,
    apply_task_vector,
    dare_drop,
    dare_indices,
    dare_mask,
    dare_seed_fn,
    derive_seed,
    global_trim,
    sparsify_update,
    task_vector,
    ties_trim,
    trim_count,
)

pytestmark = pytest.mark.unit

# --- task vectors -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_task_vectors_of_half_precision_models_are_computed_in_fp32(dtype) -> None:
    """1000.5 − 0.00049 is 1000.5 in fp16/bf16 arithmetic but 1000.4995 in fp32."""
    base = {"w": torch.tensor([0.00049, 1.0], dtype=dtype)}
    tuned = {"w": torch.tensor([1000.5, 1.5], dtype=dtype)}
    tau = task_vector(tuned, base)["w"]
    assert tau.dtype == torch.float32
    assert torch.equal(tau, tuned["w"].float() - base["w"].float())
    assert not torch.equal(tau, (tuned["w"] - base["w"]).float())


def test_non_floating_tensors_carry_no_task_vector() -> None:
    base = {"w": torch.zeros(2), "position_ids": torch.arange(4), "mask": torch.ones(2, dtype=torch.bool)}
    tuned = {"w": torch.ones(2), "position_ids": torch.arange(4), "mask": torch.ones(2, dtype=torch.bool)}
    assert set(task_vector(tuned, base)) == {"w"}


def test_task_vector_name_mismatch_names_the_tensors() -> None:
    with pytest.raises(ValueError, match=r"missing from the tuned model: head.bias"):
        task_vector({"w": torch.ones(1)}, {"w": torch.ones(1), "head.bias": torch.ones(1)})
    with pytest.raises(ValueError, match="not in the base model: extra"):
        task_vector({"w": torch.ones(1), "extra": torch.ones(1)}, {"w": torch.ones(1)})


def test_task_vector_shape_mismatch_names_the_tensor() -> None:
    with pytest.raises(ValueError, match=r"'layer.0.weight': shape \(2, 3\).*\(3, 2\)"):
        task_vector({"layer.0.weight": torch.ones(2, 3)}, {"layer.0.weight": torch.ones(3, 2)})


def test_a_float_base_tensor_needs_a_float_tuned_tensor() -> None:
    with pytest.raises(ValueError, match="'w'"):
        task_vector({"w": torch.ones(2, dtype=torch.int64)}, {"w": torch.ones(2)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_apply_task_vector_adds_lambda_tau_in_fp32_and_keeps_the_base_dtype(dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 5, generator=gen).to(dtype), "ids": torch.arange(3)}
    tau = {"w": torch.randn(4, 5, generator=gen)}
    merged = apply_task_vector(base, tau, lam=0.3)
    assert merged["w"].dtype == dtype
    assert torch.equal(merged["w"], torch.add(base["w"].float(), tau["w"], alpha=0.3).to(dtype))
    assert torch.equal(merged["ids"], base["ids"]) and merged["ids"].data_ptr() != base["ids"].data_ptr()


def test_apply_task_vector_with_a_sparse_tau_equals_its_dense_form() -> None:
    gen = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(6, 7, generator=gen)}
    sparse = ties_trim(torch.randn(6, 7, generator=gen), 0.3)
    torch.testing.assert_close(
        apply_task_vector(base, {"w": sparse}, lam=2.0)["w"],
        apply_task_vector(base, {"w": sparse.to_dense()}, 2.0)["w"],
    )


def test_apply_task_vector_undoes_task_vector() -> None:
    gen = torch.Generator().manual_seed(2)
    base = {"w": torch.randn(8, generator=gen), "n": torch.arange(2)}
    tuned = {"w": torch.randn(8, generator=gen), "n": torch.arange(2)}
    torch.testing.assert_close(apply_task_vector(base, task_vector(tuned, base))["w"], tuned["w"])


def test_apply_task_vector_errors_name_the_tensor() -> None:
    with pytest.raises(ValueError, match="base lacks: ghost"):
        apply_task_vector({"w": torch.ones(2)}, {"ghost": torch.ones(2)})
    with pytest.raises(ValueError, match=r"'w': task vector shape \(3,\)"):
        apply_task_vector({"w": torch.ones(2)}, {"w": torch.ones(3)})


# --- sparse tensors -----------------------------------------------------------------------------


def test_sparse_tensor_reports_its_size_and_densifies() -> None:
    t = SparseTensor(torch.tensor([1, 4]), torch.tensor([2.0, -3.0]), [2, 3])
    assert t.shape == torch.Size([2, 3]) and t.numel == 6 and t.nnz == 2 and t.dtype == torch.float32
    assert torch.equal(t.to_dense(), torch.tensor([[0.0, 2.0, 0.0], [0.0, -3.0, 0.0]]))


@pytest.mark.parametrize(
    "indices, values, shape, message",
    [
        (torch.tensor([[0, 1]]), torch.ones(2), (4,), "1-D"),
        (torch.tensor([0, 1]), torch.ones(3), (4,), "2 indices but 3 values"),
        (torch.tensor([0.0, 1.0]), torch.ones(2), (4,), "int64"),
        (torch.tensor([0, 4]), torch.ones(2), (4,), "out of range"),
        (torch.tensor([-1, 2]), torch.ones(2), (4,), "out of range"),
        (torch.tensor([2, 1]), torch.ones(2), (4,), "sorted"),
        (torch.tensor([1, 1]), torch.ones(2), (4,), "sorted"),
    ],
)
def test_sparse_tensor_rejects_what_its_contract_forbids(indices, values, shape, message) -> None:
    """Indices are flat, sorted, unique int64 in [0, numel): a duplicate would be added twice by a merge."""
    with pytest.raises(ValueError, match=message):
        SparseTensor(indices, values, shape)


# --- TIES trim ----------------------------------------------------------------------------------

magnitudes = st.floats(-100, 100, allow_nan=False, width=32)


@settings(max_examples=150, deadline=None)
@given(values=st.lists(magnitudes, min_size=1, max_size=60), density=st.floats(0.0, 1.0))
def test_ties_trim_keeps_exactly_floor_d_n_of_the_largest_magnitudes(values, density) -> None:
    tensor = torch.tensor(values, dtype=torch.float32)
    trimmed = ties_trim(tensor, density)
    k = int(density * len(values))
    assert trimmed.nnz == k == trim_count(len(values), density)
    assert trimmed.indices.dtype == torch.int64
    assert torch.equal(trimmed.indices, trimmed.indices.unique(sorted=True))
    assert torch.equal(trimmed.values, tensor[trimmed.indices])
    dropped = torch.ones(len(values), dtype=torch.bool)
    dropped[trimmed.indices] = False
    if 0 < k < len(values):
        assert tensor[trimmed.indices].abs().min() >= tensor[dropped].abs().max()


def test_ties_trim_works_per_tensor_shape_and_returns_fp32_values() -> None:
    tensor = torch.tensor([[0.5, -4.0], [3.0, 0.25]], dtype=torch.bfloat16)
    trimmed = ties_trim(tensor, 0.5)
    assert trimmed.shape == (2, 2) and trimmed.values.dtype == torch.float32
    assert torch.equal(trimmed.to_dense(), torch.tensor([[0.0, -4.0], [3.0, 0.0]]))


@pytest.mark.parametrize("density", [-0.1, 1.5])
def test_densities_outside_0_1_are_rejected(density) -> None:
    for call in (lambda: ties_trim(torch.ones(4), density), lambda: dare_mask((4,), density, 0)):
        with pytest.raises(ValueError, match="density"):
            call()


def test_global_trim_keeps_floor_d_n_over_the_whole_model() -> None:
    gen = torch.Generator().manual_seed(3)
    tau = {"big": 10 * torch.randn(20, generator=gen), "small": 0.01 * torch.randn(5, 6, generator=gen)}
    kept = global_trim(tau, 0.4)
    assert sum(t.nnz for t in kept.values()) == int(0.4 * 50) == 20
    assert kept["big"].nnz == 20 and kept["small"].nnz == 0
    assert kept["small"].shape == (5, 6)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=4), density=st.floats(0.0, 1.0), seed=st.integers(0, 1000)
)
def test_global_trim_keeps_the_top_magnitudes_across_tensors(sizes, density, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    tau = {f"t{i}": torch.randn(n, generator=gen) * (i + 1) for i, n in enumerate(sizes)}
    kept = sparsify_update(tau, Sparsifier("trim", density, scope="global"))
    total = sum(sizes)
    assert sum(t.nnz for t in kept.values()) == int(density * total)
    kept_abs = torch.cat([kept[n].values.abs() for n in tau])
    dropped_abs = []
    for name, tensor in tau.items():
        mask = torch.ones(tensor.numel(), dtype=torch.bool)
        mask[kept[name].indices] = False
        dropped_abs.append(tensor[mask].abs())
        assert torch.equal(kept[name].values, tensor[kept[name].indices])
    dropped_abs = torch.cat(dropped_abs)
    if kept_abs.numel() and dropped_abs.numel():
        assert kept_abs.min() >= dropped_abs.max()


# --- DARE ---------------------------------------------------------------------------------------


def test_dare_masks_are_determined_by_their_seed() -> None:
    assert torch.equal(dare_mask((100, 100), 0.3, 7), dare_mask((100, 100), 0.3, 7))
    assert not torch.equal(dare_mask((100, 100), 0.3, 7), dare_mask((100, 100), 0.3, 8))


def test_dare_masks_do_not_depend_on_the_thread_count() -> None:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dare_mask((1 << 20,), 0.3, 11)
        torch.set_num_threads(2)
        two = dare_mask((1 << 20,), 0.3, 11)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_drop_equals_peft_random_pruning_after_manual_seed(density) -> None:
    tensor = torch.randn(37, 23, generator=torch.Generator().manual_seed(4))
    seed = derive_seed(5, 1, 2, "layer.weight")
    ours = dare_drop(tensor, density, seed)
    torch.manual_seed(seed)
    theirs = random_pruning(tensor, density, rescale=True)
    assert torch.equal(dare_mask(tensor.shape, density, seed), theirs != 0)
    assert torch.equal(ours.to_dense(), theirs)


@pytest.mark.parametrize("density", [0.05, 0.3, 0.7])
def test_dare_keeps_a_fraction_near_density(density) -> None:
    n = 400_000
    fraction = dare_indices(n, density, 12).numel() / n
    assert abs(fraction - density) < 5 * (density * (1 - density) / n) ** 0.5


def test_dare_drop_rescales_and_remembers_its_seed() -> None:
    tensor = torch.arange(1.0, 101.0)
    dropped = dare_drop(tensor, 0.25, 9)
    assert dropped.dare_seed == 9 and dropped.dare_density == 0.25
    assert torch.equal(dropped.indices, dare_indices(100, 0.25, 9))
    assert torch.equal(dropped.values, tensor[dropped.indices] / 0.25)
    assert torch.equal(dare_drop(tensor, 0.25, 9, rescale=False).values, tensor[dropped.indices])


def test_sparsify_update_with_dare_uses_one_seed_per_tensor() -> None:
    tau = {"a": torch.ones(50), "b": torch.ones(50)}
    seeds = dare_seed_fn(1, 2, 3)
    sent = sparsify_update(tau, Sparsifier("dare", 0.5), seeds)
    assert sent["a"].dare_seed == seeds("a") != sent["b"].dare_seed == seeds("b")
    with pytest.raises(ValueError, match="seed_for"):
        sparsify_update(tau, Sparsifier("dare", 0.5))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "topk"}, "unknown sparsifier"),
        ({"kind": "trim", "scope": "layer"}, "scope"),
        ({"kind": "dare", "seed_scope": "client"}, "seed scope"),
        ({"kind": "trim", "density": 1.1}, "density"),
        ({"kind": "dare", "density": 0.0}, "density > 0"),
    ],
)
def test_bad_sparsifiers_are_rejected(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        Sparsifier(**kwargs)


def test_the_none_sparsifier_sends_the_task_vector_as_it_is() -> None:
    tau = {"w": torch.randn(3)}
    assert sparsify_update(tau, Sparsifier())["w"] is tau["w"]


# --- seeds --------------------------------------------------------------------------------------


def test_derive_seed_is_the_documented_blake2b_of_the_four_parts() -> None:
    """The derivation is part of the wire contract: changing it changes every DARE mask, so payloads
    sent with seeds only would decode to other entries."""
    for run, rnd, node, name in [(0, 1, 2, "w"), (7, 3, None, "layer.0.weight"), (2**40, 10**6, "node-x", "a" * 300)]:
        scope = "round" if node is None else f"node={node}"
        text = f"fedfuse-dare|seed={run}|round={rnd}|{scope}|tensor={name}"
        expected = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & (2**63 - 1)
        assert derive_seed(run, rnd, node, name) == expected
        assert 0 <= expected < 2**63


def test_node_scope_gives_each_node_its_own_seed_and_round_scope_one_per_round() -> None:
    assert derive_seed(0, 1, 2, "w") != derive_seed(0, 1, 3, "w")
    assert derive_seed(0, 1, 2, "w") != derive_seed(0, 2, 2, "w")
    assert derive_seed(0, 1, 2, "w") != derive_seed(1, 1, 2, "w")
    assert derive_seed(0, 1, 2, "w") != derive_seed(0, 1, 2, "v")
    assert derive_seed(0, 1, None, "w") not in {derive_seed(0, 1, n, "w") for n in range(100)}
    node_a, node_b = dare_seed_fn(0, 1, "a", "round"), dare_seed_fn(0, 1, "b", "round")
    assert node_a("w") == node_b("w") == derive_seed(0, 1, None, "w")
    assert dare_seed_fn(0, 1, "a", "node")("w") != dare_seed_fn(0, 1, "b", "node")("w")
    assert dare_seed_fn(0, 1, "a", "round")("w") != dare_seed_fn(0, 2, "a", "round")("w")
