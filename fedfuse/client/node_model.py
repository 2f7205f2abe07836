"""A node's copy of the run's model: the change to the base it was sent, at a model version, kept on its disk.

Each train or evaluate message carries a model sync (:func:`fedfuse.messages.read_sync`): nothing, the
deltas the node lacks, or the whole change. The node applies it to the change it holds
(:meth:`fedfuse.rounds.ModelChange.catch_up`, the same arithmetic as the server's), refuses a delta for
another version than it holds (:class:`~fedfuse.rounds.VersionMismatch`: the server then re-syncs it), and
keeps the result at ``<state-dir>/<run key>/<node>/model/change.safetensors`` (the version in its
metadata), written atomically — so nothing large lives in Flower's ``Context`` (which a simulation
keeps in the server's process) and a restarted node still holds its version.
"""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import Context, RecordDict
from safetensors import safe_open
from safetensors.torch import save_file

from fedfuse.checkpoints import atomic_output
from fedfuse.client.residuals import ResidualFiles
from fedfuse.messages import read_sync
from fedfuse.rounds import ModelChange

MODEL_FILE = "change.safetensors"
VERSION_KEY = "fedfuse.version"


def model_folder(context: Context, run_key: str, node: str) -> Path:
    """Where ``node`` keeps the run's model change (beside its residuals, keyed by run)."""
    return ResidualFiles.of(context, run_key or "run", node, "model").folder


def load_change(folder: Path) -> ModelChange | None:
    """The change kept in ``folder``, or None when the node holds none (or an unreadable file)."""
    path = folder / MODEL_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            version = (handle.metadata() or {}).get(VERSION_KEY, "")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 — safe_open has no iterator
    except (OSError, ValueError, RuntimeError):
        return None
    return ModelChange(version, tensors) if version else None


def save_change(folder: Path, change: ModelChange) -> None:
    """Keep ``change`` and its version in ``folder`` (atomically: a crash leaves the previous version whole)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    tensors = {name: t.contiguous() for name, t in change.tensors.items()}
    with atomic_output(folder / MODEL_FILE, directory=False, overwrite=True) as temp:
        save_file(tensors, str(temp), metadata={VERSION_KEY: change.version})


def synced_change(content: RecordDict, folder: Path) -> ModelChange:
    """The node's change brought to the message's model version (kept on disk when it moved).

    Raises :class:`~fedfuse.rounds.VersionMismatch` when the message's deltas do not apply to what the
    node holds, and ``ValueError`` when the message carries no model sync.
    """
    sync = read_sync(content)
    if sync is None:
        raise ValueError("the message carries no model sync (a server from before model versions?)")
    change = load_change(folder) or ModelChange("")
    before = change.version
    change.catch_up(sync)
    if change.version != before or sync.state is not None:
        save_change(folder, change)
    return change


def round_weights(base: dict[str, torch.Tensor], change: ModelChange) -> dict[str, torch.Tensor]:
    """The round's values of the parameters the run changed: base + change (in each base tensor's dtype)."""
    unknown = sorted(set(change.tensors) - set(base))
    if unknown:
        raise ValueError(f"the model change names parameters the model lacks: {', '.join(unknown[:3])}")
    return {name: (base[name].float() + delta).to(base[name].dtype) for name, delta in change.tensors.items()}
