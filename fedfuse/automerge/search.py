"""Coefficient search: per-model (per-layer-group) weights, λ and density maximizing a scorer, within a budget.

A point of the search is a :class:`Point` — weights (K×G), λ and density — and the merge at a point is the
one a mergekit recipe with those numbers describes (:mod:`.recipe_out` writes it), computed in memory:

* ``task_arithmetic``: θ_base + λ·Σₖ w[k, g]·τₖ (``Candidates`` with c = λ·w);
* ``linear``: θ_base + Σₖ (w[k, g] / Σⱼ w[j, g])·τₖ (mergekit's normalized linear merge);
* ``ties`` / ``dare_ties`` / ``dare_linear``: fedfuse's own strategy (mergekit's defaults, λ) over each
  candidate's dense task vector shrunk by the method's sparsifier at the density — DARE masks seeded as the
  recipe merge seeds them (``dare_seed_fn(seed, 0, k)``), so ``fedfuse merge --config`` writes the same model.

The optimizer is CMA-ES (``cma``) or Optuna's TPE on the point's free numbers scaled to [0, 1]
(:class:`SearchSpace`, data); the budget is the number of scorer evaluations, the method's default point
(:func:`default_point`) the first of them. Seeded: the same seed gives the same evaluations.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from fedfuse.algebra import Sparsifier, dare_seed_fn, sparsify_update
from fedfuse.algebra.low_rank import LowRank
from fedfuse.automerge.coefficients import Candidates, CoefficientModel
from fedfuse.automerge.scorers import Scorer
from fedfuse.offline.errors import MergeInputError
from fedfuse.offline.plan import plan_sparsifier, plan_strategy
from fedfuse.offline.recipe import METHODS

SEARCH_METHODS = ("task_arithmetic", "linear", "ties", "dare_ties", "dare_linear")
"""Methods whose coefficients can be searched (greedy soup is :mod:`.soup`)."""
SPARSE_METHODS = ("ties", "dare_ties", "dare_linear")
OPTIMIZERS = ("cma", "tpe")
INSTALL_HINT = "coefficient search needs cma and optuna: pip install 'fedfuse[search]'"
Knob = Literal["weights", "lam", "density"]
KNOBS: tuple[Knob, ...] = ("weights", "lam", "density")
DEFAULT_DENSITY = 0.5


@dataclass(frozen=True)
class SearchSpace:
    """Which numbers are searched and their bounds (the others stay at the default point's)."""

    weights: bool = True
    lam: bool = False
    density: bool = False
    weight_bounds: tuple[float, float] = (0.0, 1.5)
    lam_bounds: tuple[float, float] = (0.1, 2.0)
    density_bounds: tuple[float, float] = (0.05, 1.0)

    @classmethod
    def parse(cls, text: str, method: str) -> SearchSpace:
        """``weights,lam,density`` (any subset) checked against the method (no λ in linear, no density dense)."""
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in KNOBS]
        if unknown or not names:
            raise MergeInputError(f"--search: choose among {', '.join(KNOBS)}, got {text!r}")
        if "lam" in names and method == "linear":
            raise MergeInputError("--search lam: linear has no λ (its weights are normalized); search weights")
        if "density" in names and method not in SPARSE_METHODS:
            raise MergeInputError(f"--search density: {method} does not sparsify ({', '.join(SPARSE_METHODS)} do)")
        space = cls("weights" in names, "lam" in names, "density" in names)
        return replace(space, weight_bounds=(0.01, 1.0)) if method == "linear" else space


@dataclass(frozen=True)
class Point:
    """Weights (K×G, nested lists), λ and density of one merge."""

    weights: tuple[tuple[float, ...], ...]
    lam: float = 1.0
    density: float = 1.0

    def to_json(self) -> dict[str, Any]:
        return {"weights": [list(row) for row in self.weights], "lam": self.lam, "density": self.density}


@dataclass(frozen=True)
class Evaluation:
    """One scored point and the seconds its merge and scoring took."""

    point: Point
    score: float
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"point": self.point.to_json(), "score": self.score, "seconds": round(self.seconds, 4)}


@dataclass
class SearchResult:
    """The best point and score, the baseline (first evaluation) and every evaluation in order."""

    method: str
    labels: tuple[str, ...]
    evaluations: list[Evaluation] = field(default_factory=list)
    chosen: tuple[str, ...] = ()
    """Greedy soup: the candidates in the soup."""
    baseline_index: int = 0
    """Which evaluation is the baseline (a search's default point; a soup's best single candidate)."""
    best_index: int | None = None
    """Which evaluation is the result (None: the first with the highest score)."""

    @property
    def baseline(self) -> Evaluation:
        return self.evaluations[self.baseline_index]

    @property
    def best(self) -> Evaluation:
        """The result: the first evaluation with the highest score, unless the method chose another."""
        if self.best_index is not None:
            return self.evaluations[self.best_index]
        return max(self.evaluations, key=lambda e: e.score)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "labels": list(self.labels),
            "chosen": list(self.chosen),
            "best": self.best.to_json(),
            "baseline": self.baseline.to_json(),
            "evaluations": [e.to_json() for e in self.evaluations],
        }


def default_point(method: str, candidates: Candidates) -> Point:
    """The method's usual numbers: every weight 1, λ 1, density 0.5 where the method sparsifies."""
    weights = tuple((1.0,) * candidates.num_groups for _ in range(len(candidates)))
    return Point(weights, 1.0, DEFAULT_DENSITY if method in SPARSE_METHODS else 1.0)


# ---------------------------------------------------------------- the merge at a point


def _dense(direction: torch.Tensor | LowRank) -> torch.Tensor:
    return direction.b @ direction.a if isinstance(direction, LowRank) else direction


def _sparse_task_vector(method: str, candidates: Candidates, point: Point, seed: int) -> dict[str, torch.Tensor]:
    """TIES / DARE merge of the candidates' dense task vectors, as the recipe merge folds each tensor."""
    row = METHODS[method]
    strategy = plan_strategy(
        method, {"normalize": row.shared["normalize"], "lam": point.lam}, device="cpu", dtype="float32"
    )
    if point.density >= 1.0:
        sparsifier = Sparsifier()
    else:
        rescale = "l1" if row.shared["rescale"] else "none"
        sparsifier = plan_sparsifier(method, row.sparsifier, point.density, rescale=rescale)
    seeds = [dare_seed_fn(seed, 0, k) if sparsifier.seeded else None for k in range(len(candidates))]
    out: dict[str, torch.Tensor] = {}
    for name in candidates.names:
        state = strategy.new_state()
        group = candidates.groups[name]
        shape = next(_dense(v[name]).shape for v in candidates.vectors if name in v)
        for k, vector in enumerate(candidates.vectors):
            tau = _dense(vector[name]).float() if name in vector else torch.zeros(shape)
            state.add(sparsify_update({name: tau}, sparsifier, seeds[k]), weight=point.weights[k][group])
        out[name] = state.finalize(release=True)[name].float()
    return out


def coefficients(method: str, point: Point) -> torch.Tensor:
    """c (K×G) of a linear method at ``point``: λ·w (task arithmetic) or w / Σw per group (linear)."""
    w = torch.tensor(point.weights, dtype=torch.float64)
    if method == "linear":
        return w / w.sum(dim=0, keepdim=True).clamp_min(1e-12)
    return point.lam * w


def task_vector(candidates: Candidates, method: str, point: Point, seed: int) -> dict[str, torch.Tensor]:
    """The merged task vector at ``point`` (dense, per changed tensor)."""
    if method in SPARSE_METHODS:
        return _sparse_task_vector(method, candidates, point, seed)
    return candidates.merged(coefficients(method, point))


def load_point(cmodel: CoefficientModel, method: str, point: Point, seed: int) -> None:
    """Write the merge at ``point`` into the model in place."""
    if method in SPARSE_METHODS:
        cmodel.load_task_vector(_sparse_task_vector(method, cmodel.candidates, point, seed))
    else:
        cmodel.load(coefficients(method, point))


# ---------------------------------------------------------------- the optimizers


@dataclass(frozen=True)
class Encoding:
    """A point's free numbers as a vector in [0, 1]^d (the optimizers' space) and back."""

    space: SearchSpace
    start: Point

    @property
    def size(self) -> int:
        k, g = len(self.start.weights), len(self.start.weights[0])
        return (k * g if self.space.weights else 0) + int(self.space.lam) + int(self.space.density)

    def names(self) -> list[str]:
        k, g = len(self.start.weights), len(self.start.weights[0])
        names = [f"w{i}_{j}" for i in range(k) for j in range(g)] if self.space.weights else []
        return names + (["lam"] if self.space.lam else []) + (["density"] if self.space.density else [])

    def _bounds(self) -> list[tuple[float, float]]:
        s, k = self.space, len(self.start.weights) * len(self.start.weights[0])
        bounds = [s.weight_bounds] * k if s.weights else []
        return bounds + ([s.lam_bounds] if s.lam else []) + ([s.density_bounds] if s.density else [])

    def encode(self, point: Point) -> list[float]:
        values = [w for row in point.weights for w in row] if self.space.weights else []
        values += ([point.lam] if self.space.lam else []) + ([point.density] if self.space.density else [])
        return [min(1.0, max(0.0, (v - lo) / (hi - lo))) for v, (lo, hi) in zip(values, self._bounds(), strict=True)]

    def decode(self, unit: Sequence[float]) -> Point:
        bounds = zip(unit, self._bounds(), strict=True)
        values = [lo + min(1.0, max(0.0, float(u))) * (hi - lo) for u, (lo, hi) in bounds]
        point, k, g = self.start, len(self.start.weights), len(self.start.weights[0])
        if self.space.weights:
            flat, values = values[: k * g], values[k * g :]
            point = replace(point, weights=tuple(tuple(round(flat[i * g + j], 6) for j in range(g)) for i in range(k)))
        if self.space.lam:
            point, values = replace(point, lam=round(values[0], 6)), values[1:]
        if self.space.density:
            point = replace(point, density=round(values[0], 6))
        return point


Evaluate = Callable[[Point], float]


def require_optimizer(optimizer: str) -> None:
    """Import the optimizer's package now: a missing one is a one-line error naming the extra."""
    import importlib

    try:
        importlib.import_module("cma" if optimizer == "cma" else "optuna")
    except ImportError:
        raise MergeInputError(INSTALL_HINT) from None


def _cma(encoding: Encoding, evaluate: Evaluate, budget: int, seed: int) -> None:
    import cma  # type: ignore[import-untyped, unused-ignore]

    x0 = encoding.encode(encoding.start)
    pad = len(x0) == 1  # CMA-ES needs two dimensions at least: a dummy one, ignored
    options = {"bounds": [0.0, 1.0], "seed": seed + 1, "verbose": -9, "popsize": max(4, min(8, budget // 3))}
    strategy = cma.CMAEvolutionStrategy([*x0, 0.5] if pad else x0, 0.25, options)
    while budget > 0:
        solutions = strategy.ask()
        scores = []
        for x in solutions[:budget]:
            scores.append(-evaluate(encoding.decode(list(x[:1]) if pad else list(x))))
        budget -= len(scores)
        if len(scores) < len(solutions):
            break
        strategy.tell(solutions, scores)


def _tpe(encoding: Encoding, evaluate: Evaluate, budget: int, seed: int) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = encoding.names()
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, budget // 3)))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.enqueue_trial(dict(zip(names, encoding.encode(encoding.start), strict=True)))

    def objective(trial: Any) -> float:
        return evaluate(encoding.decode([trial.suggest_float(n, 0.0, 1.0) for n in names]))

    study.optimize(objective, n_trials=budget)


def search(
    cmodel: CoefficientModel,
    scorer: Scorer,
    *,
    method: str,
    space: SearchSpace,
    budget: int,
    optimizer: str = "cma",
    seed: int = 0,
    on_evaluation: Callable[[Evaluation], None] | None = None,
    start: Point | None = None,
) -> SearchResult:
    """Search the point of ``method`` maximizing ``scorer``: ``budget`` evaluations, the start point first.

    ``start`` (default: :func:`default_point`) is the baseline and where CMA-ES centres its first generation,
    e.g. task arithmetic at a λ already chosen on a grid.
    """
    if method not in SEARCH_METHODS:
        raise MergeInputError(f"--method {method!r} cannot be searched: choose {', '.join(SEARCH_METHODS)}")
    if optimizer not in OPTIMIZERS:
        raise MergeInputError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if budget < 2:
        raise MergeInputError(f"--budget must be at least 2 (the default point and one more), got {budget}")
    require_optimizer(optimizer)
    candidates = cmodel.candidates
    result = SearchResult(method, candidates.labels)
    start = start or default_point(method, candidates)

    def evaluate(point: Point) -> float:
        began = time.perf_counter()
        load_point(cmodel, method, point, seed)
        score = float(scorer.score(cmodel))
        evaluation = Evaluation(point, score, time.perf_counter() - began)
        result.evaluations.append(evaluation)
        if on_evaluation is not None:
            on_evaluation(evaluation)
        return score

    encoding = Encoding(space, start)
    if optimizer == "cma":
        evaluate(start)  # the baseline: CMA-ES starts its search there
        _cma(encoding, evaluate, budget - 1, seed)
    else:
        _tpe(encoding, evaluate, budget, seed)  # the baseline is TPE's first (enqueued) trial
    load_point(cmodel, method, result.best.point, seed)
    return result


__all__ = [
    "OPTIMIZERS",
    "SEARCH_METHODS",
    "Evaluation",
    "Point",
    "SearchResult",
    "SearchSpace",
    "default_point",
    "load_point",
    "search",
    "task_vector",
]
