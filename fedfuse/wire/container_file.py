"""The fedfuse container (:mod:`fedfuse.wire.container`) in a file, blob by blob: memory holds one blob.

Writing: blobs are spooled as they come to an anonymous temporary file next to the output (the
operating system removes it with the process, even after a crash). :meth:`ContainerWriter.finish`
then lays them out in sorted key order behind the header, computing the CRC on the way, and writes
the header last, at the front: its length does not depend on the CRC's value (8 hex digits), so
the data can go first. The file is byte for byte what :func:`~fedfuse.wire.container.pack` makes
of the same document and blobs.

Reading: :func:`open_container` checks the size limit, the framing (every blob 1-D uint8, laid out
back to back) and the CRC in one streaming pass, then reads blobs one at a time on request.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch

from fedfuse.wire.container import (
    CRC_FIELD,
    blob_frame,
    canonical_json,
    canonical_of,
    corrupted,
    header_document,
    header_length,
    parse_container,
    preamble,
    wrong_dtype,
)
from fedfuse.wire.errors import UpdateRejected

CHUNK = 1 << 24
"""Bytes copied or checksummed at a time (16 MiB)."""


class ContainerWriter:
    """A container file written blob by blob (use as a context manager, or call :meth:`close`).

    Parameters
    ----------
    spool_dir : path, optional
        Where the anonymous spool file lives (the output's folder, so its disk is the one that counts).
    """

    def __init__(self, spool_dir: str | Path | None = None) -> None:
        self._spool: IO[bytes] | None = tempfile.TemporaryFile(dir=spool_dir)  # noqa: SIM115 (closed by close())
        self._where: dict[str, tuple[int, int]] = {}

    def __enter__(self) -> ContainerWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the spool (it is anonymous: nothing stays on disk)."""
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    def _open_spool(self) -> IO[bytes]:
        if self._spool is None:
            raise ValueError("this container writer is closed")
        return self._spool

    def add(self, key: str, blob: torch.Tensor) -> None:
        """Spool one blob (a 1-D uint8 CPU tensor) under ``key``."""
        spool = self._open_spool()
        if not isinstance(key, str) or key in self._where:
            raise ValueError(f"blob key {key!r} is not a new string")
        if blob.dtype != torch.uint8 or blob.dim() != 1:
            raise ValueError(f"blob {key!r} must be a 1-D uint8 tensor, got {blob.dtype} of shape {tuple(blob.shape)}")
        offset = spool.seek(0, os.SEEK_END)
        if blob.numel():
            spool.write(blob.detach().cpu().contiguous().numpy().data)
        self._where[key] = (offset, blob.numel())

    def finish(self, path: str | Path, document: Mapping[str, Any]) -> int:
        """Write the container (header ``document`` + every spooled blob) to ``path``; returns its size."""
        spool = self._open_spool()
        sizes = {key: size for key, (_, size) in self._where.items()}
        placeholder = preamble({**document, CRC_FIELD: "0" * 8}, sizes)
        crc = zlib.crc32(canonical_json(document).encode("utf-8"))
        with open(path, "wb") as out:
            out.write(placeholder)
            for key in sorted(sizes):
                offset, size = self._where[key]
                crc = zlib.crc32(blob_frame(key, size), crc)
                spool.seek(offset)
                remaining = size
                while remaining:
                    chunk = spool.read(min(CHUNK, remaining))
                    if not chunk:
                        raise OSError(f"the spool of {path} ended before blob {key!r} did")
                    crc = zlib.crc32(chunk, crc)
                    out.write(chunk)
                    remaining -= len(chunk)
            final = preamble({**document, CRC_FIELD: f"{crc:08x}"}, sizes)
            if len(final) != len(placeholder):
                raise AssertionError("the container header changed length with its CRC")
            out.seek(0)
            out.write(final)
            total = out.seek(0, os.SEEK_END)
        self.close()
        return total


def _read_exactly(file: IO[bytes], offset: int, size: int) -> bytes:
    file.seek(offset)
    data = file.read(size)
    if len(data) != size:
        raise UpdateRejected("truncated", f"file ended {size - len(data)} byte(s) early")
    return data


def _blob_layout(container: dict, data_size: int) -> dict[str, tuple[int, int]]:
    """Each blob's (start, size) in the data section; blobs must tile it back to back, as safetensors does."""
    layout: dict[str, tuple[int, int]] = {}
    for key, info in container.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if not 0 <= start <= end:
            raise corrupted(f"container entry {key!r} has data_offsets {[start, end]}")
        layout[key] = (start, end - start)
    position = 0
    for start, size in sorted(layout.values()):
        if start != position:
            raise corrupted("container blobs are not laid out back to back")
        position = start + size
    if position != data_size:
        raise corrupted("container blobs do not fill its data section")
    return layout


def _check_blob_dtypes(container: dict, layout: Mapping[str, tuple[int, int]]) -> None:
    for key, (_, size) in layout.items():
        info = container[key]
        dtype, shape = info.get("dtype"), info.get("shape")
        shape_tuple = tuple(shape) if isinstance(shape, list) else ()
        if dtype != "U8" or shape != [size]:
            raise wrong_dtype(key, dtype, shape_tuple)


class ContainerFile:
    """An opened, CRC-checked container file: its header ``document`` and its blobs, read on request."""

    def __init__(self, path: Path, file: IO[bytes], document: dict, layout: dict[str, tuple[int, int]], start: int):
        self.path = path
        self.document = document
        self.nbytes = start + sum(size for _, size in layout.values())
        self._file: IO[bytes] | None = file
        self._layout = layout
        self._start = start
        self.blobs: Mapping[str, torch.Tensor] = _LazyBlobs(self)

    def __enter__(self) -> ContainerFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def keys(self) -> list[str]:
        """Every blob key, sorted."""
        return sorted(self._layout)

    def blob(self, key: str) -> torch.Tensor:
        """Read blob ``key`` into a fresh 1-D uint8 tensor."""
        if self._file is None:
            raise ValueError(f"{self.path} was closed")
        start, size = self._layout[key]
        out = torch.empty(size, dtype=torch.uint8)
        if size:
            out.numpy().data[:] = _read_exactly(self._file, self._start + start, size)
        return out

    def crc(self, canonical: str) -> str:
        """The CRC32 of the header ``canonical`` and every blob, streamed from disk in sorted key order."""
        assert self._file is not None
        crc = zlib.crc32(canonical.encode("utf-8"))
        for key in self.keys:
            start, size = self._layout[key]
            crc = zlib.crc32(blob_frame(key, size), crc)
            done = 0
            while done < size:
                step = min(CHUNK, size - done)
                crc = zlib.crc32(_read_exactly(self._file, self._start + start + done, step), crc)
                done += step
        return f"{crc:08x}"


class _LazyBlobs(Mapping[str, torch.Tensor]):
    """The blobs of a container file as a mapping that reads each one only when it is looked up."""

    def __init__(self, container: ContainerFile) -> None:
        self._container = container

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._container._layout:
            raise KeyError(key)
        return self._container.blob(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._container.keys)

    def __len__(self) -> int:
        return len(self._container._layout)


def open_container(path: str | Path, max_bytes: int | None = None) -> ContainerFile:
    """Open a container file: size, framing, dtypes and CRC are checked (:class:`UpdateRejected`).

    A missing or unreadable file raises ``OSError``.
    """
    path = Path(path)
    file = open(path, "rb")  # noqa: SIM115 (the returned ContainerFile closes it)
    try:
        size = os.fstat(file.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise UpdateRejected("too_large", f"payload has {size} bytes, more than the limit of {max_bytes}")
        length = header_length(_read_exactly(file, 0, min(size, 8)), size)
        container, end = parse_container(_read_exactly(file, 8, length), size)
        if end < size:
            raise corrupted(f"{size - end} trailing byte(s) after the payload")
        layout = _blob_layout(container, end - 8 - length)
        document, crc = header_document(container.get("__metadata__"))
        _check_blob_dtypes(container, layout)
        opened = ContainerFile(path, file, document, layout, 8 + length)
        if opened.crc(canonical_of(document)) != crc:
            raise corrupted("CRC32 mismatch: the payload was altered or damaged")
        return opened
    except BaseException:
        file.close()
        raise
