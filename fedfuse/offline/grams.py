"""Gram matrices of a model's linear layers over a local calibration file, for an offline RegMean merge.

``fedfuse grams MODEL --data FILE --out grams.safetensors`` runs at the institution that owns the
data (the rows never leave it): it reads the file as a federated client would (HF ``datasets``, the
task's columns, the model's tokenizer), feeds ``batches`` seeded batches through the model and
writes Σ XᵀX for every linear weight, keyed by the weight's name. ``fedfuse merge --method regmean
--model M1 --gram G1 --model M2 --gram G2 …`` then merges with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from fedfuse.checkpoints import atomic_output
from fedfuse.settings import RunSettings
from fedfuse.training.client_datasets import NodeData, load_client_datasets
from fedfuse.training.gram import gram_matrices, gram_targets
from fedfuse.training.run_model import base_model


@dataclass(frozen=True)
class GramResult:
    """What :func:`compute_grams` wrote: the file, how many linear weights it covers, the rows it drew from."""

    path: Path
    layers: int
    rows: int


def compute_grams(
    model: str,
    data: str | Path,
    out: str | Path,
    *,
    task: str = "sft",
    batches: int = 16,
    batch_size: int = 8,
    max_length: int | str = "auto",
    seed: int = 0,
    force: bool = False,
) -> GramResult:
    """Write the Gram matrices of ``model``'s linear-layer inputs over ``data`` to ``out`` (safetensors, float32).

    ``model`` is a Hugging Face folder, a hub id or ``smollm2``; ``task`` (``sft``, ``lm`` or
    ``classify``) says how the rows are read and tokenized. Settings or data problems raise
    ``fedfuse.settings.SettingsError`` or ``fedfuse.data.DataError`` with a one-line message.
    """
    settings = RunSettings.from_run_config(
        {},
        model=model,
        task=task,
        mode="full",
        data=str(data),
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        validation_fraction=0.0,
        partition="iid",
    )
    network, tokenizer = base_model(settings)
    datasets = load_client_datasets(settings, tokenizer, partition_id=0, num_partitions=1, node=NodeData())
    names = [name for name, parameter in network.named_parameters() if parameter.dim() == 2]
    grams = gram_matrices(
        network,
        datasets.train,
        gram_targets(network, names),
        num_batches=batches,
        batch_size=batch_size,
        seed=seed,
    )
    with atomic_output(out, directory=False, overwrite=force) as temp:
        save_file(
            {name: gram.contiguous() for name, gram in sorted(grams.items())},
            str(temp),
            metadata={"fedfuse": "gram", "model": model, "data": str(data), "task": task, "batches": str(batches)},
        )
    return GramResult(Path(out), len(grams), len(datasets.train))
