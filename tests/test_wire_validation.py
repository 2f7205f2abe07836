"""Every way a payload can be wrong is refused with UpdateRejected and its own reason.

Most bad payloads here are built the way a buggy or hostile sender would: edit a valid payload's
header or blobs, then recompute the checksum, so the check under test (not the CRC) must fire.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
import safetensors.torch
import torch

from fedfuse.algebra import dare_drop, ties_trim
from fedfuse.wire import (
    FORMAT_VERSION,
    REASONS,
    Expectation,
    UpdateHeader,
    UpdateRejected,
    decode_update,
    encode_update,
)
from fedfuse.wire.container import pack, unpack
from fedfuse.wire.indices import encode_varints

pytestmark = pytest.mark.unit

HEADER = UpdateHeader("run-1", 5, "sha256:base", "node-3", num_examples=100)
EXPECT = Expectation({"w": (20, 10), "b": (10,)}, round=5, run_id="run-1", base_fingerprint="sha256:base")


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def payload(w=None, b=None, value_dtype: str = "float32", fisher=None, header: UpdateHeader = HEADER) -> bytes:
    tensors = {"w": ties_trim(randn(20, 10), 0.1) if w is None else w, "b": randn(10, seed=1) if b is None else b}
    return encode_update(tensors, header=header, value_dtype=value_dtype, fisher=fisher)


def repack(
    data: bytes, header: Callable[[dict], None] | None = None, blobs: Callable[[dict], None] | None = None
) -> bytes:
    """Edit a valid payload's header document and/or blob dict, then re-checksum it."""
    document, current = unpack(data, None)
    if header:
        header(document)
    if blobs:
        blobs(current)
    return pack(document, current)


def with_metadata(data: bytes, metadata: dict[str, str]) -> bytes:
    """The payload's blobs under raw safetensors metadata (no fedfuse checksum logic)."""
    return safetensors.torch.save(unpack(data, None)[1], metadata=metadata)


def as_blob(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.uint8))


def with_delta_gaps(gaps: list[int], nnz: int | None = None) -> bytes:
    """A valid ``w`` (delta-coded) whose index blob is replaced by the varints of ``gaps``."""

    def edit_header(doc: dict) -> None:
        doc["tensors"]["w"]["nnz"] = len(gaps) if nnz is None else nnz

    def edit_blobs(blobs: dict) -> None:
        blobs["i:w"] = as_blob(encode_varints(np.array(gaps, dtype=np.uint64)))
        blobs["v:w"] = torch.ones(len(gaps), dtype=torch.float32).view(torch.uint8)

    return repack(payload(), edit_header, edit_blobs)


def rejected(data, expect: Expectation = EXPECT) -> UpdateRejected:
    with pytest.raises(UpdateRejected) as info:
        decode_update(data, expect=expect)
    return info.value


def test_the_valid_payload_used_below_decodes() -> None:
    decoded = decode_update(payload(), expect=EXPECT)
    assert decoded.entries["w"].encoding == "delta" and decoded.entries["b"].encoding == "dense"


def test_rejection_is_a_value_error_with_a_reason_and_a_readable_message() -> None:
    error = rejected(payload(), Expectation(EXPECT.shapes, round=6))
    assert isinstance(error, ValueError)
    assert error.reason == "round_mismatch" and error.reason in REASONS
    assert "round 5" in str(error) and "round 6" in str(error)


def test_input_that_is_not_bytes() -> None:
    assert rejected("not bytes").reason == "not_bytes"


def test_payload_over_max_bytes_is_refused_before_parsing() -> None:
    data = payload()
    assert rejected(data, Expectation(EXPECT.shapes, max_bytes=len(data) - 1)).reason == "too_large"
    assert rejected(b"\xff" * 5000, Expectation(EXPECT.shapes, max_bytes=4096)).reason == "too_large"
    assert decode_update(data, expect=Expectation(EXPECT.shapes, max_bytes=len(data)))


@pytest.mark.parametrize("keep", [0, 7, 8, 100, -1])
def test_truncated_bytes(keep: int) -> None:
    data = payload()
    assert rejected(data[:keep]).reason == "truncated"


def test_a_flipped_data_bit_fails_the_checksum() -> None:
    data = bytearray(payload())
    data[-3] ^= 0x10
    error = rejected(bytes(data))
    assert error.reason == "corrupted" and "CRC32" in str(error)


def test_a_flipped_header_bit_fails_the_checksum() -> None:
    data = payload()
    position = data.index(b"node-3") + 2
    altered = data[:position] + b"X" + data[position + 1 :]
    assert rejected(altered).reason == "corrupted"


def test_appended_bytes_are_corruption() -> None:
    assert rejected(payload() + b"\x00").reason == "corrupted"


def test_garbage_is_corruption() -> None:
    assert rejected((16).to_bytes(8, "little") + b"{not json at all}").reason == "corrupted"


def test_unknown_format_version() -> None:
    error = rejected(repack(payload(), lambda doc: doc.update(version=FORMAT_VERSION + 1)))
    assert error.reason == "unsupported_version" and f"version {FORMAT_VERSION + 1}" in str(error)


def test_a_partial_state_payload_is_not_an_update() -> None:
    assert rejected(repack(payload(), lambda doc: doc.update(format="fedfuse-partial"))).reason == "unsupported_version"


@pytest.mark.parametrize(
    "edit",
    [
        lambda doc: doc.update(surprise=1),
        lambda doc: doc.pop("node_id"),
        lambda doc: doc.update(round="5"),
        lambda doc: doc.update(metrics={"loss": [1, 2]}),
        lambda doc: doc["tensors"]["w"].update(encoding="zip"),
        lambda doc: doc["tensors"]["w"].update(shape=[20, -10]),
        lambda doc: doc["tensors"]["w"].pop("nnz"),
        lambda doc: doc["sparsifier"].update(kind="magic"),
    ],
    ids=[
        "unknown-field",
        "missing-field",
        "mistyped-round",
        "bad-metric",
        "bad-encoding",
        "negative-dim",
        "missing-nnz",
        "bad-sparsifier",
    ],
)
def test_malformed_header_fields(edit) -> None:
    assert rejected(repack(payload(), edit)).reason == "malformed_header"


def test_header_that_is_not_json() -> None:
    assert rejected(with_metadata(payload(), {"fedfuse": "{'single': quotes}"})).reason == "malformed_header"


def test_nan_in_header_json_is_malformed() -> None:
    document, _ = unpack(payload(), None)
    text = json.dumps({**document, "metrics": {"x": float("nan")}, "crc32": "00000000"})
    assert rejected(with_metadata(payload(), {"fedfuse": text})).reason == "malformed_header"


def test_header_without_a_checksum_or_with_extra_metadata() -> None:
    document, _ = unpack(payload(), None)
    assert rejected(with_metadata(payload(), {"fedfuse": json.dumps(document)})).reason == "malformed_header"
    assert rejected(with_metadata(payload(), {"other": "x"})).reason == "malformed_header"


def test_equal_inputs_give_byte_identical_payloads() -> None:
    assert payload() == payload()


def test_run_mismatch() -> None:
    assert rejected(payload(), Expectation(EXPECT.shapes, run_id="run-2")).reason == "run_mismatch"


def test_round_mismatch() -> None:
    assert rejected(payload(), Expectation(EXPECT.shapes, round=4)).reason == "round_mismatch"


def test_base_fingerprint_mismatch() -> None:
    error = rejected(payload(), Expectation(EXPECT.shapes, base_fingerprint="sha256:other"))
    assert error.reason == "fingerprint_mismatch"


@pytest.mark.parametrize("count", [-1, 10**12 + 1, 2**70, 1.5, True])
def test_negative_huge_or_non_integer_num_examples(count) -> None:
    assert rejected(repack(payload(), lambda doc: doc.update(num_examples=count))).reason == "bad_num_examples"


def test_missing_tensor_unless_allowed() -> None:
    expect = Expectation({**EXPECT.shapes, "extra": (3,)})
    error = rejected(payload(), expect)
    assert error.reason == "missing_tensor" and "'extra'" in str(error)
    partial = Expectation(expect.shapes, allow_missing=True)
    assert set(decode_update(payload(), expect=partial).tensors) == {"w", "b"}


def test_missing_blob() -> None:
    assert rejected(repack(payload(), blobs=lambda blobs: blobs.pop("i:w"))).reason == "missing_tensor"


def test_unexpected_tensor() -> None:
    error = rejected(payload(), Expectation({"w": (20, 10)}))
    assert error.reason == "unexpected_tensor" and "'b'" in str(error)


def test_unexpected_blob() -> None:
    data = repack(payload(), blobs=lambda blobs: blobs.update({"x:w": torch.zeros(4, dtype=torch.uint8)}))
    assert rejected(data).reason == "unexpected_tensor"


def test_wrong_shape() -> None:
    error = rejected(payload(), Expectation({"w": (10, 20), "b": (10,)}))
    assert error.reason == "wrong_shape" and "(20, 10)" in str(error)


def test_a_blob_that_is_not_uint8_is_a_wrong_dtype() -> None:
    data = repack(payload(), blobs=lambda blobs: blobs.update({"v:b": blobs["v:b"].view(torch.float32)}))
    assert rejected(data).reason == "wrong_dtype"


def test_an_unknown_value_dtype() -> None:
    assert rejected(repack(payload(), lambda doc: doc.update(value_dtype="int8"))).reason == "wrong_dtype"


def test_a_value_missing_from_a_dense_tensor() -> None:
    data = repack(payload(), blobs=lambda blobs: blobs.update({"v:b": blobs["v:b"][:-4].clone()}))
    assert rejected(data).reason == "value_count"


def test_a_ragged_value_blob() -> None:
    data = repack(payload(), blobs=lambda blobs: blobs.update({"v:b": blobs["v:b"][:-1].clone()}))
    assert rejected(data).reason == "value_count"


def test_header_nnz_disagreeing_with_the_indices() -> None:
    assert rejected(with_delta_gaps([1, 2, 3], nnz=4)).reason == "value_count"


def test_index_out_of_range() -> None:
    error = rejected(with_delta_gaps([5, 190, 10]))
    assert error.reason == "index_out_of_range" and "205" in str(error)


def test_duplicated_index() -> None:
    assert rejected(with_delta_gaps([3, 4, 0, 2])).reason == "duplicate_indices"


def test_unsorted_indices_wrap_the_delta_sum() -> None:
    assert rejected(with_delta_gaps([50, 2**64 - 10])).reason == "unsorted_indices"


@pytest.mark.parametrize(
    "blob",
    [[0x80] * 10 + [0x01], [0x05, 0x83], [0x85, 0x00], [0xFF] * 9 + [0x02]],
    ids=["longer-than-10-bytes", "cut-off", "not-shortest-form", "over-64-bits"],
)
def test_malformed_varints(blob: list[int]) -> None:
    def edit_blobs(blobs: dict) -> None:
        blobs["i:w"] = as_blob(np.array(blob))
        blobs["v:w"] = torch.ones(1, dtype=torch.float32).view(torch.uint8)

    data = repack(payload(), lambda doc: doc["tensors"]["w"].update(nnz=1), edit_blobs)
    assert rejected(data).reason == "malformed_indices"


def test_bitmap_with_a_padding_bit_set() -> None:
    dense = randn(20, 10)
    data = payload(w=ties_trim(dense, 0.6), b=ties_trim(randn(10, seed=1), 0.7))
    assert decode_update(data, expect=EXPECT).entries["b"].encoding == "bitmap"

    def set_padding_bit(blobs: dict) -> None:
        bitmap = blobs["i:b"].clone()
        bitmap[-1] |= 0x01
        blobs["i:b"] = bitmap

    error = rejected(repack(data, blobs=set_padding_bit))
    assert error.reason == "bitmap_padding" and "'b'" in str(error)


def test_bitmap_of_the_wrong_length() -> None:
    data = payload(w=ties_trim(randn(20, 10), 0.6))
    edited = repack(data, blobs=lambda blobs: blobs.update({"i:w": blobs["i:w"][:-1].clone()}))
    assert rejected(edited).reason == "bitmap_padding"


def test_dare_values_that_do_not_match_the_regenerated_mask() -> None:
    data = payload(w=dare_drop(randn(20, 10), 0.3, seed=77))

    def drop_one(doc: dict) -> None:
        doc["tensors"]["w"]["nnz"] -= 1

    edited = repack(data, drop_one, lambda blobs: blobs.update({"v:w": blobs["v:w"][:-4].clone()}))
    error = rejected(edited)
    assert error.reason == "dare_count_mismatch" and "seed 77" in str(error)


def test_dare_with_another_seed_is_caught_by_the_count() -> None:
    data = payload(w=dare_drop(randn(20, 10), 0.3, seed=77))
    assert rejected(repack(data, lambda doc: doc["tensors"]["w"].update(seed=78))).reason == "dare_count_mismatch"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values(bad: float) -> None:
    dense = randn(10, seed=1)
    dense[3] = bad
    error = rejected(payload(b=dense))
    assert error.reason == "non_finite" and "'b'" in str(error)


def test_non_finite_bf16_values() -> None:
    trimmed = ties_trim(randn(20, 10), 0.1)
    trimmed.values[0] = float("nan")
    assert rejected(payload(w=trimmed, value_dtype="bfloat16")).reason == "non_finite"


def test_non_finite_fisher() -> None:
    fisher = randn(10, seed=2).abs()
    fisher[0] = float("inf")
    assert rejected(payload(fisher={"b": fisher})).reason == "non_finite"


def test_negative_fisher() -> None:
    fisher = randn(20, 10, seed=2).abs()
    fisher[0, 0] = -1.0
    trimmed = ties_trim(randn(20, 10), 1.0)
    assert rejected(payload(w=trimmed, fisher={"w": fisher})).reason == "negative_fisher"


def test_fisher_value_count_must_match_the_support() -> None:
    data = payload(fisher={"b": randn(10, seed=2).abs()})
    edited = repack(data, blobs=lambda blobs: blobs.update({"f:b": blobs["f:b"][:-4].clone()}))
    assert rejected(edited).reason == "value_count"


def test_every_reason_is_documented() -> None:
    assert all(isinstance(text, str) and text for text in REASONS.values())
    with pytest.raises(ValueError, match="unknown rejection reason"):
        UpdateRejected("no_such_reason", "x")


def test_an_unforeseen_internal_error_still_surfaces_as_a_rejection(monkeypatch) -> None:
    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("fedfuse.wire.update.parse_header", explode)
    error = rejected(payload())
    assert error.reason == "malformed_payload" and "RuntimeError: boom" in str(error)
