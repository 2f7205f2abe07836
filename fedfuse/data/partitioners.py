"""Split one user dataset over simulated clients with Flower's maintained partitioners (``flwr-datasets``).

:func:`partition_indices` hands a two-column copy of the dataset (the partition column and the row
number) to ``IidPartitioner``, ``DirichletPartitioner``, ``ShardPartitioner`` or
``NaturalIdPartitioner`` and reads each client's row numbers back, so the result indexes the
caller's dataset: one sorted ``int64`` array per client, disjoint, covering every row, and the same
for the same seed. :func:`one_file_per_client` lists a ``data-dir`` folder instead (one file per
client). Every user mistake raises :class:`PartitionError` with a one-line message that names the
scheme, column or client.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedfuse.data.files import FORMATS, SAVED_MARKERS, DataError

if TYPE_CHECKING:  # datasets and flwr-datasets are imported where rows are partitioned: they cost seconds at start-up
    import datasets
    from flwr_datasets.partitioner import Partitioner

SCHEMES = ("iid", "dirichlet", "shards", "natural")
"""Partition schemes :func:`partition_indices` accepts."""

ROW = "__fedfuse_row__"
"""The row-number column added to the copy given to a partitioner (so sorting or selecting keeps it)."""

_CATEGORICAL = ("string", "large_string", "bool")
_NAMES_SHOWN = 10


class PartitionError(DataError):
    """A partition cannot be made as asked; the message names the scheme, column or client."""


def partition_indices(
    dataset: datasets.Dataset,
    num_partitions: int,
    *,
    scheme: str,
    column: str | None = None,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    seed: int = 0,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Row indices of each client's share of ``dataset``.

    Parameters
    ----------
    dataset : datasets.Dataset
        The rows to split (one split, not a ``DatasetDict``).
    num_partitions : int
        Number of clients.
    scheme : {"iid", "dirichlet", "shards", "natural"}
        Rows are shuffled (``seed``) first, so file order never leaks into a share.
        ``iid``: near-equal blocks of the shuffled rows. ``dirichlet``: label skew,
        each value of ``column`` divided over clients by proportions ~ Dir(α), redrawn (up to 10
        times) until every client has ``min_size`` rows. ``shards``: pathological non-IID, rows sorted
        by ``column`` and cut into equal shards, each client dealt at most ``shards_per_client`` of
        them at random. ``natural``: one client per distinct value of ``column`` (e.g. an
        institution), client ``i`` getting the ``i``-th value in sorted order
        (see :func:`natural_partition_names`).
    column : str, optional
        The column the scheme partitions by (a string, integer or bool column; ``shards`` also
        takes floats). Ignored by ``iid``.
    alpha : float
        Dirichlet concentration: small (0.1) gives each client few labels, large (100) is near IID.
    shards_per_client : int
        Shards per client for ``shards``.
    seed : int
        Seed of the shuffle, the Dirichlet draws and the shard deal.
    min_size : int
        Fewest rows a client may get (``min_partition_size`` for ``dirichlet``; checked for all).

    Returns
    -------
    list of numpy.ndarray
        ``num_partitions`` sorted ``int64`` arrays, disjoint, together covering every row.
    """
    import datasets
    from flwr_datasets.partitioner import IidPartitioner

    if not isinstance(dataset, datasets.Dataset):
        raise PartitionError(f"partition needs one datasets.Dataset (a single split), got {type(dataset).__name__}")
    if scheme not in SCHEMES:
        raise PartitionError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    _check_counts(scheme, num_partitions, len(dataset), seed, min_size)
    if scheme == "iid":
        rows = _rows_table(dataset, None)
        partitioner: Partitioner = IidPartitioner(num_partitions)
    else:
        column = _check_column(dataset, scheme, column)
        rows = _rows_table(dataset, column)
        partitioner = _column_partitioner(
            rows, scheme, column, num_partitions, alpha, shards_per_client, seed, min_size
        )
    # The partitioners cut rows in file order (IID blocks, each label's Dirichlet slices, each label's
    # shards): shuffle first, or data sorted by source or date would hand each client one stretch of it.
    rows = rows.shuffle(seed=seed, keep_in_memory=True)
    parts = _load_all(partitioner, rows, num_partitions, scheme, column, alpha, min_size)
    _check_sizes(parts, scheme, column, min_size)
    return parts


def natural_partition_names(dataset: datasets.Dataset, column: str) -> list[str]:
    """The distinct values of ``column`` in the order of the ``natural`` clients (client ``i`` = value ``i``).

    Values are sorted as they are (integers numerically), then written as strings.
    """
    column = _check_column(dataset, "natural", column)
    return [str(value) for value in sorted(dataset.unique(column))]


def one_file_per_client(folder: str | Path, num_clients: int | None) -> list[Path]:
    """The data files of a ``data-dir`` folder, sorted by name: client ``i`` reads the ``i``-th.

    A data file is a ``.jsonl``/``.json``/``.csv``/``.parquet`` file or a ``save_to_disk``
    subfolder; hidden entries and other files (a README, say) are skipped. Names sort as plain
    strings, so zero-pad numbers (``site-01`` … ``site-10``) to keep the order you mean.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise PartitionError(f"data-dir {root} is not a folder" + ("" if root.exists() else " (it does not exist)"))
    files = sorted((entry for entry in root.iterdir() if _is_data_entry(entry)), key=lambda entry: entry.name)
    if not files:
        kinds = ", ".join(sorted(FORMATS))
        raise PartitionError(f"data-dir {root} holds no data files ({kinds} files or save_to_disk folders)")
    if num_clients is not None and len(files) != num_clients:
        raise PartitionError(
            f"data-dir {root} holds {len(files)} data files ({_shown([f.name for f in files])}), "
            f"but the simulation has {num_clients} clients: give one file per client"
        )
    return files


# --- checks ----------------------------------------------------------------------------------------


def _check_counts(scheme: str, num_partitions: int, num_rows: int, seed: int, min_size: int) -> None:
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, (int, np.integer)) or num_partitions < 1:
        raise PartitionError(
            f"partition {scheme!r}: the number of clients must be a positive integer, got {num_partitions!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PartitionError(f"partition {scheme!r}: seed must be a non-negative integer, got {seed!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise PartitionError(f"partition {scheme!r}: min_size must be a non-negative integer, got {min_size!r}")
    if num_partitions > num_rows:
        raise PartitionError(
            f"partition {scheme!r}: cannot give {num_partitions} clients at least one row each from {num_rows} rows; "
            "use fewer clients"
        )
    if min_size * num_partitions > num_rows:
        raise PartitionError(
            f"partition {scheme!r}: min_size={min_size} for {num_partitions} clients needs "
            f"{min_size * num_partitions} rows, the data has {num_rows}"
        )


def _check_column(dataset: datasets.Dataset, scheme: str, column: str | None) -> str:
    available = ", ".join(dataset.column_names)
    if not column:
        raise PartitionError(
            f"partition {scheme!r} needs a column to partition by (partition-column); columns: {available}"
        )
    if column not in dataset.column_names:
        raise PartitionError(f"partition {scheme!r}: no column {column!r}; the data's columns are {available}")
    import datasets

    feature = dataset.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return column
    dtype = getattr(feature, "dtype", None) if isinstance(feature, datasets.Value) else None
    allowed = dtype is not None and (dtype in _CATEGORICAL or dtype.startswith(("int", "uint")))
    if scheme == "shards" and dtype is not None and dtype.startswith("float"):
        allowed = True
    if not allowed:
        kind = dtype or type(feature).__name__
        raise PartitionError(
            f"partition {scheme!r} by {column!r}: the column holds {kind} values; "
            "partition by a string or integer column"
        )
    return column


def _check_sizes(parts: list[np.ndarray], scheme: str, column: str | None, min_size: int) -> None:
    floor = max(min_size, 1)
    for client, part in enumerate(parts):
        if part.size < floor:
            by = f" by {column!r}" if column else ""
            hint = "fewer clients or a larger alpha" if scheme == "dirichlet" else "fewer clients"
            raise PartitionError(
                f"partition {scheme!r}{by} gives client {client} {part.size} rows (needs at least {floor}); use {hint}"
            )


# --- partitioning ----------------------------------------------------------------------------------


def _rows_table(dataset: datasets.Dataset, column: str | None) -> datasets.Dataset:
    """An in-memory dataset of ``column`` (if any) and the row number, in ``dataset``'s row order."""
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    numbers = pa.array(np.arange(len(dataset), dtype=np.int64))
    if column is None:
        return datasets.Dataset(InMemoryTable(pa.table({ROW: numbers})))
    table = dataset.select_columns([column]).with_format("arrow")[:]
    values = table.column(column)
    if values.null_count:
        raise PartitionError(
            f"column {column!r} has {values.null_count} empty values; every row needs one to be partitioned"
        )
    return datasets.Dataset(InMemoryTable(pa.table({column: values, ROW: numbers})))


def _column_partitioner(
    rows: datasets.Dataset,
    scheme: str,
    column: str,
    num_partitions: int,
    alpha: float,
    shards_per_client: int,
    seed: int,
    min_size: int,
) -> Partitioner:
    from flwr_datasets.partitioner import DirichletPartitioner, NaturalIdPartitioner

    if scheme == "dirichlet":
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float, np.integer, np.floating))
            or not (0 < alpha < math.inf)
        ):
            raise PartitionError(f"partition 'dirichlet': alpha must be a positive finite number, got {alpha!r}")
        return DirichletPartitioner(
            num_partitions, column, float(alpha), min_partition_size=int(min_size), seed=int(seed)
        )
    if scheme == "shards":
        return _shard_partitioner(len(rows), column, num_partitions, shards_per_client, seed)
    names = sorted(rows.unique(column))
    if len(names) != num_partitions:
        raise PartitionError(
            f"partition 'natural' by {column!r} gives {len(names)} clients ({_shown([str(n) for n in names])}), "
            f"but the simulation has {num_partitions}"
        )
    return NaturalIdPartitioner(partition_by=column)


def _shard_partitioner(num_rows: int, column: str, num_partitions: int, per_client: int, seed: int) -> Partitioner:
    """Equal shards of ``ceil(rows / (clients · per_client))`` rows, the last one short, all dealt out.

    flwr-datasets' automatic shard size drops the rows that do not fill a shard; an explicit size
    with ``keep_incomplete_shard`` covers every row and still deals each client at most ``per_client``
    shards.
    """
    from flwr_datasets.partitioner import ShardPartitioner

    if isinstance(per_client, bool) or not isinstance(per_client, (int, np.integer)) or per_client < 1:
        raise PartitionError(f"partition 'shards': shards_per_client must be a positive integer, got {per_client!r}")
    shard_size = math.ceil(num_rows / (num_partitions * int(per_client)))
    shards = math.ceil(num_rows / shard_size)
    if shards < num_partitions:
        raise PartitionError(
            f"partition 'shards' by {column!r} cuts {num_rows} rows into {shards} shards of {shard_size}, "
            f"fewer than the {num_partitions} clients; use fewer clients or more shards_per_client"
        )
    return ShardPartitioner(num_partitions, column, shard_size=shard_size, keep_incomplete_shard=True, seed=int(seed))


def _load_all(
    partitioner: Partitioner,
    rows: datasets.Dataset,
    num_partitions: int,
    scheme: str,
    column: str | None,
    alpha: float,
    min_size: int,
) -> list[np.ndarray]:
    """Give ``rows`` to ``partitioner`` and read every client's row numbers, sorted."""
    partitioner.dataset = rows
    by = f" by {column!r}" if column else ""
    # DirichletPartitioner warns on each redraw and NaturalIdPartitioner draws a tqdm bar: keep both quiet.
    quiet = contextlib.redirect_stderr(io.StringIO()) if scheme == "natural" else contextlib.nullcontext()
    with warnings.catch_warnings(), quiet:
        warnings.simplefilter("ignore")
        try:
            shares = [partitioner.load_partition(client)[ROW] for client in range(num_partitions)]
        except ValueError as exc:
            if scheme == "dirichlet" and "attempts" in str(exc):
                raise PartitionError(
                    f"partition 'dirichlet'{by} with alpha={alpha} left a client below min_size={min_size} rows "
                    f"in 10 draws; use fewer clients, a larger alpha or a smaller min_size"
                ) from None
            raise PartitionError(f"partition {scheme!r}{by}: {exc}") from None
    return [np.sort(np.asarray(share, dtype=np.int64)) for share in shares]


def _is_data_entry(entry: Path) -> bool:
    if entry.name.startswith("."):
        return False
    if entry.is_dir():
        return any((entry / marker).is_file() for marker in SAVED_MARKERS)
    return entry.is_file() and entry.suffix.lower() in FORMATS


def _shown(names: list[str]) -> str:
    if len(names) <= _NAMES_SHOWN:
        return ", ".join(names)
    return ", ".join(names[:_NAMES_SHOWN]) + f", … {len(names) - _NAMES_SHOWN} more"
