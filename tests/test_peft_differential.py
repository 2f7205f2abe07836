"""Differential tests against PEFT ``merge_utils``: same inputs, same merged tensors (within 1e-6).

PEFT stacks every task tensor and prunes on the server; fedfuse prunes on each client and folds
sufficient statistics. The results must agree.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils import merge_utils

from fedfuse.algebra import dare_drop, dare_mask, derive_seed, ties_trim
from fedfuse.strategies import get_strategy

pytestmark = pytest.mark.unit

DIFF = settings(max_examples=20, deadline=None)
shapes = st.lists(st.integers(1, 8), min_size=1, max_size=2).map(tuple)
counts = st.integers(1, 5)
densities = st.sampled_from([0.1, 0.3, 0.5, 0.8])


def random_tensors(count: int, shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(count)]


def merge(name: str, updates, weights=None, **params) -> torch.Tensor:
    state = get_strategy(name, **params).new_state()
    for k, update in enumerate(updates):
        state.add({"w": update}, 1.0 if weights is None else float(weights[k]))
    return state.finalize()["w"]


def assert_equal_within_1e6(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@DIFF
@given(
    count=counts,
    shape=shapes,
    density=densities,
    seed=st.integers(0, 10**6),
    vote=st.sampled_from([("mass", "total"), ("count", "frequency")]),
)
def test_ties_with_client_side_trim_equals_peft_ties(count, shape, density, seed, vote) -> None:
    """Unit weights; our vote="mass" is PEFT majority "total", vote="count" is "frequency"."""
    ours_vote, peft_vote = vote
    tensors = random_tensors(count, shape, seed)
    ours = merge("ties", [ties_trim(t, density) for t in tensors], vote=ours_vote)
    theirs = merge_utils.ties(tensors, torch.ones(count), density, majority_sign_method=peft_vote)
    assert_equal_within_1e6(ours, theirs)


@DIFF
@given(count=counts, shape=shapes, seed=st.integers(0, 10**6), data=st.data())
def test_task_arithmetic_with_weights_equals_peft(count, shape, seed, data) -> None:
    tensors = random_tensors(count, shape, seed)
    weights = torch.tensor(data.draw(st.lists(st.floats(0.0, 3.0), min_size=count, max_size=count)))
    assert_equal_within_1e6(merge("task_arithmetic", tensors, weights), merge_utils.task_arithmetic(tensors, weights))


class ReplayBernoulli:
    """Stands in for ``torch.bernoulli`` inside PEFT: returns our seeded masks in order.

    It asserts PEFT asked for what DARE means — a probability tensor full of ``density`` — so the
    only thing replaced is where the random bits come from.
    """

    def __init__(self, masks: list[torch.Tensor], density: float) -> None:
        self.masks = list(masks)
        self.density = density

    def __call__(self, probabilities: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        assert not args and not kwargs
        assert torch.equal(probabilities, torch.full_like(probabilities, self.density))
        mask = self.masks.pop(0)
        assert mask.shape == probabilities.shape
        return mask.to(probabilities.dtype)


def dare_inputs(count: int, shape: tuple[int, ...], density: float, seed: int):
    tensors = random_tensors(count, shape, seed)
    seeds = [derive_seed(seed, 1, node, "w") for node in range(count)]
    masks = [dare_mask(shape, density, s) for s in seeds]
    return tensors, seeds, masks


@DIFF
@given(count=counts, shape=shapes, density=densities, seed=st.integers(0, 10**6), data=st.data())
def test_dare_linear_equals_peft_with_the_same_masks(count, shape, density, seed, data) -> None:
    tensors, seeds, masks = dare_inputs(count, shape, density, seed)
    weights = torch.tensor(data.draw(st.lists(st.floats(0.1, 3.0), min_size=count, max_size=count)))
    ours = merge("dare_linear", [dare_drop(t, density, s) for t, s in zip(tensors, seeds, strict=False)], weights)
    replay = ReplayBernoulli(masks, density)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "bernoulli", replay)
        theirs = merge_utils.dare_linear(tensors, weights, density)
    assert not replay.masks, "PEFT drew fewer masks than there are tensors"
    assert_equal_within_1e6(ours, theirs)


@DIFF
@given(
    count=counts,
    shape=shapes,
    density=densities,
    seed=st.integers(0, 10**6),
    vote=st.sampled_from([("mass", "total"), ("count", "frequency")]),
)
def test_dare_ties_equals_peft_with_the_same_masks(count, shape, density, seed, vote) -> None:
    ours_vote, peft_vote = vote
    tensors, seeds, masks = dare_inputs(count, shape, density, seed)
    ours = merge("dare_ties", [dare_drop(t, density, s) for t, s in zip(tensors, seeds, strict=False)], vote=ours_vote)
    replay = ReplayBernoulli(masks, density)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "bernoulli", replay)
        theirs = merge_utils.dare_ties(tensors, torch.ones(count), density, majority_sign_method=peft_vote)
    assert not replay.masks, "PEFT drew fewer masks than there are tensors"
    assert_equal_within_1e6(ours, theirs)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, density=densities, seed=st.integers(0, 2**63 - 1))
def test_each_dare_drop_equals_peft_random_pruning_after_manual_seed(shape, density, seed) -> None:
    tensor = random_tensors(1, shape, seed % 2**31)[0]
    torch.manual_seed(seed)
    theirs = merge_utils.random_pruning(tensor, density, rescale=True)
    assert torch.equal(dare_drop(tensor, density, seed).to_dense(), theirs)


def test_the_replayed_masks_are_the_ones_peft_would_draw_after_manual_seed() -> None:
    """Ties the monkeypatch back to PEFT's own randomness: seeding the global RNG before each prune
    reproduces every mask, so the replay changed only the source of the bits."""
    tensors, seeds, masks = dare_inputs(3, (6, 5), 0.3, 17)
    for tensor, seed, mask in zip(tensors, seeds, masks, strict=False):
        torch.manual_seed(seed)
        assert torch.equal(merge_utils.prune(tensor, 0.3, "random", rescale=True) != 0, mask)
