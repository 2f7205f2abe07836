"""Partial states in files, one parameter at a time: the :func:`~fedfuse.wire.encode_partial` format on disk.

:class:`PartialWriter` encodes each parameter's statistics as it comes (memory: one parameter's
state) and spools them; ``finish`` writes the file, byte for byte what ``encode_partial`` gives for
the whole state. :func:`open_partial` checks framing and CRC in one streaming pass and the header,
then rebuilds the state of a few parameters at a time, so ``fedfuse merge --combine`` stays
memory-flat. A gateway's payload saved with ``Path(p).write_bytes(payload)`` is such a file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedfuse.strategies import MergeState, MergeStrategy
from fedfuse.wire.container_file import ContainerFile, ContainerWriter, open_container
from fedfuse.wire.header import Expectation, TensorEntry, UpdateHeader, WireHeader, check_expectation
from fedfuse.wire.partial import (
    check_decoder_arguments,
    check_partial,
    encode_statistic,
    parse_partial,
    partial_document,
    rebuild_state,
    state_identity,
)


class PartialWriter:
    """Write one partial state to ``path`` parameter by parameter.

    Parameters
    ----------
    path : path
        The file to write (give the temporary path of an atomic output).
    strategy : MergeStrategy
        The strategy every added state belongs to.
    metadata : mapping
        The whole state's ``MergeState.metadata()`` (identity, total weight, update count); every
        per-parameter state added must have exactly these (it saw the same updates).
    """

    def __init__(self, path: str | Path, *, strategy: MergeStrategy, metadata: Mapping[str, str]) -> None:
        self.path = Path(path)
        self.strategy = strategy
        self.metadata = dict(metadata)
        self._entries: dict[str, TensorEntry] = {}
        self._container = ContainerWriter(spool_dir=self.path.parent)

    def __enter__(self) -> PartialWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._container.close()

    def add(self, state: MergeState) -> None:
        """Encode and spool the statistics of every parameter in ``state``."""
        if state.strategy.identity() != self.strategy.identity():
            raise ValueError(f"state of {state.strategy.identity()} added to a partial of {self.strategy.identity()}")
        if state.metadata() != self.metadata:
            raise ValueError(f"state scalars {state.metadata()} differ from the partial's {self.metadata}")
        for key, tensor in state.to_tensors().items():
            if key in self._entries:
                raise ValueError(f"statistic {key!r} was already written")
            self._entries[key], blobs = encode_statistic(key, tensor, self.strategy.dtype_name)
            for blob_key, blob in blobs.items():
                self._container.add(blob_key, blob)

    def finish(self, header: UpdateHeader) -> int:
        """Write the file with ``header`` (who made it, against which base); returns its size in bytes."""
        if not isinstance(header, UpdateHeader):
            raise ValueError(f"header must be a fedfuse.wire.UpdateHeader, got {type(header).__name__}")
        document = partial_document(header, self.strategy.dtype_name, self._entries, self.metadata)
        return self._container.finish(self.path, document)


class PartialFile:
    """A partial-state file opened for reading: header and identity now, statistics on request."""

    def __init__(self, container: ContainerFile, parsed: WireHeader, metadata: dict[str, str]) -> None:
        self.path = container.path
        self.parsed = parsed
        self.metadata = metadata
        self.identity: dict[str, Any] = state_identity(metadata)
        self._container = container
        self._strategy: MergeStrategy | None = None

    def __enter__(self) -> PartialFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file."""
        self._container.close()

    @property
    def header(self) -> UpdateHeader:
        """Who made the state, against which base weights."""
        return self.parsed.header

    @property
    def nbytes(self) -> int:
        """The file's size."""
        return self._container.nbytes

    def check(self, strategy: MergeStrategy, expect: Expectation) -> dict[str, tuple[int, ...]]:
        """Validate the header against ``strategy`` and ``expect`` (as ``decode_partial`` does); parameter shapes.

        Run, round and base fingerprint are checked where ``expect`` sets them; no statistic is read yet.
        """
        check_decoder_arguments(strategy, expect)
        check_expectation(self.parsed, expect)
        shapes = check_partial(self.parsed, self._container.blobs, strategy, expect)
        self._strategy = strategy
        return shapes

    def state_of(self, names: Iterable[str]) -> MergeState:
        """The merge state of parameters ``names`` (read, validated and decoded now; other parameters untouched)."""
        if self._strategy is None:
            raise ValueError(f"{self.path}: call check(strategy, expect) before reading statistics")
        return rebuild_state(self.parsed, self._container.blobs, self._strategy, self.metadata, names)


def open_partial(path: str | Path, *, max_bytes: int | None = None) -> PartialFile:
    """Open a partial-state file: framing, CRC, header fields and counters are checked.

    Raises :class:`~fedfuse.wire.UpdateRejected` for a bad file and ``OSError`` when it cannot be read.
    """
    container = open_container(path, max_bytes)
    try:
        parsed, metadata = parse_partial(container.document)
        return PartialFile(container, parsed, metadata)
    except BaseException:
        container.close()
        raise
