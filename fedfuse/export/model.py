"""``fedfuse export``: a run's global model after one round as a Hugging Face model folder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

from fedfuse.checkpoints import atomic_output
from fedfuse.export.run import (
    ExportError,
    ExportResult,
    check_output,
    folder_contents,
    label_names,
    open_run,
    run_base_model,
    write_provenance,
)
from fedfuse.training.run_model import global_state, load_global_state
from fedfuse.wire import fingerprint

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def export_model(
    run_dir: str | Path, out: str | Path, *, round_number: int | None = None, force: bool = False
) -> ExportResult:
    """Write round ``round_number`` (default: the last kept) of the run at ``run_dir`` to folder ``out``.

    The folder holds ``config.json``, ``model.safetensors`` and the tokenizer, so
    ``AutoModelForSequenceClassification`` (classifier runs, with ``id2label`` from the run's labels)
    or ``AutoModelForCausalLM`` (lm/sft runs) ``.from_pretrained(out)`` loads the global model.
    ``out`` is written atomically; an existing non-empty folder needs ``force``.
    """
    run = open_run(run_dir, round_number)
    out = check_output(out, force)
    model, tokenizer = run_base_model(run)
    try:
        load_global_state(model, run.checkpoint.absolute_weights(global_state(model)))
    except ValueError as exc:
        raise ExportError(f"{run.state_path}: {exc}") from None
    pretrained = cast("PreTrainedModel", model)  # torch types module attributes as Tensor | Module
    num_labels = None
    if run.is_classifier:
        labels = pretrained.config.num_labels
        if labels is None:
            raise ExportError(f"{run.state_path}: the run's classifier has no num_labels in its config")
        num_labels = int(labels)
        names = label_names(run, num_labels)
        pretrained.config.id2label = dict(enumerate(names))
        pretrained.config.label2id = {name: index for index, name in enumerate(names)}
    with atomic_output(out, directory=True, overwrite=force) as temp:
        pretrained.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
        write_provenance(temp, run, "model", fingerprint=fingerprint(run.checkpoint.weights))
    files, nbytes = folder_contents(out)
    parameters = sum(p.numel() for p in model.parameters())
    return ExportResult(out, "model", run.checkpoint.round, parameters, nbytes, files, num_labels=num_labels)
