"""Fuzzing the decoder: a mutated payload is refused with UpdateRejected or decodes to the original.

Raw mutations (bit flips, overwrites, truncation, appended bytes, and header or blob edits
without a new checksum) must be refused or be harmless. Edits followed by a new checksum — what a
buggy or hostile sender can produce — must be refused or decode to an update that keeps every
promise of the decoder. Nothing but UpdateRejected may escape, and never its catch-all reason.

Each test runs ``FEDFUSE_FUZZ_EXAMPLES`` examples (default 2000); raise it for a longer hunt:
``FEDFUSE_FUZZ_EXAMPLES=50000 python -m pytest tests/test_wire_fuzz.py``.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedfuse.bench.fuzz import (
    INTERESTING_VALUES,
    Append,
    BitFlip,
    BlobEdit,
    HeaderEdit,
    Overwrite,
    Truncate,
    mutate_and_check,
    run_fuzz,
    sample_cases,
)

pytestmark = pytest.mark.unit

EXAMPLES = int(os.environ.get("FEDFUSE_FUZZ_EXAMPLES", "2000"))
CASES = sample_cases()
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

positions = st.integers(0, 1 << 16)
header_values = st.one_of(
    st.sampled_from(INTERESTING_VALUES),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
raw_mutations = st.one_of(
    st.builds(BitFlip, positions, st.integers(0, 7)),
    st.builds(Overwrite, positions, st.binary(min_size=1, max_size=8)),
    st.builds(Truncate, positions),
    st.builds(Append, st.binary(min_size=1, max_size=16)),
)
header_edits = st.builds(HeaderEdit, positions, st.sampled_from(["set", "remove", "add"]), header_values, st.booleans())
blob_edits = st.builds(
    BlobEdit,
    st.integers(0, 16),
    st.sampled_from(["flip", "overwrite", "truncate", "append"]),
    positions,
    st.binary(min_size=1, max_size=12),
    st.booleans(),
)


def test_the_sample_payloads_cover_every_encoding_and_value_dtype() -> None:
    encodings = {entry.encoding for case in CASES for entry in case.original.entries.values()}
    assert encodings == {"dense", "bitmap", "delta", "dare"}
    assert {case.original.value_dtype for case in CASES} == {"float32", "float16", "bfloat16"}
    assert any(case.original.fisher for case in CASES)


@FUZZ
@given(case=st.sampled_from(CASES), mutations=st.lists(raw_mutations, min_size=1, max_size=3))
def test_raw_byte_mutations_are_refused_or_harmless(case, mutations) -> None:
    mutate_and_check(case, mutations)


@FUZZ
@given(case=st.sampled_from(CASES), edit=st.one_of(header_edits, blob_edits))
def test_header_and_blob_edits_are_refused_or_keep_every_promise(case, edit) -> None:
    mutate_and_check(case, [edit])


def test_the_seeded_fuzzer_used_by_the_bench_finds_nothing() -> None:
    report = run_fuzz(300, seed=1)
    assert report.examples == 300
    assert sum(report.outcomes.values()) == 300
    assert any(outcome.startswith("rejected:") for outcome in report.outcomes)
