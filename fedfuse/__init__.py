"""fedfuse: federated model merging with mergeable sufficient statistics.

Layers, lowest first (a layer never imports one above it; ``tests/test_layers.py`` enforces it):
``fedfuse.algebra`` (pure tensor functions) → ``fedfuse.strategies`` (merge methods as monoids of
sufficient statistics, declared parameters) → ``fedfuse.wire`` (bytes on the wire) → ``fedfuse.rounds``
(one round's merge without Flower) → ``fedfuse.client`` / ``fedfuse.server`` (Flower glue, speaking
``fedfuse.messages``) → ``fedfuse.cli`` / ``fedfuse.bench`` (entry points). ``docs/architecture.md``
describes the whole design.
"""

__version__ = "0.1.0"
