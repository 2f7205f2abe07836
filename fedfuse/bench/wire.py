"""``fedfuse bench wire``: bytes per parameter and encode/decode speed of the update wire format.

Rows: dense fp32/bf16, TIES-trimmed updates (d = 0.05, 0.1, 0.2) and DARE-dropped updates
(p = 0.8, 0.9, 0.95) with fp32 and bf16 values, next to Flower's ``ArrayRecord`` for the same
dense fp32 tensors. Speeds are MB/s of dense-equivalent fp32 input (P·4 bytes) over the median
encode + decode time (after a warm-up run), with one torch thread unless ``--threads`` says
otherwise; the client-side sparsify time is reported apart, not counted in encode.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from fedfuse.algebra import Sparsifier, dare_seed_fn, sparsify_update
from fedfuse.algebra.sparsify import SparsifierKind
from fedfuse.wire import Expectation, UpdateHeader, decode_update, encode_update, fingerprint

RUN_ID = "bench-wire"
FRACTIONS = (0.4, 0.3, 0.2, 0.1)
TARGET_DARE_BYTES = 0.21
TARGET_TIES_BYTES = 0.35
TARGET_MBPS = 200.0
VALUE_DTYPES = ("float32", "bfloat16")
SPARSE_CASES: tuple[tuple[str, SparsifierKind, float], ...] = (
    ("TIES d=0.05", "trim", 0.05),
    ("TIES d=0.1", "trim", 0.1),
    ("TIES d=0.2", "trim", 0.2),
    ("DARE p=0.8", "dare", 0.2),
    ("DARE p=0.9", "dare", 0.1),
    ("DARE p=0.95", "dare", 0.05),
)
"""(label, sparsifier kind, kept density): DARE's drop rate p keeps density 1 − p."""


@dataclass
class Row:
    """One measured configuration."""

    case: str
    values: str
    encodings: str
    bytes: int
    bytes_per_param: float
    sparsify_ms: float | None
    encode_ms: float
    decode_ms: float
    mbps: float
    sparse: bool


def _tensors(params: int, seed: int) -> dict[str, torch.Tensor]:
    """A task vector of ``params`` entries in a few tensors (2-D where the size allows)."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [int(params * f) for f in FRACTIONS[:-1]]
    sizes.append(params - sum(sizes))
    out = {}
    for i, size in enumerate(sizes):
        shape = (size // 1000, 1000) if size >= 1000 and size % 1000 == 0 else (size,)
        out[f"layers.{i}.weight"] = torch.randn(shape, generator=generator) * 1e-3
    return out


def _median_ms(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median wall time of ``repeat`` calls after one untimed warm-up call, and the last result."""
    times, result = [], fn()
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, result


def _measure(
    case: str,
    update: dict,
    value_dtype: str,
    header: UpdateHeader,
    expect: Expectation,
    params: int,
    repeat: int,
    sparsify_ms: float | None,
) -> Row:
    encode_ms, data = _median_ms(lambda: encode_update(update, header=header, value_dtype=value_dtype), repeat)
    decode_ms, decoded = _median_ms(lambda: decode_update(data, expect=expect), repeat)
    kinds = sorted({entry.encoding for entry in decoded.entries.values()})
    return Row(
        case,
        value_dtype,
        "+".join(kinds),
        len(data),
        len(data) / params,
        sparsify_ms,
        encode_ms,
        decode_ms,
        params * 4 / 1e6 / ((encode_ms + decode_ms) / 1e3),
        sparse=sparsify_ms is not None,
    )


def _flower_row(tau: dict[str, torch.Tensor], params: int, repeat: int) -> Row:
    from flwr.app import ArrayRecord

    encode_ms, record = _median_ms(lambda: ArrayRecord(torch_state_dict=tau), repeat)
    decode_ms, _ = _median_ms(record.to_torch_state_dict, repeat)
    size = record.count_bytes()
    return Row(
        "Flower ArrayRecord (dense)",
        "float32",
        "numpy",
        size,
        size / params,
        None,
        encode_ms,
        decode_ms,
        params * 4 / 1e6 / ((encode_ms + decode_ms) / 1e3),
        sparse=False,
    )


def _table(rows: list[Row], flower_bytes: int) -> list[str]:
    lines = [
        "| case | values | encoding | bytes | bytes/param | × Flower bytes | sparsify ms | encode ms | decode ms "
        "| enc+dec MB/s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        sparsify = "—" if r.sparsify_ms is None else f"{r.sparsify_ms:.1f}"
        lines.append(
            f"| {r.case} | {r.values} | {r.encodings} | {r.bytes:,} | {r.bytes_per_param:.4f} | "
            f"{r.bytes / flower_bytes:.3f} | {sparsify} | {r.encode_ms:.1f} | {r.decode_ms:.1f} | {r.mbps:,.0f} |"
        )
    return lines


def _targets(rows: list[Row]) -> list[tuple[str, bool]]:
    by_case = {(r.case, r.values): r for r in rows}
    dare = by_case[("DARE p=0.9", "bfloat16")]
    ties = by_case[("TIES d=0.1", "bfloat16")]
    slowest = min((r for r in rows if r.sparse), key=lambda r: r.mbps)
    return [
        (
            f"DARE p=0.9 bf16 bytes/param {dare.bytes_per_param:.4f} <= {TARGET_DARE_BYTES}",
            dare.bytes_per_param <= TARGET_DARE_BYTES,
        ),
        (
            f"TIES d=0.1 bf16 bytes/param {ties.bytes_per_param:.4f} <= {TARGET_TIES_BYTES}",
            ties.bytes_per_param <= TARGET_TIES_BYTES,
        ),
        (
            f"every sparse row encode+decode >= {TARGET_MBPS:.0f} MB/s (slowest: {slowest.case} "
            f"{slowest.values}, {slowest.mbps:,.0f} MB/s)",
            slowest.mbps >= TARGET_MBPS,
        ),
    ]


def _fuzz(examples: int, seed: int) -> tuple[list[str], dict[str, Any]]:
    from fedfuse.bench.fuzz import run_fuzz

    try:
        report = run_fuzz(examples, seed)
    except Exception as exc:
        line = f"FAIL fuzz: {type(exc).__name__} escaped: {exc}"
        return [line], {"examples": examples, "escaped": f"{type(exc).__name__}: {exc}"}
    outcomes = ", ".join(f"{k}: {v}" for k, v in sorted(report.outcomes.items()))
    lines = [
        f"PASS fuzz: {report.examples} mutated payloads in {report.seconds:.1f} s "
        f"({report.per_second:,.0f} examples/s); nothing but UpdateRejected escaped",
        f"fuzz outcomes: {outcomes}",
    ]
    summary = {"examples": report.examples, "seconds": report.seconds, "outcomes": report.outcomes, "escaped": None}
    return lines, summary


def _measure_all(tau: dict[str, torch.Tensor], params: int, repeat: int, seed: int) -> list[Row]:
    """Every row of the table: dense, each sparsifier × value dtype, then Flower's ArrayRecord."""
    base_fp = fingerprint(tau)
    shapes = {n: tuple(t.shape) for n, t in tau.items()}
    expect = Expectation(shapes, round=1, run_id=RUN_ID, base_fingerprint=base_fp)
    header = UpdateHeader(RUN_ID, 1, base_fp, "node-0", num_examples=1000)
    rows = [_measure("dense", tau, dtype, header, expect, params, repeat, None) for dtype in VALUE_DTYPES]
    for label, kind, density in SPARSE_CASES:
        sparsifier = Sparsifier(kind, density)
        seeds = dare_seed_fn(seed, 1, "node-0")
        sparsify_ms, update = _median_ms(functools.partial(sparsify_update, tau, sparsifier, seeds), repeat)
        case_header = UpdateHeader(RUN_ID, 1, base_fp, "node-0", num_examples=1000, sparsifier=sparsifier)
        for dtype in VALUE_DTYPES:
            rows.append(_measure(label, update, dtype, case_header, expect, params, repeat, sparsify_ms))
    rows.append(_flower_row(tau, params, repeat))
    return rows


def wire(
    params: Annotated[int, typer.Option("--params", help="Parameters P in the update.", min=1000)] = 10_000_000,
    repeat: Annotated[int, typer.Option("--repeat", help="Timed runs per measurement (median reported).", min=1)] = 5,
    out: Annotated[Path, typer.Option("--out", help="Folder for wire.md and wire.json.")] = Path("bench-results/wire"),
    fuzz: Annotated[int, typer.Option("--fuzz", help="Also run the decoder fuzzer on N examples.", min=0)] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random task vector, DARE masks and fuzzer.")] = 0,
    check: Annotated[bool, typer.Option("--check", help="Exit with status 1 when a target fails.")] = False,
    threads: Annotated[
        int,
        typer.Option(
            "--threads",
            help="torch intra-op threads (0: torch's default). 1 by default: one update is decoded per stream, "
            "and on a shared machine OpenMP stalls would swamp the codec's own cost.",
            min=0,
        ),
    ] = 1,
) -> None:
    """Measure the wire format: bytes/param, encode/decode MB/s, sparsify time and fingerprint MB/s."""
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        failed = _run(params, repeat, out, fuzz, seed)
    finally:
        torch.set_num_threads(previous_threads)
    if check and failed:
        raise typer.Exit(code=1)


def _run(params: int, repeat: int, out: Path, fuzz: int, seed: int) -> bool:
    """Measure, print and save everything; True when a target failed or the fuzzer found a breach."""
    load_before = os.getloadavg()[0]
    tau = _tensors(params, seed)
    rows = _measure_all(tau, params, repeat, seed)
    fp_ms, _ = _median_ms(lambda: fingerprint(tau), repeat)
    fp_mbps = params * 4 / 1e6 / (fp_ms / 1e3)
    targets = _targets(rows)
    load_after = os.getloadavg()[0]
    lines = [
        f"# fedfuse bench wire — P = {params:,} parameters in {len(tau)} tensors, median of {repeat}",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__} "
        f"(torch threads: {torch.get_num_threads()}), load average {load_before:.2f} before / {load_after:.2f} after. "
        "MB/s = P·4 bytes / (encode + decode).",
        "",
        *_table(rows, rows[-1].bytes),
        "",
        f"fingerprint: {fp_ms:.1f} ms for {params * 4 / 1e6:.1f} MB of fp32 weights = {fp_mbps:,.0f} MB/s",
        "",
        *[f"{'PASS' if ok else 'FAIL'} {text}" for text, ok in targets],
    ]
    fuzz_summary = None
    if fuzz:
        fuzz_lines, fuzz_summary = _fuzz(fuzz, seed)
        lines += fuzz_lines
    text = "\n".join(lines)
    typer.echo(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "wire.md").write_text(text + "\n", encoding="utf-8")
    result = {
        "params": params,
        "repeat": repeat,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "load_average": [load_before, load_after],
        "rows": [asdict(r) for r in rows],
        "fingerprint": {"ms": fp_ms, "mbps": fp_mbps},
        "targets": [{"target": t, "pass": ok} for t, ok in targets],
        "fuzz": fuzz_summary,
    }
    (out / "wire.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return not all(ok for _, ok in targets) or bool(fuzz_summary and fuzz_summary.get("escaped"))


if __name__ == "__main__":
    typer.run(wire)
