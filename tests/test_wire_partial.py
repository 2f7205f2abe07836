"""Partial merge states on the wire: a gateway's state decodes and combines to the flat result."""

from __future__ import annotations

import pytest
import torch

from fedfuse.algebra import dare_drop, ties_trim
from fedfuse.strategies import get_strategy
from fedfuse.wire import (
    Expectation,
    UpdateHeader,
    UpdateRejected,
    decode_partial,
    decode_update,
    encode_partial,
    encode_update,
)
from fedfuse.wire.container import pack, unpack

pytestmark = pytest.mark.unit

HEADER = UpdateHeader("run-9", 2, "sha256:base", "gateway-eu", num_examples=300, metrics={"clients": 2})
SHAPES = {"w": (30, 8), "b": (8,)}
EXPECT = Expectation(SHAPES, round=2, run_id="run-9", base_fingerprint="sha256:base")


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def updates(sparse: bool = True) -> list[dict]:
    out = []
    for k in range(4):
        w = randn(*SHAPES["w"], seed=k)
        out.append({"w": ties_trim(w, 0.3) if sparse else w, "b": randn(8, seed=10 + k)})
    return out


def fisher_for(k: int) -> dict:
    return {"w": randn(*SHAPES["w"], seed=20 + k).abs(), "b": randn(8, seed=30 + k).abs()}


def state_of(strategy, items: list[tuple[int, dict]]):
    state = strategy.new_state()
    for k, update in items:
        state.add(update, weight=k + 1, fisher=fisher_for(k) if strategy.capabilities.needs_fisher else None)
    return state


@pytest.mark.parametrize(
    "name, params",
    [
        ("fedavg", {}),
        ("task_arithmetic", {"lam": 0.7}),
        ("ties", {}),
        ("ties", {"vote": "count"}),
        ("fisher", {}),
        ("fedavg", {"dtype": "float64"}),
    ],
)
def test_a_forwarded_partial_combines_to_the_flat_merge(name: str, params: dict) -> None:
    """Bit-exact against the same tree merged in memory, and equal to the flat merge up to rounding."""
    items = list(enumerate(updates()))
    strategy = get_strategy(name, **params)
    flat = state_of(strategy, items).finalize()
    in_memory = strategy.combine(state_of(strategy, items[:2]), state_of(strategy, items[2:])).finalize()
    region = state_of(strategy, items[:2])
    gateway = state_of(strategy, items[2:])
    decoded = decode_partial(encode_partial(gateway, header=HEADER), strategy=strategy, expect=EXPECT)
    assert decoded.header == HEADER
    assert decoded.state.num_updates == 2 and decoded.state.total_weight == gateway.total_weight
    merged = strategy.combine(region, decoded.state).finalize()
    for key, value in flat.items():
        assert merged[key].dtype == value.dtype
        assert torch.equal(merged[key], in_memory[key]), key
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6)


def test_statistics_come_back_bit_exact() -> None:
    strategy = get_strategy("ties")
    state = state_of(strategy, list(enumerate(updates(sparse=False))))
    decoded = decode_partial(encode_partial(state, header=HEADER), strategy=strategy, expect=EXPECT).state
    for key, tensor in state.to_tensors().items():
        assert torch.equal(decoded.to_tensors()[key], tensor)


def test_a_mostly_zero_state_travels_sparse() -> None:
    strategy = get_strategy("task_arithmetic")
    one_sparse = strategy.new_state().add({"w": dare_drop(randn(400, 50), 0.05, seed=3)})
    data = encode_partial(one_sparse, header=HEADER)
    assert len(data) < 0.25 * 400 * 50 * 4
    decoded = decode_partial(data, strategy=strategy, expect=Expectation({"w": (400, 50)})).state
    assert torch.equal(decoded.finalize()["w"], one_sparse.finalize()["w"])


def test_a_state_from_another_strategy_is_refused() -> None:
    data = encode_partial(state_of(get_strategy("ties"), list(enumerate(updates()))), header=HEADER)
    for other in (get_strategy("fedavg"), get_strategy("ties", vote="count"), get_strategy("ties", lam=0.5)):
        with pytest.raises(UpdateRejected) as info:
            decode_partial(data, strategy=other, expect=EXPECT)
        assert info.value.reason == "bad_partial"


def test_precision_must_match_the_strategy() -> None:
    data = encode_partial(state_of(get_strategy("fedavg"), list(enumerate(updates()))), header=HEADER)
    with pytest.raises(UpdateRejected, match=r"float32") as info:
        decode_partial(data, strategy=get_strategy("fedavg", dtype="float64"), expect=EXPECT)
    assert info.value.reason == "bad_partial"


def repack(data: bytes, edit) -> bytes:
    document, blobs = unpack(data, None)
    edit(document, blobs)
    return pack(document, blobs)


def fedavg_partial() -> bytes:
    return encode_partial(state_of(get_strategy("fedavg"), list(enumerate(updates(sparse=False)))), header=HEADER)


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda doc, blobs: doc["state"].update(total_weight="-1.0"), "bad_partial"),
        (lambda doc, blobs: doc["state"].update(num_updates="many"), "bad_partial"),
        (lambda doc, blobs: doc["state"].pop("num_updates"), "malformed_header"),
        (
            lambda doc, blobs: (
                doc["tensors"].update({"b::Q": doc["tensors"].pop("b::S")})
                or blobs.update({"v:b::Q": blobs.pop("v:b::S")})
            ),
            "bad_partial",
        ),
        (lambda doc, blobs: doc.update(version=9), "unsupported_version"),
        (lambda doc, blobs: doc.update(num_examples=-3), "bad_num_examples"),
        (lambda doc, blobs: blobs.update({"v:b::S": torch.full((8,), float("nan")).view(torch.uint8)}), "non_finite"),
    ],
    ids=["negative-weight", "bad-count", "missing-counter", "unknown-statistic", "version", "num-examples", "nan"],
)
def test_bad_partial_payloads_are_refused(edit, reason: str) -> None:
    with pytest.raises(UpdateRejected) as info:
        decode_partial(repack(fedavg_partial(), edit), strategy=get_strategy("fedavg"), expect=EXPECT)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "expect, reason",
    [
        (Expectation(SHAPES, round=3), "round_mismatch"),
        (Expectation(SHAPES, run_id="other"), "run_mismatch"),
        (Expectation(SHAPES, base_fingerprint="sha256:new"), "fingerprint_mismatch"),
        (Expectation({"w": (8, 30), "b": (8,)}), "wrong_shape"),
        (Expectation({"w": (30, 8)}), "unexpected_tensor"),
        (Expectation({**SHAPES, "c": (2,)}), "missing_tensor"),
        (Expectation(SHAPES, max_bytes=100), "too_large"),
    ],
)
def test_partials_meet_the_same_expectations_as_updates(expect: Expectation, reason: str) -> None:
    with pytest.raises(UpdateRejected) as info:
        decode_partial(fedavg_partial(), strategy=get_strategy("fedavg"), expect=expect)
    assert info.value.reason == reason


def test_updates_and_partials_are_not_confused() -> None:
    update = encode_update({"w": randn(30, 8), "b": randn(8)}, header=HEADER)
    with pytest.raises(UpdateRejected) as info:
        decode_partial(update, strategy=get_strategy("fedavg"), expect=EXPECT)
    assert info.value.reason == "unsupported_version"
    with pytest.raises(UpdateRejected) as info:
        decode_update(fedavg_partial(), expect=EXPECT)
    assert info.value.reason == "unsupported_version"


def test_truncated_or_corrupted_partials() -> None:
    data = fedavg_partial()
    for bad, reason in ((data[:-10], "truncated"), (data[:-1] + bytes([data[-1] ^ 1]), "corrupted")):
        with pytest.raises(UpdateRejected) as info:
            decode_partial(bad, strategy=get_strategy("fedavg"), expect=EXPECT)
        assert info.value.reason == reason


def test_encode_partial_checks_its_input() -> None:
    with pytest.raises(ValueError, match=r"MergeState"):
        encode_partial({"w": torch.zeros(3)}, header=HEADER)
