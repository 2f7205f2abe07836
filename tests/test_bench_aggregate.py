"""``fedfuse bench aggregate``: every method measured in its own process, same data, honest targets."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
import typer
from rich.console import Console
from typer.testing import CliRunner

from fedfuse.bench import measure
from fedfuse.bench.aggregate import (
    METHODS,
    BenchConfig,
    Row,
    aggregate,
    evaluate_targets,
    report,
    run_benchmark,
    sparse_update,
    table_rows,
    tensor_sizes,
)
from fedfuse.bench.measure import Meter, markdown_table, run_in_process

# Tiers are marked per test here: this module mixes e2e and integration and unit tests.


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(aggregate)
    return app


@pytest.mark.e2e
def test_cli_measures_each_method_in_a_fresh_process_on_the_same_data(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    methods = "fedfuse-fedavg-dense,fedfuse-ties-sparse,flower-fedavg,peft-ties"
    args = ["--params", "20000", "--k", "2", "--tensors", "2", "--methods", methods, "--out", str(out)]
    result = CliRunner().invoke(_cli(), args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    report = json.loads((out / "aggregate.json").read_text())
    rows = {row["method"]: row for row in report["rows"]}
    assert sorted(rows) == sorted(methods.split(","))
    assert all(row["peak_method"] in ("clear_refs", "sampling") for row in rows.values())
    # Same data: fedfuse TIES on trimmed updates is PEFT ties; fedfuse FedAvg is Flower's.
    assert math.isclose(rows["fedfuse-ties-sparse"]["checksum"], rows["peft-ties"]["checksum"], rel_tol=1e-6)
    assert math.isclose(rows["fedfuse-fedavg-dense"]["checksum"], rows["flower-fedavg"]["checksum"], rel_tol=1e-6)
    assert "× Flower" in result.output and result.output.count("SKIP") == 1  # no K=16 in this run
    markdown = (out / "aggregate.md").read_text()
    assert all(f"| {name} | 2 |" in markdown for name in rows)
    assert "fedfuse never holds them" in markdown


@pytest.mark.unit
def test_every_method_makes_a_row_with_positive_numbers(tmp_path: Path) -> None:
    config = BenchConfig(ks=(2,), params=20_000, tensors=2)
    rows = run_benchmark(config, runner=run_in_process)
    assert [(r.method, r.k) for r in rows] == [(name, 2) for name in METHODS]
    for row in rows:
        assert row.seconds > 0 and row.rss_growth_bytes > 0 and row.update_bytes > 0, row.method
        if METHODS[row.method].family == "fedfuse":
            assert row.add_gbps > 0 and row.inputs_held_bytes == 0, row.method
        else:
            assert row.add_gbps is None and row.inputs_held_bytes >= 2 * 20_000 * 4, row.method  # + .npy headers
    targets = report(rows, config, tmp_path, Console(width=200, record=True))
    assert len(targets) == 4 and targets[1].passed is None
    table = table_rows(rows, config)
    assert [cells[0] for cells in table] == list(METHODS)
    assert all(float(cells[3]) > 0 for cells in table)  # ratio to Flower at the same K
    assert json.loads((tmp_path / "aggregate.json").read_text())["rows"][0]["method"] == "fedfuse-fedavg-dense"


def _row(method: str, k: int, seconds: float, growth: int = 0, update: int = 0) -> Row:
    return Row(method, k, seconds, growth, 0, update, None, 0, 0.0, 1, "clear_refs", (seconds,), (growth,))


@pytest.mark.unit
def test_targets_compare_against_flower_and_peft_at_the_stated_k() -> None:
    config = BenchConfig(ks=(4, 16), params=1000)
    rows = [
        _row("flower-fedavg", 4, 1.0),
        _row("flower-fedavg", 16, 4.0),
        _row("fedfuse-ties-sparse", 4, 0.4, growth=4000),
        _row("fedfuse-ties-sparse", 16, 2.5, growth=4000),
        _row("peft-ties", 16, 60.0),
        _row("fedfuse-fedavg-dense", 4, 0.5, growth=30_000, update=4000),
        _row("fedfuse-fedavg-dense", 16, 1.0, growth=4000, update=4000),
    ]
    targets = evaluate_targets(rows, config)
    assert [t.passed for t in targets] == [False, True, True, False]
    assert "K=16: 2.500 s vs 4.000 s" in targets[0].detail
    assert "24.0× (need ≥ 20×)" in targets[1].detail
    assert "fedfuse-fedavg-dense K=4" in targets[3].detail
    assert evaluate_targets([_row("flower-fedavg", 4, 1.0)], BenchConfig(ks=(4,)))[1].passed is None


@pytest.mark.unit
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ks": (0,)}, "--k"),
        ({"ks": (4,), "density": 0.0}, "--density"),
        ({"ks": (4,), "methods": ("fedfuse-nope",)}, "fedfuse-nope"),
        ({"ks": (4,), "params": 3, "tensors": 4}, "--params"),
        ({"ks": (4,), "device": "tpu"}, "--device"),
        ({"ks": (4,), "threads": -1}, "--threads"),
    ],
)
def test_bad_options_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BenchConfig(**kwargs)


@pytest.mark.integration
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(_cli(), ["--device", "cuda", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "no CUDA device" in result.output


@pytest.mark.unit
def test_sparse_updates_keep_the_trim_count_and_share_fisher_support() -> None:
    sizes = tensor_sizes(1001, 2)
    assert sizes == {"layer0.weight": 501, "layer1.weight": 500}
    update, fisher = sparse_update(0, 3, sizes, 0.1, with_fisher=True)
    assert [update[n].nnz for n in sizes] == [50, 50]
    assert all(torch.equal(update[n].indices, fisher[n].indices) for n in sizes)
    again, _ = sparse_update(0, 3, sizes, 0.1, with_fisher=False)
    assert all(torch.equal(update[n].values, again[n].values) for n in sizes)


@pytest.mark.unit
@pytest.mark.parametrize("kernel_peak", [True, False])
def test_meter_sees_an_allocation_in_its_memory_section(monkeypatch: pytest.MonkeyPatch, kernel_peak: bool) -> None:
    if not kernel_peak:
        monkeypatch.setattr(measure, "reset_peak_rss", lambda: False)
    meter = Meter()
    with meter.memory():
        with meter.timed():
            block = torch.ones(16_000_000)  # 64 MB, written
        time.sleep(0.05)  # lets the 5 ms sampler see it
        del block
    result = meter.measurement({"note": 1})
    assert result.peak_method == ("clear_refs" if kernel_peak else "sampling")
    assert result.rss_growth_bytes >= 60_000_000
    assert result.seconds > 0 and result.extra == {"note": 1}
    with pytest.raises(RuntimeError, match="once"), meter.memory():
        pass


@pytest.mark.unit
@pytest.mark.parametrize("kernel_peak", [True, False])
def test_an_untracked_block_leaves_out_its_scratch_but_not_what_it_keeps(
    monkeypatch: pytest.MonkeyPatch, kernel_peak: bool
) -> None:
    """A benchmark's input generator is not the measured code: its transient peak must not count."""
    if not kernel_peak:
        monkeypatch.setattr(measure, "reset_peak_rss", lambda: False)
    meter = Meter()
    with meter.memory():
        before = torch.ones(4_000_000)  # 16 MB peak before the untracked block: still counts
        del before
        with meter.untracked():
            scratch = torch.ones(40_000_000)  # 160 MB, written, then freed
            time.sleep(0.05)
            kept = scratch[:8_000_000].clone()  # 32 MB left behind
            del scratch
        time.sleep(0.05)
    growth = meter.measurement().rss_growth_bytes
    assert 30_000_000 <= growth < 100_000_000, growth
    del kept
    with pytest.raises(RuntimeError, match="inside"), meter.untracked():
        pass


@pytest.mark.unit
def test_markdown_table_aligns_numbers_right() -> None:
    text = markdown_table(["method", "K"], [["a|b", "4"]])
    assert text.splitlines() == ["| method | K |", "| --- | ---: |", "| a\\|b | 4 |"]
