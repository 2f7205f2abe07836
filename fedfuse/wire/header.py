"""The wire header: who made a payload, for which round and base, and how each tensor is coded.

:class:`UpdateHeader` is what a sender fills in; the encoder adds the value dtype and one
:class:`TensorEntry` per tensor; the container stores the document as one canonical JSON string
(sorted keys, no spaces, with its CRC32) in the safetensors ``__metadata__``. The decoder parses
it strictly: unknown, missing or mistyped fields are rejected, so a header has one meaning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fedfuse.algebra import Param, Sparsifier, sparsifier_spec
from fedfuse.wire.errors import UpdateRejected
from fedfuse.wire.values import VALUE_DTYPES

FORMAT_VERSION = 2
"""The only wire-format version this code writes and reads (2 added the sender's ``tier``)."""

UPDATE_FORMAT = "fedfuse-update"
PARTIAL_FORMAT = "fedfuse-partial"

MAX_NUM_EXAMPLES = 10**12
"""Largest ``num_examples`` accepted (a bigger count is a bug or an attempt to dominate FedAvg)."""

MAX_NDIM = 16
"""Most dimensions a wire tensor may have."""

Encoding = Literal["dense", "bitmap", "delta", "dare"]
ENCODINGS = ("dense", "bitmap", "delta", "dare")

MetricValue = int | float | str


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_metrics(metrics: Any) -> str | None:
    """None when ``metrics`` is a dict of str → int/float/str with finite floats, else why not."""
    if not isinstance(metrics, Mapping):
        return f"metrics must be a mapping, got {type(metrics).__name__}"
    for key, value in metrics.items():
        if not isinstance(key, str):
            return f"metric names must be strings, got {key!r}"
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return f"metric {key!r} must be an int, float or str, got {type(value).__name__}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"metric {key!r} is not finite ({value})"
    return None


@dataclass(frozen=True)
class UpdateHeader:
    """What a sender says about its payload (update or partial state).

    run_id: the run this belongs to. round: the server round (>= 0). base_fingerprint: the
    :func:`fedfuse.wire.fingerprint` of the round's global weights the task vector was taken
    against. node_id: the sender (client node or gateway). num_examples: local training examples
    (FedAvg weight), in [0, MAX_NUM_EXAMPLES]. sparsifier: how the update was shrunk. metrics:
    client metrics (str → int/float/str). tier: the group the sender merges in first ("" = none).
    The header is covered by the update's signature: it is the only source of these facts.
    """

    run_id: str
    round: int
    base_fingerprint: str
    node_id: str | int
    num_examples: int = 0
    sparsifier: Sparsifier = field(default_factory=Sparsifier)
    metrics: Mapping[str, MetricValue] = field(default_factory=dict)
    tier: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.run_id, str):
            raise ValueError(f"run_id must be a str, got {type(self.run_id).__name__}")
        if not _is_int(self.round) or self.round < 0:
            raise ValueError(f"round must be an int >= 0, got {self.round!r}")
        if not isinstance(self.base_fingerprint, str):
            raise ValueError(f"base_fingerprint must be a str, got {type(self.base_fingerprint).__name__}")
        if not (isinstance(self.node_id, str) or _is_int(self.node_id)):
            raise ValueError(f"node_id must be a str or int, got {type(self.node_id).__name__}")
        if not _is_int(self.num_examples) or not 0 <= self.num_examples <= MAX_NUM_EXAMPLES:
            raise ValueError(f"num_examples must be an int in [0, {MAX_NUM_EXAMPLES}], got {self.num_examples!r}")
        if not isinstance(self.sparsifier, Sparsifier):
            raise ValueError(f"sparsifier must be a fedfuse.algebra.Sparsifier, got {type(self.sparsifier).__name__}")
        if not isinstance(self.tier, str):
            raise ValueError(f"tier must be a str, got {type(self.tier).__name__}")
        problem = _check_metrics(self.metrics)
        if problem:
            raise ValueError(problem)
        object.__setattr__(self, "metrics", dict(self.metrics))


@dataclass(frozen=True)
class TensorEntry:
    """How one tensor is coded: shape, encoding, number of stored values, DARE seed/density, Fisher, Gram.

    ``gram``: a float32 in × in Gram matrix of the layer's inputs travels with this 2-D tensor (RegMean);
    the field is written only when true, so payloads without Grams read as before.
    """

    shape: tuple[int, ...]
    encoding: Encoding
    nnz: int
    seed: int | None = None
    density: float | None = None
    fisher: bool = False
    gram: bool = False

    @property
    def numel(self) -> int:
        """Entries of the dense tensor."""
        return math.prod(self.shape)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "shape": list(self.shape),
            "encoding": self.encoding,
            "nnz": self.nnz,
            "fisher": self.fisher,
        }
        if self.encoding == "dare":
            out["seed"] = self.seed
            out["density"] = self.density
        if self.gram:
            out["gram"] = True
        return out


@dataclass(frozen=True)
class Expectation:
    """What the receiver expects; a field left as None is not checked.

    shapes: every tensor the payload may carry, with its shape (names outside it are rejected).
    allow_missing: accept payloads that carry only some of ``shapes`` (else all must be there).
    max_bytes: reject larger payloads before parsing them.
    sparsifier: when set, an update must say it was shrunk this way (kind and density), and every
    DARE tensor must declare this density, so no payload can make the decoder regenerate a mask
    the run did not ask for.
    """

    shapes: Mapping[str, tuple[int, ...]]
    round: int | None = None
    run_id: str | None = None
    base_fingerprint: str | None = None
    max_bytes: int | None = None
    allow_missing: bool = False
    sparsifier: Sparsifier | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.shapes, Mapping):
            raise ValueError(f"Expectation.shapes must be a mapping of name → shape, got {type(self.shapes).__name__}")
        object.__setattr__(self, "shapes", {name: tuple(int(d) for d in shape) for name, shape in self.shapes.items()})
        if self.max_bytes is not None and (not _is_int(self.max_bytes) or self.max_bytes < 0):
            raise ValueError(f"Expectation.max_bytes must be an int >= 0 or None, got {self.max_bytes!r}")


@dataclass(frozen=True)
class WireHeader:
    """A parsed header: the sender's fields, the value dtype, tensor entries and format extras."""

    header: UpdateHeader
    value_dtype: str
    entries: dict[str, TensorEntry]
    extra: dict[str, Any]


def header_document(
    kind: str,
    header: UpdateHeader,
    value_dtype: str,
    entries: Mapping[str, TensorEntry],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The header as a JSON-ready document (the container adds the CRC and serializes it)."""
    return {
        "format": kind,
        "version": FORMAT_VERSION,
        "run_id": header.run_id,
        "round": header.round,
        "base_fingerprint": header.base_fingerprint,
        "node_id": header.node_id,
        "num_examples": header.num_examples,
        "sparsifier": sparsifier_json(header.sparsifier),
        "metrics": dict(header.metrics),
        "tier": header.tier,
        "value_dtype": value_dtype,
        "tensors": {name: entry.to_json() for name, entry in entries.items()},
        **(extra or {}),
    }


def sparsifier_json(sparsifier: Sparsifier) -> dict[str, Any]:
    """A sparsifier as JSON: kind, density and scopes, plus its declared parameters and a non-auto rescale."""
    document: dict[str, Any] = {
        "kind": sparsifier.kind,
        "density": sparsifier.density,
        "scope": sparsifier.scope,
        "seed_scope": sparsifier.seed_scope,
    }
    document.update(sparsifier.params)
    if sparsifier.rescale != "auto":
        document["rescale"] = sparsifier.rescale
    return document


def _sparsifier_extras(kind: object) -> tuple[Param, ...]:
    """The declared parameters of sparsifier ``kind``, which its header carries by name (none if unknown)."""
    try:
        return sparsifier_spec(kind).parameters if isinstance(kind, str) else ()
    except ValueError:
        return ()


def _param_ok(param: Param, value: Any) -> bool:
    if param.type in (int, float):
        return _finite_number(value) and (param.type is float or _is_int(value))
    return isinstance(value, param.type)


def _malformed(message: str) -> UpdateRejected:
    return UpdateRejected("malformed_header", message)


def _exact_keys(obj: Any, required: set[str], what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise _malformed(f"{what} must be a JSON object")
    missing = sorted(required - set(obj))
    unknown = sorted(set(obj) - required)
    if missing or unknown:
        raise _malformed(f"{what}: missing fields {missing}, unknown fields {unknown}")
    return obj


def _finite_number(value: Any) -> bool:
    return (isinstance(value, float) or _is_int(value)) and math.isfinite(value)


def _parse_entry(name: str, obj: Any) -> TensorEntry:
    what = f"tensor {name!r}"
    encoding = obj.get("encoding") if isinstance(obj, dict) else None
    if encoding not in ENCODINGS:
        raise _malformed(f"{what}: encoding must be one of {list(ENCODINGS)}, got {encoding!r}")
    keys = {"shape", "encoding", "nnz", "fisher"} | ({"seed", "density"} if encoding == "dare" else set())
    keys |= {"gram"} & set(obj)
    obj = _exact_keys(obj, keys, what)
    shape = obj["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(d) and d >= 0 for d in shape):
        raise _malformed(f"{what}: shape must be a list of at most {MAX_NDIM} ints >= 0, got {shape!r}")
    nnz = obj["nnz"]
    if not _is_int(nnz) or nnz < 0:
        raise _malformed(f"{what}: nnz must be an int >= 0, got {nnz!r}")
    if not isinstance(obj["fisher"], bool):
        raise _malformed(f"{what}: fisher must be true or false, got {obj['fisher']!r}")
    gram = obj.get("gram", False)
    if gram is not False and (gram is not True or len(shape) != 2):
        raise _malformed(f"{what}: gram may only be true, on a 2-D tensor; got {gram!r} with shape {shape!r}")
    seed = density = None
    if encoding == "dare":
        seed, density = obj["seed"], obj["density"]
        if not _is_int(seed) or not 0 <= seed < 2**64:
            raise _malformed(f"{what}: DARE seed must be an int in [0, 2**64), got {seed!r}")
        if not _finite_number(density) or not 0 < density <= 1:
            raise _malformed(f"{what}: DARE density must be in (0, 1], got {density!r}")
        density = float(density)
    return TensorEntry(tuple(shape), encoding, nnz, seed, density, obj["fisher"], gram)


def _parse_sparsifier(obj: Any) -> Sparsifier:
    kind = obj.get("kind") if isinstance(obj, dict) else None
    extras = _sparsifier_extras(kind)
    names = [param.name for param in extras]
    optional = {"rescale"} & set(obj) if isinstance(obj, dict) else set()
    obj = _exact_keys(obj, {"kind", "density", "scope", "seed_scope", *names, *optional}, "sparsifier")
    if not _finite_number(obj["density"]) or not all(_param_ok(param, obj[param.name]) for param in extras):
        raise _malformed(f"sparsifier {', '.join(('density', *names))} must be numbers (or their declared types)")
    if not all(isinstance(obj[k], str) for k in ("kind", "scope", "seed_scope", *optional)):
        raise _malformed("sparsifier kind, scope, seed_scope and rescale must be strings")
    options: dict[str, Any] = {key: obj[key] for key in optional}
    try:
        params = {name: obj[name] for name in names}
        return Sparsifier(
            obj["kind"], float(obj["density"]), obj["scope"], obj["seed_scope"], options=params, **options
        )
    except ValueError as exc:
        raise _malformed(f"sparsifier: {exc}") from exc


def parse_header(document: dict[str, Any], kind: str, extra_keys: set[str] | None = None) -> WireHeader:
    """Type-check a header made by :func:`header_document` (raises :class:`UpdateRejected`)."""
    version = document.get("version")
    if document.get("format") != kind or not _is_int(version) or version != FORMAT_VERSION:
        raise UpdateRejected(
            "unsupported_version",
            f"header says format {document.get('format')!r} version {version!r}; "
            f"this decoder reads {kind!r} version {FORMAT_VERSION}",
        )
    keys = {
        "format",
        "version",
        "run_id",
        "round",
        "base_fingerprint",
        "node_id",
        "num_examples",
        "sparsifier",
        "metrics",
        "tier",
        "value_dtype",
        "tensors",
    } | (extra_keys or set())
    document = _exact_keys(document, keys, "header")
    num_examples = document["num_examples"]
    if not _is_int(num_examples) or not 0 <= num_examples <= MAX_NUM_EXAMPLES:
        raise UpdateRejected(
            "bad_num_examples", f"num_examples must be an int in [0, {MAX_NUM_EXAMPLES}], got {num_examples!r}"
        )
    value_dtype = document["value_dtype"]
    if not isinstance(value_dtype, str) or value_dtype not in VALUE_DTYPES:
        raise UpdateRejected("wrong_dtype", f"value dtype {value_dtype!r} is not one of {sorted(VALUE_DTYPES)}")
    problem = _check_metrics(document["metrics"])
    if problem:
        raise _malformed(problem)
    sparsifier = _parse_sparsifier(document["sparsifier"])
    try:
        header = UpdateHeader(
            run_id=document["run_id"],
            round=document["round"],
            base_fingerprint=document["base_fingerprint"],
            node_id=document["node_id"],
            num_examples=num_examples,
            sparsifier=sparsifier,
            metrics=document["metrics"],
            tier=document["tier"],
        )
    except ValueError as exc:
        raise _malformed(str(exc)) from exc
    tensors = document["tensors"]
    if not isinstance(tensors, dict):
        raise _malformed("tensors must be a JSON object")
    entries = {name: _parse_entry(name, obj) for name, obj in tensors.items()}
    extra = {key: document[key] for key in (extra_keys or set())}
    return WireHeader(header, value_dtype, entries, extra)


def check_expectation(parsed: WireHeader, expect: Expectation) -> None:
    """Reject a header whose run, round or base fingerprint differs from ``expect`` (where set)."""
    header = parsed.header
    if expect.run_id is not None and header.run_id != expect.run_id:
        raise UpdateRejected("run_mismatch", f"payload is for run {header.run_id!r}, expected {expect.run_id!r}")
    if expect.round is not None and header.round != expect.round:
        raise UpdateRejected("round_mismatch", f"payload is for round {header.round}, expected round {expect.round}")
    if expect.base_fingerprint is not None and header.base_fingerprint != expect.base_fingerprint:
        raise UpdateRejected(
            "fingerprint_mismatch",
            f"payload was made against base {header.base_fingerprint!r}, expected {expect.base_fingerprint!r}",
        )


def check_sparsifier(parsed: WireHeader, expect: Expectation) -> None:
    """Reject an update shrunk otherwise than the run's sparsifier says (kind, density; DARE densities)."""
    wanted = expect.sparsifier
    if wanted is None:
        return
    said = parsed.header.sparsifier
    if said.kind != wanted.kind or not math.isclose(said.density, wanted.density, rel_tol=1e-9):
        raise UpdateRejected(
            "sparsifier_mismatch",
            f"update says sparsifier {said.kind} at density {said.density}; "
            f"the run uses {wanted.kind} at density {wanted.density}",
        )
    for name, entry in parsed.entries.items():
        if entry.encoding == "dare" and (
            wanted.kind != "dare" or not math.isclose(entry.density or 0.0, wanted.density, rel_tol=1e-9)
        ):
            raise UpdateRejected(
                "sparsifier_mismatch",
                f"tensor {name!r} declares DARE density {entry.density}; the run uses {wanted.kind} "
                f"at density {wanted.density}",
            )


def check_names_and_shapes(shapes: Mapping[str, tuple[int, ...]], expect: Expectation, what: str = "tensor") -> None:
    """Reject unknown names, wrong shapes and (unless ``allow_missing``) absent names."""
    unknown = sorted(set(shapes) - set(expect.shapes))
    if unknown:
        raise UpdateRejected("unexpected_tensor", f"unexpected {what}(s): {', '.join(map(repr, unknown[:5]))}")
    if not expect.allow_missing:
        missing = sorted(set(expect.shapes) - set(shapes))
        if missing:
            raise UpdateRejected("missing_tensor", f"missing {what}(s): {', '.join(map(repr, missing[:5]))}")
    for name, shape in shapes.items():
        if tuple(shape) != expect.shapes[name]:
            raise UpdateRejected(
                "wrong_shape", f"{what} {name!r} has shape {tuple(shape)}, expected {expect.shapes[name]}"
            )
