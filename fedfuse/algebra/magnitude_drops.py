"""Magnitude-aware drops: Model Breadcrumbs and DELLA's MagPrune, and the rescalings of kept entries.

Breadcrumbs (Davari & Belilovsky, 2023) keeps a band of magnitudes: the ⌊γ·n⌋ largest entries are
outliers and go, then the smallest go until ⌊d·n⌋ remain (mergekit ``magnitude_outliers``). DELLA
(Deep et al., 2024) drops at random with a keep probability that grows with the entry's magnitude
rank in its row, from d − ε for the smallest to d + ε for the largest (mergekit ``della_magprune``);
its mask is drawn from a CPU generator seeded per tensor, as DARE's is, so it is reproducible.

Kept entries are rescaled by ``rescale``: ``"inverse"`` divides each by its keep probability (the
papers, PEFT's DARE), ``"l1"`` multiplies all by ‖τ‖₁/‖kept‖₁ (mergekit's ``rescale: true``),
``"none"`` leaves them as they are. Both register themselves as sparsifiers (``breadcrumbs``, ``della``)
with their parameters ``gamma`` and ``epsilon`` declared here (see :mod:`fedfuse.algebra.sparsifiers`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fedfuse.algebra.params import Param
from fedfuse.algebra.sparse import SparseTensor
from fedfuse.algebra.sparsifiers import RESCALES, register_sparsifier

if TYPE_CHECKING:
    from fedfuse.algebra.sparsify import Sparsifier

GAMMA = Param("gamma", float, 0.01, help="fraction of largest-|τ| outliers breadcrumbs drops (mergekit's gamma)")
EPSILON = Param("epsilon", float, 0.15, help="DELLA keep probabilities span density ± epsilon (mergekit's epsilon)")

_L1_EPS = 1e-7
"""Below this L1 norm (before or after the drop) the l1 rescale leaves values as they are (as mergekit)."""


def l1_rescale(original: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``kept · ‖original‖₁ / ‖kept‖₁`` (unchanged when either norm is below 1e-7, as mergekit does)."""
    before = float(original.abs().sum())
    after = float(kept.abs().sum())
    if before < _L1_EPS or after < _L1_EPS:
        return kept
    return kept * (before / after)


def breadcrumbs_counts(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """``(dropped_small, dropped_large)`` of a breadcrumbs drop on ``numel`` entries.

    ⌊d·n⌋ entries stay; ⌊γ·n⌋ of the largest go unless that would leave fewer, in which case fewer
    outliers go (mergekit's rule).
    """
    if not 0.0 <= density <= 1.0 or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"breadcrumbs needs density and gamma in [0, 1], got {density} and {gamma}")
    keep = int(density * numel)
    large = int(gamma * numel)
    small = numel - keep - large
    if small < 0:
        large += small
        small = 0
    return small, large


def breadcrumbs_drop(tensor: torch.Tensor, density: float, gamma: float, rescale: str = "none") -> SparseTensor:
    """Keep the magnitudes between the smallest dropped and the ⌊γ·n⌋ largest (values in fp32).

    ``rescale`` is ``"none"`` (mergekit's default for breadcrumbs) or ``"l1"``.
    """
    if rescale not in ("none", "l1"):
        raise ValueError(f"breadcrumbs rescale must be none or l1, got {rescale!r}")
    flat = tensor.reshape(-1).to(torch.float32)
    numel = flat.numel()
    small, large = breadcrumbs_counts(numel, density, gamma)
    order = torch.sort(flat.abs()).indices
    indices = order[small : numel - large].sort().values
    values = flat[indices]
    if rescale == "l1":
        values = l1_rescale(flat, values)
    return SparseTensor(indices=indices, values=values, shape=tensor.shape)


def della_probabilities(tensor: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Each entry's keep probability: d − ε + 2ε·(rank − 1)/(n − 1), ranks by magnitude within a row.

    Rows are the first dimension (a 1-D tensor is one row; more dimensions are flattened after the
    first). A row of one entry keeps it with probability d − ε.
    """
    check_della(density, epsilon)
    matrix = tensor.to(torch.float32)
    matrix = matrix.reshape(1, -1) if matrix.ndim < 2 else matrix.reshape(matrix.shape[0], -1)
    ranks = torch.argsort(torch.argsort(matrix.abs(), dim=1), dim=1).to(torch.float32)
    span = max(matrix.shape[1] - 1, 1)
    return (density - epsilon) + ranks * (2 * epsilon / span)


def check_della(density: float, epsilon: float) -> None:
    """DELLA needs 0 < d − ε and d + ε < 1 (every probability strictly inside (0, 1)), as mergekit."""
    if not (density - epsilon > 0.0 and density + epsilon < 1.0 and epsilon >= 0.0):
        raise ValueError(f"DELLA needs density ± epsilon inside (0, 1) and epsilon >= 0; got {density} ± {epsilon}")


def della_drop(
    tensor: torch.Tensor, density: float, epsilon: float, seed: int, rescale: str = "inverse"
) -> SparseTensor:
    """DELLA MagPrune: keep each entry with its :func:`della_probabilities`, drawn from ``seed``.

    The mask comes from ``torch.bernoulli`` on a CPU ``torch.Generator().manual_seed(seed)``, so one
    seed gives one mask on every machine. Kept values are rescaled by ``rescale`` (``"inverse"``:
    divided by their own keep probability, as the paper; ``"l1"``: mergekit's; ``"none"``).
    """
    if rescale not in RESCALES:
        raise ValueError(f"DELLA rescale must be one of {', '.join(RESCALES)}, got {rescale!r}")
    flat = tensor.reshape(-1).to(torch.float32)
    probabilities = della_probabilities(tensor.cpu(), density, epsilon).reshape(-1)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    kept = torch.bernoulli(probabilities, generator=generator).bool()
    indices = torch.nonzero(kept).reshape(-1).to(flat.device)
    values = flat[indices]
    if rescale == "inverse":
        values = values / probabilities.to(flat.device)[indices]
    elif rescale == "l1":
        values = l1_rescale(flat, values)
    return SparseTensor(indices=indices, values=values, shape=tensor.shape)


@register_sparsifier("breadcrumbs", parameters=(GAMMA,), help="drop the ⌊γ·n⌋ largest outliers and the smallest")
def breadcrumbs_sparsifier(tensor: torch.Tensor, sparsifier: Sparsifier, seed: int | None) -> SparseTensor:
    """The ``breadcrumbs`` sparsifier: :func:`breadcrumbs_drop` with the sparsifier's density, γ and rescale."""
    rescale = sparsifier.resolved_rescale
    if sparsifier.scope == "global" and rescale == "l1":
        raise ValueError("an l1 rescale is per tensor: it cannot follow a global trim")
    return breadcrumbs_drop(tensor, sparsifier.density, sparsifier.gamma, rescale)


def _check_della(sparsifier: Sparsifier) -> None:
    check_della(sparsifier.density, sparsifier.epsilon)


@register_sparsifier(
    "della",
    parameters=(EPSILON,),
    seeded=True,
    rescales=RESCALES,
    default_rescale="inverse",
    check=_check_della,
    help="seeded drop, keep probability rising with the magnitude rank in the row",
)
def della_sparsifier(tensor: torch.Tensor, sparsifier: Sparsifier, seed: int | None) -> SparseTensor:
    """The ``della`` sparsifier: :func:`della_drop` with the tensor's seed."""
    assert seed is not None  # seeded: sparsify_update passes one
    return della_drop(tensor, sparsifier.density, sparsifier.epsilon, seed, sparsifier.resolved_rescale)
