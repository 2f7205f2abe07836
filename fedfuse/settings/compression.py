"""Update compression settings (``settings.compression``): what a client sends and how densely."""

from __future__ import annotations

from dataclasses import dataclass, fields

from fedfuse.algebra import Sparsifier, available_sparsifiers, sparsifier_spec
from fedfuse.algebra.params import parse_params
from fedfuse.algebra.sparsify import SCOPES as SPARSIFY_SCOPES
from fedfuse.algebra.sparsify import SEED_SCOPES
from fedfuse.rounds.broadcast import BROADCAST_DTYPES, BROADCAST_MODES, BroadcastPolicy
from fedfuse.settings.fields import SettingsError, check_at_least, check_choice, check_fraction, setting
from fedfuse.wire.values import UPDATE_VALUE_DTYPES as WIRE_DTYPES

__all__ = ["SEED_SCOPES", "SPARSIFY_SCOPES", "WIRE_DTYPES", "CompressionSettings"]

_SHORTHANDS = {"gamma": "breadcrumbs_gamma", "epsilon": "della_epsilon"}
"""Declared sparsifier parameters that also have a key of their own (``breadcrumbs-gamma``, ``della-epsilon``)."""


@dataclass(frozen=True)
class CompressionSettings:
    """How a client shrinks its task vector before sending it.

    Parameters
    ----------
    sparsifier : str
        A registered sparsifier (:func:`fedfuse.algebra.available_sparsifiers`): "none", "trim" (TIES
        top-|τ|), "dare" (seeded drop), "breadcrumbs" (outliers and smallest dropped), "della" (seeded
        magnitude-ranked drop) or a plug-in, keeping ``density``.
    breadcrumbs_gamma, della_epsilon, drop_rescale : float, float, str
        Breadcrumbs' outlier fraction γ, DELLA's probability spread ε and the rescale of kept entries
        (see :class:`fedfuse.algebra.Sparsifier`).
    sparsifier_params : str
        The sparsifier's declared parameters as ``name=value,...`` (a plug-in's own; ``gamma`` and
        ``epsilon`` too, once: here or in their own keys).
    error_feedback : bool or "auto"
        Carry the dropped mass to the next round ("auto": for trim, not for DARE, whose rescaled drop
        is unbiased on its own; never in LoRA mode — see ``RunSettings.uses_error_feedback``).
    wire_dtype : str
        Value dtype on the wire.
    broadcast, broadcast_rank, broadcast_dtype : str, int, str
        How the server sends each round's change to the nodes (:class:`fedfuse.rounds.BroadcastPolicy`).
    """

    sparsifier: str = setting(
        "none",
        "`trim` (TIES top-\\|τ\\|), `dare` (seeded drop, keep `density`), `breadcrumbs`, `della`, `none` or a plug-in",
    )
    density: float = setting(0.1, "kept fraction of each task vector (trim/dare/breadcrumbs/della)")
    breadcrumbs_gamma: float = setting(0.01, "fraction of largest-\\|τ\\| outliers breadcrumbs drops")
    della_epsilon: float = setting(0.15, "DELLA keep probabilities span density ± epsilon by magnitude rank")
    drop_rescale: str = setting(
        "auto", "rescale of kept entries: `auto` (1/p for dare, della), `inverse`, `l1` (mergekit) or `none`"
    )
    sparsifier_params: str = setting(
        "", "the sparsifier's declared parameters, `name=value,...` (a plug-in's; see `fedfuse.algebra.sparsifiers`)"
    )
    sparsify_scope: str = setting("tensor", "trim per `tensor` or over the whole model (`global`)")
    seed_scope: str = setting("node", "DARE masks per `node` or one per `round` (aligned supports)")
    error_feedback: bool | str = setting(
        "auto",
        "carry dropped mass to the next round (`auto`: for trim, not for DARE — see docs/benchmarks)",
        auto=bool,
    )
    wire_dtype: str = setting("float32", f"value dtype on the wire ({', '.join(f'`{d}`' for d in WIRE_DTYPES)})")
    broadcast: str = setting(
        "auto",
        "how the server sends each round's change: `auto` (LoRA factors where the merge is low-rank, else dense), "
        "`dense`, `factors` (refused unless the merge is low-rank) or `svd` (rank `broadcast-rank`, residual kept)",
    )
    broadcast_rank: int = setting(16, "rank R of `broadcast = svd`")
    broadcast_dtype: str = setting(
        "float32", f"dtype of the broadcast ({', '.join(f'`{d}`' for d in BROADCAST_DTYPES)}); the server sums in fp32"
    )

    def __post_init__(self) -> None:
        check_choice(self, "sparsifier", tuple(available_sparsifiers()))
        check_choice(self, "sparsify_scope", SPARSIFY_SCOPES)
        check_choice(self, "seed_scope", SEED_SCOPES)
        check_choice(self, "wire_dtype", WIRE_DTYPES)
        check_choice(self, "broadcast", BROADCAST_MODES)
        check_choice(self, "broadcast_dtype", tuple(BROADCAST_DTYPES))
        check_at_least(self, 1, "broadcast_rank")
        check_fraction(self, "density", low_open=True)
        check_fraction(self, "breadcrumbs_gamma")
        try:
            self.sparsifier_spec  # noqa: B018 — declared parameters, rescale and ranges checked against the kind now
        except ValueError as exc:
            if isinstance(exc, SettingsError):
                raise
            raise SettingsError(f"sparsifier: {exc}") from None
        if self.error_feedback not in (True, False, "auto"):
            raise SettingsError(f"error-feedback must be true, false or 'auto'; got {self.error_feedback!r}")

    def sparsifier_arguments(self) -> dict[str, object]:
        """The kind's declared parameters from ``sparsifier-params`` and the shorthand keys.

        ``breadcrumbs-gamma`` and ``della-epsilon`` apply to the kinds that declare ``gamma`` and
        ``epsilon``; naming one in ``sparsifier-params`` too, with another value, is an error.
        """
        try:
            given: dict[str, object] = dict(parse_params(self.sparsifier_params, "sparsifier"))
        except ValueError as exc:
            raise SettingsError(f"sparsifier-params: {exc}") from None
        spec = sparsifier_spec(self.sparsifier)
        for name, field_name in _SHORTHANDS.items():
            value = getattr(self, field_name)
            if not spec.declares(name):
                continue
            if name in given and value != _DEFAULTS[field_name] and spec.param(name).coerce(given[name]) != value:
                raise SettingsError(f"{field_name.replace('_', '-')} is {value!r} but sparsifier-params sets {name}")
            given.setdefault(name, value)
        return given

    @property
    def sparsifier_spec(self) -> Sparsifier:
        """The client sparsifier these settings describe (a dense kind ignores density and rescale)."""
        return Sparsifier.of(
            self.sparsifier,
            self.density,
            scope=self.sparsify_scope,
            seed_scope=self.seed_scope,
            rescale=self.drop_rescale,
            params=self.sparsifier_arguments(),
        )

    @property
    def broadcast_policy(self) -> BroadcastPolicy:
        """How the server sends each round's change to the nodes."""
        return BroadcastPolicy(self.broadcast, self.broadcast_rank, self.broadcast_dtype)


_DEFAULTS = {f.name: f.default for f in fields(CompressionSettings)}
