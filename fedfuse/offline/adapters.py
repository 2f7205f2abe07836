"""PEFT LoRA adapters as offline merge inputs: each adapter's exact ΔW per target module, streamed.

An adapter folder (what ``PeftModel.save_pretrained`` writes: ``adapter_config.json`` and
``adapter_model.safetensors``) changes each target module's base weight by ΔW = s·B·A with
s = lora_alpha / r (``use_rslora``: lora_alpha / √r), ``rank_pattern`` and ``alpha_pattern`` resolved
per module as PEFT resolves them and ``fan_in_fan_out`` (GPT-2's Conv1D) transposing ΔW. Adapters may
have different ranks: ΔW's shape is the base weight's whatever the rank.

:class:`AdapterSource` gives the offline executor, for each base weight some adapter changes, every
adapter's ΔWₖ as its task vector (0 where an adapter leaves that weight alone), sparsified, seeded and
weighted exactly like a fine-tuned model's τ: merging adapters gives the merge of the models
``merge_and_unload`` makes of them (up to float rounding). Memory: one module's factors and ΔW.

Tensors an adapter saves whole (``modules_to_save``: a classification head, ``lm_head``, …) are
merged as task vectors of those tensors (saved − base). Refused with one line naming the adapter:
other PEFT types, DoRA, LoRA on embeddings or convolutions, ``lora_bias``, ``bias`` other than
``"none"``, trainable tokens, layer replication, ``target_parameters`` and pickled (``.bin``) weights.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from fedfuse.algebra import Sparsifier, dare_seed_fn, lora_delta, sparsify_update
from fedfuse.checkpoints import CheckpointReader, TensorInfo
from fedfuse.offline.errors import MergeInputError, input_errors
from fedfuse.offline.plan import MergePlan
from fedfuse.offline.request import RequestError
from fedfuse.strategies import MergeState

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."
"""PEFT saves ``<module>.lora_A.weight`` of base module ``<module>`` under this prefix."""
LORA_A_KEY = ".lora_A.weight"
LORA_B_KEY = ".lora_B.weight"

_REFUSED_OPTIONS: tuple[tuple[str, str], ...] = (
    ("use_dora", "DoRA (use_dora) adapters are not supported: their magnitude vector makes ΔW non-linear"),
    ("lora_bias", "lora_bias adapters are not supported (their LoRA B bias is not part of ΔW = s·B·A)"),
    ("layer_replication", "adapters with layer_replication are not supported"),
    ("target_parameters", "adapters with target_parameters are not supported (only LoRA on Linear modules)"),
    ("trainable_token_indices", "adapters with trainable_token_indices are not supported"),
    ("use_qalora", "QALoRA adapters are not supported"),
)


@dataclass(frozen=True)
class LoraModule:
    """One target module of an adapter: its factors' keys, rank, scale and layout."""

    weight: str
    """The base weight it changes, ``"<module>.weight"``."""
    a_key: str
    b_key: str
    rank: int
    scale: float
    transpose: bool
    """``fan_in_fan_out``: the base stores the weight as in × out, so ΔW is (s·B·A)ᵀ."""


@dataclass
class LoraAdapter:
    """An opened, checked adapter: its config, target modules and the tensors it saves whole."""

    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule]
    saved: dict[str, str]
    """Base tensor name → key of the tensor the adapter saves whole (``modules_to_save``)."""
    handle: Any

    @property
    def base_model(self) -> str:
        """``base_model_name_or_path`` of its config ("" when unset)."""
        return str(self.config.get("base_model_name_or_path") or "")

    def covers(self, name: str) -> bool:
        """Whether the adapter changes base tensor ``name``."""
        return name in self.modules or name in self.saved

    def delta(self, name: str, base_tensor: torch.Tensor) -> torch.Tensor:
        """The adapter's change to base tensor ``name`` in fp32 (zeros when it leaves it alone)."""
        module = self.modules.get(name)
        if module is not None:
            delta = lora_delta(self.handle.get_tensor(module.a_key), self.handle.get_tensor(module.b_key), module.scale)
            return delta.T.contiguous() if module.transpose else delta
        key = self.saved.get(name)
        if key is not None:
            return self.handle.get_tensor(key).float() - base_tensor.float()
        return torch.zeros(base_tensor.shape, dtype=torch.float32)


def read_adapter_config(path: Path, role: str) -> dict[str, Any]:
    """The folder's ``adapter_config.json``, checked to describe a plain LoRA adapter fedfuse can merge."""
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a folder"
        raise MergeInputError(f"{role}: {path} {what} (give a PEFT adapter folder, as save_pretrained writes it)")
    config_path = path / ADAPTER_CONFIG
    if not config_path.is_file():
        raise MergeInputError(f"{role}: {path} has no {ADAPTER_CONFIG} (not a PEFT adapter folder)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MergeInputError(f"{role}: cannot read {config_path}: {exc}") from None
    if not isinstance(config, dict):
        raise MergeInputError(f"{role}: {config_path} is not a JSON object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise MergeInputError(f"{role}: {path} is a {peft_type or 'untyped'} adapter; only PEFT LoRA adapters merge")
    for option, message in _REFUSED_OPTIONS:
        if config.get(option):
            raise MergeInputError(f"{role}: {message} ({path})")
    if str(config.get("bias", "none")) != "none":
        raise MergeInputError(
            f"{role}: adapters with bias={config['bias']!r} are not supported (train them with bias='none') ({path})"
        )
    return config


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module ``rank_pattern`` / ``alpha_pattern`` lookup (``peft.utils.other.get_pattern_key``)."""
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(list(patterns), module)
    return patterns.get(key, default)


def _lora_module(
    config: Mapping[str, Any], module: str, shapes: tuple[tuple[int, ...], tuple[int, ...]], base: TensorInfo, role: str
) -> LoraModule:
    """A target module's rank and scale from the config, its factor shapes checked against the base weight."""
    a_shape, b_shape = shapes
    weight = module + ".weight"
    if len(a_shape) != 2 or len(b_shape) != 2:
        raise MergeInputError(
            f"{role}: {module} has LoRA factors of shapes {list(a_shape)} and {list(b_shape)}; only LoRA on "
            "Linear modules is supported (not convolutions)"
        )
    rank = int(_pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8)))
    if a_shape[0] != rank or b_shape[1] != rank:
        raise MergeInputError(
            f"{role}: {module} has factors of rank {a_shape[0]}/{b_shape[1]} but its config says r={rank}"
        )
    transpose = bool(config.get("fan_in_fan_out", False))
    delta_shape = (a_shape[1], b_shape[0]) if transpose else (b_shape[0], a_shape[1])
    if len(base.shape) != 2 or tuple(base.shape) != delta_shape or not base.is_floating_point:
        raise MergeInputError(
            f"{role}: target module {module} changes a {list(delta_shape)} weight but the base's {weight!r} is "
            f"{list(base.shape)} {base.dtype} (was the adapter trained on another base model?)"
        )
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    a_key, b_key = PEFT_KEY_PREFIX + module + LORA_A_KEY, PEFT_KEY_PREFIX + module + LORA_B_KEY
    return LoraModule(weight, a_key, b_key, rank, scale, transpose)


def _classify_keys(keys: Sequence[str], role: str) -> tuple[list[str], dict[str, str]]:
    """The LoRA target modules (sorted) and the tensors saved whole (base name → key) of an adapter's keys."""
    a_modules: set[str] = set()
    b_modules: set[str] = set()
    saved: dict[str, str] = {}
    for key in keys:
        if not key.startswith(PEFT_KEY_PREFIX):
            raise MergeInputError(f"{role}: tensor {key!r} is not a PEFT LoRA adapter key ({PEFT_KEY_PREFIX}…)")
        plain = key.removeprefix(PEFT_KEY_PREFIX)
        if plain.endswith(LORA_A_KEY):
            a_modules.add(plain.removesuffix(LORA_A_KEY))
        elif plain.endswith(LORA_B_KEY):
            b_modules.add(plain.removesuffix(LORA_B_KEY))
        elif "lora_magnitude_vector" in plain:
            raise MergeInputError(f"{role}: DoRA adapters are not supported (tensor {key!r})")
        elif "lora_embedding_" in plain:
            raise MergeInputError(f"{role}: LoRA on embeddings is not supported (tensor {key!r})")
        elif ".lora_" in plain or "trainable_tokens" in plain:
            raise MergeInputError(f"{role}: unsupported LoRA tensor {key!r} (only lora_A/lora_B weights merge)")
        else:
            saved[plain] = key
    unpaired = sorted(a_modules ^ b_modules)
    if unpaired:
        raise MergeInputError(f"{role}: LoRA module {unpaired[0]!r} has only one of its lora_A/lora_B factors")
    return sorted(a_modules), saved


def open_adapter(stack: ExitStack, role: str, path: Path, layout: Mapping[str, TensorInfo]) -> LoraAdapter:
    """Open an adapter for the whole merge and check it against the base's tensors (headers only)."""
    config = read_adapter_config(path, role)
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = (path / "adapter_model.bin").exists()
        why = " (only a pickled adapter_model.bin, which fedfuse does not load)" if pickled else ""
        raise MergeInputError(f"{role}: {path} has no {ADAPTER_WEIGHTS}{why}")
    with input_errors(role):
        try:
            handle = stack.enter_context(safe_open(str(weights), framework="pt"))
        except Exception as exc:  # safetensors raises its own SafetensorError for a bad file
            raise MergeInputError(f"{role}: {weights} is not a readable safetensors file: {exc}") from None
    keys = list(handle.keys())
    modules, saved = _classify_keys(keys, role)
    if not modules and not saved:
        raise MergeInputError(f"{role}: {weights} holds no LoRA factors")
    checked: dict[str, LoraModule] = {}
    for module in modules:
        weight = module + ".weight"
        if weight not in layout:
            raise MergeInputError(f"{role}: target module {module} changes {weight!r}, which the base lacks")
        a_key, b_key = PEFT_KEY_PREFIX + module + LORA_A_KEY, PEFT_KEY_PREFIX + module + LORA_B_KEY
        shapes = (tuple(handle.get_slice(a_key).get_shape()), tuple(handle.get_slice(b_key).get_shape()))
        checked[weight] = _lora_module(config, module, shapes, layout[weight], role)
    for name, key in saved.items():
        if name in checked:
            raise MergeInputError(f"{role}: {name!r} is both a LoRA target and saved whole")
        info = layout.get(name)
        if info is None:
            raise MergeInputError(f"{role}: saved tensor {key!r} has no counterpart {name!r} in the base")
        shape = tuple(handle.get_slice(key).get_shape())
        if shape != tuple(info.shape) or not info.is_floating_point:
            raise MergeInputError(
                f"{role}: saved tensor {name!r} is {list(shape)} but the base's is {list(info.shape)} {info.dtype}"
            )
    return LoraAdapter(path, config, checked, saved, handle)


def _loose_name(name: str) -> str:
    """The last path component of a model name or path, lower-cased ("org/Model-7B" ~ "/models/model-7b/")."""
    return name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()


def check_same_base(adapters: Sequence[LoraAdapter]) -> None:
    """Every adapter naming a base model must name the same one (compared loosely, by its last path part)."""
    named = [(i, adapter) for i, adapter in enumerate(adapters) if adapter.base_model]
    for i, adapter in named[1:]:
        j, first = named[0]
        if _loose_name(adapter.base_model) != _loose_name(first.base_model):
            raise MergeInputError(
                f"adapter {i + 1} was trained on {adapter.base_model!r} but adapter {j + 1} on {first.base_model!r}: "
                "adapters must share their base model"
            )


class AdapterSource:
    """Each base tensor's merge state from the adapters of a plan (``plan.models`` are adapter folders)."""

    def __init__(self, stack: ExitStack, plan: MergePlan, base: CheckpointReader, layout: dict[str, TensorInfo]):
        self.strategy = plan.strategy
        self.total_weight = plan.total_weight
        self.num_updates = len(plan.models)
        self._weights = plan.weights
        self._sparsifier: Sparsifier = plan.sparsifier
        self.adapters = [open_adapter(stack, f"adapter {i + 1}", path, layout) for i, path in enumerate(plan.models)]
        check_same_base(self.adapters)
        self.lora_weights: dict[str, LoraModule] = {}
        self.saved: set[str] = set()
        for adapter in self.adapters:
            self.lora_weights.update({name: m for name, m in adapter.modules.items() if name not in self.lora_weights})
            self.saved.update(adapter.saved)
        clash = sorted(self.saved & set(self.lora_weights))
        if clash:
            raise MergeInputError(f"{clash[0]!r} is a LoRA target of one adapter but saved whole by another")
        self._seed_fns: list[Callable[[str], int]] = [
            dare_seed_fn(plan.seed, 0, plan.first_model_index + i) for i in range(len(plan.models))
        ]
        self._allow_non_finite = plan.allow_non_finite

    def covers(self, name: str) -> bool:
        return name in self.lora_weights or name in self.saved

    def state_for(self, name: str, base_tensor: torch.Tensor) -> MergeState:
        compute = self.strategy.device
        state = self.strategy.new_state()
        for i, adapter in enumerate(self.adapters):
            delta = adapter.delta(name, base_tensor)
            if not self._allow_non_finite and not bool(torch.isfinite(delta).all()):
                raise RequestError(
                    f"adapter {i + 1} ({adapter.path}): the change to {name!r} has NaN or infinite values; "
                    "nothing was written ({allow_non_finite} merges them as they are)"
                )
            update = sparsify_update({name: delta.to(compute)}, self._sparsifier, self._seed_fns[i])
            del delta
            state.add(update, weight=self._weights[i])
            del update
        return state
