"""Run the fedfuse apps on Flower's simulation engine in this process (what ``fedfuse simulate`` does)."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from fedfuse.client.app import make_client_app
from fedfuse.client.attacks import attacker_client_app
from fedfuse.client.residuals import STATE_DIR_ENV
from fedfuse.defaults import DEFAULT_CLIENTS
from fedfuse.known_warnings import known_warnings_silenced
from fedfuse.server.app import make_server_app
from fedfuse.settings import RunSettings

RAY_OVERRIDE_ON_ZERO = "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"
"""Ray's switch for hiding all GPUs from a worker given none.

fedfuse sets it to 1: clients with no GPU share run on the CPU.
"""


RAY_PROBE_TIMEOUT_S = 5.0
"""How long ``--ray-address`` checks wait for the cluster's GCS to answer (TCP, then Ray's handshake)."""


class ClientResourcesError(ValueError):
    """The per-client resources asked for cannot be given on this machine (e.g. GPUs without CUDA)."""


class RayClusterError(ValueError):
    """``--ray-address`` names no Ray cluster this process can join (nothing answers, or it is no Ray GCS)."""


def visible_gpus() -> int:
    """Number of CUDA devices torch sees in this process."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def backend_config(
    *,
    parallel: int,
    client_gpus: float = 0.0,
    gpus: int = 0,
    verbose: bool = False,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Flower's Ray backend config: one CPU and ``client_gpus`` GPUs per client.

    Parameters
    ----------
    parallel
        CPUs given to Ray, hence the most clients training at once. Unused with ``ray_address``.
    client_gpus
        GPUs per client (``--client-gpus``); a fraction lets clients share one. With ``client_gpus > 0``
        Ray also runs at most ``floor(gpus / client_gpus)`` clients at once.
    gpus
        Visible CUDA devices, all handed to Ray when clients ask for GPUs. Unused with ``ray_address``.
    verbose
        Let Ray's workers print to this terminal.
    ray_address
        An existing Ray cluster to join (``HOST:PORT`` of its head, or ``auto``) instead of starting a local
        Ray: ``init_args`` then carry the address and no CPU or GPU counts (Ray refuses them when joining);
        clients at once follow the cluster's nodes, each client taking one CPU and ``client_gpus`` GPUs.
        Without it the address is Ray's ``"local"``: a new Ray of this run's own, even where a ``ray start``
        cluster runs on this machine (a bare ``ray.init`` would try to join that one and refuse the counts).

    Raises
    ------
    ClientResourcesError
        ``client_gpus`` is negative, above 1 but not whole (Ray's rule), or, without ``ray_address``,
        more than ``gpus`` or > 0 with no GPU.
    """
    label = f"--client-gpus {client_gpus:g}"
    if client_gpus < 0 or not math.isfinite(client_gpus):
        raise ClientResourcesError(f"{label}: GPUs per client must be 0 or more")
    if ray_address is None and client_gpus > 0 and gpus == 0:
        raise ClientResourcesError(f"{label} asks for GPUs but torch sees no CUDA device")
    if ray_address is None and client_gpus > gpus:
        raise ClientResourcesError(f"{label} asks for more GPUs per client than the {gpus} CUDA device(s) torch sees")
    if client_gpus > 1 and not float(client_gpus).is_integer():
        raise ClientResourcesError(f"{label}: above 1, GPUs per client must be a whole number (Ray's rule)")
    logging_args = {"logging_level": "ERROR", "log_to_driver": verbose}
    if ray_address is not None:
        init_args: dict[str, Any] = {"address": ray_address, **logging_args}
    else:
        local_gpus = gpus if client_gpus > 0 else 0
        init_args = {"address": "local", "num_cpus": parallel, "num_gpus": local_gpus, **logging_args}
    return {"client_resources": {"num_cpus": 1, "num_gpus": float(client_gpus)}, "init_args": init_args}


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


def _gcs_address(address: str) -> str:
    """The ``host:port`` of the cluster's GCS that ``ray.init(address=address)`` dials (Ray resolves ``auto``)."""
    from ray._private.services import canonicalize_bootstrap_address  # Ray's own reading, localhost rewrite included

    host, sep, port = address.rpartition(":")
    if address != "auto" and (not sep or not host or "/" in host or not port.isdigit()):
        raise RayClusterError(f"--ray-address {address}: expected the head's HOST:PORT (its --port) or auto")
    try:
        resolved = canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as exc:
        raise RayClusterError(f"--ray-address {address}: {exc}") from None
    if resolved is None:
        raise RayClusterError(f"--ray-address {address} names no running Ray cluster")
    return resolved


def _probe(address: str, gcs: str) -> None:
    """Fail within seconds unless a Ray GCS answers at ``gcs``; ``ray.init`` itself retries for minutes."""
    host, _, port = gcs.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise RayClusterError(f"no Ray cluster answers at {address} ({gcs}: {exc.strerror or exc})") from None
    import ray._raylet

    client = getattr(ray._raylet, "InnerGcsClient", None)  # the handshake ray.init starts with, given a deadline
    if client is None:  # another Ray version: ray.init checks the rest
        return
    try:
        client.standalone(gcs, None, int(RAY_PROBE_TIMEOUT_S * 1000))
    except Exception as exc:
        raise RayClusterError(f"{gcs} answers, but not as a Ray cluster's GCS (the head's --port): {exc}") from None


def _clients_at_once(client_gpus: float) -> int:
    """Clients the joined cluster runs at once, counted per alive node as Flower sizes its actor pool."""
    import ray

    total = 0
    for node in ray.nodes():
        resources = (node.get("Resources") or {}) if node.get("Alive") else {}
        fits = int(resources.get("CPU", 0))
        if client_gpus > 0:
            fits = min(fits, int(resources.get("GPU", 0) / client_gpus))
        total += fits
    return total


@contextmanager
def _on_cluster(address: str | None, init_args: Mapping[str, Any], client_gpus: float) -> Iterator[None]:
    """Inside, this process is a driver of the Ray cluster at ``address``; detached afterwards (no-op without one).

    Flower's Ray backend calls ``ray.init(**init_args)`` only when Ray is not initialised yet. Joining here
    first makes a wrong address a one-line error, and hands the cluster's workers (started by ``ray start``,
    not by this process) the environment a local Ray's workers inherit: ``PYTHONPATH`` as Flower sets it,
    ``PYTHONWARNINGS``, ``$FEDFUSE_STATE_DIR`` and Ray's GPU-hiding switch. Leaving calls ``ray.shutdown()``,
    which disconnects this driver and stops none of the cluster's nodes.
    """
    if address is None:
        yield
        return
    import ray

    if ray.is_initialized():
        raise RayClusterError("this process is attached to Ray already; call ray.shutdown() first")
    _probe(address, _gcs_address(address))
    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    passed = ("PYTHONWARNINGS", RAY_OVERRIDE_ON_ZERO, STATE_DIR_ENV)
    env_vars = {"PYTHONPATH": pythonpath, **{name: os.environ[name] for name in passed if name in os.environ}}
    try:
        ray.init(runtime_env={"env_vars": env_vars}, **init_args)
    except (ConnectionError, RuntimeError) as exc:
        raise RayClusterError(f"could not join the Ray cluster at {address}: {exc.__cause__ or exc}") from None
    try:
        if _clients_at_once(client_gpus) == 0:
            gpus = f" and {client_gpus:g} GPU(s)" if client_gpus > 0 else ""
            raise ClientResourcesError(f"no node of the Ray cluster at {address} has 1 CPU{gpus} for a client")
        yield
    finally:
        if ray.is_initialized():
            ray.shutdown()


def simulated_client_app(settings: RunSettings, overrides: Mapping[str, Any]) -> ClientApp:
    """fedfuse's ClientApp, with the simulated attackers when the run names an attack (a simulation device)."""
    return attacker_client_app(overrides) if settings.attack.attack != "none" else make_client_app(overrides)


def simulate(
    overrides: Mapping[str, Any] | None = None,
    *,
    num_clients: int = DEFAULT_CLIENTS,
    client_app: ClientApp | None = None,
    parallel: int | None = None,
    client_gpus: float = 0.0,
    verbose: bool = False,
    ray_address: str | None = None,
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

    ``ray_address`` (``--ray-address``: ``HOST:PORT`` of a ``ray start --head``, or ``auto``) runs the clients
    on that existing Ray cluster instead of a local Ray: clients at once then follow the cluster's CPUs (one
    per client) and GPUs, so ``parallel`` does not apply. An address where no Ray cluster answers raises
    :class:`RayClusterError` within seconds, before anything starts; afterwards this process is detached from
    the cluster, which keeps running.
    """
    overrides = dict(overrides or {})
    settings = RunSettings.from_run_config({}, **overrides)
    if num_clients < 1:
        raise ValueError(f"need at least one client, got {num_clients}")
    if settings.training.client_device == "cuda" and client_gpus == 0:
        raise ClientResourcesError(
            "client-device 'cuda' needs --client-gpus > 0: Ray hides every GPU from a client given none"
        )
    if ray_address is not None and parallel is not None:
        raise ValueError("parallel does not apply with ray_address: the cluster's CPUs set clients at once")
    parallel = parallel or min(num_clients, os.cpu_count() or 1)
    config = backend_config(
        parallel=parallel,
        client_gpus=client_gpus,
        gpus=visible_gpus() if client_gpus > 0 and ray_address is None else 0,
        verbose=verbose,
        ray_address=ray_address,
    )
    node_state = str(Path(settings.run.output_dir).resolve() / "node-state")
    with (
        known_warnings_silenced(),
        _quiet_flower(verbose),
        _environment_default(RAY_OVERRIDE_ON_ZERO, "1"),
        _environment_default(STATE_DIR_ENV, node_state),
        _on_cluster(ray_address, config["init_args"], client_gpus),
    ):
        run_simulation(
            server_app=make_server_app(overrides),
            client_app=client_app or simulated_client_app(settings, overrides),
            num_supernodes=num_clients,
            backend_config=config,
            verbose_logging=verbose,
        )
    report = Path(settings.run.output_dir) / "report.json"
    if not report.is_file():
        raise RuntimeError(f"the simulation ended without writing {report}; see the log above")
    return json.loads(report.read_text())
