"""mergekit recipes: ``fedfuse merge recipe recipe.yml`` reads mergekit's YAML and merges the same numbers.

mergekit's method names map to fedfuse methods *with mergekit's defaults* (:data:`METHODS`: e.g.
``dare_ties`` does not normalize and l1-rescales). A parameter is a number, a list interpolated over
the layers (layer i of n at t = i/(n − 1), other tensors at t = 0, as mergekit) or a list of
``{filter, value}`` (the first filter that is a substring of the tensor's name). Every tensor's
values are checked before anything is written; the recipe then runs as the
:class:`~fedfuse.offline.request.ModelsRequest` it describes (:func:`recipe_request`) through
:func:`fedfuse.offline.merge_models`, one tensor at a time. Keys fedfuse does not do (``slices``,
``modules``, …) are refused by name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

from fedfuse.algebra import Sparsifier
from fedfuse.checkpoints import open_checkpoint
from fedfuse.offline.api import OUT_DTYPES, merge_models
from fedfuse.offline.errors import MergeInputError
from fedfuse.offline.execute import Progress
from fedfuse.offline.plan import PathLike, TensorSettings, plan_sparsifier, plan_strategy
from fedfuse.offline.request import ModelsRequest, RecipeRequest, as_request
from fedfuse.offline.sinks import MergeResult
from fedfuse.strategies import MergeStrategy

REQUIRED = None  # a parameter without a default: the recipe must give it
BOOL_PARAMS = frozenset({"int8_mask", "normalize", "rescale", "filter_wise"})  # true or false, no list form


@dataclass(frozen=True)
class MethodRow:
    """One mergekit method: the fedfuse method running it, its sparsifier and mergekit's parameters."""

    method: str
    sparsifier: str = "none"
    shared: Mapping[str, Any] = field(default_factory=dict)  # merge-wide parameters, mergekit's defaults
    per_model: Mapping[str, Any] = field(default_factory=dict)  # per-model parameters, mergekit's defaults


def _gta(method: str, sparsifier: str, normalize: bool, rescale: bool, **extra: float) -> MethodRow:
    """A row of mergekit's generalized task arithmetic (``merge_methods/registry.py``)."""
    per_model: dict[str, Any] = {"weight": REQUIRED}
    if sparsifier != "none":
        per_model["density"] = 1.0
    per_model.update(extra)
    shared = {"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 1.0}
    return MethodRow(method, sparsifier, shared, per_model)


METHODS: dict[str, MethodRow] = {
    "linear": MethodRow("linear", shared={"normalize": True}, per_model={"weight": REQUIRED}),
    "task_arithmetic": _gta("task_arithmetic", "none", normalize=False, rescale=False),
    "ties": _gta("ties", "trim", normalize=True, rescale=False),
    "dare_ties": _gta("dare_ties", "dare", normalize=False, rescale=True),
    "dare_linear": _gta("dare_linear", "dare", normalize=False, rescale=True),
    "breadcrumbs": _gta("breadcrumbs", "breadcrumbs", normalize=False, rescale=False, gamma=0.01),
    "breadcrumbs_ties": _gta("breadcrumbs_ties", "breadcrumbs", normalize=False, rescale=False, gamma=0.01),
    "della": _gta("della", "della", normalize=True, rescale=True, epsilon=0.15),
    "della_linear": _gta("della_linear", "della", normalize=False, rescale=True, epsilon=0.15),
    "model_stock": MethodRow("model_stock", shared={"filter_wise": False}),
    "slerp": MethodRow("slerp", shared={"t": REQUIRED}),
}
"""mergekit method name → how fedfuse runs it, with mergekit's defaults."""

TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source")
REFUSED_KEYS = {
    "slices": "layer slices are not supported: list whole models under `models`",
    "modules": "per-module merges are not supported: list whole models under `models`",
    "tokenizer": "tokenizer surgery is not supported (fedfuse copies the base's tokenizer files)",
    "chat_template": "chat templates are not supported (fedfuse copies the base's tokenizer files)",
}
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


@dataclass(frozen=True)
class Recipe:
    """A parsed, checked recipe (its per-tensor values are resolved by :func:`resolve_settings`)."""

    path: Path
    merge_method: str
    row: MethodRow
    base: Path
    models: tuple[Path, ...]
    model_parameters: tuple[Mapping[str, Any], ...]
    parameters: Mapping[str, Any]
    out_dtype: str | None
    notes: tuple[str, ...] = ()  # what is worth telling the user (a key accepted but without effect)


# ---------------------------------------------------------------- values


@contextmanager
def _at(prefix: str) -> Iterator[None]:
    """Prefix any input error raised inside with ``prefix`` (the recipe, the model, the tensor)."""
    try:
        yield
    except (MergeInputError, ValueError) as exc:
        raise MergeInputError(f"{prefix}: {exc}") from None


def _number(where: str, value: Any) -> float:
    try:
        number = float("x" if isinstance(value, bool) or not isinstance(value, int | float | str) else value)
    except ValueError:
        raise MergeInputError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise MergeInputError(f"{where}: must be finite, got {value!r}")
    return number


def _check_setting(where: str, name: str, setting: Any, *, nested: bool = False) -> None:
    """A scalar, a list of numbers (a layer gradient) or a list of ``{filter, value}`` (mergekit's forms)."""
    if name in BOOL_PARAMS:
        if not isinstance(setting, bool):
            raise MergeInputError(f"{where}: must be true or false, got {setting!r}")
        return
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and not nested and setting and all(isinstance(c, dict) for c in setting):
        for i, cond in enumerate(setting):
            unknown = sorted(set(cond) - {"filter", "value"})
            if unknown or "value" not in cond:
                raise MergeInputError(f"{where}[{i}]: a filtered value has keys `filter` and `value`, got {cond}")
            if cond.get("filter") is not None and not isinstance(cond["filter"], str):
                raise MergeInputError(f"{where}[{i}].filter: expected a string, got {cond['filter']!r}")
            _check_setting(f"{where}[{i}].value", name, cond["value"], nested=True)
        return
    if not isinstance(setting, list):
        _number(where, setting)
    elif not setting:
        raise MergeInputError(f"{where}: an empty list")
    for i, item in enumerate(setting if isinstance(setting, list) else []):
        _number(f"{where}[{i}]", item)


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """A setting's value for one tensor at layer position ``t`` (None: no filter matched), as mergekit."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting if isinstance(setting, bool) else float(setting)
    if all(isinstance(c, dict) for c in setting):
        for cond in setting:
            where = cond.get("filter")
            if where is None or where == "*" or where in tensor_name:
                return evaluate_setting(cond["value"], tensor_name, t)
        return None
    values = [float(v) for v in setting]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[min(len(values) - 1, i0 + 1)]


def layer_positions(names: Sequence[str]) -> dict[str, float]:
    """Each tensor's t: i/(n − 1) for a tensor of layer i of n (1.0 when n = 1), 0.0 outside the layers."""
    layers = {name: int(m.group(1)) for name in names if (m := _LAYER.search(name))}
    count = max(layers.values()) + 1 if layers else 0
    return {name: (layers[name] / (count - 1) if count > 1 else 1.0) if name in layers else 0.0 for name in names}


# ---------------------------------------------------------------- parsing


def _mapping(where: str, value: Any) -> dict[str, Any]:
    if value is not None and not isinstance(value, dict):
        raise MergeInputError(f"{where}: expected a mapping of name: value, got {value!r}")
    return value or {}


def _path(where: str, value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise MergeInputError(f"{where}: expected a model folder or .safetensors path, got {value!r}")
    if "+" in value and not Path(value).exists():
        raise MergeInputError(f"{where}: mergekit's model+lora form is not supported (merge the adapter first)")
    return Path(value)


def _check_parameters(where: str, params: Mapping[str, Any], row: MethodRow, method: str, *, top: bool) -> None:
    for name, setting in params.items():
        key = f"{where}.{name}"
        if name in row.per_model or (top and name in row.shared):
            _check_setting(key, name, setting)
        elif name in row.shared:
            raise MergeInputError(f"{key}: a merge-wide parameter of {method}: give it under the top-level parameters")
        else:
            known = sorted({*row.per_model, *(row.shared if top else ())})
            raise MergeInputError(f"{key}: not a parameter of {method} (it takes: {', '.join(known) or 'none'})")


def _dtype(where: str, value: Any) -> str:
    name = str(value).removeprefix("torch.")
    if name not in OUT_DTYPES:
        raise MergeInputError(f"{where}: unknown dtype {value!r}: choose {', '.join(OUT_DTYPES)}")
    return name


def load_recipe(path: PathLike) -> Recipe:
    """Read and check a mergekit recipe; raises :class:`MergeInputError` naming the key at fault."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MergeInputError(f"recipe not found: {path}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MergeInputError(f"{path}: not a readable YAML recipe: {first}") from None
    with _at(str(path)):
        return _parse(path, doc)


def _check_top_keys(doc: Any) -> None:
    if not isinstance(doc, dict):
        raise MergeInputError("a recipe is a mapping with merge_method, base_model and models")
    for key in doc:
        if key in REFUSED_KEYS:
            raise MergeInputError(f"`{key}`: {REFUSED_KEYS[key]}")
        if key not in TOP_KEYS:
            raise MergeInputError(f"unknown key `{key}` (fedfuse reads: {', '.join(TOP_KEYS)})")
    if doc.get("merge_method") not in METHODS:
        raise MergeInputError(f"merge_method {doc.get('merge_method')!r} is not supported: choose {', '.join(METHODS)}")
    if doc.get("tokenizer_source") not in (None, "base"):
        raise MergeInputError(f"tokenizer_source {doc['tokenizer_source']!r} is not supported (only `base`)")


def _parse_models(entries: list[Any], method: str, base: Path | None) -> tuple[list[Path], list[dict[str, Any]]]:
    """The merged models and their own parameters (the base itself, listed, is the reference: skipped)."""
    models, model_params = [], []
    for i, entry in enumerate(entries):
        where = f"models[{i}]"
        if not isinstance(entry, dict) or "model" not in entry:
            raise MergeInputError(f"{where}: expected a mapping with `model: PATH`, got {entry!r}")
        unknown = sorted(set(entry) - {"model", "parameters"})
        if unknown:
            raise MergeInputError(f"{where}.{unknown[0]}: unknown key (a model has `model` and `parameters`)")
        model = _path(f"{where}.model", entry["model"])
        params = _mapping(f"{where}.parameters", entry.get("parameters"))
        if base is not None and method != "linear" and model == base:
            continue  # the base is the reference, not a merged model (mergekit ignores its parameters)
        _check_parameters(f"{where}.parameters", params, METHODS[method], method, top=False)
        models.append(model)
        model_params.append(params)
    return models, model_params


def _check_counts(method: str, base: Path | None, models: list[Path]) -> None:
    if base is None and method != "linear":
        raise MergeInputError(f"base_model is required by {method}")
    if base is not None and method == "linear" and base not in models:
        raise MergeInputError("base_model: mergekit merges it as one more linear input: list it under models")
    counts = {"slerp": (1, 1, "exactly one model"), "model_stock": (2, None, "at least two models")}
    low, high, words = counts.get(method, (1, None, "at least one model"))
    if len(models) < low or (high is not None and len(models) > high):
        raise MergeInputError(f"{method} needs {words} besides base_model, got {len(models)}")


def _out_dtype(doc: dict[str, Any], notes: list[str]) -> str | None:
    """``out_dtype``, else ``dtype`` (fedfuse computes in float32 and rounds the output once)."""
    out_dtype = _dtype("out_dtype", doc["out_dtype"]) if doc.get("out_dtype") is not None else None
    if doc.get("dtype") is not None:
        dtype = _dtype("dtype", doc["dtype"])
        out_dtype = out_dtype or dtype
        if dtype in ("float16", "bfloat16"):
            notes.append(f"dtype {dtype}: fedfuse computes in float32 and rounds the output to {dtype} once")
    return out_dtype


def _parse(path: Path, doc: Any) -> Recipe:
    _check_top_keys(doc)
    method = doc["merge_method"]
    row, notes = METHODS[method], []
    entries = doc.get("models")
    if not isinstance(entries, list) or not entries:
        raise MergeInputError("`models` must be a non-empty list of `- model: PATH` entries")
    base = _path("base_model", doc["base_model"]) if doc.get("base_model") is not None else None
    models, model_params = _parse_models(entries, method, base)
    parameters = _mapping("parameters", doc.get("parameters"))
    _check_parameters("parameters", parameters, row, method, top=True)
    _check_counts(method, base, models)
    for name, default in row.shared.items():
        if default is REQUIRED and name not in parameters:
            raise MergeInputError(f"parameters.{name} is required by {method}")
    if parameters.get("int8_mask"):
        notes.append("int8_mask only changes mergekit's mask dtype, not the result: ignored")
    if parameters.get("rescale") and row.sparsifier == "none":
        notes.append(f"rescale has no effect in {method} (it does not sparsify): ignored")
    out_dtype = _out_dtype(doc, notes)
    base = base or models[0]  # linear: any reference works, Σ wθ / Σ w does not depend on it
    return Recipe(path, method, row, base, tuple(models), tuple(model_params), parameters, out_dtype, tuple(notes))


# ---------------------------------------------------------------- per-tensor values


def _value(recipe: Recipe, name: str, scopes: Sequence[Mapping[str, Any]], tensor: str, t: float, where: str) -> Any:
    for scope in scopes:
        if name in scope:
            value = evaluate_setting(scope[name], tensor, t)
            if value is not None:
                return value
    default = {**recipe.row.shared, **recipe.row.per_model}[name]
    if default is REQUIRED:
        raise MergeInputError(f"{where}.{name} is required (no value for tensor {tensor!r})")
    return default


def _strategy_params(method: str, shared: Mapping[str, Any]) -> dict[str, Any]:
    if method in ("linear", "model_stock", "slerp"):  # their merge-wide parameters are the strategy's
        return dict(shared)
    return {"normalize": shared["normalize"], "lam": shared["lambda"]}  # generalized task arithmetic


def _shared(recipe: Recipe, tensor: str, t: float) -> dict[str, Any]:
    return {k: _value(recipe, k, [recipe.parameters], tensor, t, "parameters") for k in recipe.row.shared}


def resolve_settings(recipe: Recipe, names: Sequence[str], *, device: str, dtype: str) -> dict[str, TensorSettings]:
    """Every floating tensor's strategy, weights and per-model sparsifiers; checked, shared where equal."""
    row, positions = recipe.row, layer_positions(names)
    strategies: dict[tuple, MergeStrategy] = {}
    out: dict[str, TensorSettings] = {}
    for tensor in names:
        t = positions[tensor]
        shared = _shared(recipe, tensor, t)
        params = _strategy_params(row.method, shared)
        key = tuple(sorted(params.items()))
        if key not in strategies:
            with _at(f"tensor {tensor!r}"):
                strategies[key] = plan_strategy(row.method, params, device=device, dtype=dtype)
        strategy = strategies[key]
        weights, kept = [], []
        for i, own in enumerate(recipe.model_parameters):
            scopes, where = [own, recipe.parameters], f"models[{i}].parameters"
            values = {k: _value(recipe, k, scopes, tensor, t, where) for k in row.per_model}
            weights.append(float(values.get("weight", 1.0)))
            density = float(values.get("density", 1.0))
            if row.sparsifier == "none" or density >= 1.0:  # mergekit keeps every entry at density >= 1
                kept.append(Sparsifier())
                continue
            with _at(f"{where}, tensor {tensor!r}"):
                if density <= 0.0:
                    raise MergeInputError(f"density must be > 0, got {density}")
                extra = {"gamma": values.get("gamma"), "epsilon": values.get("epsilon")}
                rescale = "l1" if shared["rescale"] else "none"  # mergekit's `rescale: true` is an l1 rescale
                kept.append(plan_sparsifier(row.method, row.sparsifier, density, **extra, rescale=rescale))
        for i, weight in enumerate(weights):  # all 0 is allowed: mergekit then keeps the base tensor
            if weight < 0 and not strategy.capabilities.negative_weights:
                raise MergeInputError(f"models[{i}].parameters.weight must be >= 0 in {row.method}, got {weight}")
        if row.method == "linear" and shared["normalize"] and abs(sum(weights)) < 1e-8:
            raise MergeInputError(f"tensor {tensor!r}: linear with normalize needs weights that do not sum to 0")
        out[tensor] = TensorSettings(strategy, tuple(weights), tuple(kept))
    return out


def recipe_request(recipe: Recipe, request: RecipeRequest) -> ModelsRequest:
    """The recipe as the model merge it describes: each tensor's values resolved and checked (reads the base's header).

    The request's own strategy is the first tensor's; ``tensor_settings`` gives each tensor its own
    (what :func:`resolve_settings` found), and ``out_dtype`` the recipe's output dtype.
    """
    with _at("base_model"), open_checkpoint(recipe.base) as base:
        names = [name for name in base.names if base.info(name).is_floating_point]
    if not names:
        raise MergeInputError(f"base_model {recipe.base} holds no floating-point tensors")
    dtype = "float64" if recipe.out_dtype == "float64" else "float32"
    with _at(str(recipe.path)):
        settings = resolve_settings(recipe, names, device=request.device, dtype=dtype)
    first = _shared(recipe, names[0], layer_positions(names)[names[0]])
    return ModelsRequest(
        base=recipe.base,
        models=recipe.models,
        method=recipe.row.method,
        params=_strategy_params(recipe.row.method, first),
        sparsifier="none",
        seed=request.seed,
        dtype=dtype,
        tensor_settings=settings.get,
        out_dtype=recipe.out_dtype,
        **request.output_fields(),
    )


def merge_recipe(
    recipe: Recipe | RecipeRequest | PathLike, /, *, progress: Progress | None = None, **fields: Any
) -> MergeResult:
    """Run a mergekit recipe into the model folder ``out``, tensor by tensor (``fedfuse merge recipe``).

    ``merge_recipe(request)`` runs a :class:`~fedfuse.offline.request.RecipeRequest`;
    ``merge_recipe(recipe, out="merged", seed=0)`` builds one, ``recipe`` being a :func:`load_recipe`
    result or the recipe's YAML file (model paths relative to the working directory). ``seed`` draws the
    DARE and DELLA masks: model i's tensor ``name`` uses ``derive_seed(seed, 0, i, name)`` (mergekit draws
    from torch's global generator, so the two agree in distribution, not entry by entry). The recipe
    runs as the :class:`~fedfuse.offline.request.ModelsRequest` :func:`recipe_request` makes of it.

    Raises
    ------
    MergeInputError
        For any bad key or value, naming it, before anything is written.
    """
    if isinstance(recipe, RecipeRequest):
        request, loaded = as_request(RecipeRequest, recipe, "config", fields), load_recipe(recipe.config)
    else:
        loaded = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        request = as_request(RecipeRequest, loaded.path, "config", fields)
    return merge_models(recipe_request(loaded, request), progress=progress)


__all__ = [
    "METHODS",
    "MethodRow",
    "Recipe",
    "evaluate_setting",
    "layer_positions",
    "load_recipe",
    "merge_recipe",
    "recipe_request",
]
