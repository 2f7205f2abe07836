"""Round trips of the update wire format: what goes in comes out, in the smallest honest form."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfuse.algebra import SparseTensor, Sparsifier, dare_drop, dare_indices, ties_trim
from fedfuse.strategies import get_strategy
from fedfuse.wire import (
    DecodedUpdate,
    Expectation,
    UpdateHeader,
    decode_update,
    encode_update,
    fingerprint,
)
from fedfuse.wire.container import unpack
from fedfuse.wire.indices import (
    bitmap_size,
    decode_varints,
    delta_decode,
    encode_indices,
    encode_varints,
    gaps_of,
    pack_bitmap,
    unpack_bitmap,
    varint_sizes,
)

pytestmark = pytest.mark.unit

HEADER = UpdateHeader(
    "run-7", 3, "sha256:abc", "hospital-2", num_examples=640, metrics={"loss": 0.5, "epochs": 2, "tag": "a"}
)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def expect_for(tensors: dict, **kwargs) -> Expectation:
    return Expectation({name: tuple(t.shape) for name, t in tensors.items()}, **kwargs)


def roundtrip(tensors: dict, value_dtype: str = "float32", fisher: dict | None = None) -> DecodedUpdate:
    data = encode_update(tensors, header=HEADER, value_dtype=value_dtype, fisher=fisher)
    return decode_update(data, expect=expect_for(tensors, round=3, run_id="run-7", base_fingerprint="sha256:abc"))


def blob_names(data: bytes) -> set[str]:
    return set(unpack(data, None)[1])


def test_dense_fp32_comes_back_bit_exact_with_its_header() -> None:
    tensors = {"encoder.weight": randn(16, 8), "encoder.bias": randn(8, seed=1)}
    decoded = roundtrip(tensors)
    assert decoded.header == HEADER
    assert decoded.value_dtype == "float32" and decoded.fisher is None
    for name, tensor in tensors.items():
        assert torch.equal(decoded.tensors[name], tensor)
        assert decoded.entries[name].encoding == "dense"


def test_a_sparse_trim_keeps_indices_and_values() -> None:
    original = ties_trim(randn(50, 20), 0.1)
    decoded = roundtrip({"w": original}).tensors["w"]
    assert isinstance(decoded, SparseTensor) and decoded.shape == original.shape
    assert torch.equal(decoded.indices, original.indices)
    assert torch.equal(decoded.values, original.values)
    assert decoded.dare_seed is None


def test_low_density_uses_delta_indices_and_high_density_a_bitmap() -> None:
    tensors = {"sparse": ties_trim(randn(1000), 0.05), "busy": ties_trim(randn(1000, seed=1), 0.5)}
    decoded = roundtrip(tensors)
    assert decoded.entries["sparse"].encoding == "delta"
    assert decoded.entries["busy"].encoding == "bitmap"
    for name in tensors:
        assert torch.equal(decoded.tensors[name].indices, tensors[name].indices)


def test_dare_sends_no_indices_and_regenerates_the_same_ones() -> None:
    original = dare_drop(randn(40, 25), 0.2, seed=4242)
    data = encode_update({"w": original}, header=HEADER)
    assert blob_names(data) == {"v:w"}
    decoded = decode_update(data, expect=expect_for({"w": original})).tensors["w"]
    assert torch.equal(decoded.indices, original.indices)
    assert torch.equal(decoded.indices, dare_indices(1000, 0.2, 4242))
    assert torch.equal(decoded.values, original.values)
    assert (decoded.dare_seed, decoded.dare_density) == (4242, 0.2)


@pytest.mark.parametrize("value_dtype, dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_16_bit_values_arrive_in_their_wire_dtype(value_dtype: str, dtype: torch.dtype) -> None:
    tensors = {
        "dense": randn(6, 7),
        "trim": ties_trim(randn(300, seed=1), 0.1),
        "dare": dare_drop(randn(90, seed=2), 0.5, 7),
    }
    decoded = roundtrip(tensors, value_dtype)
    assert decoded.value_dtype == value_dtype
    assert torch.equal(decoded.tensors["dense"], tensors["dense"].to(dtype))
    for name in ("trim", "dare"):
        assert decoded.tensors[name].values.dtype == dtype
        assert torch.equal(decoded.tensors[name].values, tensors[name].values.to(dtype))


def test_bf16_halves_the_bytes_of_fp32() -> None:
    tensors = {"w": randn(256, 64)}
    fp32 = encode_update(tensors, header=HEADER, value_dtype="float32")
    bf16 = encode_update(tensors, header=HEADER, value_dtype="bfloat16")
    assert len(bf16) < 0.51 * len(fp32)


def test_fisher_travels_on_the_update_support_and_merges_identically() -> None:
    tau = {"w": ties_trim(randn(30, 10), 0.2), "b": randn(10, seed=1)}
    fisher = {"w": randn(30, 10, seed=2).abs(), "b": randn(10, seed=3).abs()}
    decoded = roundtrip(tau, fisher=fisher)
    assert torch.equal(decoded.fisher["w"].indices, tau["w"].indices)
    assert torch.equal(decoded.fisher["w"].values, fisher["w"].reshape(-1)[tau["w"].indices])
    assert torch.equal(decoded.fisher["b"], fisher["b"])
    merged = get_strategy("fisher").new_state().add(decoded.tensors, 2.0, decoded.fisher).finalize()
    expected = get_strategy("fisher").new_state().add(tau, 2.0, fisher).finalize()
    for name in tau:
        assert torch.equal(merged[name], expected[name])


def test_a_sparse_fisher_sharing_the_indices_is_accepted() -> None:
    tau = ties_trim(randn(200), 0.1)
    fisher = SparseTensor(tau.indices, tau.values.abs(), tau.shape)
    decoded = roundtrip({"w": tau}, fisher={"w": fisher})
    assert torch.equal(decoded.fisher["w"].values, fisher.values)


def test_zero_dim_and_empty_tensors_round_trip() -> None:
    tensors = {
        "scalar": torch.tensor(1.25),
        "empty": torch.zeros(0, 4),
        "sparse_scalar": ties_trim(torch.tensor(-3.0), 1.0),
        "sparse_empty": ties_trim(torch.zeros(3, 0), 0.5),
        "dare_scalar": dare_drop(torch.tensor(2.0), 1.0, 5),
    }
    decoded = roundtrip(tensors, fisher={"scalar": torch.tensor(0.5)})
    assert decoded.tensors["scalar"].shape == torch.Size([]) and float(decoded.tensors["scalar"]) == 1.25
    assert decoded.tensors["empty"].shape == (0, 4)
    assert decoded.tensors["sparse_scalar"].to_dense().item() == -3.0
    assert decoded.tensors["sparse_empty"].shape == (3, 0) and decoded.tensors["sparse_empty"].nnz == 0
    assert decoded.tensors["dare_scalar"].to_dense().item() == 2.0
    assert float(decoded.fisher["scalar"]) == 0.5


def test_an_update_with_no_tensors_round_trips() -> None:
    assert roundtrip({}).tensors == {}


def test_decoded_updates_merge_like_the_originals() -> None:
    updates = [{"w": ties_trim(randn(40, 5, seed=s), 0.2), "b": randn(5, seed=10 + s)} for s in range(3)]
    for name in ("ties", "fedavg", "task_arithmetic"):
        direct = get_strategy(name).new_state()
        wired = get_strategy(name).new_state()
        for k, update in enumerate(updates):
            direct.add(update, weight=k + 1)
            wired.add(roundtrip(update).tensors, weight=k + 1)
        for key, value in direct.finalize().items():
            assert torch.equal(wired.finalize()[key], value), name


def test_header_keeps_sparsifier_metrics_and_integer_node_ids() -> None:
    header = UpdateHeader(
        "r",
        0,
        "fp",
        17,
        num_examples=0,
        sparsifier=Sparsifier("dare", 0.1, seed_scope="round"),
        metrics={"acc": 0.75, "n": -3, "note": "ok"},
    )
    data = encode_update({"w": randn(3)}, header=header, value_dtype="bfloat16")
    decoded = decode_update(data, expect=Expectation({"w": (3,)}))
    assert decoded.header == header and decoded.header.node_id == 17
    assert decoded.nbytes == len(data)


def test_bytearray_and_memoryview_payloads_are_accepted() -> None:
    tensors = {"w": randn(4)}
    data = encode_update(tensors, header=HEADER)
    for view in (bytearray(data), memoryview(data)):
        assert torch.equal(decode_update(view, expect=expect_for(tensors)).tensors["w"], tensors["w"])


def test_encoding_is_deterministic() -> None:
    tensors = {"w": ties_trim(randn(100), 0.3), "d": dare_drop(randn(50), 0.5, 1)}
    assert encode_update(tensors, header=HEADER) == encode_update(tensors, header=HEADER)


def tampered(indices: list[int]) -> SparseTensor:
    """A valid SparseTensor whose indices were overwritten in place afterwards."""
    sparse = SparseTensor(torch.tensor([0, 1]), randn(2), (4,))
    sparse.indices.copy_(torch.tensor(indices))
    return sparse


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: encode_update({"w": randn(3)}, header=HEADER, value_dtype="int8"), "value_dtype"),
        (lambda: encode_update({"w": randn(3)}, header="h"), "header"),
        (lambda: encode_update({"w": torch.arange(3)}, header=HEADER), "floating"),
        (lambda: encode_update({"w": randn(3)}, header=HEADER, fisher={"x": randn(3)}), "lacks: x"),
        (lambda: encode_update({"w": tampered([2, 1])}, header=HEADER), "sorted"),
        (lambda: encode_update({"w": tampered([0, 9])}, header=HEADER), "[0, 4)"),
        (
            lambda: encode_update({"w": ties_trim(randn(9), 0.5)}, header=HEADER, fisher={"w": randn(9, 1)}),
            "Fisher shape",
        ),
        (lambda: UpdateHeader("r", -1, "fp", "n"), "round"),
        (lambda: UpdateHeader("r", 0, "fp", "n", num_examples=-5), "num_examples"),
        (lambda: UpdateHeader("r", 0, "fp", "n", metrics={"x": [1]}), "metric 'x'"),
        (lambda: UpdateHeader("r", 0, "fp", "n", metrics={"x": math.nan}), "not finite"),
    ],
)
def test_bad_encoder_input_raises_a_clear_value_error(call, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


# Index packing: properties of the two codes and of the choice between them.

index_sets = st.integers(0, 3000).flatmap(
    lambda n: st.tuples(st.just(n), st.sets(st.integers(0, max(n - 1, 0)), max_size=n) if n else st.just(set()))
)


@settings(max_examples=150, deadline=None)
@given(index_sets)
def test_both_index_codes_round_trip_and_the_smaller_is_chosen(case) -> None:
    numel, kept = case
    indices = np.array(sorted(kept), dtype=np.int64)
    assert np.array_equal(unpack_bitmap(pack_bitmap(indices, numel), numel, "t"), indices)
    assert np.array_equal(delta_decode(encode_varints(gaps_of(indices)), numel, "t"), indices)
    encoding, blob = encode_indices(indices, numel)
    delta_bytes = int(varint_sizes(gaps_of(indices)).sum())
    assert blob.size == min(delta_bytes, bitmap_size(numel))
    assert encoding == ("delta" if delta_bytes <= bitmap_size(numel) else "bitmap")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), max_size=50))
def test_varints_round_trip_any_uint64(values) -> None:
    array = np.array(values, dtype=np.uint64)
    encoded = encode_varints(array)
    assert encoded.size == int(varint_sizes(array).sum())
    assert np.array_equal(decode_varints(encoded, "t"), array)


@pytest.mark.parametrize(
    "value, size", [(0, 1), (127, 1), (128, 2), (16383, 2), (16384, 3), (2**63, 10), (2**64 - 1, 10)]
)
def test_varint_sizes_follow_leb128(value: int, size: int) -> None:
    encoded = encode_varints(np.array([value], dtype=np.uint64))
    assert encoded.size == size
    assert int(decode_varints(encoded, "t")[0]) == value


# Fingerprint of the round's global weights.


def test_fingerprint_is_stable_and_order_free() -> None:
    weights = {"a": randn(3, 4), "b": randn(5, seed=1).to(torch.bfloat16), "c": torch.arange(3)}
    shuffled = {"c": weights["c"], "a": weights["a"], "b": weights["b"]}
    assert fingerprint(weights) == fingerprint(shuffled)
    assert fingerprint(weights).startswith("sha256:") and len(fingerprint(weights)) == 7 + 64


def test_fingerprint_sees_every_bit_name_dtype_and_shape() -> None:
    weights = {"a": randn(3, 4), "b": randn(5, seed=1)}
    reference = fingerprint(weights)
    flipped = weights["a"].clone()
    flipped.view(torch.int32)[1, 2] ^= 1
    variants = [
        {**weights, "a": flipped},
        {"a2": weights["a"], "b": weights["b"]},
        {**weights, "b": weights["b"].view(torch.int32)},
        {**weights, "a": weights["a"].reshape(4, 3)},
        {"a": weights["a"]},
    ]
    assert len({reference, *map(fingerprint, variants)}) == 1 + len(variants)


def test_fingerprint_of_a_non_contiguous_view_equals_that_of_its_copy() -> None:
    matrix = randn(6, 4)
    assert fingerprint({"w": matrix.t()}) == fingerprint({"w": matrix.t().contiguous()})


def test_fingerprint_rejects_non_tensors() -> None:
    with pytest.raises(ValueError, match="'w'"):
        fingerprint({"w": [1.0, 2.0]})
