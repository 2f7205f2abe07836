"""Server side: fold encoded updates into a merge state as they arrive, recording every rejection."""

from fedfuse.server.aggregator import Rejection, RoundAggregator

__all__ = ["Rejection", "RoundAggregator"]
