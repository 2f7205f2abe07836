"""The ``fedfuse`` command: one typer app with a sub-command per job.

Each sub-command is a :class:`~fedfuse.cli.lazy.LazyCommand`: ``fedfuse --help`` lists it by name and help
without importing its module, so the help and ``--version`` answer without torch, Flower or matplotlib.
"""

from __future__ import annotations

import typer

from fedfuse import __version__
from fedfuse.cli.lazy import LazyCommand, lazy_group

MERGE_HELP = (
    "Merge fine-tuned models, LoRA adapters, partial states or a mergekit recipe into their base, offline "
    "and tensor by tensor (memory: one tensor). Today's flag form (fedfuse merge --base B -m M1 -m M2 --method "
    "ties --density 0.2 --out OUT; --combine, --adapter, --config) still works."
)

COMMANDS = (
    LazyCommand(
        "simulate",
        "fedfuse.cli.simulate:simulate",
        "Run a federated simulation (Flower simulation engine) and write a report.",
    ),
    LazyCommand(
        "export",
        "fedfuse.cli.export:export",
        "Export a run's global model as a Hugging Face folder, or a LoRA run's ΔW as a PEFT adapter.",
    ),
    LazyCommand(
        "certs", "fedfuse.cli.security:certs", "Make a CA and a SuperLink TLS certificate with the given SANs."
    ),
    LazyCommand(
        "keys", "fedfuse.cli.security:keys", "Make an institution's SuperNode auth and update-signing key pairs."
    ),
    LazyCommand("demo", "fedfuse.cli.demo:demo", "Merge a generated three-institution example with several methods."),
    LazyCommand(
        "grams",
        "fedfuse.cli.grams:grams",
        "Gram matrices of a model's linear-layer inputs over a local file (regmean merges).",
    ),
    LazyCommand(
        "eval", "fedfuse.cli.eval:eval_command", "Evaluate a model folder on lm-evaluation-harness tasks, offline."
    ),
    LazyCommand("merge", "fedfuse.cli.merge_group:merge_app", MERGE_HELP),
    LazyCommand(
        "registry",
        "fedfuse.cli.security:registry_app",
        "The coordinator's registry of institutions' update-signing keys.",
    ),
    LazyCommand(
        "bench", "fedfuse.cli.bench:bench_app", "Benchmarks: ratios against baselines measured in the same run."
    ),
    LazyCommand("models", "fedfuse.cli.models:models_app", "The embedded models: list them, prepare SmolLM2 once."),
)
"""The sub-commands in ``fedfuse --help``'s order."""

app = typer.Typer(
    name="fedfuse",
    cls=lazy_group(*COMMANDS),
    help="Federated model merging: merge task vectors with FedAvg, TIES, DARE, Fisher and more.",
    no_args_is_help=True,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    """``--version``: print the version and exit before any command is parsed."""
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", help="Print the fedfuse version and exit.", is_eager=True, callback=_print_version
    ),
) -> None:
    """fedfuse: federated and offline model merging."""


if __name__ == "__main__":
    app()
