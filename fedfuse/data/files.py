"""Institutions' own data: a JSONL/CSV/Parquet file or a ``save_to_disk`` folder, read with HF ``datasets``.

Nothing here touches a hub: the packaged ``json``/``csv``/``parquet`` builders read local files only.
Every problem a user can cause — a missing file, an unknown format, a malformed row, a missing column,
a label outside the run's label set — raises :class:`DataError` with a message that names the file,
the row or the column, so the client or the CLI can print one line instead of a traceback.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where a file is read: datasets costs a second at start-up
    import datasets

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
"""File suffix → the ``datasets`` builder that reads it."""

SAVED_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
"""Files that mark a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A data file is missing, unreadable or does not fit the task; the message names file, row or column."""


@dataclass(frozen=True)
class DataSource:
    """What a client trained on, as the report records it: the rows read and a SHA-256 of the file(s)."""

    path: str
    rows: int
    sha256: str


def describe_formats() -> str:
    """The accepted inputs, for error messages and help text."""
    return "a .jsonl/.json, .csv or .parquet file, or a datasets save_to_disk folder"


@functools.lru_cache(maxsize=8)
def _read_cached(path: str, mtime_ns: int) -> datasets.Dataset:
    return _read(Path(path))


def read_table(path: str | Path) -> datasets.Dataset:
    """The rows of ``path`` as a ``datasets.Dataset`` (memoized per process while the file is unchanged)."""
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise DataError(f"data file {resolved} does not exist")
    return _read_cached(str(resolved.resolve()), resolved.stat().st_mtime_ns)


def _read(path: Path) -> datasets.Dataset:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    if path.is_dir():
        dataset = _read_saved(path)
    else:
        builder = FORMATS.get(path.suffix.lower())
        if builder is None:
            raise DataError(
                f"{path}: unknown data format {path.suffix or '(no suffix)'!r}; expected {describe_formats()}"
            )
        try:
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as exc:
            raise DataError(_parse_failure(path, builder, exc)) from None
    if len(dataset) == 0:
        raise DataError(f"{path} holds no rows")
    return dataset


def _read_saved(path: Path) -> datasets.Dataset:
    if not any((path / marker).is_file() for marker in SAVED_MARKERS):
        raise DataError(
            f"{path} is a folder but not a datasets save_to_disk folder (no {' / '.join(SAVED_MARKERS[:2])})"
        )
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: cannot read the save_to_disk folder: {_first_line(exc)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" in loaded:
            return loaded["train"]
        if len(loaded) == 1:
            return next(iter(loaded.values()))
        raise DataError(f"{path} holds splits {', '.join(loaded)}: keep one, or name the 'train' split")
    return loaded


def _parse_failure(path: Path, builder: str, exc: Exception) -> str:
    if "corresponds to no data" in str(exc) or path.stat().st_size == 0:
        return f"{path} holds no rows"
    if builder == "json" and path.suffix.lower() == ".jsonl":
        with path.open(encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    return f"{path} line {number}: not valid JSON ({error.msg})"
                if not isinstance(row, dict):
                    return f"{path} line {number}: each line must be a JSON object, got {type(row).__name__}"
    return f"{path}: cannot read as {builder}: {_first_line(exc)}"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def require_columns(dataset: datasets.Dataset, columns: Sequence[str], *, source: str | Path, why: str) -> None:
    """Raise :class:`DataError` naming the first of ``columns`` that ``dataset`` lacks."""
    for column in columns:
        if column not in dataset.column_names:
            raise DataError(
                f"{source}: no column {column!r} ({why}); its columns are {', '.join(dataset.column_names)}"
            )


def read_label_names(dataset: datasets.Dataset, column: str, *, source: str | Path) -> tuple[str, ...]:
    """The sorted distinct values of a label column, as strings (ints sort numerically)."""
    require_columns(dataset, [column], source=source, why="the label column; set label-column")
    values = set(dataset.unique(column))
    if None in values:
        raise DataError(f"{source}: column {column!r} has empty labels")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return tuple(str(v) for v in sorted(values))
    return tuple(sorted(str(v) for v in values))


def label_ids(values: Sequence[Any], names: Sequence[str], *, source: str | Path, column: str) -> list[int]:
    """Map label values to their index in ``names``; an unknown label is refused with its row."""
    index = {name: i for i, name in enumerate(names)}
    out = []
    for row, value in enumerate(values):
        position = index.get(str(value))
        if position is None:
            raise DataError(
                f"{source} row {row}: label {value!r} in column {column!r} is not one of the run's labels "
                f"({', '.join(names)})"
            )
        out.append(position)
    return out


def conversation(
    row: dict[str, Any], *, messages: str, prompt: str, response: str, source: str, number: int
) -> list[dict[str, str]]:
    """One chat example as role/content messages: a ``messages`` column, or prompt/response columns."""
    if messages in row:
        turns = row[messages]
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{source} row {number}: column {messages!r} must be a non-empty list of messages")
        out = []
        for turn in turns:
            if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
                raise DataError(
                    f"{source} row {number}: every message needs a role ({', '.join(ROLES)}) and a string content; "
                    f"got {turn!r}"[:300]
                )
            out.append({"role": turn["role"], "content": turn["content"]})
        if not any(turn["role"] == "assistant" for turn in out):
            raise DataError(f"{source} row {number}: no assistant message, so there is nothing to learn")
        return out
    return [{"role": "user", "content": str(row[prompt])}, {"role": "assistant", "content": str(row[response])}]


def sft_columns(dataset: datasets.Dataset, *, messages: str, prompt: str, response: str, source: str | Path) -> None:
    """Check that ``dataset`` has a messages column or both prompt and response columns."""
    names = dataset.column_names
    if messages in names or (prompt in names and response in names):
        return
    raise DataError(
        f"{source}: task 'sft' needs a {messages!r} column (role/content messages) or {prompt!r} and "
        f"{response!r} columns; its columns are {', '.join(names)}"
    )


def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes, or of a folder's files in sorted order (names and bytes).

    Cached per path *and* the files' sizes and modification times, so an edited file is hashed anew.
    """
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _sha256_of(path, stamp)


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    root = Path(path)
    files = [Path(name) for name, _, _ in stamp]
    for file in files:
        if root.is_dir():
            digest.update(str(file.relative_to(root)).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
