"""Defaults that both the library and the CLI's help use, in a module that imports only the standard library.

``fedfuse simulate --help`` shows them without importing Flower's simulation, torch or the apps (issue 26:
a fast CLI), and :func:`fedfuse.simulation.simulate` uses the same declaration.
"""

import os
from pathlib import Path

DEFAULT_CLIENTS = 4
"""Simulated institutions (SuperNodes) of ``fedfuse simulate`` and :func:`fedfuse.simulation.simulate`."""


def default_cache_dir() -> Path:
    """fedfuse's cache root: ``$FEDFUSE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedfuse``, else ``~/.cache/fedfuse``."""
    explicit = os.environ.get("FEDFUSE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fedfuse"
