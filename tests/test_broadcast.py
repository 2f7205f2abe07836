"""The downlink: each round's change sent in its smallest form, model versions, and nodes brought up to date."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from flwr.app import RecordDict

from fedfuse.algebra.low_rank import LowRank
from fedfuse.client.node_model import load_change, synced_change
from fedfuse.messages import SYNC_CONFIG_RECORD, SYNC_RECORD, read_sync, sync_records
from fedfuse.rounds import (
    Broadcaster,
    BroadcastPolicy,
    Delta,
    ModelChange,
    Sync,
    VersionLog,
    VersionMismatch,
    apply_delta,
    base_version,
    next_version,
)

# Tiers are marked per test here: this module mixes e2e and unit tests.

BASE = base_version({"model": "tiny", "task": "sft", "labels": "", "seed": "0"})


def low_rank(seed: int, out: int = 48, inner: int = 40, rank: int = 4) -> LowRank:
    generator = torch.Generator().manual_seed(seed)
    return LowRank(torch.randn(out, rank, generator=generator), torch.randn(rank, inner, generator=generator))


def merged_round(seed: int) -> dict[str, torch.Tensor | LowRank]:
    """What a linear LoRA merge hands the broadcaster: a factored matrix and a small dense head."""
    generator = torch.Generator().manual_seed(100 + seed)
    return {"layer.q.weight": low_rank(seed), "score.weight": torch.randn(3, 8, generator=generator)}


@pytest.mark.unit
def test_a_factored_change_travels_as_its_factors_exactly():
    delta, error = Broadcaster(BroadcastPolicy("factors")).delta(merged_round(0))
    assert isinstance(delta.tensors["layer.q.weight"], LowRank) and error == 0.0
    dense, _ = Broadcaster(BroadcastPolicy("dense")).delta(merged_round(0))
    assert delta.nbytes == 4 * (4 * (48 + 40) + 3 * 8) < dense.nbytes == 4 * (48 * 40 + 3 * 8)
    applied_factors, applied_dense = {}, {}
    apply_delta(applied_factors, delta)
    apply_delta(applied_dense, dense)
    assert torch.equal(applied_factors["layer.q.weight"], applied_dense["layer.q.weight"]), "same bits either way"


@pytest.mark.unit
def test_svd_broadcast_keeps_what_it_leaves_out_for_the_next_round():
    """Server-side error feedback: what was sent plus what is kept is exactly what the merges asked for."""
    broadcaster = Broadcaster(BroadcastPolicy("svd", rank=2))
    wanted = torch.zeros(48, 40)
    sent: dict[str, torch.Tensor] = {}
    for seed in range(3):
        merged = merged_round(seed)
        wanted += merged["layer.q.weight"].dense()
        delta, error = broadcaster.delta(merged)
        assert 0.0 < error < 1.0
        assert isinstance(delta.tensors["layer.q.weight"], LowRank) and delta.tensors["layer.q.weight"].rank == 2
        apply_delta(sent, delta)
    torch.testing.assert_close(
        sent["layer.q.weight"] + broadcaster.residual["layer.q.weight"], wanted, atol=1e-4, rtol=0
    )


@pytest.mark.unit
def test_a_reduced_precision_broadcast_is_what_both_sides_apply():
    delta, error = Broadcaster(BroadcastPolicy("factors", dtype="bfloat16")).delta(merged_round(1))
    assert delta.tensors["layer.q.weight"].b.dtype == torch.bfloat16 and 0.0 < error < 1e-2
    server, node = ModelChange(BASE), ModelChange(BASE)
    step = server.advance(delta)
    record, config = sync_records(Sync(step.target, (step,)))
    node.catch_up(read_sync(RecordDict({SYNC_RECORD: record, SYNC_CONFIG_RECORD: config})))
    assert node.version == server.version
    for name in server.tensors:
        assert torch.equal(node.tensors[name], server.tensors[name])


@pytest.mark.unit
def test_versions_chain_the_deltas():
    delta, _ = Broadcaster().delta(merged_round(0))
    assert next_version(BASE, delta) == next_version(BASE, delta) != BASE
    other, _ = Broadcaster().delta(merged_round(1))
    assert next_version(BASE, other) != next_version(BASE, delta)
    assert base_version({"model": "a"}) != base_version({"model": "b"})


def _log_with_rounds(rounds: int) -> VersionLog:
    log = VersionLog(ModelChange(BASE))
    for seed in range(rounds):
        log.advance(Broadcaster().delta(merged_round(seed))[0])
    return log


@pytest.mark.unit
def test_the_server_sends_each_node_what_it_lacks():
    log = VersionLog(ModelChange(BASE))
    assert log.sync_for(1).state is not None  # a node the server does not know gets the whole change
    assert log.sync_for(1) == Sync(BASE)  # then nothing, while it is at the current version
    first = log.advance(Broadcaster().delta(merged_round(0))[0])
    log.advance(Broadcaster().delta(merged_round(1))[0])
    behind = log.sync_for(1)
    assert [step.source for step in behind.steps] == [BASE, first.target] and behind.state is None
    log.forget(1)
    assert log.sync_for(1).state is not None


@pytest.mark.unit
def test_steps_are_dropped_once_the_whole_change_is_cheaper():
    log = VersionLog(ModelChange(BASE))
    log.nodes[7] = BASE
    for seed in range(40):  # 40 rank-4 deltas outweigh one dense 48×40 change
        log.advance(Broadcaster(BroadcastPolicy("factors")).delta({"layer.q.weight": low_rank(seed)})[0])
    assert sum(step.delta.nbytes for step in log.steps) <= log.change.nbytes
    assert log.sync_for(7).state is not None


@pytest.mark.unit
def test_a_node_catches_up_bit_identically_and_refuses_a_delta_for_another_version():
    server = _log_with_rounds(3)
    node = ModelChange(BASE)
    node.catch_up(Sync(server.version, tuple(server.steps)))
    for name, tensor in server.change.tensors.items():
        assert torch.equal(node.tensors[name], tensor)
    stale = ModelChange(BASE)
    with pytest.raises(VersionMismatch, match="version_mismatch: this node holds"):
        stale.catch_up(Sync(server.version, tuple(server.steps[1:])))
    assert stale.version == BASE and not stale.tensors  # nothing applied


@pytest.mark.unit
def test_the_sync_travels_in_flower_records_and_back(tmp_path):
    server = _log_with_rounds(2)
    for sync in (server.sync_for(3), Sync(server.version, tuple(server.steps))):
        record, config = sync_records(sync)
        content = RecordDict({SYNC_RECORD: record, SYNC_CONFIG_RECORD: config})
        back = read_sync(content)
        assert back is not None and back.version == sync.version and back.nbytes == sync.nbytes
    assert read_sync(RecordDict()) is None


@pytest.mark.unit
def test_a_node_keeps_its_change_on_disk_and_a_lost_one_is_refused(tmp_path):
    server = _log_with_rounds(1)
    folder = tmp_path / "node"
    record, config = sync_records(server.sync_for(5))
    change = synced_change(RecordDict({SYNC_RECORD: record, SYNC_CONFIG_RECORD: config}), folder)
    assert change.version == server.version == load_change(folder).version
    server.advance(Broadcaster().delta(merged_round(9))[0])
    record, config = sync_records(server.sync_for(5))
    assert (
        synced_change(RecordDict({SYNC_RECORD: record, SYNC_CONFIG_RECORD: config}), folder).version == server.version
    )
    for leftover in folder.iterdir():
        leftover.unlink()  # the node lost its state (a new machine)
    server.advance(Broadcaster().delta(merged_round(10))[0])
    record, config = sync_records(server.sync_for(5))
    with pytest.raises(VersionMismatch):
        synced_change(RecordDict({SYNC_RECORD: record, SYNC_CONFIG_RECORD: config}), folder)


APPLY = textwrap.dedent(
    """
    import hashlib, sys, torch
    from fedfuse.algebra.low_rank import LowRank
    from fedfuse.rounds import Broadcaster, ModelChange
    torch.set_num_threads(int(sys.argv[1]))
    change = ModelChange("v:0")
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        merged = {"w": LowRank(torch.randn(256, 32, generator=g), torch.randn(32, 192, generator=g))}
        change.advance(Broadcaster().delta(merged)[0])
    print(change.version, hashlib.sha256(change.tensors["w"].numpy().tobytes()).hexdigest())
    """
)


@pytest.mark.e2e
def test_the_same_deltas_in_the_same_order_give_bit_identical_weights_across_processes():
    outputs = {
        subprocess.run([sys.executable, "-c", APPLY, str(threads)], capture_output=True, text=True, check=True).stdout
        for threads in (1, 2)
    }
    assert len(outputs) == 1, outputs


@pytest.mark.unit
def test_a_delta_that_does_not_fit_the_model_changes_nothing():
    change = {"w": torch.zeros(4, 4)}
    with pytest.raises(ValueError, match="shape"):
        apply_delta(change, Delta({"v": LowRank(torch.ones(3, 1), torch.ones(1, 3)), "w": torch.ones(2, 2)}))
    assert set(change) == {"w"} and torch.equal(change["w"], torch.zeros(4, 4))


@pytest.mark.unit
def test_the_server_returns_large_freed_temporaries_to_the_system_on_linux():
    from fedfuse.server.memory import return_large_frees_to_the_system

    assert return_large_frees_to_the_system() is sys.platform.startswith("linux")
