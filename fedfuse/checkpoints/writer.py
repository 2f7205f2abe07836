"""Write safetensors files as a stream: header first (known from shapes and dtypes), then tensors one by one.

Memory stays at one tensor whatever the model size. :class:`ShardedWriter` splits a model into
HF-style shards (``model-00001-of-0000N.safetensors`` + ``model.safetensors.index.json``) and
:func:`atomic_output` writes into a temporary path next to the target and moves it into place only
when everything was written, so a crash never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

from fedfuse.checkpoints.reader import DTYPE_CODES, INDEX_FILE, SINGLE_FILE

TEMP_MARK = ".fedfuse-tmp-"
"""Marks the temporary path of an atomic write in progress (``.<name>.fedfuse-tmp-<random>``)."""
ASIDE_MARK = ".fedfuse-old-"
"""Marks the previous version moved aside during an atomic overwrite."""


class CheckpointWriteError(ValueError):
    """An output cannot be written as asked (bad size, existing target, a tensor off the plan); says why."""


_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: str | int) -> int:
    """Bytes in a size such as ``"5GB"`` (10⁹, as transformers), ``"2GiB"`` (2³⁰), ``"500MB"`` or ``1024``."""
    if isinstance(size, int):
        result = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        if match is None or match.group(2).upper() not in _UNITS:
            raise CheckpointWriteError(
                f"cannot read size {size!r}: use bytes or a number with KB, MB, GB, TB, KiB, MiB, GiB, TiB"
            )
        result = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if result <= 0:
        raise CheckpointWriteError(f"size must be positive, got {size!r}")
    return result


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, shape and dtype (enough to lay out the header)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return torch.Size(self.shape).numel() * self.dtype.itemsize


def build_header(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors preamble: 8-byte little-endian length + JSON header padded with spaces to 8 bytes.

    Tensors are laid out back to back in the order given.
    """
    header: dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise CheckpointWriteError(f"safetensors metadata must map strings to strings; bad entries: {bad[:5]}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for spec in specs:
        if spec.name in header:
            raise CheckpointWriteError(f"tensor {spec.name!r} is listed twice")
        code = DTYPE_CODES.get(spec.dtype)
        if code is None:
            raise CheckpointWriteError(f"tensor {spec.name!r}: dtype {spec.dtype} has no safetensors code")
        header[spec.name] = {"dtype": code, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous.

    The tensor is reinterpreted as uint8 in torch (so bf16 and fp8 never go through numpy's dtypes).
    """
    if sys.byteorder != "little":
        raise CheckpointWriteError("safetensors is little-endian; writing on a big-endian machine is not supported")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data.cast("B")


class SafetensorsStreamWriter:
    """One safetensors file written tensor by tensor, in the order of ``specs``.

    The header is written at once; each :meth:`write` checks name, shape and dtype against the
    plan and appends the bytes. :meth:`close` checks that every tensor was written.
    """

    def __init__(
        self, path: str | Path, specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None
    ) -> None:
        self.path = Path(path)
        self.specs = list(specs)
        header = build_header(self.specs, metadata)
        self._expected_size = len(header) + sum(spec.nbytes for spec in self.specs)
        self._next = 0
        self._file: IO[bytes] | None = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        self._file.write(header)

    def __enter__(self) -> SafetensorsStreamWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        elif self._file is not None:
            self._file.close()
            self._file = None

    @property
    def pending(self) -> list[str]:
        """Names still to be written, in order."""
        return [spec.name for spec in self.specs[self._next :]]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` as the next planned tensor ``name``."""
        if self._file is None:
            raise CheckpointWriteError(f"{self.path} is already closed")
        if self._next >= len(self.specs):
            raise CheckpointWriteError(
                f"{self.path}: tensor {name!r} was not planned (all planned tensors are written)"
            )
        spec = self.specs[self._next]
        if name != spec.name:
            raise CheckpointWriteError(f"{self.path}: expected tensor {spec.name!r} next, got {name!r}")
        if tuple(tensor.shape) != spec.shape:
            raise CheckpointWriteError(f"tensor {name!r}: planned shape {spec.shape}, got {tuple(tensor.shape)}")
        if tensor.dtype != spec.dtype:
            raise CheckpointWriteError(f"tensor {name!r}: planned dtype {spec.dtype}, got {tensor.dtype}")
        self._file.write(tensor_bytes(tensor))
        self._next += 1

    def close(self) -> None:
        """Finish the file; an error if a planned tensor was never written."""
        if self._file is None:
            return
        file, self._file = self._file, None
        file.flush()
        size = file.tell()
        file.close()
        if self._next != len(self.specs):
            raise CheckpointWriteError(
                f"{self.path}: {len(self.pending)} planned tensor(s) never written, first {self.pending[0]!r}"
            )
        if size != self._expected_size:
            raise CheckpointWriteError(f"{self.path}: wrote {size} bytes, expected {self._expected_size}")


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: str | int) -> list[list[TensorSpec]]:
    """Split ``specs`` (in order) into shards of at most ``max_shard_size`` bytes of tensor data.

    As transformers does, a tensor larger than the limit gets a shard of its own.
    """
    limit = parse_size(max_shard_size)
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_name(index: int, count: int) -> str:
    """HF shard file name, ``model-00001-of-00003.safetensors`` (1-based ``index``)."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


class ShardedWriter:
    """Writes a model into ``folder`` as ``model.safetensors`` or HF shards plus an index.

    Tensors must be written in the order of ``specs``; each shard's header carries ``metadata``.
    """

    def __init__(
        self,
        folder: str | Path,
        specs: Sequence[TensorSpec],
        *,
        metadata: Mapping[str, str] | None = None,
        max_shard_size: str | int = "5GB",
    ) -> None:
        self.folder = Path(folder)
        self.metadata = dict(metadata or {})
        self.shards = plan_shards(specs, max_shard_size)
        count = len(self.shards)
        self.file_names = [SINGLE_FILE] if count == 1 else [shard_name(i + 1, count) for i in range(count)]
        self._shard_of = {spec.name: i for i, shard in enumerate(self.shards) for spec in shard}
        self._current = -1
        self._writer: SafetensorsStreamWriter | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append tensor ``name`` to its shard, finishing earlier shards as the stream moves on."""
        shard = self._shard_of.get(name)
        if shard is None:
            raise CheckpointWriteError(f"tensor {name!r} was not planned for {self.folder}")
        while self._current < shard:
            self._open_next()
        assert self._writer is not None
        self._writer.write(name, tensor)

    def _open_next(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._current += 1
        path = self.folder / self.file_names[self._current]
        self._writer = SafetensorsStreamWriter(path, self.shards[self._current], self.metadata)

    def close(self) -> list[Path]:
        """Finish the last shard, write the index when sharded, and return the files written."""
        while self._current < len(self.shards) - 1:
            self._open_next()
        assert self._writer is not None
        self._writer.close()
        files = [self.folder / name for name in self.file_names]
        if len(self.shards) > 1:
            weight_map = {spec.name: self.file_names[i] for i, shard in enumerate(self.shards) for spec in shard}
            index = {
                "metadata": {"total_size": sum(spec.nbytes for shard in self.shards for spec in shard)},
                "weight_map": dict(sorted(weight_map.items())),
            }
            index_path = self.folder / INDEX_FILE
            index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            files.append(index_path)
        return files


def check_target(target: str | Path, *, directory: bool, overwrite: bool) -> Path:
    """Refuse a target that exists (a non-empty folder, or a file) unless ``overwrite``; returns it as a Path."""
    path = Path(target)
    if directory:
        if path.exists() and not path.is_dir():
            raise CheckpointWriteError(f"output {path} exists and is not a folder")
        if path.is_dir() and any(path.iterdir()) and not overwrite:
            raise CheckpointWriteError(f"output folder {path} is not empty (pass --force to replace it)")
    else:
        if path.is_dir():
            raise CheckpointWriteError(f"output {path} is a folder, expected a file path")
        if path.exists() and not overwrite:
            raise CheckpointWriteError(f"output file {path} exists (pass --force to replace it)")
    if path.parent.exists() and not path.parent.is_dir():
        raise CheckpointWriteError(f"output {path} lies under {path.parent}, which is not a folder")
    return path


@contextmanager
def atomic_output(target: str | Path, *, directory: bool, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; move it onto ``target`` only if the block succeeds.

    Missing parent folders are created. On an exception the temporary path is removed and
    ``target`` is left as it was. With ``overwrite``, an existing target is moved aside,
    replaced, then deleted.
    """
    path = check_target(target, directory=directory, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _fresh_path(path.parent, f".{path.name}{TEMP_MARK}", directory=directory)
    try:
        yield temp
        check_target(path, directory=directory, overwrite=overwrite)
        _move_into_place(temp, path)
    except BaseException:
        _remove(temp)
        raise


def _fresh_path(parent: Path, prefix: str, *, directory: bool) -> Path:
    """A new, empty folder or file under ``parent`` (created with the user's umask, unlike mkdtemp)."""
    while True:
        candidate = parent / f"{prefix}{secrets.token_hex(6)}"
        try:
            if directory:
                candidate.mkdir()
            else:
                candidate.open("xb").close()
            return candidate
        except FileExistsError:
            continue


def _move_into_place(temp: Path, target: Path) -> None:
    if not target.exists():
        os.replace(temp, target)
        return
    aside = _fresh_path(target.parent, f".{target.name}{ASIDE_MARK}", directory=True) / "old"
    os.replace(target, aside)
    try:
        os.replace(temp, target)
    except BaseException:
        os.replace(aside, target)
        raise
    finally:
        if aside.exists():
            _remove(aside.parent)
        elif aside.parent.exists():
            aside.parent.rmdir()


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def recover_interrupted_writes(folder: str | Path) -> list[Path]:
    """Undo what a killed :func:`atomic_output` left in ``folder``; return the paths removed or restored.

    A process killed mid-write leaves ``.<name>.fedfuse-tmp-*`` (an incomplete new version: removed)
    and, if it died between the two renames of an overwrite, ``.<name>.fedfuse-old-*`` holding the
    previous version while ``<name>`` is missing: that version is put back. Nothing else is touched.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    touched = []
    for entry in sorted(root.iterdir()):
        name = entry.name
        if not name.startswith("."):
            continue
        if ASIDE_MARK in name:
            target = root / name[1:].split(ASIDE_MARK, 1)[0]
            previous = entry / "old"
            if previous.exists() and not target.exists():
                os.replace(previous, target)
            _remove(entry)
            touched.append(entry)
        elif TEMP_MARK in name:
            _remove(entry)
            touched.append(entry)
    return touched
