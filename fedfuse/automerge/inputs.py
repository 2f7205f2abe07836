"""The inputs of a coefficient search or AdaMerging: a base model and K candidates, as :class:`Candidates`.

Fine-tuned model folders become dense task vectors τₖ = θₖ − θ_base (fp32, only the tensors a model changes);
PEFT LoRA adapters stay factors (``LowRank(s·B, A)``; ``fan_in_fan_out`` adapters transposed), plus the
tensors an adapter saves whole. Inputs are checked as ``fedfuse merge`` checks them (:class:`MergeInputError`
naming the input at fault). The base is loaded once, as a causal LM or a sequence classifier.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from fedfuse.algebra.low_rank import LowRank
from fedfuse.automerge.coefficients import Candidates, Direction
from fedfuse.checkpoints import TensorInfo
from fedfuse.offline.adapters import LoraAdapter, open_adapter
from fedfuse.offline.errors import MergeInputError
from fedfuse.offline.sources import open_input

ModelKind = Literal["auto", "causal", "classifier"]
PathLike = str | Path


@dataclass
class MergeInputs:
    """The base model (loaded once, eval mode), its tokenizer, the candidates and whether it is a causal LM."""

    model: torch.nn.Module
    tokenizer: Any
    candidates: Candidates
    causal: bool


def model_kind(base: PathLike) -> Literal["causal", "classifier"]:
    """A folder's model kind from its ``config.json`` architectures (causal when it names none)."""
    config = Path(base) / "config.json"
    if config.is_file():
        names = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
        if any(str(n).endswith("ForSequenceClassification") for n in names):
            return "classifier"
    return "causal"


def load_base(base: PathLike, kind: ModelKind = "auto") -> tuple[torch.nn.Module, Any, bool]:
    """The base model in fp32 eval mode and its tokenizer; ``base`` a folder, ``smollm2`` or a hub id."""
    from fedfuse.models.loading import ModelLoadError, load_causal_lm, load_tokenizer, resolve_model_source

    chosen = model_kind(base) if kind == "auto" else kind
    try:
        if chosen == "causal":
            model = load_causal_lm(base, dtype=torch.float32)
        else:
            from transformers import AutoModelForSequenceClassification

            model = AutoModelForSequenceClassification.from_pretrained(resolve_model_source(base))
        tokenizer = load_tokenizer(base)
    except (ModelLoadError, OSError, ValueError) as exc:
        raise MergeInputError(f"base {base}: {exc}") from None
    return model.float().eval(), tokenizer, chosen == "causal"


def _layout(model: torch.nn.Module) -> dict[str, TensorInfo]:
    return {name: TensorInfo(tuple(p.shape), p.dtype) for name, p in model.state_dict().items()}


def model_task_vector(stack: ExitStack, role: str, path: PathLike, model: torch.nn.Module) -> dict[str, Direction]:
    """θ − θ_base of a fine-tuned model folder, for the floating parameters it changes."""
    reader = open_input(stack, role, path)
    parameters = dict(model.named_parameters())
    missing = [name for name in parameters if name not in reader]
    if len(missing) == len(parameters):
        raise MergeInputError(f"{role}: {path} shares no parameter name with the base")
    vector: dict[str, Direction] = {}
    for name, parameter in parameters.items():
        if name not in reader:
            continue
        tensor = reader.get(name)
        if tuple(tensor.shape) != tuple(parameter.shape):
            raise MergeInputError(f"{role}: {name!r} is {list(tensor.shape)} but the base's is {list(parameter.shape)}")
        delta = tensor.float() - parameter.detach().float()
        if not torch.isfinite(delta).all():
            raise MergeInputError(f"{role}: the change to {name!r} has NaN or infinite values")
        if bool(delta.any()):
            vector[name] = delta
    return vector


def adapter_task_vector(adapter: LoraAdapter, model: torch.nn.Module) -> dict[str, Direction]:
    """An adapter's change as factors per target weight (s·B, A) and dense for tensors it saves whole."""
    parameters = dict(model.named_parameters())
    vector: dict[str, Direction] = {}
    for name, module in adapter.modules.items():
        a = adapter.handle.get_tensor(module.a_key).float()
        b = adapter.handle.get_tensor(module.b_key).float() * module.scale
        vector[name] = LowRank(a.T.contiguous(), b.T.contiguous()) if module.transpose else LowRank(b, a)
    for name in adapter.saved:
        if name in parameters:
            vector[name] = adapter.delta(name, parameters[name].detach())
    return vector


def load_inputs(
    base: PathLike,
    *,
    models: Sequence[PathLike] = (),
    adapters: Sequence[PathLike] = (),
    layer_groups: int = 1,
    kind: ModelKind = "auto",
) -> MergeInputs:
    """The base model and the candidates (fine-tuned models, or adapters; not both), checked."""
    if bool(models) == bool(adapters):
        raise MergeInputError("give fine-tuned models or adapters (one kind, at least two)")
    inputs = list(models or adapters)
    if len(inputs) < 2:
        raise MergeInputError(f"need at least two candidates to merge, got {len(inputs)}")
    model, tokenizer, causal = load_base(base, kind)
    vectors: list[dict[str, Direction]] = []
    with ExitStack() as stack:
        layout = _layout(model)
        for i, path in enumerate(inputs):
            role = f"{'model' if models else 'adapter'} {i + 1}"
            if models:
                vectors.append(model_task_vector(stack, role, path, model))
            else:
                vectors.append(adapter_task_vector(open_adapter(stack, role, Path(path), layout), model))
    if not any(vectors):
        raise MergeInputError("no candidate changes any parameter of the base")
    labels = [Path(p).name or str(p) for p in inputs]
    return MergeInputs(model, tokenizer, Candidates.build(labels, vectors, layer_groups), causal)
