"""A client's datasets: its own file, its share of one simulated file, or its share of the built-in task.

Where the rows come from, in order: the node's own ``data`` (node config of a SuperNode), one file
per client from ``data-dir``, a share of the run's ``data`` file cut by a flwr-datasets partitioner,
or — with none of these — the built-in standard-library docstring task. A local validation split is
held out (``validation-fraction`` of the rows, seeded by the run and the node) unless the node names
its own ``eval-data``. Every process rebuilds the same split from the settings, so only weights cross
the wire.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedfuse.data import LABEL_NAMES
from fedfuse.data.files import (
    DataError,
    DataSource,
    file_sha256,
    label_ids,
    read_label_names,
    read_table,
    require_columns,
    sft_columns,
)
from fedfuse.data.partitioners import one_file_per_client, partition_indices
from fedfuse.settings import RunSettings
from fedfuse.training.federated_dataset import Tokenized, client_split, data_for, tokenize
from fedfuse.training.tasks import tokenize_rows

if TYPE_CHECKING:  # imported where rows are made: datasets costs a second at start-up
    import datasets

FILE_DOMAIN = ("all",)


@dataclass(frozen=True)
class NodeData:
    """A node's own data files (node config ``data`` and ``eval-data``); empty = use the run's data."""

    data: str = ""
    eval_data: str = ""


@dataclass(frozen=True)
class ClientDatasets:
    """What a trainer receives: tokenized train/eval tensors and the raw rows they came from.

    ``train_rows``/``eval_rows`` are the rows as read (``datasets.Dataset``), for trainers that
    tokenize themselves; ``train``/``eval`` are fedfuse's fixed-length tensors for the run's task.
    ``source`` says which data the client used (path, rows, SHA-256) for the report.
    """

    train: Tokenized
    eval: Tokenized
    train_rows: datasets.Dataset
    eval_rows: datasets.Dataset
    tokenizer: Any
    task: str
    label_names: tuple[str, ...]
    domain_names: tuple[str, ...]
    source: DataSource


def run_label_names(settings: RunSettings) -> tuple[str, ...]:
    """The run's label set: built-in topics, the ``labels`` key, or read once from the run's files."""
    if settings.source.task == "topics":
        return LABEL_NAMES
    if settings.source.task != "classify":
        return ()
    if settings.source.label_names:
        return settings.source.label_names
    files = _run_files(settings)
    if not files:
        raise DataError(
            "task 'classify' needs its label set: set run config labels (e.g. labels=\"negative,positive\"); "
            "with only nodes' own files the server cannot read it, and it must agree across institutions"
        )
    names: set[str] = set()
    for path in files:
        names.update(read_label_names(read_table(path), settings.source.label_column, source=path))
    if all(name.lstrip("-").isdigit() for name in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


def _run_files(settings: RunSettings) -> list[str]:
    if settings.source.data:
        return [settings.source.data]
    if settings.source.data_dir:
        return [str(p) for p in sorted_data_files(settings.source.data_dir)]
    return [settings.source.eval_data] if settings.source.eval_data else []


def sorted_data_files(folder: str) -> list[Path]:
    """The data files of a ``data-dir`` folder, in name order (any count)."""
    return one_file_per_client(folder, None)


def preflight(settings: RunSettings, num_clients: int) -> None:
    """Check a simulation's data before anything starts: files readable, columns present, shares non-empty."""
    if settings.source.uses_builtin_data:
        if settings.source.task in ("classify", "sft"):
            raise DataError(f"task {settings.source.task!r} trains on your data: give --data FILE or --data-dir DIR")
        return
    paths = (
        [settings.source.data]
        if settings.source.data
        else [str(p) for p in one_file_per_client(settings.source.data_dir, num_clients)]
    )
    for path in paths + ([settings.source.eval_data] if settings.source.eval_data else []):
        rows = read_table(path)
        if settings.source.task == "sft":
            sft_columns(
                rows,
                messages=settings.source.messages_column,
                prompt=settings.source.prompt_column,
                response=settings.source.response_column,
                source=path,
            )
        else:
            require_columns(rows, [settings.source.text_column], source=path, why="the text column; set text-column")
    labels = run_label_names(settings)
    if settings.source.task == "classify":
        for path in paths + ([settings.source.eval_data] if settings.source.eval_data else []):
            label_ids(
                read_table(path)[settings.source.label_column], labels, source=path, column=settings.source.label_column
            )
    if settings.source.data:
        for client in range(num_clients):
            _client_rows(settings, NodeData(), client, num_clients)


@functools.lru_cache(maxsize=8)
def _shares(path: str, num_partitions: int, scheme: str, column: str, alpha: float, shards: int, seed: int):
    return partition_indices(
        read_table(path),
        num_partitions,
        scheme=scheme,
        column=column or None,
        alpha=alpha,
        shards_per_client=shards,
        seed=seed,
    )


def _client_rows(settings: RunSettings, node: NodeData, partition_id: int, num_partitions: int):
    """The rows this client owns and the path they came from."""
    if node.data:
        return read_table(node.data), node.data
    if settings.source.data_dir:
        path = str(one_file_per_client(settings.source.data_dir, num_partitions)[partition_id])
        return read_table(path), path
    scheme = settings.source.partition_scheme
    if scheme == "domain":
        raise DataError(
            "partition 'domain' is the built-in task's; for a data file use iid, dirichlet, shards or natural"
        )
    column = settings.source.partition_column or (
        settings.source.label_column if settings.source.task == "classify" else ""
    )
    shares = _shares(
        settings.source.data,
        num_partitions,
        scheme,
        column,
        settings.source.alpha,
        settings.source.shards_per_client,
        settings.run.seed,
    )
    rows = read_table(settings.source.data).select(shares[partition_id])
    return rows, settings.source.data


def _split_validation(rows: datasets.Dataset, fraction: float, seed: int, partition_id: int):
    if fraction == 0.0 or len(rows) < 2:
        return rows, rows.select([])
    held_out = min(len(rows) - 1, max(1, math.ceil(fraction * len(rows))))
    order = np.random.default_rng([seed, partition_id, 7]).permutation(len(rows))
    return rows.select(np.sort(order[held_out:])), rows.select(np.sort(order[:held_out]))


def _cap(rows: datasets.Dataset, limit: int, seed: int) -> datasets.Dataset:
    if limit <= 0 or len(rows) <= limit:
        return rows
    return rows.select(np.sort(np.random.default_rng([seed, 11]).permutation(len(rows))[:limit]))


CACHED_CLIENT_DATASETS = 8
"""Clients' tokenized datasets a process keeps between rounds (a simulation worker serves many clients)."""


def load_client_datasets(
    settings: RunSettings,
    tokenizer: Any,
    *,
    partition_id: int,
    num_partitions: int,
    node: NodeData = NodeData(),
    member: int = 0,
    members: int = 1,
) -> ClientDatasets:
    """This client's train and validation data (see the module docstring); ``member`` slices a gateway's share.

    Tokenizing a share every round is wasted work (the rows do not change within a run), so the
    process keeps the last :data:`CACHED_CLIENT_DATASETS` results, keyed by the settings, the
    tokenizer object, the share and the modification times of the data files: an edited file is
    read again. The result is shared between rounds: treat it as read-only.
    """
    stamp = _data_stamp(settings, node)
    return _cached_datasets(settings, tokenizer, partition_id, num_partitions, node, member, members, stamp)


def _data_stamp(settings: RunSettings, node: NodeData) -> tuple[tuple[str, int], ...]:
    """(path, mtime) of every data file or folder the client may read: a changed file misses the cache."""
    paths = (node.data, node.eval_data, settings.source.data, settings.source.data_dir)
    stamps = []
    for path in filter(None, paths):
        resolved = Path(path).expanduser()
        if not resolved.exists():
            stamps.append((str(resolved), -1))
            continue
        entries = [resolved, *resolved.iterdir()] if resolved.is_dir() else [resolved]
        stamps.append((str(resolved), max(entry.stat().st_mtime_ns for entry in entries)))
    return tuple(stamps)


@functools.lru_cache(maxsize=CACHED_CLIENT_DATASETS)
def _cached_datasets(
    settings: RunSettings,
    tokenizer: Any,
    partition_id: int,
    num_partitions: int,
    node: NodeData,
    member: int,
    members: int,
    stamp: tuple[tuple[str, int], ...],
) -> ClientDatasets:
    if settings.source.uses_builtin_data and not node.data:
        if settings.source.task in ("classify", "sft"):
            raise DataError(
                f"task {settings.source.task!r} trains on your data: "
                "give this node a data file (node config data=PATH) "
                "or the run data / data-dir"
            )
        return _builtin(settings, tokenizer, partition_id, num_partitions, member, members)
    if settings.source.task == "topics":
        raise DataError("task 'topics' is the built-in docstring task: set task classify, lm or sft for a data file")
    rows, path = _client_rows(settings, node, partition_id, num_partitions)
    if len(rows) == 0:
        raise DataError(f"client {partition_id} has an empty share of {path}: use fewer clients or another partition")
    if node.eval_data:
        train_rows, eval_rows = rows, read_table(node.eval_data)
    else:
        train_rows, eval_rows = _split_validation(
            rows, settings.source.validation_fraction, settings.run.seed, partition_id
        )
    if members > 1:
        train_rows = train_rows.select(np.array_split(np.arange(len(train_rows)), members)[member])
    eval_rows = _cap(eval_rows, settings.training.client_eval_examples, settings.run.seed)
    labels = run_label_names(settings)
    source = DataSource(str(path), len(rows), file_sha256(str(Path(path).expanduser().resolve())))
    return ClientDatasets(
        train=tokenize_rows(train_rows, tokenizer, settings, label_names=labels, source=str(path)),
        eval=tokenize_rows(eval_rows, tokenizer, settings, label_names=labels, source=node.eval_data or str(path)),
        train_rows=train_rows,
        eval_rows=eval_rows,
        tokenizer=tokenizer,
        task=settings.source.task,
        label_names=labels,
        domain_names=FILE_DOMAIN,
        source=source,
    )


def _builtin(
    settings: RunSettings, tokenizer: Any, partition_id: int, num_partitions: int, member: int, members: int
) -> ClientDatasets:
    data = data_for(settings, num_partitions)
    share = data.train.subset(data.partitions[partition_id])
    tokens = tokenize(share, tokenizer, settings.source.sequence_length, settings.source.task)
    train_pos, eval_pos = client_split(
        len(tokens), settings.training.client_eval_examples, settings.run.seed, partition_id
    )
    if members > 1:
        train_pos = np.array_split(train_pos, members)[member]

    import datasets

    def rows(positions: np.ndarray) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {
                "text": [share.texts[i] for i in positions],
                "label": [int(share.labels[i]) for i in positions],
            }
        )

    return ClientDatasets(
        train=tokens.rows(train_pos),
        eval=tokens.rows(eval_pos),
        train_rows=rows(train_pos),
        eval_rows=rows(eval_pos),
        tokenizer=tokenizer,
        task=settings.source.task,
        label_names=LABEL_NAMES,
        domain_names=data.domain_names,
        source=DataSource("builtin:stdlib-topics", len(share), ""),
    )


def server_eval_tokens(settings: RunSettings, tokenizer: Any) -> Tokenized:
    """The run's ``eval-data`` file tokenized for the task (server-side evaluation), capped at ``eval-examples``."""
    rows = _cap(read_table(settings.source.eval_data), settings.run.eval_examples, settings.run.seed)
    return tokenize_rows(
        rows, tokenizer, settings, label_names=run_label_names(settings), source=settings.source.eval_data
    )
