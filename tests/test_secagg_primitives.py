"""The SecAgg+ primitives: ring encoding sums exactly, Shamir shares reconstruct, keys agree, masks look uniform,
and the neighbour graph is regular and symmetric."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from fedfuse.secagg.crypto import KEY_BYTES, KeyPair, agree, commitment, mask, open_sealed, random_seed, seal
from fedfuse.secagg.graph import default_degree, default_threshold, neighbours
from fedfuse.secagg.ring import FixedPoint, ring_difference, ring_negate, ring_sum
from fedfuse.secagg.shamir import SHARE_BYTES, combine, split

pytestmark = pytest.mark.unit

FAST = settings(max_examples=40, deadline=None)
SEED = bytes(range(32))
UINT64_MAX = 2**64 - 1


# --- ring ---------------------------------------------------------------------------------------------------


def _secure_sum(codec: FixedPoint, clients: list[np.ndarray]) -> np.ndarray:
    """Encode every client's values and add them in the ring, as the unmasked SecAgg+ sum does."""
    total = np.zeros(clients[0].size, dtype=codec.dtype)
    for values in clients:
        encoded, _ = codec.encode(values)
        total = ring_sum(total, encoded)
    return codec.decode(total)


@FAST
@given(
    bits=st.integers(8, 40),
    clip_range=st.floats(1e-3, 1e3),
    num_clients=st.integers(1, 20),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_decoded_ring_sum_equals_the_float_sum_within_the_error_bound(
    bits: int, clip_range: float, num_clients: int, seed: int
) -> None:
    codec = FixedPoint.for_nodes(bits, clip_range, num_clients)
    rng = np.random.default_rng(seed)
    clients = [rng.uniform(-clip_range, clip_range, size=17) for _ in range(num_clients)]
    decoded = _secure_sum(codec, clients)
    error = np.max(np.abs(decoded - np.sum(clients, axis=0)))
    assert error <= codec.error_bound(num_clients) * (1 + 1e-9) + 1e-12 * num_clients * clip_range


def test_negative_values_and_sums_decode_negative() -> None:
    codec = FixedPoint.for_nodes(20, 2.0, 3)
    clients = [np.array([-0.5, -1.25, 0.75]), np.array([-0.25, -0.5, -1.0]), np.array([0.0, 0.25, -0.5])]
    np.testing.assert_allclose(_secure_sum(codec, clients), [-0.75, -1.5, -0.75], atol=codec.error_bound(3))


def test_values_outside_the_range_are_clipped_and_counted() -> None:
    codec = FixedPoint.for_nodes(16, 1.0, 4)
    encoded, clipped = codec.encode(np.array([[-5.0, 0.25], [5.0, 1.0]], dtype=np.float32))
    assert clipped == 2 and encoded.shape == (4,) and encoded.dtype == codec.dtype
    np.testing.assert_allclose(codec.decode(encoded), [-1.0, 0.25, 1.0, 1.0], atol=codec.error_bound(1))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="non-finite"):
        FixedPoint.for_nodes(16, 1.0, 4).encode(np.array([0.0, bad]))


@pytest.mark.parametrize(
    ("bits", "num_nodes", "ring_bits"),
    [(16, 10, 32), (28, 15, 32), (28, 16, 64), (31, 1, 32), (32, 1, 64), (62, 3, 64)],
)
def test_the_ring_is_32_bits_when_bits_plus_headroom_fit_else_64(bits: int, num_nodes: int, ring_bits: int) -> None:
    codec = FixedPoint.for_nodes(bits, 1.0, num_nodes)
    assert codec.ring_bits == ring_bits
    assert codec.dtype == (np.uint32 if ring_bits == 32 else np.uint64)


@pytest.mark.parametrize(("bits", "num_nodes"), [(28, 15), (20, 4000), (60, 15)])
def test_the_headroom_holds_the_sum_of_every_node_at_the_clip_range(bits: int, num_nodes: int) -> None:
    codec = FixedPoint.for_nodes(bits, 3.0, num_nodes)
    extremes = np.array([3.0, -3.0, 3.0])
    decoded = _secure_sum(codec, [extremes] * num_nodes)
    np.testing.assert_allclose(decoded, extremes * num_nodes, rtol=1e-12, atol=codec.error_bound(num_nodes))


@pytest.mark.parametrize(
    ("bits", "clip_range", "num_nodes", "match"),
    [
        (1, 1.0, 4, "bits"),
        (63, 1.0, 4, "bits"),
        (62, 1.0, 4, "64"),
        (16, 0.0, 4, "clip_range"),
        (16, -1.0, 4, "clip_range"),
        (16, float("nan"), 4, "clip_range"),
        (16, 1.0, 0, "num_nodes"),
    ],
)
def test_for_nodes_refuses_out_of_range_settings(bits: int, clip_range: float, num_nodes: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FixedPoint.for_nodes(bits, clip_range, num_nodes)


def test_integers_sum_exactly_including_negative_counts() -> None:
    codec = FixedPoint.for_nodes(16, 1.0, 3)
    counts = [np.array([1, -1, 0, -1]), np.array([-1, -1, 1, 0]), np.array([1.0, -1.0, 1.0, -1.0])]
    total = np.zeros(4, dtype=codec.dtype)
    for values in counts:
        total = ring_sum(total, codec.encode_integers(values))
    assert codec.decode_integers(total).tolist() == [1, -3, 2, -2]
    with pytest.raises(ValueError, match="integral"):
        codec.encode_integers(np.array([0.5]))


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_ring_arithmetic_wraps_without_warnings(dtype: type[np.unsignedinteger]) -> None:
    top = np.iinfo(dtype).max
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ring_sum(np.array([top, top], dtype=dtype), np.array([1, 2], dtype=dtype)).tolist() == [0, 1]
        assert ring_difference(np.array([0, 1], dtype=dtype), np.array([1, 3], dtype=dtype)).tolist() == [top, top - 1]
        assert int(ring_sum(np.array(top, dtype=dtype), np.array(top, dtype=dtype))) == top - 1
        assert ring_negate(np.array([0, 1], dtype=dtype)).tolist() == [0, top]
        a, b = mask(SEED, 1000, np.dtype(dtype)), mask(SEED, 1000, np.dtype(dtype), b"other")
        assert np.array_equal(ring_difference(ring_sum(a, b), b), a)
        assert np.array_equal(ring_sum(a, ring_negate(a)), np.zeros(1000, dtype=dtype))


def test_ring_arithmetic_refuses_mixed_or_signed_dtypes() -> None:
    with pytest.raises(ValueError, match="uint32 or two uint64"):
        ring_sum(np.zeros(2, dtype=np.uint32), np.zeros(2, dtype=np.uint64))
    with pytest.raises(ValueError, match="uint32 or two uint64"):
        ring_difference(np.zeros(2, dtype=np.int64), np.zeros(2, dtype=np.int64))


# --- Shamir -------------------------------------------------------------------------------------------------


@FAST
@given(
    secret=st.binary(min_size=1, max_size=64),
    num_holders=st.integers(1, 12),
    data=st.data(),
)
def test_any_threshold_subset_of_shares_reconstructs_the_secret(secret: bytes, num_holders: int, data) -> None:
    holders = data.draw(st.lists(st.integers(1, UINT64_MAX), min_size=num_holders, max_size=num_holders, unique=True))
    threshold = data.draw(st.integers(1, num_holders))
    shares = split(secret, threshold, holders)
    assert set(shares) == set(holders) and all(len(share) == SHARE_BYTES for share in shares.values())
    subset = data.draw(st.lists(st.sampled_from(holders), min_size=threshold, unique=True))
    assert combine({x: shares[x] for x in subset}, threshold, len(secret)) == secret


def _combined_or_none(shares: dict[int, bytes], threshold: int, secret_bytes: int) -> bytes | None:
    """The reconstructed secret, or None when combine refuses it."""
    try:
        return combine(shares, threshold, secret_bytes)
    except ValueError:
        return None


def test_a_corrupted_share_does_not_give_the_secret() -> None:
    secret = b"a self-mask seed of 32 bytes...!"
    shares = split(secret, 3, [1, 2, 3, 4])
    corrupted = dict(shares)
    corrupted[2] = (int.from_bytes(shares[2], "big") ^ 1).to_bytes(SHARE_BYTES, "big")
    assert combine(shares, 3, 32) == secret
    assert _combined_or_none(corrupted, 3, 32) != secret


def test_fewer_shares_than_the_threshold_are_refused() -> None:
    shares = split(b"secret", 3, [1, 2, 3, 4])
    with pytest.raises(ValueError, match="needs 3 shares"):
        combine({1: shares[1], 2: shares[2]}, 3, 6)


@pytest.mark.parametrize(
    "bad_share",
    [bytes(SHARE_BYTES - 1), bytes(SHARE_BYTES + 1), b"\xff" * SHARE_BYTES],
    ids=["short", "long", "not-a-field-element"],
)
def test_malformed_shares_are_refused(bad_share: bytes) -> None:
    shares = split(b"secret", 2, [1, 2, 3])
    with pytest.raises(ValueError, match="holder 3"):
        combine({1: shares[1], 2: shares[2], 3: bad_share}, 2, 6)


@pytest.mark.parametrize(
    ("secret", "threshold", "holders", "match"),
    [
        (b"s", 0, [1, 2], "threshold"),
        (b"s", 3, [1, 2], "threshold"),
        (b"s", 1, [0, 2], "holders"),
        (b"s", 1, [2, 2], "distinct"),
        (bytes(65), 1, [1, 2], "64 bytes"),
    ],
)
def test_split_refuses_bad_arguments(secret: bytes, threshold: int, holders: list[int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split(secret, threshold, holders)


# --- keys, sealing, masks -----------------------------------------------------------------------------------


def test_agreement_is_symmetric_and_separated_by_context_and_peer() -> None:
    alice, bob, carol = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    shared = agree(alice.private, bob.public, b"round 1 mask")
    assert len(shared) == KEY_BYTES and shared == agree(bob.private, alice.public, b"round 1 mask")
    assert shared != agree(alice.private, bob.public, b"round 1 shares")
    assert shared != agree(alice.private, carol.public, b"round 1 mask")
    assert KeyPair.from_private(alice.private) == alice


@pytest.mark.parametrize(
    ("private", "public", "match"),
    [(bytes(31), bytes(32), "private key"), (bytes(32), bytes(33), "public key"), (None, bytes(32), "low-order")],
)
def test_agreement_refuses_malformed_keys(private: bytes | None, public: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        agree(private or KeyPair.generate().private, public, b"context")


def test_a_bad_private_key_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        KeyPair.from_private(bytes(16))


def test_sealed_messages_open_only_with_the_key_and_associated_data() -> None:
    key, other = random_seed(), random_seed()
    sealed = seal(key, b"share for node 7", b"from 3 to 7")
    assert open_sealed(key, sealed, b"from 3 to 7") == b"share for node 7"
    assert seal(key, b"share for node 7", b"from 3 to 7") != sealed  # a fresh nonce each time
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    for bad_key, bad_sealed, bad_associated in [
        (key, tampered, b"from 3 to 7"),
        (key, sealed, b"from 4 to 7"),
        (other, sealed, b"from 3 to 7"),
    ]:
        with pytest.raises(ValueError, match="does not authenticate"):
            open_sealed(bad_key, bad_sealed, bad_associated)
    with pytest.raises(ValueError, match="fewer than nonce and tag"):
        open_sealed(key, sealed[:20], b"from 3 to 7")


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_masks_are_deterministic_and_differ_by_seed_and_purpose(dtype: type[np.unsignedinteger]) -> None:
    first = mask(SEED, 1000, np.dtype(dtype))
    assert first.dtype == dtype and first.shape == (1000,) and first.flags.writeable
    assert np.array_equal(first, mask(SEED, 1000, np.dtype(dtype)))
    assert not np.array_equal(first, mask(bytes(32), 1000, np.dtype(dtype)))
    assert not np.array_equal(first, mask(SEED, 1000, np.dtype(dtype), b"self"))
    assert mask(SEED, 0, np.dtype(dtype)).shape == (0,)


def test_masks_refuse_bad_seeds_dtypes_and_lengths() -> None:
    with pytest.raises(ValueError, match="seed"):
        mask(bytes(16), 10, np.dtype(np.uint64))
    with pytest.raises(ValueError, match="uint32 or uint64"):
        mask(SEED, 10, np.dtype(np.int64))
    with pytest.raises(ValueError, match="length"):
        mask(SEED, -1, np.dtype(np.uint64))


def _top_bits_p_value(values: np.ndarray) -> float:
    """Chi-square p-value of the top 4 bits (16 bins) of ring elements against the uniform distribution."""
    top = (values >> np.array(values.dtype.itemsize * 8 - 4, dtype=values.dtype)).astype(np.int64)
    return float(chisquare(np.bincount(top, minlength=16)).pvalue)


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_masks_and_masked_structured_inputs_are_indistinguishable_from_uniform(
    dtype: type[np.unsignedinteger],
) -> None:
    n = 200_000
    noise = mask(SEED, n, np.dtype(dtype), b"pairwise")
    structured = {
        "zeros": np.zeros(n, dtype=dtype),
        "small ints": (np.arange(n) % 7).astype(dtype),
        "encoded floats": FixedPoint.for_nodes(16, 1.0, 4).encode(np.linspace(-1, 1, n))[0].astype(dtype),
    }
    assert _top_bits_p_value(noise) > 1e-4
    for name, x in structured.items():
        assert _top_bits_p_value(x) < 1e-4, f"the chi-square test cannot tell {name} from uniform"
        assert _top_bits_p_value(ring_sum(x, noise)) > 1e-4, name


def test_a_million_value_mask_works() -> None:
    values = mask(SEED, 1_000_000, np.dtype(np.uint64))
    assert values.shape == (1_000_000,) and len(np.unique(values[:1000])) == 1000


def test_commitment_is_sha256_and_seeds_are_fresh() -> None:
    assert commitment(b"seed") == hashlib.sha256(b"seed").digest()
    assert len(random_seed()) == 32 and random_seed() != random_seed()


# --- graph --------------------------------------------------------------------------------------------------


def _check_regular(graph: dict[int, tuple[int, ...]], degree: int) -> None:
    """Every node has `degree` sorted neighbours, none itself, and the relation is symmetric."""
    for node, linked in graph.items():
        assert len(linked) == degree and list(linked) == sorted(set(linked)) and node not in linked
        assert all(node in graph[other] for other in linked)


@FAST
@given(num_nodes=st.integers(3, 60), half_degree=st.integers(1, 30), seed=st.integers(0, 2**63))
def test_the_graph_is_regular_symmetric_and_deterministic(num_nodes: int, half_degree: int, seed: int) -> None:
    degree = 2 * half_degree  # even: a Harary graph below n - 1, the complete graph from n - 1 on
    nodes = [1000 + 7 * i for i in range(num_nodes)]
    graph = neighbours(nodes, degree, seed)
    assert set(graph) == set(nodes)
    _check_regular(graph, min(degree, num_nodes - 1))
    assert graph == neighbours(list(reversed(nodes)), degree, seed)


def test_another_seed_gives_another_graph() -> None:
    nodes = list(range(1, 31))
    assert neighbours(nodes, 4, 0) != neighbours(nodes, 4, 1)


@pytest.mark.parametrize(("num_nodes", "degree"), [(2, 1), (5, 4), (6, 5), (6, 9), (9, 8)])
def test_a_degree_of_n_minus_1_or_more_gives_the_complete_graph(num_nodes: int, degree: int) -> None:
    nodes = list(range(10, 10 + num_nodes))
    graph = neighbours(nodes, degree, 3)
    assert graph == {node: tuple(other for other in nodes if other != node) for node in nodes}


def test_flower_sized_node_ids_keep_their_exact_value() -> None:
    nodes = [UINT64_MAX, UINT64_MAX - 1, 2**53 + 1, 2**53, 2**63 + 5, 1]
    graph = neighbours(nodes, 2, 42)
    assert set(graph) == set(nodes)
    assert set().union(*graph.values()) == set(nodes)
    _check_regular(graph, 2)


@pytest.mark.parametrize(
    ("nodes", "degree", "match"),
    [
        ([1], 1, "at least 2 nodes"),
        ([1, 2, 2, 3], 2, "distinct"),
        (list(range(10)), 3, "even"),
        (list(range(10)), 0, ">= 1"),
    ],
)
def test_neighbours_refuses_bad_graphs(nodes: list[int], degree: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        neighbours(nodes, degree, 0)


@pytest.mark.parametrize(
    ("num_nodes", "degree"), [(2, 1), (8, 7), (9, 8), (11, 10), (12, 10), (16, 10), (17, 12), (64, 14), (1000, 22)]
)
def test_the_default_degree_is_complete_up_to_8_nodes_then_logarithmic(num_nodes: int, degree: int) -> None:
    assert default_degree(num_nodes) == degree


def test_the_default_degree_always_builds_a_graph_and_the_threshold_is_a_strict_majority() -> None:
    for num_nodes in range(2, 200):
        degree = default_degree(num_nodes)
        _check_regular(neighbours(list(range(num_nodes)), degree, num_nodes), degree)
        assert default_threshold(degree) > degree / 2 and default_threshold(degree) <= degree
    assert (default_threshold(10), default_threshold(7), default_threshold(1)) == (6, 4, 1)
    with pytest.raises(ValueError, match="at least 2 nodes"):
        default_degree(1)
