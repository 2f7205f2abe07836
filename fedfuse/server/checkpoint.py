"""Round checkpoints: the global weights (safetensors) and the run's JSON state, written atomically.

Layout of ``<output-dir>/checkpoint/``: ``weights-round-NNNN.safetensors`` and ``state.json``, which
names the weights file of the last finished round. Weights are written to a temporary file and
renamed, then ``state.json`` is replaced the same way, then the previous weights file is deleted:
a crash at any moment leaves ``state.json`` pointing at a complete weights file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedfuse.checkpoints import atomic_output
from fedfuse.wire import fingerprint

STATE_FILE = "state.json"
CHECKPOINT_DIR = "checkpoint"
FORMAT = "fedfuse-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the run being resumed."""


@dataclass(frozen=True)
class Checkpoint:
    """A finished round: its number, the global weights after it, and the run history so far."""

    round: int
    weights: dict[str, torch.Tensor]
    history: dict[str, Any]
    settings: dict[str, Any]


def _replace_atomically(target: Path, write: Callable[[Path], object]) -> None:
    """``write`` a temporary file, flush it to disk, then rename it onto ``target`` (see atomic_output)."""
    with atomic_output(target, directory=False, overwrite=True) as temp:
        write(temp)
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())


def save_checkpoint(
    run_dir: str | Path,
    round_number: int,
    weights: dict[str, torch.Tensor],
    history: dict[str, Any],
    settings: dict[str, Any],
) -> Path:
    """Write round ``round_number``'s checkpoint under ``run_dir/checkpoint``; returns ``state.json``'s path."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    state_path = folder / STATE_FILE
    previous = _read_state(state_path).get("weights") if state_path.is_file() else None
    weights_name = f"weights-round-{round_number:04d}.safetensors"
    contiguous = {name: tensor.detach().contiguous().cpu() for name, tensor in weights.items()}
    _replace_atomically(folder / weights_name, lambda path: save_file(contiguous, str(path)))
    document = {
        "format": FORMAT,
        "round": round_number,
        "weights": weights_name,
        "fingerprint": fingerprint(contiguous),
        "settings": settings,
        "history": history,
    }
    _replace_atomically(state_path, lambda path: path.write_text(json.dumps(document, indent=1, sort_keys=True)))
    if previous and previous != weights_name and (folder / previous).is_file():
        (folder / previous).unlink()
    return state_path


def _read_state(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint state {path}: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fedfuse checkpoint (format {FORMAT})")
    return document


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint from a run folder, its ``checkpoint/`` folder or its ``state.json``."""
    path = Path(path)
    for candidate in (path, path / STATE_FILE, path / CHECKPOINT_DIR / STATE_FILE):
        if candidate.is_file():
            state_path = candidate
            break
    else:
        raise CheckpointError(f"no checkpoint at {path} (looked for {STATE_FILE} and {CHECKPOINT_DIR}/{STATE_FILE})")
    document = _read_state(state_path)
    weights_path = state_path.parent / document["weights"]
    try:
        weights = load_file(str(weights_path))
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read checkpoint weights {weights_path}: {exc}") from exc
    if fingerprint(weights) != document["fingerprint"]:
        raise CheckpointError(f"checkpoint weights {weights_path} do not match the fingerprint in {state_path}")
    return Checkpoint(int(document["round"]), weights, document["history"], document["settings"])
