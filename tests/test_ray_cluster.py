"""``fedfuse simulate --ray-address``: a federation on a real two-node Ray cluster that the test starts itself.

The head and the worker node (one CPU each) are ``ray start --block`` processes on loopback, each in a
session of its own, sharing a fresh ``--temp-dir``; the fixture kills both process trees by pid, on failure
too, and never runs ``ray stop`` (other Ray instances may share the machine). Ray rewrites ``127.0.0.1`` and
``localhost`` to the machine's outward address, so the nodes take other loopback addresses, which Ray keeps.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import ray
from federation import free_port, kill_tree, wait_for_port
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from tiny_runs import TINY_RUN
from typer.testing import CliRunner

import fedfuse.simulation
from fedfuse.cli.main import app
from fedfuse.client.app import make_client_app
from fedfuse.simulation import ClientResourcesError, RayClusterError, backend_config, simulate

# Tiers are marked per test here: this module mixes e2e and unit tests.

HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
OBJECT_STORE_BYTES = 300 * 1024 * 1024  # Ray's default is 30% of the machine's memory per node
TINY = {**TINY_RUN, "num-server-rounds": 2, "min-train-nodes": 2}


@dataclass
class Cluster:
    address: str
    node_ids: dict[str, str]  # node IP → Ray node id
    processes: list[subprocess.Popen]


@contextlib.contextmanager
def _attached(address: str) -> Iterator[None]:
    """This test process as a Ray driver of the cluster, detached afterwards (the cluster keeps running)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Tip: In future versions of Ray", FutureWarning)
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _alive_nodes() -> dict[str, str]:
    return {node["NodeManagerAddress"]: node["NodeID"] for node in ray.nodes() if node["Alive"]}


def _ray_start(folder: Path, name: str, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--num-cpus", "1", "--num-gpus", "0",
               "--object-store-memory", str(OBJECT_STORE_BYTES), "--disable-usage-stats",
               "--temp-dir", str(folder / "ray"), *args]  # fmt: skip
    log = (folder / f"{name}.log").open("w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_leftovers(folder: Path) -> None:
    """SIGKILL any process still naming this cluster's temp dir (Ray daemons reparented past ``kill_tree``)."""
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(folder) in part for part in process.info["cmdline"] or []):
                process.kill()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # A short path: Ray's unix sockets live under --temp-dir, and socket paths are capped at 107 bytes.
    folder = Path(tempfile.mkdtemp(prefix="fedfuse-ray-", dir="/tmp"))
    port = free_port()
    processes: list[subprocess.Popen] = []
    try:
        processes.append(_ray_start(folder, "head", "--head", "--node-ip-address", HEAD_IP, "--port", str(port),
                                    "--include-dashboard", "false"))  # fmt: skip
        wait_for_port(port, processes[0], timeout=120)  # the GCS listens on every address
        address = f"{HEAD_IP}:{port}"
        processes.append(_ray_start(folder, "worker", "--address", address, "--node-ip-address", WORKER_IP))
        with _attached(address):
            deadline = time.monotonic() + 180
            while len(nodes := _alive_nodes()) < 2 and time.monotonic() < deadline:
                assert all(p.poll() is None for p in processes), "a ray start process exited"
                time.sleep(0.5)
        assert set(nodes) == {HEAD_IP, WORKER_IP}, nodes
        yield Cluster(address, nodes, processes)
    except BaseException:
        for log in sorted(folder.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text()[-3000:]}")
        raise
    finally:
        for process in processes:
            kill_tree(process)
        _kill_leftovers(folder)
        shutil.rmtree(folder, ignore_errors=True)


def _placement(record: Path) -> None:
    """Leave a file naming the Ray node and address this client ran on."""
    context = ray.get_runtime_context()
    (record / f"{context.get_node_id()}-{os.getpid()}").write_text(ray.util.get_node_ip_address())


def _recording_client(overrides: dict, record: Path) -> ClientApp:
    """The fedfuse ClientApp, plus a file per training client process naming the Ray node it runs on."""
    honest = make_client_app(overrides)
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        _placement(record)
        return honest(msg, context)

    @client.query()
    def query(msg: Message, context: Context) -> Message:
        return honest(msg, context)

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return honest(msg, context)

    return client


@pytest.mark.e2e
@pytest.mark.slow
def test_two_rounds_run_on_both_nodes_of_an_existing_cluster_which_keeps_running(cluster, tmp_path) -> None:
    record = tmp_path / "placement"
    record.mkdir()
    overrides = {**TINY, "output-dir": str(tmp_path / "run")}
    history = simulate(
        overrides, num_clients=2, client_app=_recording_client(overrides, record), ray_address=cluster.address
    )
    assert not ray.is_initialized(), "simulate left this process attached to the cluster"
    assert [r["round"] for r in history["rounds"]] == [1, 2]
    for round_record in history["rounds"]:
        assert round_record["accepted"] == 2 and round_record["rejected"] == 0
    # One client actor per node (a CPU each): both nodes trained, and no other Ray ran a client. A local
    # Ray started by Flower would have sat on the machine's outward address under another node id.
    placements = {path.name.rsplit("-", 1)[0]: path.read_text() for path in record.iterdir()}
    assert placements == {node_id: ip for ip, node_id in cluster.node_ids.items()}
    assert all(process.poll() is None for process in cluster.processes), "the simulation stopped the cluster"
    with _attached(cluster.address):
        assert _alive_nodes() == cluster.node_ids


@pytest.mark.e2e
@pytest.mark.slow
def test_clients_asking_for_gpus_the_cluster_lacks_are_refused_in_one_line(cluster, tmp_path) -> None:
    """No GPU on this machine is needed to ask: the cluster's nodes are counted (here: none has a GPU)."""
    with pytest.raises(ClientResourcesError) as caught:
        simulate(
            {**TINY, "output-dir": str(tmp_path / "run")}, num_clients=2, client_gpus=1, ray_address=cluster.address
        )
    assert str(caught.value) == f"no node of the Ray cluster at {cluster.address} has 1 CPU and 1 GPU(s) for a client"
    assert not ray.is_initialized() and not (tmp_path / "run").exists()


@pytest.mark.e2e
@pytest.mark.slow
def test_a_local_simulation_starts_its_own_ray_where_ray_address_names_a_running_cluster(cluster, monkeypatch):
    """``$RAY_ADDRESS`` (or a ``ray start`` here) is for ``--ray-address auto``: without the flag a run is local.

    A bare ``ray.init(num_cpus=...)`` would try to join that cluster and refuse the CPU count.
    """
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Tip: In future versions of Ray", FutureWarning)
        ray.init(**backend_config(parallel=1)["init_args"])
    try:
        own = ray.get_runtime_context().gcs_address
        assert own != cluster.address and ray.cluster_resources()["CPU"] == 1
        assert cluster.node_ids.keys().isdisjoint(node["NodeManagerAddress"] for node in ray.nodes())
    finally:
        ray.shutdown()
    assert all(process.poll() is None for process in cluster.processes)


def _free_loopback_port(host: str) -> int:
    """A port nothing listens on at ``host``."""
    port = free_port()
    with socket.socket() as sock:
        assert sock.connect_ex((host, port)) != 0
    return port


@pytest.mark.e2e
def test_an_address_where_no_cluster_answers_is_one_line_from_the_cli(tmp_path) -> None:
    address = f"{HEAD_IP}:{_free_loopback_port(HEAD_IP)}"
    started = time.monotonic()
    result = CliRunner().invoke(
        app,
        ["simulate", "--ray-address", address, "--rounds", "1", "-o", str(tmp_path / "run")],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.output.splitlines() if "Ray cluster" in line]
    assert f"no Ray cluster answers at {address}" in line and "Connection refused" in line
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()
    assert time.monotonic() - started < 60, "a hang guard: ray.init alone retries for minutes"
    assert not ray.is_initialized()


@pytest.mark.e2e
def test_a_port_that_answers_but_is_no_ray_gcs_is_refused_within_seconds(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(fedfuse.simulation, "RAY_PROBE_TIMEOUT_S", 1.0)  # the claim needs a deadline, not 5 s of one
    with socket.socket() as listener:
        listener.bind((HEAD_IP, 0))
        listener.listen()
        address = f"{HEAD_IP}:{listener.getsockname()[1]}"
        with pytest.raises(RayClusterError, match=f"{address} answers, but not as a Ray cluster's GCS"):
            simulate({**TINY, "output-dir": str(tmp_path / "run")}, num_clients=2, ray_address=address)
    assert not (tmp_path / "run").exists()
    assert not ray.is_initialized()


@pytest.mark.unit
@pytest.mark.parametrize("address", ["nonsense", "local", "http://127.0.0.2:8265", ":6379"])
def test_an_address_that_is_no_host_and_port_is_refused(address, tmp_path) -> None:
    with pytest.raises(RayClusterError, match="expected the head's HOST:PORT"):
        simulate({"output-dir": str(tmp_path / "run")}, num_clients=2, ray_address=address)


@pytest.mark.unit
def test_with_an_address_ray_gets_no_cpu_or_gpu_counts_and_clients_one_cpu():
    config = backend_config(parallel=3, client_gpus=0.5, gpus=0, ray_address="head:6379")
    assert config["init_args"] == {"address": "head:6379", "logging_level": "ERROR", "log_to_driver": False}
    assert config["client_resources"] == {"num_cpus": 1, "num_gpus": 0.5}  # the cluster's nodes have the GPUs


@pytest.mark.unit
def test_parallel_does_not_combine_with_an_address():
    with pytest.raises(ValueError, match="parallel does not apply with ray_address"):
        simulate({}, num_clients=2, parallel=2, ray_address="head:6379")
