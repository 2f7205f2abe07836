"""The federated dataset of a run: one split, one partition, tokenized once per process.

Every client and the server rebuild the same split and partition from the run settings (seeded), so
nothing but model weights ever crosses the wire. Texts are tokenized once per process to fixed-length
tensors; batches are then index lookups.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from fedfuse.data import (
    TopicDataset,
    dirichlet_partition,
    domain_partition,
    load_stdlib_topics,
    train_test_split,
)
from fedfuse.defaults import default_cache_dir
from fedfuse.settings import RunSettings

TEST_FRACTION = 0.2
MIN_CLIENT_EXAMPLES = 10
"""Fewest training examples a Dirichlet share gets, lowered to what the split allows for many clients."""


@dataclass(frozen=True)
class Tokenized:
    """Fixed-length token ids, attention masks, labels and domains of a dataset (row i = example i)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    domains: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def rows(self, index: np.ndarray | torch.Tensor) -> Tokenized:
        """The examples at ``index``."""
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return Tokenized(self.input_ids[idx], self.attention_mask[idx], self.labels[idx], self.domains[idx.numpy()])

    def to(self, device: torch.device | str) -> Tokenized:
        """The same examples with their tensors on ``device``."""
        return Tokenized(
            self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), self.domains
        )


@dataclass(frozen=True)
class FederatedData:
    """The train split cut into ``num_partitions`` client shares, and the held-out test split."""

    train: TopicDataset
    test: TopicDataset
    partitions: tuple[np.ndarray, ...]

    @property
    def domain_names(self) -> tuple[str, ...]:
        """Domain (label) names, in label order."""
        return self.train.label_names


@functools.lru_cache(maxsize=4)
def federated_data(seed: int, partition: str, alpha: float, num_partitions: int) -> FederatedData:
    """The standard-library topic task split and partitioned as the settings say (memoized per process)."""
    dataset = load_stdlib_topics(cache_dir=default_cache_dir() / "datasets")  # read, not re-parsed, by each process
    train, test = train_test_split(dataset, TEST_FRACTION, seed=seed)
    if partition == "dirichlet":
        floor = min(MIN_CLIENT_EXAMPLES, len(train) // num_partitions)  # 1,000 clients share ~4.6k examples
        parts = dirichlet_partition(train.labels, num_partitions, alpha, seed=seed, min_size=floor)
    elif partition == "domain":
        parts = domain_partition(train.labels, num_partitions, seed=seed)
    elif partition == "iid":
        order = np.random.default_rng(seed).permutation(len(train))
        parts = [np.sort(part) for part in np.array_split(order, num_partitions)]
    else:
        raise ValueError(f"unknown partition {partition!r}")
    return FederatedData(train, test, tuple(parts))


def data_for(settings: RunSettings, num_partitions: int) -> FederatedData:
    """:func:`federated_data` for a run's settings."""
    return federated_data(settings.run.seed, settings.source.partition_scheme, settings.source.alpha, num_partitions)


def tokenize(dataset: TopicDataset, tokenizer, max_length: int, task: str) -> Tokenized:
    """Pad/truncate every text to ``max_length`` tokens; for "lm" the labels are the token ids (pads -100)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    encoded = tokenizer(
        list(dataset.texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100) if task == "lm" else torch.as_tensor(dataset.labels, dtype=torch.long)
    return Tokenized(ids, mask, labels, np.asarray(dataset.domains))


def client_split(size: int, eval_examples: int, seed: int, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """A client's local train and evaluation positions within its share (evaluation: at most a quarter)."""
    order = np.random.default_rng([seed, partition_id, 7]).permutation(size)
    held_out = min(eval_examples, size // 4)
    return np.sort(order[held_out:]), np.sort(order[:held_out])


def capped(size: int, limit: int, seed: int) -> np.ndarray:
    """All positions, or a seeded sample of ``limit`` of them (``limit`` 0 = all)."""
    if limit <= 0 or limit >= size:
        return np.arange(size)
    return np.sort(np.random.default_rng([seed, 11]).permutation(size)[:limit])
