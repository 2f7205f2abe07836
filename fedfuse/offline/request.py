"""One validated request per ``fedfuse merge`` mode, its fields declared once (pydantic, as mergekit's config).

:class:`ModelsRequest` (fine-tuned models), :class:`AdaptersRequest` (PEFT LoRA adapters),
:class:`CombineRequest` (partial states) and :class:`RecipeRequest` (a mergekit recipe) hold every option of
their mode, with its help text. The CLI's subcommands, the Python functions' keyword form
(``merge_models(base, models, method=...)``) and mergekit recipes (:func:`fedfuse.offline.recipe.recipe_request`
turns one into a :class:`ModelsRequest`) all build one. A field of another mode is refused by the model (what
the flag form's clashes were), and every error is a :class:`RequestError` naming fields (``density``), which
the CLI renders as its flags (``--density``).

>>> from fedfuse.offline.request import ModelsRequest
>>> ModelsRequest(base="base", models=["a", "b"], method="ties", density=0.2, out="merged").density
0.2
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from fedfuse.offline.errors import MergeInputError
from fedfuse.strategies import available_strategies, method_spec, parse_strategy_params

_FIELD = re.compile(r"\{(\w+)\}")

OUT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
"""The output dtypes a merge can write its floating tensors in (``out_dtype``)."""


class RequestError(MergeInputError):
    """A bad request. Its template names fields as ``{field}``: ``str()`` shows their names, :meth:`render` flags."""

    def __init__(self, template: str) -> None:
        self.template = template
        super().__init__(self.render())

    @property
    def fields(self) -> tuple[str, ...]:
        """The request fields the message names, in order."""
        return tuple(dict.fromkeys(name for name in _FIELD.findall(self.template) if name in request_fields()))

    def render(self, names: Mapping[str, str] | None = None) -> str:
        """The message with each field called what ``names`` calls it (e.g. a CLI flag), else by its own name."""
        given = names or {}
        return _FIELD.sub(lambda m: given.get(m[1], m[1]) if m[1] in request_fields() else m[0], self.template)


def _ref(name: str) -> str:
    """A field reference in a template (``{density}``); an unknown name quoted as it is."""
    return f"{{{name}}}" if name in request_fields() else repr(name)


def _from_validation(exc: ValidationError) -> MergeInputError:
    """pydantic's first error as one line naming the field (our own validators' errors as they were raised)."""
    first = exc.errors()[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, MergeInputError):
        return cause
    loc = first["loc"]
    where = (_ref(str(loc[0])) + "".join(f"[{part}]" for part in loc[1:])) if loc else "request"
    if first["type"] == "missing":
        return RequestError(f"{where} is required")
    return RequestError(f"{where}: {first['msg']}")


class _Request(BaseModel):
    """Frozen, checked on construction; fields of another mode refused in one line naming them."""

    model_config = ConfigDict(frozen=True)
    what: ClassVar[str] = "this merge"

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _from_validation(exc) from None

    @classmethod
    def _normalize(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Drop ``None`` for list fields (the same as not giving them)."""
        return {k: v for k, v in data.items() if not (v is None and k in cls.model_fields and cls._is_list(k))}

    @classmethod
    def _is_list(cls, name: str) -> bool:
        return cls.model_fields[name].default == ()

    @classmethod
    def _clash(cls, extras: list[str], data: Mapping[str, Any]) -> RequestError:
        """The error for fields this mode does not have."""
        return RequestError(f"{', '.join(map(_ref, extras))}: not options of {cls.what}")

    @model_validator(mode="before")
    @classmethod
    def _only_own_fields(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = cls._normalize(dict(data))
        extras = [name for name in data if name not in cls.model_fields]
        if extras:
            raise cls._clash(extras, data)
        return data


class _Output(_Request):
    """Where and how any merge writes."""

    out: Path | None = Field(None, description="Output folder (a model, or with out_adapter an adapter).")
    max_shard_size: str | int = Field("5GB", description="Shard the output past this size: 5GB, 500MB, 2GiB or bytes.")
    force: bool = Field(False, description="Replace a non-empty output folder or an existing partial-state file.")
    device: str = Field("cpu", description="Where to accumulate: cpu, cuda, cuda:N or auto.")
    allow_non_finite: bool = Field(
        False, description="Merge NaN/Inf input values as they are (default: refuse, naming them)."
    )

    def output_fields(self) -> dict[str, Any]:
        """The output fields' values (what a recipe's run passes on to its model merge)."""
        return {name: getattr(self, name) for name in _Output.model_fields}


Seed = Annotated[int, Field(description="DARE/DELLA seed (per model and tensor).")]


class _OnBase(_Output):
    """A merge of inputs made from one base, written as a model or as a partial state."""

    base: Path = Field(description="Base model: a .safetensors file or an HF model folder.")
    partial_out: Path | None = Field(
        None, description="Write this group's partial state (to combine later) instead of a model."
    )


class _Method(_OnBase):
    """The merge method and everything it is given: weights, sparsifier, strategy parameters, precision."""

    method: str = Field("", description=f"Merge method: {', '.join(available_strategies())}.")
    weights: tuple[float, ...] | None = Field(None, description="Weight of each input, once per input (default 1).")
    density: float | None = Field(
        None, description="Kept fraction for the sparsifier (DARE keeps each entry with this probability)."
    )
    sparsifier: str | None = Field(
        None,
        description="Override the method's sparsifier (ties: trim, dare_*: dare, breadcrumbs*, della*, else none).",
    )
    gamma: float | None = Field(None, description="Breadcrumbs: fraction of largest-|τ| outliers dropped (0.01).")
    epsilon: float | None = Field(None, description="DELLA: keep probabilities span density ± epsilon (0.15).")
    rescale: str | None = Field(
        None, description="Rescale kept entries: inverse (1/p, dare/della default), l1 (mergekit) or none."
    )
    sparsifier_params: dict[str, Any] = Field(
        default_factory=dict,
        description="Further declared parameters of the sparsifier (a plug-in's) by name (NAME=VALUE).",
    )
    lam: float = Field(1.0, description="Scale λ of the merged task vector.")
    seed: Seed = 0
    dtype: str = Field("float32", description="Accumulation precision: float32 or float64.")
    vote: str | None = Field(None, description="TIES sign election: mass or count (ties, dare_ties).")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Declared parameters of the method by name, e.g. eps=1e-8 (NAME=VALUE)."
    )
    first_model_index: int = Field(
        0, description="Index of the first input in DARE seeds (for the groups of a tiered merge)."
    )
    diagnose: bool = Field(
        False,
        description="Write no model: report the inputs' mergeability (norms, cosines, sign conflicts, outliers) "
        "into out (diagnostics.json, .md, .png).",
    )

    @classmethod
    def _normalize(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Also spread the older ``sparsifier_options`` mapping into gamma, epsilon, rescale and sparsifier_params."""
        options = data.pop("sparsifier_options", None) or {}
        if not isinstance(options, Mapping):
            raise RequestError(f"sparsifier_options: expected a mapping of name to value, got {options!r}")
        for name, value in options.items():
            if value is None:
                continue
            if name in ("gamma", "epsilon", "rescale"):
                data[name] = value
            else:
                data["sparsifier_params"] = {**data.get("sparsifier_params", {}), name: value}
        return super()._normalize(data)

    @model_validator(mode="after")
    def _check_diagnose(self) -> _Method:
        if self.diagnose and self.partial_out is not None:
            raise RequestError("{diagnose} writes a report into {out}, not partial statistics ({partial_out})")
        if self.diagnose and getattr(self, "out_adapter", False):
            raise RequestError("{diagnose} writes a report into {out}, not an adapter ({out_adapter})")
        return self

    @field_validator("params", "sparsifier_params", mode="before")
    @classmethod
    def _parse_params(cls, value: Any, info: ValidationInfo) -> Any:
        """``NAME=VALUE`` strings (a CLI's) or a mapping of name to value."""
        if value is None:
            return {}
        if isinstance(value, str) or (isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)):
            try:
                return parse_strategy_params(value)
            except ValueError as exc:
                raise RequestError(f"{{{info.field_name}}}: {exc}") from None
        return value


class ModelsRequest(_Method):
    """Merge fine-tuned models of ``base`` into a model folder (``out``) or a partial state (``partial_out``)."""

    what: ClassVar[str] = "a merge of fine-tuned models"
    mode: Literal["models"] = "models"
    models: tuple[Path, ...] = Field((), description="The fine-tuned models to merge (files or HF folders).")
    fishers: tuple[Path, ...] = Field((), description="Fisher-diagonal safetensors file, once per model (fisher).")
    grams: tuple[Path, ...] = Field(
        (), description="Gram-matrix safetensors file, once per model (regmean; made by `fedfuse grams`)."
    )
    tensor_settings: Callable[[str], Any] | None = Field(
        None, exclude=True, description="Tensor name → its own TensorSettings or None (a recipe's values)."
    )
    out_dtype: str | None = Field(None, description="Write the model's floating tensors in this dtype.")

    @property
    def inputs(self) -> tuple[Path, ...]:
        """The merged inputs (the models)."""
        return self.models

    @model_validator(mode="after")
    def _check_out_dtype(self) -> ModelsRequest:
        if self.out_dtype is not None and self.out_dtype not in OUT_DTYPES:
            raise RequestError(f"unknown output dtype {self.out_dtype!r}: choose {', '.join(OUT_DTYPES)}")
        if self.out_dtype is not None and self.partial_out is not None:
            raise RequestError("an output dtype applies to a model ({out}), not to partial statistics")
        return self


class AdaptersRequest(_Method):
    """Merge PEFT LoRA adapters of ``base`` in ΔW space into a model folder, or (``out_adapter``) an adapter."""

    what: ClassVar[str] = "a merge of LoRA adapters"
    mode: Literal["adapters"] = "adapters"
    adapters: tuple[Path, ...] = Field((), description="A PEFT LoRA adapter folder to merge in ΔW space (repeat).")
    out_adapter: bool = Field(False, description="Write a PEFT LoRA adapter (needs rank) instead of the model.")
    rank: Annotated[int, Field(strict=True)] | None = Field(
        None, description="Rank of the merged adapter's factors (truncated SVD of each ΔW)."
    )

    @property
    def inputs(self) -> tuple[Path, ...]:
        """The merged inputs (the adapters)."""
        return self.adapters

    @classmethod
    def _clash(cls, extras: list[str], data: Mapping[str, Any]) -> RequestError:
        mixed = [name for name in ("models", "fishers", "grams") if name in extras]
        if not mixed:
            return super()._clash(extras, data)
        given = next((n for n in ("adapters", "out_adapter", "rank") if data.get(n) not in (None, False, (), [])), "")
        return RequestError(
            f"{_ref(given or 'adapters')} cannot be mixed with {_ref(mixed[0])}: "
            "merge either fine-tuned models or LoRA adapters"
        )

    @model_validator(mode="after")
    def _check_adapter_options(self) -> AdaptersRequest:
        if not self.adapters:
            raise RequestError("give at least one PEFT LoRA adapter folder to merge ({adapters})")
        if self.weights and len(self.weights) != len(self.adapters):
            raise RequestError(
                f"got {len(self.weights)} weight(s) for {len(self.adapters)} adapter(s): "
                "give one {weights} per {adapters}, or none"
            )
        if self.partial_out is not None:
            raise RequestError("{partial_out} is not supported with {adapters}: merge into {out}")
        if self.out_adapter and self.rank is None:
            raise RequestError("{out_adapter} needs {rank} (the rank of the merged adapter's factors)")
        if self.rank is not None and not self.out_adapter:
            raise RequestError("{rank} applies only with {out_adapter} (the merged full model needs no rank)")
        if self.rank is not None and self.rank < 1:
            raise RequestError(f"{{rank}} must be an integer >= 1, got {self.rank!r}")
        self._check_method()
        return self

    def _check_method(self) -> None:
        """Methods needing statistics adapters do not carry are refused (an unknown method: by the plan)."""
        try:
            spec = method_spec(self.method) if self.method else None
        except (KeyError, ValueError):
            return
        if spec is not None and spec.capabilities.needs_fisher:
            raise RequestError(f"method {self.method!r} needs Fisher diagonals, which LoRA adapters do not carry")
        if spec is not None and spec.capabilities.needs_gram:
            raise RequestError(
                f"method {self.method!r} needs Gram matrices of each model's inputs: merge the models with {{models}} "
                "and {grams} (fedfuse grams computes them), not adapters"
            )


class CombineRequest(_OnBase):
    """Fold partial states (``partial_out`` files or gateways' payloads) into a model or a further partial state."""

    what: ClassVar[str] = "a combine"
    mode: Literal["combine"] = "combine"
    partials: tuple[Path, ...] = Field((), description="Partial-state files to fold in (a partial_out or a gateway's).")

    @classmethod
    def _clash(cls, extras: list[str], data: Mapping[str, Any]) -> RequestError:
        fields = ", ".join(map(_ref, extras))
        return RequestError(
            f"{fields} cannot be used with {{partials}}: the merge settings come from the partial files"
        )


class RecipeRequest(_Output):
    """Run a mergekit recipe (YAML) into the model folder ``out``."""

    what: ClassVar[str] = "a recipe's merge"
    mode: Literal["recipe"] = "recipe"
    config: Path = Field(description="A mergekit recipe (YAML): its methods, models and parameters.")
    seed: Seed = 0

    @classmethod
    def _clash(cls, extras: list[str], data: Mapping[str, Any]) -> RequestError:
        return RequestError(f"{', '.join(map(_ref, extras))} cannot be used with {{config}}: the recipe sets the merge")

    @model_validator(mode="after")
    def _needs_out(self) -> RecipeRequest:
        if self.out is None:
            raise RequestError("give an output folder ({out}) for the recipe's merge")
        return self


MergeRequest = Annotated[ModelsRequest | AdaptersRequest | CombineRequest | RecipeRequest, Field(discriminator="mode")]
"""Any merge request, told apart by ``mode`` (for a pydantic model or ``TypeAdapter`` holding one)."""

REQUESTS: dict[str, type[ModelsRequest | AdaptersRequest | CombineRequest | RecipeRequest]] = {
    "models": ModelsRequest,
    "adapters": AdaptersRequest,
    "combine": CombineRequest,
    "recipe": RecipeRequest,
}
"""Each mode's request."""


@cache
def request_fields() -> frozenset[str]:
    """Every field of every mode's request."""
    return frozenset(name for kind in REQUESTS.values() for name in kind.model_fields)


def field_help(name: str) -> str:
    """A field's help text (its description on the first request that has it)."""
    for kind in REQUESTS.values():
        if name in kind.model_fields:
            return kind.model_fields[name].description or ""
    raise KeyError(name)


R = TypeVar("R", ModelsRequest, AdaptersRequest, CombineRequest, RecipeRequest)


def as_request(kind: type[R], given: object, first: str, fields: Mapping[str, Any]) -> R:
    """``given`` when it is a ``kind`` already (then no ``fields``), else the ``kind`` with ``first=given, **fields``.

    The keyword form of the library functions: ``merge_models(base, models, method=...)``.
    """
    if isinstance(given, kind):
        if fields:
            raise TypeError(f"give a {kind.__name__} or its fields, not both")
        return given
    values: dict[str, Any] = {first: given, **fields}
    return kind(**values)


def parse_request(data: Mapping[str, Any]) -> ModelsRequest | AdaptersRequest | CombineRequest | RecipeRequest:
    """The request of ``data["mode"]`` from ``data``'s other fields; raises :class:`RequestError`."""
    mode = data.get("mode")
    kind = REQUESTS.get(mode) if isinstance(mode, str) else None
    if kind is None:
        raise RequestError(f"{{mode}} must be one of {', '.join(REQUESTS)}, got {mode!r}")
    return kind(**data)


__all__ = [
    "OUT_DTYPES",
    "REQUESTS",
    "AdaptersRequest",
    "CombineRequest",
    "MergeRequest",
    "ModelsRequest",
    "RecipeRequest",
    "RequestError",
    "as_request",
    "field_help",
    "parse_request",
    "request_fields",
]
