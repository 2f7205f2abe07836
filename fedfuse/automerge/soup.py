"""Greedy soup (Wortsman et al. 2022): add a candidate to the uniform average only if the score does not drop.

Each candidate is scored alone (θ_base + τₖ, K evaluations) and the candidates are tried best first: the
soup starts as the best one, and the next is kept when the uniform average of the soup with it scores at
least as well as the soup without it (the paper's ``>=``; K − 1 evaluations). The soup is the linear merge
of the chosen models with equal weights, θ_base + mean of their τ — 2K − 1 evaluations in all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from fedfuse.automerge.coefficients import CoefficientModel
from fedfuse.automerge.scorers import Scorer
from fedfuse.automerge.search import Evaluation, Point, SearchResult


def soup_point(chosen: Sequence[int], count: int, groups: int) -> Point:
    """The linear merge's weights of a soup: 1 for the chosen candidates, 0 for the others."""
    return Point(tuple((1.0 if k in chosen else 0.0,) * groups for k in range(count)))


def _uniform(chosen: Sequence[int], count: int, groups: int) -> torch.Tensor:
    c = torch.zeros(count, groups, dtype=torch.float64)
    c[list(chosen)] = 1.0 / len(chosen)
    return c


def greedy_soup(
    cmodel: CoefficientModel, scorer: Scorer, *, on_evaluation: Callable[[Evaluation], None] | None = None
) -> SearchResult:
    """The greedy soup under ``scorer``: a ``linear`` result whose baseline is the best single candidate."""
    candidates = cmodel.candidates
    count, groups = len(candidates), candidates.num_groups
    result = SearchResult("linear", candidates.labels)

    def evaluate(chosen: Sequence[int]) -> Evaluation:
        began = time.perf_counter()
        cmodel.load(_uniform(chosen, count, groups))
        score = float(scorer.score(cmodel))
        return Evaluation(soup_point(chosen, count, groups), score, time.perf_counter() - began)

    def record(evaluation: Evaluation) -> None:
        result.evaluations.append(evaluation)
        if on_evaluation is not None:
            on_evaluation(evaluation)

    for k in range(count):
        record(evaluate([k]))
    order = sorted(range(count), key=lambda k: -result.evaluations[k].score)  # stable: ties keep the given order
    result.baseline_index = result.best_index = order[0]
    soup, current = [order[0]], result.evaluations[order[0]].score
    for k in order[1:]:
        record(evaluate([*soup, k]))
        if result.evaluations[-1].score >= current:
            soup, current = [*soup, k], result.evaluations[-1].score
            result.best_index = len(result.evaluations) - 1
    result.chosen = tuple(candidates.labels[k] for k in sorted(soup))
    cmodel.load(_uniform(soup, count, groups))
    return result
