"""The third-party warnings a fedfuse simulation triggers by design, silenced one by one (never all).

A new user's first ``fedfuse simulate`` should show the run, not three notices about library internals
that they cannot act on. Each notice is matched by its exact source — module, category and the start of
its message (or, for Flower, the logger and the start of the record) — so every other warning still shows.

- Flower's ``run_simulation`` deprecation (a WARNING record on the ``flwr`` logger). Its replacement,
  ``flwr run``, starts a SuperLink and runs the apps from a FAB in other processes; flwr 1.41 has no public
  in-process API that takes ``ServerApp``/``ClientApp`` objects, which ``fedfuse.simulation`` needs
  (tests pass custom ClientApps).
- transformers' ``is_gradient_checkpointing`` FutureWarning: PEFT reads that deprecated property whenever
  it wraps a model (``peft/peft_model.py``), in the server and in every client (Ray worker) process.
- Ray's ``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO`` FutureWarning from ``ray.init``: fedfuse relies on today's
  behaviour (a client given no GPU sees none) and pins it by setting that variable to 1, which Ray still
  announces.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownWarning:
    """One ``warnings.warn`` call of a library: who calls it, with what category and message."""

    module: str
    """The module that calls ``warnings.warn`` (matched exactly)."""
    category: type[Warning]
    message: str
    """The literal start of the message."""
    in_workers: bool
    """Whether Ray worker processes emit it too (then it is also passed on in ``PYTHONWARNINGS``)."""


KNOWN_WARNINGS: tuple[KnownWarning, ...] = (
    KnownWarning("transformers.modeling_utils", FutureWarning, "`is_gradient_checkpointing` is deprecated", True),
    KnownWarning(
        "ray._private.worker",
        FutureWarning,
        "Tip: In future versions of Ray, Ray will no longer override accelerator visible devices env var",
        False,
    ),
)

FLOWER_LOGGER = "flwr"
KNOWN_FLOWER_RECORDS: tuple[str, ...] = ("DEPRECATED FEATURE: The `run_simulation` function is deprecated",)
"""Literal starts of the Flower log records dropped (level WARNING)."""


class KnownFlowerRecords(logging.Filter):
    """Drops exactly the WARNING records of :data:`KNOWN_FLOWER_RECORDS` from the ``flwr`` logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        text = record.getMessage()
        return not any(text.startswith(start) for start in KNOWN_FLOWER_RECORDS)


def worker_options() -> list[str]:
    """``PYTHONWARNINGS`` entries (``action:message:category:module``) for the warnings workers emit."""
    options = []
    for known in KNOWN_WARNINGS:
        if known.in_workers:
            if any(sep in known.message for sep in ":,"):
                raise ValueError(f"{known.message!r} cannot be written in PYTHONWARNINGS")
            options.append(f"ignore:{known.message}:{known.category.__name__}:{known.module}")
    return options


@contextmanager
def known_warnings_silenced() -> Iterator[None]:
    """While inside, hide the known notices here and in child processes started meanwhile (Ray workers).

    Restores the warning filters, the ``flwr`` logger's filters and ``PYTHONWARNINGS`` on exit.
    """
    flower = logging.getLogger(FLOWER_LOGGER)
    record_filter = KnownFlowerRecords()
    previous = os.environ.get("PYTHONWARNINGS")
    with warnings.catch_warnings():
        for known in KNOWN_WARNINGS:
            warnings.filterwarnings(
                "ignore",
                message=re.escape(known.message),
                category=known.category,
                module=re.escape(known.module) + r"\Z",
            )
        flower.addFilter(record_filter)
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [previous, *worker_options()]))
        try:
            yield
        finally:
            flower.removeFilter(record_filter)
            if previous is None:
                os.environ.pop("PYTHONWARNINGS", None)
            else:
                os.environ["PYTHONWARNINGS"] = previous
