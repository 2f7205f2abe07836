"""Run the fedfuse apps on Flower's simulation engine in this process (what ``fedfuse simulate`` does)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from fedfuse.client.app import make_client_app
from fedfuse.server.app import make_server_app
from fedfuse.settings import RunSettings

DEFAULT_CLIENTS = 4


def simulate(
    overrides: Mapping[str, Any] | None = None,
    *,
    num_clients: int = DEFAULT_CLIENTS,
    client_app: ClientApp | None = None,
    parallel: int | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Simulate a federation of ``num_clients`` nodes; returns the run history (also in report.json).

    ``overrides`` are run-config entries (e.g. ``{"strategy": "ties", "num-server-rounds": 2}``),
    checked before anything starts. ``client_app`` replaces the fedfuse ClientApp (tests use it to
    add a misbehaving client). ``parallel`` caps clients training at once (default: CPU cores).
    """
    overrides = dict(overrides or {})
    settings = RunSettings.from_run_config({}, **overrides)
    if num_clients < 1:
        raise ValueError(f"need at least one client, got {num_clients}")
    parallel = parallel or min(num_clients, os.cpu_count() or 1)
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": parallel, "num_gpus": 0, "logging_level": "ERROR", "log_to_driver": verbose},
    }
    flower_logger = logging.getLogger("flwr")
    previous_level = flower_logger.level
    if not verbose:
        flower_logger.setLevel(logging.WARNING)
    try:
        run_simulation(
            server_app=make_server_app(overrides),
            client_app=client_app or make_client_app(overrides),
            num_supernodes=num_clients,
            backend_config=backend_config,
            verbose_logging=verbose,
        )
    finally:
        flower_logger.setLevel(previous_level)
    report = Path(settings.output_dir) / "report.json"
    if not report.is_file():
        raise RuntimeError(f"the simulation ended without writing {report}; see the log above")
    return json.loads(report.read_text())
