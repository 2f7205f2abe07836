"""Update compression settings (``settings.compression``): what a client sends and how densely."""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

from fedfuse.algebra import Sparsifier
from fedfuse.algebra.sparsify import SparsifierKind
from fedfuse.settings.fields import SettingsError, check_choice, check_fraction, setting

SPARSIFIERS: tuple[str, ...] = get_args(SparsifierKind)
SPARSIFY_SCOPES = ("tensor", "global")
SEED_SCOPES = ("node", "round")
WIRE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class CompressionSettings:
    """How a client shrinks its task vector before sending it.

    Parameters
    ----------
    sparsifier : str
        "none", "trim" (TIES top-|τ|), "dare" (seeded drop), "breadcrumbs" (outliers and smallest
        dropped) or "della" (seeded magnitude-ranked drop), keeping ``density``.
    breadcrumbs_gamma, della_epsilon, drop_rescale : float, float, str
        Breadcrumbs' outlier fraction γ, DELLA's probability spread ε and the rescale of kept entries
        (see :class:`fedfuse.algebra.Sparsifier`).
    error_feedback : bool or "auto"
        Carry the dropped mass to the next round ("auto": for trim, not for DARE, whose rescaled drop
        is unbiased on its own; never in LoRA mode — see ``RunSettings.uses_error_feedback``).
    wire_dtype : str
        Value dtype on the wire.
    """

    sparsifier: str = setting(
        "none",
        "`trim` (TIES top-\\|τ\\|), `dare` (seeded drop, keep `density`), `breadcrumbs`, `della` or `none`",
    )
    density: float = setting(0.1, "kept fraction of each task vector (trim/dare/breadcrumbs/della)")
    breadcrumbs_gamma: float = setting(0.01, "fraction of largest-\\|τ\\| outliers breadcrumbs drops")
    della_epsilon: float = setting(0.15, "DELLA keep probabilities span density ± epsilon by magnitude rank")
    drop_rescale: str = setting(
        "auto", "rescale of kept entries: `auto` (1/p for dare, della), `inverse`, `l1` (mergekit) or `none`"
    )
    sparsify_scope: str = setting("tensor", "trim per `tensor` or over the whole model (`global`)")
    seed_scope: str = setting("node", "DARE masks per `node` or one per `round` (aligned supports)")
    error_feedback: bool | str = setting(
        "auto",
        "carry dropped mass to the next round (`auto`: for trim, not for DARE — see the quality benchmark)",
        auto=bool,
    )
    wire_dtype: str = setting("float32", "value dtype on the wire (`float32`, `float16`, `bfloat16`)")

    def __post_init__(self) -> None:
        check_choice(self, "sparsifier", SPARSIFIERS)
        check_choice(self, "sparsify_scope", SPARSIFY_SCOPES)
        check_choice(self, "seed_scope", SEED_SCOPES)
        check_choice(self, "wire_dtype", WIRE_DTYPES)
        check_fraction(self, "density", low_open=True)
        try:
            self.sparsifier_spec  # noqa: B018 — gamma, epsilon and rescale checked against the sparsifier now
        except ValueError as exc:
            raise SettingsError(f"sparsifier: {exc}") from None
        if self.error_feedback not in (True, False, "auto"):
            raise SettingsError(f"error-feedback must be true, false or 'auto'; got {self.error_feedback!r}")

    @property
    def sparsifier_spec(self) -> Sparsifier:
        """The client sparsifier these settings describe."""
        density = 1.0 if self.sparsifier == "none" else self.density
        rescale = "auto" if self.sparsifier == "none" else self.drop_rescale
        return Sparsifier(
            self.sparsifier,  # type: ignore[arg-type]
            density,
            self.sparsify_scope,  # type: ignore[arg-type]
            self.seed_scope,  # type: ignore[arg-type]
            gamma=self.breadcrumbs_gamma,
            epsilon=self.della_epsilon,
            rescale=rescale,
        )
