"""Defaults that both the library and the CLI's help use, in a module that imports nothing.

``fedfuse simulate --help`` shows them without importing Flower's simulation, torch or the apps (issue 26:
a fast CLI), and :func:`fedfuse.simulation.simulate` uses the same declaration.
"""

DEFAULT_CLIENTS = 4
"""Simulated institutions (SuperNodes) of ``fedfuse simulate`` and :func:`fedfuse.simulation.simulate`."""
