"""Model versions: a hash chain from the run's base over the broadcast deltas, and bringing a node up to date.

The server and every node hold the run's *change* to the base model (:class:`ModelChange`): zero at
version 0 (:func:`base_version`, named by what names the base), then each round's :class:`Delta` added
by :func:`~fedfuse.rounds.broadcast.apply_delta`. Each broadcast names the version it applies to and
the version it makes, ``next = H(previous, the delta's arrays)``, so two holders at the same version
applied the same deltas in the same order, and an update names the version it was trained from.

The server keeps the deltas while together they weigh less than the whole change (:class:`VersionLog`) and
the version it last sent each node: a node that missed rounds gets the deltas it lacks, or the whole
change when that is cheaper; a node whose version the server does not know (new, restarted, refused)
gets the whole change. A node that holds another version than a delta applies to refuses it
(:class:`VersionMismatch`) and the server forgets what it thought the node held, so it is re-synced.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fedfuse.rounds.broadcast import Delta, apply_delta
from fedfuse.wire import fingerprint

VERSION_PREFIX = "v:"


def base_version(identity: Mapping[str, object]) -> str:
    """Version 0 of a run: a hash of what names its base model (model, task, labels, seed, trained layout)."""
    text = json.dumps({str(key): str(value) for key, value in identity.items()}, sort_keys=True)
    return VERSION_PREFIX + hashlib.sha256(b"fedfuse-base\n" + text.encode()).hexdigest()


def next_version(previous: str, delta: Delta) -> str:
    """The version ``delta`` makes from ``previous``: H(previous, the fingerprint of the arrays sent)."""
    digest = hashlib.sha256(previous.encode() + b"\n" + fingerprint(delta.arrays()).encode())
    return VERSION_PREFIX + digest.hexdigest()


class VersionMismatch(ValueError):
    """A node was sent a delta for another version than it holds (it must be re-synced)."""

    reason = "version_mismatch"


@dataclass(frozen=True)
class Step:
    """One broadcast delta and the versions it leads from and to."""

    source: str
    target: str
    delta: Delta


@dataclass(frozen=True)
class Sync:
    """What brings a node to ``version``: nothing (it is there), the steps it lacks, or the whole change."""

    version: str
    steps: tuple[Step, ...] = ()
    state: Mapping[str, torch.Tensor] | None = None
    """The whole change at ``version`` (float32), for a node whose version the server does not know."""

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays this sync sends."""
        if self.state is not None:
            return sum(t.numel() * t.element_size() for t in self.state.values())
        return sum(step.delta.nbytes for step in self.steps)


@dataclass
class ModelChange:
    """The run's change to the base model by parameter name (float32) and the version it is at."""

    version: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of the change (what a dense re-sync sends)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def advance(self, delta: Delta) -> Step:
        """Apply ``delta`` in place and move to the version it makes; the step taken."""
        target = next_version(self.version, delta)
        apply_delta(self.tensors, delta)
        step = Step(self.version, target, delta)
        self.version = target
        return step

    def catch_up(self, sync: Sync) -> None:
        """Reach ``sync.version``: take its whole change, or apply its steps (``VersionMismatch`` if they don't fit)."""
        if sync.state is not None:
            self.tensors = {name: t.to(torch.float32).clone() for name, t in sync.state.items()}
            self.version = sync.version
            return
        for step in sync.steps:
            if step.source != self.version:
                raise VersionMismatch(
                    f"version_mismatch: this node holds model version {_short(self.version)}, the broadcast "
                    f"applies to {_short(step.source)} (the server will re-sync it)"
                )
            if next_version(step.source, step.delta) != step.target:
                raise VersionMismatch(f"version_mismatch: a broadcast delta does not make {_short(step.target)}")
            self.advance(step.delta)
        if self.version != sync.version:
            raise VersionMismatch(
                f"version_mismatch: this node holds model version {_short(self.version)}, the round is at "
                f"{_short(sync.version)} (the server will re-sync it)"
            )


class VersionLog:
    """The server's side of versions: the run's change, the recent steps, and what each node was last sent."""

    def __init__(self, change: ModelChange) -> None:
        self.change = change
        self.steps: list[Step] = []
        self.nodes: dict[int, str] = {}
        """Node id → the version it was last brought to (absent: unknown, it gets the whole change)."""

    @property
    def version(self) -> str:
        """The current version."""
        return self.change.version

    def advance(self, delta: Delta) -> Step:
        """Apply a round's delta to the change, remember the step (while the steps weigh less than the change)."""
        step = self.change.advance(delta)
        self.steps.append(step)
        budget = self.change.nbytes  # steps that weigh as much as the whole change are never worth sending
        while self.steps and sum(s.delta.nbytes for s in self.steps) >= budget:
            self.steps.pop(0)
        return step

    def sync_for(self, node: int) -> Sync:
        """What ``node`` needs to reach the current version (and note that it was sent)."""
        known = self.nodes.get(node)
        self.nodes[node] = self.version
        if known == self.version:
            return Sync(self.version)
        sources = [step.source for step in self.steps]
        if known is not None and known in sources:
            return Sync(self.version, tuple(self.steps[sources.index(known) :]))
        return Sync(self.version, state=self.change.tensors)

    def forget(self, node: int) -> None:
        """The node's version is unknown (it refused a delta, or did not answer): it gets the whole change next."""
        self.nodes.pop(node, None)


def _short(version: str) -> str:
    return version.removeprefix(VERSION_PREFIX)[:12]
