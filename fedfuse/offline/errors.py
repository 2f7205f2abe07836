"""The one error an offline merge raises for bad input, and the context that turns lower errors into it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class MergeInputError(ValueError):
    """Bad input to an offline merge: the message names the file, tensor or option at fault.

    Raised before anything is written (the CLI prints it as one red line).
    """


@contextmanager
def input_errors(role: str = "") -> Iterator[None]:
    """Report every ``ValueError``/``OSError`` raised while checking inputs as a :class:`MergeInputError`.

    ``role`` (e.g. ``"model 2"``) prefixes the message so it names the input at fault.
    """
    prefix = f"{role}: " if role else ""
    try:
        yield
    except MergeInputError:
        raise
    except FileNotFoundError as exc:
        raise MergeInputError(f"{prefix}file not found: {exc.filename}") from exc
    except (ValueError, OSError) as exc:
        raise MergeInputError(f"{prefix}{exc}") from exc
