"""The update wire format: one safetensors payload per update or partial state, validated on decode.

>>> from fedfuse.wire import UpdateHeader, Expectation, encode_update, decode_update, fingerprint
>>> # data = encode_update(tau, header=UpdateHeader(run_id, round, fingerprint(base), node_id))
>>> # update = decode_update(data, expect=Expectation(shapes, round=..., base_fingerprint=...))

Every decoding problem raises :class:`UpdateRejected` (a ``ValueError``) with a ``reason`` slug.
No Flower here: the client/server layers carry these bytes inside Flower messages.
"""

from fedfuse.wire.errors import REASONS, UpdateRejected
from fedfuse.wire.fingerprint import fingerprint
from fedfuse.wire.header import (
    FORMAT_VERSION,
    MAX_NUM_EXAMPLES,
    Expectation,
    TensorEntry,
    UpdateHeader,
)
from fedfuse.wire.limits import max_partial_bytes, max_update_bytes
from fedfuse.wire.partial import DecodedPartial, decode_partial, encode_partial
from fedfuse.wire.update import DecodedUpdate, decode_update, encode_update
from fedfuse.wire.values import UPDATE_VALUE_DTYPES

__all__ = [
    "FORMAT_VERSION",
    "MAX_NUM_EXAMPLES",
    "REASONS",
    "UPDATE_VALUE_DTYPES",
    "DecodedPartial",
    "DecodedUpdate",
    "Expectation",
    "TensorEntry",
    "UpdateHeader",
    "UpdateRejected",
    "decode_partial",
    "decode_update",
    "encode_partial",
    "encode_update",
    "fingerprint",
    "max_partial_bytes",
    "max_update_bytes",
]
