"""Client partitions: every example exactly once, seeded, Dirichlet skew grows as α shrinks, domains stay whole."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfuse.data import client_label_counts, dirichlet_partition, domain_partition

pytestmark = pytest.mark.unit

FAST = settings(max_examples=40, deadline=None)

label_arrays = st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=300).map(
    lambda values: np.array(values, dtype=np.int64)
)


def assert_exact_cover(parts: list[np.ndarray], num_examples: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0), "each client's indices are sorted and unique"
    everything = np.concatenate(parts)
    assert np.array_equal(np.sort(everything), np.arange(num_examples))


def skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label mix and the global one."""
    counts = client_label_counts(labels, parts).astype(float)
    global_mix = counts.sum(axis=0) / counts.sum()
    client_mix = counts / counts.sum(axis=1, keepdims=True)
    return float(0.5 * np.abs(client_mix - global_mix).sum(axis=1).mean())


# --- Dirichlet -----------------------------------------------------------------------------------


@FAST
@given(
    labels=label_arrays,
    num_clients=st.integers(min_value=1, max_value=12),
    alpha=st.floats(min_value=0.01, max_value=100.0),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    min_size=st.integers(min_value=0, max_value=5),
)
def test_dirichlet_assigns_every_example_exactly_once_and_respects_min_size(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int
) -> None:
    if num_clients > labels.size or min_size * num_clients > labels.size:
        with pytest.raises(ValueError):
            dirichlet_partition(labels, num_clients, alpha, seed=seed, min_size=min_size)
        return
    parts = dirichlet_partition(labels, num_clients, alpha, seed=seed, min_size=min_size)
    assert_exact_cover(parts, labels.size, num_clients)
    assert min(part.size for part in parts) >= min_size
    again = dirichlet_partition(labels, num_clients, alpha, seed=seed, min_size=min_size)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=False))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_smaller_alpha_gives_more_label_skew(seed: int) -> None:
    labels = np.repeat(np.arange(10), 100)
    skews = [skew(labels, dirichlet_partition(labels, 8, alpha, seed=seed)) for alpha in (0.05, 1.0, 1000.0)]
    assert skews[0] > skews[1] > skews[2]
    assert skews[0] > 0.5 and skews[2] < 0.1


def test_different_seeds_give_different_partitions() -> None:
    labels = np.repeat(np.arange(5), 40)
    first = dirichlet_partition(labels, 4, 0.5, seed=0)
    second = dirichlet_partition(labels, 4, 0.5, seed=1)
    assert any(not np.array_equal(a, b) for a, b in zip(first, second, strict=False))


def test_tiny_alpha_still_gives_every_client_min_size_examples() -> None:
    labels = np.repeat(np.arange(3), 50)
    parts = dirichlet_partition(labels, 10, 0.001, seed=3, min_size=10)
    assert_exact_cover(parts, labels.size, 10)
    assert min(part.size for part in parts) >= 10


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 0, "alpha": 1.0}, "num_clients"),
        ({"num_clients": 2.5, "alpha": 1.0}, "num_clients"),
        ({"num_clients": 2, "alpha": 0.0}, "alpha"),
        ({"num_clients": 2, "alpha": float("nan")}, "alpha"),
        ({"num_clients": 2, "alpha": 1.0, "min_size": -1}, "min_size"),
        ({"num_clients": 3, "alpha": 1.0, "min_size": 5}, "min_size=5"),
    ],
)
def test_dirichlet_refuses_bad_arguments_by_name(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dirichlet_partition(np.zeros(12, dtype=np.int64), seed=0, **kwargs)


@pytest.mark.parametrize(
    ("labels", "message"), [(np.zeros((2, 3), dtype=np.int64), "one-dimensional"), (np.array([0.5, 1.0]), "integers")]
)
def test_labels_must_be_a_flat_integer_array(labels: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dirichlet_partition(labels, 1, 1.0)
    with pytest.raises(ValueError, match=message):
        domain_partition(labels, 1)


# --- domains -------------------------------------------------------------------------------------


@FAST
@given(labels=label_arrays, num_clients=st.integers(min_value=1, max_value=20), seed=st.integers(0, 1000))
def test_domain_partition_keeps_domains_whole_or_gives_one_domain_per_client(
    labels: np.ndarray, num_clients: int, seed: int
) -> None:
    domains = np.unique(labels)
    sizes = np.bincount(labels)[domains]
    sharing = [len(range(position, num_clients, domains.size)) for position in range(domains.size)]
    if num_clients > labels.size or (num_clients > domains.size and np.any(sizes < sharing)):
        with pytest.raises(ValueError):
            domain_partition(labels, num_clients, seed=seed)
        return
    parts = domain_partition(labels, num_clients, seed=seed)
    assert_exact_cover(parts, labels.size, num_clients)
    owned = [set(np.unique(labels[part]).tolist()) for part in parts]
    if num_clients <= domains.size:
        for domain in domains:
            holders = [client for client, mine in enumerate(owned) if domain in mine]
            assert len(holders) == 1
        assert {len(mine) for mine in owned} <= {domains.size // num_clients, -(-domains.size // num_clients)}
    else:
        assert all(len(mine) == 1 for mine in owned)
        for domain in domains:
            sizes = [part.size for part, mine in zip(parts, owned, strict=False) if mine == {domain}]
            assert max(sizes) - min(sizes) <= 1
    again = domain_partition(labels, num_clients, seed=seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=False))


def test_domain_partition_deals_sorted_domains_round_robin() -> None:
    labels = np.array([3, 0, 1, 2, 3, 1, 0, 2, 4])
    parts = domain_partition(labels, 2)
    assert [sorted(set(labels[part].tolist())) for part in parts] == [[0, 2, 4], [1, 3]]


def test_domain_too_small_to_share_is_named() -> None:
    with pytest.raises(ValueError, match="domain 1 has 1 examples"):
        domain_partition(np.array([0, 0, 0, 0, 1]), 4)


def test_client_label_counts_is_a_clients_by_labels_matrix() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    counts = client_label_counts(labels, [np.array([0, 1]), np.array([2, 3, 4, 5])], num_labels=4)
    assert counts.tolist() == [[1, 1, 0, 0], [0, 1, 3, 0]]
    with pytest.raises(ValueError, match=">= 0"):
        client_label_counts(np.array([-1, 0]), [np.array([0, 1])])
