"""Payload mutations and the decoder's contract under them, shared by the fuzz test and the bench.

The contract: a mutated payload either raises :class:`UpdateRejected` (with a known reason other
than the catch-all ``malformed_payload``) or decodes to exactly the original update. A header
edit that is re-checksummed ("resigned", as a buggy or hostile sender would) may be accepted as a
different update, but only one that still satisfies every invariant the decoder promises.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import safetensors.torch
import torch

from fedfuse.algebra import SparseTensor, Sparsifier, dare_drop, ties_trim
from fedfuse.wire.container import CRC_FIELD, HEADER_KEY, checksum
from fedfuse.wire.errors import REASONS, UpdateRejected
from fedfuse.wire.header import Expectation, UpdateHeader
from fedfuse.wire.update import DecodedUpdate, decode_update, encode_update


@dataclass(frozen=True)
class BitFlip:
    """Flip bit ``bit`` of byte ``position % len(payload)``."""

    position: int
    bit: int


@dataclass(frozen=True)
class Overwrite:
    """Write ``data`` over the payload from ``position % len(payload)`` (clipped at the end)."""

    position: int
    data: bytes


@dataclass(frozen=True)
class Truncate:
    """Keep the first ``keep % len(payload)`` bytes."""

    keep: int


@dataclass(frozen=True)
class Append:
    """Append ``data`` after the payload."""

    data: bytes


HeaderOp = Literal["set", "remove", "add"]
BlobOp = Literal["flip", "overwrite", "truncate", "append"]
HEADER_OPS: tuple[HeaderOp, ...] = ("set", "remove", "add")
BLOB_OPS: tuple[BlobOp, ...] = ("flip", "overwrite", "truncate", "append")


@dataclass(frozen=True)
class HeaderEdit:
    """Edit the fedfuse header JSON at node ``path_index % number_of_nodes``, then rebuild the payload.

    op: ``"set"`` replaces the node with ``value``; ``"remove"`` deletes it; ``"add"`` adds a key
    (or list item) ``value`` next to or inside it. resign: recompute the CRC32 so the edit reaches
    the semantic checks (otherwise the checksum must catch it).
    """

    path_index: int
    op: HeaderOp
    value: Any = None
    resign: bool = True


@dataclass(frozen=True)
class BlobEdit:
    """Edit byte blob ``blob_index % number_of_blobs`` (sorted keys), then rebuild the payload.

    op: ``"flip"`` flips bit ``position % 8`` of byte ``position // 8``; ``"overwrite"`` writes
    ``data`` at ``position``; ``"truncate"`` keeps ``position`` bytes; ``"append"`` adds ``data``.
    Positions wrap around the blob. resign: recompute the CRC32, so the index and value
    validators (not the checksum) must catch the edit.
    """

    blob_index: int
    op: BlobOp
    position: int = 0
    data: bytes = b"\x00"
    resign: bool = True


Mutation = BitFlip | Overwrite | Truncate | Append | HeaderEdit | BlobEdit

# fmt: off
INTERESTING_VALUES: tuple[Any, ...] = (
    0, 1, -1, 2, 3, 7, 8, 255, 2**31, 2**53 + 1, 2**63, 2**64, 2**64 + 5, -(2**63), 10**13,
    0.0, 0.5, 1.0, 1.5, -0.1, 1e308, float("nan"), float("inf"), True, False, None, "", "x",
    "dense", "bitmap", "delta", "dare", "float32", "bfloat16", "float16", "float64", "int8",
    "trim", "fedfuse-update", "fedfuse-partial", [], [0], [1, 2], [3, 0], [-1], [2**62, 2**62],
    {}, {"a": 1},
)
# fmt: on
"""Values a header edit writes: boundaries, wrong types, other enum members, non-finite numbers."""


def _nodes(document: Any, prefix: tuple = ()) -> list[tuple]:
    """Paths (tuples of keys / list positions) of every node under ``document``, root excluded."""
    paths: list[tuple] = []
    if isinstance(document, dict):
        items = list(document.items())
    elif isinstance(document, list):
        items = list(enumerate(document))
    else:
        items = []
    for key, child in items:
        paths.append((*prefix, key))
        paths.extend(_nodes(child, (*prefix, key)))
    return paths


def _edit(document: dict, edit: HeaderEdit) -> None:
    paths = _nodes(document)
    path = paths[edit.path_index % len(paths)]
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    node = parent[last]
    if edit.op == "set":
        parent[last] = edit.value
    elif edit.op == "remove":
        del parent[last]
    elif isinstance(node, dict):
        node[f"fuzz{edit.path_index % 7}"] = edit.value
    elif isinstance(node, list):
        node.append(edit.value)
    elif isinstance(parent, dict):
        parent[f"{last}_fuzz"] = edit.value
    else:
        parent.append(edit.value)


def _read_raw(payload: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    """The header document (with its CRC field) and the blobs of a well-formed payload."""
    header_length = int.from_bytes(payload[:8], "little")
    metadata = json.loads(payload[8 : 8 + header_length])["__metadata__"]
    return json.loads(metadata[HEADER_KEY]), safetensors.torch.load(payload)


def _rebuild(document: dict, blobs: dict[str, torch.Tensor], resign: bool) -> bytes:
    """A payload from an edited header and blobs; ``resign`` recomputes the CRC as the encoder does."""

    def dumps(doc: dict) -> str:
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))

    if resign:
        unsigned = {k: v for k, v in document.items() if k != CRC_FIELD}
        document = {**unsigned, CRC_FIELD: checksum(dumps(unsigned), blobs)}
    return safetensors.torch.save(blobs, metadata={HEADER_KEY: dumps(document)})


def apply_mutation(payload: bytes, mutation: Mutation) -> bytes:
    """The payload after one mutation (header edits need a well-formed payload to start from)."""
    size = len(payload)
    if size == 0 and isinstance(mutation, (BitFlip, Overwrite, Truncate)):
        return payload
    if isinstance(mutation, BitFlip):
        out = bytearray(payload)
        out[mutation.position % size] ^= 1 << (mutation.bit % 8)
        return bytes(out)
    if isinstance(mutation, Overwrite):
        start = mutation.position % size
        chunk = mutation.data[: size - start]
        return payload[:start] + chunk + payload[start + len(chunk) :]
    if isinstance(mutation, Truncate):
        return payload[: mutation.keep % size]
    if isinstance(mutation, Append):
        return payload + mutation.data
    document, blobs = _read_raw(payload)
    if isinstance(mutation, BlobEdit):
        _edit_blob(blobs, mutation)
    else:
        _edit(document, mutation)
    return _rebuild(document, blobs, mutation.resign)


def _edit_blob(blobs: dict[str, torch.Tensor], edit: BlobEdit) -> None:
    if not blobs:
        return
    key = sorted(blobs)[edit.blob_index % len(blobs)]
    data = bytearray(blobs[key].numpy().tobytes())
    if edit.op == "append":
        data += edit.data
    elif edit.op == "truncate":
        del data[edit.position % (len(data) + 1) :]
    elif data and edit.op == "flip":
        data[(edit.position // 8) % len(data)] ^= 1 << (edit.position % 8)
    elif data:
        start = edit.position % len(data)
        chunk = edit.data[: len(data) - start]
        data[start : start + len(chunk)] = chunk
    blobs[key] = torch.frombuffer(data, dtype=torch.uint8).clone() if data else torch.zeros(0, dtype=torch.uint8)


def _bits(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1).contiguous().view(torch.uint8)


def same_tensor(a: torch.Tensor | SparseTensor, b: torch.Tensor | SparseTensor) -> bool:
    """Bit-identical tensors (dtype, shape, values; for sparse ones also indices and DARE seed/density)."""
    if type(a) is not type(b) or tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
        return False
    if isinstance(a, SparseTensor) and isinstance(b, SparseTensor):
        return (
            torch.equal(a.indices, b.indices)
            and torch.equal(_bits(a.values), _bits(b.values))
            and (a.dare_seed, a.dare_density) == (b.dare_seed, b.dare_density)
        )
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    return torch.equal(_bits(a), _bits(b))


def same_update(a: DecodedUpdate, b: DecodedUpdate) -> bool:
    """Two decoded updates are identical: header, value dtype, tensors and Fisher diagonals."""
    if a.header != b.header or a.value_dtype != b.value_dtype or set(a.tensors) != set(b.tensors):
        return False
    if (a.fisher is None) != (b.fisher is None) or set(a.fisher or {}) != set(b.fisher or {}):
        return False
    fisher_a, fisher_b = a.fisher or {}, b.fisher or {}
    tensors_same = all(same_tensor(a.tensors[name], b.tensors[name]) for name in a.tensors)
    return tensors_same and all(same_tensor(fisher_a[name], fisher_b[name]) for name in fisher_a)


def check_invariants(update: DecodedUpdate, expect: Expectation) -> None:
    """Assert what any accepted update guarantees: expected names/shapes, valid support, finite values."""
    for name, tensor in update.tensors.items():
        assert tuple(tensor.shape) == expect.shapes[name], f"{name}: shape {tuple(tensor.shape)}"
        values = tensor.values if isinstance(tensor, SparseTensor) else tensor
        assert bool(torch.isfinite(values).all()), f"{name}: non-finite values accepted"
        if isinstance(tensor, SparseTensor):
            idx = tensor.indices
            assert idx.numel() == values.numel(), f"{name}: {idx.numel()} indices, {values.numel()} values"
            assert idx.numel() == 0 or (int(idx[0]) >= 0 and int(idx[-1]) < tensor.numel), f"{name}: index range"
            assert bool((idx[1:] > idx[:-1]).all()), f"{name}: indices not strictly increasing"
        fisher = (update.fisher or {}).get(name)
        if fisher is not None:
            fvalues = fisher.values if isinstance(fisher, SparseTensor) else fisher
            assert bool((fvalues >= 0).all()) and bool(torch.isfinite(fvalues).all()), f"{name}: bad Fisher"
    if not expect.allow_missing:
        assert set(update.tensors) == set(expect.shapes), "missing tensors accepted"


class Escaped(AssertionError):
    """The decoder broke its contract on a mutated payload (the message says how)."""


def check_mutated(original: DecodedUpdate, mutated: bytes, expect: Expectation, strict: bool) -> str:
    """Decode ``mutated`` and check the contract; returns ``"rejected:<reason>"``, ``"identical"`` or ``"changed"``.

    strict: the mutation was not resigned, so an accepted payload must equal ``original``.
    Raises :class:`Escaped` on a broken contract; any exception other than UpdateRejected propagates.
    """
    try:
        decoded = decode_update(mutated, expect=expect)
    except UpdateRejected as exc:
        if exc.reason not in REASONS or exc.reason == "malformed_payload":
            raise Escaped(f"unforeseen failure: {exc}") from exc
        return f"rejected:{exc.reason}"
    if same_update(decoded, original):
        return "identical"
    if strict:
        raise Escaped("an altered payload decoded to a different update")
    try:
        check_invariants(decoded, expect)
    except AssertionError as exc:
        raise Escaped(f"accepted an update that breaks an invariant: {exc}") from exc
    return "changed"


@dataclass(frozen=True)
class FuzzCase:
    """A valid payload, the expectation it meets, and its decoded form."""

    name: str
    payload: bytes
    expect: Expectation
    original: DecodedUpdate


def sample_cases(seed: int = 0) -> list[FuzzCase]:
    """Small payloads covering every encoding and value dtype, Fisher, 0-d and empty tensors."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    header = UpdateHeader("run-a", 4, "sha256:base", "node-1", num_examples=12, metrics={"loss": 0.25, "steps": 3})
    dare = Sparsifier("dare", 0.5)
    specs: list[tuple[str, dict, str, dict | None, UpdateHeader]] = [
        (
            "dense-fp32",
            {"w": randn(3, 5), "b": randn(5), "s": torch.randn((), generator=generator)},
            "float32",
            None,
            header,
        ),
        ("trim-delta-bf16", {"w": ties_trim(randn(40, 9), 0.1), "b": randn(7)}, "bfloat16", None, header),
        (
            "trim-bitmap-fp16-fisher",
            {"w": ties_trim(randn(13, 5), 0.6), "e": ties_trim(randn(0, 4), 0.5)},
            "float16",
            {"w": randn(13, 5).abs()},
            header,
        ),
        (
            "dare-fp32",
            {"w": dare_drop(randn(6, 10), 0.5, 1234), "b": dare_drop(randn(9), 0.5, 99)},
            "float32",
            None,
            UpdateHeader("run-a", 4, "sha256:base", 2, sparsifier=dare),
        ),
    ]
    cases = []
    for name, tensors, dtype, fisher, case_header in specs:
        payload = encode_update(tensors, header=case_header, value_dtype=dtype, fisher=fisher)
        expect = Expectation(
            {key: tuple(t.shape) for key, t in tensors.items()},
            round=4,
            run_id="run-a",
            base_fingerprint="sha256:base",
            max_bytes=1 << 20,
        )
        cases.append(FuzzCase(name, payload, expect, decode_update(payload, expect=expect)))
    return cases


def random_mutation(rng: random.Random) -> Mutation:
    """One random mutation (header edits weighted double: they reach the most checks)."""
    kind = rng.randrange(7)
    if kind == 0:
        return BitFlip(rng.randrange(1 << 20), rng.randrange(8))
    if kind == 1:
        return Overwrite(rng.randrange(1 << 20), rng.randbytes(rng.randrange(1, 9)))
    if kind == 2:
        return Truncate(rng.randrange(1 << 20))
    if kind == 3:
        return Append(rng.randbytes(rng.randrange(1, 17)))
    if kind == 4:
        data = rng.randbytes(rng.randrange(1, 5))
        return BlobEdit(rng.randrange(1 << 10), rng.choice(BLOB_OPS), rng.randrange(1 << 20), data, rng.random() < 0.8)
    return HeaderEdit(
        rng.randrange(1 << 20), rng.choice(HEADER_OPS), rng.choice(INTERESTING_VALUES), rng.random() < 0.8
    )


def mutate_and_check(case: FuzzCase, mutations: Sequence[Mutation]) -> str:
    """Apply ``mutations`` in order (a header or blob edit on an already broken payload is skipped) and check."""
    payload = case.payload
    strict = True
    for mutation in mutations:
        if isinstance(mutation, (HeaderEdit, BlobEdit)):
            if payload != case.payload:
                continue
            strict = strict and not mutation.resign
        payload = apply_mutation(payload, mutation)
    return check_mutated(case.original, payload, case.expect, strict)


@dataclass
class FuzzReport:
    """What a fuzz run saw: outcome counts and speed."""

    examples: int = 0
    seconds: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)

    @property
    def per_second(self) -> float:
        return self.examples / self.seconds if self.seconds else 0.0


def run_fuzz(examples: int, seed: int = 0) -> FuzzReport:
    """Mutate the sample payloads ``examples`` times (1–3 mutations each); raises :class:`Escaped` on a breach."""
    rng = random.Random(seed)
    cases = sample_cases(seed)
    report = FuzzReport()
    start = time.perf_counter()
    for _ in range(examples):
        case = rng.choice(cases)
        mutations = [random_mutation(rng) for _ in range(rng.randrange(1, 4))]
        outcome = mutate_and_check(case, mutations)
        report.outcomes[outcome] = report.outcomes.get(outcome, 0) + 1
        report.examples += 1
    report.seconds = time.perf_counter() - start
    return report
