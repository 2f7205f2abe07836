"""Faults in a real deployed federation (TLS, SuperNode authentication, signed updates, ``--database``).

One run lives through both: the SuperLink's machine "crashes" after round 1 (SIGKILL to the SuperLink and
every process it started, the ServerApp included) and the SuperLink is restarted on the same port and
database. The database still holds the run, as ``running`` (Flower would mark it ``finished:failed`` once the
dead ServerApp's heartbeat expires, about a minute); the operator ``flwr stop``s it, the SuperNodes have
reconnected by themselves (their registration survives in the database) and ``flwr run … resume=<output-dir>``
continues from round 1's checkpoint; in the resumed round one SuperNode is killed while it trains, and
the round completes with the other, the lost one recorded as ``timed_out`` at the round's deadline. Every
process is started by the test and stopped by it, also when an assertion fails.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from federation import DEPLOYED, INSTITUTIONS, ROOT, TINY, Federation, sha256

from fedfuse.server.run_checkpoint import load_checkpoint

pytestmark = DEPLOYED

# A survivor trains in ~15 s here (~30 s beside a second test worker); the lost node is waited for this long.
DEADLINE_S = 50.0
RUN = {**TINY, "num-server-rounds": 2, "min-train-nodes": 1, "timeout": DEADLINE_S}


def start_run(fed: Federation, out: Path, log: str, **changes: object) -> subprocess.Popen:
    settings = {**RUN, "output-dir": str(out), "signer-registry": str(fed.registry), **changes}
    config = " ".join(f"{key}={json.dumps(value)}" for key, value in settings.items())
    return fed.start(log, ["flwr", "run", str(ROOT), "fed", "--stream", "--run-config", config])


def wait_until(condition, what: str, fed: Federation, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout:g} s\n{fed.logs()}")
        time.sleep(0.2)


def finished_round(out: Path) -> int:
    try:
        return int(json.loads((out / "checkpoint" / "state.json").read_text())["round"])
    except (OSError, ValueError, KeyError):
        return 0


def train_messages(fed: Federation, name: str) -> int:
    return (fed.tmp / f"supernode-{name}.log").read_text().count("Receiving: train message")


def runs(fed: Federation) -> list[dict]:
    listed = fed.flwr("ls", "--format", "json")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    return json.loads(listed.stdout)["runs"]


def test_a_superlink_restart_resumes_and_a_lost_supernode_is_dropped_at_the_deadline(tmp_path):
    fed = Federation(tmp_path / "federation")
    out = tmp_path / "run"
    try:
        superlink = fed.start_superlink()
        for name in INSTITUTIONS:
            registered = fed.flwr("supernode", "register", str(fed.keys[name]["supernode_auth_public"]), "fed")
            assert registered.returncode == 0, registered.stdout + registered.stderr
        supernodes = {name: fed.start_supernode(name, p, max_retries=None) for p, name in enumerate(INSTITUTIONS)}

        first = start_run(fed, out, "flwr-run-1")
        wait_until(lambda: finished_round(out) >= 1, "round 1's checkpoint", fed)
        fed.kill(superlink)
        assert finished_round(out) == 1, "the SuperLink was killed too late: the run had already finished"
        fed.start_superlink("superlink-restarted")
        first.wait(timeout=120)
        (interrupted,) = runs(fed)
        assert interrupted["status"] == "running", interrupted  # kept by the database; its ServerApp is gone
        stopped = fed.flwr("stop", interrupted["run-id"], "fed")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert [run["status"] for run in runs(fed)] == ["finished:stopped"]
        assert load_checkpoint(out).round == 1

        trained_before = train_messages(fed, "hospital-b")
        resumed = start_run(fed, out, "flwr-run-2", resume=str(out))
        wait_until(lambda: train_messages(fed, "hospital-b") > trained_before, "hospital-b receiving round 2", fed)
        fed.kill(supernodes["hospital-b"])
        resumed.wait(timeout=300)

        assert (out / "report.json").is_file(), fed.logs()
        report = json.loads((out / "report.json").read_text())
        first_round, lost_round = report["rounds"]
        assert first_round["accepted"] == 2 and first_round["signatures_verified"] == 2
        # hospital-b is dropped once: at fedfuse's deadline, or earlier if Flower's SuperLink notices its
        # missed heartbeats first and answers for it (which of the two comes first is a race).
        assert lost_round["accepted"] == 1, lost_round
        assert lost_round["rejections"] in ({"timed_out": 1}, {"node_unavailable": 1}), lost_round
        (dropped,) = lost_round["rejection_messages"]
        assert dropped.startswith("hospital-b: "), dropped
        assert f"deadline of {DEADLINE_S:g} s" in dropped or "heartbeat" in dropped, dropped
        assert set(lost_round["clients"]) == {"hospital-a"}
        assert lost_round["clients"]["hospital-a"]["data_sha256"] == sha256(fed.data["hospital-a"])
        assert load_checkpoint(out).round == 2
        assert [p.name for p in (out / "checkpoint").iterdir() if ".fedfuse-" in p.name] == []
    finally:
        fed.close()
