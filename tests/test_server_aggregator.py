"""The round aggregator folds valid payloads as they arrive and rejects bad ones without losing anything."""

from __future__ import annotations

import torch
import pytest

from fedfuse.algebra import dare_drop, ties_trim
from fedfuse.server import RoundAggregator
from fedfuse.strategies import get_strategy
from fedfuse.wire import Expectation, UpdateHeader, encode_partial, encode_update, fingerprint

SHAPES = {"layer.weight": (8, 6), "layer.bias": (6,)}
BASE = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
FINGERPRINT = fingerprint(BASE)


def task_vector(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def header(node: int, examples: int = 10, round_number: int = 3) -> UpdateHeader:
    return UpdateHeader("run-a", round_number, FINGERPRINT, node, num_examples=examples)


def expectation() -> Expectation:
    return Expectation(SHAPES, round=3, run_id="run-a", base_fingerprint=FINGERPRINT, max_bytes=1 << 20)


def trimmed(seed: int) -> dict:
    return {name: ties_trim(t, 0.5) for name, t in task_vector(seed).items()}


def test_valid_updates_fold_to_the_direct_merge_weighted_by_examples() -> None:
    ties = get_strategy("ties")
    aggregator = RoundAggregator(ties, expectation())
    reference = ties.new_state()
    for node, examples in [(1, 10), (2, 30), (3, 5)]:
        assert aggregator.offer_update(encode_update(trimmed(node), header=header(node, examples))) is None
        reference.add(trimmed(node), weight=examples)
    merged, expected = aggregator.finalize(), reference.finalize()
    for name in SHAPES:
        torch.testing.assert_close(merged[name], expected[name])
    assert aggregator.metrics()["accepted"] == 3 and aggregator.metrics()["rejected"] == 0


@pytest.mark.parametrize(
    ("bad_payload", "reason"),
    [
        (lambda: encode_update(trimmed(9), header=header(9))[:-7], "truncated"),
        (lambda: encode_update(trimmed(9), header=header(9, round_number=2)), "round_mismatch"),
        (lambda: encode_update({**trimmed(9), "layer.bias": torch.full((6,), float("nan"))}, header=header(9)), "non_finite"),
        (lambda: encode_update({"layer.weight": torch.ones(8, 6)}, header=header(9)), "missing_tensor"),
        (lambda: encode_update(trimmed(9), header=header(9, examples=0)), "zero_weight"),
    ],
)
def test_a_bad_payload_is_rejected_with_its_reason_and_the_round_goes_on(bad_payload, reason) -> None:
    fedavg = get_strategy("fedavg")
    aggregator = RoundAggregator(fedavg, expectation())
    aggregator.offer_update(encode_update(trimmed(1), header=header(1)))
    rejection = aggregator.offer_update(bad_payload())
    aggregator.offer_update(encode_update(trimmed(2), header=header(2)))
    assert rejection is not None and rejection.reason == reason and rejection.message
    reference = fedavg.new_state().add(trimmed(1), 10).add(trimmed(2), 10).finalize()
    merged = aggregator.finalize()
    for name in SHAPES:
        torch.testing.assert_close(merged[name], reference[name])
    assert aggregator.metrics()[f"rejected.{reason}"] == 1 and aggregator.metrics()["accepted"] == 2


def test_a_second_update_from_the_same_node_is_rejected() -> None:
    aggregator = RoundAggregator(get_strategy("fedavg"), expectation())
    assert aggregator.offer_update(encode_update(trimmed(1), header=header(1))) is None
    rejection = aggregator.offer_update(encode_update(trimmed(2), header=header(1)))
    assert rejection is not None and rejection.reason == "duplicate_node" and rejection.node_id == "1"


def test_an_update_unfit_for_the_strategy_leaves_the_state_untouched() -> None:
    fisher = get_strategy("fisher")
    aggregator = RoundAggregator(fisher, expectation(), weighting="uniform")
    tau = task_vector(1)
    with_fisher = {name: t.abs() + 0.1 for name, t in tau.items()}
    assert aggregator.offer_update(encode_update(tau, header=header(1), fisher=with_fisher)) is None
    partly = {"layer.weight": with_fisher["layer.weight"]}
    rejection = aggregator.offer_update(encode_update(task_vector(2), header=header(2), fisher=partly))
    assert rejection is not None and rejection.reason == "incompatible_update"
    expected = fisher.new_state().add(tau, 1.0, with_fisher).finalize()
    merged = aggregator.finalize()
    for name in SHAPES:
        torch.testing.assert_close(merged[name], expected[name])


def test_a_gateway_partial_state_folds_like_its_clients_updates() -> None:
    ties = get_strategy("ties")
    seeds = {node: 100 + node for node in range(4)}
    dropped = {n: {name: dare_drop(t, 0.5, seeds[n] * 7 + i) for i, (name, t) in enumerate(task_vector(n).items())} for n in seeds}
    gateway = ties.new_state()
    for node in (2, 3):
        gateway.add(dropped[node], weight=10)
    aggregator = RoundAggregator(ties, expectation())
    for node in (0, 1):
        aggregator.offer_update(encode_update(dropped[node], header=header(node)))
    assert aggregator.offer_partial(encode_partial(gateway, header=header(99))) is None
    flat = ties.new_state()
    for node in range(4):
        flat.add(dropped[node], weight=10)
    merged, expected = aggregator.finalize(), flat.finalize()
    for name in SHAPES:
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-6, atol=1e-7)
    assert aggregator.state.num_updates == 4


def test_memory_is_one_state_whatever_the_number_of_updates() -> None:
    aggregator = RoundAggregator(get_strategy("ties"), expectation())

    def state_bytes() -> int:
        return sum(t.numel() * t.element_size() for stats in aggregator.state.stats.values() for t in stats.values())

    aggregator.offer_update(encode_update(trimmed(0), header=header(0)))
    after_one = state_bytes()
    for node in range(1, 40):
        aggregator.offer_update(encode_update(trimmed(node), header=header(node)))
    assert state_bytes() == after_one


def test_finalize_without_any_accepted_update_says_why() -> None:
    aggregator = RoundAggregator(get_strategy("fedavg"), expectation())
    aggregator.offer_update(b"not a payload")
    with pytest.raises(ValueError, match="no update was accepted"):
        aggregator.finalize()
