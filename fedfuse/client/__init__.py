"""Client side of a federated round: what a client keeps between rounds and sends.

``ErrorFeedback`` carries what the sparsifier dropped into the next round's task vector.
"""

from fedfuse.client.error_feedback import ErrorFeedback

__all__ = ["ErrorFeedback"]
