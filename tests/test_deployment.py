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

import json
import math
import subprocess
from pathlib import Path

import pytest
from federation import (
    DEPLOYED,
    INSTITUTIONS,
    LABELS,
    ROOT,
    ROWS,
    VALIDATION_FRACTION,
    Federation,
    app_config_toml,
    run_app,
    sha256,
)
from safetensors import safe_open

pytestmark = DEPLOYED

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
