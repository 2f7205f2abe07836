"""``fedfuse export --adapter``: a LoRA run's change to the base model as a PEFT LoRA adapter.

For every LoRA target module the run's global weight after the round differs from the base by
ΔW = W_round − W_base, a sum of many clients' rank-r updates over the rounds, so its rank can reach
rounds × clients × r. The adapter holds the best rank-``rank`` factors of each ΔW (truncated SVD,
:func:`fedfuse.algebra.svd_refactor`) with ``lora_alpha = r``, so PEFT's scale alpha/r is 1 and
B·A is the truncated ΔW itself. The classification head, trained fully, travels whole in
``modules_to_save``, and so does any other module a plain ``from_pretrained`` of the base would
initialise at random (a pooler or pre-classifier the base checkpoint lacks, which fedfuse seeded).
Nothing else may have changed (else the adapter would lose it: an error).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from peft import LoraConfig, get_peft_model

from fedfuse.algebra import svd_refactor
from fedfuse.checkpoints import atomic_output
from fedfuse.export.run import (
    ExportError,
    ExportResult,
    RunRound,
    check_output,
    folder_contents,
    open_run,
    run_base_model,
    write_provenance,
)
from fedfuse.models.loading import resolve_model_source
from fedfuse.settings import SettingsError
from fedfuse.training.run_model import (
    HEAD_PREFIXES,
    PEFT_PREFIX,
    head_names,
    lora_layers,
    target_modules_for,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

SAVED = ".modules_to_save.default."


def export_adapter(
    run_dir: str | Path,
    out: str | Path,
    *,
    rank: int,
    round_number: int | None = None,
    force: bool = False,
) -> ExportResult:
    """Write round ``round_number`` (default: the last kept) of a LoRA run as a rank-``rank`` PEFT adapter.

    ``PeftModel.from_pretrained(base, out)`` on the run's base model (a classifier loaded with the
    run's number of labels) gives the exported global model up to the SVD truncation, whose relative
    Frobenius error the result reports (0 up to float rounding when ``rank`` reaches ΔW's rank).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ExportError(f"--rank must be an integer >= 1, got {rank!r}")
    run = open_run(run_dir, round_number)
    if run.settings.training.mode != "lora":
        raise ExportError(
            f"--adapter needs a LoRA run: {run.state_path} is a mode '{run.settings.training.mode}' run "
            "(export the full model without --adapter)"
        )
    out = check_output(out, force)
    model, tokenizer = run_base_model(run)
    model_config = cast("PretrainedConfig", model.config)  # torch types module attributes as Tensor | Module
    try:
        targets = target_modules_for(model, run.settings)
    except SettingsError as exc:
        raise ExportError(f"{run.state_path}: {exc}") from None
    base = {name: p.detach() for name, p in model.named_parameters()}
    heads = head_names(model)
    source = resolve_model_source(run.settings.source.model)
    saved = sorted({p.rstrip(".") for p in HEAD_PREFIXES if any(h.startswith(p) for h in heads)})
    if run.is_classifier:
        saved += _fresh_modules(source, _num_labels(run, model_config), set(base), heads, targets)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
        modules_to_save=saved or None,
        task_type="SEQ_CLS" if run.is_classifier else "CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        peft_model = get_peft_model(model, config)
    adapter_config = cast(LoraConfig, peft_model.peft_config["default"])  # the config passed in: a LoraConfig
    adapter_config.base_model_name_or_path = str(source)
    if adapter_config.modules_to_save:  # PEFT adds classifier/score again for SEQ_CLS
        adapter_config.modules_to_save = sorted(set(adapter_config.modules_to_save))
    modules = sorted(lora_layers(peft_model))
    weights = run.checkpoint.absolute_weights(base)
    _check_changes(run, weights, base, modules, heads)
    deltas = {m: weights.get(m + ".weight", base[m + ".weight"]).float() - base[m + ".weight"].float() for m in modules}
    narrowest = min(modules, key=lambda m: min(deltas[m].shape))
    limit = min(deltas[narrowest].shape)
    if rank > limit:
        rows, cols = deltas[narrowest].shape
        raise ExportError(f"--rank {rank} is too large: LoRA module {narrowest} is {rows}×{cols}, so use 1..{limit}")
    factors = {m: svd_refactor(deltas[m], rank) for m in modules}
    parameters = _set_adapter(peft_model, factors, weights, base)
    with atomic_output(out, directory=True, overwrite=force) as temp:
        peft_model.save_pretrained(str(temp), save_embedding_layers=False)
        tokenizer.save_pretrained(temp)
        error, worst = _errors(factors, deltas)
        write_provenance(temp, run, "adapter", rank=rank, relative_error=error, base_model=str(source))
    files, nbytes = folder_contents(out)
    num_labels = _num_labels(run, model_config) if run.is_classifier else None
    return ExportResult(out, "adapter", run.checkpoint.round, parameters, nbytes, files, rank, error, worst, num_labels)


def _num_labels(run: RunRound, config: PretrainedConfig) -> int:
    """The classifier's number of labels (transformers types it ``int | None``)."""
    if config.num_labels is None:
        raise ExportError(f"{run.state_path}: the run's classifier has no num_labels in its config")
    return int(config.num_labels)


def _fresh_modules(
    source: Path | str, num_labels: int, parameters: set[str], heads: list[str], targets: list[str]
) -> list[str]:
    """Modules outside the head that ``from_pretrained(source)`` would initialise at random (not in its checkpoint).

    fedfuse's base seeded them, so a user's freshly loaded base differs there: the adapter carries them.
    """
    from transformers import AutoModelForSequenceClassification

    local = {"local_files_only": True} if isinstance(source, Path) else {}
    try:
        with torch.random.fork_rng(devices=[]):
            _, info = AutoModelForSequenceClassification.from_pretrained(
                str(source), num_labels=num_labels, output_loading_info=True, **local
            )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ExportError(f"cannot load the base model {source} as a user of the adapter would: {exc}") from None
    missing = [name for name in info.get("missing_keys", ()) if name in parameters and name not in heads]
    modules = sorted({name.rsplit(".", 1)[0] for name in missing})
    clash = [m for m in modules if m.rsplit(".", 1)[-1] in targets]
    if clash:
        raise ExportError(f"LoRA modules {', '.join(clash[:3])} are missing from the base checkpoint {source}")
    return modules


def _check_changes(
    run: RunRound, weights: dict[str, torch.Tensor], base: dict[str, torch.Tensor], modules: list[str], heads: list[str]
) -> None:
    """Refuse a round that changed parameters an adapter cannot carry (outside LoRA targets and head)."""
    unknown = sorted(set(weights) - set(base))
    if unknown:
        raise ExportError(f"{run.state_path}: round weights do not fit the run's base model (unknown {unknown[:3]})")
    carried = {m + ".weight" for m in modules} | set(heads)
    changed = sorted(
        name
        for name, tensor in weights.items()
        if name not in carried and not torch.equal(tensor.to(base[name].dtype), base[name])
    )
    if changed:
        raise ExportError(
            f"round {run.checkpoint.round} changed {len(changed)} parameter(s) outside the LoRA modules and the head "
            f"(first {', '.join(changed[:3])}): an adapter would lose them; export the full model without --adapter"
        )


def _set_adapter(
    peft_model: torch.nn.Module, factors: dict, weights: dict[str, torch.Tensor], base: dict[str, torch.Tensor]
) -> int:
    """Put the SVD factors into the LoRA layers and the round's head into ``modules_to_save``; returns their size."""
    count = 0
    with torch.no_grad():
        for module, layer in lora_layers(peft_model).items():
            if not math.isclose(layer.scaling["default"], 1.0):
                raise ExportError(f"{module}: LoRA scale {layer.scaling['default']} where 1 was set")
            cast(torch.Tensor, layer.lora_A["default"].weight).copy_(factors[module].lora_a)
            cast(torch.Tensor, layer.lora_B["default"].weight).copy_(factors[module].lora_b)
            count += factors[module].lora_a.numel() + factors[module].lora_b.numel()
        for name, parameter in peft_model.named_parameters():
            if SAVED in name:
                plain = name.removeprefix(PEFT_PREFIX).replace(SAVED, ".")
                parameter.copy_(weights.get(plain, base[plain]))
                count += parameter.numel()
    return count


def _errors(factors: dict, deltas: dict[str, torch.Tensor]) -> tuple[float, tuple[str, float]]:
    """‖ΔW − B·A‖_F / ‖ΔW‖_F over all modules, and the module with the largest relative error."""
    norms = {m: torch.linalg.matrix_norm(deltas[m]).item() for m in deltas}
    residual = math.sqrt(sum((factors[m].relative_error * norms[m]) ** 2 for m in deltas))
    total = math.sqrt(sum(n**2 for n in norms.values()))
    worst = max(deltas, key=lambda m: factors[m].relative_error)
    return (residual / total if total > 0 else 0.0), (worst, factors[worst].relative_error)
