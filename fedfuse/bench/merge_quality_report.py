"""Tables, targets, JSON/markdown and the figure of ``fedfuse bench merge-quality``.

One :class:`SeedResult` per seed holds test accuracies per skill (base, each expert on every skill,
each merge at its validation-chosen λ); :func:`summarise` turns the seeds into rows of mean ± 95 %
interval, and :func:`checks` into the PASS/FAIL targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from fedfuse.bench.merge_quality_eval import format_interval, geometric_mean, mean_interval, retention

TARGET_RETENTION = 0.90
"""The best method's mean normalized retention (geometric mean over skills, mean over seeds)."""
TARGET_TIES_MARGIN = 0.05
"""TIES or DARE-TIES over task arithmetic on that mean."""
TARGET_EXPERT_GAIN = 0.20
"""Every expert beats the base model on its own skill by this much exact match."""
TARGET_DATA_FREE_OR_SEARCHED = 0.75
"""The best method that needs no Gram matrices: mean normalized accuracy (arithmetic mean over skills)."""
TARGET_OVER_ARITHMETIC = 0.25
"""… and at least this much above task arithmetic's."""
TARGET_FEDERATED_GAP = 0.05
"""Federated coefficient learning within this much of the same method run centrally (mean normalized accuracy)."""
FEDERATED_BUDGETS: dict[str, str] = {"learned": "the offline row's steps; each institution's gradient per step"}
"""The cost column of ``--federated`` rows that learn their coefficients (the others use the offline λ)."""
GRAM_METHODS = frozenset({"regmean", "fisher"})
"""Rows that need more than the experts' task vectors (Gram matrices, Fisher diagonals)."""


@dataclass
class MergeResult:
    """One method on one seed: the chosen λ (NaN: none), validation scores, test accuracy per skill, cost."""

    lam: float
    validation: dict[str, float]
    test: dict[str, float]
    seconds: float
    budget: str = ""
    """What choosing the coefficients spent (validation evaluations or gradient steps); "" for a λ grid."""
    detail: dict[str, Any] = field(default_factory=dict)
    """Method-specific facts (chosen experts, coefficients, objective history)."""


@dataclass
class SeedResult:
    """Everything measured on one seed (accuracies on the test split unless named)."""

    seed: int
    base: dict[str, float]
    interference: dict[str, dict[str, float]]
    """expert skill → skill → accuracy of that expert there."""
    merges: dict[str, MergeResult] = field(default_factory=dict)
    federated: dict[str, dict[str, float]] = field(default_factory=dict)
    """method → skill → test accuracy of the model a one-round simulation merged."""
    train_seconds: float = 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SeedResult:
        """A result read back from its ``asdict`` JSON (the per-seed cache)."""
        merges = {name: MergeResult(**merge) for name, merge in data["merges"].items()}
        return cls(**{**data, "merges": merges})

    def own(self, skill: str) -> float:
        """The accuracy of ``skill``'s expert on ``skill``."""
        return self.interference[skill][skill]

    def retention(self, accuracy: dict[str, float]) -> dict[str, float]:
        """Per-skill retention of ``accuracy`` against the own experts."""
        return {s: retention(a, self.own(s)) for s, a in accuracy.items()}

    def score(self, accuracy: dict[str, float]) -> float:
        """Geometric mean over skills of the retention of ``accuracy``."""
        return geometric_mean(list(self.retention(accuracy).values()))

    def normalized(self, accuracy: dict[str, float]) -> float:
        """FusionBench's summary: the arithmetic mean over skills of the retention of ``accuracy``."""
        kept = [v for v in self.retention(accuracy).values() if not math.isnan(v)]
        return sum(kept) / len(kept) if kept else math.nan


@dataclass
class Row:
    """A table row over seeds: accuracy and retention per skill, and the geometric-mean retention."""

    name: str
    accuracy: dict[str, list[float]]
    retention: dict[str, list[float]]
    score: list[float]
    lams: list[float]
    normalized: list[float] = field(default_factory=list)
    """Arithmetic mean over skills of the retention, per seed (FusionBench's mean normalized accuracy)."""
    budget: str = ""

    @property
    def mean_score(self) -> float:
        """Mean over seeds of the geometric-mean retention."""
        return mean_interval(self.score)[0]

    @property
    def mean_normalized(self) -> float:
        """Mean over seeds of the mean normalized accuracy."""
        return mean_interval(self.normalized)[0]


def _row(name: str, seeds: list[SeedResult], pick: Any, lams: list[float] | None = None, budget: str = "") -> Row:
    accuracies = [pick(s) for s in seeds]
    skills = list(seeds[0].base)
    return Row(
        name,
        {k: [a[k] for a in accuracies] for k in skills},
        {k: [s.retention(a)[k] for s, a in zip(seeds, accuracies, strict=True)] for k in skills},
        [s.score(a) for s, a in zip(seeds, accuracies, strict=True)],
        [v for v in lams or [] if not math.isnan(v)],
        [s.normalized(a) for s, a in zip(seeds, accuracies, strict=True)],
        budget,
    )


def summarise(seeds: list[SeedResult]) -> list[Row]:
    """Rows: base, own experts, every merge (validation-chosen λ), then the federated merges."""
    rows = [
        _row("base model", seeds, lambda s: s.base),
        _row("own expert", seeds, lambda s: {k: s.own(k) for k in s.base}),
    ]
    for method in seeds[0].merges:
        have = [s for s in seeds if method in s.merges]  # automated rows may run on fewer seeds
        merge = have[0].merges[method]
        budget = merge.budget or f"{len(merge.validation)} evaluations (λ grid)"
        lams = [s.merges[method].lam for s in have]
        rows.append(_row(method, have, lambda s, m=method: s.merges[m].test, lams, budget))
    federated = [s for s in seeds if s.federated]  # --federated runs seed 0 only
    for method in federated[0].federated if federated else ():
        budget = FEDERATED_BUDGETS.get(method, "λ of the offline row")
        rows.append(_row(f"federated {method}", federated, lambda s, m=method: s.federated[m], budget=budget))
    return rows


def checks(rows: list[Row], seeds: list[SeedResult]) -> list[tuple[bool, str]]:
    """The PASS/FAIL targets of the benchmark."""
    out: list[tuple[bool, str]] = []
    skills = list(seeds[0].base)
    for skill in skills:
        gains = [s.own(skill) - s.base[skill] for s in seeds]
        gain = mean_interval(gains)[0]
        out.append(
            (gain >= TARGET_EXPERT_GAIN, f"{skill} expert beats the base by ≥ {TARGET_EXPERT_GAIN:.2f}: {gain:+.3f}")
        )
    merges = {r.name: r for r in rows if r.name in seeds[0].merges}
    if merges:
        best = max(merges.values(), key=lambda r: -1.0 if math.isnan(r.mean_score) else r.mean_score)
        out.append(
            (
                best.mean_score >= TARGET_RETENTION,
                f"best method's mean normalized retention ≥ {TARGET_RETENTION:.2f}: {best.name} {best.mean_score:.3f}",
            )
        )
    out += _automated_checks(rows, merges)
    arithmetic = merges.get("task_arithmetic")
    ties = [merges[n] for n in ("ties", "dare_ties") if n in merges]
    if arithmetic and ties:
        better = max(ties, key=lambda r: r.mean_score)
        margin = better.mean_score - arithmetic.mean_score
        out.append(
            (
                margin >= TARGET_TIES_MARGIN,
                f"TIES or DARE-TIES ≥ task arithmetic + {TARGET_TIES_MARGIN:.2f}: {better.name} "
                f"{better.mean_score:.3f} vs {arithmetic.mean_score:.3f} ({margin:+.3f})",
            )
        )
    return out


def _automated_checks(rows: list[Row], merges: dict[str, Row]) -> list[tuple[bool, str]]:
    """The targets of the rows that choose coefficients: a data-free-or-searched row ≥ 0.75 and ≥ TA + 0.25;
    federated coefficient learning within 0.05 of the same method run centrally."""
    out: list[tuple[bool, str]] = []
    eligible = [r for name, r in merges.items() if name not in GRAM_METHODS]
    arithmetic = merges.get("task_arithmetic")
    if eligible and arithmetic is not None:
        best = max(eligible, key=lambda r: -1.0 if math.isnan(r.mean_normalized) else r.mean_normalized)
        floor = arithmetic.mean_normalized + TARGET_OVER_ARITHMETIC
        out.append(
            (
                best.mean_normalized >= TARGET_DATA_FREE_OR_SEARCHED and best.mean_normalized >= floor,
                f"best method without Gram matrices ≥ {TARGET_DATA_FREE_OR_SEARCHED:.2f} mean normalized accuracy "
                f"and ≥ task arithmetic + {TARGET_OVER_ARITHMETIC:.2f}: {best.name} {best.mean_normalized:.3f} "
                f"(task arithmetic {arithmetic.mean_normalized:.3f})",
            )
        )
    central = merges.get("learned")
    federated = next((r for r in rows if r.name == "federated learned"), None)
    if central is not None and federated is not None:
        gap = abs(federated.mean_normalized - central.mean_normalized)
        out.append(
            (
                gap <= TARGET_FEDERATED_GAP,
                f"federated coefficient learning within {TARGET_FEDERATED_GAP:.2f} of the central run: "
                f"{federated.mean_normalized:.3f} vs {central.mean_normalized:.3f} (gap {gap:.3f})",
            )
        )
    return out


def _cells(row: Row, skills: list[str]) -> list[str]:
    lam = "—" if not row.lams else " ".join(f"{v:g}" for v in row.lams)
    return [
        row.name,
        *[format_interval(row.accuracy[k]) for k in skills],
        format_interval(row.score),
        format_interval(row.normalized),
        lam,
        row.budget or "—",
    ]


def headers(skills: list[str]) -> list[str]:
    """Column names of the main table."""
    return [
        "method",
        *[f"{k} acc" for k in skills],
        "geo-mean retention",
        "mean normalized acc",
        "λ (per seed)",
        "spent choosing coefficients",
    ]


def main_table(rows: list[Row], skills: list[str], seeds: int) -> Table:
    """The rich table: test accuracy per skill, geometric-mean retention, chosen λ."""
    table = Table(title=f"fedfuse bench merge-quality — test exact match, {seeds} seed(s), mean ± 95% CI")
    for i, column in enumerate(headers(skills)):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*_cells(row, skills))
    return table


def interference_table(seeds: list[SeedResult]) -> Table:
    """Expert i (rows) on skill j (columns), mean over seeds."""
    skills = list(seeds[0].base)
    table = Table(title="interference: expert (row) on skill (column), test exact match")
    table.add_column("expert")
    for skill in skills:
        table.add_column(skill, justify="right")
    for expert in skills:
        table.add_row(expert, *[format_interval([s.interference[expert][k] for s in seeds]) for k in skills])
    return table


def markdown(
    rows: list[Row], seeds: list[SeedResult], results: list[tuple[bool, str]], settings: dict[str, Any]
) -> str:
    """The report as markdown: settings, main table, interference matrix, targets."""
    skills = list(seeds[0].base)
    names = headers(skills)
    lines = [
        "# fedfuse bench merge-quality",
        "",
        "settings: " + ", ".join(f"{k}={v}" for k, v in sorted(settings.items())),
        "",
        f"Test exact match per skill, {len(seeds)} seed(s), mean ± 95% t-interval; retention = merged / own"
        " expert, summarised by its geometric mean over skills and by its arithmetic mean (FusionBench's mean"
        " normalized accuracy); λ and every searched or learned coefficient chosen on the validation split.",
        "",
        "| " + " | ".join(names) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(names) - 1)) + "|",
        *["| " + " | ".join(_cells(row, skills)) + " |" for row in rows],
        "",
        "Interference (expert row on skill column):",
        "",
        "| expert | " + " | ".join(skills) + " |",
        "|---|" + "---:|" * len(skills),
    ]
    for expert in skills:
        cells = [format_interval([s.interference[expert][k] for s in seeds]) for k in skills]
        lines.append(f"| {expert} | " + " | ".join(cells) + " |")
    lines += ["", *[f"- {'PASS' if ok else 'FAIL'} {text}" for ok, text in results], ""]
    return "\n".join(lines)


def plot(rows: list[Row], seeds: list[SeedResult], path: Path) -> None:
    """Bars of geometric-mean retention per row (95 % interval as error bars) and the interference matrix."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    skills = list(seeds[0].base)
    figure = Figure(figsize=(12, 5))
    FigureCanvasAgg(figure)
    bars = figure.add_subplot(1, 2, 1)
    shown = [r for r in rows if r.name != "own expert"]
    means = [mean_interval(r.score) for r in shown]
    bars.barh(
        [r.name for r in shown],
        [0.0 if math.isnan(m) else m for m, _ in means],
        xerr=[0.0 if math.isnan(h) else h for _, h in means],
        color="tab:blue",
    )
    bars.axvline(TARGET_RETENTION, color="tab:red", linestyle="--", label=f"target {TARGET_RETENTION}")
    bars.invert_yaxis()
    bars.set_xlabel("normalized retention (geometric mean over skills)")
    bars.legend(loc="lower right")
    heat = figure.add_subplot(1, 2, 2)
    matrix = [[mean_interval([s.interference[e][k] for s in seeds])[0] for k in skills] for e in skills]
    image = heat.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    heat.set_xticks(range(len(skills)), skills, rotation=30)
    heat.set_yticks(range(len(skills)), skills)
    heat.set_xlabel("skill")
    heat.set_ylabel("expert")
    heat.set_title("expert on skill (test exact match)")
    figure.colorbar(image, ax=heat)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=110)
