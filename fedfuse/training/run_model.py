"""The run's model: the base loaded once per process, LoRA attached through PEFT, factors read back.

In LoRA mode every client starts the round from the same fresh adapter (B = 0, A drawn from a seed
shared by the round) on the round's merged weights; the classification head, new to the base model,
trains fully and travels as an ordinary task vector. With ``lora-aggregation = "frozen-a"`` each A is the
round's :func:`~fedfuse.algebra.lora.frozen_lora_a`, which the server redraws, and is frozen: only B trains.
"""

from __future__ import annotations

import copy
import functools
from typing import TYPE_CHECKING, cast

import torch

from fedfuse.algebra import derive_seed, factor_names
from fedfuse.algebra.lora import frozen_lora_a
from fedfuse.models import load_causal_lm, load_classifier, load_tokenizer, model_skeleton
from fedfuse.settings import AUTO_TARGET_MODULES, RunSettings, SettingsError
from fedfuse.training.client_datasets import run_label_names

if TYPE_CHECKING:  # PEFT is imported where LoRA is attached: it costs seconds, and a name query never trains
    from peft.tuners.lora import LoraLayer

HEAD_PREFIXES = ("classifier.", "score.")
PEFT_PREFIX = "base_model.model."


CAUSAL_TASKS = ("lm", "sft")


@functools.lru_cache(maxsize=2)
def _base(model: str, task: str, seed: int, labels: tuple[str, ...]) -> tuple[torch.nn.Module, object]:
    import transformers  # here, not at import: a process that never loads a model never pays for it

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if task in CAUSAL_TASKS:
        return load_causal_lm(model).float(), load_tokenizer(model)
    classifier, tokenizer = load_classifier(model, num_labels=len(labels), seed=seed)
    classifier.config.id2label = dict(enumerate(labels))
    classifier.config.label2id = {name: i for i, name in enumerate(labels)}
    if classifier.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        classifier.config.pad_token_id = tokenizer.pad_token_id
    return classifier, tokenizer


def base_model(settings: RunSettings) -> tuple[torch.nn.Module, object]:
    """A fresh copy of the run's base model (fp32, eval mode) and its tokenizer; loaded once per process.

    Causal LM for tasks lm and sft; otherwise the encoder with a seeded head of one class per label
    of the run (``run_label_names``: the built-in topics, run config ``labels`` or the run's file).
    """
    model, tokenizer = _base(settings.source.model, settings.source.task, settings.run.seed, run_label_names(settings))
    fresh = copy.deepcopy(model)
    fresh.eval()
    return fresh, tokenizer


def base_parameters(settings: RunSettings) -> dict[str, torch.Tensor]:
    """The run's base parameters by name, read-only views of the process's cached base model (no copy)."""
    model, _ = _base(settings.source.model, settings.source.task, settings.run.seed, run_label_names(settings))
    return global_state(model)


def fresh_base_model(settings: RunSettings) -> tuple[torch.nn.Module, object]:
    """The run's base model loaded anew, not cached (a server that evaluates holds this one copy only)."""
    loader = cast(functools._lru_cache_wrapper, _base).__wrapped__
    model, tokenizer = loader(settings.source.model, settings.source.task, settings.run.seed, run_label_names(settings))
    model.eval()
    return model, tokenizer


def global_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter by name (tied weights once): what the server broadcasts and merges into.

    Buffers are not trained, so every process already has them from the base model.
    """
    return {name: p.detach() for name, p in model.named_parameters()}


def load_global_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Overwrite ``model``'s parameters named in ``state`` (the rest keep the base model's values).

    A round's weights are the base plus the run's change, which names only the parameters it changed, so a partial
    ``state`` is normal; a name the model lacks or a wrong shape is an error.
    """
    parameters = dict(model.named_parameters())
    unknown = sorted(set(state) - set(parameters))
    wrong = sorted(n for n in state if n in parameters and tuple(state[n].shape) != tuple(parameters[n].shape))
    if unknown or wrong:
        raise ValueError(f"round weights do not fit the model: unknown {unknown[:3]}, wrong shape {wrong[:3]}")
    with torch.no_grad():
        for name, tensor in state.items():
            parameters[name].copy_(tensor)


def head_names(model: torch.nn.Module) -> list[str]:
    """Parameters of a classification head the base checkpoint did not have (trained fully under LoRA)."""
    return [name for name, _ in model.named_parameters() if name.startswith(HEAD_PREFIXES)]


def target_modules_for(model: torch.nn.Module, settings: RunSettings) -> list[str]:
    """The LoRA target modules of a run: its list, or the auto choice for the model (checked to exist)."""
    wanted = settings.training.target_modules
    leaf_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if wanted is None:
        wanted = [name for name in AUTO_TARGET_MODULES if name in leaf_names]
        if settings.source.task in CAUSAL_TASKS:
            wanted = [name for name in wanted if name.endswith("_proj")] or wanted
    missing = [name for name in wanted if name not in leaf_names]
    if missing or not wanted:
        raise SettingsError(
            f"lora-target-modules {missing or wanted} name no Linear layer of the model "
            f"(its Linear layers: {', '.join(sorted(leaf_names))})"
        )
    return wanted


def attach_lora(model: torch.nn.Module, settings: RunSettings, round_number: int) -> torch.nn.Module:
    """Wrap ``model`` with fresh LoRA adapters (A seeded by the run and round), head trainable; frozen-a: A frozen."""
    from peft import LoraConfig, get_peft_model

    heads = set(head_names(model))
    config = LoraConfig(
        r=settings.training.lora_rank,
        lora_alpha=settings.training.lora_alpha,  # type: ignore[arg-type]  # peft annotates int; a float works
        target_modules=target_modules_for(model, settings),
        lora_dropout=0.0,
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(settings.run.seed, round_number, None, "lora-init") % 2**63)
        peft_model = get_peft_model(model, config)
    if settings.merge.lora_aggregation == "frozen-a":
        freeze_shared_a(peft_model, settings.run.seed, round_number)
    for name, parameter in peft_model.named_parameters():
        if name.removeprefix(PEFT_PREFIX) in heads:
            parameter.requires_grad_(True)
    return peft_model


def freeze_shared_a(peft_model: torch.nn.Module, seed: int, round_number: int) -> None:
    """FFA-LoRA: every module's A set to the round's shared :func:`frozen_lora_a` and frozen, so only B trains."""
    with torch.no_grad():
        for module, layer in lora_layers(peft_model).items():
            weight = cast(torch.Tensor, layer.lora_A["default"].weight)
            if not weight.is_meta:  # a skeleton (update_shapes) needs only the shapes
                weight.copy_(frozen_lora_a(seed, round_number, module, (weight.shape[0], weight.shape[1])))
            weight.requires_grad_(False)


def lora_scale(settings: RunSettings) -> float:
    """s = lora_alpha / r, as PEFT scales ΔW = s·B·A."""
    return settings.training.lora_alpha / settings.training.lora_rank


def lora_layers(peft_model: torch.nn.Module) -> dict[str, LoraLayer]:
    """Module name (without PEFT's prefix) → its LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return {
        name.removeprefix(PEFT_PREFIX): module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer) and "default" in getattr(module, "lora_A", {})
    }


def lora_update(peft_model: torch.nn.Module, round_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA client's trained adapter: every module's A and B, and the head's task vector (frozen-a sends no A)."""
    out: dict[str, torch.Tensor] = {}
    for module, layer in lora_layers(peft_model).items():
        a_name, b_name = factor_names(module)
        out[a_name] = cast(torch.Tensor, layer.lora_A["default"].weight).detach().float().clone()
        out[b_name] = cast(torch.Tensor, layer.lora_B["default"].weight).detach().float().clone()
    for name, parameter in peft_model.named_parameters():
        plain = name.removeprefix(PEFT_PREFIX)
        if parameter.requires_grad and plain.startswith(HEAD_PREFIXES):
            out[plain] = parameter.detach().float() - round_state[plain].float()
    return out


def skeleton(settings: RunSettings) -> torch.nn.Module:
    """The run's model without weights (meta tensors): names and shapes, what a merging server needs of it."""
    if settings.source.task in CAUSAL_TASKS:
        return model_skeleton(settings.source.model)
    return model_skeleton(settings.source.model, num_labels=len(run_label_names(settings)))


def base_identity(settings: RunSettings) -> dict[str, str]:
    """What names the run's base model (the root of its model versions): model, task, labels, head seed."""
    labels = "" if settings.source.task in CAUSAL_TASKS else ",".join(run_label_names(settings))
    return {
        "model": settings.source.model,
        "task": settings.source.task,
        "labels": labels,
        "seed": str(settings.run.seed),
    }


def update_shapes(settings: RunSettings) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor a client of this run sends (what the server expects), from the skeleton.

    LoRA: the adapter's A and B and the head; frozen-a nodes do not send A, whose shape the run's update space
    keeps to redraw it (:meth:`~fedfuse.settings.RunSettings.update_space`).
    """
    model = skeleton(settings)
    if settings.training.mode == "full":
        return {name: tuple(p.shape) for name, p in model.named_parameters()}
    peft_model = attach_lora(model, settings, 0)
    probe = {n.removeprefix(PEFT_PREFIX): p.detach() for n, p in peft_model.named_parameters()}
    return {name: tuple(t.shape) for name, t in lora_update(peft_model, probe).items()}
