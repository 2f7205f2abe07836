"""Specification of hierarchical merging: any tree of partial states gives the flat result."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import (
    CONFIG_IDS,
    STRATEGY_CONFIGS,
    assert_within,
    contributions,
    fold,
    make_strategy,
    output_scales,
    stat_scales,
    ties_vote_is_close,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfuse.strategies import MergeState, TreeLeaf, get_strategy, reduce_tree

pytestmark = pytest.mark.unit

REL = 1e-6
configs = pytest.mark.parametrize("config", STRATEGY_CONFIGS, ids=CONFIG_IDS)


@st.composite
def trees(draw: st.DrawFn, dyadic: bool = False):
    """(leaves in order, a tree of depth 1–4 over them) with random fan-out.

    A leaf group is either a list of contributions or a partial state already reduced from them,
    sometimes serialized and restored as a gateway in another process would send it.
    """
    items = draw(contributions(min_size=1, max_size=8, dyadic=dyadic))
    depth = draw(st.integers(1, 4))

    def build(group: list[TreeLeaf], level: int):
        if level == depth or len(group) == 1:
            form = draw(st.sampled_from(["contributions", "state", "restored"]))
            if form == "contributions" or level == 0:
                return list(group)
            return ("partial", form, group)
        cuts = sorted(draw(st.sets(st.integers(1, len(group) - 1), max_size=3)))
        bounds = [0, *cuts, len(group)]
        return [build(group[a:b], level + 1) for a, b in itertools.pairwise(bounds)]

    return items, build(items, 0)


def materialize(strategy, node):
    """Turn the drawn tree description into a MergeTree for ``strategy``."""
    if isinstance(node, tuple):
        _, form, group = node
        state = fold(strategy, group)
        if form == "restored":
            state = MergeState.from_tensors(strategy, state.to_tensors(), state.metadata())
        return state
    return [materialize(strategy, child) if not isinstance(child, TreeLeaf) else child for child in node]


@configs
@settings(max_examples=30, deadline=None)
@given(drawn=trees())
def test_any_tree_gives_the_flat_result_within_float_rounding(config, drawn) -> None:
    """Statistics agree within 1e-6 of the summed magnitudes of their terms; merged tensors within 1e-6 of
    their scale, except TIES entries whose mass vote |P+N| is within 1e-5·(P−N) of zero: there the
    summation order alone may flip the elected sign, so the result legitimately differs (those
    entries are bit-identical on a dyadic grid, see the next test). Count votes are exact integer
    sums and are always compared."""
    items, shape = drawn
    strategy = make_strategy(config)
    tree = reduce_tree(strategy, materialize(strategy, shape))
    flat = fold(strategy, items)
    assert tree.num_updates == flat.num_updates == len(items)
    assert math.isclose(tree.total_weight, flat.total_weight, rel_tol=1e-12)
    scales = stat_scales(strategy, items)
    for name, stats in flat.stats.items():
        for stat, tensor in stats.items():
            assert_within(tree.stats[name][stat], tensor, scales[name][stat], REL, f"{name}::{stat}")
    out_scales = output_scales(strategy, items)
    close_votes = ties_vote_is_close(strategy, items)
    tree_out, flat_out = tree.finalize(), flat.finalize()
    for name, tensor in flat_out.items():
        assert tree_out[name].dtype == torch.float32
        assert_within(tree_out[name], tensor, out_scales[name], REL, f"merged {name}", skip=close_votes[name])


@pytest.mark.parametrize(
    "config",
    [c for c in STRATEGY_CONFIGS if c[0] != "model_stock"],
    ids=[i for c, i in zip(STRATEGY_CONFIGS, CONFIG_IDS, strict=True) if c[0] != "model_stock"],
)
@settings(max_examples=20, deadline=None)
@given(drawn=trees(dyadic=True))
def test_on_a_dyadic_grid_tree_and_flat_results_are_bit_identical(config, drawn) -> None:
    """Values k/8, weights and Fisher entries powers of two, DARE densities 1/4, 1/2, 1: every partial sum
    is exactly representable, so the grouping cannot change a single bit. (Model stock sums unit
    vectors, which leave the grid: it is covered within rounding by the test above.)"""
    items, shape = drawn
    strategy = make_strategy(config)
    tree = reduce_tree(strategy, materialize(strategy, shape))
    flat = fold(strategy, items)
    for name, stats in flat.stats.items():
        for stat, tensor in stats.items():
            assert torch.equal(tree.stats[name][stat], tensor), f"{name}::{stat}"
    tree_out = tree.finalize()
    for name, tensor in flat.finalize().items():
        assert torch.equal(tree_out[name], tensor), name


def test_a_contribution_leaf_and_a_nested_list_reduce_like_adds() -> None:
    strategy = get_strategy("ties")
    a = TreeLeaf({"w": torch.tensor([1.0, -3.0])}, 2.0)
    b = TreeLeaf({"w": torch.tensor([-1.0, 1.0])}, 1.0)
    tree = reduce_tree(strategy, [[a], [[b]]])
    assert torch.equal(tree.finalize()["w"], fold(strategy, [a, b]).finalize()["w"])
    assert reduce_tree(strategy, a).num_updates == 1


def test_reducing_a_partial_state_leaf_does_not_modify_it() -> None:
    strategy = get_strategy("fedavg")
    partial = fold(strategy, [TreeLeaf({"w": torch.ones(2)})])
    before = partial.stats["w"]["S"].clone()
    reduce_tree(strategy, [partial, TreeLeaf({"w": torch.ones(2)})])
    assert torch.equal(partial.stats["w"]["S"], before) and partial.num_updates == 1


def test_an_empty_tree_reduces_to_the_empty_state() -> None:
    state = reduce_tree(get_strategy("fedavg"), [[], []])
    assert state.num_updates == 0 and not state.stats
