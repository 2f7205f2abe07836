"""fedfuse: federated model merging with mergeable sufficient statistics.

Layers, lowest first (a layer never imports one above it):
``fedfuse.algebra`` (pure tensor functions) → ``fedfuse.strategies`` (merge methods as
monoids of sufficient statistics) → ``fedfuse.wire`` (bytes on the wire) → ``fedfuse.client`` /
``fedfuse.server`` (federated glue) → ``fedfuse.cli`` / ``fedfuse.bench`` (entry points).
"""

__version__ = "0.1.0"
