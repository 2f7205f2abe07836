"""A real federation on loopback: flower-superlink with TLS and SuperNode authentication, two flower-supernode
processes with registered keys, ``flwr run`` of the fedfuse app with signed updates.

Negative cases: a SuperNode whose key was never registered is refused; an institution whose update is
changed after signing is rejected (bad signature) while the run completes with the others. Every process is
started by the test and stopped by it, also when an assertion fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from fedfuse.security import Registry, write_certificates, write_institution_keys
from fedfuse.settings import RunSettings

ROOT = Path(__file__).resolve().parents[1]
INSTITUTIONS = ("hospital-a", "hospital-b")
TINY = {
    "num-server-rounds": 2, "strategy": "ties", "sparsifier": "trim", "density": 0.3, "local-steps": 2,
    "batch-size": 8, "max-length": 16, "lora-rank": 2, "eval-examples": 32, "fraction-evaluate": 0.0,
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in ("flower-superlink", "flower-supernode", "flwr")),
        reason="Flower's command-line tools are not installed",
    ),
]

TAMPERING_CLIENT = '''"""A ClientApp that behaves, except that hospital-b's payload is changed after it was signed."""
from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp

from fedfuse.client.app import make_client_app
from fedfuse.messages import UPDATE_RECORD, payload_of, payload_record

honest = make_client_app()
app = ClientApp()


@app.train()
def train(msg, context):
    reply = honest(msg, context)
    if context.node_config.get("institution") != "hospital-b":
        return reply
    payload = bytearray(payload_of(reply.content, UPDATE_RECORD))
    payload[len(payload) // 2] ^= 0x01
    content = RecordDict({**reply.content, UPDATE_RECORD: payload_record(bytes(payload))})
    return Message(content=content, reply_to=msg)
'''


def app_config_toml() -> str:
    """Every fedfuse run-config key with its default (flwr only accepts overrides of declared keys)."""
    lines = []
    for key, value in RunSettings().to_run_config().items():
        text = json.dumps(value) if isinstance(value, (bool, str)) else repr(value)
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited early with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on {port} after {timeout} s")


class Federation:
    """Processes of one test federation, all stopped by ``close``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.home = tmp / "flwr-home"
        self.home.mkdir()
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}
        self.processes: list[tuple[subprocess.Popen, Path]] = []
        self.certs = write_certificates(tmp / "certs", ["localhost", "127.0.0.1"])
        self.keys = {name: write_institution_keys(tmp / "keys", name) for name in (*INSTITUTIONS, "intruder")}
        registry = Registry({})
        for name in INSTITUTIONS:
            registry.add(name, self.keys[name]["update_signing_public"].read_text())
        self.registry = registry.save(tmp / "registry.json")
        self.port = free_port()

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        process = subprocess.Popen(
            command, env=self.env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
        )
        self.processes.append((process, log))
        return process

    def start_superlink(self) -> None:
        process = self.start("superlink", [
            "flower-superlink",
            "--ssl-ca-certfile", str(self.certs["ca.crt"]),
            "--ssl-certfile", str(self.certs["superlink.crt"]),
            "--ssl-keyfile", str(self.certs["superlink.key"]),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--database", str(self.tmp / "superlink.db"),
        ])
        wait_for_port(self.port, process)
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "fed"\n\n[superlink.fed]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.certs["ca.crt"]}"\n'
        )

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def start_supernode(self, name: str, partition: int) -> subprocess.Popen:
        keys = self.keys[name]
        node_config = (
            f"partition-id={partition} num-partitions=2 institution='{name}' "
            f"signing-key='{keys['update_signing_private']}'"
        )
        return self.start(f"supernode-{name}", [
            "flower-supernode",
            "--superlink", f"127.0.0.1:{self.port}",
            "--root-certificates", str(self.certs["ca.crt"]),
            "--auth-supernode-private-key", str(keys["supernode_auth_private"]),
            "--node-config", node_config,
            "--port", str(free_port()),
            "--max-retries", "3",
        ])

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for _, log in self.processes if log.exists())

    def close(self) -> None:
        for process, _ in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process, _ in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = Federation(tmp_path_factory.mktemp("federation"))
    try:
        fed.start_superlink()
        for name in INSTITUTIONS:
            registered = fed.flwr("supernode", "register", str(fed.keys[name]["supernode_auth_public"]), "fed")
            assert registered.returncode == 0, registered.stdout + registered.stderr
        for partition, name in enumerate(INSTITUTIONS):
            fed.start_supernode(name, partition)
        yield fed
    finally:
        fed.close()


def run_app(fed: Federation, app_dir: Path, out: Path, **changes: object) -> subprocess.CompletedProcess:
    settings = {**TINY, "output-dir": str(out), "signer-registry": str(fed.registry), **changes}
    run_config = " ".join(f"{key}={json.dumps(value)}" for key, value in settings.items())
    return fed.flwr("run", str(app_dir), "fed", "--stream", "--run-config", run_config, timeout=600)


def test_signed_ties_run_over_tls_with_authenticated_supernodes(federation, tmp_path):
    out = tmp_path / "run"
    done = run_app(federation, ROOT, out)
    assert (out / "report.json").is_file(), done.stdout[-3000:] + done.stderr[-3000:] + federation.logs()
    report = json.loads((out / "report.json").read_text())
    assert [r["accepted"] for r in report["rounds"]] == [2, 2]
    assert [r["signatures_verified"] for r in report["rounds"]] == [2, 2]
    assert (out / "checkpoint" / "state.json").is_file() and (out / "report.md").is_file()


def test_supernode_with_an_unregistered_key_is_refused(federation):
    intruder = federation.start_supernode("intruder", 1)
    try:
        intruder.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("a SuperNode with an unregistered key kept running:\n" + federation.logs())
    assert intruder.returncode != 0
    assert "Failed to activate SuperNode" in (federation.tmp / "supernode-intruder.log").read_text()
    superlink_log = (federation.tmp / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink_log, superlink_log[-2000:]


def test_an_update_changed_after_signing_is_rejected_and_the_run_completes(federation, tmp_path):
    app_dir = tmp_path / "tampering-app"
    app_dir.mkdir()
    (app_dir / "tampering_client.py").write_text(TAMPERING_CLIENT)
    (app_dir / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "fedfuse-tampering-test"\nversion = "0.1.0"\ndescription = "test app"\n'
        'license = "Apache-2.0"\ndependencies = []\n\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n\n'
        '[tool.flwr.app]\npublisher = "fedfuse-tests"\n\n'
        '[tool.flwr.app.components]\nserverapp = "fedfuse.server.app:app"\nclientapp = "tampering_client:app"\n\n'
        "[tool.flwr.app.config]\n" + app_config_toml()
    )
    out = tmp_path / "run"
    done = run_app(federation, app_dir, out, **{"num-server-rounds": 1})
    assert (out / "report.json").is_file(), done.stdout[-3000:] + done.stderr[-3000:] + federation.logs()
    (record,) = json.loads((out / "report.json").read_text())["rounds"]
    assert record["accepted"] == 1 and record["signatures_verified"] == 1
    assert record["rejections"] == {"bad_signature": 1}
