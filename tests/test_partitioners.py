"""flwr-datasets partitions of a user dataset: every row exactly once, seeded, skewed as asked, clear errors."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfuse.data.partitioners import (
    PartitionError,
    natural_partition_names,
    one_file_per_client,
    partition_indices,
)

pytestmark = pytest.mark.unit

FEW = settings(max_examples=12, deadline=None)

label_lists = st.lists(st.integers(min_value=0, max_value=4), min_size=1, max_size=80)


def table(labels, **extra) -> datasets.Dataset:
    """A dataset with a text column, the given label column and any extra columns."""
    return datasets.Dataset.from_dict(
        {"text": [f"row {i}" for i in range(len(labels))], "label": list(labels), **extra}
    )


def assert_exact_cover(parts: list[np.ndarray], num_rows: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    for part in parts:
        assert part.dtype == np.int64
        assert part.size > 0, "every client gets rows"
        assert np.all(np.diff(part) > 0), "each client's indices are sorted and unique"
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(num_rows)), "disjoint and covering"


def assert_same(first: list[np.ndarray], second: list[np.ndarray]) -> None:
    assert len(first) == len(second) and all(np.array_equal(a, b) for a, b in zip(first, second, strict=False))


def skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label mix and the global one."""
    width = int(labels.max()) + 1
    counts = np.stack([np.bincount(labels[part], minlength=width) for part in parts]).astype(float)
    global_mix = counts.sum(axis=0) / counts.sum()
    client_mix = counts / counts.sum(axis=1, keepdims=True)
    return float(0.5 * np.abs(client_mix - global_mix).sum(axis=1).mean())


# --- every scheme: exact cover, deterministic ------------------------------------------------------


@FEW
@given(labels=label_lists, clients=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
def test_iid_covers_every_row_once_in_near_equal_shares(labels: list[int], clients: int, seed: int) -> None:
    dataset = table(labels)
    if clients > len(labels):
        with pytest.raises(PartitionError, match="use fewer clients"):
            partition_indices(dataset, clients, scheme="iid", seed=seed)
        return
    parts = partition_indices(dataset, clients, scheme="iid", seed=seed)
    assert_exact_cover(parts, len(labels), clients)
    assert max(p.size for p in parts) - min(p.size for p in parts) <= 1
    assert_same(parts, partition_indices(dataset, clients, scheme="iid", seed=seed))


@FEW
@given(
    labels=label_lists,
    clients=st.integers(1, 6),
    alpha=st.floats(0.05, 100.0),
    seed=st.integers(0, 2**32 - 1),
    as_text=st.booleans(),
)
def test_dirichlet_covers_every_row_once_or_says_why_not(
    labels: list[int], clients: int, alpha: float, seed: int, as_text: bool
) -> None:
    dataset = table([f"class-{v}" for v in labels] if as_text else labels)
    kwargs = {"scheme": "dirichlet", "column": "label", "alpha": alpha, "seed": seed}
    try:
        parts = partition_indices(dataset, clients, **kwargs)
    except PartitionError as error:
        assert clients > len(labels) or "min_size=1" in str(error) or "gives client" in str(error)
        return
    assert_exact_cover(parts, len(labels), clients)
    assert_same(parts, partition_indices(dataset, clients, **kwargs))


@FEW
@given(
    labels=label_lists,
    clients=st.integers(1, 6),
    per_client=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_shards_cover_every_row_once_even_when_shards_do_not_divide_the_rows(
    labels: list[int], clients: int, per_client: int, seed: int
) -> None:
    dataset = table(labels)
    kwargs = {"scheme": "shards", "column": "label", "shards_per_client": per_client, "seed": seed}
    if clients > len(labels):
        with pytest.raises(PartitionError):
            partition_indices(dataset, clients, **kwargs)
        return
    try:
        parts = partition_indices(dataset, clients, **kwargs)
    except PartitionError as error:
        assert "fewer than the" in str(error) and per_client == 1, "only one shard each can run short of shards"
        return
    assert_exact_cover(parts, len(labels), clients)
    assert_same(parts, partition_indices(dataset, clients, **kwargs))


@FEW
@given(values=st.lists(st.sampled_from(["north", "south", "east", "west"]), min_size=1, max_size=60))
def test_natural_gives_each_distinct_value_its_own_client_in_sorted_order(values: list[str]) -> None:
    dataset = table([0] * len(values), institution=values)
    names = natural_partition_names(dataset, "institution")
    assert names == sorted(set(values))
    parts = partition_indices(dataset, len(names), scheme="natural", column="institution")
    assert_exact_cover(parts, len(values), len(names))
    for name, part in zip(names, parts, strict=False):
        assert {values[i] for i in part} == {name}, "each client's rows share one value: client i gets value i"
    assert_same(parts, partition_indices(dataset, len(names), scheme="natural", column="institution", seed=99))


# --- what each scheme does to the label mix ---------------------------------------------------------


def test_iid_shuffles_before_cutting_so_sorted_labels_still_mix() -> None:
    labels = np.repeat(np.arange(4), 25)
    parts = partition_indices(table(labels.tolist()), 4, scheme="iid", seed=0)
    assert all(len(set(labels[part].tolist())) == 4 for part in parts)


@pytest.mark.parametrize("scheme", ["dirichlet", "shards"])
def test_file_order_does_not_leak_into_the_shares(scheme: str) -> None:
    """Rows sorted by source: each label's slice or shard is a random sample, not one stretch of sources."""
    dataset = table([i % 2 for i in range(200)], source=[i // 20 for i in range(200)])
    parts = partition_indices(dataset, 2, scheme=scheme, column="label", alpha=1000.0, seed=0)
    clients_per_source = [sum(1 for part in parts if np.any(part // 20 == source)) for source in range(10)]
    assert np.mean(clients_per_source) > 1.5


def test_seeds_change_the_split() -> None:
    dataset = table(np.repeat(np.arange(5), 40).tolist())
    for scheme in ("iid", "dirichlet", "shards"):
        first = partition_indices(dataset, 4, scheme=scheme, column="label", seed=0)
        second = partition_indices(dataset, 4, scheme=scheme, column="label", seed=1)
        assert any(not np.array_equal(a, b) for a, b in zip(first, second, strict=False)), scheme


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_smaller_alpha_gives_more_label_skew(seed: int) -> None:
    labels = np.repeat(np.arange(10), 60)
    dataset = table(labels.tolist())
    skews = [
        skew(labels, partition_indices(dataset, 4, scheme="dirichlet", column="label", alpha=alpha, seed=seed))
        for alpha in (0.1, 1000.0)
    ]
    assert skews[0] > 0.3, skews
    assert skews[1] < 0.1, skews


@FEW
@given(
    clients=st.integers(1, 5), per_client=st.integers(1, 3), rows_per_label=st.integers(1, 6), seed=st.integers(0, 999)
)
def test_shards_aligned_with_labels_give_each_client_at_most_shards_per_client_labels(
    clients: int, per_client: int, rows_per_label: int, seed: int
) -> None:
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(clients * per_client), rows_per_label))
    parts = partition_indices(
        table(labels.tolist()), clients, scheme="shards", column="label", shards_per_client=per_client, seed=seed
    )
    assert_exact_cover(parts, labels.size, clients)
    assert all(len(set(labels[part].tolist())) <= per_client for part in parts)


def test_indices_refer_to_the_rows_of_the_dataset_given_even_a_shuffled_view() -> None:
    base = table([0] * 30, institution=["a", "b", "c"] * 10)
    view = base.shuffle(seed=3).select(range(20))
    parts = partition_indices(view, 3, scheme="natural", column="institution")
    for name, part in zip("abc", parts, strict=False):
        assert set(view.select(part)["institution"]) == {name}


def test_natural_clients_sort_integer_values_numerically() -> None:
    dataset = table([0] * 6, site=[10, 2, 10, 2, 1, 1])
    assert natural_partition_names(dataset, "site") == ["1", "2", "10"]
    parts = partition_indices(dataset, 3, scheme="natural", column="site")
    assert [p.tolist() for p in parts] == [[4, 5], [1, 3], [0, 2]]


# --- errors -------------------------------------------------------------------------------------------


def test_natural_with_the_wrong_client_count_names_the_values() -> None:
    dataset = table([0] * 6, institution=["c", "a", "b", "a", "c", "b"])
    message = r"partition 'natural' by 'institution' gives 3 clients \(a, b, c\), but the simulation has 4"
    with pytest.raises(PartitionError, match=message):
        partition_indices(dataset, 4, scheme="natural", column="institution")


def test_natural_with_many_values_lists_the_first_few() -> None:
    dataset = table([0] * 30, site=[f"s{i:02d}" for i in range(30)])
    with pytest.raises(PartitionError, match=r"gives 30 clients \(s00, .*s09, … 20 more\)"):
        partition_indices(dataset, 4, scheme="natural", column="site")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "pathological"}, r"unknown partition scheme 'pathological'; choose one of iid, dirichlet"),
        ({"scheme": "dirichlet", "column": "lable"}, r"no column 'lable'; the data's columns are text, label, score"),
        ({"scheme": "shards"}, r"partition 'shards' needs a column .*columns: text, label, score"),
        ({"scheme": "dirichlet", "column": "score"}, r"'score': the column holds float64 values"),
        ({"scheme": "natural", "column": "score"}, r"'score': the column holds float64 values"),
        ({"scheme": "dirichlet", "column": "label", "alpha": 0.0}, r"alpha must be a positive finite number"),
        ({"scheme": "dirichlet", "column": "label", "alpha": float("inf")}, r"alpha must be a positive finite number"),
        ({"scheme": "shards", "column": "label", "shards_per_client": 0}, r"shards_per_client must be a positive"),
        ({"scheme": "iid", "min_size": 5}, r"min_size=5 for 4 clients needs 20 rows, the data has 12"),
        ({"scheme": "iid", "seed": -1}, r"seed must be a non-negative integer"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs: dict, message: str) -> None:
    dataset = table([0, 1, 2] * 4, score=[0.5] * 12)
    with pytest.raises(PartitionError, match=message):
        partition_indices(dataset, 4, **kwargs)


@pytest.mark.parametrize("clients", [0, 2.5, True])
def test_the_client_count_must_be_a_positive_integer(clients) -> None:
    with pytest.raises(PartitionError, match="number of clients must be a positive integer"):
        partition_indices(table([0, 1]), clients, scheme="iid")


def test_more_clients_than_rows_is_refused() -> None:
    with pytest.raises(PartitionError, match=r"cannot give 5 clients at least one row each from 3 rows; use fewer"):
        partition_indices(table([0, 1, 2]), 5, scheme="dirichlet", column="label")


def test_an_empty_dirichlet_share_names_the_client_and_suggests_a_larger_alpha() -> None:
    dataset = table(np.repeat(np.arange(2), 10).tolist())
    with pytest.raises(PartitionError, match=r"gives client \d+ 0 rows .*use fewer clients or a larger alpha"):
        partition_indices(dataset, 8, scheme="dirichlet", column="label", alpha=0.01, min_size=0, seed=0)


def test_an_unreachable_dirichlet_min_size_names_alpha_and_min_size() -> None:
    dataset = table(np.repeat(np.arange(2), 20).tolist())
    with pytest.raises(PartitionError, match=r"alpha=0.01 left a client below min_size=4 rows in 10 draws"):
        partition_indices(dataset, 8, scheme="dirichlet", column="label", alpha=0.01, min_size=4)


def test_too_few_shards_for_the_clients_is_refused() -> None:
    with pytest.raises(PartitionError, match=r"cuts 5 rows into 3 shards of 2, fewer than the 4 clients"):
        partition_indices(table([0, 1, 2, 3, 4]), 4, scheme="shards", column="label", shards_per_client=1)


def test_empty_values_in_the_partition_column_are_refused() -> None:
    with pytest.raises(PartitionError, match=r"column 'label' has 1 empty values"):
        partition_indices(table(["a", None, "b"]), 2, scheme="dirichlet", column="label")


def test_a_dataset_dict_is_refused() -> None:
    with pytest.raises(PartitionError, match=r"single split.*DatasetDict"):
        partition_indices(datasets.DatasetDict({"train": table([0, 1])}), 2, scheme="iid")


# --- one file per client ------------------------------------------------------------------------------


def test_one_file_per_client_lists_data_files_and_saved_folders_by_name(tmp_path: Path) -> None:
    for name in ("b.csv", "a.jsonl", "d.parquet", "README.md", ".hidden.jsonl"):
        (tmp_path / name).write_text("x")
    table([0, 1]).save_to_disk(str(tmp_path / "c-saved"))
    (tmp_path / "not-a-dataset").mkdir()
    files = one_file_per_client(tmp_path, 4)
    assert [f.name for f in files] == ["a.jsonl", "b.csv", "c-saved", "d.parquet"]


def test_one_file_per_client_refuses_a_count_that_differs_from_the_clients(tmp_path: Path) -> None:
    for name in ("site-a.jsonl", "site-b.jsonl", "site-c.jsonl"):
        (tmp_path / name).write_text("{}")
    message = r"holds 3 data files \(site-a.jsonl, site-b.jsonl, site-c.jsonl\), but the simulation has 4 clients"
    with pytest.raises(PartitionError, match=message):
        one_file_per_client(tmp_path, 4)


def test_one_file_per_client_refuses_a_missing_or_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(PartitionError, match=r"is not a folder \(it does not exist\)"):
        one_file_per_client(tmp_path / "nowhere", 2)
    (tmp_path / "notes.txt").write_text("no data here")
    with pytest.raises(PartitionError, match="holds no data files"):
        one_file_per_client(tmp_path, 2)
