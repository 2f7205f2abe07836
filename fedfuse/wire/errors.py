"""The one exception the wire layer raises on bad input, with a short machine-readable reason.

The reasons are the wire's part of the project's one rejection vocabulary (:mod:`fedfuse.rejections`).
"""

from __future__ import annotations

from fedfuse.rejections import WIRE_REASONS, Rejected

REASONS = WIRE_REASONS
"""Every reason the decoder can give, with what it means (the wire part of ``fedfuse.rejections``)."""


class UpdateRejected(Rejected):
    """A payload failed decoding or validation; ``reason`` is one of :data:`REASONS`.

    The server records ``reason`` (stable, short, for counting) and ``str(exc)`` (for humans)
    and goes on with the round.
    """

    allowed = WIRE_REASONS

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(reason, message)
        self.args = (f"update rejected ({reason}): {message}",)
