"""``partition = auto``: the default works for every task — label skew where there is a label, iid otherwise."""

from __future__ import annotations

import pytest
from own_data_helpers import chat_rows, tiny_chat_llama, write_jsonl
from tiny_runs import TINY_RUN
from typer.testing import CliRunner

from fedfuse.cli.main import app
from fedfuse.settings import RunSettings

# Tiers are marked per test here: this module mixes e2e and unit tests.


@pytest.mark.unit
@pytest.mark.parametrize(
    ("given", "scheme"),
    [
        ({}, "dirichlet"),  # the built-in topics task has labels
        ({"task": "lm"}, "dirichlet"),  # built-in texts keep their topic labels to skew by
        ({"task": "classify", "data": "rows.jsonl"}, "dirichlet"),
        ({"task": "sft", "data": "chat.jsonl"}, "iid"),
        ({"task": "lm", "data": "texts.jsonl"}, "iid"),
        ({"task": "sft", "data": "chat.jsonl", "partition-column": "institution"}, "dirichlet"),
        ({"task": "sft", "data": "chat.jsonl", "partition": "natural", "partition-column": "institution"}, "natural"),
        ({"task": "classify", "data": "rows.jsonl", "partition": "iid"}, "iid"),
    ],
)
def test_auto_is_dirichlet_where_there_is_something_to_skew_by_and_iid_elsewhere(given, scheme):
    settings = RunSettings.from_run_config({}, **given)
    assert settings.source.partition == given.get("partition", "auto")
    assert settings.source.partition_scheme == scheme


@pytest.mark.e2e
def test_the_first_sft_command_a_user_types_runs_with_the_default_partition(tmp_path):
    """``fedfuse simulate --task sft --data chat.jsonl`` used to stop: dirichlet needs a column to partition by."""
    model = tiny_chat_llama(tmp_path / "model")
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(32))
    config = " ".join(f"{key}={value}" for key, value in TINY_RUN.items())
    args = ["simulate", "--task", "sft", "--model", str(model), "--data", str(data), "--clients", "2"]
    args += ["--rounds", "1", "--output-dir", str(tmp_path / "run"), "--run-config", config]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "report.json").is_file()


@pytest.mark.unit
def test_a_checkpoint_written_with_the_old_default_resumes_under_auto_and_another_scheme_is_refused(tmp_path):
    import torch

    from fedfuse.server.app import resumed_checkpoint
    from fedfuse.server.run_checkpoint import CheckpointError, save_checkpoint

    old = {**RunSettings().to_run_config(), "partition": "dirichlet"}  # the default before "auto"
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, {"rounds": []}, old)
    ours = {"num-server-rounds": 2, "resume": str(tmp_path)}
    assert resumed_checkpoint(RunSettings.from_run_config(ours)).round == 1  # auto is dirichlet here
    with pytest.raises(CheckpointError, match="partition 'dirichlet' → 'iid'"):
        resumed_checkpoint(RunSettings.from_run_config({**ours, "partition": "iid"}))
