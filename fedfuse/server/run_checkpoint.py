"""Round checkpoints: the global weights (safetensors) and the run's JSON state, written atomically.

fedfuse's own runs store the run's *change* to the base model (``"weights_kind": "change"``, with its
model ``"version"``): in LoRA runs only the adapted matrices and the head, never a copy of the base.

Layout of ``<output-dir>/checkpoint/``: ``weights-round-NNNN.safetensors`` and ``state.json``, which
names the weights file of the last finished round (``"weights"``, what resume reads) and every round
still kept (``"kept"``: round → file, with ``"kept_fingerprints"``), so an export can pick one.
What a killed write left behind (temporary files, a version moved aside) is cleaned up by the next
save or load; a damaged ``state.json`` is a :class:`CheckpointError` naming the file and the field.
``keep`` rounds are kept (1 = the last only, 0 = all). Weights are written to a temporary file and
renamed, then ``state.json`` is replaced the same way, and only then are weights files that left the
kept set deleted: a crash at any moment leaves ``state.json`` pointing at complete weights files.
A run with a server optimizer also writes its state (m, v per tensor) as ``optimizer-round-NNNN.safetensors``
beside the weights, before ``state.json`` names it (``"optimizer"``: file, fingerprint, steps); only the
last round's is kept, which is what resume continues from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedfuse.checkpoints import atomic_output, recover_interrupted_writes
from fedfuse.wire import fingerprint

STATE_FILE = "state.json"
STATE_FIELDS: dict[str, tuple[type, ...]] = {
    "round": (int,),
    "weights": (str,),
    "fingerprint": (str,),
    "settings": (dict,),
    "history": (dict,),
}
"""The fields every ``state.json`` must have, with their JSON types (checked before any is used)."""
CHECKPOINT_DIR = "checkpoint"
UNREADABLE = (OSError, ValueError, RuntimeError, SafetensorError)
"""What reading a missing, truncated or damaged safetensors file raises."""
FORMAT = "fedfuse-checkpoint-1"
WEIGHT_KINDS = ("weights", "change")
"""What a checkpoint's weights file holds: the weights, or the run's change to the base model."""


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the run being resumed."""


@dataclass(frozen=True)
class Checkpoint:
    """A finished round: its number, the global weights after it, and the run history so far."""

    round: int
    weights: dict[str, torch.Tensor]
    history: dict[str, Any]
    settings: dict[str, Any]
    kept: tuple[int, ...] = ()
    """Every round whose weights the checkpoint folder still holds, ascending."""
    optimizer: dict[str, torch.Tensor] | None = None
    """The server optimizer's state after this round (None: the run has none, or an earlier round was read)."""
    optimizer_steps: int = 0
    kind: str = "weights"
    """``"change"``: ``weights`` is the run's change to the base model (fedfuse's own runs); ``"weights"``: the
    weights themselves (FedMerge apps, checkpoints written before model versions)."""
    version: str = ""
    """The model version of a change (what a resumed run continues the version chain from)."""

    def absolute_weights(self, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The round's weights of the parameters it changed: base + change, or the stored weights as they are."""
        if self.kind != "change":
            return self.weights
        return {name: (base[name].float() + change).to(base[name].dtype) for name, change in self.weights.items()}

    def change_from(self, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The run's change to ``base`` (a weights checkpoint: its entries that differ from the base, as float32)."""
        if self.kind == "change":
            return self.weights
        return {
            name: weight.float() - base[name].float()
            for name, weight in self.weights.items()
            if name in base and not torch.equal(weight, base[name])
        }


def _replace_atomically(target: Path, write: Callable[[Path], object]) -> None:
    """``write`` a temporary file, flush it to disk, then rename it onto ``target`` (see atomic_output)."""
    with atomic_output(target, directory=False, overwrite=True) as temp:
        write(temp)
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())


def weights_file(round_number: int) -> str:
    """The weights file name of a round, ``weights-round-NNNN.safetensors``."""
    return f"weights-round-{round_number:04d}.safetensors"


def optimizer_file(round_number: int) -> str:
    """The server optimizer's state file of a round, ``optimizer-round-NNNN.safetensors``."""
    return f"optimizer-round-{round_number:04d}.safetensors"


def save_checkpoint(
    run_dir: str | Path,
    round_number: int,
    weights: dict[str, torch.Tensor],
    history: dict[str, Any],
    settings: dict[str, Any],
    keep: int = 1,
    optimizer: dict[str, torch.Tensor] | None = None,
    optimizer_steps: int = 0,
    *,
    kind: str = "weights",
    version: str = "",
) -> Path:
    """Write round ``round_number``'s checkpoint under ``run_dir/checkpoint``; returns ``state.json``'s path.

    Parameters
    ----------
    keep : int
        Rounds of weights to keep: 1 = only this round (the default), 0 = every round, N = the last N.
        Kept rounds later than ``round_number`` (left by an earlier run in the same folder) are dropped.
    optimizer, optimizer_steps : dict of str to Tensor, int
        The server optimizer's state after this round and its step count (None: the run has none).
    kind, version : str, str
        ``"change"`` when ``weights`` is the run's change to the base model at model ``version``.
    """
    if kind not in WEIGHT_KINDS:
        raise ValueError(f"kind must be one of {', '.join(WEIGHT_KINDS)}, got {kind!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise ValueError(f"keep must be an integer >= 0 (0 = every round), got {keep!r}")
    folder = Path(run_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    recover_interrupted_writes(folder)
    state_path = folder / STATE_FILE
    previous = _read_state(state_path) if state_path.is_file() else None
    before = _kept(previous) if previous is not None else {}
    previous_optimizer = _optimizer_entry(previous, state_path)[0] if previous is not None else ""
    weights_name = weights_file(round_number)
    contiguous = {name: tensor.detach().contiguous().cpu() for name, tensor in weights.items()}
    digest = fingerprint(contiguous)
    _replace_atomically(folder / weights_name, lambda path: save_file(contiguous, str(path)))
    optimizer_entry, optimizer_name = None, ""
    if optimizer is not None:
        moments = {name: tensor.detach().contiguous().cpu() for name, tensor in optimizer.items()}
        optimizer_name = optimizer_file(round_number)
        _replace_atomically(folder / optimizer_name, lambda path: save_file(moments, str(path)))
        optimizer_entry = {"file": optimizer_name, "fingerprint": fingerprint(moments), "steps": int(optimizer_steps)}
    kept = {r: entry for r, entry in before.items() if r < round_number}
    kept[round_number] = (weights_name, digest)
    if keep:
        kept = {r: kept[r] for r in sorted(kept)[-keep:]}
    document = {
        "format": FORMAT,
        "round": round_number,
        "weights": weights_name,
        "fingerprint": digest,
        "kept": {str(r): name for r, (name, _) in sorted(kept.items())},
        "kept_fingerprints": {str(r): fp for r, (_, fp) in sorted(kept.items())},
        "settings": settings,
        "history": history,
        "weights_kind": kind,
        "version": version,
        **({"optimizer": optimizer_entry} if optimizer_entry is not None else {}),
    }
    _replace_atomically(state_path, lambda path: path.write_text(json.dumps(document, indent=1, sort_keys=True)))
    still_used = {name for name, _ in kept.values()} | {optimizer_name}
    for name in [name for name, _ in before.values()] + [previous_optimizer]:
        if name and name not in still_used and (folder / name).is_file():
            (folder / name).unlink()
    return state_path


def _optimizer_entry(document: dict[str, Any], path: Path) -> tuple[str, str, int]:
    """(file, fingerprint, steps) of a state's server optimizer, ``("", "", 0)`` without one."""
    entry = document.get("optimizer")
    if entry is None:
        return "", "", 0
    if not (
        isinstance(entry, dict)
        and isinstance(entry.get("file"), str)
        and isinstance(entry.get("fingerprint"), str)
        and isinstance(entry.get("steps"), int)
        and not isinstance(entry.get("steps"), bool)
    ):
        raise CheckpointError(f"damaged checkpoint {path}: field 'optimizer' must hold file, fingerprint and steps")
    return entry["file"], entry["fingerprint"], entry["steps"]


def _kept(document: dict[str, Any]) -> dict[int, tuple[str, str | None]]:
    """Round → (weights file, fingerprint) of every kept round; the last round's entry is authoritative.

    A state written before rounds were kept (no ``"kept"``) holds the last round only.
    """
    digests = document.get("kept_fingerprints", {})
    kept = {int(r): (name, digests.get(r)) for r, name in document.get("kept", {}).items()}
    kept[int(document["round"])] = (document["weights"], document["fingerprint"])
    return kept


def _read_state(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint state {path}: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fedfuse checkpoint (format {FORMAT})")
    for field, kinds in STATE_FIELDS.items():
        value = document.get(field)
        if field not in document or not isinstance(value, kinds) or isinstance(value, bool):
            expected = " or ".join(kind.__name__ for kind in kinds)
            raise CheckpointError(f"damaged checkpoint {path}: field {field!r} is missing or not a {expected}")
    for field in ("kept", "kept_fingerprints"):
        entries = document.get(field, {})
        if not isinstance(entries, dict) or not all(
            isinstance(v, str) and isinstance(k, str) and k.isdigit() for k, v in entries.items()
        ):
            raise CheckpointError(f"damaged checkpoint {path}: field {field!r} must map round numbers to strings")
    _optimizer_entry(document, path)
    return document


def find_state(path: str | Path) -> Path:
    """The ``state.json`` of a run folder, its ``checkpoint/`` folder, or the file itself."""
    path = Path(path)
    for candidate in (path, path / STATE_FILE, path / CHECKPOINT_DIR / STATE_FILE):
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"no checkpoint at {path} (looked for {STATE_FILE} and {CHECKPOINT_DIR}/{STATE_FILE})")


def load_checkpoint(path: str | Path, round_number: int | None = None) -> Checkpoint:
    """Read a checkpoint from a run folder, its ``checkpoint/`` folder or its ``state.json``.

    ``round_number`` picks a kept round (default: the last one, what resume continues from); a round
    whose weights were not kept is an error that lists the kept rounds. ``history`` is the run's
    history as of the last round, whichever round is read.
    """
    state_path = find_state(path)
    recover_interrupted_writes(state_path.parent)
    document = _read_state(state_path)
    kept = _kept(document)
    if round_number is None:
        round_number = int(document["round"])
    if round_number not in kept:
        listed = ", ".join(str(r) for r in sorted(kept))
        raise CheckpointError(
            f"round {round_number} is not kept in {state_path}: kept rounds {listed} "
            "(run with keep-checkpoints=0 to keep every round)"
        )
    name, digest = kept[round_number]
    weights_path = state_path.parent / name
    try:
        weights = load_file(str(weights_path))
    except UNREADABLE as exc:
        raise CheckpointError(f"cannot read checkpoint weights {weights_path}: {exc}") from exc
    if digest is None or fingerprint(weights) != digest:
        raise CheckpointError(f"checkpoint weights {weights_path} do not match the fingerprint in {state_path}")
    optimizer, steps = None, 0
    optimizer_name, optimizer_digest, optimizer_steps = _optimizer_entry(document, state_path)
    if optimizer_name and round_number == int(document["round"]):
        optimizer_path = state_path.parent / optimizer_name
        try:
            optimizer = load_file(str(optimizer_path))
        except UNREADABLE as exc:
            raise CheckpointError(f"cannot read checkpoint optimizer state {optimizer_path}: {exc}") from exc
        if fingerprint(optimizer) != optimizer_digest:
            raise CheckpointError(f"optimizer state {optimizer_path} does not match the fingerprint in {state_path}")
        steps = optimizer_steps
    kind = document.get("weights_kind", "weights")
    if kind not in WEIGHT_KINDS:
        raise CheckpointError(f"damaged checkpoint {state_path}: weights_kind {kind!r} is not one of {WEIGHT_KINDS}")
    return Checkpoint(
        round_number,
        weights,
        document["history"],
        document["settings"],
        tuple(sorted(kept)),
        optimizer,
        steps,
        kind,
        str(document.get("version", "")) if round_number == int(document["round"]) else "",
    )
