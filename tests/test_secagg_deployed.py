"""SecAgg+ in a real deployed federation: one SuperNode killed mid-protocol, the round recovers without it.

Three institutions' flower-supernode processes (TLS, authenticated nodes, signed updates checked against a
signer registry) run a secure round (``secure-aggregation = "secagg+"``, frozen-A LoRA, FedAvg) in which
hospital-b's ClientApp (tests/secagg_apps.py) stalls when the ``mask`` stage arrives: it has sent its keys
(advertise) and its sealed shares (share), not its masked input. The test then SIGKILLs hospital-b's
SuperNode and everything it started; the server drops it at the round's deadline, rebuilds its pairwise
masks from the survivors' shares and merges the two survivors' sum. Every stage reply is signed and checked
(a run with a signer registry rejects an unsigned or wrongly signed reply) and counted in
``signatures_verified``. Every process is started by the test and stopped by it, also on failure.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from federation import DEPLOYED, ROOT, TINY, Federation, write_app

from fedfuse.server.run_checkpoint import load_checkpoint

pytestmark = DEPLOYED

SITES = ("hospital-a", "hospital-b", "clinic-c")
VICTIM = "hospital-b"
KILL_ROUND = 1
# An honest stage takes ~10-15 s here (up to ~30 s beside a second test worker); the stalled one is waited this long.
DEADLINE_S = 60.0
RUN = {
    **TINY,
    "num-server-rounds": 1,
    "min-train-nodes": len(SITES),
    "timeout": DEADLINE_S,
    "secure-aggregation": "secagg+",
    "lora-aggregation": "frozen-a",
    "strategy": "fedavg",
    "sparsifier": "none",
}


def start_federation(fed: Federation, marker: Path) -> dict[str, subprocess.Popen]:
    """SuperLink, the three SuperNodes registered and connected; the victim stalls at round 1's mask stage."""
    fed.start_superlink()
    for name in SITES:
        registered = fed.flwr("supernode", "register", str(fed.keys[name]["supernode_auth_public"]), "fed")
        assert registered.returncode == 0, registered.stdout + registered.stderr
    stall = {"secagg-stall-at": "mask", "secagg-stall-round": KILL_ROUND, "secagg-stall-marker": str(marker)}
    return {
        name: fed.start_supernode(name, partition, extra=stall if name == VICTIM else None)
        for partition, name in enumerate(SITES)
    }


def wait_for(path: Path, fed: Federation, run: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if run.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{VICTIM} never stalled at round {KILL_ROUND}'s mask stage\n{fed.logs()}")
        time.sleep(0.2)


def test_a_supernode_killed_between_shares_and_masked_input_is_recovered_from_shares(tmp_path):
    started = time.monotonic()
    fed = Federation(tmp_path / "federation", institutions=SITES)
    out, marker = tmp_path / "run", tmp_path / "stalled"
    app_dir = write_app(tmp_path / "secagg-app", ROOT / "tests" / "secagg_apps.py", "secagg_apps:app")
    try:
        supernodes = start_federation(fed, marker)
        settings = {**RUN, "output-dir": str(out), "signer-registry": str(fed.registry)}
        config = " ".join(f"{key}={json.dumps(value)}" for key, value in settings.items())
        run = fed.start("flwr-run", ["flwr", "run", str(app_dir), "fed", "--stream", "--run-config", config])
        wait_for(marker, fed, run, timeout=900)
        fed.kill(supernodes[VICTIM])
        run.wait(timeout=600)
        assert (out / "report.json").is_file(), fed.logs()
        report = json.loads((out / "report.json").read_text())
    finally:
        fed.close()
    print(f"wall time of the deployed SecAgg+ run: {time.monotonic() - started:.1f} s")

    (lost,) = report["rounds"]
    assert report["settings"]["signer-registry"] == str(fed.registry), report["settings"]
    # Every stage reply of the three nodes passed the signer registry: 3 × advertise and share, 2 × mask, unmask.
    assert lost["signatures_verified"] == 10, lost
    # The killed node sent keys and shares, never its masked input: dropped, its masks rebuilt from shares.
    assert (lost["secure_aggregation"]["survivors"], lost["secure_aggregation"]["dropped"]) == (2, 1), lost
    assert "aborted" not in lost["secure_aggregation"], lost
    assert lost["accepted"] == 2 and set(lost["clients"]) == set(SITES) - {VICTIM}, lost
    assert lost["rejections"] in ({"timed_out": 1}, {"node_unavailable": 1}), lost
    (dropped,) = lost["rejection_messages"]
    assert dropped.startswith(f"{VICTIM}: ") and ("'mask'" in dropped or "heartbeat" in dropped), dropped
    assert load_checkpoint(out).round == 1 and (out / "checkpoint" / "state.json").is_file()
    assert not fed.tripped(), f"the built-in task was built by: {fed.tripped()}"
