"""Hierarchical merging: reduce a tree of updates (institution → region → global) to one state.

Because ``combine`` is an element-wise sum of sufficient statistics, any grouping gives the flat
result up to float rounding. Children are folded one at a time, so memory is one state per level
of depth, never one per update.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedfuse.algebra.sparse import Update
from fedfuse.strategies.base import MergeState, MergeStrategy


@dataclass(frozen=True)
class TreeLeaf:
    """A leaf of a merge tree: one update with its weight and optional Fisher diagonal."""

    update: Update
    weight: float = 1.0
    fisher: Mapping[str, torch.Tensor] | None = None


MergeTree = TreeLeaf | MergeState | Sequence["MergeTree"]
"""A leaf (:class:`TreeLeaf` or an already-reduced partial :class:`MergeState`) or a list of subtrees."""


def reduce_tree(strategy: MergeStrategy, tree: MergeTree) -> MergeState:
    """The merge state of every leaf under ``tree``; a partial state leaf is folded as it is."""
    if isinstance(tree, TreeLeaf):
        return strategy.new_state().add(tree.update, tree.weight, tree.fisher)
    if isinstance(tree, MergeState):
        return strategy.new_state().combine(tree)
    state = strategy.new_state()
    for child in tree:
        state.combine(reduce_tree(strategy, child))
    return state
