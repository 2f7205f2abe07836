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
from typing import Literal

from fedfuse.algebra import Sparsifier
from fedfuse.algebra.sparsifiers import declaring, registered_sparsifiers, sparsifier_spec
from fedfuse.checkpoints import check_target, parse_size
from fedfuse.offline.errors import MergeInputError, input_errors
from fedfuse.offline.request import AdaptersRequest, CombineRequest, ModelsRequest, RequestError, request_fields
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
        raise RequestError(
            "give either an output folder ({out}) or a partial-statistics file ({partial_out}), not both"
        )
    if out is None and partial_out is None:
        raise RequestError("give an output folder ({out}) or a partial-statistics file ({partial_out})")
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
    """The strategy's parameters from ``lam``, ``vote`` and ``params`` (each named once)."""
    merged: dict[str, object] = dict(params or {})
    if "lam" in merged and lam != 1.0:
        raise RequestError("λ is given twice ({lam} and {params} lam=…): give it once")
    if vote is not None:
        if "vote" in merged:
            raise RequestError("vote is given twice ({vote} and {params} vote=…): give it once")
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
    method: str, kind: str | None, density: float | None, *, rescale: str | None = None, **params: object
) -> Sparsifier:
    """The sparsifier asked for, or the method's declared default; a density exactly when one is used.

    ``params`` are the sparsifier's declared parameters (``gamma`` for breadcrumbs, ``epsilon`` for
    della, a plug-in's own; ``None`` = not given): they and ``rescale`` are refused where they mean nothing.
    """
    kind = kind or method_spec(method).default_sparsifier
    given = {name: value for name, value in params.items() if value is not None}
    with input_errors():
        spec = sparsifier_spec(kind)
        for name in given:
            if not spec.declares(name) and declaring(name):
                owners = " / ".join(declaring(name))
                raise RequestError(f"{_field(name)} applies to the {owners} sparsifier, but this merge uses {kind!r}")
            spec.param(name)  # names the declared ones
    if spec.dense:
        if density is not None and density != 1.0:
            others = "|".join(other.name for other in registered_sparsifiers() if not other.dense)
            raise RequestError(
                f"{{density}} {density} was given but method {method!r} uses no sparsifier "
                f"(choose one with {{sparsifier}} {others})"
            )
        if rescale is not None:
            raise RequestError(f"{{rescale}} was given but method {method!r} uses no sparsifier")
        return Sparsifier.of(kind)
    if density is None:
        raise RequestError(
            f"method {method!r} sparsifies with {kind!r}: give {{density}} (the kept fraction, e.g. 0.2)"
        )
    with input_errors():
        return Sparsifier.of(kind, density, rescale=rescale or "auto", params=given)


def _field(name: str) -> str:
    """A request field as a reference its error renders (``{gamma}``: ``gamma``, or the CLI's ``--gamma``)."""
    return f"{{{name}}}" if name in request_fields() else repr(name)


def plan_weights(weights: Sequence[float] | None, count: int, *, negative: bool = False) -> tuple[float, ...]:
    """One finite weight per model (default all 1), >= 0 unless the method takes ``negative`` ones, not all 0."""
    if weights is None or len(weights) == 0:
        return (1.0,) * count
    if len(weights) != count:
        raise RequestError(
            f"got {len(weights)} weight(s) for {count} model(s): give one {{weights}} per {{models}}, or none"
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
    """Partial states exist only for methods whose state is a monoid (declared ``mergeable``).

    ``option`` names what needs a partial state (a field reference such as ``"{partial_out}"``).
    """
    if not method_spec(method).capabilities.mergeable:
        raise RequestError(
            f"method {method!r} is not mergeable (its state is not a sum of statistics): {option} needs one"
        )


def _side_files(method: str, count: int, fishers: tuple[Path, ...], grams: tuple[Path, ...]) -> None:
    """One Fisher file per model exactly when the method needs Fisher diagonals; the same for Gram matrices."""
    spec = method_spec(method)
    if spec.capabilities.needs_fisher and not fishers:
        raise RequestError(f"method {method!r} needs a Fisher diagonal file per model ({{fishers}})")
    if fishers and not spec.capabilities.needs_fisher:
        raise RequestError(f"{{fishers}} was given but method {method!r} does not use Fisher diagonals")
    if fishers and len(fishers) != count:
        raise RequestError(f"got {len(fishers)} Fisher file(s) for {count} model(s): give one per model")
    if spec.capabilities.needs_gram and not grams:
        raise RequestError(
            f"method {method!r} needs a Gram-matrix file per model "
            "({grams}; `fedfuse grams MODEL --data FILE` makes one)"
        )
    if grams and not spec.capabilities.needs_gram:
        raise RequestError(f"{{grams}} was given but method {method!r} does not use Gram matrices")
    if grams and len(grams) != count:
        raise RequestError(f"got {len(grams)} Gram file(s) for {count} model(s): give one per model")


def plan_merge(request: ModelsRequest | AdaptersRequest) -> MergePlan:
    """Check every option of a model (or adapter) merge against the others; raises :class:`MergeInputError`."""
    r = request
    strategy = plan_strategy(r.method, strategy_params(r.lam, r.vote, r.params), device=r.device, dtype=r.dtype)
    method = r.method
    options = {"gamma": r.gamma, "epsilon": r.epsilon, **r.sparsifier_params}
    chosen = plan_sparsifier(method, r.sparsifier, r.density, rescale=r.rescale, **options)
    if not r.inputs:
        raise RequestError("give at least one model to merge ({models})")
    checked_weights = plan_weights(r.weights, len(r.inputs), negative=strategy.capabilities.negative_weights)
    fishers, grams = (r.fishers, r.grams) if isinstance(r, ModelsRequest) else ((), ())
    _side_files(method, len(r.inputs), fishers, grams)
    if r.seed < 0 or r.first_model_index < 0:
        raise RequestError(f"{{seed}} and {{first_model_index}} must be >= 0, got {r.seed} and {r.first_model_index}")
    output = plan_output(r.out, r.partial_out, force=r.force, max_shard_size=r.max_shard_size)
    tensor_settings = r.tensor_settings if isinstance(r, ModelsRequest) else None
    if output.kind == "partial":
        check_mergeable(method, "{partial_out}")
        if tensor_settings is not None:
            raise MergeInputError("per-tensor settings (a recipe's) cannot be written as partial statistics")
    check_not_an_input(output.target, [r.base, *r.inputs, *fishers, *grams])
    return MergePlan(
        base=r.base,
        models=r.inputs,
        weights=checked_weights,
        fishers=fishers,
        strategy=strategy,
        sparsifier=chosen,
        seed=r.seed,
        first_model_index=r.first_model_index,
        output=output,
        allow_non_finite=r.allow_non_finite,
        grams=grams,
        tensor_settings=tensor_settings,
    )


def plan_combine(request: CombineRequest) -> CombinePlan:
    """Check every option of a fold of partial states (the strategy comes from the files)."""
    if not request.partials:
        raise RequestError("give at least one partial-statistics file ({partials})")
    output = plan_output(request.out, request.partial_out, force=request.force, max_shard_size=request.max_shard_size)
    check_not_an_input(output.target, [request.base, *request.partials])
    return CombinePlan(request.base, request.partials, request.device, output)
