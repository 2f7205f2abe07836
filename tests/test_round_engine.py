"""The round engine folds valid payloads as they arrive and rejects bad ones without losing anything."""

from __future__ import annotations

import pytest
import torch

from fedfuse.algebra import dare_drop, ties_trim
from fedfuse.rounds import RoundEngine, UpdateSpace
from fedfuse.strategies import get_strategy
from fedfuse.wire import UpdateHeader, encode_partial, encode_update, fingerprint

pytestmark = pytest.mark.unit

SHAPES = {"layer.weight": (8, 6), "layer.bias": (6,)}
BASE = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
FINGERPRINT = fingerprint(BASE)


def task_vector(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def header(node: int, examples: int = 10, round_number: int = 3) -> UpdateHeader:
    return UpdateHeader("run-a", round_number, FINGERPRINT, node, num_examples=examples)


def engine(strategy, weighting: str = "num_examples") -> RoundEngine:
    """What round 3 of run-a expects: full-weight updates of SHAPES against BASE, at most 1 MiB each."""
    return RoundEngine(
        strategy,
        UpdateSpace.full(SHAPES),
        round_number=3,
        run_id="run-a",
        base_fingerprint=FINGERPRINT,
        weighting=weighting,
        max_bytes=1 << 20,
    )


def trimmed(seed: int) -> dict:
    return {name: ties_trim(t, 0.5) for name, t in task_vector(seed).items()}


def test_valid_updates_fold_to_the_direct_merge_weighted_by_examples() -> None:
    ties = get_strategy("ties")
    merge_round = engine(ties)
    reference = ties.new_state()
    for node, examples in [(1, 10), (2, 30), (3, 5)]:
        assert merge_round.offer(encode_update(trimmed(node), header=header(node, examples))) is None
        reference.add(trimmed(node), weight=examples)
    merged, expected = merge_round.merged_task_vector(), reference.finalize()
    for name in SHAPES:
        torch.testing.assert_close(merged[name], expected[name])
    assert merge_round.metrics()["accepted"] == 3 and merge_round.metrics()["rejected"] == 0


@pytest.mark.parametrize(
    ("bad_payload", "reason"),
    [
        (lambda: encode_update(trimmed(9), header=header(9))[:-7], "truncated"),
        (lambda: encode_update(trimmed(9), header=header(9, round_number=2)), "round_mismatch"),
        (
            lambda: encode_update({**trimmed(9), "layer.bias": torch.full((6,), float("nan"))}, header=header(9)),
            "non_finite",
        ),
        (lambda: encode_update({"layer.weight": torch.ones(8, 6)}, header=header(9)), "missing_tensor"),
        (lambda: encode_update(trimmed(9), header=header(9, examples=0)), "zero_weight"),
    ],
)
def test_a_bad_payload_is_rejected_with_its_reason_and_the_round_goes_on(bad_payload, reason) -> None:
    fedavg = get_strategy("fedavg")
    merge_round = engine(fedavg)
    merge_round.offer(encode_update(trimmed(1), header=header(1)))
    rejection = merge_round.offer(bad_payload())
    merge_round.offer(encode_update(trimmed(2), header=header(2)))
    assert rejection is not None and rejection.reason == reason and rejection.message
    reference = fedavg.new_state().add(trimmed(1), 10).add(trimmed(2), 10).finalize()
    merged = merge_round.merged_task_vector()
    for name in SHAPES:
        torch.testing.assert_close(merged[name], reference[name])
    assert merge_round.metrics()[f"rejected.{reason}"] == 1 and merge_round.metrics()["accepted"] == 2


def test_a_second_update_from_the_same_node_is_rejected() -> None:
    merge_round = engine(get_strategy("fedavg"))
    assert merge_round.offer(encode_update(trimmed(1), header=header(1))) is None
    rejection = merge_round.offer(encode_update(trimmed(2), header=header(1)))
    assert rejection is not None and rejection.reason == "duplicate_node" and rejection.node == "1"


def test_an_update_unfit_for_the_strategy_leaves_the_state_untouched() -> None:
    fisher = get_strategy("fisher")
    merge_round = engine(fisher, weighting="uniform")
    tau = task_vector(1)
    with_fisher = {name: t.abs() + 0.1 for name, t in tau.items()}
    assert merge_round.offer(encode_update(tau, header=header(1), fisher=with_fisher)) is None
    partly = {"layer.weight": with_fisher["layer.weight"]}
    rejection = merge_round.offer(encode_update(task_vector(2), header=header(2), fisher=partly))
    assert rejection is not None and rejection.reason == "incompatible_update"
    expected = fisher.new_state().add(tau, 1.0, with_fisher).finalize()
    merged = merge_round.merged_task_vector()
    for name in SHAPES:
        torch.testing.assert_close(merged[name], expected[name])


def test_a_gateway_partial_state_folds_like_its_clients_updates() -> None:
    ties = get_strategy("ties")
    seeds = {node: 100 + node for node in range(4)}
    dropped = {
        n: {name: dare_drop(t, 0.5, seeds[n] * 7 + i) for i, (name, t) in enumerate(task_vector(n).items())}
        for n in seeds
    }
    gateway = ties.new_state()
    for node in (2, 3):
        gateway.add(dropped[node], weight=10)
    merge_round = engine(ties)
    for node in (0, 1):
        merge_round.offer(encode_update(dropped[node], header=header(node)))
    assert merge_round.offer(encode_partial(gateway, header=header(99)), kind="partial") is None
    flat = ties.new_state()
    for node in range(4):
        flat.add(dropped[node], weight=10)
    merged, expected = merge_round.merged_task_vector(), flat.finalize()
    for name in SHAPES:
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-6, atol=1e-7)
    assert merge_round.state.num_updates == 4


def test_memory_is_one_state_whatever_the_number_of_updates() -> None:
    merge_round = engine(get_strategy("ties"))

    def state_bytes() -> int:
        return sum(t.numel() * t.element_size() for stats in merge_round.state.stats.values() for t in stats.values())

    merge_round.offer(encode_update(trimmed(0), header=header(0)))
    after_one = state_bytes()
    for node in range(1, 40):
        merge_round.offer(encode_update(trimmed(node), header=header(node)))
    assert state_bytes() == after_one


def test_finalize_without_any_accepted_update_says_why() -> None:
    merge_round = engine(get_strategy("fedavg"))
    merge_round.offer(b"not a payload")
    with pytest.raises(ValueError, match="no update was accepted"):
        merge_round.merged_task_vector()


def tiered(node: int, tier: str, examples: int = 10) -> UpdateHeader:
    return UpdateHeader("run-a", 3, FINGERPRINT, node, num_examples=examples, tier=tier)


def test_an_update_resent_under_another_tier_is_a_duplicate_and_merged_once() -> None:
    fedavg = get_strategy("fedavg")
    merge_round = engine(fedavg)
    assert merge_round.offer(encode_update(trimmed(1), header=tiered(1, "region-a"))) is None
    assert merge_round.offer(encode_update(trimmed(2), header=tiered(2, "region-b"))) is None
    rejection = merge_round.offer(encode_update(trimmed(1), header=tiered(1, "region-b")))
    assert rejection is not None and rejection.reason == "duplicate_node" and "region-a" in rejection.message
    expected = fedavg.new_state().add(trimmed(1), 10).add(trimmed(2), 10).finalize()
    merged = merge_round.merged_task_vector()
    for name in SHAPES:
        torch.testing.assert_close(merged[name], expected[name])


def test_a_gateway_and_a_node_of_the_same_name_cannot_both_contribute() -> None:
    ties = get_strategy("ties")
    merge_round = engine(ties)
    gateway = ties.new_state().add(trimmed(5), weight=10)
    assert merge_round.offer(encode_partial(gateway, header=tiered(7, "region-a")), kind="partial") is None
    rejection = merge_round.offer(encode_update(trimmed(6), header=tiered(7, "")))
    assert rejection is not None and rejection.reason == "duplicate_node"


def test_the_tier_map_and_metrics_come_from_the_signed_headers() -> None:
    merge_round = engine(get_strategy("fedavg"))
    for node, tier in [(1, "a"), (2, "b"), (3, "a")]:
        head = UpdateHeader(
            "run-a", 3, FINGERPRINT, node, num_examples=node * 10, tier=tier, metrics={"train-loss": float(node)}
        )
        assert merge_round.offer(encode_update(trimmed(node), header=head)) is None
    merge_round.offer(b"junk", sender="flower-node-9")
    assert merge_round.tiers == {"a": ["1", "3"], "b": ["2"]}
    metrics = merge_round.metrics()
    assert metrics["accepted"] == 3 and metrics["tiers"] == 2 and metrics["rejected"] == 1
    assert metrics["train-loss"] == pytest.approx((10 * 1 + 20 * 2 + 30 * 3) / 60)
    assert merge_round.rejections[0].node == "flower-node-9"


def test_the_signature_hook_sees_every_payload_and_its_refusal_is_recorded() -> None:
    from fedfuse.security import SignatureRejected

    def check(payload: bytes, signature: object) -> str:
        if signature != "good":
            raise SignatureRejected("bad_signature", "signature does not match the payload")
        return "1"

    merge_round = RoundEngine(get_strategy("fedavg"), UpdateSpace.full(SHAPES), round_number=3, check_signature=check)
    assert (
        merge_round.offer(encode_update(trimmed(1), header=header(1)), signature="bad", sender="n1").reason
        == "bad_signature"
    )
    assert merge_round.offer(encode_update(trimmed(1), header=header(1)), signature="good") is None
    refused = merge_round.offer(encode_update(trimmed(2), header=header(2)), signature="good")
    assert refused is not None and refused.reason == "signer_mismatch"
    assert merge_round.metrics()["signatures-verified"] == 2 and merge_round.accepted == ["1"]


def test_finalize_applies_the_merge_to_the_round_weights_or_keeps_them() -> None:
    nothing = engine(get_strategy("fedavg"))
    nothing.offer(b"junk")
    assert nothing.finalize(BASE) is None
    merge_round = engine(get_strategy("fedavg"))
    merge_round.offer(encode_update(task_vector(1), header=header(1)))
    ones = {name: torch.ones(shape) for name, shape in SHAPES.items()}
    new = merge_round.finalize(ones)
    for name in SHAPES:
        torch.testing.assert_close(new[name], ones[name] + task_vector(1)[name])


def test_every_reason_used_anywhere_is_in_the_one_registry() -> None:
    from fedfuse.rejections import REASONS, ROUND_REASONS, SIGNATURE_REASONS, WIRE_REASONS, Rejection
    from fedfuse.security import SIGNATURE_REASONS as security_reasons
    from fedfuse.wire import REASONS as wire_reasons

    assert set(wire_reasons) == set(WIRE_REASONS) and set(security_reasons) == set(SIGNATURE_REASONS)
    assert set(REASONS) == set(WIRE_REASONS) | set(SIGNATURE_REASONS) | set(ROUND_REASONS)
    with pytest.raises(ValueError, match="unknown rejection reason"):
        Rejection("n", "made_up", "x")


def test_a_strategy_that_is_not_a_monoid_refuses_partial_states() -> None:
    fedavg = get_strategy("fedavg")
    gateway = fedavg.new_state().add(trimmed(5), weight=10)
    payload = encode_partial(gateway, header=header(7))
    fedavg.with_capabilities(mergeable=False)  # this one strategy object declares itself non-mergeable
    merge_round = engine(fedavg)
    rejection = merge_round.offer(payload, kind="partial")
    assert rejection is not None and rejection.reason == "incompatible_update" and "monoid" in rejection.message
