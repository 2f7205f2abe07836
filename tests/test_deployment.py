"""A real federation on loopback: flower-superlink with TLS and SuperNode authentication, two flower-supernode
processes with registered keys, ``flwr run`` of the fedfuse app with signed updates.

Each SuperNode trains on its institution's OWN file, named in its ``--node-config`` (``data=...``): synthetic
triage notes with three labels (tests/data/deploy/, 48 and 64 rows), a classification task the built-in one is
not. The report proves it per client: the SHA-256 and row count of exactly that file, a held-out validation
split cut from it, and a three-class model; a tripwire on the built-in stdlib task proves no process of the
federation (SuperLink, ServerApp, SuperNodes, ClientApps) ever built it, and the server evaluates nothing.

Negative cases: a SuperNode whose key was never registered is refused; an institution whose update is
changed after signing is rejected (bad signature) while the run completes with the others. Every process is
started by the test and stopped by it, also when an assertion fails.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from fedfuse.security import Registry, write_certificates, write_institution_keys
from fedfuse.settings import RunSettings

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "deploy"  # written by tests/data/deploy/generate.py
INSTITUTIONS = ("hospital-a", "hospital-b")
ROWS = {"hospital-a": 48, "hospital-b": 64}
LABELS = ("cardiac", "respiratory", "musculoskeletal")
VALIDATION_FRACTION = 0.1
OWN_DATA = {
    "task": "classify",
    "labels": ",".join(LABELS),
    "text-column": "text",
    "label-column": "label",
    "validation-fraction": VALIDATION_FRACTION,
}
TINY = {
    "num-server-rounds": 2,
    "strategy": "ties",
    "sparsifier": "trim",
    "density": 0.3,
    "local-steps": 2,
    "batch-size": 8,
    "max-length": 16,
    "lora-rank": 2,
    "eval-examples": 32,
    "fraction-evaluate": 0.0,
    **OWN_DATA,
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in ("flower-superlink", "flower-supernode", "flwr")),
        reason="Flower's command-line tools are not installed",
    ),
]

TAMPERING_CLIENT = '''"""A ClientApp that behaves, except that hospital-b's payload is changed after it was signed."""
from flwr.clientapp import ClientApp

from fedfuse.client.app import make_client_app
from fedfuse.messages import TrainReply

honest = make_client_app()
app = ClientApp()


@app.train()
def train(msg, context):
    reply = honest(msg, context)
    if context.node_config.get("institution") != "hospital-b":
        return reply
    signed = TrainReply.from_content(reply.content)
    payload = bytearray(signed.payload)
    payload[len(payload) // 2] ^= 0x01
    return TrainReply(signed.kind, bytes(payload), signed.signature).reply_to(msg)
'''


TRIPWIRE = '''"""Test tripwire (sitecustomize): a process that builds the built-in stdlib topic task leaves a marker."""
import importlib.machinery
import os
import sys
from pathlib import Path

TARGET = "fedfuse.data.stdlib_topics"


def _tripped(*args, **kwargs):
    marker = Path(os.environ["FEDFUSE_TEST_TRIPWIRE"]) / f"pid-{os.getpid()}"
    marker.write_text(" ".join(sys.argv))
    raise RuntimeError("the built-in stdlib topic task was built in a federation that trains on own data")


class _Finder:
    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            module.load_stdlib_topics = module._extract = module.iter_stdlib_sources = _tripped

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Finder())
'''


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
        self.tripwire = tmp / "tripwire"
        (self.tripwire / "site").mkdir(parents=True)
        (self.tripwire / "site" / "sitecustomize.py").write_text(TRIPWIRE)
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(self.tripwire / "site"), os.environ.get("PYTHONPATH")])),
            "FEDFUSE_TEST_TRIPWIRE": str(self.tripwire),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "HF_DATASETS_CACHE": str(tmp / "hf-datasets-cache"),
        }
        # Each institution's own folder, as deploy/ lays it out: institutions/<name>/data/train.jsonl.
        self.data = {}
        for name in INSTITUTIONS:
            folder = tmp / "institutions" / name / "data"
            folder.mkdir(parents=True)
            self.data[name] = folder / "train.jsonl"
            shutil.copyfile(DATA / f"{name}.jsonl", self.data[name])
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
        process = self.start(
            "superlink",
            [
                "flower-superlink",
                "--ssl-ca-certfile",
                str(self.certs["ca.crt"]),
                "--ssl-certfile",
                str(self.certs["superlink.crt"]),
                "--ssl-keyfile",
                str(self.certs["superlink.key"]),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--database",
                str(self.tmp / "superlink.db"),
            ],
        )
        wait_for_port(self.port, process)
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "fed"\n\n[superlink.fed]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.certs["ca.crt"]}"\n'
        )

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["flwr", *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )

    def start_supernode(self, name: str, partition: int) -> subprocess.Popen:
        keys = self.keys[name]
        node_config = (
            f"partition-id={partition} num-partitions=2 institution='{name}' "
            f"signing-key='{keys['update_signing_private']}'"
        )
        if name in self.data:
            node_config += f" data='{self.data[name]}'"
        return self.start(
            f"supernode-{name}",
            [
                "flower-supernode",
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--root-certificates",
                str(self.certs["ca.crt"]),
                "--auth-supernode-private-key",
                str(keys["supernode_auth_private"]),
                "--node-config",
                node_config,
                "--port",
                str(free_port()),
                "--max-retries",
                "3",
            ],
        )

    def tripped(self) -> list[str]:
        """Command lines of processes that built the built-in task (none, in a run on own data)."""
        return [marker.read_text() for marker in sorted(self.tripwire.glob("pid-*"))]

    def data_folders(self) -> dict[str, list[tuple[str, str]]]:
        """Each institution's data folder: (file name, SHA-256) of everything in it."""
        return {name: [(p.name, sha256(p)) for p in sorted(path.parent.iterdir())] for name, path in self.data.items()}

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


def classifier_classes(run_dir: Path) -> set[int]:
    """Output sizes of the classification head(s) in the run's last checkpoint."""
    (weights,) = sorted((run_dir / "checkpoint").glob("weights-round-*.safetensors"))[-1:]
    with safe_open(str(weights), "pt") as tensors:
        heads = [name for name in tensors.keys() if "classifier" in name and name.endswith("weight")]  # noqa: SIM118
        return {tensors.get_slice(name).get_shape()[0] for name in heads}


def test_each_supernode_trains_on_its_own_file_in_a_signed_ties_run_over_tls(federation, tmp_path):
    before = federation.data_folders()
    out = tmp_path / "run"
    done = run_app(federation, ROOT, out, **{"fraction-evaluate": 1.0})
    assert not federation.tripped(), f"the built-in task was built by: {federation.tripped()}"
    assert (out / "report.json").is_file(), done.stdout[-3000:] + done.stderr[-3000:] + federation.logs()
    report = json.loads((out / "report.json").read_text())
    assert [r["accepted"] for r in report["rounds"]] == [2, 2]
    assert [r["signatures_verified"] for r in report["rounds"]] == [2, 2]
    assert (out / "checkpoint" / "state.json").is_file() and (out / "report.md").is_file()

    for record in report["rounds"]:
        assert set(record["clients"]) == set(INSTITUTIONS), record["clients"]
        for name in INSTITUTIONS:
            client = record["clients"][name]
            assert client["data_sha256"] == sha256(federation.data[name]), f"{name} did not train on its own file"
            assert client["data_rows"] == ROWS[name]
            held_out = math.ceil(VALIDATION_FRACTION * ROWS[name])  # validation cut from that file
            assert client["num_examples"] == ROWS[name] - held_out, client
            assert client["eval_examples"] == held_out, client
            assert math.isfinite(client["loss"]) and math.isfinite(client["train_loss"])
            correct = client["accuracy"] * held_out
            assert abs(correct - round(correct)) < 1e-6, f"{name}'s accuracy is not k/{held_out}: {client}"
    assert classifier_classes(out) == {len(LABELS)}, "the merged model is not the three-label classifier"
    # No eval-data and not the built-in task: the server has no test set, so it evaluates nothing.
    for record in [report.get("initial") or {}, *report["rounds"]]:
        assert record.get("accuracy") is None and record.get("loss") is None, record
    assert federation.data_folders() == before, "a node wrote into its (read-only by design) data folder"


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
    assert record["clients"]["hospital-a"]["data_sha256"] == sha256(federation.data["hospital-a"])
    assert not federation.tripped(), f"the built-in task was built by: {federation.tripped()}"
