"""``fedfuse bench quality``: what compression and merge method cost in accuracy, on the same data and seeds.

Federated rows run the real apps on Flower's simulation engine (``fedfuse.simulation.simulate``) with
identical data, partition, seeds, clients, rounds and local steps: dense FedAvg; FedAvg with DARE
p = 0.9 (by default rescaled by 1/(1−p), DARE's unbiased form, without error feedback; and with error
feedback, which sends kept entries unrescaled); TIES with trim d = 0.1; Fisher with trim d = 0.1 (full
fine-tuning, error feedback on for trim); LoRA merged exactly (ΔW) and by naive factor averaging.

The one-shot expert merge trains one expert per client on whole domains (``partition = domain``), one
round from the base model, then merges the *same* expert updates with FedAvg and with TIES (each
τₖ trimmed to d = 0.2, sign election, disjoint mean). Retention on a domain is the merged model's
accuracy there over the accuracy of the expert that owns it; the row reports the mean over domains.
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

from fedfuse.algebra import Sparsifier, apply_task_vector, sparsify_update, to_dense
from fedfuse.client.local_round import Shard, run_local_round
from fedfuse.rounds import RoundEngine, UpdateSpace
from fedfuse.settings import RunSettings, build_merge_strategy
from fedfuse.simulation import simulate
from fedfuse.training.data import data_for, tokenize
from fedfuse.training.loop import evaluate
from fedfuse.training.models import base_model, global_state, load_global_state, update_shapes
from fedfuse.wire import Expectation, decode_update, encode_update

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
EXPERT_TRIM = 0.2
TARGET_SPARSE_RATIO = 0.99
TARGET_RETENTION = 0.90


@dataclass
class QualityRow:
    """One benchmark row."""

    method: str
    final_accuracy: float
    accuracy_by_round: list[float]
    mean_retention: float | None
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
        None,
        sum(r["uplink_bytes"] for r in history["rounds"]),
        time.perf_counter() - started,
    )


def _expert_rows(common: dict[str, Any], experts: int, steps: int, console: Console) -> list[QualityRow]:
    settings = RunSettings.from_run_config(
        {}, **{**common, "mode": "full", "partition": "domain", "sparsifier": "none", "local-steps": steps}
    )
    started = time.perf_counter()
    model, tokenizer = base_model(settings)
    base = {name: t.clone() for name, t in global_state(model).items()}
    data = data_for(settings, experts)
    test = tokenize(data.test, tokenizer, settings.source.sequence_length, settings.source.task)
    shapes = update_shapes(settings)
    updates, owned = [], []
    for k in range(experts):
        console.print(f"expert {k + 1}/{experts}: training on {len(data.partitions[k])} examples")
        local = run_local_round(settings, {}, round_number=1, run_id="experts", shard=Shard(k, experts, f"expert-{k}"))
        updates.append(local)
        owned.append({data.domain_names[int(d)] for d in set(data.train.labels[data.partitions[k]].tolist())})
    train_seconds = time.perf_counter() - started
    expert_accuracy: dict[str, float] = {}
    decoded = [decode_update(u.payload, expect=Expectation(shapes=shapes)) for u in updates]
    for k, update in enumerate(decoded):
        load_global_state(model, apply_task_vector(base, {n: to_dense(t) for n, t in update.tensors.items()}))
        per_domain = evaluate(model, test, data.domain_names).per_domain
        expert_accuracy.update({d: per_domain[d] for d in owned[k]})
    rows = []
    for label, strategy, trim in (("expert merge FedAvg", "fedavg", None), ("expert merge TIES", "ties", EXPERT_TRIM)):
        merge_started = time.perf_counter()
        payloads = (
            [u.payload for u in updates]
            if trim is None
            else [
                encode_update(
                    sparsify_update({n: to_dense(t) for n, t in update.tensors.items()}, Sparsifier("trim", trim)),
                    header=update.header,
                )
                for update in decoded
            ]
        )
        merge_round = RoundEngine(build_merge_strategy(settings.replace(strategy=strategy)), UpdateSpace.full(shapes))
        for payload in payloads:
            rejection = merge_round.offer(payload)
            if rejection is not None:
                raise RuntimeError(rejection.message)
        merged = merge_round.finalize(base)
        if merged is None:
            raise RuntimeError(f"{label}: the merge accepted no expert update")
        load_global_state(model, merged)
        result = evaluate(model, test, data.domain_names)
        retention = [result.per_domain[d] / expert_accuracy[d] for d in expert_accuracy if expert_accuracy[d] > 0]
        rows.append(
            QualityRow(
                label,
                result.accuracy,
                [result.accuracy],
                sum(retention) / len(retention),
                sum(len(u.payload) for u in updates),
                train_seconds + time.perf_counter() - merge_started,
            )
        )
    console.print(
        "expert accuracy on own domains: " + ", ".join(f"{d} {a:.3f}" for d, a in sorted(expert_accuracy.items()))
    )
    return rows


def _table(rows: list[QualityRow]) -> Table:
    table = Table(title="fedfuse bench quality")
    for column in ("method", "final acc", "acc by round", "mean retention", "uplink MB", "wall s"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for r in rows:
        table.add_row(
            r.method,
            f"{r.final_accuracy:.4f}",
            " ".join(f"{a:.3f}" for a in r.accuracy_by_round),
            "—" if r.mean_retention is None else f"{r.mean_retention:.3f}",
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
    ties, fedavg = by.get("expert merge TIES"), by.get("expert merge FedAvg")
    if ties and fedavg and ties.mean_retention is not None and fedavg.mean_retention is not None:
        checks.append(
            (
                ties.mean_retention >= TARGET_RETENTION,
                f"expert merge mean retention ≥ {TARGET_RETENTION} (TIES): {ties.mean_retention:.3f}",
            )
        )
        checks.append(
            (
                ties.mean_retention >= fedavg.mean_retention,
                f"expert merge TIES ≥ FedAvg retention: {ties.mean_retention:.3f} vs {fedavg.mean_retention:.3f}",
            )
        )
    return checks


def _markdown(rows: list[QualityRow], checks: list[tuple[bool, str]], common: dict[str, Any], clients: int) -> str:
    lines = [
        "# fedfuse bench quality",
        "",
        f"clients {clients}; settings: " + ", ".join(f"{k}={v}" for k, v in sorted(common.items())),
        "",
        "| method | final accuracy | accuracy by round | mean retention | uplink MB | wall s |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        retention = "—" if r.mean_retention is None else f"{r.mean_retention:.3f}"
        lines.append(
            f"| {r.method} | {r.final_accuracy:.4f} | {' '.join(f'{a:.3f}' for a in r.accuracy_by_round)} | "
            f"{retention} | {r.uplink_bytes / 1e6:.2f} | {r.wall_seconds:.0f} |"
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
    retained = [(i, r.mean_retention) for i, r in enumerate(rows) if r.mean_retention is not None]
    if retained:
        axis.scatter(
            [v for _, v in retained], [i for i, _ in retained], color="tab:red", zorder=3, label="mean retention"
        )
    axis.invert_yaxis()
    axis.set_xlim(0, 1.05)
    axis.set_xlabel("accuracy / retention")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def quality(
    clients: Annotated[int, typer.Option("--clients", help="Simulated clients of the federated rows.", min=1)] = 4,
    rounds: Annotated[int, typer.Option("--rounds", help="Server rounds of the federated rows.", min=1)] = 4,
    local_steps: Annotated[int, typer.Option("--local-steps", help="Local steps per client per round.", min=1)] = 20,
    experts: Annotated[
        int, typer.Option("--experts", help="Domain experts of the one-shot merge (0: skip).", min=0)
    ] = 5,
    expert_steps: Annotated[int, typer.Option("--expert-steps", help="Local steps of each expert.", min=1)] = 40,
    rows: Annotated[str, typer.Option("--rows", help="Comma list of federated rows to run (default: all).")] = "",
    seed: Annotated[int, typer.Option("--seed", help="Seed shared by every row.")] = 0,
    out: Annotated[Path, typer.Option("--out", help="Folder for quality.md, quality.json, quality.png.")] = Path(
        "bench-results/quality"
    ),
    check: Annotated[bool, typer.Option("--check", help="Exit with status 1 when a target fails.")] = False,
) -> None:
    """Final accuracy, expert retention, uplink bytes and wall time of merge methods on the same data and seeds."""
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
    if experts:
        console.rule("one-shot expert merge")
        results.extend(_expert_rows(common, experts, expert_steps, console))
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
