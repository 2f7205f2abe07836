"""Sinks: write each tensor's result as it comes, into a model folder or a partial-state file, atomically.

Both write into a temporary path next to the target (:func:`fedfuse.checkpoints.atomic_output`)
that is moved into place only when the last tensor is in: a crash leaves nothing behind. A model
is base + the finalized task vector (already × λ), cast to the base dtype, streamed to
``model.safetensors`` or HF shards, plus the base folder's config and tokenizer files. A partial
state is the statistics in the one partial-state format (:mod:`fedfuse.wire.partial_file`).
"""

from __future__ import annotations

import shutil
import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import torch

from fedfuse import __version__
from fedfuse.algebra import apply_task_vector
from fedfuse.checkpoints import CheckpointReader, ShardedWriter, TensorInfo, TensorSpec, atomic_output, is_weight_file
from fedfuse.offline.plan import Output
from fedfuse.strategies import MergeState, MergeStrategy
from fedfuse.wire import UpdateHeader
from fedfuse.wire.partial_file import PartialWriter


@dataclass(frozen=True)
class MergeResult:
    """What a merge wrote: the output path, its files, and what went into it."""

    out: Path
    kind: Literal["model", "partial"]
    files: list[Path]
    method: str
    num_tensors: int
    num_updates: int
    nbytes: int


class _AtomicSink(ABC):
    """Opens the atomic output on enter; finishes the files, then moves them into place, on a clean exit."""

    def __init__(self, output: Output) -> None:
        self.output = output
        self._stack = ExitStack()

    @abstractmethod
    def _open(self, temp: Path) -> None:
        """Create the writers inside the temporary output ``temp``."""

    @abstractmethod
    def _finish(self) -> None:
        """Close the writers (the output is moved into place afterwards)."""

    def __enter__(self) -> Self:
        temp = self._stack.enter_context(
            atomic_output(self.output.target, directory=self.output.kind == "model", overwrite=self.output.force)
        )
        try:
            self._open(temp)
        except BaseException:
            self._stack.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if exc_type is None:
            try:
                self._finish()
            except BaseException:
                if not self._stack.__exit__(*sys.exc_info()):
                    raise
                return False
        return bool(self._stack.__exit__(exc_type, exc, tb))


def _copy_config_files(base: CheckpointReader, folder: Path) -> None:
    """Copy every non-weight file of the base folder (config, tokenizer, …) so the output loads."""
    if base.folder is None:
        return
    for item in sorted(base.folder.iterdir()):
        if item.is_file() and not is_weight_file(item):
            shutil.copy2(item, folder / item.name)


class ModelSink(_AtomicSink):
    """A merged model folder: base + finalized task vector per floating tensor, the rest copied."""

    def __init__(
        self,
        output: Output,
        base: CheckpointReader,
        layout: Mapping[str, TensorInfo],
        strategy: MergeStrategy,
        num_updates: int,
        out_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(output)
        self._base = base
        self._strategy = strategy
        self._num_updates = num_updates
        self._out_dtype = out_dtype
        self._specs = [TensorSpec(name, info.shape, self._dtype_of(info.dtype)) for name, info in layout.items()]
        self._names: list[str] = []

    def _dtype_of(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a tensor is written in: ``out_dtype`` for floating tensors when set, else its own."""
        return self._out_dtype if self._out_dtype is not None and dtype.is_floating_point else dtype

    def _open(self, temp: Path) -> None:
        metadata = {"format": "pt", "fedfuse_method": self._strategy.name, "fedfuse_version": __version__}
        self._folder = temp
        self._writer = ShardedWriter(temp, self._specs, metadata=metadata, max_shard_size=self.output.max_shard_size)

    def write(self, name: str, base_tensor: torch.Tensor, state: MergeState | None) -> None:
        if state is None:
            self._writer.write(name, base_tensor.to(self._dtype_of(base_tensor.dtype)))
            return
        strategy = state.strategy  # a recipe may give this tensor its own strategy
        merged = state.finalize(base={name: base_tensor} if strategy.capabilities.needs_base else None)
        work = {name: base_tensor.to(strategy.device)}
        theta = apply_task_vector(work, merged, dtype=self._dtype_of(base_tensor.dtype))[name]
        self._writer.write(name, theta.cpu())

    def _finish(self) -> None:
        self._names = [path.name for path in self._writer.close()]
        _copy_config_files(self._base, self._folder)

    def result(self) -> MergeResult:
        """What was written (after the ``with`` block)."""
        target = self.output.target
        return MergeResult(
            out=target,
            kind="model",
            files=[target / name for name in self._names],
            method=self._strategy.name,
            num_tensors=len(self._specs),
            num_updates=self._num_updates,
            nbytes=sum(s.nbytes for s in self._specs),
        )


class PartialSink(_AtomicSink):
    """A partial-state file: each merged tensor's statistics, in the format gateways send."""

    def __init__(self, output: Output, strategy: MergeStrategy, metadata: Mapping[str, str], header: UpdateHeader):
        super().__init__(output)
        self._strategy = strategy
        self._metadata = dict(metadata)
        self._header = header
        self._count = 0
        self._nbytes = 0
        self._num_updates = int(metadata["num_updates"])

    def _open(self, temp: Path) -> None:
        self._writer = self._stack.enter_context(PartialWriter(temp, strategy=self._strategy, metadata=self._metadata))

    def write(self, name: str, base_tensor: torch.Tensor, state: MergeState | None) -> None:
        if state is None:
            return
        self._writer.add(state)
        self._count += len(self._strategy.statistics)

    def _finish(self) -> None:
        self._nbytes = self._writer.finish(self._header)

    def result(self) -> MergeResult:
        """What was written (after the ``with`` block)."""
        target = self.output.target
        return MergeResult(
            out=target,
            kind="partial",
            files=[target],
            method=self._strategy.name,
            num_tensors=self._count,
            num_updates=self._num_updates,
            nbytes=self._nbytes,
        )
