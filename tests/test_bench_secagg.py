"""``fedfuse bench secagg``'s cost part in-process: exact bytes, paired ratios, targets (no timings asserted)."""

from __future__ import annotations

import json

import pytest

from fedfuse.bench import secagg as bench

pytestmark = pytest.mark.unit

VALUES = 300


@pytest.fixture(scope="module")
def rows() -> list[bench.CostRow]:
    return bench.cost_rows([4, 8], [32, 24], values=VALUES, repeat=1, seed=3)


def test_every_k_and_bits_setting_has_a_plain_a_secure_and_a_recovery_row(rows):
    cases = [(r.bits, r.nodes, r.case) for r in rows]
    expected = [(bits, k, case) for k in (4, 8) for bits in (32, 24) for case in ("plain", "secure", "secure+drop")]
    assert cases == expected
    secure = [r for r in rows if r.case == "secure"]
    assert [(r.nodes, r.degree, r.threshold) for r in secure] == [(4, 3, 2), (4, 3, 2), (8, 7, 4), (8, 7, 4)]
    assert {r.ring_bits for r in secure if r.bits == 32} == {64} and {r.ring_bits for r in secure if r.bits == 24} == {
        32
    }


def test_plain_bytes_are_the_exact_payload_sizes(rows):
    work = bench.workload(VALUES)
    for count in (4, 8):
        inputs = bench.updates(work, bench.node_ids(count, 3 + count), 3)
        sizes = bench.plain_round(work, inputs)["sizes"]
        plain = next(r for r in rows if r.nodes == count and r.case == "plain")
        assert plain.bytes_up_total == sum(sizes) and plain.bytes_up == sum(sizes) / count
        assert sizes[0] > 4 * VALUES  # fp32 values plus the header


def test_secure_bytes_split_into_the_masked_vector_and_an_overhead_independent_of_the_ring(rows):
    for r in rows:
        if r.case == "plain":
            continue
        assert r.values == VALUES + 3  # the statistics, then weight, update count and clipped count
        assert r.vector_bytes == r.values * r.ring_bits // 8
        assert r.overhead_bytes == pytest.approx(r.bytes_up - r.vector_bytes)
        assert r.overhead_per_k_log_n > 0 and 0 < r.setup_bytes < r.bytes_down
    by = {(r.bits, r.nodes, r.case): r for r in rows}
    for count in (4, 8):
        assert by[(32, count, "secure")].overhead_bytes == by[(24, count, "secure")].overhead_bytes
    assert by[(32, 8, "secure")].overhead_bytes > by[(32, 4, "secure")].overhead_bytes  # more neighbours


def test_ratios_are_against_the_plain_round_of_the_same_nodes(rows):
    by = {(r.bits, r.nodes, r.case): r for r in rows}
    for (bits, count, _), r in by.items():
        plain = by[(bits, count, "plain")]
        assert r.server_ratio == pytest.approx(r.server_ms / plain.server_ms)
        assert r.bytes_ratio == pytest.approx(r.bytes_up / plain.bytes_up)


def test_the_secure_merge_matches_the_plain_one_within_the_fixed_point(rows):
    for r in rows:
        if r.case != "plain":
            assert r.max_error <= max(r.error_bound, 1e-6)


def test_targets_are_evaluated_with_their_numbers():
    rows = bench.cost_rows([4], [32, 24], values=4000, repeat=1)  # large enough that values outweigh the header
    targets = bench.cost_targets(rows)
    assert len(targets) == 4
    texts = [text for _, text in targets]
    assert "server time per round" in texts[0] and "K = 4" in texts[0]
    assert "masked vector (64-bit ring)" in texts[1] and not targets[1][0]  # 64-bit ring: 2× an fp32 payload
    assert "masked vector (32-bit ring)" in texts[3]
    accuracy = {"plain": {"accuracy": 0.80}, "secure": {"accuracy": 0.796}, "difference_points": -0.4}
    assert bench.accuracy_target(accuracy)[0]
    assert not bench.accuracy_target({**accuracy, "difference_points": -0.6})[0]


def test_the_command_writes_the_table_and_json(tmp_path):
    from typer.testing import CliRunner

    from fedfuse.cli.main import app

    result = CliRunner().invoke(
        app,
        [
            "bench",
            "secagg",
            "--nodes",
            "4,5",
            "--values",
            "32",
            "--repeat",
            "1",
            "--no-accuracy",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "secagg.json").read_text())
    assert document["accuracy"] is None and len(document["rows"]) == 12
    markdown = (tmp_path / "secagg.md").read_text()
    assert "| 29/32 | 4 | secure |" in markdown and "| 40/64 | 5 | secure |" in markdown  # default bits: 32-bit ring
    assert "accuracy not measured" in markdown
    bad = CliRunner().invoke(app, ["bench", "secagg", "--nodes", "3", "--no-accuracy", "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "at least 4" in bad.output
