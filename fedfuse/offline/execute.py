"""The one per-tensor loop of an offline merge: base tensor → its merge state → the sink, then drop both.

Memory stays at one tensor (plus its statistics) whatever the model size. The loop knows nothing
of terminals: a caller that wants a progress bar passes a :data:`Progress` callback.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import torch

from fedfuse.checkpoints import CheckpointReader, TensorInfo
from fedfuse.offline.sources import TensorSource
from fedfuse.strategies import MergeState

Progress = Callable[[str, int, int], None]
"""Called after each tensor with its name, the bytes of base tensors done so far and their total."""


class Sink(Protocol):
    """Where each tensor's result goes (a model folder, a partial-state file)."""

    def write(self, name: str, base_tensor: torch.Tensor, state: MergeState | None) -> None:
        """Take tensor ``name``: its base value and merge state (None: not merged, keep the base's)."""


def execute(
    base: CheckpointReader,
    layout: Mapping[str, TensorInfo],
    source: TensorSource,
    sink: Sink,
    progress: Progress | None = None,
) -> None:
    """Read each base tensor, build its merge state from ``source`` and hand both to ``sink``."""
    total = sum(info.nbytes for info in layout.values())
    done = 0
    for name, info in layout.items():
        base_tensor = base.get(name)
        merged = info.is_floating_point and source.covers(name)
        state = source.state_for(name, base_tensor) if merged else None
        sink.write(name, base_tensor, state)
        del base_tensor, state
        done += info.nbytes
        if progress:
            progress(name, done, total)
