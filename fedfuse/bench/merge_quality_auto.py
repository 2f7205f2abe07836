"""Rows of ``fedfuse bench merge-quality`` whose merges choose their own coefficients.

The same cached experts as every other row, as :class:`~fedfuse.automerge.Candidates` (each expert's
ΔW = s·B·A kept as factors), merged by:

- ``greedy_soup`` — Wortsman et al.: experts added to a uniform soup only when the validation score rises;
- ``searched`` — per-expert × per-layer-group weights of task arithmetic searched by CMA-ES;
- ``adamerging`` — layer-wise coefficients learned on the entropy of the merge's own answers to the
  validation prompts (no labels);
- ``learned`` — the same coefficients learned on the labelled validation loss, centrally; the run
  ``--federated`` repeats it across four institutions as ``federated learned``.

The validation score every search and soup maximises is the **mean normalized validation accuracy**
(each skill's exact match over its own expert's), the quantity the benchmark reports on the test split.
Each row records what it spent: scorer evaluations (greedy decoding of the validation split) or gradient
steps. Results are cached per method and seed under ``<out>/auto/``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fedfuse.algebra import factor_names
from fedfuse.algebra.lora import lora_modules
from fedfuse.algebra.low_rank import LowRank
from fedfuse.automerge import Candidates, CoefficientModel
from fedfuse.automerge.adamerging import AdaMergingSettings, adamerging, regrouped
from fedfuse.automerge.inputs import MergeInputs
from fedfuse.automerge.objectives import Rows, chat_rows
from fedfuse.automerge.search import Point, SearchResult, SearchSpace, search
from fedfuse.automerge.soup import greedy_soup
from fedfuse.bench.merge_quality_eval import Scorer
from fedfuse.bench.merge_quality_report import MergeResult
from fedfuse.checkpoints import atomic_output
from fedfuse.server.coefficient_round import learn_centrally

AUTO_METHODS: tuple[str, ...] = ("greedy_soup", "searched", "adamerging", "learned")
"""The rows that choose their own coefficients, in table order."""


@dataclass(frozen=True)
class AutoSettings:
    """What the automated rows may spend: evaluations, layer groups, steps, learning rate, rows per skill."""

    budget: int = 32
    groups: int = 3
    steps: int = 30
    learning_rate: float = 0.05
    learn_rows: int = 24
    max_length: int = 96

    def spec(self) -> dict[str, Any]:
        """What shapes a cached result."""
        return asdict(self)


def expert_candidates(
    skills: Sequence[str], factors: Sequence[dict[str, torch.Tensor]], scale: float, groups: int
) -> Candidates:
    """The experts' ΔW = s·B·A per adapted weight, as factors, in ``groups`` layer groups."""
    vectors = []
    for expert in factors:
        vector: dict[str, torch.Tensor | LowRank] = {}
        for module in lora_modules(list(expert)):
            a_name, b_name = factor_names(module)
            vector[module + ".weight"] = LowRank(expert[b_name].float() * scale, expert[a_name].float())
        vectors.append(vector)
    return Candidates.build(list(skills), vectors, num_groups=groups)


class ValidationScore:
    """Mean normalized validation accuracy of the merge the model holds now (a :mod:`fedfuse.automerge` scorer)."""

    name = "mean normalized validation accuracy"

    def __init__(self, scorer: Scorer, skills: Sequence[str], own_validation: dict[str, float]) -> None:
        self.scorer, self.skills, self.own = scorer, list(skills), own_validation
        self.evaluations = 0

    def score(self, cmodel: CoefficientModel) -> float:
        """Score ``cmodel``'s loaded merge (it shares its model with the benchmark's scorer)."""
        assert cmodel.model is self.scorer.model
        self.evaluations += 1
        accuracy = self.scorer.accuracies(self.skills, "validation")
        kept = [accuracy[s] / self.own[s] for s in self.skills if self.own[s] > 0]
        return sum(kept) / max(len(kept), 1)


def own_validation(
    scorer: Scorer, skills: Sequence[str], deltas: Sequence[dict[str, torch.Tensor]]
) -> dict[str, float]:
    """Each expert's validation accuracy on its own skill (the denominators of the validation score)."""
    own = {}
    for skill, delta in zip(skills, deltas, strict=True):
        scorer.use(delta)
        own[skill] = scorer.accuracy(skill, "validation")
    scorer.use(None)
    return own


def learning_rows(scorer: Scorer, skills: Sequence[str], settings: AutoSettings) -> list[Rows]:
    """Each skill's labelled validation chats as rows (the institutions' held-out rows, kept apart)."""
    return [
        chat_rows(scorer.tokenizer, scorer.prompts[s]["validation"][: settings.learn_rows], settings.max_length)
        for s in skills
    ]


def learned(
    model: CoefficientModel, parts: Sequence[Rows], initial: float, settings: AutoSettings
) -> tuple[torch.Tensor, list[float]]:
    """Coefficients learned on the labelled validation loss: the federated algorithm run centrally."""
    result = learn_centrally(
        model.model,
        model.candidates,
        parts,
        model.candidates.uniform(initial),
        steps=settings.steps,
        objective="loss",
        learning_rate=settings.learning_rate,
    )
    return result.coefficients, result.history


def cached(out: Path, method: str, seed: int, digest: str, compute: Callable[[], MergeResult]) -> MergeResult:
    """``compute()``'s result, read from ``<out>/auto/<method>-seed<seed>-<digest>.json`` when there."""
    path = out / "auto" / f"{method}-seed{seed}-{digest}.json"
    if path.is_file():
        return MergeResult(**json.loads(path.read_text()))
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, directory=False, overwrite=True) as temp:
        temp.write_text(json.dumps(asdict(result)))
    return result


def timed_result(
    scorer: Scorer, skills: Sequence[str], started: float, budget: str, detail: dict[str, Any]
) -> MergeResult:
    """The test accuracies of the model the scorer holds now, as a row's result."""
    test = scorer.accuracies(skills, "test")
    return MergeResult(
        float("nan"),
        {k: float(v) for k, v in detail.get("validation", {}).items()},
        test,
        time.perf_counter() - started,
        budget=budget,
        detail=detail,
    )


@dataclass
class AutoContext:
    """One seed's experts and scorer, as every automated row needs them."""

    seed: int
    skills: list[str]
    candidates: Candidates
    deltas: list[dict[str, torch.Tensor]]
    scorer: Scorer
    settings: AutoSettings
    arithmetic_lam: float
    """Task arithmetic's validation-chosen λ: where searches and learning start."""
    _own: dict[str, float] | None = None

    @property
    def own(self) -> dict[str, float]:
        """Each expert's validation accuracy on its own skill (scored once)."""
        if self._own is None:
            self._own = own_validation(self.scorer, self.skills, self.deltas)
        return self._own

    def model(self) -> CoefficientModel:
        """The scorer's model, at the base, as a model of the candidates' coefficients."""
        self.scorer.use(None)
        return CoefficientModel(self.scorer.model, self.candidates)

    def coefficients(self, c: torch.Tensor) -> dict[str, Any]:
        """Coefficients as JSON: candidate → per-group values."""
        checked = self.candidates.check(c)
        return {label: [round(float(v), 4) for v in checked[k]] for k, label in enumerate(self.candidates.labels)}


def run_learned(context: AutoContext) -> MergeResult:
    """The ``learned`` row: coefficients learned on the labelled validation loss, then scored on test."""
    started = time.perf_counter()
    model = context.model()
    parts = learning_rows(context.scorer, context.skills, context.settings)
    c, history = learned(model, parts, context.arithmetic_lam, context.settings)
    model.load(c)
    settings = context.settings
    detail = {"coefficients": context.coefficients(c), "loss": [round(v, 5) for v in history]}
    result = timed_result(
        context.scorer, context.skills, started, f"{settings.steps} gradient steps (labelled validation loss)", detail
    )
    model.load(None)
    return result


def _searched_detail(context: AutoContext, result: SearchResult) -> dict[str, Any]:
    best = result.best
    return {
        "validation": {"best": best.score, "baseline": result.baseline.score},
        "point": best.point.to_json(),
        "chosen": list(result.chosen),
        "scores": [round(e.score, 4) for e in result.evaluations],
    }


def _scored_search(
    context: AutoContext, run: Callable[[CoefficientModel, ValidationScore], SearchResult], spent: str
) -> MergeResult:
    """A search or soup under the validation score, then its best merge scored on the test split."""
    started = time.perf_counter()
    score = ValidationScore(context.scorer, context.skills, context.own)
    model = context.model()
    result = run(model, score)  # leaves the model holding the best merge
    row = timed_result(
        context.scorer,
        context.skills,
        started,
        f"{score.evaluations} validation evaluations {spent}",
        _searched_detail(context, result),
    )
    model.load(None)
    return row


def run_greedy_soup(context: AutoContext) -> MergeResult:
    """The ``greedy_soup`` row: experts added to the uniform soup only when the validation score rises."""
    return _scored_search(
        context, lambda model, score: greedy_soup(model, score), f"(+{len(context.skills)} for the experts' own)"
    )


def run_searched(context: AutoContext) -> MergeResult:
    """The ``searched`` row: task arithmetic's per-expert × per-layer-group weights searched by CMA-ES.

    The search starts at task arithmetic's validation-chosen λ (its first evaluation), not at λ = 1.
    """
    budget, seed, candidates = context.settings.budget, context.seed, context.candidates
    start = Point(tuple((context.arithmetic_lam,) * candidates.num_groups for _ in range(len(candidates))))

    def run(model: CoefficientModel, score: ValidationScore) -> SearchResult:
        space = SearchSpace()
        return search(model, score, method="task_arithmetic", space=space, budget=budget, seed=seed, start=start)

    shape = f"{len(context.skills)}×{context.candidates.num_groups}"
    return _scored_search(context, run, f"(CMA-ES, {shape} weights)")


def run_adamerging(context: AutoContext) -> MergeResult:
    """The ``adamerging`` row: layer-wise coefficients learned on the entropy of the merge's own answers."""
    started = time.perf_counter()
    settings = context.settings
    context.scorer.use(None)
    inputs = MergeInputs(context.scorer.model, context.scorer.tokenizer, context.candidates, causal=True)
    prompts = [p for s in context.skills for p, _ in context.scorer.prompts[s]["validation"][: settings.learn_rows]]
    learned_c = adamerging(
        inputs,
        prompts,
        AdaMergingSettings(
            steps=settings.steps,
            learning_rate=settings.learning_rate,
            init=context.arithmetic_lam,
            bounds=(0.0, 2.0),
            max_new_tokens=16,
            max_length=settings.max_length,
            seed=context.seed,
        ),
    )
    model = CoefficientModel(
        context.scorer.model, regrouped(context.candidates, context.scorer.model, learned_c.coefficients.shape[1])
    )
    model.load(learned_c.coefficients)
    detail = {
        "coefficients_mean": {
            label: round(float(learned_c.coefficients[k].mean()), 4) for k, label in enumerate(learned_c.labels)
        },
        "entropy": [round(v, 4) for v in learned_c.history] + [round(learned_c.final_entropy, 4)],
    }
    row = timed_result(
        context.scorer,
        context.skills,
        started,
        f"{settings.steps} gradient steps (entropy of its own answers, no labels), layer-wise",
        detail,
    )
    model.load(None)
    return row


RUNNERS: dict[str, Callable[[AutoContext], MergeResult]] = {
    "greedy_soup": run_greedy_soup,
    "searched": run_searched,
    "adamerging": run_adamerging,
    "learned": run_learned,
}
