"""SecAgg+ through FedMerge and the client mod: the secure merge equals the plain one within the fixed point.

Nodes are in-process (``mod_grid.ModGrid``) but run the real mod chain — ``secure_aggregation_mod`` before
``task_vector_mod`` — around a Flower-style train handler that returns trained weights.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from mod_grid import ModGrid

from fedfuse.flower import FedMerge, SecAggParams, secure_aggregation_mod, signing_mod, task_vector_mod
from fedfuse.messages import SECAGG_RECORD, SECAGG_VECTOR_RECORD
from fedfuse.security import Registry, write_institution_keys

pytestmark = pytest.mark.integration

SHAPES = {"w": (6, 5), "b": (5,)}
NODES = [101, 102, 103, 104, 105, 2**63 + 7]


def _handler(msg: Message, context: Context) -> Message:
    """'Training': received weights plus a seeded change; Fisher diagonals beside them; examples by node."""
    received = msg.content.array_records["arrays"].to_torch_state_dict()
    generator = torch.Generator().manual_seed(context.node_id % 1000)
    trained = {name: t + 0.05 * torch.randn(t.shape, generator=generator) for name, t in received.items()}
    fisher = {name: torch.rand(t.shape, generator=generator) + 0.1 for name, t in received.items()}
    examples = 10 + context.node_id % 7
    content = RecordDict(
        {
            "arrays": ArrayRecord(trained),
            "fisher": ArrayRecord(fisher),
            "metrics": MetricRecord({"num-examples": examples}),
        }
    )
    return Message(content, reply_to=msg)


def _initial() -> ArrayRecord:
    generator = torch.Generator().manual_seed(0)
    return ArrayRecord({name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()})


def _run(method: str, secure: bool, grid: ModGrid | None = None, **params):
    mods = (
        [secure_aggregation_mod, task_vector_mod(sparsifier="none")] if secure else [task_vector_mod(sparsifier="none")]
    )
    grid = grid or ModGrid(NODES, _handler, mods)
    count = len(grid.nodes)
    strategy = FedMerge(
        method, sparsifier="none", fraction_evaluate=0.0, min_available_nodes=count, min_train_nodes=count,
        secure_aggregation="secagg+" if secure else None, **params,
    )  # fmt: skip
    result = strategy.start(grid, _initial(), num_rounds=1, timeout=2.0)
    return strategy, result


@pytest.mark.parametrize(
    ("method", "params"),
    [("fedavg", {}), ("task_arithmetic", {"lam": 0.7}), ("linear", {}), ("ties", {}), ("ties", {"vote": "count"}),
     ("fisher", {}), ("model_stock", {})],
)  # fmt: skip
def test_the_secure_merge_equals_the_plain_merge_within_the_stated_quantization_error(server_identity, method, params):
    _, plain = _run(method, False, **params)
    _, secure = _run(method, True, **params)
    metrics = secure.train_metrics_clientapp[1]
    assert metrics["accepted"] == len(NODES) and metrics["secagg-survivors"] == len(NODES)
    assert metrics["secagg-clipped-values"] == 0
    bound = float(metrics["secagg-error-bound"])
    assert 0 < bound < 2e-5  # 6 nodes, 29 bits (the most a 32-bit ring allows), range ±1024
    expected, got = plain.arrays.to_torch_state_dict(), secure.arrays.to_torch_state_dict()
    for name in SHAPES:
        # each summed statistic is off by at most `bound`; a merge divides them by sums of weights ≥ 1
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=bound)
        assert not torch.equal(got[name], _initial().to_torch_state_dict()[name])


def test_a_node_killed_after_sharing_is_recovered_and_left_out(server_identity):
    grid = ModGrid(NODES, _handler, [secure_aggregation_mod, task_vector_mod(sparsifier="none")])
    grid.silent[NODES[2]] = "mask"
    strategy, secure = _run("fedavg", True, grid)
    metrics = secure.train_metrics_clientapp[1]
    assert (metrics["secagg-survivors"], metrics["secagg-dropped"]) == (len(NODES) - 1, 1)
    assert [r.reason for r in strategy.last_rejections] == ["timed_out"]
    survivors = [n for n in NODES if n != NODES[2]]
    _, plain = _run(
        "fedavg",
        False,
        ModGrid(survivors, _handler, [task_vector_mod(sparsifier="none")]),
    )
    for name, tensor in plain.arrays.to_torch_state_dict().items():
        torch.testing.assert_close(secure.arrays.to_torch_state_dict()[name], tensor, rtol=0, atol=1e-5)


def test_a_node_the_superlink_reports_unavailable_is_dropped_once_under_its_own_id(server_identity):
    grid = ModGrid(NODES, _handler, [secure_aggregation_mod, task_vector_mod(sparsifier="none")])
    grid.unavailable[NODES[1]] = "mask"
    strategy, secure = _run("fedavg", True, grid)
    assert [(r.node, r.reason) for r in strategy.last_rejections] == [(str(NODES[1]), "node_unavailable")]
    assert secure.train_metrics_clientapp[1]["secagg-dropped"] == 1


def test_too_few_survivors_abort_the_round_and_nothing_is_merged(server_identity):
    grid = ModGrid(NODES, _handler, [secure_aggregation_mod, task_vector_mod(sparsifier="none")])
    for node in NODES[:5]:
        grid.silent[node] = "mask"
    strategy, secure = _run("fedavg", True, grid)
    assert secure.train_metrics_clientapp[1]["secagg-aborted"] == 1
    assert "secagg_aborted" in [r.reason for r in strategy.last_rejections]
    assert len(secure.arrays) == 0  # no round produced new weights: the global model stays


def test_the_server_never_folds_one_nodes_update(server_identity, monkeypatch):
    from fedfuse.rounds import RoundEngine

    def forbidden(*args, **kwargs):
        raise AssertionError("the engine was offered an individual update")

    monkeypatch.setattr(RoundEngine, "offer", forbidden)
    monkeypatch.setattr(RoundEngine, "offer_task_vector", forbidden)
    _, secure = _run("fedavg", True)
    assert secure.train_metrics_clientapp[1]["accepted"] == len(NODES)


def test_fedmerge_refuses_secure_aggregation_with_a_robust_method_or_central_dp():
    with pytest.raises(ValueError, match="sum"):
        FedMerge("median", secure_aggregation="secagg+")
    with pytest.raises(ValueError, match="central DP"):
        FedMerge("fedavg", secure_aggregation=SecAggParams(), dp="central", weighting="uniform")
    with pytest.raises(ValueError, match="'none' or 'secagg\\+'"):
        FedMerge("fedavg", secure_aggregation="paillier")


def _signed_grid(tmp_path, unsigned: int | None = None) -> tuple[ModGrid, Registry]:
    names = {node: f"inst-{i}" for i, node in enumerate(NODES)}
    config, keys = {}, {}
    for node, name in names.items():
        paths = write_institution_keys(tmp_path, name)
        keys[name] = paths["update_signing_public"].read_text()
        config[node] = (
            {"institution": name}
            if node == unsigned
            else {"institution": name, "signing-key": str(paths["update_signing_private"])}
        )
    mods = [secure_aggregation_mod, signing_mod(None), task_vector_mod(sparsifier="none")]
    return ModGrid(NODES, _handler, mods, node_config=config), Registry(keys)


def test_signed_stage_replies_are_checked_an_unsigned_node_is_refused_and_tampered_replies_are_dropped(
    server_identity, tmp_path
):
    grid, registry = _signed_grid(tmp_path, unsigned=NODES[0])
    altered, corrupted = NODES[3], -1

    def tamper(node: int, reply: Message) -> Message:
        record = reply.content.config_records.get(SECAGG_RECORD)
        if record is None or record["stage"] != "mask":
            return reply
        if node == altered:  # a signed field changed in transit
            record["unreadable"] = [str(NODES[1])]
        if node == corrupted:  # the masked vector changed in transit: it no longer matches its signed SHA-256
            record = reply.content.array_records[SECAGG_VECTOR_RECORD]
            data = record["payload"].numpy().copy()
            data[0] ^= 1
            record["payload"] = Array(data)
        return reply

    grid.tamper = tamper
    strategy, secure = _run("fedavg", True, grid, registry=registry)
    reasons = {r.node: r.reason for r in strategy.last_rejections}
    assert reasons == {"101": "unsigned", "inst-3": "bad_signature"}
    metrics = secure.train_metrics_clientapp[1]
    assert metrics["signatures-verified"] == 5 + 5 + 4 + 4  # advertise, share, mask (one altered), unmask
    assert (metrics["secagg-survivors"], metrics["secagg-dropped"]) == (len(NODES) - 2, 1)
    _assert_merges_like_plain(secure, [n for n in NODES if n not in (NODES[0], altered)])
    corrupt_only, registry = _signed_grid(tmp_path / "again")
    corrupt_only.tamper = tamper
    altered, corrupted = -1, NODES[4]  # this time only a masked vector is changed
    strategy, secure = _run("fedavg", True, corrupt_only, registry=registry)
    assert {r.node: r.reason for r in strategy.last_rejections} == {"inst-4": "secagg_protocol"}
    assert "does not match its SHA-256" in strategy.last_rejections[0].message
    _assert_merges_like_plain(secure, [n for n in NODES if n != corrupted])


def _assert_merges_like_plain(secure, survivors: list[int]) -> None:
    _, plain = _run("fedavg", False, ModGrid(survivors, _handler, [task_vector_mod(sparsifier="none")]))
    for name, tensor in plain.arrays.to_torch_state_dict().items():
        torch.testing.assert_close(secure.arrays.to_torch_state_dict()[name], tensor, rtol=0, atol=1e-5)
