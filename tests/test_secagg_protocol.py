"""SecAgg+'s two sides without Flower: the unmasked sum is exactly Σ x over the survivors, whoever drops."""

from __future__ import annotations

import numpy as np
import pytest

from fedfuse.secagg.aggregator import Aggregator
from fedfuse.secagg.protocol import NodeSession, RoundSetup, SecAggAborted, SecAggParams

pytestmark = pytest.mark.unit

LENGTH = 257


def _setup(count: int, **params: int) -> RoundSetup:
    nodes = [2**60 + 17 * i for i in range(count)]  # Flower-sized ids, above 2**53
    return RoundSetup.plan("run", 3, nodes, SecAggParams(**params), seed=7)


def _inputs(setup: RoundSetup) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    info = np.iinfo(setup.fixed.dtype)
    return {node: rng.integers(0, info.max, LENGTH, dtype=setup.fixed.dtype, endpoint=True) for node in setup.nodes}


def run_protocol(
    setup: RoundSetup,
    inputs: dict[int, np.ndarray],
    *,
    drop_before_share: set[int] = frozenset(),  # type: ignore[assignment]
    drop_before_mask: set[int] = frozenset(),  # type: ignore[assignment]
    drop_before_unmask: set[int] = frozenset(),  # type: ignore[assignment]
    tamper: dict[str, object] | None = None,
    length: int = LENGTH,
) -> tuple[Aggregator, np.ndarray]:
    """All four stages, nodes round-tripping their state through to_state/from_state as a SuperNode would."""
    tamper = tamper or {}
    sessions = {node: NodeSession(setup, node) for node in setup.nodes}
    aggregator = Aggregator(setup)
    for node, session in sessions.items():
        aggregator.on_advertise(node, session.advertise())
    for node, request in aggregator.share_requests().items():
        if node in drop_before_share:
            continue
        session = NodeSession.from_state(sessions[node].to_state())
        reply = session.share(request)
        sessions[node] = session
        aggregator.on_share(node, reply)
    for node, request in aggregator.mask_requests(length).items():
        if node in drop_before_mask:
            continue
        session = NodeSession.from_state(sessions[node].to_state())
        reply = session.masked_input(request, inputs[node])
        if tamper.get("short_mask") == node:
            reply["masked"] = reply["masked"][:-8]  # type: ignore[index]
        sessions[node] = session
        aggregator.on_masked(node, reply)
    for node, request in aggregator.unmask_requests().items():
        if node in drop_before_unmask:
            continue
        reply = NodeSession.from_state(sessions[node].to_state()).unmask(request)
        if tamper.get("bad_share") == node and reply["shares"]:
            shares = list(reply["shares"])  # type: ignore[call-overload]
            shares[0] = bytes(66)
            reply["shares"] = shares
        aggregator.on_unmask(node, reply)
    return aggregator, aggregator.result().total


def _expected(setup: RoundSetup, inputs: dict[int, np.ndarray], nodes: list[int]) -> np.ndarray:
    total = np.zeros(LENGTH, dtype=setup.fixed.dtype)
    for node in nodes:
        total = (total + inputs[node]).astype(setup.fixed.dtype)
    return total


@pytest.mark.parametrize("count", [3, 5, 12])
def test_with_everyone_the_unmasked_sum_is_the_sum_of_all_inputs(count: int) -> None:
    setup = _setup(count)
    inputs = _inputs(setup)
    aggregator, total = run_protocol(setup, inputs)
    assert np.array_equal(total, _expected(setup, inputs, list(setup.nodes)))
    assert aggregator.refusals == []


def test_nodes_that_drop_after_sharing_are_recovered_from_shares_and_left_out_of_the_sum() -> None:
    setup = _setup(12)
    inputs = _inputs(setup)
    dropped = {setup.nodes[1], setup.nodes[6]}
    aggregator, total = run_protocol(setup, inputs, drop_before_mask=dropped)
    survivors = [node for node in setup.nodes if node not in dropped]
    assert np.array_equal(total, _expected(setup, inputs, survivors))
    assert sorted(aggregator.dropped) == sorted(dropped)


def test_nodes_that_drop_before_sharing_take_no_part_and_survivors_drop_during_unmask() -> None:
    setup = _setup(12)
    inputs = _inputs(setup)
    early, late = {setup.nodes[0]}, {setup.nodes[4]}
    _, total = run_protocol(setup, inputs, drop_before_share=early, drop_before_unmask=late)
    assert np.array_equal(total, _expected(setup, inputs, [n for n in setup.nodes if n not in early]))


def test_fewer_than_t_survivors_abort_the_round() -> None:
    setup = _setup(5, threshold=3, degree=4)
    dropped = set(setup.nodes[:3])
    with pytest.raises(SecAggAborted, match="threshold is 3"):
        run_protocol(setup, _inputs(setup), drop_before_mask=dropped)


def test_a_malformed_masked_input_is_refused_and_the_node_treated_as_dropped() -> None:
    setup = _setup(8)
    inputs = _inputs(setup)
    bad = setup.nodes[2]
    aggregator, total = run_protocol(setup, inputs, tamper={"short_mask": bad})
    assert [r.node for r in aggregator.refusals] == [bad]
    assert np.array_equal(total, _expected(setup, inputs, [n for n in setup.nodes if n != bad]))


def test_a_node_returning_a_wrong_share_is_refused_and_the_round_goes_on_while_t_remain() -> None:
    setup = _setup(12)
    inputs = _inputs(setup)
    liar = setup.nodes[3]
    aggregator, total = run_protocol(setup, inputs, tamper={"bad_share": liar})
    assert [(r.node, r.stage) for r in aggregator.refusals] == [(liar, "unmask")]
    assert "commitment" in aggregator.refusals[0].message
    assert np.array_equal(total, _expected(setup, inputs, list(setup.nodes)))


def test_a_node_refuses_to_reveal_both_shares_of_one_neighbour() -> None:
    setup = _setup(4)
    session = NodeSession(setup, setup.nodes[0])
    both = [str(setup.nodes[1])]
    with pytest.raises(ValueError, match="both surviving and dropped"):
        session.unmask({"survivors": both + [str(n) for n in setup.nodes[2:]], "dropped": both})


def test_the_server_only_ever_holds_masked_vectors_each_indistinguishable_from_uniform() -> None:
    setup = _setup(6)
    inputs = {node: np.zeros(LENGTH * 64, dtype=setup.fixed.dtype) for node in setup.nodes}  # all-zero inputs
    seen: list[np.ndarray] = []
    original = Aggregator.on_masked

    def spy(self: Aggregator, node: int, reply: dict[str, object]) -> object:
        seen.append(np.frombuffer(reply["masked"], dtype=setup.fixed.dtype))  # type: ignore[arg-type]
        return original(self, node, reply)

    Aggregator.on_masked = spy  # type: ignore[method-assign]
    try:
        _, total = run_protocol(setup, inputs, length=LENGTH * 64)
    finally:
        Aggregator.on_masked = original  # type: ignore[method-assign]
    assert not total.any()
    for vector in seen:
        top = (vector >> np.uint64(setup.fixed.ring_bits - 4)).astype(np.int64)
        counts = np.bincount(top, minlength=16)
        expected = vector.size / 16
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 42.0  # chi-square(15) at 0.9999: zeros masked look uniform


def test_with_three_nodes_one_dropping_after_sharing_is_recovered_because_nodes_hold_a_share_of_their_own():
    setup = _setup(3)
    assert (setup.threshold, setup.degree) == (2, 2)
    inputs = _inputs(setup)
    _, total = run_protocol(setup, inputs, drop_before_mask={setup.nodes[0]})
    assert np.array_equal(total, _expected(setup, inputs, list(setup.nodes[1:])))


def test_nodes_rebuild_the_graph_from_its_degree_and_seed_instead_of_downloading_it():
    setup = _setup(40)
    config = setup.to_config()
    assert "graph" not in config and len(str(config)) < 2000
    assert RoundSetup.from_config(config).neighbours == setup.neighbours
