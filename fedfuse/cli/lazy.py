"""Sub-commands imported when they run or show their own help, not when their group lists them.

``fedfuse --help`` and ``fedfuse bench --help`` list each sub-command by its name and one-line help, which
:class:`LazyCommand` holds; the module behind it (torch, Flower's simulation, transformers, a benchmark) is
imported only when the command itself is resolved. The loaded command is what typer builds for
``app.command(name, help=help)(function)`` or ``app.add_typer(sub_app, name=name, help=help)``, so options,
defaults and help read exactly as with eager registration.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar

import click
import typer
from typer.core import TyperGroup


@dataclass(frozen=True)
class LazyCommand:
    """A sub-command by name, help and ``"module:attribute"`` (a command function or a typer app); maybe hidden."""

    name: str
    target: str
    help: str
    hidden: bool = False


def _no_options() -> None:
    """The holder app's callback: it makes typer build a group, as under the real app."""


@cache
def load(command: LazyCommand) -> click.Command:
    """Import ``command.target`` and build its click command as typer does under a parent app."""
    module, _, attribute = command.target.partition(":")
    target: Any = getattr(importlib.import_module(module), attribute)
    holder = typer.Typer(add_completion=False)
    holder.callback()(_no_options)
    if isinstance(target, typer.Typer):
        holder.add_typer(target, name=command.name, help=command.help, hidden=command.hidden)
    else:
        holder.command(command.name, help=command.help, hidden=command.hidden)(target)
    group = typer.main.get_command(holder)
    assert isinstance(group, click.Group)
    return group.commands[command.name]


class LazyGroup(TyperGroup):
    """A typer group whose :attr:`lazy` commands are imported on use; listing them in help imports nothing."""

    lazy: ClassVar[tuple[LazyCommand, ...]] = ()
    _listing = False

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The eager commands, then the lazy ones in their declared order."""
        return [*super().list_commands(ctx), *(command.name for command in self.lazy)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command; while this group formats its help, a lazy one not yet loaded is a name and help only."""
        command = next((command for command in self.lazy if command.name == cmd_name), None)
        if command is None:
            return super().get_command(ctx, cmd_name)
        if self._listing:
            return click.Command(command.name, help=command.help, hidden=command.hidden)
        return load(command)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """This group's help, listing the lazy commands without importing them."""
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


def lazy_group(*commands: LazyCommand) -> type[LazyGroup]:
    """A :class:`LazyGroup` class over ``commands``, for ``typer.Typer(cls=...)``."""
    return type("LazyGroup", (LazyGroup,), {"lazy": commands})
