"""Error-feedback residuals between rounds: in ``Context.state``, and on the node's disk, keyed by run.

The fedfuse ClientApp (and each tier-gateway member) and ``task_vector_mod`` keep their residuals in
``Context.state``, tagged with the round they were left by. The ClientApp also writes them to
``<state-dir>/<run key>/<node>/<store>/round-NNNN.safetensors`` (node config ``state-dir``, else
``$FEDFUSE_STATE_DIR``, else ``~/.cache/fedfuse/node-state``), so a run resumed after the server was
killed — a new Flower run with a new ``Context`` — continues with the residual of the round it
resumes after, and the resumed run sums exactly what the uninterrupted one did. The two newest
rounds are kept; folders are private to the node's user (mode 0700).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from safetensors.torch import load_file, save_file

from fedfuse.algebra import Sparsifier
from fedfuse.checkpoints import atomic_output
from fedfuse.client.error_feedback import ErrorFeedback

STATE_DIR_ENV = "FEDFUSE_STATE_DIR"
KEPT_ROUNDS = 2
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def node_state_dir(context: Context) -> Path:
    """Where this node keeps state between runs: node config ``state-dir``, ``$FEDFUSE_STATE_DIR`` or the cache."""
    configured = str(context.node_config.get("state-dir", "") or os.environ.get(STATE_DIR_ENV, ""))
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "fedfuse" / "node-state"


@dataclass(frozen=True)
class ResidualFiles:
    """One residual store's files for one run: a safetensors file per round, the newest two kept."""

    folder: Path

    @classmethod
    def of(cls, context: Context, run_key: str, node: str, record: str) -> ResidualFiles:
        """The files of store ``record`` of ``node`` in run ``run_key`` (names made safe for paths)."""
        parts = [_UNSAFE.sub("_", part) or "_" for part in (run_key, node, record)]
        return cls(node_state_dir(context).joinpath(*parts))

    def path(self, round_number: int) -> Path:
        return self.folder / f"round-{round_number:04d}.safetensors"

    def load(self, round_number: int) -> dict[str, torch.Tensor] | None:
        """The residual left by round ``round_number``, or None when this node has none."""
        path = self.path(round_number)
        return load_file(str(path)) if path.is_file() else None

    def save(self, round_number: int, residual: dict[str, torch.Tensor]) -> None:
        """Write the residual left by ``round_number`` atomically, then drop files older than the kept rounds."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        with atomic_output(self.path(round_number), directory=False, overwrite=True) as temp:
            save_file({name: t.contiguous() for name, t in residual.items()}, str(temp))
        for old in sorted(self.folder.glob("round-*.safetensors"))[:-KEPT_ROUNDS]:
            if old != self.path(round_number):
                old.unlink(missing_ok=True)


def _round_tag(record: str) -> str:
    return f"{record}.round"


def restore_feedback(
    context: Context,
    record: str,
    sparsifier: Sparsifier,
    *,
    round_number: int | None = None,
    files: ResidualFiles | None = None,
) -> ErrorFeedback:
    """The residual store under ``record`` (empty in a node's first round).

    With ``round_number``, only the residual left by the previous round counts: the one in
    ``context.state`` if it is that round's, else the one in ``files``.
    """
    feedback = ErrorFeedback(sparsifier)
    stored = context.state.array_records.get(record)
    tag = context.state.config_records.get(_round_tag(record))
    previous = None if round_number is None else round_number - 1
    if stored is not None and (previous is None or (tag is not None and tag.get("round") == previous)):
        feedback.load_state_dict(stored.to_torch_state_dict())
    elif files is not None and previous is not None:
        residual = files.load(previous)
        if residual is not None:
            feedback.load_state_dict(residual)
    return feedback


def keep_feedback(
    context: Context,
    record: str,
    feedback: ErrorFeedback,
    *,
    round_number: int | None = None,
    files: ResidualFiles | None = None,
) -> None:
    """Store ``feedback``'s residual under ``record`` for the node's next round (and on disk with ``files``)."""
    residual = feedback.state_dict()
    context.state.array_records[record] = ArrayRecord(residual)
    if round_number is not None:
        context.state.config_records[_round_tag(record)] = ConfigRecord({"round": round_number})
        if files is not None:
            files.save(round_number, residual)


@dataclass(frozen=True)
class ResidualSlot:
    """Where one residual store of a node lives for a round: its ``Context.state`` record and, keyed by run, its files.

    Without ``round_number`` the stored residual counts whatever round left it (``task_vector_mod``'s
    default); with it only the previous round's does, and ``files`` (given a run key) keep it on disk.
    """

    record: str
    round_number: int | None = None
    files: ResidualFiles | None = None

    @classmethod
    def for_round(cls, context: Context, record: str, *, round_number: int, run_key: str, node: str) -> ResidualSlot:
        """The store ``record`` of ``node`` for ``round_number``, on disk when the server names a ``run_key``."""
        files = ResidualFiles.of(context, run_key, node, record) if run_key else None
        return cls(record, round_number, files)

    def restore(self, context: Context, sparsifier: Sparsifier) -> ErrorFeedback:
        """The residual store left by the previous round (empty when there is none)."""
        return restore_feedback(context, self.record, sparsifier, round_number=self.round_number, files=self.files)

    def keep(self, context: Context, feedback: ErrorFeedback) -> None:
        """Keep ``feedback``'s residual for the node's next round."""
        keep_feedback(context, self.record, feedback, round_number=self.round_number, files=self.files)
