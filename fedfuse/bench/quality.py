"""``fedfuse bench quality``: what compression and merge method cost in accuracy, on the same data and seeds.

Federated rows run the real apps on Flower's simulation engine (``fedfuse.simulation.simulate``) with
identical data, partition, seeds, clients, rounds and local steps: dense FedAvg; FedAvg with DARE
p = 0.9 (by default rescaled by 1/(1−p), DARE's unbiased form, without error feedback; and with error
feedback, which sends kept entries unrescaled); TIES with trim d = 0.1; Fisher with trim d = 0.1 (full
fine-tuning, error feedback on for trim); LoRA merged exactly (ΔW) and by naive factor averaging.

Merging separately trained experts (retention, interference, every method, λ chosen on a validation
split) is ``fedfuse bench merge-quality`` (:mod:`fedfuse.bench.merge_quality`), on a real chat LLM.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.table import Table

from fedfuse.simulation import simulate

FEDERATED_ROWS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("dense FedAvg", {"mode": "full", "strategy": "fedavg", "sparsifier": "none"}),
    ("FedAvg + DARE p=0.9", {"mode": "full", "strategy": "fedavg", "sparsifier": "dare", "density": 0.1}),
    (
        "FedAvg + DARE p=0.9 + error feedback",
        {"mode": "full", "strategy": "fedavg", "sparsifier": "dare", "density": 0.1, "error-feedback": True},
    ),
    ("TIES d=0.1", {"mode": "full", "strategy": "ties", "sparsifier": "trim", "density": 0.1}),
    ("Fisher d=0.1", {"mode": "full", "strategy": "fisher", "sparsifier": "trim", "density": 0.1}),
    ("LoRA exact", {"mode": "lora", "strategy": "fedavg", "lora-aggregation": "exact"}),
    ("LoRA factors", {"mode": "lora", "strategy": "fedavg", "lora-aggregation": "factors"}),
)
TARGET_SPARSE_RATIO = 0.99


@dataclass
class QualityRow:
    """One benchmark row."""

    method: str
    final_accuracy: float
    accuracy_by_round: list[float]
    uplink_bytes: int
    wall_seconds: float


def _federated(label: str, row: dict[str, Any], common: dict[str, Any], clients: int, out: Path) -> QualityRow:
    folder = out / "".join(c if c.isalnum() else "-" for c in label.lower())
    started = time.perf_counter()
    history = simulate({**common, **row, "output-dir": str(folder)}, num_clients=clients)
    accuracies = [r["accuracy"] for r in history["rounds"]]
    return QualityRow(
        label,
        accuracies[-1],
        accuracies,
        sum(r["uplink_bytes"] for r in history["rounds"]),
        time.perf_counter() - started,
    )


def _table(rows: list[QualityRow]) -> Table:
    table = Table(title="fedfuse bench quality")
    for column in ("method", "final acc", "acc by round", "uplink MB", "wall s"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for r in rows:
        table.add_row(
            r.method,
            f"{r.final_accuracy:.4f}",
            " ".join(f"{a:.3f}" for a in r.accuracy_by_round),
            f"{r.uplink_bytes / 1e6:.2f}",
            f"{r.wall_seconds:.0f}",
        )
    return table


def _checks(rows: list[QualityRow]) -> list[tuple[bool, str]]:
    by = {r.method: r for r in rows}
    checks = []
    dense = by.get("dense FedAvg")
    for name in ("TIES d=0.1", "Fisher d=0.1"):
        if dense and name in by:
            ratio = by[name].final_accuracy / dense.final_accuracy
            checks.append(
                (
                    ratio >= TARGET_SPARSE_RATIO,
                    f"{name} final accuracy ≥ {TARGET_SPARSE_RATIO}× dense FedAvg: {ratio:.3f}×",
                )
            )
    return checks


def _markdown(rows: list[QualityRow], checks: list[tuple[bool, str]], common: dict[str, Any], clients: int) -> str:
    lines = [
        "# fedfuse bench quality",
        "",
        f"clients {clients}; settings: " + ", ".join(f"{k}={v}" for k, v in sorted(common.items())),
        "",
        "| method | final accuracy | accuracy by round | uplink MB | wall s |",
        "|---|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.final_accuracy:.4f} | {' '.join(f'{a:.3f}' for a in r.accuracy_by_round)} | "
            f"{r.uplink_bytes / 1e6:.2f} | {r.wall_seconds:.0f} |"
        )
    lines += ["", *[f"- {'PASS' if ok else 'FAIL'} {text}" for ok, text in checks], ""]
    return "\n".join(lines)


def _plot(rows: list[QualityRow], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 4.5))
    FigureCanvasAgg(figure)
    axis = figure.add_subplot(1, 1, 1)
    names = [r.method for r in rows]
    axis.barh(names, [r.final_accuracy for r in rows], color="tab:blue", label="final accuracy")
    axis.invert_yaxis()
    axis.set_xlim(0, 1.05)
    axis.set_xlabel("final accuracy")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def quality(
    clients: Annotated[int, typer.Option("--clients", help="Simulated clients of the federated rows.", min=1)] = 4,
    rounds: Annotated[int, typer.Option("--rounds", help="Server rounds of the federated rows.", min=1)] = 4,
    local_steps: Annotated[int, typer.Option("--local-steps", help="Local steps per client per round.", min=1)] = 20,
    rows: Annotated[str, typer.Option("--rows", help="Comma list of federated rows to run (default: all).")] = "",
    seed: Annotated[int, typer.Option("--seed", help="Seed shared by every row.")] = 0,
    out: Annotated[Path, typer.Option("--out", help="Folder for quality.md, quality.json, quality.png.")] = Path(
        "bench-results/quality"
    ),
    check: Annotated[bool, typer.Option("--check", help="Exit with status 1 when a target fails.")] = False,
) -> None:
    """Final accuracy, uplink bytes and wall time of merge methods on the same data and seeds.

    Expert merging (retention of separately trained skills) is ``fedfuse bench merge-quality``.
    """
    console = Console()
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    common = {"num-server-rounds": rounds, "local-steps": local_steps, "seed": seed, "fraction-evaluate": 0.0}
    wanted = {name.strip() for name in rows.split(",") if name.strip()}
    unknown = wanted - {label for label, _ in FEDERATED_ROWS}
    if unknown:
        raise typer.BadParameter(
            f"unknown rows {sorted(unknown)}; choose from {[label for label, _ in FEDERATED_ROWS]}"
        )
    results: list[QualityRow] = []
    for label, row in FEDERATED_ROWS:
        if wanted and label not in wanted:
            continue
        console.rule(label)
        results.append(_federated(label, row, common, clients, out / "runs"))
    checks = _checks(results)
    console.print(_table(results))
    for ok, text in checks:
        console.print(f"{'[green]PASS' if ok else '[red]FAIL'}[/] {text}")
    (out / "quality.md").write_text(_markdown(results, checks, common, clients))
    (out / "quality.json").write_text(
        json.dumps(
            {
                "settings": common,
                "clients": clients,
                "rows": [asdict(r) for r in results],
                "checks": [{"pass": ok, "check": text} for ok, text in checks],
            },
            indent=2,
        )
    )
    _plot(results, out / "quality.png")
    console.print(f"saved {out / 'quality.md'}, {out / 'quality.json'}, {out / 'quality.png'}")
    if check and not all(ok for ok, _ in checks):
        raise typer.Exit(code=1)
