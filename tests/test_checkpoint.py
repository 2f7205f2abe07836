"""Round checkpoints: written atomically, read back exactly, damaged ones refused."""

from __future__ import annotations

import json

import pytest
import torch

from fedfuse.server.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


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
