"""The server's input is bounded and honest: size cap before parsing, the run's sparsifier, bound identities."""

from __future__ import annotations

import time

import pytest
import torch
from flwr.app import Context, RecordDict

from fedfuse.algebra import SparseTensor, Sparsifier, dare_drop, ties_trim
from fedfuse.client.app import shard_of
from fedfuse.rounds import RoundEngine
from fedfuse.settings import RunSettings
from fedfuse.wire import UpdateHeader, encode_update, fingerprint, max_update_bytes

pytestmark = pytest.mark.unit

SHAPES = {"w": (300, 200), "b": (200,)}
BASE = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
FINGERPRINT = fingerprint(BASE)


def _engine(**run_config) -> RoundEngine:
    settings = RunSettings.from_run_config({}, **{"mode": "full", **run_config})
    return settings.round_engine(
        settings.update_space(SHAPES, 1.0), round_number=1, run_id="run", base_fingerprint=FINGERPRINT
    )


def _header(node: str, sparsifier: Sparsifier | None = None) -> UpdateHeader:
    return UpdateHeader("run", 1, FINGERPRINT, node, 10, sparsifier or Sparsifier())


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def test_the_default_cap_admits_any_honest_update_and_refuses_a_larger_payload_unparsed() -> None:
    tensors = _tensors()
    fisher = {name: t.abs() for name, t in tensors.items()}
    honest = encode_update(tensors, header=_header("1"), fisher=fisher)
    assert len(honest) < max_update_bytes(SHAPES)
    engine = _engine()
    assert engine.offer(honest, sender="1") is None
    oversized = b"\0" * (max_update_bytes(SHAPES) + 1)
    started = time.perf_counter()
    rejection = engine.offer(oversized, sender="2")
    assert rejection is not None and rejection.reason == "too_large"
    assert time.perf_counter() - started < 0.5


def test_max_update_bytes_in_the_run_config_overrides_the_derived_cap() -> None:
    payload = encode_update(_tensors(), header=_header("1"))
    rejection = _engine(**{"max-update-bytes": len(payload) - 1}).offer(payload, sender="1")
    assert rejection is not None and rejection.reason == "too_large"


def test_a_dare_payload_declaring_another_density_is_refused_before_its_mask_is_regenerated() -> None:
    engine = _engine(sparsifier="dare", density=0.1)
    bomb = SparseTensor(torch.zeros(0, dtype=torch.int64), torch.zeros(0), torch.Size(SHAPES["w"]), 5, 1e-9)
    dense_b = dare_drop(_tensors()["b"], 0.1, 3)
    payload = encode_update({"w": bomb, "b": dense_b}, header=_header("1", Sparsifier("dare", 0.1)))
    rejection = engine.offer(payload, sender="1")
    assert rejection is not None and rejection.reason == "sparsifier_mismatch" and "1e-09" in rejection.message


def test_an_update_shrunk_otherwise_than_the_run_says_is_refused() -> None:
    trimmed = {name: ties_trim(t, 0.5) for name, t in _tensors().items()}
    rejection = _engine().offer(encode_update(trimmed, header=_header("1", Sparsifier("trim", 0.5))), sender="1")
    assert rejection is not None and rejection.reason == "sparsifier_mismatch"
    honest = encode_update(trimmed, header=_header("1", Sparsifier("trim", 0.5)))
    assert _engine(sparsifier="trim", density=0.5).offer(honest, sender="1") is None


def test_an_unsigned_node_cannot_send_under_another_nodes_name_nor_suppress_it() -> None:
    engine = _engine()
    impostor = encode_update(_tensors(1), header=_header("5"))
    rejection = engine.offer(impostor, sender="6")
    assert rejection is not None and rejection.reason == "sender_mismatch"
    assert engine.offer(encode_update(_tensors(2), header=_header("5")), sender="5") is None
    assert engine.offer(encode_update(_tensors(3), header=_header("6")), sender="6") is None
    assert engine.accepted == ["5", "6"]


def _context(node_config: dict) -> Context:
    return Context(
        run_id=1,
        node_id=4242,
        node_config={"partition-id": 0, "num-partitions": 2, **node_config},
        state=RecordDict(),
        run_config={},
    )


def test_a_fedfuse_client_names_its_flower_node_unless_it_signs_as_its_institution() -> None:
    unsigned = shard_of(_context({}))
    assert (unsigned.header_node, unsigned.node_name) == ("4242", "partition-0")
    signed = shard_of(_context({"institution": "clinic-a", "signing-key": "/keys/clinic-a.key"}))
    assert (signed.header_node, signed.node_name) == ("clinic-a", "clinic-a")
