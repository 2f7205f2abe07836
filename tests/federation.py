"""A real test federation on loopback, shared by the deployment tests: a flower-superlink with TLS,
SuperNode authentication and a ``--database``, flower-supernode processes with registered keys, each
institution's own data file, and a tripwire that records any process building the built-in task.

Every process is started in its own session and stopped by ``Federation.close`` (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil
import pytest
from tiny_runs import TINY_RUN

from fedfuse.security import Registry, write_certificates, write_institution_keys
from fedfuse.settings import RunSettings

DEPLOYED = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in ("flower-superlink", "flower-supernode", "flwr")),
        reason="Flower's command-line tools are not installed",
    ),
]
"""The marks of a test module that starts a real deployed federation (end to end, slow, Flower's CLI needed)."""

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
    **TINY_RUN,
    "num-server-rounds": 2,
    "strategy": "ties",
    "sparsifier": "trim",
    "density": 0.3,
    **OWN_DATA,
}

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


def data_source(name: str) -> Path:
    """The notes an institution trains on: its own file in tests/data/deploy/, else hospital-a's (a third site)."""
    own = DATA / f"{name}.jsonl"
    return own if own.is_file() else DATA / f"{INSTITUTIONS[0]}.jsonl"


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


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a process, its session and every descendant (Flower's SuperExec, ServerApp and ClientApp
    processes, and Ray's, run in sessions of their own)."""
    try:
        family = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    for child in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    process.wait(timeout=30)


class Federation:
    """Processes of one test federation, all stopped by ``close``."""

    def __init__(self, tmp: Path, institutions: Sequence[str] = INSTITUTIONS) -> None:
        self.tmp = tmp
        self.institutions = tuple(institutions)
        self.home = tmp / "flwr-home"
        self.home.mkdir(parents=True)
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
        for name in self.institutions:
            folder = tmp / "institutions" / name / "data"
            folder.mkdir(parents=True)
            self.data[name] = folder / "train.jsonl"
            shutil.copyfile(data_source(name), self.data[name])
        self.processes: list[tuple[subprocess.Popen, Path]] = []
        self.certs = write_certificates(tmp / "certs", ["localhost", "127.0.0.1"])
        self.keys = {name: write_institution_keys(tmp / "keys", name) for name in (*self.institutions, "intruder")}
        registry = Registry({})
        for name in self.institutions:
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

    def start_superlink(self, log_name: str = "superlink") -> subprocess.Popen:
        """Start (or, after ``kill``, restart) the SuperLink: same port, same ``--database``."""
        process = self.start(
            log_name,
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
        return process

    def kill(self, process: subprocess.Popen) -> None:
        """SIGKILL one process of the federation and everything it started, as a crash of its machine would."""
        kill_tree(process)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["flwr", *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )

    def start_supernode(
        self, name: str, partition: int, max_retries: int | None = 3, extra: Mapping[str, str | int] | None = None
    ) -> subprocess.Popen:
        """Start one institution's SuperNode; ``max_retries=None`` reconnects for as long as it takes.

        ``extra``: more node config entries (a test ClientApp's knobs)."""
        keys = self.keys[name]
        node_config = (
            f"partition-id={partition} num-partitions={len(self.institutions)} institution='{name}' "
            f"signing-key='{keys['update_signing_private']}'"
        )
        if name in self.data:
            node_config += f" data='{self.data[name]}'"
        for key, value in (extra or {}).items():
            node_config += f" {key}='{value}'" if isinstance(value, str) else f" {key}={value}"
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
                *([] if max_retries is None else ["--max-retries", str(max_retries)]),
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


def run_app(fed: Federation, app_dir: Path, out: Path, **changes: object) -> subprocess.CompletedProcess:
    settings = {**TINY, "output-dir": str(out), "signer-registry": str(fed.registry), **changes}
    run_config = " ".join(f"{key}={json.dumps(value)}" for key, value in settings.items())
    return fed.flwr("run", str(app_dir), "fed", "--stream", "--run-config", run_config, timeout=600)


def write_app(app_dir: Path, module: Path, clientapp: str) -> Path:
    """A Flower app folder for ``flwr run``: fedfuse's ServerApp, the ClientApp ``clientapp`` from ``module``."""
    app_dir.mkdir(parents=True)
    shutil.copyfile(module, app_dir / module.name)
    (app_dir / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        f'[project]\nname = "fedfuse-{app_dir.name}"\nversion = "0.1.0"\ndescription = "test app"\n'
        'license = "Apache-2.0"\ndependencies = []\n\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n\n'
        '[tool.flwr.app]\npublisher = "fedfuse-tests"\n\n'
        f'[tool.flwr.app.components]\nserverapp = "fedfuse.server.app:app"\nclientapp = "{clientapp}"\n\n'
        "[tool.flwr.app.config]\n" + app_config_toml()
    )
    return app_dir
