"""Round checkpoints: written atomically, read back exactly, damaged ones refused."""

from __future__ import annotations

import json

import pytest
import torch

from fedfuse.server.run_checkpoint import CheckpointError, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.unit


def weights(value: float) -> dict[str, torch.Tensor]:
    return {"layer.weight": torch.full((3, 2), value), "layer.bias": torch.arange(3.0) + value}


def test_round_trip_from_run_folder_checkpoint_folder_or_state_file(tmp_path):
    state = save_checkpoint(tmp_path, 2, weights(1.0), {"rounds": [1, 2]}, {"strategy": "ties"})
    for where in (tmp_path, tmp_path / "checkpoint", state):
        checkpoint = load_checkpoint(where)
        assert checkpoint.round == 2 and checkpoint.history == {"rounds": [1, 2]}
        assert checkpoint.settings == {"strategy": "ties"}
        assert all(torch.equal(checkpoint.weights[k], v) for k, v in weights(1.0).items())


def test_a_new_round_replaces_the_previous_weights_file(tmp_path):
    save_checkpoint(tmp_path, 1, weights(1.0), {}, {})
    save_checkpoint(tmp_path, 2, weights(2.0), {}, {})
    files = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert files == ["state.json", "weights-round-0002.safetensors"]
    assert load_checkpoint(tmp_path).weights["layer.weight"][0, 0] == 2.0


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 1, weights(1.0), {}, {})
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 2, weights(2.0), {"not json": object()}, {})
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.round == 1 and checkpoint.weights["layer.weight"][0, 0] == 1.0
    assert not [p for p in (tmp_path / "checkpoint").iterdir() if p.name.startswith(".")]


def test_missing_or_damaged_checkpoints_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    state = save_checkpoint(tmp_path, 1, weights(1.0), {}, {})
    document = json.loads(state.read_text())
    document["fingerprint"] = "0" * 64
    state.write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="do not match the fingerprint"):
        load_checkpoint(tmp_path)
    state.write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path)


def files_in(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoint").iterdir())


def test_keep_zero_keeps_every_round_and_any_kept_round_reads_back_exactly(tmp_path):
    for round_number in (1, 2, 3):
        state = save_checkpoint(tmp_path, round_number, weights(float(round_number)), {}, {}, keep=0)
    assert json.loads(state.read_text())["kept"] == {
        "1": "weights-round-0001.safetensors",
        "2": "weights-round-0002.safetensors",
        "3": "weights-round-0003.safetensors",
    }
    for round_number in (1, 2, 3):
        checkpoint = load_checkpoint(tmp_path, round_number)
        assert checkpoint.round == round_number and checkpoint.kept == (1, 2, 3)
        assert all(torch.equal(checkpoint.weights[k], v) for k, v in weights(float(round_number)).items())
    assert load_checkpoint(tmp_path).round == 3, "without a round, the last one (what resume reads)"


def test_keep_n_keeps_the_last_n_rounds_and_deletes_older_files(tmp_path):
    for round_number in (1, 2, 3, 4):
        save_checkpoint(tmp_path, round_number, weights(float(round_number)), {}, {}, keep=2)
    assert files_in(tmp_path) == ["state.json", "weights-round-0003.safetensors", "weights-round-0004.safetensors"]
    assert load_checkpoint(tmp_path, 3).weights["layer.weight"][0, 0] == 3.0
    assert load_checkpoint(tmp_path).kept == (3, 4)


def test_asking_for_a_round_that_was_not_kept_names_the_kept_rounds(tmp_path):
    for round_number in (1, 2, 3):
        save_checkpoint(tmp_path, round_number, weights(float(round_number)), {}, {}, keep=2)
    with pytest.raises(CheckpointError, match=r"round 1 is not kept .*kept rounds 2, 3"):
        load_checkpoint(tmp_path, 1)


def test_old_rounds_are_deleted_only_after_the_new_state_is_in_place(tmp_path):
    save_checkpoint(tmp_path, 1, weights(1.0), {}, {}, keep=2)
    save_checkpoint(tmp_path, 2, weights(2.0), {}, {}, keep=2)
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 3, weights(3.0), {"not json": object()}, {}, keep=2)
    assert load_checkpoint(tmp_path).round == 2
    assert load_checkpoint(tmp_path, 1).weights["layer.weight"][0, 0] == 1.0, "round 1 must survive the failed write"


def test_a_fresh_run_in_the_same_folder_drops_the_later_rounds_of_the_old_one(tmp_path):
    for round_number in (1, 2, 3):
        save_checkpoint(tmp_path, round_number, weights(float(round_number)), {}, {}, keep=0)
    save_checkpoint(tmp_path, 1, weights(10.0), {}, {}, keep=0)
    assert files_in(tmp_path) == ["state.json", "weights-round-0001.safetensors"]
    assert load_checkpoint(tmp_path).kept == (1,)


def test_a_damaged_older_round_is_refused_by_its_own_fingerprint(tmp_path):
    save_checkpoint(tmp_path, 1, weights(1.0), {}, {}, keep=0)
    save_checkpoint(tmp_path, 2, weights(2.0), {}, {}, keep=0)
    save_checkpoint(tmp_path / "other", 1, weights(5.0), {}, {})
    (tmp_path / "other/checkpoint/weights-round-0001.safetensors").replace(
        tmp_path / "checkpoint/weights-round-0001.safetensors"
    )
    with pytest.raises(CheckpointError, match="do not match the fingerprint"):
        load_checkpoint(tmp_path, 1)
    assert load_checkpoint(tmp_path, 2).round == 2


def test_a_state_written_before_rounds_were_kept_reads_as_its_last_round(tmp_path):
    state = save_checkpoint(tmp_path, 2, weights(2.0), {}, {})
    document = json.loads(state.read_text())
    del document["kept"], document["kept_fingerprints"]
    state.write_text(json.dumps(document))
    assert load_checkpoint(tmp_path).kept == (2,)
    save_checkpoint(tmp_path, 3, weights(3.0), {}, {}, keep=0)
    assert load_checkpoint(tmp_path, 2).weights["layer.weight"][0, 0] == 2.0


def test_keep_must_be_a_non_negative_integer(tmp_path):
    with pytest.raises(ValueError, match="keep must be an integer >= 0"):
        save_checkpoint(tmp_path, 1, weights(1.0), {}, {}, keep=-1)
