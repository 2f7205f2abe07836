"""What every export needs: a run's checkpoint and settings, its rebuilt base model, and atomic writing.

The run's settings are read back from ``state.json`` with this version's :class:`RunSettings`, the
base model is rebuilt exactly as the run built it (``base_model(settings)``: same source, same
seeded head), and the chosen round's weights are the global model after that round.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedfuse.checkpoints import CheckpointWriteError as OutputError
from fedfuse.checkpoints import check_target
from fedfuse.models.loading import ModelLoadError
from fedfuse.server.run_checkpoint import (
    Checkpoint,
    CheckpointError,
    find_state,
    load_checkpoint,
)
from fedfuse.settings import RunSettings, SettingsError
from fedfuse.training.run_model import CAUSAL_TASKS, base_model

PROVENANCE_FILE = "fedfuse_export.json"
"""A small file in every export naming the run, round and checkpoint fingerprint it came from."""


class ExportError(ValueError):
    """A run cannot be exported as asked; the message names the folder, round or option at fault."""


@dataclass(frozen=True)
class RunRound:
    """One kept round of a run: where its state lives, its checkpoint and the run's settings."""

    state_path: Path
    checkpoint: Checkpoint
    settings: RunSettings

    @property
    def is_classifier(self) -> bool:
        """Whether the run trained a sequence classifier (else a causal LM)."""
        return self.settings.source.task not in CAUSAL_TASKS


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: the folder, its files and size, and for an adapter its rank and error.

    ``relative_error`` is ‖ΔW − B·A‖_F / ‖ΔW‖_F over all LoRA modules together; ``worst_module`` is
    the module with the largest relative error and that error.
    """

    out: Path
    kind: str
    round: int
    parameters: int
    nbytes: int
    files: tuple[str, ...]
    rank: int | None = None
    relative_error: float | None = None
    worst_module: tuple[str, float] | None = None
    num_labels: int | None = None


def open_run(run_dir: str | Path, round_number: int | None = None) -> RunRound:
    """The checkpoint of ``round_number`` (default: the last) of the run at ``run_dir`` and its settings.

    ``run_dir`` is a run folder, its ``checkpoint/`` folder or the ``state.json`` file.
    """
    path = Path(run_dir)
    if not path.exists():
        raise ExportError(f"run folder {path} does not exist")
    try:
        state_path = find_state(path)
        checkpoint = load_checkpoint(state_path, round_number)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    stored = checkpoint.settings
    if not isinstance(stored, dict) or not stored:
        raise ExportError(f"{state_path} holds no run settings: cannot tell which model the run trained")
    try:
        settings = RunSettings.from_run_config(stored)
    except SettingsError as exc:
        raise ExportError(
            f"the run settings in {state_path} do not fit this fedfuse version ({exc}): "
            "export with the fedfuse version that ran it"
        ) from None
    return RunRound(state_path, checkpoint, settings)


def run_base_model(run: RunRound) -> tuple[torch.nn.Module, Any]:
    """A fresh fp32 copy of the run's base model and its tokenizer, as the run built them."""
    try:
        return base_model(run.settings)
    except (ModelLoadError, SettingsError, OSError, ValueError) as exc:
        raise ExportError(f"cannot rebuild the run's base model {run.settings.source.model!r}: {exc}") from None


def label_names(run: RunRound, num_labels: int) -> tuple[str, ...]:
    """The run's class names in label order (``labels`` run config, built-in topics, or the data)."""
    from fedfuse.training.client_datasets import run_label_names

    try:
        names = tuple(run_label_names(run.settings))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read the run's label names: {exc}") from None
    if len(names) != num_labels:
        raise ExportError(
            f"the run's labels ({', '.join(names) or 'none'}) are {len(names)}, but its model has {num_labels} classes"
        )
    return names


def check_output(out: str | Path, force: bool) -> Path:
    """``out`` as a Path, refused at once when it exists (a non-empty folder or a file) and not ``force``."""
    try:
        return check_target(out, directory=True, overwrite=force)
    except OutputError as exc:
        raise ExportError(str(exc)) from None


def write_provenance(folder: Path, run: RunRound, kind: str, **extra: Any) -> None:
    """Write :data:`PROVENANCE_FILE`: which run, round and checkpoint an export holds."""
    document = {
        "kind": kind,
        "run": str(run.state_path.resolve()),
        "round": run.checkpoint.round,
        "model": run.settings.source.model,
        "task": run.settings.source.task,
        "mode": run.settings.training.mode,
        **extra,
    }
    (folder / PROVENANCE_FILE).write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")


def folder_contents(folder: Path) -> tuple[tuple[str, ...], int]:
    """The files of an exported folder (relative names, sorted) and their total size in bytes."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return tuple(str(p.relative_to(folder)) for p in files), sum(p.stat().st_size for p in files)
