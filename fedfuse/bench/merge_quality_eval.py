"""Scoring for ``fedfuse bench merge-quality``: greedy exact match per skill and the summary statistics.

:class:`Scorer` keeps one copy of the base model and puts θ_base + λ·τ into it for each candidate
(a task vector touches only the LoRA-targeted weights, so switching candidates copies a few tensors,
never the whole model), then answers every prompt of a skill with batched greedy decoding and
counts exact matches after :func:`fedfuse.data.skills.normalize_answer`.

The statistics are the merging literature's: retention (normalized accuracy) is the merged model's
accuracy on a skill over the accuracy of that skill's own expert; skills are summarised by their
geometric mean (a merge that forgets one skill entirely scores 0, as it should); seeds by the mean
and a two-sided 95 % Student-t interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedfuse.automerge.objectives import greedy_answers
from fedfuse.data import skills as skill_data
from fedfuse.training.tasks import ensure_pad_token


def retention(merged: float, expert: float) -> float:
    """Normalized accuracy merged / expert; NaN when the expert itself scores 0 (nothing to retain)."""
    return merged / expert if expert > 0 else math.nan


def geometric_mean(values: Sequence[float]) -> float:
    """Geometric mean of non-negative values, NaNs skipped; 0 as soon as one value is 0; NaN if none left."""
    kept = [v for v in values if not math.isnan(v)]
    if not kept:
        return math.nan
    if any(v < 0 for v in kept):
        raise ValueError(f"a geometric mean needs non-negative values, got {kept}")
    if any(v == 0 for v in kept):
        return 0.0
    return math.exp(sum(math.log(v) for v in kept) / len(kept))


def _t_mass(x: float, df: int, intervals: int = 2000) -> float:
    """P(0 < T < x) for Student's t with ``df`` degrees of freedom (Simpson's rule on the density)."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(t: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))

    h = x / intervals
    total = density(0.0) + density(x)
    total += sum((4 if i % 2 else 2) * density(i * h) for i in range(1, intervals))
    return total * h / 3


def t_quantile(probability: float, df: int) -> float:
    """The ``probability`` quantile (> 0.5) of Student's t with ``df`` ≥ 1 degrees of freedom, by bisection.

    Standard library only (no SciPy): accurate to about 1e-6, plenty for a confidence interval.
    """
    if not 0.5 < probability < 1.0 or df < 1:
        raise ValueError(f"need 0.5 < probability < 1 and df >= 1, got {probability}, {df}")
    target, low, high = probability - 0.5, 0.0, 1.0
    while _t_mass(high, df) < target:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if _t_mass(middle, df) < target else (low, middle)
    return (low + high) / 2


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """The mean and the half-width of its two-sided Student-t interval (NaN half-width for one value).

    With n values of sample standard deviation s the half-width is t_{(1+c)/2, n−1} · s / √n.
    """
    kept = [v for v in values if not math.isnan(v)]
    if not kept:
        return math.nan, math.nan
    mean = sum(kept) / len(kept)
    if len(kept) < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in kept) / (len(kept) - 1))
    return mean, t_quantile((1 + confidence) / 2, len(kept) - 1) * sd / math.sqrt(len(kept))


def format_interval(values: Sequence[float], digits: int = 3) -> str:
    """``mean ± half-width`` (just the mean for one seed)."""
    mean, half = mean_interval(values)
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


class Scorer:
    """Exact-match accuracy per skill of the base model plus any task vector, by greedy decoding.

    Parameters
    ----------
    model : torch.nn.Module
        The base causal LM (fp32, eval mode); modified in place by :meth:`use`.
    tokenizer : Any
        Its tokenizer, with a chat template.
    prompts : Mapping[str, Mapping[str, list[tuple[str, str]]]]
        skill → split → (prompt, answer) pairs.
    batch_size : int
        Prompts per ``generate`` call.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        prompts: Mapping[str, Mapping[str, list[tuple[str, str]]]],
        batch_size: int = 32,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        ensure_pad_token(tokenizer)
        self.prompts = prompts
        self.batch_size = batch_size
        self.parameters = dict(model.named_parameters())
        self.base: dict[str, torch.Tensor] = {}
        self.generations = 0

    @torch.no_grad()
    def use(self, tau: Mapping[str, torch.Tensor] | None, lam: float = 1.0) -> None:
        """Set the model to θ_base + λ·τ (``None``: the base model); unknown names are an error."""
        unknown = sorted(set(tau or {}) - set(self.parameters))
        if unknown:
            raise ValueError(f"task vector names no model parameter: {unknown[:3]}")
        for name, original in self.base.items():
            if tau is None or name not in tau:
                self.parameters[name].copy_(original)
        for name, delta in (tau or {}).items():
            parameter = self.parameters[name]
            if name not in self.base:
                self.base[name] = parameter.detach().clone()
            parameter.copy_(self.base[name] + lam * delta.to(parameter.dtype).reshape(parameter.shape))

    @torch.no_grad()
    def task_vector(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """τ = weights − θ_base for the parameters ``weights`` changes (e.g. a run's global weights)."""
        self.use(None)
        return {
            name: weight.float() - self.parameters[name].detach()
            for name, weight in weights.items()
            if name in self.parameters and not torch.equal(weight.float(), self.parameters[name].detach())
        }

    def answers(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy answers to ``prompts`` (:func:`fedfuse.automerge.objectives.greedy_answers`), counted."""
        out = greedy_answers(self.model, self.tokenizer, prompts, max_new_tokens, self.batch_size)
        self.generations += len(out)
        return out

    def accuracy(self, skill: str, split: str) -> float:
        """Exact-match accuracy of the current model on ``skill``'s ``split``."""
        items = self.prompts[skill][split]
        generated = self.answers([p for p, _ in items], skill_data.skill(skill).max_new_tokens)
        return sum(skill_data.is_correct(g, a) for g, (_, a) in zip(generated, items, strict=True)) / len(items)

    def accuracies(self, skills: Sequence[str], split: str) -> dict[str, float]:
        """:meth:`accuracy` for each skill."""
        return {name: self.accuracy(name, split) for name in skills}
