"""Read safetensors checkpoints tensor by tensor: one file, an HF model folder, or a sharded folder.

Only headers are read up front (names, shapes, dtypes), so checking that many checkpoints fit
together costs no tensor data; :meth:`CheckpointReader.get` then loads one tensor at a time from a
memory map. Pickled weights (``pytorch_model.bin``) are refused, never unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""safetensors dtype codes and the torch dtypes they name."""

DTYPE_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
"""torch dtype → safetensors dtype code (the inverse of :data:`SAFETENSORS_DTYPES`)."""

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
"""File endings that hold weights (or their index): everything else in a model folder is config."""


class CheckpointReadError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the others; the message says which and why."""


def is_weight_file(path: Path) -> bool:
    """Whether ``path`` holds weights or a weight index (so it is not copied as a config file)."""
    return path.name.endswith(WEIGHT_SUFFIXES)


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor: its shape and dtype (no data)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        """Number of entries."""
        return torch.Size(self.shape).numel()

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.numel * self.dtype.itemsize

    @property
    def is_floating_point(self) -> bool:
        """Whether the tensor is a float (and so carries a task vector)."""
        return self.dtype.is_floating_point


def _open_file(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt")
    except FileNotFoundError as exc:
        raise CheckpointReadError(f"checkpoint file not found: {path}") from exc
    except (SafetensorError, OSError) as exc:
        raise CheckpointReadError(f"{path} is not a readable safetensors file: {exc}") from exc


def _weight_files_error(folder: Path) -> CheckpointReadError:
    pickled = sorted(p.name for p in folder.iterdir() if p.name.endswith((".bin", ".pt", ".pth")))
    if pickled:
        return CheckpointReadError(
            f"{folder} holds only pickled weights ({', '.join(pickled[:3])}); fedfuse never unpickles. "
            "Convert it once with transformers: model.save_pretrained(folder, safe_serialization=True)"
        )
    return CheckpointReadError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}: not a safetensors model folder")


def _resolve_files(path: Path) -> tuple[dict[str, Path] | None, list[Path]]:
    """The weight map (None for a single file) and the safetensors files of a checkpoint path."""
    if not path.exists():
        raise CheckpointReadError(f"checkpoint not found: {path}")
    if path.is_file():
        if not path.name.endswith(".safetensors"):
            raise CheckpointReadError(f"{path} is not a .safetensors file (fedfuse never unpickles .bin/.pt files)")
        return None, [path]
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointReadError(
                f"{index} is not a valid safetensors index (needs a 'weight_map'): {exc}"
            ) from exc
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointReadError(f"{index}: 'weight_map' must map tensor names to shard file names")
        files = {name: path / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointReadError(f"{index} names shard {shard.name}, which is missing from {path}")
        return files, sorted(set(files.values()))
    single = path / SINGLE_FILE
    if single.is_file():
        return None, [single]
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) == 1:
        return None, candidates
    raise _weight_files_error(path)


class CheckpointReader:
    """A safetensors checkpoint opened for tensor-by-tensor reading.

    ``path`` may be a ``.safetensors`` file, a folder with ``model.safetensors`` (or a single
    ``*.safetensors``), or a sharded folder with ``model.safetensors.index.json``. Use it as a
    context manager, or call :meth:`close`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        weight_map, self.files = _resolve_files(self.path)
        self.folder: Path | None = self.path if self.path.is_dir() else None
        self._handles = {file: _open_file(file) for file in self.files}
        keys = {file: set(handle.keys()) for file, handle in self._handles.items()}
        if weight_map is None:
            self._where: dict[str, Path] = {name: file for file, names in keys.items() for name in names}
        else:
            for name, file in weight_map.items():
                if name not in keys[file]:
                    raise CheckpointReadError(
                        f"{self.path}: the index puts tensor {name!r} in {file.name}, which lacks it"
                    )
            self._where = dict(weight_map)
        self.names: list[str] = sorted(self._where)
        self._infos: dict[str, TensorInfo] = {}

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {len(self.names)} tensors in {len(self.files)} file(s))"

    def close(self) -> None:
        """Release the memory maps."""
        self._handles.clear()

    def _handle(self, name: str) -> Any:
        file = self._where.get(name)
        if file is None:
            raise CheckpointReadError(f"{self.path} has no tensor {name!r}")
        if file not in self._handles:
            raise CheckpointReadError(f"{self.path} was closed")
        return self._handles[file]

    def file_of(self, name: str) -> Path:
        """The safetensors file that holds tensor ``name``."""
        self._handle(name)
        return self._where[name]

    def info(self, name: str) -> TensorInfo:
        """Shape and dtype of tensor ``name``, from the header only."""
        known = self._infos.get(name)
        if known is None:
            view = self._handle(name).get_slice(name)
            code = view.get_dtype()
            if code not in SAFETENSORS_DTYPES:
                raise CheckpointReadError(
                    f"{self.file_of(name)}: tensor {name!r} has dtype {code}, which torch cannot hold"
                )
            known = TensorInfo(tuple(int(d) for d in view.get_shape()), SAFETENSORS_DTYPES[code])
            self._infos[name] = known
        return known

    def get(self, name: str) -> torch.Tensor:
        """Load tensor ``name`` (CPU, its stored dtype).

        Each call maps the file afresh, so the pages of a tensor leave the process when the tensor
        is dropped: resident memory follows the tensors alive, not the files read so far.
        """
        self._handle(name)
        with _open_file(self._where[name]) as handle:
            return handle.get_tensor(name)

    def metadata(self) -> dict[str, str]:
        """The header metadata of the first file (``{}`` when there is none)."""
        handle = self._handles.get(self.files[0])
        if handle is None:
            raise CheckpointReadError(f"{self.path} was closed")
        return dict(handle.metadata() or {})

    @property
    def nbytes(self) -> int:
        """Total size of all tensors' data in bytes."""
        return sum(self.info(name).nbytes for name in self.names)


def open_checkpoint(path: str | Path) -> CheckpointReader:
    """Open a safetensors file, HF model folder or sharded folder; :class:`CheckpointReadError` if unusable."""
    return CheckpointReader(path)
