"""How fedfuse payloads ride in Flower messages: record names and the bytes ↔ uint8 Array conversion.

A payload is carried as one uint8 ``Array`` so Flower's chunked transport applies to it.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

UPDATE_RECORD = "fedfuse.update"
PARTIAL_RECORD = "fedfuse.partial"
PAYLOAD_KEY = "payload"
METRICS_RECORD = "metrics"
CONFIG_RECORD = "config"
ARRAYS_RECORD = "arrays"
RESIDUAL_RECORD = "fedfuse.residual"
SIGNATURE_RECORD = "fedfuse.signature"


def payload_record(payload: bytes) -> ArrayRecord:
    """One encoded payload as an ArrayRecord holding a single uint8 Array."""
    return ArrayRecord({PAYLOAD_KEY: Array(np.frombuffer(payload, dtype=np.uint8).copy())})


def payload_of(content: RecordDict, record: str) -> bytes | None:
    """The payload bytes stored under ``record``, or None when the message has no such record."""
    if record not in content.array_records:
        return None
    arrays = content.array_records[record]
    if PAYLOAD_KEY not in arrays:
        return None
    return arrays[PAYLOAD_KEY].numpy().tobytes()
