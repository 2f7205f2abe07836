"""Server merge settings (``settings.merge``): which strategy, its parameters, and what it merges."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from fedfuse.algebra.server_optim import (
    ADAPTIVE_OPTIMIZERS,
    DEFAULT_SERVER_LR,
    SERVER_OPTIMIZERS,
    ServerOptimizerRule,
)
from fedfuse.rounds import DEFAULT_MAX_NUM_EXAMPLES, WEIGHTINGS
from fedfuse.settings.fields import SettingsError, check_choice, key, setting
from fedfuse.strategies import (
    MergeStrategy,
    MethodSpec,
    available_strategies,
    build_strategy,
    method_spec,
    parse_strategy_params,
)

if TYPE_CHECKING:
    from fedfuse.settings.run_settings import RunSettings

LORA_AGGREGATIONS = ("exact", "factors", "frozen-a")
DEVICES = ("auto", "cpu", "cuda")
COEFFICIENT_LEARNING = ("none", "loss", "entropy")
"""``coefficient-learning``: off, or the institutions' local objective on their held-out rows."""


@dataclass(frozen=True)
class MergeSettings:
    """The server's merge.

    Parameters
    ----------
    strategy : str
        Any registered strategy (built-ins, ``@register_strategy`` and entry-point plug-ins).
    lam, vote, strategy_params : float, str, str
        λ; the TIES vote rule (only for strategies that declare ``vote``); the strategy's other
        declared parameters as ``"name=value,name=value"``.
    lora_aggregation : str
        "exact" merges ΔW = s·BA; "factors" averages A and B (the baseline); "frozen-a" shares one A drawn
        from the run seed and round, frozen, and merges only the trained B's (FFA-LoRA: exact for linear merges).
    server_optimizer, server_lr, server_momentum, server_beta2, server_tau : str, float or "auto", float
        The top server's optimizer on the merged task vector (``none``, ``fedavgm``, ``fedadam``,
        ``fedyogi``; :mod:`fedfuse.algebra.server_optim`), η ("auto": the optimizer's default), β₁, β₂, τ.
    """

    strategy: str = setting(
        "fedavg",
        "any registered strategy (plug-ins too): see docs/reference/methods.md",
    )
    lam: float = setting(1.0, "λ, the scale of the merged task vector")
    vote: str = setting("mass", "TIES sign election: `mass` (Σ wτ) or `count` (Σ sign τ); strategies that declare it")
    strategy_params: str = setting(
        "", "the strategy's other declared parameters, `name=value,...` (e.g. `eps=1e-8` for fisher)"
    )
    lora_aggregation: str = setting(
        "exact",
        "`exact` merges ΔW = s·B·A; `factors` averages A and B (baseline); `frozen-a` (FFA-LoRA) shares a frozen A "
        "drawn from the seed and round, trains and sends only B, and a linear strategy merges B: s·B̄·A is exact",
    )
    weighting: str = setting("num_examples", "update weight: `num_examples` or `uniform`")
    device: str = setting("auto", "where the server's merge state lives (`auto`: CUDA when present)")
    clip_norm: float = setting(0.0, "clip every update to this L2 norm before merging, any strategy (0 = off)")
    max_num_examples: int = setting(
        DEFAULT_MAX_NUM_EXAMPLES,
        "an update reporting more examples weighs as this many (counted as `capped`; 0 = no cap)",
    )
    server_optimizer: str = setting(
        "none",
        "server optimizer on the merged task vector (the pseudo-gradient): `none`, `fedavgm`, `fedadam`, `fedyogi` "
        "(Reddi et al. 2021)",
    )
    server_lr: float | str = setting(
        "auto", "server learning rate η (`auto`: 1.0 fedavgm, 0.1 fedadam, 0.01 fedyogi)", auto=float
    )
    server_momentum: float = setting(0.9, "β₁ in [0, 1): FedAvgM momentum, FedAdam/FedYogi first-moment decay")
    server_beta2: float = setting(0.99, "β₂ in [0, 1): FedAdam/FedYogi second-moment decay")
    server_tau: float = setting(1e-3, "τ > 0: FedAdam/FedYogi adaptivity, step η·m/(√v + τ)")
    coefficient_learning: str = setting(
        "none",
        "learn each round's merge coefficients with the institutions: `none`, `loss` (their labelled held-out "
        "loss) or `entropy` (of their predictions, labels unused); linear strategies only",
    )
    coefficient_steps: int = setting(20, "gradient steps (message rounds of K×G numbers) of coefficient learning")
    coefficient_learning_rate: float = setting(0.05, "Adam's step size on the coefficients")
    coefficient_groups: int = setting(
        1, "coefficients per institution: 1 (task-wise) or G contiguous layer groups (layer-wise)"
    )
    lambda_candidates: str = setting(
        "",
        "per-round λ: scale each round's change by the candidate (e.g. `0.5,1,1.5,2`) with the least held-out "
        "loss of the round's institutions (empty: off)",
    )

    def __post_init__(self) -> None:
        check_choice(self, "strategy", tuple(available_strategies()))
        check_choice(self, "lora_aggregation", LORA_AGGREGATIONS)
        check_choice(self, "weighting", WEIGHTINGS)
        check_choice(self, "device", DEVICES)
        if not (math.isfinite(self.clip_norm) and self.clip_norm >= 0):
            raise SettingsError(f"clip-norm must be >= 0 (0 = off); got {self.clip_norm}")
        if self.max_num_examples < 0:
            raise SettingsError(f"max-num-examples must be >= 0 (0 = no cap); got {self.max_num_examples}")
        if not math.isfinite(self.lam):
            raise SettingsError(f"lam must be finite; got {self.lam}")
        self._check_server_optimizer()
        self._check_coefficients()
        try:  # every parameter checked now (types, choices, the constructor's ranges), not at the first merge
            strategy = build_strategy(self.strategy, self.strategy_arguments(), device="cpu")
        except ValueError as exc:
            if isinstance(exc, SettingsError):
                raise
            raise SettingsError(f"strategy-params: {exc}") from None
        if not strategy.capabilities.federated or strategy.capabilities.needs_base:
            raise SettingsError(
                f"strategy {self.strategy!r} with these parameters merges offline only (fedfuse merge): it needs "
                "the base model's own weights, not only the institutions' task vectors"
            )

    def _check_server_optimizer(self) -> None:
        """Refuse a bad ``server-*`` value, or one that the chosen server optimizer would ignore."""
        check_choice(self, "server_optimizer", SERVER_OPTIMIZERS)
        lr = self.server_lr
        if lr != "auto" and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise SettingsError(f"server-lr must be > 0 or 'auto'; got {lr!r}")
        for name in ("server_momentum", "server_beta2"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value < 1.0):
                raise SettingsError(f"{key(name)} must be in [0, 1); got {value}")
        if not (math.isfinite(self.server_tau) and self.server_tau > 0):
            raise SettingsError(f"server-tau must be > 0; got {self.server_tau}")
        knobs = ("server_lr", "server_momentum", "server_beta2", "server_tau")
        used = {"none": 0, "fedavgm": 2}.get(self.server_optimizer, len(knobs))
        for index, name in enumerate(knobs):
            if index >= used and getattr(self, name) != _FLAT_DEFAULTS[name]:
                users = "fedavgm, fedadam, fedyogi" if index < 2 else ", ".join(ADAPTIVE_OPTIMIZERS)
                raise SettingsError(
                    f"{key(name)} applies only to server-optimizer {users}; server-optimizer is "
                    f"{self.server_optimizer!r}"
                )

    def _check_coefficients(self) -> None:
        """Coefficient learning and per-round λ: their own values, and a merge they can work with."""
        check_choice(self, "coefficient_learning", COEFFICIENT_LEARNING)
        if self.coefficient_steps < 1 or self.coefficient_groups < 1:
            raise SettingsError(
                f"coefficient-steps and coefficient-groups must be >= 1; got {self.coefficient_steps}, "
                f"{self.coefficient_groups}"
            )
        rate = self.coefficient_learning_rate
        if not (math.isfinite(rate) and rate > 0):
            raise SettingsError(f"coefficient-learning-rate must be > 0; got {rate}")
        candidates = self.lambdas
        if not self.learns_coefficients:
            return
        if candidates:
            raise SettingsError("coefficient-learning and lambda-candidates both set: learned coefficients set λ too")
        capabilities = self.spec.capabilities
        if not capabilities.linear or capabilities.needs_gram:
            raise SettingsError(
                f"coefficient-learning needs a linear strategy (fedavg, task_arithmetic, linear); {self.strategy!r} "
                "is refused: its merge is not a weighted sum of the updates, so there are no coefficients to learn"
            )
        if self.lora_aggregation == "factors":
            raise SettingsError(
                "coefficient-learning needs lora-aggregation exact or frozen-a: averaged factors are not a weighted "
                "sum of the institutions' changes ΔW"
            )

    @property
    def learns_coefficients(self) -> bool:
        """Whether each round's coefficients are learned with the institutions (``coefficient-learning``)."""
        return self.coefficient_learning != "none"

    @property
    def lambdas(self) -> tuple[float, ...]:
        """The per-round λ candidates (empty: off), parsed and checked."""
        text = self.lambda_candidates.strip()
        if not text:
            return ()
        try:
            values = tuple(float(part) for part in text.split(","))
        except ValueError:
            raise SettingsError(f"lambda-candidates must be numbers separated by commas; got {text!r}") from None
        if len(values) < 2 or len(set(values)) != len(values) or not all(math.isfinite(v) for v in values):
            raise SettingsError(f"lambda-candidates needs at least two distinct finite numbers; got {text!r}")
        return values

    @property
    def server_rule(self) -> ServerOptimizerRule | None:
        """The server optimizer's rule with its hyperparameters (η resolved), or None for ``none``."""
        if self.server_optimizer == "none":
            return None
        lr = DEFAULT_SERVER_LR[self.server_optimizer] if self.server_lr == "auto" else float(self.server_lr)
        return ServerOptimizerRule(
            self.server_optimizer, lr, momentum=self.server_momentum, beta2=self.server_beta2, tau=self.server_tau
        )

    @property
    def spec(self) -> MethodSpec:
        """The declarations of the chosen strategy (parameters, Fisher need, default sparsifier)."""
        try:
            return method_spec(self.strategy)
        except ValueError as exc:
            raise SettingsError(f"strategy: {exc}") from None

    def strategy_arguments(self) -> dict[str, Any]:
        """The strategy's parameters from ``lam``, ``vote`` and ``strategy-params``, coerced and checked.

        ``lam`` and ``vote`` are shorthands for the declared parameters of the same names; naming one
        in ``strategy-params`` too, with another value, is an error, as is a non-default ``vote`` for
        a strategy that declares no vote.
        """
        spec = self.spec
        try:
            given = parse_strategy_params(self.strategy_params)
            arguments = spec.coerce(given)
        except ValueError as exc:
            raise SettingsError(f"strategy-params: {exc}") from None
        shorthands = {"lam": self.lam, "vote": self.vote}
        for name, value in shorthands.items():
            if value == _FLAT_DEFAULTS[name]:  # not given: the strategy's declared default applies
                continue
            if not spec.declares(name):
                declaring = [n for n in available_strategies() if _declares(n, name)]
                raise SettingsError(
                    f"{name} applies only to strategies that declare it ({', '.join(declaring)}); "
                    f"strategy {self.strategy!r} does not"
                )
            try:
                flat = spec.param(name).coerce(value)
            except ValueError as exc:
                raise SettingsError(f"{name}: {exc}") from None
            if name in arguments and arguments[name] != flat:
                raise SettingsError(f"{name} is {value!r} but strategy-params sets it to {arguments[name]!r}")
            arguments[name] = flat
        return arguments


_FLAT_DEFAULTS = {f.name: f.default for f in fields(MergeSettings)}


def _declares(strategy: str, name: str) -> bool:
    try:
        return method_spec(strategy).declares(name)
    except ValueError:  # a plug-in that fails to load declares nothing
        return False


def check_coefficient_options(settings: RunSettings) -> None:
    """Refuse coefficient learning or per-round λ where the server cannot see, or must not use, the updates."""
    merge = settings.merge
    if not (merge.learns_coefficients or merge.lambdas):
        return
    option = "coefficient-learning" if merge.learns_coefficients else "lambda-candidates"
    if settings.privacy.secure is not None:
        raise SettingsError(f"{option} needs the server to see the merged change; secure-aggregation hides it")
    if settings.privacy.dp != "none":
        raise SettingsError(
            f"{option} with dp {settings.privacy.dp!r} is refused: the institutions' gradients and losses on their "
            "held-out rows would be released outside the privacy accounting"
        )


def build_merge_strategy(settings: RunSettings | MergeSettings) -> MergeStrategy:
    """The run's merge strategy: its declared parameters from the merge section, on the merge device."""
    merge = settings if isinstance(settings, MergeSettings) else settings.merge
    return build_strategy(merge.strategy, merge.strategy_arguments(), device=merge.device)
