"""Mergeability diagnostics: why a merge of K updates may fail, from one fixed-size sketch per update.

:class:`MergeDiagnostics` keeps one :class:`~fedfuse.algebra.sketch.UpdateSketch` per update (O(K·dim)
floats in all, flat in the size of the model) and :meth:`~MergeDiagnostics.report` turns them and the merged
update into a :class:`DiagnosticsReport`: each update's exact norm, its (sketched) cosine to the merged
update, the K×K pairwise cosines, sign-conflict mass on the sampled coordinates, magnitude disparity and
an outlier score per update. Sketched cosines are within ≈ ``5/√dim`` of the exact ones
(:func:`~fedfuse.algebra.sketch.cosine_tolerance`). :func:`markdown` and :func:`heatmap_figure` render a
report's JSON (the callers write the files; matplotlib is imported only when a figure is drawn).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from fedfuse.algebra.sketch import (
    DEFAULT_DIM,
    DEFAULT_SAMPLES,
    HashCache,
    SamplePlan,
    SketchInput,
    UpdateSketch,
    cosine_tolerance,
    shape_of,
    sketch_cosine,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAD_SCALE = 1.4826
"""MAD × this estimates a normal distribution's standard deviation."""
COSINE_FLOOR = 0.05
"""Smallest spread of mean cosines a z-score divides by (differences within sketch error are not outliers)."""
LOG_NORM_FLOOR = 0.05
"""Smallest spread of log-norms a z-score divides by (5 % norm differences are not outliers)."""


@dataclass(frozen=True)
class UpdateDiagnostics:
    """One update's row of the report."""

    label: str
    weight: float
    norm: float
    cosine_to_merged: float | None
    mean_cosine: float
    """Mean sketched cosine to the other updates (0 for a lone update)."""
    sign_conflict: float | None
    """Fraction of this update's sampled |τ| mass whose sign disagrees with the elected (sum) sign."""
    outlier_score: float


@dataclass(frozen=True)
class DiagnosticsReport:
    """What :meth:`MergeDiagnostics.report` found (frozen; :meth:`to_json` / :meth:`from_json` round-trip).

    ``cosines[i][j]`` is the sketched cosine of updates i and j; ``outlier_ranking`` lists labels by
    decreasing outlier score; ``skipped`` counts contributions the diagnostics could not see (partial states).
    """

    updates: tuple[UpdateDiagnostics, ...]
    cosines: tuple[tuple[float, ...], ...]
    sign_conflict_mass: float | None
    norm_ratio: float
    norm_cv: float
    outlier_ranking: tuple[str, ...]
    merged_norm: float | None = None
    dim: int = DEFAULT_DIM
    samples: int = 0
    tolerance: float = field(default_factory=lambda: cosine_tolerance(DEFAULT_DIM))
    skipped: int = 0

    @property
    def labels(self) -> list[str]:
        """The updates' labels, in the order they were added."""
        return [u.label for u in self.updates]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (floats rounded to 6 digits)."""
        return {
            "updates": [{k: _round(v) for k, v in u.__dict__.items()} for u in self.updates],
            "cosines": [[_round(c) for c in row] for row in self.cosines],
            "sign_conflict_mass": _round(self.sign_conflict_mass),
            "norm_ratio": _round(self.norm_ratio),
            "norm_cv": _round(self.norm_cv),
            "outlier_ranking": list(self.outlier_ranking),
            "merged_norm": _round(self.merged_norm),
            "dim": self.dim,
            "samples": self.samples,
            "tolerance": _round(self.tolerance),
            "skipped": self.skipped,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DiagnosticsReport:
        """The report :meth:`to_json` wrote."""
        return cls(
            updates=tuple(UpdateDiagnostics(**u) for u in data["updates"]),
            cosines=tuple(tuple(float(c) for c in row) for row in data["cosines"]),
            sign_conflict_mass=data.get("sign_conflict_mass"),
            norm_ratio=math.inf if data["norm_ratio"] is None else float(data["norm_ratio"]),
            norm_cv=float(data["norm_cv"]),
            outlier_ranking=tuple(data["outlier_ranking"]),
            merged_norm=data.get("merged_norm"),
            dim=int(data.get("dim", DEFAULT_DIM)),
            samples=int(data.get("samples", 0)),
            tolerance=float(data.get("tolerance", cosine_tolerance(DEFAULT_DIM))),
            skipped=int(data.get("skipped", 0)),
        )

    def markdown(self) -> str:
        """A markdown table (updates by outlier rank) and one summary line."""
        return markdown(self.to_json())


def _round(value: Any) -> Any:
    """A float rounded to 6 digits; a non-finite one as None (strict JSON)."""
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    return value


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def markdown(report: Mapping[str, Any]) -> str:
    """The markdown of a report's JSON (so ``report.json`` alone re-renders it)."""
    rank = {label: i for i, label in enumerate(report["outlier_ranking"])}
    rows = sorted(report["updates"], key=lambda u: rank.get(u["label"], len(rank)))
    lines = [
        "| rank | update | weight | norm | cos to merged | mean cos to others | sign conflict | outlier score |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for i, u in enumerate(rows, 1):
        lines.append(
            f"| {i} | {u['label']} | {_fmt(u['weight'], '.4g')} | {_fmt(u['norm'], '.4g')} | "
            f"{_fmt(u['cosine_to_merged'])} | {_fmt(u['mean_cosine'])} | {_fmt(u['sign_conflict'])} | "
            f"{_fmt(u['outlier_score'], '.2f')} |"
        )
    lines.append("")
    lines.append(
        f"Sign-conflict mass {_fmt(report['sign_conflict_mass'])} (on {report['samples']} sampled coordinates); "
        f"norm max/min {_fmt(report['norm_ratio'], '.3g')}, coefficient of variation {_fmt(report['norm_cv'])}; "
        f"sketched cosines ±{_fmt(report['tolerance'], '.3f')} (dim {report['dim']})"
        + (f"; {report['skipped']} partial state(s) not diagnosed" if report.get("skipped") else "")
        + "."
    )
    return "\n".join(lines)


def heatmap_figure(report: Mapping[str, Any], title: str = "Pairwise cosines of the updates (sketched)") -> Figure:
    """The K×K pairwise cosines of a report's JSON as a heatmap (labels: the updates'), values written in cells."""
    from matplotlib.figure import Figure

    labels = [str(u["label"]) for u in report["updates"]]
    size = max(4.0, 0.5 * len(labels) + 2.5)
    figure = Figure(figsize=(size + 1.0, size), dpi=110)
    axes = figure.add_subplot()
    image = axes.imshow(report["cosines"], vmin=-1.0, vmax=1.0, cmap="RdBu_r")
    axes.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize="small")
    axes.set_yticks(range(len(labels)), labels, fontsize="small")
    if len(labels) <= 16:
        for i, row in enumerate(report["cosines"]):
            for j, value in enumerate(row):
                color = "white" if abs(value) > 0.6 else "black"
                axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="x-small", color=color)
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="cosine")
    return figure


class MergeDiagnostics:
    """One fixed-size sketch per update, all with one seed; :meth:`report` against the merged update.

    ``shapes`` fixes the coordinate sample (else the first update's shapes do); every update must then
    have those tensors (others are sketched but not sampled).
    """

    def __init__(
        self,
        *,
        dim: int = DEFAULT_DIM,
        samples: int = DEFAULT_SAMPLES,
        seed: int = 0,
        shapes: Mapping[str, Sequence[int]] | None = None,
        cache: HashCache | None = None,
    ) -> None:
        self.dim, self.samples, self.seed = dim, samples, seed
        self.cache = cache if cache is not None else HashCache()
        self.plan = None if shapes is None else SamplePlan.of({k: tuple(v) for k, v in shapes.items()}, samples, seed)
        self.sketches: list[tuple[str, float, UpdateSketch]] = []
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.sketches)

    def start(self, label: str, weight: float = 1.0) -> UpdateSketch:
        """A new update's empty sketch (stream its tensors with ``add_tensor``); needs ``shapes`` to sample."""
        sketch = UpdateSketch(self.dim, self.seed, self.plan, self.cache)
        self.sketches.append((label, float(weight), sketch))
        return sketch

    def add(self, label: str, tensors: Mapping[str, SketchInput], weight: float = 1.0) -> UpdateSketch:
        """Sketch one whole update (its tensors exactly as merged) under ``label`` with its merge ``weight``."""
        if self.plan is None:
            self.plan = SamplePlan.of({n: shape_of(t) for n, t in tensors.items()}, self.samples, self.seed)
        return self.start(label, weight).add(tensors)

    def skip(self, count: int = 1) -> None:
        """Count contributions the diagnostics do not see (a gateway's partial state)."""
        self.skipped += count

    def merged_sketch(self, merged: Mapping[str, SketchInput] | None = None) -> UpdateSketch:
        """A sketch of the merged update with the same seed (stream it with ``add_tensor`` when not given)."""
        sketch = UpdateSketch(self.dim, self.seed, None, self.cache)
        return sketch.add(merged) if merged is not None else sketch

    def report(self, merged: Mapping[str, SketchInput] | UpdateSketch | None = None) -> DiagnosticsReport:
        """The report of the updates added so far, against ``merged`` (a task vector or its sketch)."""
        if not self.sketches:
            raise ValueError("no update was added to the diagnostics")
        if merged is not None and not isinstance(merged, UpdateSketch):
            merged = self.merged_sketch(merged)
        labels = [label for label, _, _ in self.sketches]
        sketches = [sketch for _, _, sketch in self.sketches]
        cosines = pairwise_cosines(sketches)
        norms = [s.norm for s in sketches]
        means = [_mean_other(cosines, i) for i in range(len(sketches))]
        scores = outlier_scores(means, norms)
        conflicts, mass = sign_conflicts(torch.stack([s.samples for s in sketches]))
        updates = tuple(
            UpdateDiagnostics(
                label=label,
                weight=weight,
                norm=norm,
                cosine_to_merged=None if merged is None else sketch_cosine(sketch, merged),
                mean_cosine=mean,
                sign_conflict=conflict,
                outlier_score=score,
            )
            for (label, weight, sketch), norm, mean, conflict, score in zip(
                self.sketches, norms, means, conflicts, scores, strict=True
            )
        )
        ranking = sorted(range(len(labels)), key=lambda i: (-scores[i], i))
        return DiagnosticsReport(
            updates=updates,
            cosines=tuple(tuple(row) for row in cosines),
            sign_conflict_mass=mass,
            norm_ratio=norm_ratio(norms),
            norm_cv=_cv(norms),
            outlier_ranking=tuple(labels[i] for i in ranking),
            merged_norm=None if merged is None else merged.norm,
            dim=self.dim,
            samples=int(sketches[0].samples.numel()),
            tolerance=cosine_tolerance(self.dim),
            skipped=self.skipped,
        )


def pairwise_cosines(sketches: Sequence[UpdateSketch]) -> list[list[float]]:
    """The K×K sketched cosines (diagonal 1 for a non-zero update, 0 for a zero one)."""
    vectors = torch.stack([s.vector for s in sketches])
    lengths = vectors.norm(dim=1)
    unit = vectors / torch.where(lengths > 0, lengths, torch.ones_like(lengths)).unsqueeze(1)
    gram = (unit @ unit.T).clamp(-1.0, 1.0)
    return [[float(v) for v in row] for row in gram]


def _mean_other(cosines: list[list[float]], i: int) -> float:
    others = [c for j, c in enumerate(cosines[i]) if j != i]
    return sum(others) / len(others) if others else 0.0


def _robust_z(values: Sequence[float], floor: float) -> list[float]:
    """(value − median) / max(1.4826·MAD, floor) for each value."""
    center = statistics.median(values)
    spread = max(MAD_SCALE * statistics.median(abs(v - center) for v in values), floor)
    return [(v - center) / spread for v in values]


def outlier_scores(mean_cosines: Sequence[float], norms: Sequence[float]) -> list[float]:
    """Each update's outlier score: ``√(max(0, −z_cos)² + z_norm²)``.

    ``z_cos`` is the robust z-score (median / MAD, spread at least :data:`COSINE_FLOOR`) of the update's mean
    sketched cosine to the others — only disagreeing less than the rest counts — and ``z_norm`` that of its
    log-norm (spread at least :data:`LOG_NORM_FLOOR`; a zero norm counts as 1e-30), so a reversed update and
    one scaled far up or down both score high. Robust statistics keep one outlier from hiding itself.
    """
    z_cos = _robust_z(mean_cosines, COSINE_FLOOR)
    z_norm = _robust_z([math.log(max(n, 1e-30)) for n in norms], LOG_NORM_FLOOR)
    return [math.hypot(max(0.0, -zc), zn) for zc, zn in zip(z_cos, z_norm, strict=True)]


def sign_conflicts(samples: torch.Tensor) -> tuple[list[float | None], float | None]:
    """Per update and overall: the fraction of sampled |τ| mass whose sign disagrees with sign(Σₖ τₖ).

    ``samples`` is K × S (the same coordinates for every update). Where the sum is exactly 0 no sign is
    elected and all the mass there counts as conflicting. None where there is no mass (or no sample).
    """
    if samples.numel() == 0:
        return [None] * samples.shape[0], None
    elected = torch.sign(samples.sum(dim=0))
    magnitude = samples.abs()
    disagree = magnitude * (torch.sign(samples) != elected).to(samples.dtype)
    per_update = [
        float(d.sum() / m.sum()) if float(m.sum()) > 0 else None for d, m in zip(disagree, magnitude, strict=True)
    ]
    total = float(magnitude.sum())
    return per_update, (float(disagree.sum()) / total if total > 0 else None)


def norm_ratio(norms: Sequence[float]) -> float:
    """max / min of the norms (inf when some update is zero and another is not; 1 when all are zero)."""
    largest, smallest = max(norms), min(norms)
    if smallest > 0:
        return largest / smallest
    return 1.0 if largest == 0 else math.inf


def _cv(norms: Sequence[float]) -> float:
    """Coefficient of variation (population standard deviation / mean) of the norms."""
    mean = sum(norms) / len(norms)
    return statistics.pstdev(norms) / mean if mean > 0 else 0.0


__all__ = [
    "DiagnosticsReport",
    "MergeDiagnostics",
    "UpdateDiagnostics",
    "heatmap_figure",
    "markdown",
    "norm_ratio",
    "outlier_scores",
    "pairwise_cosines",
    "sign_conflicts",
]
