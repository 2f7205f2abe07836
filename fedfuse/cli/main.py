"""The ``fedfuse`` command: one typer app with a sub-command per job."""

from __future__ import annotations

import typer

from fedfuse import __version__

app = typer.Typer(
    name="fedfuse",
    help="Federated model merging: merge task vectors with FedAvg, TIES, DARE, Fisher and more.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", help="Print the fedfuse version and exit."),
) -> None:
    """fedfuse: federated and offline model merging."""
    if version:
        typer.echo(__version__)
        raise typer.Exit()
