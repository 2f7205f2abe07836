"""Recovery: a write killed at any moment leaves a loadable checkpoint and no litter; bad state is one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from flwr.app import Context, RecordDict
from typer.testing import CliRunner

from fedfuse.algebra import Sparsifier
from fedfuse.checkpoints import recover_interrupted_writes
from fedfuse.cli.main import app
from fedfuse.client.error_feedback import ErrorFeedback
from fedfuse.client.residuals import ResidualFiles, keep_feedback, restore_feedback
from fedfuse.messages import short_reason
from fedfuse.server.run_checkpoint import CheckpointError, load_checkpoint, save_checkpoint

# Tiers are marked per test here: this module mixes e2e and integration and unit tests.

WEIGHTS = {"w": torch.arange(6.0).reshape(2, 3)}


@pytest.mark.unit
def test_leftovers_of_a_killed_write_are_removed_and_a_version_moved_aside_is_put_back(tmp_path) -> None:
    (tmp_path / ".state.json.fedfuse-tmp-ab12").write_text("half")
    aside = tmp_path / ".weights.safetensors.fedfuse-old-cd34"
    aside.mkdir()
    (aside / "old").write_text("previous version")
    (tmp_path / "keep.txt").write_text("not ours")
    recover_interrupted_writes(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "weights.safetensors"]
    assert (tmp_path / "weights.safetensors").read_text() == "previous version"


@pytest.mark.e2e
def test_a_process_killed_while_writing_a_checkpoint_leaves_the_last_one_loadable(tmp_path) -> None:
    save_checkpoint(tmp_path, 1, WEIGHTS, {"rounds": []}, {"seed": 0})
    child = textwrap.dedent(
        f"""
        import os, signal, torch, safetensors.torch as st
        from fedfuse.server import run_checkpoint as checkpoint
        def half_then_die(tensors, path):
            with open(path, "wb") as handle:
                handle.write(b"x" * 4096)
                handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.save_file = half_then_die
        checkpoint.save_checkpoint({str(tmp_path)!r}, 2, {{"w": torch.zeros(2, 3)}}, {{"rounds": []}}, {{"seed": 0}})
        """
    )
    killed = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=120)
    assert killed.returncode == -9
    assert any(".fedfuse-tmp-" in p.name for p in (tmp_path / "checkpoint").iterdir())
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.round == 1 and torch.equal(checkpoint.weights["w"], WEIGHTS["w"])
    assert not any(".fedfuse-" in p.name for p in (tmp_path / "checkpoint").iterdir())


@pytest.mark.unit
@pytest.mark.parametrize(
    ("damage", "field"),
    [
        (lambda d: d.pop("round"), "'round'"),
        (lambda d: d.update(round="two"), "'round'"),
        (lambda d: d.update(history=[]), "'history'"),
        (lambda d: d.update(kept={"x": 1}), "'kept'"),
    ],
)
def test_a_damaged_state_file_is_a_checkpoint_error_naming_the_file_and_field(tmp_path, damage, field) -> None:
    state = save_checkpoint(tmp_path, 1, WEIGHTS, {"rounds": []}, {"seed": 0})
    document = json.loads(state.read_text())
    damage(document)
    state.write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match=field) as caught:
        load_checkpoint(tmp_path)
    assert str(state) in str(caught.value)


@pytest.mark.integration
def test_resuming_from_a_damaged_checkpoint_is_one_line_and_a_nonzero_exit(tmp_path) -> None:
    state = save_checkpoint(tmp_path, 1, WEIGHTS, {"rounds": []}, {"seed": 0})
    state.write_text(state.read_text()[:40])
    result = CliRunner().invoke(app, ["simulate", "--resume", str(tmp_path), "--output-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "cannot read checkpoint state" in result.output and "Traceback" not in result.output


@pytest.mark.unit
def test_a_clients_traceback_becomes_its_exception_line_without_colour_codes() -> None:
    reported = (
        "\x1b[36m(ClientAppActor pid=7)\x1b[0m Traceback (most recent call last):\n"
        '  File "app.py", line 3, in train\n    raise ValueError("no data")\nValueError: no data\n'
    )
    assert short_reason(reported) == "ValueError: no data"
    assert short_reason(None) == "the client reported an error"
    assert len(short_reason("E" * 5000)) == 300


def _context(tmp_path) -> Context:
    return Context(1, 1, {"state-dir": str(tmp_path)}, RecordDict(), {})


@pytest.mark.unit
def test_residuals_outlive_the_flower_context_and_only_the_previous_rounds_counts(tmp_path) -> None:
    spec = Sparsifier("trim", 0.5)
    files = ResidualFiles.of(_context(tmp_path), "run-1", "partition-0/member-1", "fedfuse.residual")
    feedback = ErrorFeedback(spec)
    feedback.load_state_dict({"w": torch.ones(3)})
    for round_number in (1, 2, 3):
        keep_feedback(_context(tmp_path), "fedfuse.residual", feedback, round_number=round_number, files=files)
    assert sorted(p.name for p in files.folder.iterdir()) == ["round-0002.safetensors", "round-0003.safetensors"]
    fresh = restore_feedback(_context(tmp_path), "fedfuse.residual", spec, round_number=3, files=files)
    assert torch.equal(fresh.state_dict()["w"], torch.ones(3)), "a new Context reads the residual of round 2"
    stale = _context(tmp_path)
    keep_feedback(stale, "fedfuse.residual", ErrorFeedback(spec), round_number=5)
    assert restore_feedback(stale, "fedfuse.residual", spec, round_number=3, files=files).state_dict()["w"].sum() == 3
    assert files.folder.stat().st_mode & 0o077 == 0


def _toy_models(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(4)}, str(tmp_path / "base.safetensors"))
    save_file({"w": torch.ones(4)}, str(tmp_path / "m1.safetensors"))
    save_file({"w": torch.tensor([1.0, float("nan"), 0.0, 0.0])}, str(tmp_path / "m2.safetensors"))
    return ["--base", str(tmp_path / "base.safetensors"), "-m", str(tmp_path / "m1.safetensors"), "-m",
            str(tmp_path / "m2.safetensors"), "--method", "fedavg", "--out", str(tmp_path / "out")]  # fmt: skip


@pytest.mark.integration
def test_merge_refuses_non_finite_inputs_by_name_unless_allowed(tmp_path) -> None:
    args = _toy_models(tmp_path)
    refused = CliRunner().invoke(app, ["merge", *args])
    assert refused.exit_code == 2 and "model 2" in refused.output and "'w'" in refused.output
    assert not (tmp_path / "out").exists()
    allowed = CliRunner().invoke(app, ["merge", *args, "--allow-non-finite", "-q"])
    assert allowed.exit_code == 0 and (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("raised", "code", "line"),
    [
        (KeyboardInterrupt(), 130, "interrupted, nothing written"),
        (OSError(28, "No space left on device", "/out/model.safetensors"), 1, "No space left on device"),
    ],
)
def test_merge_interrupted_or_out_of_disk_is_one_line_and_a_nonzero_exit(tmp_path, monkeypatch, raised, code, line):
    import fedfuse.cli.merge as merge_cli

    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(merge_cli, "merge_models", fail)
    result = CliRunner().invoke(app, ["merge", *_toy_models(tmp_path)])
    assert result.exit_code == code and line in result.output and "Traceback" not in result.output


@pytest.mark.unit
def test_a_world_writable_registry_and_a_readable_signing_key_are_refused(tmp_path) -> None:
    from fedfuse.security import KeyFileError, Registry, load_signing_key, write_institution_keys

    keys = write_institution_keys(tmp_path / "keys", "clinic-a")
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"institutions": {"clinic-a": 7}}))
    with pytest.raises(KeyFileError, match="entry 'clinic-a'"):
        Registry.load(registry)
    registry.chmod(0o666)
    with pytest.raises(KeyFileError, match="writable by every user"):
        Registry.load(registry)
    signing = next(path for path in keys.values() if str(path).endswith("update-signing.key"))
    signing.chmod(0o644)
    with pytest.raises(KeyFileError, match="readable by other users"):
        load_signing_key(signing)
