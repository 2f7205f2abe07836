"""``fedfuse merge``'s group: its subcommands by name and help, imported only when one runs or shows its help.

The subcommands live in :mod:`fedfuse.cli.merge`, which imports the merge engine (torch, the strategies);
``fedfuse merge --help`` lists them from :data:`MERGE_COMMANDS` without importing it (issue 26: a fast CLI).
Each declaration's help is the subcommand's whole help, so listing and ``fedfuse merge models --help`` read
one text.
"""

from __future__ import annotations

from typing import ClassVar

import click
import typer

from fedfuse.cli.lazy import LazyCommand, LazyGroup

FLAG_FORM = "flags"
"""The hidden subcommand of today's flag form (``fedfuse merge --base ...``)."""

MERGE_COMMANDS = (
    LazyCommand(
        "models",
        "fedfuse.cli.merge:merge_models_command",
        "Merge fine-tuned checkpoints of BASE into one model (or a group's partial state), tensor by tensor.\n\n"
        "Example: fedfuse merge models --base BASE -m M1 -m M2 --method ties --density 0.2 --out OUT",
    ),
    LazyCommand(
        "adapters",
        "fedfuse.cli.merge:merge_adapters_command",
        "Merge PEFT LoRA adapters of BASE exactly in ΔW space, into the full model or (--out-adapter) an adapter.\n\n"
        "Example: fedfuse merge adapters --base BASE --adapter A1 --adapter A2 --method ties --density 0.2\n"
        "--out-adapter --rank 16 --out OUT",
    ),
    LazyCommand(
        "combine",
        "fedfuse.cli.merge:combine_command",
        "Fold partial states (merge models --partial-out files, or gateways' payloads) into the model or a partial.\n\n"
        "Example: fedfuse merge combine a.partial b.partial --base BASE --out OUT",
    ),
    LazyCommand(
        "recipe",
        "fedfuse.cli.merge:recipe_command",
        "Run a mergekit recipe (YAML) with mergekit's defaults for its method, tensor by tensor.\n\n"
        "Example: fedfuse merge recipe recipe.yml --out OUT",
    ),
    LazyCommand(
        "search",
        "fedfuse.cli.merge_search:search_command",
        "Search per-model (per-layer-group) weights, λ and density against a scorer, or cook a greedy soup.\n\n"
        "Example: fedfuse merge search --base BASE -m M1 -m M2 --method ties --search weights,density\n"
        "--scorer loss:val.jsonl --budget 30 --out OUT",
    ),
    LazyCommand(
        "adamerging",
        "fedfuse.cli.merge_adamerging:adamerging_command",
        "Learn task- or layer-wise merge coefficients without labels (AdaMerging: Adam on the merged model's\n"
        "prediction entropy over unlabeled prompts), then write the merged model, adamerging.json and a plot.\n\n"
        "Example: fedfuse merge adamerging --base BASE -m M1 -m M2 --prompts prompts.jsonl --layer-wise\n"
        "--steps 50 --out OUT",
    ),
    LazyCommand(
        FLAG_FORM,
        "fedfuse.cli.merge:merge",
        "Merge fine-tuned checkpoints of BASE into one model, tensor by tensor (memory: one tensor).\n\n"
        "Today's flag form of the subcommands: --combine is `merge combine`, --adapter `merge adapters`,\n"
        "--config `merge recipe`, anything else `merge models`.\n"
        "Example: fedfuse merge --base BASE -m M1 -m M2 --method ties --density 0.2 --out OUT\n"
        "(or a mergekit recipe: fedfuse merge --config recipe.yml --out OUT)",
        hidden=True,
    ),
)
"""``fedfuse merge``'s subcommands in its help's order; the flag form is hidden."""


class MergeGroup(LazyGroup):
    """``fedfuse merge``'s subcommands, loaded on use; a command line starting with an option is the flag form."""

    lazy: ClassVar[tuple[LazyCommand, ...]] = MERGE_COMMANDS

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Send ``fedfuse merge --base ...`` (an option first, not ``--help``) to the hidden flag form."""
        if args and args[0].startswith("-") and args[0] not in self.get_help_option_names(ctx):
            args = [FLAG_FORM, *args]
        return super().parse_args(ctx, args)


merge_app = typer.Typer(cls=MergeGroup, no_args_is_help=True)
"""The ``merge`` group; its help is :data:`fedfuse.cli.main.MERGE_HELP`, listed without importing this module."""
