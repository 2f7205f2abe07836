"""Specification of the merge strategies: monoid laws, weights, precision, devices, errors, serialization."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import (
    CONFIG_IDS,
    STRATEGY_CONFIGS,
    assert_within,
    contributions,
    dense_equivalent,
    fold,
    make_strategy,
    output_scales,
    stat_scales,
    ties_vote_is_close,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

from fedfuse.algebra import SparseTensor, ties_trim
from fedfuse.strategies import MergeState, TreeLeaf, get_strategy

pytestmark = pytest.mark.unit

REL = 1e-6
PROPERTY = settings(max_examples=25, deadline=None)
configs = pytest.mark.parametrize("config", STRATEGY_CONFIGS, ids=CONFIG_IDS)


def assert_merged_close(strategy, items, got: dict, want: dict, what: str) -> None:
    """Finalized tensors agree within REL of their rounding scale, except where a TIES vote is a near-tie.

    A mass vote |P+N| within float rounding of 0 may elect either sign depending on summation
    order, so those entries are not compared (they are compared bit for bit on a dyadic grid in
    test_tiers.py). Count votes are exact integer sums and are always compared.
    """
    scales = output_scales(strategy, items)
    close_votes = ties_vote_is_close(strategy, items)
    assert got.keys() == want.keys()
    for name in want:
        assert_within(got[name], want[name], scales[name], REL, f"{what}, tensor {name!r}", skip=close_votes[name])


def assert_stats_close(strategy, items, got: MergeState, want: MergeState, what: str) -> None:
    """Summed statistics agree within REL of the sum of their terms' magnitudes."""
    scales = stat_scales(strategy, items)
    assert got.stats.keys() == want.stats.keys()
    for name, stats in want.stats.items():
        for stat, tensor in stats.items():
            assert_within(got.stats[name][stat], tensor, scales[name][stat], REL, f"{what}, {name}::{stat}")


# --- monoid laws ---------------------------------------------------------------------------------


@configs
@PROPERTY
@given(items=contributions())
def test_sparse_updates_merge_like_their_dense_equivalents(config, items) -> None:
    strategy = make_strategy(config)
    sparse = fold(strategy, items).finalize()
    dense = fold(strategy, [dense_equivalent(c) for c in items]).finalize()
    assert_merged_close(strategy, items, sparse, dense, "sparse vs dense")


@configs
@PROPERTY
@given(items=contributions(min_size=2, max_size=6), data=st.data())
def test_combine_is_commutative_bit_for_bit(config, items, data) -> None:
    cut = data.draw(st.integers(1, len(items) - 1))
    strategy = make_strategy(config)
    ab = fold(strategy, items[:cut]).combine(fold(strategy, items[cut:]))
    ba = fold(strategy, items[cut:]).combine(fold(strategy, items[:cut]))
    for name in ab.stats:
        for stat in ab.stats[name]:
            assert torch.equal(ab.stats[name][stat], ba.stats[name][stat])
    assert ab.total_weight == ba.total_weight and ab.num_updates == ba.num_updates


@configs
@PROPERTY
@given(items=contributions(min_size=3, max_size=6), data=st.data())
def test_combine_is_associative(config, items, data) -> None:
    i = data.draw(st.integers(1, len(items) - 2))
    j = data.draw(st.integers(i + 1, len(items) - 1))
    strategy = make_strategy(config)

    def part(lo, hi):
        return fold(strategy, items[lo:hi])

    left = part(0, i).combine(part(i, j)).combine(part(j, None))
    right = part(0, i).combine(part(i, j).combine(part(j, None)))
    assert_stats_close(strategy, items, left, right, "(a·b)·c vs a·(b·c)")
    assert_merged_close(strategy, items, left.finalize(), right.finalize(), "(a·b)·c vs a·(b·c)")


@configs
@PROPERTY
@given(items=contributions())
def test_the_empty_state_is_the_identity_of_combine(config, items) -> None:
    strategy = make_strategy(config)
    reference = fold(strategy, items)
    for state in (
        strategy.new_state().combine(fold(strategy, items)),
        fold(strategy, items).combine(strategy.new_state()),
    ):
        assert state.total_weight == reference.total_weight and state.num_updates == reference.num_updates
        for name in reference.stats:
            for stat, tensor in reference.stats[name].items():
                assert torch.equal(state.stats[name][stat], tensor)


@configs
@PROPERTY
@given(items=contributions(min_size=2, max_size=5), order=st.randoms(use_true_random=False))
def test_the_order_of_add_does_not_matter(config, items, order) -> None:
    shuffled = list(items)
    order.shuffle(shuffled)
    strategy = make_strategy(config)
    assert_merged_close(
        strategy, items, fold(strategy, shuffled).finalize(), fold(strategy, items).finalize(), "shuffled adds"
    )


@configs
def test_strategy_combine_folds_the_second_state_into_the_first(config) -> None:
    strategy = make_strategy(config)
    update = {"w": torch.tensor([1.0, -2.0])}
    fisher = {"w": torch.ones(2)}
    a = strategy.new_state().add(update, 1.0, fisher)
    b = strategy.new_state().add(update, 1.0, fisher)
    assert strategy.combine(a, b) is a
    assert a.num_updates == 2 and b.num_updates == 1


# --- weights and the reference formulas (fp64, so the comparison is tight) ----------------------


def dense_stack(items):
    """Per tensor: stacked dense τ_k, weights w_k and Fisher F_k (Fisher zero off each update's support)."""
    dense = [dense_equivalent(c) for c in items]
    names = dense[0].update.keys()
    taus = {n: torch.stack([c.update[n].double() for c in dense]) for n in names}
    fishers = {n: torch.stack([c.fisher[n].double() for c in dense]) for n in names}
    weights = torch.tensor([c.weight for c in dense], dtype=torch.float64)
    return taus, fishers, weights


def expand(weights, like):
    return weights.reshape((-1,) + (1,) * (like.dim() - 1))


def mergekit_ties(tau, weights, vote, normalize=True):
    """mergekit ``ties``: weighted deltas, sign vote ("sum" of weighted deltas or "count"), ÷ agreeing weight."""
    w = expand(weights, tau)
    weighted = tau * w
    score = weighted.sum(0) if vote == "mass" else tau.sign().sum(0)
    elected = torch.where(score >= 0, 1.0, -1.0).to(tau)
    agree = tau.sign() == elected
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    return (weighted * agree).sum(0) / (divisor if normalize else 1)


def mergekit_model_stock(tau, weights, filter_wise):
    """mergekit ``model_stock`` on task vectors: t·(weighted mean), t from the mean pairwise cosine."""
    rows = tau.reshape(tau.shape[0], -1, tau.shape[-1] if filter_wise and tau.dim() > 1 else tau[0].numel())
    count = tau.shape[0]
    mean = (expand(weights, tau) * tau).sum(0) / weights.sum()
    if count == 1:
        return mean
    norms = rows.norm(dim=-1)
    cosines = [
        torch.where(norms[i] * norms[j] > 0, (rows[i] * rows[j]).sum(-1) / (norms[i] * norms[j]), 0.0)
        for i in range(count)
        for j in range(i + 1, count)
    ]
    c = torch.stack(cosines).mean(0)
    denominator = 1 + (count - 1) * c
    t = torch.where(denominator > 1e-12, count * c / denominator, 0.0)
    return (mean.reshape(rows.shape[1:]) * t.unsqueeze(-1)).reshape(mean.shape)


def reference(name, params, items, lam):
    taus, fishers, weights = dense_stack(items)
    out = {}
    for n, tau in taus.items():
        w = expand(weights, tau)
        if name in ("fedavg", "linear") or (name == "task_arithmetic" and params.get("normalize")):
            merged = (w * tau).sum(0) / weights.sum()
        elif name in ("task_arithmetic", "dare_linear"):
            merged = (w * tau).sum(0)
        elif name == "fisher":
            wf = w * fishers[n]
            merged = (wf * tau).sum(0) / wf.sum(0).clamp_min(1e-12)
        elif name == "model_stock":
            merged = mergekit_model_stock(tau, weights, params.get("filter_wise", False))
        else:
            merged = mergekit_ties(tau, weights, params.get("vote", "mass"), params.get("normalize", True))
        out[n] = lam * merged
    return out


@configs
@settings(max_examples=25, deadline=None)
@given(items=contributions(), lam=st.sampled_from([1.0, 0.5, 1.7]))
def test_weighted_merges_follow_the_reference_formulas_in_fp64(config, items, lam) -> None:
    """FedAvg = weighted mean; task arithmetic = λΣwτ; Fisher = ΣwFτ/ΣwF; TIES = mergekit (weighted vote)."""
    name, params = config
    strategy = make_strategy(config, lam=lam, dtype="float64")
    got = fold(strategy, items).finalize()
    want = reference(name, params, items, lam)
    for n in want:
        assert got[n].dtype == torch.float64
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12)


def test_fedavg_is_the_weighted_mean() -> None:
    a, b = torch.tensor([1.0, 4.0]), torch.tensor([3.0, -2.0])
    merged = get_strategy("fedavg").new_state().add({"w": a}, 1.0).add({"w": b}, 3.0).finalize()["w"]
    assert torch.equal(merged, (a + 3 * b) / 4)


def test_ties_with_weights_votes_by_weighted_mass_and_divides_by_agreeing_weight() -> None:
    """Entry 0: +1 (w=1) vs −0.5 (w=3): weighted mass 1 − 1.5 < 0 elects −, result −0.5·3/3.
    Entry 1: +2 (w=1), +4 (w=3), −1 (w=3): + elected, (2 + 12)/(1 + 3)."""
    strategy = get_strategy("ties")
    state = strategy.new_state()
    state.add({"w": torch.tensor([1.0, 2.0])}, 1.0)
    state.add({"w": torch.tensor([-0.5, 4.0])}, 3.0)
    state.add({"w": torch.tensor([0.0, -1.0])}, 3.0)
    assert torch.equal(state.finalize()["w"], torch.tensor([-0.5, 14.0 / 4.0]))


def test_ties_count_vote_elects_the_sign_most_updates_have() -> None:
    """Two small positives outvote one large negative by count, but not by mass."""
    updates = [torch.tensor([0.1]), torch.tensor([0.2]), torch.tensor([-5.0])]
    results = {}
    for vote in ("count", "mass"):
        state = get_strategy("ties", vote=vote).new_state()
        for u in updates:
            state.add({"w": u})
        results[vote] = state.finalize()["w"]
    torch.testing.assert_close(results["count"], torch.tensor([0.15]))
    assert torch.equal(results["mass"], torch.tensor([-5.0]))


@pytest.mark.parametrize("vote", ["mass", "count"])
def test_a_ties_tie_elects_plus(vote) -> None:
    state = get_strategy("ties", vote=vote).new_state()
    state.add({"w": torch.tensor([2.0, 0.0])}).add({"w": torch.tensor([-2.0, 0.0])})
    assert torch.equal(state.finalize()["w"], torch.tensor([2.0, 0.0]))


@pytest.mark.parametrize(
    "config",
    [c for c in STRATEGY_CONFIGS if c[1].get("vote") != "count" and c[0] != "model_stock"],
    ids=[
        i
        for c, i in zip(STRATEGY_CONFIGS, CONFIG_IDS, strict=True)
        if c[1].get("vote") != "count" and c[0] != "model_stock"
    ],
)
def test_an_update_with_weight_zero_changes_nothing(config) -> None:
    """(A count vote and model stock's angle count updates, not weights: they are left out.)"""
    strategy = make_strategy(config)
    base = [TreeLeaf({"w": torch.tensor([1.0, -2.0, 0.5])}, 1.0, {"w": torch.ones(3)})]
    extra = TreeLeaf({"w": torch.tensor([-9.0, 9.0, 9.0])}, 0.0, {"w": torch.ones(3)})
    assert torch.equal(fold(strategy, [*base, extra]).finalize()["w"], fold(strategy, base).finalize()["w"])


@configs
@settings(max_examples=15, deadline=None)
@given(items=contributions())
def test_doubling_every_weight_doubles_the_statistics_exactly(config, items) -> None:
    """Weights are linear in every weighted statistic: FedAvg/Fisher/TIES results are unchanged, sums double.

    The count vote C and model stock's unit-vector sums U, Q count updates, not weights.
    """
    strategy = make_strategy(config)
    doubled = [TreeLeaf(c.update, 2 * c.weight, c.fisher) for c in items]
    one, two = fold(strategy, items), fold(strategy, doubled)
    for name in one.stats:
        for stat in one.stats[name]:
            factor = 1.0 if stat in ("C", "U", "Q") else 2.0
            assert torch.equal(two.stats[name][stat], factor * one.stats[name][stat])
    sums = config[0] in ("task_arithmetic", "dare_linear") and not config[1].get("normalize")
    factor = 2.0 if sums or config[1].get("normalize") is False else 1.0
    for name, tensor in one.finalize().items():
        assert torch.equal(two.finalize()[name], factor * tensor)


@configs
def test_lambda_scales_the_merged_task_vector(config) -> None:
    update = {"w": torch.tensor([0.3, -1.2, 2.0])}
    fisher = {"w": torch.tensor([1.0, 0.5, 2.0])}
    plain = make_strategy(config).new_state().add(update, 1.0, fisher).finalize()["w"]
    scaled = make_strategy(config, lam=-0.7).new_state().add(update, 1.0, fisher).finalize()["w"]
    assert torch.equal(scaled, plain * -0.7)


# --- precision, dtypes and devices --------------------------------------------------------------


def test_float64_accumulation_keeps_what_float32_loses() -> None:
    updates = [torch.tensor([1e8]), torch.tensor([1.0]), torch.tensor([-1e8])]
    results = {}
    for dtype in ("float32", "float64"):
        state = get_strategy("task_arithmetic", dtype=dtype).new_state()
        for u in updates:
            state.add({"w": u.to(torch.float64)})
        results[dtype] = state.finalize()["w"]
    assert results["float64"].dtype == torch.float64 and results["float64"].item() == 1.0
    assert results["float32"].dtype == torch.float32 and results["float32"].item() == 0.0


@configs
def test_bf16_and_fp16_updates_are_accumulated_in_fp32(config) -> None:
    """300 updates of 1.0: a bf16 accumulator would stop at 256 (8-bit mantissa)."""
    strategy = make_strategy(config)
    state = strategy.new_state()
    for i in range(300):
        dtype = torch.bfloat16 if i % 2 else torch.float16
        state.add({"w": torch.ones(2, dtype=dtype)}, 1.0, {"w": torch.ones(2, dtype=dtype)})
    assert all(t.dtype == torch.float32 for t in state.stats["w"].values())
    sums = config[0] in ("task_arithmetic", "dare_linear") and not config[1].get("normalize")
    expected = 300.0 if sums or config[1].get("normalize") is False else 1.0
    assert torch.equal(state.finalize()["w"], torch.full((2,), expected))
    sparse = strategy.new_state().add(
        {"w": SparseTensor(torch.tensor([1]), torch.tensor([0.5], dtype=torch.bfloat16), (2,))},
        1.0,
        {"w": torch.ones(2)},
    )
    assert sparse.finalize()["w"].dtype == torch.float32


def test_auto_device_is_cuda_when_present_else_cpu() -> None:
    strategy = get_strategy("fedavg", device="auto")
    assert strategy.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    state = strategy.new_state().add({"w": torch.ones(3)})
    assert state.stats["w"]["S"].device.type == strategy.device.type
    assert state.finalize()["w"].device.type == strategy.device.type


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_asking_for_cuda_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="cuda"):
        get_strategy("ties", device="cuda")


def test_unsupported_accumulation_dtype_is_rejected() -> None:
    with pytest.raises(ValueError, match="dtype"):
        get_strategy("fedavg", dtype="float16")


# --- clear errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [-1.0, math.nan, math.inf])
def test_bad_weights_are_rejected(weight) -> None:
    with pytest.raises(ValueError, match="weight"):
        get_strategy("fedavg").new_state().add({"w": torch.ones(2)}, weight)


def test_shape_mismatch_between_updates_names_the_tensor() -> None:
    state = get_strategy("ties").new_state().add({"layer.weight": torch.ones(2, 3)})
    with pytest.raises(ValueError, match=r"layer\.weight.*\(3, 2\)"):
        state.add({"layer.weight": torch.ones(3, 2)})


def test_a_rejected_update_leaves_the_state_unchanged() -> None:
    """The server records a rejection and goes on, so a failed add must not leave half an update behind."""
    state = get_strategy("fedavg").new_state().add({"a": torch.ones(2), "b": torch.ones(3)})
    with pytest.raises(ValueError, match="'b'"):
        state.add({"a": torch.full((2,), 5.0), "b": torch.ones(4)})
    assert state.num_updates == 1 and state.total_weight == 1.0
    assert torch.equal(state.finalize()["a"], torch.ones(2))


def test_fisher_strategy_needs_the_fisher_diagonal() -> None:
    state = get_strategy("fisher").new_state()
    with pytest.raises(ValueError, match="Fisher"):
        state.add({"w": torch.ones(2)})
    with pytest.raises(ValueError, match=r"'v'.*Fisher"):
        state.add({"w": torch.ones(2), "v": torch.ones(2)}, fisher={"w": torch.ones(2)})


def test_fisher_errors_name_the_tensor() -> None:
    state = get_strategy("fisher").new_state()
    with pytest.raises(ValueError, match=r"'w'.*negative"):
        state.add({"w": torch.ones(2)}, fisher={"w": torch.tensor([1.0, -1.0])})
    with pytest.raises(ValueError, match=r"'w'.*Fisher shape"):
        state.add({"w": torch.ones(2)}, fisher={"w": torch.ones(3)})
    with pytest.raises(ValueError, match="lacks"):
        state.add({"w": torch.ones(2)}, fisher={"w": torch.ones(2), "x": torch.ones(1)})


def test_sparse_fisher_must_share_the_update_support() -> None:
    update = {"w": ties_trim(torch.tensor([3.0, -1.0, 2.0, 0.5]), 0.5)}
    good = {"w": SparseTensor(update["w"].indices, torch.tensor([1.0, 2.0]), (4,))}
    bad = {"w": SparseTensor(torch.tensor([1, 3]), torch.tensor([1.0, 2.0]), (4,))}
    state = get_strategy("fisher").new_state().add(update, 1.0, good)
    torch.testing.assert_close(state.finalize()["w"], torch.tensor([3.0, 0.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match=r"'w'.*indices"):
        state.add(update, 1.0, bad)


def test_integer_updates_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"'ids'.*floating"):
        get_strategy("fedavg").new_state().add({"ids": torch.arange(3)})


@pytest.mark.parametrize(
    "a, b",
    [
        (("fedavg", {}), ("task_arithmetic", {})),
        (("ties", {"vote": "mass"}), ("ties", {"vote": "count"})),
        (("ties", {"lam": 1.0}), ("ties", {"lam": 0.5})),
        (("fisher", {"eps": 1e-12}), ("fisher", {"eps": 1e-6})),
        (("fedavg", {"dtype": "float32"}), ("fedavg", {"dtype": "float64"})),
    ],
)
def test_states_of_different_strategies_do_not_combine(a, b) -> None:
    sa, sb = get_strategy(a[0], **a[1]), get_strategy(b[0], **b[1])
    with pytest.raises(ValueError, match="different strategies"):
        sa.combine(sa.new_state(), sb.new_state())


def test_finalizing_an_empty_state_is_an_error() -> None:
    with pytest.raises(ValueError, match="no updates"):
        get_strategy("ties").new_state().finalize()


def test_fedavg_with_only_zero_weights_is_an_error() -> None:
    with pytest.raises(ValueError, match="weight"):
        get_strategy("fedavg").new_state().add({"w": torch.ones(2)}, 0.0).finalize()


@pytest.mark.parametrize("bad", [{"lam": math.nan}, {"vote": "median"}, {"eps": 0.0}])
def test_bad_strategy_parameters_are_rejected(bad) -> None:
    name = "fisher" if "eps" in bad else "ties"
    with pytest.raises(ValueError, match=next(iter(bad))):
        get_strategy(name, **bad)


# --- serialization and memory -------------------------------------------------------------------


@configs
@PROPERTY
@given(items=contributions())
def test_a_partial_state_round_trips_through_tensors_and_metadata(config, items) -> None:
    strategy = make_strategy(config, lam=0.8)
    state = fold(strategy, items)
    payload = save(state.to_tensors(), metadata=state.metadata())
    header_length = int.from_bytes(payload[:8], "little")
    metadata = json.loads(payload[8 : 8 + header_length])["__metadata__"]
    restored = MergeState.from_tensors(make_strategy(config, lam=0.8), load(payload), metadata)
    assert restored.total_weight == state.total_weight and restored.num_updates == state.num_updates
    assert restored.shapes == state.shapes
    for name, tensor in state.finalize().items():
        assert torch.equal(restored.finalize()[name], tensor)


def test_a_restored_state_keeps_folding() -> None:
    strategy = get_strategy("ties")
    first = strategy.new_state().add({"w": torch.tensor([1.0, -2.0])})
    restored = MergeState.from_tensors(strategy, first.to_tensors(), first.metadata())
    restored.add({"w": torch.tensor([3.0, -4.0])}, 3.0)
    flat = strategy.new_state().add({"w": torch.tensor([1.0, -2.0])}).add({"w": torch.tensor([3.0, -4.0])}, 3.0)
    assert torch.equal(restored.finalize()["w"], flat.finalize()["w"])


def test_partial_states_are_checked_when_restored() -> None:
    ties = get_strategy("ties")
    state = ties.new_state().add({"w": torch.ones(2)})
    tensors, metadata = state.to_tensors(), state.metadata()
    with pytest.raises(ValueError, match="made by"):
        MergeState.from_tensors(get_strategy("ties", vote="count"), tensors, metadata)
    with pytest.raises(ValueError, match="lacks statistics"):
        MergeState.from_tensors(ties, {k: v for k, v in tensors.items() if not k.endswith("::Wn")}, metadata)
    with pytest.raises(ValueError, match="unexpected tensor"):
        MergeState.from_tensors(ties, {**tensors, "w::Q": torch.ones(2)}, metadata)
    with pytest.raises(ValueError, match="metadata"):
        MergeState.from_tensors(ties, tensors, {"total_weight": "1.0"})


@configs
def test_state_memory_does_not_grow_with_the_number_of_updates(config) -> None:
    strategy = make_strategy(config)
    shapes = {"w": (64, 32), "b": (32,)}
    params = sum(math.prod(s) for s in shapes.values())

    def nbytes(state):
        return sum(t.numel() * t.element_size() for stats in state.stats.values() for t in stats.values())

    state = strategy.new_state()
    sizes = []
    for k in range(50):
        gen = torch.Generator().manual_seed(k)
        update = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
        if k % 2:
            update = {n: ties_trim(t, 0.3) for n, t in update.items()}
        state.add(update, 1.0 + k % 3, {n: torch.rand(s, generator=gen) for n, s in shapes.items()})
        sizes.append(nbytes(state))
    assert sizes[0] == sizes[-1] == max(sizes)
    assert sizes[-1] <= 5 * params * 4


def test_a_rejected_combine_leaves_the_state_unchanged() -> None:
    strategy = get_strategy("ties")
    state = strategy.new_state().add({"a": torch.ones(2), "b": torch.ones(3)})
    other = strategy.new_state().add({"a": torch.full((2,), -5.0), "b": torch.ones(4)})
    with pytest.raises(ValueError, match="'b'"):
        state.combine(other)
    assert state.num_updates == 1 and torch.equal(state.finalize()["a"], torch.ones(2))


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("fedavg", {}),
        ("task_arithmetic", {}),
        ("ties", {}),
        ("ties", {"vote": "count"}),
        ("ties", {"normalize": False}),
        ("dare_ties", {}),
        ("model_stock", {}),
    ],
    ids=lambda value: value if isinstance(value, str) else "-".join(f"{k}={v}" for k, v in value.items()),
)
def test_finalize_with_release_gives_the_same_result_and_spends_the_state(name: str, params: dict) -> None:
    """A server finalizes once at round end: releasing frees statistics as results appear.

    With release a method may overwrite its statistics (TIES does); without, they must stay intact.
    """
    generator = torch.Generator().manual_seed(3)
    updates = [
        {"a": torch.randn(5, 4, generator=generator), "b": torch.randn(7, generator=generator)} for _ in range(3)
    ]
    kept, spent = get_strategy(name, lam=0.5, **params).new_state(), get_strategy(name, lam=0.5, **params).new_state()
    for update in updates:
        kept.add(update, weight=2.0)
        spent.add(update, weight=2.0)
    expected = kept.finalize()
    released = spent.finalize(release=True)
    for tensor_name in expected:
        assert torch.equal(released[tensor_name], expected[tensor_name])
    assert spent.stats == {}
    for use in (lambda: spent.add(updates[0]), lambda: spent.finalize(), lambda: kept.combine(spent), spent.to_tensors):
        with pytest.raises(ValueError, match="spent by finalize"):
            use()
    again = kept.finalize()
    assert all(torch.equal(again[tensor_name], expected[tensor_name]) for tensor_name in expected)
