"""Bring your own trainer: a real ``fedfuse.trainers`` entry point, found by name, used by every simulated client.

The plug-in lives in a temporary folder on PYTHONPATH as an installed distribution would (a
``*.dist-info`` with ``entry_points.txt``), so importlib.metadata discovers it in this process and in
Flower's Ray workers alike. It trains with its own loop and reports a loss only it would report.
"""

from __future__ import annotations

import importlib
import textwrap

import pytest
from tiny_runs import TINY_RUN

from fedfuse.simulation import simulate
from fedfuse.training.trainers import (
    TrainerNotFound,
    available_trainers,
    resolve_trainer,
)
from fedfuse.training.trainers.builtin import loop_trainer, sft_trainer

# Tiers are marked per test here: this module mixes e2e and unit tests.

PLUGIN = textwrap.dedent('''
    """A user's trainer: plain SGD on fedfuse's tokenized batches, marking each call in a folder."""
    import os
    from pathlib import Path

    import torch

    from fedfuse.training.trainers import TrainResult


    def sgd(model, data, settings, round):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        generator = torch.Generator().manual_seed(round.seed)
        model.train()
        for _ in range(round.steps):
            rows = torch.randint(len(data.train), (settings.training.batch_size,), generator=generator)
            batch = data.train.rows(rows).to(round.device)
            loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        marks = Path(os.environ["SGD_TRAINER_MARKS"])
        (marks / f"{round.node}-round-{round.round_number}").write_text(str(len(data.train_rows)))
        return TrainResult(loss=0.125, metrics={"sgd-steps": round.steps})
''')


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "sgd_plugin").mkdir(parents=True)
    (site / "sgd_plugin" / "__init__.py").write_text(PLUGIN)
    dist_info = site / "sgd_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: sgd-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[fedfuse.trainers]\nplain-sgd = sgd_plugin:sgd\n")
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("SGD_TRAINER_MARKS", str(marks))
    importlib.invalidate_caches()
    return marks


@pytest.mark.unit
def test_auto_picks_the_built_in_trainer_of_each_task():
    assert resolve_trainer("auto", "topics") is loop_trainer
    assert resolve_trainer("auto", "lm") is loop_trainer
    assert resolve_trainer("auto", "sft") is sft_trainer


@pytest.mark.unit
def test_unknown_trainers_are_refused_with_what_was_tried():
    with pytest.raises(TrainerNotFound, match=r"neither built in nor an installed 'fedfuse.trainers' entry point"):
        resolve_trainer("no-such-trainer", "topics")
    with pytest.raises(TrainerNotFound, match="cannot import module 'no_such_module'"):
        resolve_trainer("no_such_module:train", "topics")
    with pytest.raises(TrainerNotFound, match="has no attribute 'nope'"):
        resolve_trainer("fedfuse.settings:nope", "topics")


@pytest.mark.unit
def test_an_entry_point_trainer_is_found_by_name(installed_plugin):
    assert "plain-sgd" in available_trainers()
    assert resolve_trainer("plain-sgd", "topics").__module__ == "sgd_plugin"


@pytest.mark.e2e
@pytest.mark.slow
def test_a_simulation_trains_every_client_with_the_entry_point_trainer(installed_plugin, tmp_path):
    history = simulate(
        {
            **TINY_RUN,
            "trainer": "plain-sgd",
            "num-server-rounds": 2,
            "output-dir": str(tmp_path / "run"),
        },
        num_clients=2,
    )
    marks = sorted(p.name for p in installed_plugin.iterdir())
    assert marks == ["partition-0-round-1", "partition-0-round-2", "partition-1-round-1", "partition-1-round-2"]
    for record in history["rounds"]:
        assert record["accepted"] == 2
        assert record["train_loss"] == pytest.approx(0.125)
    assert history["rounds"][-1]["accuracy"] is not None


RECEIVED: list = []


def recording_trainer(model, data, settings, round):
    """A ``module:function`` trainer that keeps what it was handed and trains nothing."""
    RECEIVED.append(settings)
    return 0.5


@pytest.mark.unit
def test_a_trainer_receives_the_training_section_task_and_model_not_the_whole_run() -> None:
    from fedfuse.client.local_round import Shard, run_local_round
    from fedfuse.settings import RunSettings, TrainingSettings
    from fedfuse.training.trainers import TrainerSettings

    RECEIVED.clear()
    settings = RunSettings.from_run_config(
        {}, mode="full", local_steps=1, batch_size=4, max_length=16, trainer=f"{__name__}:recording_trainer"
    )
    run_local_round(settings, {}, round_number=1, run_id="r", shard=Shard(0, 2, "partition-0"))
    (received,) = RECEIVED
    assert type(received) is TrainerSettings and isinstance(received.training, TrainingSettings)
    assert received == TrainerSettings(settings.training, settings.source.task, settings.source.model)
    assert not hasattr(received, "compression") and not hasattr(received, "privacy")
