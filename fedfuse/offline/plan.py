"""A validated plan from an offline merge's options: the strategy, sparsifier, weights, inputs and output.

Planning reads no tensor and opens no checkpoint: it checks every option on its own and against
the others (one Fisher file per model, a density when the method sparsifies, an output that is
not an input, …) and builds the strategy from its declarations (``fedfuse.strategies.method_spec``),
never by its name. The input files are checked next, from their headers, by :mod:`.sources`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fedfuse.algebra import Sparsifier
from fedfuse.algebra.sparsify import SPARSIFIER_KINDS
from fedfuse.checkpoints import check_target, parse_size
from fedfuse.offline.errors import MergeInputError, input_errors
from fedfuse.strategies import MergeStrategy, available_strategies, build_strategy, method_spec

PathLike = str | Path
OutputKind = Literal["model", "partial"]


@dataclass(frozen=True)
class Output:
    """Where a merge goes: a model folder or a partial-state file, replaced only with ``force``."""

    target: Path
    kind: OutputKind
    force: bool
    max_shard_size: int


@dataclass(frozen=True)
class TensorSettings:
    """One tensor's own strategy, model weights and model sparsifiers (a recipe's per-model, per-layer values)."""

    strategy: MergeStrategy
    weights: tuple[float, ...]
    sparsifiers: tuple[Sparsifier, ...]


TensorSettingsFn = Callable[[str], TensorSettings | None]
"""Tensor name → its own settings, or None for the plan's (checked before the merge starts)."""


@dataclass(frozen=True)
class MergePlan:
    """A merge of fine-tuned models into their base, every option checked."""

    base: Path
    models: tuple[Path, ...]
    weights: tuple[float, ...]
    fishers: tuple[Path, ...]
    strategy: MergeStrategy
    sparsifier: Sparsifier
    seed: int
    first_model_index: int
    output: Output
    allow_non_finite: bool = False
    """Merge NaN/Inf input values as they are instead of refusing the merge (naming the tensor)."""
    grams: tuple[Path, ...] = ()
    """One safetensors file of Gram matrices per model (RegMean), keyed by linear weight name."""
    tensor_settings: TensorSettingsFn | None = None
    """Per-tensor settings (a recipe's); None: every tensor uses the plan's strategy, weights, sparsifier."""

    @property
    def total_weight(self) -> float:
        """The sum of the models' weights (the state's total weight)."""
        return sum(self.weights)

    def settings_for(self, name: str) -> TensorSettings:
        """Tensor ``name``'s strategy, weights and one sparsifier per model."""
        own = self.tensor_settings(name) if self.tensor_settings is not None else None
        if own is not None:
            return own
        return TensorSettings(self.strategy, self.weights, (self.sparsifier,) * len(self.models))


@dataclass(frozen=True)
class CombinePlan:
    """A fold of partial-state files into a model or a further partial state."""

    base: Path
    partials: tuple[Path, ...]
    device: str
    output: Output


def plan_output(
    out: PathLike | None, partial_out: PathLike | None, *, force: bool, max_shard_size: str | int
) -> Output:
    """Exactly one of a model folder (``out``) and a partial-state file (``partial_out``)."""
    if out is not None and partial_out is not None:
        raise MergeInputError(
            "give either an output folder (--out) or a partial-statistics file (--partial-out), not both"
        )
    if out is None and partial_out is None:
        raise MergeInputError("give an output folder (--out) or a partial-statistics file (--partial-out)")
    with input_errors():
        size = parse_size(max_shard_size)
        if partial_out is not None:
            return Output(check_target(partial_out, directory=False, overwrite=force), "partial", force, size)
        assert out is not None
        return Output(check_target(out, directory=True, overwrite=force), "model", force, size)


def check_not_an_input(target: Path, inputs: Sequence[PathLike]) -> None:
    """The output must be neither an input nor a folder holding one."""
    resolved = target.resolve()
    for item in inputs:
        path = Path(item).resolve()
        if path == resolved or resolved in path.parents:
            raise MergeInputError(f"output {target} would overwrite the input {item}")


def strategy_params(lam: float, vote: str | None, params: Mapping[str, object] | None) -> dict[str, object]:
    """The strategy's parameters from ``--lambda``, ``--vote`` and ``--param`` (each named once)."""
    merged: dict[str, object] = dict(params or {})
    if "lam" in merged and lam != 1.0:
        raise MergeInputError("λ is given twice (--lambda and --param lam=…): give it once")
    if vote is not None:
        if "vote" in merged:
            raise MergeInputError("vote is given twice (--vote and --param vote=…): give it once")
        merged["vote"] = vote
    merged.setdefault("lam", lam)
    return merged


def plan_strategy(method: str | None, params: Mapping[str, object], *, device: str, dtype: str) -> MergeStrategy:
    """The strategy ``method`` with its declared ``params`` (unknown names and bad values refused)."""
    if not method:
        raise MergeInputError(f"choose a merge method; available: {', '.join(available_strategies())}")
    with input_errors():
        return build_strategy(method, params, device=device, dtype=dtype)


def plan_sparsifier(
    method: str,
    kind: str | None,
    density: float | None,
    *,
    gamma: float | None = None,
    epsilon: float | None = None,
    rescale: str | None = None,
) -> Sparsifier:
    """The sparsifier asked for, or the method's declared default; a density exactly when one is used.

    ``gamma`` (breadcrumbs), ``epsilon`` (della) and ``rescale`` are refused where they mean nothing.
    """
    kind = kind or method_spec(method).default_sparsifier
    extras = {"--gamma": (gamma, "breadcrumbs"), "--epsilon": (epsilon, "della")}
    for flag, (value, owner) in extras.items():
        if value is not None and kind != owner:
            raise MergeInputError(f"{flag} applies to the {owner} sparsifier, but this merge uses {kind!r}")
    if kind == "none":
        if density is not None and density != 1.0:
            raise MergeInputError(
                f"density {density} was given but method {method!r} uses no sparsifier "
                f"(choose one with --sparsifier {'|'.join(SPARSIFIER_KINDS[1:])})"
            )
        if rescale is not None:
            raise MergeInputError(f"--rescale was given but method {method!r} uses no sparsifier")
        return Sparsifier("none")
    if kind not in SPARSIFIER_KINDS:
        raise MergeInputError(f"unknown sparsifier {kind!r}: choose {', '.join(SPARSIFIER_KINDS)}")
    if density is None:
        raise MergeInputError(
            f"method {method!r} sparsifies with {kind!r}: give --density (the kept fraction, e.g. 0.2)"
        )
    options: dict[str, Any] = {"rescale": rescale or "auto"}
    if gamma is not None:
        options["gamma"] = gamma
    if epsilon is not None:
        options["epsilon"] = epsilon
    with input_errors():
        return Sparsifier(kind, density, **options)  # type: ignore[arg-type]


def plan_weights(weights: Sequence[float] | None, count: int, *, negative: bool = False) -> tuple[float, ...]:
    """One finite weight per model (default all 1), >= 0 unless the method takes ``negative`` ones, not all 0."""
    if weights is None or len(weights) == 0:
        return (1.0,) * count
    if len(weights) != count:
        raise MergeInputError(
            f"got {len(weights)} weight(s) for {count} model(s): give one --weight per --model, or none"
        )
    checked = tuple(float(w) for w in weights)
    for i, w in enumerate(checked):
        if not math.isfinite(w) or (w < 0 and not negative):
            raise MergeInputError(f"weight {i + 1} must be finite and >= 0, got {w}")
    if negative and all(w == 0 for w in checked):
        raise MergeInputError("all weights are 0: at least one model must have a non-zero weight")
    if not negative and sum(checked) <= 0:
        raise MergeInputError("all weights are 0: at least one model must have a positive weight")
    return checked


def check_mergeable(method: str, option: str) -> None:
    """Partial states exist only for methods whose state is a monoid (declared ``mergeable``)."""
    if not method_spec(method).mergeable:
        raise MergeInputError(
            f"method {method!r} is not mergeable (its state is not a sum of statistics): {option} needs one"
        )


def plan_merge(
    base: PathLike,
    models: Sequence[PathLike],
    *,
    method: str | None,
    params: Mapping[str, Any] | None = None,
    lam: float = 1.0,
    vote: str | None = None,
    weights: Sequence[float] | None = None,
    density: float | None = None,
    sparsifier: str | None = None,
    sparsifier_options: Mapping[str, Any] | None = None,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    fishers: Sequence[PathLike] | None = None,
    out: PathLike | None = None,
    partial_out: PathLike | None = None,
    max_shard_size: str | int = "5GB",
    force: bool = False,
    first_model_index: int = 0,
    allow_non_finite: bool = False,
    tensor_settings: TensorSettingsFn | None = None,
    grams: Sequence[PathLike] | None = None,
) -> MergePlan:
    """Check every option of :func:`fedfuse.offline.merge_models`; raises :class:`MergeInputError`."""
    strategy = plan_strategy(method, strategy_params(lam, vote, params), device=device, dtype=dtype)
    assert method is not None
    chosen = plan_sparsifier(method, sparsifier, density, **(sparsifier_options or {}))
    if not models:
        raise MergeInputError("give at least one model to merge (--model)")
    checked_weights = plan_weights(weights, len(models), negative=strategy.negative_weights)
    fisher_paths = tuple(Path(p) for p in fishers or ())
    needs_fisher = method_spec(method).needs_fisher
    if needs_fisher and not fisher_paths:
        raise MergeInputError(f"method {method!r} needs a Fisher diagonal file per model (--fisher)")
    if fisher_paths and not needs_fisher:
        raise MergeInputError(f"--fisher was given but method {method!r} does not use Fisher diagonals")
    if fisher_paths and len(fisher_paths) != len(models):
        raise MergeInputError(f"got {len(fisher_paths)} Fisher file(s) for {len(models)} model(s): give one per model")
    gram_paths = tuple(Path(p) for p in grams or ())
    needs_gram = method_spec(method).needs_gram
    if needs_gram and not gram_paths:
        raise MergeInputError(
            f"method {method!r} needs a Gram-matrix file per model "
            "(--gram; `fedfuse grams MODEL --data FILE` makes one)"
        )
    if gram_paths and not needs_gram:
        raise MergeInputError(f"--gram was given but method {method!r} does not use Gram matrices")
    if gram_paths and len(gram_paths) != len(models):
        raise MergeInputError(f"got {len(gram_paths)} Gram file(s) for {len(models)} model(s): give one per model")
    if seed < 0 or first_model_index < 0:
        raise MergeInputError(f"--seed and --first-model-index must be >= 0, got {seed} and {first_model_index}")
    output = plan_output(out, partial_out, force=force, max_shard_size=max_shard_size)
    if output.kind == "partial":
        check_mergeable(method, "--partial-out")
        if tensor_settings is not None:
            raise MergeInputError("per-tensor settings (a recipe's) cannot be written as partial statistics")
    check_not_an_input(output.target, [base, *models, *fisher_paths, *gram_paths])
    return MergePlan(
        base=Path(base),
        models=tuple(Path(p) for p in models),
        weights=checked_weights,
        fishers=fisher_paths,
        strategy=strategy,
        sparsifier=chosen,
        seed=seed,
        first_model_index=first_model_index,
        output=output,
        allow_non_finite=allow_non_finite,
        grams=gram_paths,
        tensor_settings=tensor_settings,
    )


def plan_combine(
    partials: Sequence[PathLike],
    *,
    base: PathLike,
    out: PathLike | None = None,
    partial_out: PathLike | None = None,
    device: str = "cpu",
    max_shard_size: str | int = "5GB",
    force: bool = False,
) -> CombinePlan:
    """Check every option of :func:`fedfuse.offline.combine_partials` (the strategy comes from the files)."""
    if not partials:
        raise MergeInputError("give at least one partial-statistics file (--combine)")
    output = plan_output(out, partial_out, force=force, max_shard_size=max_shard_size)
    check_not_an_input(output.target, [base, *partials])
    return CombinePlan(Path(base), tuple(Path(p) for p in partials), device, output)
