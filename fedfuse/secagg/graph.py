"""The sparse k-regular neighbour graph of SecAgg+ (Bell et al. 2020): masks and shares only between neighbours.

A Harary graph on a seeded permutation: every node masks with and shares its secrets among `degree`
neighbours instead of all n − 1 nodes, so the protocol's cost grows with log n, not n.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

COMPLETE_UP_TO = 8
"""Up to this many nodes the graph is complete."""


def neighbours(nodes: Sequence[int], degree: int, seed: int) -> dict[int, tuple[int, ...]]:
    """Each node's sorted neighbours in a `degree`-regular symmetric graph (complete when degree >= n − 1)."""
    ordered = _check_nodes(nodes)
    n = len(ordered)
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"secagg graph degree must be an int >= 1, got {degree!r}")
    if degree >= n - 1:
        return {node: tuple(other for other in ordered if other != node) for node in ordered}
    if degree % 2:
        raise ValueError(f"secagg graph degree must be even below n - 1 = {n - 1}, got {degree}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"secagg graph seed must be an int >= 0, got {seed!r}")
    permutation = np.random.default_rng([seed]).permutation(n)
    ring = [ordered[int(index)] for index in permutation]  # Python ints: node ids may exceed 2**53
    linked: dict[int, set[int]] = {node: set() for node in ordered}
    for position, node in enumerate(ring):
        for step in range(1, degree // 2 + 1):
            other = ring[(position + step) % n]
            linked[node].add(other)
            linked[other].add(node)
    return {node: tuple(sorted(linked[node])) for node in ordered}


def default_degree(num_nodes: int) -> int:
    """O(log n) neighbours: n − 1 up to 8 nodes, else 2⌈log₂ n⌉ + 2 (even), capped at n − 1 (complete)."""
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 2:
        raise ValueError(f"secagg needs at least 2 nodes, got {num_nodes!r}")
    if num_nodes <= COMPLETE_UP_TO:
        return num_nodes - 1
    return min(2 * (num_nodes - 1).bit_length() + 2, num_nodes - 1)


def default_threshold(degree: int) -> int:
    """floor(degree / 2) + 1: a strict majority of a node's neighbours must return shares."""
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"secagg graph degree must be an int >= 1, got {degree!r}")
    return degree // 2 + 1


def _check_nodes(nodes: Sequence[int]) -> list[int]:
    """The nodes sorted (so every party derives the same graph from the same set), refusing < 2 or repeats."""
    ordered = sorted(int(node) for node in nodes)
    if len(ordered) < 2:
        raise ValueError(f"secagg needs at least 2 nodes for a neighbour graph, got {len(ordered)}")
    if len(set(ordered)) != len(ordered):
        raise ValueError("secagg graph nodes must be distinct")
    return ordered
