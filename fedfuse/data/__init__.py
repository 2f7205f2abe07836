"""Datasets and client partitions for federated simulations, built without any download."""

from fedfuse.data.partition import client_label_counts, dirichlet_partition, domain_partition
from fedfuse.data.stdlib_topics import (
    LABEL_NAMES,
    MODULE_DOMAINS,
    TopicDataset,
    load_stdlib_topics,
    train_test_split,
)

__all__ = [
    "LABEL_NAMES",
    "MODULE_DOMAINS",
    "TopicDataset",
    "client_label_counts",
    "dirichlet_partition",
    "domain_partition",
    "load_stdlib_topics",
    "train_test_split",
]
