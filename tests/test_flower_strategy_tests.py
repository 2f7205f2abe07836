"""Flower's own new-API strategy unit tests, re-expressed for fedfuse's ``FedMerge`` (issue 25, deliverable 2).

Sources: adap/flower ``framework/py/flwr/serverapp/strategy/``: ``fedmedian_test.py``, ``fedtrimmedavg_test.py``,
``krum_test.py``, ``multikrum_test.py``, ``fedavgm_test.py``, ``fedopt_test.py`` and the ``aggregate_arrayrecords``
/ ``aggregate_metricrecords`` tests of ``strategy_utils_test.py`` (applied to ``FedMerge("fedavg")`` with
``weighted_by_key="weight"``). Replies are mocks built as Flower's tests build them, and ``aggregate_train`` is
called without ``configure_train``, as those tests (and custom ServerApp loops) do; the assertions are Flower's.
Flower's constructor names are those of flwr 1.41 (``Krum(num_malicious_nodes)``, ``MultiKrum(...,
num_nodes_to_select)``, ``FedTrimmedAvg(beta)``, ``FedAvgM(server_learning_rate, server_momentum)``).
Not re-expressed: ``bulyan_test.py`` (fedfuse has no Bulyan), ``config_to_str`` and the reply-consistency checks.

Then, for each Flower strategy fedfuse has, a differential test: Flower's own class and ``FedMerge`` under the
same (Flower) argument names on the same random mock replies, float32 and float64, 2–5 replies, several rounds
for the server optimizers. Last, the contract's refusals (a method that needs the round's weights, without
them) and precision (arrays are merged in their own dtype).
"""

from __future__ import annotations

from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedTrimmedAvg, FedYogi, Krum, MultiKrum

from fedfuse.flower import FedMerge

pytestmark = pytest.mark.unit


def mock_reply(arrays: ArrayRecord, num_examples: float, *, key: str = "num-examples", **metrics: object) -> Message:
    """A training reply as Flower's strategy tests build one: a ``Mock(spec=Message)`` with arrays and metrics."""
    reply = Mock(spec=Message)
    reply.content = RecordDict({"arrays": arrays, "metrics": MetricRecord({**metrics, key: num_examples})})
    reply.has_error.return_value = False
    reply.has_content.return_value = True
    return reply


# --- fedmedian_test.py ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["median", "fedmedian"])
def test_fedmedian_takes_the_coordinate_median(name: str) -> None:
    strategy = FedMerge(name)
    replies = [
        mock_reply(ArrayRecord([np.array([1.0, 0.2, 0.5, 1.0])]), 5),
        mock_reply(ArrayRecord([np.array([0.2, 0.5, 1.0, 0.2])]), 2),
        mock_reply(ArrayRecord([np.array([0.5, 1.0, 0.2, 0.5])]), 9),
    ]
    actual, _ = strategy.aggregate_train(1, replies)
    assert actual
    np.testing.assert_equal(actual.to_numpy_ndarrays()[0], np.array([0.5, 0.5, 0.5, 0.5]))


# --- fedtrimmedavg_test.py ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["trimmed_mean", "fedtrimmedavg"])
def test_fedtrimmedavg_with_beta_a_quarter_drops_one_reply_at_each_end(name: str) -> None:
    strategy = FedMerge(name, beta=0.25)
    replies = [
        mock_reply(ArrayRecord([np.array([0.5, 0.5, 0.5, 0.5])]), 1),
        mock_reply(ArrayRecord([np.array([1.0, 0.2, 0.5, 1.0])]), 5),
        mock_reply(ArrayRecord([np.array([0.2, 0.5, 1.0, 0.2])]), 2),
        mock_reply(ArrayRecord([np.array([0.5, 1.0, 0.2, 0.5])]), 9),
    ]
    actual, _ = strategy.aggregate_train(1, replies)
    assert actual
    np.testing.assert_equal(actual.to_numpy_ndarrays()[0], np.array([0.5, 0.5, 0.5, 0.5]))


def test_fedtrimmedavg_keeps_zero_dimensional_arrays() -> None:
    strategy = FedMerge("trimmed_mean", beta=0.25)
    replies = [mock_reply(ArrayRecord([np.array(value)]), 1) for value in (0.5, 1.0, 2.0, 100.0)]
    actual, _ = strategy.aggregate_train(1, replies)
    assert actual
    merged = actual.to_numpy_ndarrays()[0]
    assert merged.shape == ()
    np.testing.assert_equal(merged, np.array(1.5))


# --- krum_test.py, multikrum_test.py --------------------------------------------------------------------------------


def test_krum_keeps_the_reply_closest_to_its_neighbours_bit_for_bit() -> None:
    strategy = FedMerge("krum", num_malicious_nodes=1)
    replies = [mock_reply(ArrayRecord([np.array([value] * 4)]), num_examples=5) for value in (0.2, 0.7, 1.0)]
    actual, _ = strategy.aggregate_train(server_round=1, replies=replies)
    assert actual
    assert actual.object_id == ArrayRecord([np.array([0.7, 0.7, 0.7, 0.7])]).object_id


@pytest.mark.parametrize("name", ["multi_krum", "multikrum"])
def test_multikrum_averages_the_two_best_scored_replies_bit_for_bit(name: str) -> None:
    strategy = FedMerge(name, num_malicious_nodes=1, num_nodes_to_select=2)  # newer Flower: Krum(num_nodes_to_keep=2)
    replies = [mock_reply(ArrayRecord([np.array([value] * 4)]), num_examples=5) for value in (0.2, 0.5, 1.0)]
    actual, _ = strategy.aggregate_train(server_round=1, replies=replies)
    assert actual
    assert actual.object_id == ArrayRecord([np.array([0.35, 0.35, 0.35, 0.35])]).object_id


# --- fedavgm_test.py ------------------------------------------------------------------------------------------------


def fedavgm_round(**optimizer: float) -> tuple[FedMerge, list[Message], list[np.ndarray]]:
    """Flower's ``_prepare_strategy``: two float32 replies, their weighted mean, and zero current arrays."""
    first = [np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32), np.array([7, 8, 9, 10], dtype=np.float32)]
    second = [np.array([[29, 23, 19], [17, 13, 11]], dtype=np.float32), np.array([7, 5, 3, 2], dtype=np.float32)]
    replies = [mock_reply(ArrayRecord(first), num_examples=1), mock_reply(ArrayRecord(second), num_examples=2)]
    expected = [(a * 1 + b * 2) / 3 for a, b in zip(first, second, strict=True)]
    strategy = FedMerge("fedavg", server_optimizer="fedavgm", **optimizer)
    strategy.current_arrays = ArrayRecord([np.zeros((2, 3), dtype=np.float32), np.zeros(4, dtype=np.float32)])
    return strategy, replies, expected


def test_fedavgm_with_near_one_server_lr_and_no_momentum_is_fedavg() -> None:
    strategy, replies, expected = fedavgm_round(server_learning_rate=1.0 + 1e-9, server_momentum=0.0)
    actual, _ = strategy.aggregate_train(1, replies)
    assert actual is not None
    for merged, wanted in zip(actual.to_numpy_ndarrays(), expected, strict=True):
        np.testing.assert_almost_equal(merged, wanted, decimal=5)


def test_fedavgm_with_near_one_server_lr_and_near_zero_momentum_is_fedavg_over_two_rounds() -> None:
    strategy, replies, expected = fedavgm_round(server_learning_rate=1.0 + 1e-9, server_momentum=1e-9)
    strategy.aggregate_train(1, replies)  # activates the momentum
    actual, _ = strategy.aggregate_train(2, replies)  # updates it
    assert actual is not None
    for merged, wanted in zip(actual.to_numpy_ndarrays(), expected, strict=True):
        np.testing.assert_almost_equal(merged, wanted, decimal=5)


def test_fedavgm_keeps_zero_dimensional_arrays() -> None:
    strategy = FedMerge("fedavg", server_optimizer="fedavgm", server_learning_rate=1.0 + 1e-9)
    strategy.current_arrays = ArrayRecord([np.array(0.0)])
    replies = [mock_reply(ArrayRecord([np.array(1.0)]), num_examples=1), mock_reply(ArrayRecord([np.array(3.0)]), 2)]
    actual, _ = strategy.aggregate_train(1, replies)
    assert actual is not None
    merged = actual.to_numpy_ndarrays()[0]
    assert merged.shape == ()
    np.testing.assert_allclose(merged, np.array(7.0 / 3.0), rtol=1e-6)


# --- fedopt_test.py -------------------------------------------------------------------------------------------------

FEDOPT_CURRENT = [np.random.default_rng(0).standard_normal((7, 3)) for _ in range(4)]


@pytest.mark.parametrize(
    ("valid", "replied"),
    [
        (True, [np.random.default_rng(1).standard_normal((7, 3)) for _ in range(4)]),  # same keys and shapes
        (False, [np.random.default_rng(2).standard_normal((7, 3)) for _ in range(5)]),  # a key more
        (False, [np.random.default_rng(3).standard_normal((7, 5)) for _ in range(4)]),  # same keys, other shapes
    ],
    ids=["matching", "extra-key", "other-shapes"],
)
def test_fedopt_forms_delta_only_from_arrays_matching_the_current_ones(valid: bool, replied: list[np.ndarray]) -> None:
    # Flower's _compute_deltat_and_mt raises AggregationError on a mismatch; FedMerge rejects each such reply
    # (fedfuse's rule: a bad reply is rejected with its reason and the round goes on), so nothing is merged.
    strategy = FedMerge("fedavg", server_optimizer="fedadam")
    strategy.current_arrays = ArrayRecord(FEDOPT_CURRENT)
    replies = [mock_reply(ArrayRecord(replied), 3), mock_reply(ArrayRecord(replied), 5)]
    actual, _ = strategy.aggregate_train(1, replies)
    if valid:
        assert actual is not None
        assert [(key, array.shape) for key, array in actual.items()] == [(str(i), (7, 3)) for i in range(4)]
    else:
        assert actual is None
        assert {rejection.reason for rejection in strategy.last_rejections} == {"incompatible_update"}


# --- strategy_utils_test.py: aggregate_arrayrecords, aggregate_metricrecords -----------------------------------------

WEIGHTS = [0.25, 0.4, 0.35]


def test_fedavg_is_the_weighted_average_of_the_arrays() -> None:
    rng = np.random.default_rng(4)
    replied = [[rng.standard_normal((7, 3)) for _ in range(4)] for _ in WEIGHTS]
    average = [np.average([arrays[i] for arrays in replied], axis=0, weights=WEIGHTS) for i in range(4)]
    replies = [mock_reply(ArrayRecord(arrays), w, key="weight") for arrays, w in zip(replied, WEIGHTS, strict=True)]
    actual, _ = FedMerge("fedavg", weighted_by_key="weight").aggregate_train(1, replies)
    assert actual is not None
    assert all(np.allclose(a, b) for a, b in zip(actual.to_numpy_ndarrays(), average, strict=True))
    # not object_id: torch's add_(x, alpha=w) fuses S + w·x (FMA) where numpy rounds w·x first: not bit for bit
    assert [(key, array.shape, array.dtype) for key, array in actual.items()] == [
        (key, array.shape, array.dtype) for key, array in ArrayRecord(average).items()
    ]
    for merged, wanted in zip(actual.to_numpy_ndarrays(), average, strict=True):
        np.testing.assert_allclose(merged, wanted, rtol=1e-12)


def test_fedavg_is_the_weighted_average_of_zero_dimensional_arrays_bit_for_bit() -> None:
    rng = np.random.default_rng(5)
    replied = [np.array(rng.standard_normal()) for _ in WEIGHTS]
    average = np.average(replied, axis=0, weights=WEIGHTS)
    replies = [mock_reply(ArrayRecord([array]), w, key="weight") for array, w in zip(replied, WEIGHTS, strict=True)]
    actual, _ = FedMerge("fedavg", weighted_by_key="weight").aggregate_train(1, replies)
    assert actual is not None
    assert np.isclose(actual.to_numpy_ndarrays()[0], average)
    assert actual.object_id == ArrayRecord([np.array(average)]).object_id


def test_train_metrics_are_the_weighted_average_of_the_replies_metrics() -> None:
    rng = np.random.default_rng(6)
    replied = [{"a": 1, "b": 2.0, "c": rng.standard_normal(3).tolist()} for _ in WEIGHTS]
    expected = MetricRecord(
        {key: np.average([np.array(m[key]) for m in replied], axis=0, weights=WEIGHTS).tolist() for key in "abc"}
    )
    replies = [
        mock_reply(ArrayRecord([np.zeros(2)]), w, key="weight", **metrics)
        for metrics, w in zip(replied, WEIGHTS, strict=True)
    ]
    _, metrics = FedMerge("fedavg", weighted_by_key="weight").aggregate_train(1, replies)
    assert metrics is not None
    # FedMerge's record also carries fedfuse's reply counts; Flower's keys must be its aggregate, bit for bit
    assert MetricRecord({key: metrics[key] for key in expected}).object_id == expected.object_id


# --- differential: Flower's own strategy classes and FedMerge on the same random mock replies -----------------------

SHAPES = [(3, 4), (5,), ()]
TOLERANCE = {np.float32: {"rtol": 1e-5, "atol": 1e-6}, np.float64: {"rtol": 1e-12, "atol": 1e-12}}
Drawn = list[tuple[list[np.ndarray], int]]


def draw_replies(rng: np.random.Generator, count: int, dtype: type, *, equal_examples: bool = False) -> Drawn:
    """``count`` replies' arrays (one per shape of :data:`SHAPES`) and num-examples."""
    drawn = []
    for _ in range(count):
        arrays = [rng.standard_normal(shape).astype(dtype) for shape in SHAPES]
        drawn.append((arrays, 5 if equal_examples else int(rng.integers(1, 100))))
    return drawn


def as_replies(drawn: Drawn) -> list[Message]:
    """Fresh mock replies for one strategy (Flower's FedMedian and FedTrimmedAvg pop arrays out of a reply)."""
    return [mock_reply(ArrayRecord(arrays), num_examples) for arrays, num_examples in drawn]


def assert_same_arrays(
    ours: ArrayRecord | None, theirs: ArrayRecord | None, dtype: type, *, flower_keeps_dtype: bool = True
) -> None:
    """Same names in the same order, the replies' dtype, Flower's shapes and values within :data:`TOLERANCE`."""
    assert ours is not None and theirs is not None
    assert list(ours.keys()) == list(theirs.keys())
    for key in theirs:
        mine, flower = ours[key].numpy(), theirs[key].numpy()
        assert mine.dtype == dtype, f"array {key!r} merged as {mine.dtype} from {np.dtype(dtype)} replies"
        assert not flower_keeps_dtype or flower.dtype == mine.dtype
        assert mine.shape == flower.shape
        np.testing.assert_allclose(mine, flower, **TOLERANCE[dtype], err_msg=f"array {key!r}")


MULTI_KRUM = {"num_malicious_nodes": 1, "num_nodes_to_select": 2}
ONE_ROUND = [
    pytest.param(FedAvg, "fedavg", {}, False, id="FedAvg"),
    pytest.param(FedMedian, "median", {}, False, id="FedMedian"),
    pytest.param(FedTrimmedAvg, "trimmed_mean", {"beta": 0.25}, False, id="FedTrimmedAvg"),
    # fedfuse's multi-Krum averages the kept updates unweighted (docs/merge methods); Flower's weighs them by
    # num-examples: the two agree when the replies' num-examples are equal
    pytest.param(MultiKrum, "multi_krum", MULTI_KRUM, True, id="MultiKrum-equal-num-examples"),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("count", [2, 3, 4, 5])
@pytest.mark.parametrize(("flower_class", "name", "kwargs", "equal_examples"), ONE_ROUND)
def test_fedmerge_merges_as_flowers_strategy_does(
    flower_class: type[FedAvg], name: str, kwargs: dict, equal_examples: bool, count: int, dtype: type
) -> None:
    drawn = draw_replies(np.random.default_rng(count), count, dtype, equal_examples=equal_examples)
    theirs, _ = flower_class(**kwargs).aggregate_train(1, as_replies(drawn))
    ours, _ = FedMerge(name, **kwargs).aggregate_train(1, as_replies(drawn))
    assert_same_arrays(ours, theirs, dtype)


def lowest_krum_scores(drawn: Drawn, num_malicious_nodes: int) -> list[int]:
    """The replies of lowest Krum score: several when scores tie, as a mutually nearest pair's always do."""
    flat = np.stack([np.concatenate([a.astype(np.float64).ravel() for a in arrays]) for arrays, _ in drawn])
    distances = ((flat[:, None] - flat[None]) ** 2).sum(axis=-1) + np.diag(np.full(len(drawn), np.inf))
    nearest = max(1, len(drawn) - num_malicious_nodes - 2)
    scores = np.sort(distances, axis=1)[:, :nearest].sum(axis=1)
    return [i for i, score in enumerate(scores) if score <= scores.min() * (1 + 1e-6)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("count", [2, 3, 4, 5])
def test_fedmerge_krum_keeps_a_reply_flowers_krum_would_keep(count: int, dtype: type) -> None:
    drawn = draw_replies(np.random.default_rng(count), count, dtype)
    theirs, _ = Krum(num_malicious_nodes=1).aggregate_train(1, as_replies(drawn))
    ours, _ = FedMerge("krum", num_malicious_nodes=1).aggregate_train(1, as_replies(drawn))
    assert ours is not None and theirs is not None
    kept = [i for i, (arrays, _) in enumerate(drawn) if ArrayRecord(arrays).object_id == ours.object_id]
    best = lowest_krum_scores(drawn, num_malicious_nodes=1)
    # with K − f − 2 ≤ 1 neighbours the two nearest replies tie: Flower's pick then hangs on its rounding
    assert len(kept) == 1 and kept[0] in best, f"kept replies {kept}, lowest scores {best}"
    if len(best) == 1:
        assert ours.object_id == theirs.object_id


def run_rounds(flower: FedAvg, ours: FedMerge, dtype: type, count: int, rounds: int = 3) -> None:
    """Several rounds of fresh random replies; each strategy steps from the arrays it returned the round before."""
    rng = np.random.default_rng(10 + count)
    theirs_arrays = ours_arrays = ArrayRecord([rng.standard_normal(shape).astype(dtype) for shape in SHAPES])
    for server_round in range(1, rounds + 1):
        # what configure_train does: FedAvgM keeps an ArrayRecord, FedOpt a dict of numpy arrays
        flower.current_arrays = (  # type: ignore[attr-defined]
            theirs_arrays if isinstance(flower, FedAvgM) else {k: a.numpy() for k, a in theirs_arrays.items()}
        )
        ours.current_arrays = ours_arrays
        drawn = draw_replies(rng, count, dtype)
        theirs, _ = flower.aggregate_train(server_round, as_replies(drawn))
        mine, _ = ours.aggregate_train(server_round, as_replies(drawn))
        # Flower's FedAdam returns float64 from float32 arrays (its bias-corrected η is a numpy float64 scalar)
        assert_same_arrays(mine, theirs, dtype, flower_keeps_dtype=not isinstance(flower, FedAdam))
        assert mine is not None and theirs is not None
        theirs_arrays, ours_arrays = theirs, mine


ADAPTIVE = {"eta_l": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-3}
OPTIMIZERS = [
    pytest.param(FedAvgM, "fedavgm", {"server_learning_rate": 0.5, "server_momentum": 0.8}, id="FedAvgM"),
    pytest.param(FedAdam, "fedadam", {"eta": 0.1, **ADAPTIVE}, id="FedAdam"),
    pytest.param(FedYogi, "fedyogi", {"eta": 0.05, **ADAPTIVE}, id="FedYogi"),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("count", [2, 5])
@pytest.mark.parametrize(("flower_class", "optimizer", "kwargs"), OPTIMIZERS)
def test_fedmerge_steps_the_server_optimizer_as_flowers_strategy_does(
    flower_class: type[FedAvg], optimizer: str, kwargs: dict, count: int, dtype: type
) -> None:
    # Flower's strategy name picks Flower's rule: its FedAdam corrects η for the moments' bias, which
    # FedMerge("fedavg", server_optimizer="fedadam") does not (it follows Reddi et al., as fedfuse's run config)
    run_rounds(flower_class(**kwargs), FedMerge(optimizer, **kwargs), dtype, count)


@pytest.mark.parametrize(("flower_class", "alias"), [(FedAvgM, "fedavgm"), (FedAdam, "fedadam"), (FedYogi, "fedyogi")])
def test_fedmerge_named_after_a_flower_optimizer_has_its_defaults(flower_class: type[FedAvg], alias: str) -> None:
    run_rounds(flower_class(), FedMerge(alias), np.float64, count=3)


@pytest.mark.parametrize(
    ("optimizer", "flower_names", "fedfuse_names"),
    [
        ("fedavgm", {"server_learning_rate": 0.5, "server_momentum": 0.8}, {"server_lr": 0.5, "server_momentum": 0.8}),
        (
            "fedyogi",
            {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-2},
            {"server_lr": 0.05, "server_momentum": 0.8, "server_beta2": 0.95, "server_tau": 1e-2},
        ),
    ],
    ids=["fedavgm", "fedyogi"],
)
def test_flowers_and_fedfuses_names_build_the_same_server_optimizer(
    optimizer: str, flower_names: dict, fedfuse_names: dict
) -> None:
    named_as_flower = FedMerge("fedavg", server_optimizer=optimizer, **flower_names)
    named_as_fedfuse = FedMerge("fedavg", server_optimizer=optimizer, **fedfuse_names)
    rng = np.random.default_rng(30)
    named_as_flower.current_arrays = named_as_fedfuse.current_arrays = ArrayRecord([rng.standard_normal(4)])
    for server_round in (1, 2):
        drawn = [([rng.standard_normal(4)], int(rng.integers(1, 9))) for _ in range(3)]
        flower_side, _ = named_as_flower.aggregate_train(server_round, as_replies(drawn))
        fedfuse_side, _ = named_as_fedfuse.aggregate_train(server_round, as_replies(drawn))
        assert flower_side is not None and fedfuse_side is not None
        assert flower_side.object_id == fedfuse_side.object_id


# --- the contract's refusals and precision ----------------------------------------------------------------------------


def float64_round(seed: int = 20) -> tuple[list[Message], ArrayRecord]:
    """Three float64 mock replies and a float64 reference (the round's weights) of the same names and shapes."""
    rng = np.random.default_rng(seed)
    drawn = draw_replies(rng, 3, np.float64)
    return as_replies(drawn), ArrayRecord([rng.standard_normal(shape) for shape in SHAPES])


REFERENCE_DEPENDENT = [
    pytest.param("ties", {}, id="ties"),
    pytest.param("task_arithmetic", {"lam": 1.0}, id="task_arithmetic-lam=1"),
    pytest.param("fedavg", {"clip_norm": 1.0}, id="fedavg-clip_norm"),
    pytest.param("fedavg", {"server_optimizer": "fedavgm"}, id="fedavg-server_optimizer"),
]


@pytest.mark.parametrize(("name", "kwargs"), REFERENCE_DEPENDENT)
def test_a_merge_that_needs_the_rounds_weights_refuses_without_them_in_one_line(name: str, kwargs: dict) -> None:
    replies, _ = float64_round()
    with pytest.raises(ValueError) as refusal:
        FedMerge(name, **kwargs).aggregate_train(1, replies)
    message = str(refusal.value)
    assert "\n" not in message
    for remedy in ("configure_train", "current_arrays", "arrays="):
        assert remedy in message, f"{remedy!r} not named in: {message}"


@pytest.mark.parametrize("given", ["arrays=", "current_arrays"])
@pytest.mark.parametrize(("name", "kwargs"), REFERENCE_DEPENDENT)
def test_a_merge_that_needs_the_rounds_weights_merges_once_given_them(name: str, kwargs: dict, given: str) -> None:
    replies, reference = float64_round()
    strategy = FedMerge(name, **kwargs)
    if given == "arrays=":
        actual, _ = strategy.aggregate_train(1, replies, arrays=reference)
    else:
        strategy.current_arrays = reference
        actual, _ = strategy.aggregate_train(1, replies)
    assert actual is not None
    assert [(key, array.shape, array.numpy().dtype) for key, array in actual.items()] == [
        (key, array.shape, np.dtype(np.float64)) for key, array in reference.items()
    ]


REFERENCE_FREE = [
    pytest.param("fedavg", {}, id="fedavg"),
    pytest.param("linear", {}, id="linear"),
    pytest.param("median", {}, id="median"),
    pytest.param("trimmed_mean", {"beta": 0.2}, id="trimmed_mean"),
    pytest.param("krum", {"num_malicious_nodes": 1}, id="krum"),
    pytest.param("multi_krum", {"num_malicious_nodes": 1}, id="multi_krum"),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(("name", "kwargs"), REFERENCE_FREE)
def test_arrays_are_merged_in_their_own_precision(name: str, kwargs: dict, dtype: type) -> None:
    drawn = draw_replies(np.random.default_rng(40), 4, dtype)
    actual, _ = FedMerge(name, **kwargs).aggregate_train(1, as_replies(drawn))
    assert actual is not None
    assert [array.numpy().dtype for array in actual.values()] == [np.dtype(dtype)] * len(SHAPES)


def test_a_float64_average_keeps_what_float32_would_round_away() -> None:
    replies = [mock_reply(ArrayRecord([np.array([1.0 + k * 1e-12])]), 1) for k in range(4)]
    actual, _ = FedMerge("fedavg").aggregate_train(1, replies)
    assert actual is not None
    np.testing.assert_allclose(actual.to_numpy_ndarrays()[0], [1.0 + 1.5e-12], rtol=1e-15)  # float32: exactly 1.0


def test_the_merged_record_keeps_the_replies_array_names_and_order() -> None:
    replies = [
        mock_reply(ArrayRecord({"b": Array(np.full(2, value)), "a": Array(np.full(3, -value))}), 1)
        for value in (1.0, 3.0)
    ]
    actual, _ = FedMerge("fedavg").aggregate_train(1, replies)
    assert actual is not None
    assert list(actual.keys()) == ["b", "a"]
    np.testing.assert_equal(actual.to_numpy_ndarrays(), [np.full(2, 2.0), np.full(3, -2.0)])
