"""Split a labelled dataset over federated clients: Dirichlet label skew, or whole domains per client.

Both partitions return one sorted ``int64`` index array per client; every example goes to exactly
one client, and the result depends only on the labels and the arguments (seeded NumPy generator).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _as_labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _check_clients(num_clients: int, num_examples: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    if num_clients > num_examples:
        raise ValueError(f"cannot give {num_clients} clients at least one example each from {num_examples} examples")


def dirichlet_partition(
    labels: Sequence[int] | np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int = 0,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Label-skewed non-IID split: each class is divided over clients by proportions ~ Dir(α·1).

    Parameters
    ----------
    labels : sequence of int
        The label of every example.
    num_clients : int
        Number of clients.
    alpha : float
        Dirichlet concentration. Small α (0.05) gives each client few classes; large α (100) is
        close to an IID split.
    seed : int
        Seed of the ``numpy.random.default_rng`` that draws proportions and example order.
    min_size : int
        Every client ends with at least this many examples: clients left below it after the
        Dirichlet draw are topped up with random examples of the currently largest client.

    Returns
    -------
    list of numpy.ndarray
        ``num_clients`` sorted ``int64`` arrays of example indices, disjoint, covering all examples.
    """
    labels = _as_labels(labels)
    _check_clients(num_clients, labels.size)
    if not alpha > 0 or not np.isfinite(alpha):
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if min_size * num_clients > labels.size:
        raise ValueError(
            f"min_size={min_size} for {num_clients} clients needs {min_size * num_clients} examples, "
            f"only {labels.size} given"
        )
    rng = np.random.default_rng(seed)
    shares: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
        cuts = (np.cumsum(proportions)[:-1] * members.size).astype(np.int64)
        for client, part in enumerate(np.split(members, cuts)):
            shares[client].append(part)
    clients = [rng.permutation(np.concatenate(parts)) for parts in shares]
    _top_up(clients, min_size)
    return [np.sort(indices) for indices in clients]


def _top_up(clients: list[np.ndarray], min_size: int) -> None:
    """Move examples from the largest client to each client below ``min_size`` (in place)."""
    for client in range(len(clients)):
        while clients[client].size < min_size:
            donor = int(np.argmax([indices.size for indices in clients]))
            take = min(min_size - clients[client].size, clients[donor].size - min_size)
            clients[client] = np.concatenate([clients[client], clients[donor][:take]])
            clients[donor] = clients[donor][take:]


def domain_partition(labels: Sequence[int] | np.ndarray, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Whole domains per client, for expert-merging experiments.

    With at most as many clients as domains, the sorted domains are dealt round-robin (domain
    ``d`` goes to client ``d mod num_clients``), so each client owns one or a few domains entirely.
    With more clients than domains, client ``c`` gets domain ``c mod D`` and each domain's examples
    are shuffled (``seed``) and split evenly over the clients that share it: every client then sees
    exactly one domain.

    Returns
    -------
    list of numpy.ndarray
        ``num_clients`` sorted ``int64`` arrays of example indices, disjoint, covering all examples.
    """
    labels = _as_labels(labels)
    _check_clients(num_clients, labels.size)
    domains = np.unique(labels)
    rng = np.random.default_rng(seed)
    shares: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for position, domain in enumerate(domains):
        members = np.flatnonzero(labels == domain)
        if num_clients > domains.size:
            owners = list(range(position, num_clients, domains.size))
        else:
            owners = [position % num_clients]
        if members.size < len(owners):
            raise ValueError(
                f"domain {int(domain)} has {members.size} examples, fewer than the {len(owners)} clients sharing it"
            )
        for owner, part in zip(owners, np.array_split(rng.permutation(members), len(owners)), strict=False):
            shares[owner].append(part)
    return [np.sort(np.concatenate(parts)).astype(np.int64) for parts in shares]


def client_label_counts(
    labels: Sequence[int] | np.ndarray, partition: Sequence[np.ndarray], num_labels: int | None = None
) -> np.ndarray:
    """A (clients × labels) matrix of example counts, to inspect or report how skewed a split is."""
    labels = _as_labels(labels)
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be >= 0 to be counted, got {labels.min()}")
    width = (int(labels.max()) + 1 if labels.size else 0) if num_labels is None else num_labels
    rows = [np.bincount(labels[np.asarray(indices, dtype=np.int64)], minlength=width) for indices in partition]
    return np.stack(rows) if rows else np.zeros((0, width), dtype=np.int64)
