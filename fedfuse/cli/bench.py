"""``fedfuse bench``: the benchmarks of :mod:`fedfuse.bench`, each imported only when it runs or shows its help."""

from __future__ import annotations

import typer

from fedfuse.cli.lazy import LazyCommand, lazy_group

BENCHMARKS = (
    LazyCommand(
        "aggregate",
        "fedfuse.bench.aggregate:aggregate",
        "Server-side aggregation time and peak memory against Flower and PEFT.",
    ),
    LazyCommand("wire", "fedfuse.bench.wire:wire", "Bytes per parameter and encode/decode speed of update payloads."),
    LazyCommand(
        "quality",
        "fedfuse.bench.quality:quality",
        "Accuracy, uplink, time of compression and merge methods; experts: merge-quality.",
    ),
    LazyCommand(
        "merge-quality",
        "fedfuse.bench.merge_quality:merge_quality",
        "LoRA experts per skill on a chat LLM merged by every method: exact match, retention.",
    ),
    LazyCommand(
        "overhead",
        "fedfuse.bench.overhead:overhead",
        "fedfuse round time against a plain Flower FedAvg app with the same training.",
    ),
    LazyCommand(
        "robust",
        "fedfuse.bench.robust:robust",
        "Final accuracy of merge methods under simulated attacks, against clean runs.",
    ),
    LazyCommand(
        "scale",
        "fedfuse.bench.scale:scale",
        "Round time and the server's peak RSS against institutions and clients sampled.",
    ),
    LazyCommand(
        "secagg",
        "fedfuse.bench.secagg:secagg",
        "SecAgg+ against plain merging: bytes and time per node and server, accuracy.",
    ),
    LazyCommand(
        "llm-round",
        "fedfuse.bench.llm_round:llm_round",
        "Federated LoRA at LLM scale: dense, factor, SVD broadcast, FlowerTune.",
    ),
)
"""The benchmarks in ``fedfuse bench --help``'s order."""

bench_app = typer.Typer(cls=lazy_group(*BENCHMARKS), no_args_is_help=True)
"""The ``bench`` group; its help is in :mod:`fedfuse.cli.main`."""
