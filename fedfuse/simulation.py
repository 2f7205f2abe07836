"""Run the fedfuse apps on Flower's simulation engine in this process (what ``fedfuse simulate`` does)."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from fedfuse.client.app import make_client_app
from fedfuse.client.residuals import STATE_DIR_ENV
from fedfuse.known_warnings import known_warnings_silenced
from fedfuse.server.app import make_server_app
from fedfuse.settings import RunSettings

DEFAULT_CLIENTS = 4

RAY_OVERRIDE_ON_ZERO = "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"
"""Ray's switch for hiding all GPUs from a worker given none.

fedfuse sets it to 1: clients with no GPU share run on the CPU.
"""


class ClientResourcesError(ValueError):
    """The per-client resources asked for cannot be given on this machine (e.g. GPUs without CUDA)."""


def visible_gpus() -> int:
    """Number of CUDA devices torch sees in this process."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def backend_config(*, parallel: int, client_gpus: float = 0.0, gpus: int = 0, verbose: bool = False) -> dict[str, Any]:
    """Flower's Ray backend config: one CPU and ``client_gpus`` GPUs per client.

    Parameters
    ----------
    parallel
        CPUs given to Ray, hence the most clients training at once.
    client_gpus
        GPUs per client (``--client-gpus``); a fraction lets clients share one. With ``client_gpus > 0``
        Ray also runs at most ``floor(gpus / client_gpus)`` clients at once.
    gpus
        Visible CUDA devices, all handed to Ray when clients ask for GPUs.
    verbose
        Let Ray's workers print to this terminal.

    Raises
    ------
    ClientResourcesError
        ``client_gpus`` is negative, above 1 but not whole (Ray's rule), more than ``gpus``, or > 0 with no GPU.
    """
    label = f"--client-gpus {client_gpus:g}"
    if client_gpus < 0 or not math.isfinite(client_gpus):
        raise ClientResourcesError(f"{label}: GPUs per client must be 0 or more")
    if client_gpus > 0 and gpus == 0:
        raise ClientResourcesError(f"{label} asks for GPUs but torch sees no CUDA device")
    if client_gpus > gpus:
        raise ClientResourcesError(f"{label} asks for more GPUs per client than the {gpus} CUDA device(s) torch sees")
    if client_gpus > 1 and not float(client_gpus).is_integer():
        raise ClientResourcesError(f"{label}: above 1, GPUs per client must be a whole number (Ray's rule)")
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": float(client_gpus)},
        "init_args": {
            "num_cpus": parallel,
            "num_gpus": gpus if client_gpus > 0 else 0,
            "logging_level": "ERROR",
            "log_to_driver": verbose,
        },
    }


@contextmanager
def _quiet_flower(verbose: bool) -> Iterator[None]:
    """Flower's logger at WARNING unless ``verbose``; restored afterwards."""
    flower_logger = logging.getLogger("flwr")
    previous_level = flower_logger.level
    if not verbose:
        flower_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        flower_logger.setLevel(previous_level)


@contextmanager
def _environment_default(name: str, value: str) -> Iterator[None]:
    """``os.environ[name]`` defaults to ``value`` inside (a value the user set wins); restored afterwards."""
    had = name in os.environ
    os.environ.setdefault(name, value)
    try:
        yield
    finally:
        if not had:
            os.environ.pop(name, None)


def simulate(
    overrides: Mapping[str, Any] | None = None,
    *,
    num_clients: int = DEFAULT_CLIENTS,
    client_app: ClientApp | None = None,
    parallel: int | None = None,
    client_gpus: float = 0.0,
    verbose: bool = False,
) -> dict[str, Any]:
    """Simulate a federation of ``num_clients`` nodes; returns the run history (also in report.json).

    ``overrides`` are run-config entries (e.g. ``{"strategy": "ties", "num-server-rounds": 2}``),
    checked before anything starts. ``client_app`` replaces the fedfuse ClientApp (tests use it to
    add a misbehaving client). ``parallel`` caps clients training at once (default: CPU cores).
    ``client_gpus`` (``--client-gpus``) gives each client that many GPUs through Ray (0: clients see no
    GPU); Ray then also caps clients at once to ``floor(GPUs / client_gpus)``. Asking for GPUs where torch
    sees none raises :class:`ClientResourcesError` before anything starts. Simulated nodes keep their
    on-disk state (error-feedback residuals) under ``<output-dir>/node-state`` unless
    ``$FEDFUSE_STATE_DIR`` says otherwise, so ``resume`` finds it.
    """
    overrides = dict(overrides or {})
    settings = RunSettings.from_run_config({}, **overrides)
    if num_clients < 1:
        raise ValueError(f"need at least one client, got {num_clients}")
    if settings.training.client_device == "cuda" and client_gpus == 0:
        raise ClientResourcesError(
            "client-device 'cuda' needs --client-gpus > 0: Ray hides every GPU from a client given none"
        )
    parallel = parallel or min(num_clients, os.cpu_count() or 1)
    config = backend_config(
        parallel=parallel,
        client_gpus=client_gpus,
        gpus=visible_gpus() if client_gpus > 0 else 0,
        verbose=verbose,
    )
    node_state = str(Path(settings.run.output_dir).resolve() / "node-state")
    with (
        known_warnings_silenced(),
        _quiet_flower(verbose),
        _environment_default(RAY_OVERRIDE_ON_ZERO, "1"),
        _environment_default(STATE_DIR_ENV, node_state),
    ):
        run_simulation(
            server_app=make_server_app(overrides),
            client_app=client_app or make_client_app(overrides),
            num_supernodes=num_clients,
            backend_config=config,
            verbose_logging=verbose,
        )
    report = Path(settings.run.output_dir) / "report.json"
    if not report.is_file():
        raise RuntimeError(f"the simulation ended without writing {report}; see the log above")
    return json.loads(report.read_text())
