"""SFT batches without a single assistant token: counted, warned about once, skipped, never a 0.0 loss.

A short ``max-length`` cuts the answer of a long question off entirely: the row keeps no label after
the next-token shift. The rows here are four short questions whose answers fit in ``max-length`` 24
and four long ones whose answers fall past the cut.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from own_data_helpers import chat_rows
from transformers import LlamaForCausalLM

from fedfuse.client.local_round import finite_metrics
from fedfuse.data.files import DataSource
from fedfuse.models import load_tokenizer
from fedfuse.settings import RunSettings
from fedfuse.training.client_datasets import ClientDatasets
from fedfuse.training.federated_dataset import Tokenized
from fedfuse.training.tasks import IGNORE, tokenize_rows
from fedfuse.training.trainers import TrainerSettings, TrainingRound, TrainResult
from fedfuse.training.trainers.builtin import EMPTY_BATCHES, sft_trainer, supervised_tokens

pytestmark = pytest.mark.unit

MAX_LENGTH = 24
ANSWERED = np.arange(0, 4)
CUT_OFF = np.arange(4, 8)


@pytest.fixture(scope="module")
def chat_model(tiny_chat_llama_dir: Path) -> Path:
    return tiny_chat_llama_dir


@pytest.fixture(scope="module")
def tokens(chat_model: Path) -> Tokenized:
    """Rows 0-3 keep their answer at max-length 24; rows 4-7 lose it behind a long question."""
    long_questions = [
        {
            "messages": [
                {"role": "user", "content": "please " * 30 + f"what is {i} plus one"},
                {"role": "assistant", "content": f"it is {i + 1}"},
            ]
        }
        for i in range(4)
    ]
    settings = RunSettings.from_run_config(task="sft", data="chat.jsonl", model=str(chat_model), max_length=MAX_LENGTH)
    rows = datasets.Dataset.from_list([*chat_rows(4), *long_questions])
    tokenized = tokenize_rows(rows, load_tokenizer(str(chat_model)), settings, label_names=(), source="chat.jsonl")
    learnable = (tokenized.labels[:, 1:] != IGNORE).any(dim=1)
    assert learnable[ANSWERED].all() and not learnable[CUT_OFF].any(), "the premise: four rows are cut off"
    return tokenized


def sft_round(
    chat_model: Path, tokens: Tokenized, *, steps: int, batch_size: int, learning_rate: float
) -> tuple[TrainResult, LlamaForCausalLM]:
    """One round of the built-in SFT trainer on ``tokens`` from the tiny model's initial weights."""
    model = LlamaForCausalLM.from_pretrained(chat_model)
    settings = RunSettings.from_run_config(
        task="sft", model=str(chat_model), max_length=MAX_LENGTH, batch_size=batch_size, learning_rate=learning_rate
    )
    empty = datasets.Dataset.from_list([])
    data = ClientDatasets(tokens, tokens, empty, empty, None, "sft", (), ("all",), DataSource("chat.jsonl", 8, ""))
    context = TrainingRound(1, "site-0", seed=7, steps=steps, device=torch.device("cpu"))
    result = sft_trainer(model, data, TrainerSettings(settings.training, "sft", str(chat_model)), context)
    return result, model


def warnings_about_empty_batches(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "assistant token" in r.getMessage()
    ]


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_only_labels_after_the_next_token_shift_count_as_supervised() -> None:
    labels = torch.full((2, 5), IGNORE)
    labels[0, 0] = 7  # the first token is never predicted: no loss
    assert supervised_tokens(labels) == 0
    labels[1, 4] = 9
    assert supervised_tokens(labels) == 1


def test_a_round_without_any_assistant_token_reports_no_loss_counts_the_batches_and_warns_once(
    chat_model: Path, tokens: Tokenized, caplog: pytest.LogCaptureFixture
) -> None:
    before = weights(LlamaForCausalLM.from_pretrained(chat_model))
    with caplog.at_level(logging.WARNING):
        result, model = sft_round(chat_model, tokens.rows(CUT_OFF), steps=4, batch_size=2, learning_rate=1e-2)
    assert math.isnan(result.loss), f"a loss over zero tokens must not be reported, got {result.loss}"
    assert result.metrics[EMPTY_BATCHES] == 4
    reported = finite_metrics({"train-loss": result.loss, **result.metrics})
    assert "train-loss" not in reported and reported[EMPTY_BATCHES] == 4
    (message,) = warnings_about_empty_batches(caplog)
    assert "4 of 4" in message and f"max-length {MAX_LENGTH}" in message and "raise max-length" in message
    for name, value in weights(model).items():
        assert torch.equal(value, before[name]), f"{name} moved without a single supervised token"


def test_a_mixed_round_averages_the_loss_over_the_batches_with_assistant_tokens_only(
    chat_model: Path, tokens: Tokenized, caplog: pytest.LogCaptureFixture
) -> None:
    model = LlamaForCausalLM.from_pretrained(chat_model)
    with torch.no_grad():
        expected = np.mean(
            [
                float(model(input_ids=row.input_ids, attention_mask=row.attention_mask, labels=row.labels).loss)
                for row in (tokens.rows([i]) for i in ANSWERED)
            ]
        )
    with caplog.at_level(logging.WARNING):
        # One row per batch, one epoch, and a learning rate too small to move fp32 weights: each
        # answered row's loss is its loss under the initial weights, whatever order the rows come in.
        result, _ = sft_round(chat_model, tokens, steps=8, batch_size=1, learning_rate=1e-30)
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.metrics[EMPTY_BATCHES] == 4
    (message,) = warnings_about_empty_batches(caplog)
    assert "4 of 8" in message


def test_an_empty_batch_takes_no_optimizer_step_and_no_nan_reaches_the_weights(
    chat_model: Path, tokens: Tokenized, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = []
    adamw_step = torch.optim.AdamW.step

    def counted(self: torch.optim.AdamW, *args: object, **kwargs: object) -> object:
        steps.append(1)
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counted)
    before = weights(LlamaForCausalLM.from_pretrained(chat_model))
    result, model = sft_round(chat_model, tokens, steps=8, batch_size=1, learning_rate=1e-2)
    assert len(steps) == 4, "one AdamW step per batch with assistant tokens, none for the four without"
    assert math.isfinite(result.loss) and result.metrics[EMPTY_BATCHES] == 4
    after = weights(model)
    assert all(torch.isfinite(value).all() for value in after.values())
    assert any(not torch.equal(value, before[name]) for name, value in after.items()), "the answered rows train"


def test_a_round_whose_batches_all_hold_answers_reports_zero_empty_batches_and_no_warning(
    chat_model: Path, tokens: Tokenized, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        result, _ = sft_round(chat_model, tokens.rows(ANSWERED), steps=2, batch_size=2, learning_rate=1e-2)
    assert math.isfinite(result.loss) and result.loss > 0
    assert result.metrics[EMPTY_BATCHES] == 0 and not warnings_about_empty_batches(caplog)
