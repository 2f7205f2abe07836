"""``fedfuse bench robust``: final accuracy of each merge method under each simulated attack, against its clean run.

Clients train the built-in task with the ClientApp's local round and the server's round engine
(:mod:`fedfuse.bench.rounds`); a seeded ``attacker-fraction`` of them attacks through the run-config
keys ``attack``/``attackers``/``attack-scale`` (:mod:`fedfuse.client.attacks`). Every method runs clean
and under every attack with the same data, seeds and attackers. ``clipping`` is FedAvg with
``clip-norm`` set to the median update norm of the clean FedAvg run's first round, as an operator
would read it from a report. Target: for every attack, the best robust method (clipping, median,
trimmed mean, Krum) within 2 points of its own clean accuracy.
"""

from __future__ import annotations

import json
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from fedfuse.bench.rounds import run_rounds
from fedfuse.rounds import PrivacyAccountant
from fedfuse.settings import RunSettings

DP_METHOD = "central DP"
"""FedAvg with central DP at C = the clipping row's norm and σ = ``--dp-sigma``; run clean only."""
METHODS: dict[str, dict[str, Any]] = {
    "fedavg": {"strategy": "fedavg"},
    "ties": {"strategy": "ties", "sparsifier": "trim", "density": 0.2},
    "clipping": {"strategy": "fedavg"},
    "median": {"strategy": "median"},
    "trimmed mean": {"strategy": "trimmed_mean", "strategy-params": "trim=0.25"},
    "multi-krum": {"strategy": "multi_krum", "strategy-params": "byzantine=2"},
    DP_METHOD: {"strategy": "fedavg"},
}
ROBUST_METHODS = ("clipping", "median", "trimmed mean", "multi-krum")
ATTACKS: dict[str, dict[str, Any]] = {
    "sign flip ×10": {"attack": "sign_flip", "attack-scale": 10.0},
    "noise ×10": {"attack": "noise", "attack-scale": 10.0},
    "scale ×10": {"attack": "scale", "attack-scale": 10.0},
    "label flip": {"attack": "label_flip"},
    "examples ×1000": {"attack": "inflate_examples", "attack-scale": 1000.0},
}
CLEAN = "clean"
TARGET_GAP = 0.02


@dataclass
class RobustRun:
    """One (method, condition) run."""

    method: str
    condition: str
    accuracy: list[float]
    clipped: int
    capped: int
    first_round_norm: float


def _job(method: str, condition: str, overrides: dict[str, Any], clients: int) -> RobustRun:
    torch.set_num_threads(1)
    settings = RunSettings.from_run_config({}, **overrides)
    result = run_rounds(settings, clients)
    return RobustRun(
        method,
        condition,
        result.accuracy,
        sum(int(m.get("clipped", 0)) for m in result.metrics),
        sum(int(m.get("capped", 0)) for m in result.metrics),
        float(result.metrics[0].get("update-norm-median", 0.0)),
    )


def attacker_ids(clients: int, fraction: float, seed: int) -> list[int]:
    """A seeded choice of round(fraction · clients) attacking partitions (at least one)."""
    count = max(1, round(fraction * clients))
    return sorted(int(i) for i in np.random.default_rng([seed, 12]).choice(clients, size=count, replace=False))


def _overrides(common: dict[str, Any], method: str, condition: str, attackers: list[int], clip: float, sigma: float):
    row = {**common, **METHODS[method]}
    if method == "clipping":
        row["clip-norm"] = clip
    if method == DP_METHOD:
        row.update({"dp": "central", "dp-clip-norm": clip, "dp-noise-multiplier": sigma, "weighting": "uniform"})
    if condition != CLEAN:
        row.update(ATTACKS[condition], attackers=",".join(map(str, attackers)))
    return row


def _gap_checks(runs: dict[tuple[str, str], RobustRun], conditions: list[str]) -> list[tuple[bool, str]]:
    checks = []
    for condition in conditions:
        gaps = {
            m: runs[(m, CLEAN)].accuracy[-1] - runs[(m, condition)].accuracy[-1]
            for m in ROBUST_METHODS
            if (m, condition) in runs and (m, CLEAN) in runs
        }
        if gaps:
            best = min(gaps, key=lambda m: gaps[m])
            checks.append(
                (
                    gaps[best] <= TARGET_GAP,
                    f"{condition}: best robust method {best} is {gaps[best] * 100:+.1f} points from its clean run "
                    f"(target ≤ {TARGET_GAP * 100:.0f})",
                )
            )
    return checks


def _table(runs: dict[tuple[str, str], RobustRun], methods: list[str], conditions: list[str]) -> list[list[str]]:
    rows = []
    for method in methods:
        clean = runs[(method, CLEAN)].accuracy[-1]
        row = [method, f"{clean:.3f}"]
        for condition in conditions[1:]:
            if (method, condition) not in runs:
                row.append("—")
                continue
            accuracy = runs[(method, condition)].accuracy[-1]
            row.append(f"{accuracy:.3f} ({(accuracy - clean) * 100:+.1f})")
        rows.append(row)
    return rows


def _plot(runs: dict[tuple[str, str], RobustRun], methods: list[str], conditions: list[str], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid = np.array([[runs[(m, c)].accuracy[-1] if (m, c) in runs else np.nan for c in conditions] for m in methods])
    figure = Figure(figsize=(1.6 * len(conditions) + 2, 0.55 * len(methods) + 1.6))
    FigureCanvasAgg(figure)
    axis = figure.add_subplot(1, 1, 1)
    image = axis.imshow(grid, cmap="viridis", vmin=0, vmax=max(0.01, float(np.nanmax(grid))))
    axis.set_xticks(range(len(conditions)), conditions, rotation=20, ha="right")
    axis.set_yticks(range(len(methods)), methods)
    for i in range(len(methods)):
        for j in range(len(conditions)):
            label = "—" if np.isnan(grid[i, j]) else f"{grid[i, j]:.3f}"
            axis.text(j, i, label, ha="center", va="center", color="white", fontsize=8)
    figure.colorbar(image, ax=axis, label="final accuracy")
    axis.set_title("fedfuse bench robust: final accuracy by method and attack")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def robust(
    clients: Annotated[int, typer.Option("--clients", help="Simulated clients (all train every round).", min=2)] = 8,
    attacker_fraction: Annotated[
        float, typer.Option("--attacker-fraction", help="Fraction of clients that attack.", min=0.0, max=0.5)
    ] = 0.2,
    rounds: Annotated[int, typer.Option("--rounds", help="Server rounds per run.", min=1)] = 4,
    local_steps: Annotated[int, typer.Option("--local-steps", help="Local steps per client per round.", min=1)] = 5,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Local batch size.", min=1)] = 16,
    methods: Annotated[str, typer.Option("--methods", help="Comma list of methods (default: all).")] = "",
    attacks: Annotated[str, typer.Option("--attacks", help="Comma list of attacks (default: all).")] = "",
    workers: Annotated[int, typer.Option("--workers", help="Runs at once (processes).", min=1)] = 2,
    dp_sigma: Annotated[
        float, typer.Option("--dp-sigma", help="Noise multiplier σ of the central-DP row.", min=1e-4)
    ] = 0.01,
    seed: Annotated[int, typer.Option("--seed", help="Seed shared by every run.")] = 0,
    out: Annotated[Path, typer.Option("--out", help="Folder for robust.md, robust.json, robust.png.")] = Path(
        "bench-results/robust"
    ),
    check: Annotated[bool, typer.Option("--check", help="Exit with status 1 when a target fails.")] = False,
) -> None:
    """Final accuracy of each merge method clean and under each attack, with the gap to its clean run."""
    console = Console()
    chosen_methods = _choose(methods, list(METHODS), "methods")
    conditions = [CLEAN, *_choose(attacks, list(ATTACKS), "attacks")]
    attackers = attacker_ids(clients, attacker_fraction, seed)
    common = {
        "num-server-rounds": rounds,
        "local-steps": local_steps,
        "batch-size": batch_size,
        "seed": seed,
        "eval-examples": 512,
        "client-eval-examples": 0,
        "partition": "iid",
        "learning-rate": 0.01,
    }
    console.print(f"{clients} clients, attackers {attackers}; {rounds} rounds × {local_steps} local steps")
    runs: dict[tuple[str, str], RobustRun] = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        first = pool.submit(
            _job, "fedavg", CLEAN, _overrides(common, "fedavg", CLEAN, attackers, 0.0, dp_sigma), clients
        )
        runs[("fedavg", CLEAN)] = fedavg_clean = first.result()
        clip = fedavg_clean.first_round_norm
        console.print(f"clean fedavg: {fedavg_clean.accuracy}; clipping at the median update norm {clip:.4g}")
        futures = {
            (m, c): pool.submit(_job, m, c, _overrides(common, m, c, attackers, clip, dp_sigma), clients)
            for m in chosen_methods
            for c in conditions
            if (m, c) != ("fedavg", CLEAN) and (m != DP_METHOD or c == CLEAN)
        }
        for key, future in futures.items():
            runs[key] = future.result()
            console.print(f"{key[0]:>12} · {key[1]:<16} accuracy by round {runs[key].accuracy}")
    chosen_methods = [m for m in chosen_methods if (m, CLEAN) in runs]
    accountant = PrivacyAccountant(dp_sigma, 1e-5) if dp_sigma > 0 else None
    epsilon = math.inf if accountant is None else [accountant.step(1.0) for _ in range(rounds)][-1]
    rows = _table(runs, chosen_methods, conditions)
    checks = _gap_checks(runs, conditions[1:])
    table = Table(title=f"fedfuse bench robust: final accuracy ({len(attackers)}/{clients} attackers)")
    for column in ("method", *conditions):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for ok, text in checks:
        console.print(f"{'[green]PASS' if ok else '[red]FAIL'}[/] {text}")
    out.mkdir(parents=True, exist_ok=True)
    header = "| method | " + " | ".join(conditions) + " |"
    markdown = [
        "# fedfuse bench robust",
        "",
        f"{clients} clients, attackers {attackers}, clip-norm {clip:.4g}; {DP_METHOD}: σ = {dp_sigma}, "
        f"ε = {epsilon:.4g} at δ = 1e-5 after {rounds} rounds (Opacus RDP); "
        + ", ".join(f"{k}={v}" for k, v in sorted(common.items())),
        "",
        header,
        "|---|" + "---:|" * len(conditions),
        *["| " + " | ".join(row) + " |" for row in rows],
        "",
        *[f"- {'PASS' if ok else 'FAIL'} {text}" for ok, text in checks],
        "",
    ]
    (out / "robust.md").write_text("\n".join(markdown))
    (out / "robust.json").write_text(
        json.dumps(
            {
                "settings": common,
                "clients": clients,
                "attackers": attackers,
                "clip_norm": clip,
                "runs": [asdict(r) for r in runs.values()],
                "checks": [{"pass": ok, "check": text} for ok, text in checks],
            },
            indent=2,
        )
    )
    _plot(runs, chosen_methods, conditions, out / "robust.png")
    console.print(f"saved {out / 'robust.md'}, {out / 'robust.json'}, {out / 'robust.png'}")
    if check and not all(ok for ok, _ in checks):
        raise typer.Exit(code=1)


def _choose(given: str, known: list[str], what: str) -> list[str]:
    wanted = [name.strip() for name in given.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise typer.BadParameter(f"unknown {what} {unknown}; choose from {known}")
    return wanted or known
