"""``fedfuse export``: a run's round as a Hugging Face folder (exact) or a PEFT LoRA adapter (SVD of ΔW).

Runs are written by the tests themselves: tiny models saved from configs serve as the run's ``model``
folder, and a checkpoint holds the base weights plus a known rank-3 ΔW on every LoRA target module
(plus a changed head for the classifier), with the settings a real run stores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tiny_models import save_tiny_llama
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    BertModel,
    BertTokenizer,
)
from typer.testing import CliRunner

from fedfuse.cli.main import app
from fedfuse.data import LABEL_NAMES
from fedfuse.export import ExportError, export_adapter, export_model
from fedfuse.server.run_checkpoint import save_checkpoint
from fedfuse.settings import RunSettings
from fedfuse.training.run_model import base_model, global_state, load_global_state

# Tiers are marked per test here: this module mixes integration and unit tests.

WORDS = ["the", "server", "sends", "mail", "thread", "lock", "widget", "window", "archive", "file"]
DELTA_RANK = 3
LLAMA_TARGETS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")
BERT_TARGETS = ("query.weight", "value.weight")


def save_tokenizer(folder: Path) -> None:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizer(vocab={token: i for i, token in enumerate(tokens)}).save_pretrained(folder)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama causal LM (k/v projections 8×32, the narrowest LoRA module)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    save_tokenizer(folder)
    return save_tiny_llama(folder, vocab_size=32, num_key_value_heads=1, max_position_embeddings=32)


def bert_config() -> BertConfig:
    return BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT encoder checkpoint (with its pooler) and a word-piece tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    save_tokenizer(folder)
    torch.manual_seed(0)
    BertModel(bert_config()).save_pretrained(folder)
    return folder


def delta(shape: torch.Size, seed: int) -> torch.Tensor:
    """A rank-3 change of a weight, seeded."""
    generator = torch.Generator().manual_seed(seed)
    return (
        0.1
        * torch.randn(shape[0], DELTA_RANK, generator=generator)
        @ torch.randn(DELTA_RANK, shape[1], generator=generator)
    )


def write_run(
    run_dir: Path, settings: RunSettings, rounds: tuple[int, ...] = (1,), keep: int = 1
) -> dict[int, dict[str, torch.Tensor]]:
    """Checkpoint ``rounds`` of a run: base weights + a rank-3 ΔW on every LoRA target, a moved head."""
    model, _ = base_model(settings)
    targets = LLAMA_TARGETS if settings.source.task == "lm" else BERT_TARGETS
    written = {}
    for round_number in rounds:
        state = {name: tensor.clone() for name, tensor in global_state(model).items()}
        if settings.training.mode == "lora":
            for index, name in enumerate(sorted(state)):
                if name.endswith(targets):
                    state[name] += delta(state[name].shape, 100 * round_number + index)
        for name in state:
            if name.startswith("classifier."):
                state[name] += 0.5 * round_number
        save_checkpoint(run_dir, round_number, state, {"rounds": list(rounds)}, settings.to_run_config(), keep=keep)
        written[round_number] = state
    return written


def lm_settings(llama_dir: Path, **changes: object) -> RunSettings:
    return RunSettings.from_run_config(model=str(llama_dir), task="lm", lora_rank=2, **changes)


def topics_settings(bert_dir: Path, **changes: object) -> RunSettings:
    return RunSettings.from_run_config(model=str(bert_dir), task="topics", lora_rank=2, **changes)


def ids() -> torch.Tensor:
    return torch.tensor([[2, 5, 6, 7, 8, 3], [2, 9, 10, 11, 12, 3]])


def run_cli(*args: object) -> object:
    return CliRunner().invoke(app, ["export", *map(str, args)])


def svd_tail_error(
    weights: dict[str, torch.Tensor], base: dict[str, torch.Tensor], targets: tuple[str, ...], rank: int
) -> float:
    """√(Σ over modules of the squared singular values past ``rank``) / ‖all ΔW‖_F."""
    tail = total = 0.0
    for name, tensor in weights.items():
        if name.endswith(targets):
            values = torch.linalg.svdvals((tensor - base[name]).double())
            tail += float((values[rank:] ** 2).sum())
            total += float((values**2).sum())
    return math.sqrt(tail / total)


# --- the full model ------------------------------------------------------------------------------


@pytest.mark.integration
def test_causal_lm_export_loads_with_from_pretrained_with_the_checkpoint_weights_and_logits(tmp_path, llama_dir):
    settings = lm_settings(llama_dir)
    weights = write_run(tmp_path / "run", settings)[1]
    result = run_cli(tmp_path / "run", "--out", tmp_path / "model")
    assert result.exit_code == 0, result.output
    assert "wrote model of round 1" in result.output

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    state = dict(exported.named_parameters())
    assert all(torch.equal(state[name], tensor) for name, tensor in weights.items())
    reference, _ = base_model(settings)
    load_global_state(reference, weights)
    with torch.no_grad():
        assert torch.equal(exported(ids()).logits, reference(ids()).logits)
    assert (tmp_path / "model/tokenizer_config.json").is_file() and (tmp_path / "model/model.safetensors").is_file()


@pytest.mark.unit
def test_classifier_export_carries_the_trained_head_and_the_run_s_label_names(tmp_path, bert_dir):
    weights = write_run(tmp_path / "run", topics_settings(bert_dir))[1]
    result = export_model(tmp_path / "run", tmp_path / "model")
    assert result.round == 1 and result.num_labels == len(LABEL_NAMES)
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    assert exported.config.id2label == dict(enumerate(LABEL_NAMES))
    assert exported.config.label2id == {name: i for i, name in enumerate(LABEL_NAMES)}
    state = dict(exported.named_parameters())
    assert all(torch.equal(state[name], tensor) for name, tensor in weights.items())


@pytest.mark.unit
def test_classify_runs_name_their_classes_from_the_labels_key(tmp_path, bert_dir):
    write_run(
        tmp_path / "run",
        RunSettings.from_run_config(model=str(bert_dir), task="classify", labels="negative,neutral,positive"),
    )
    export_model(tmp_path / "run", tmp_path / "model")
    config = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").config
    assert config.id2label == {0: "negative", 1: "neutral", 2: "positive"}


@pytest.mark.integration
def test_round_picks_a_kept_round(tmp_path, llama_dir):
    written = write_run(tmp_path / "run", lm_settings(llama_dir), rounds=(1, 2, 3), keep=0)
    result = run_cli(tmp_path / "run/checkpoint", "--out", tmp_path / "model", "--round", 2)
    assert result.exit_code == 0, result.output
    assert "wrote model of round 2" in result.output
    state = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "model").named_parameters())
    assert all(torch.equal(state[name], tensor) for name, tensor in written[2].items())
    assert not all(torch.equal(state[name], tensor) for name, tensor in written[3].items())


@pytest.mark.integration
def test_force_replaces_an_existing_export(tmp_path, llama_dir):
    write_run(tmp_path / "run", lm_settings(llama_dir), rounds=(1, 2), keep=0)
    export_model(tmp_path / "run", tmp_path / "model", round_number=1)
    result = run_cli(tmp_path / "run", "--out", tmp_path / "model", "--force")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "model/fedfuse_export.json").read_text())["round"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no temporary folder left behind"


# --- the LoRA adapter ----------------------------------------------------------------------------


@pytest.mark.integration
def test_full_rank_adapter_on_the_public_base_gives_the_exported_model(tmp_path, llama_dir):
    write_run(tmp_path / "run", lm_settings(llama_dir))
    export_model(tmp_path / "run", tmp_path / "model")
    result = run_cli(tmp_path / "run", "--adapter", "--rank", 8, "--out", tmp_path / "adapter")
    assert result.exit_code == 0, result.output
    assert "rank-8 LoRA adapter of round 1" in result.output

    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(llama_dir.resolve())
    assert config["r"] == 8 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids()).logits, merged(ids()).logits, atol=1e-4, rtol=0)
    error = export_adapter(tmp_path / "run", tmp_path / "again", rank=8).relative_error
    assert error < 1e-5


@pytest.mark.integration
def test_a_lower_rank_adapter_s_error_is_the_svd_tail(tmp_path, llama_dir):
    settings = lm_settings(llama_dir)
    weights = write_run(tmp_path / "run", settings)[1]
    base = global_state(base_model(settings)[0])
    result = export_adapter(tmp_path / "run", tmp_path / "adapter", rank=2)
    expected = svd_tail_error(weights, base, LLAMA_TARGETS, 2)
    assert result.relative_error > 0.01
    assert result.relative_error == pytest.approx(expected, rel=1e-4)
    module, worst = result.worst_module
    assert module.endswith(tuple(t.removesuffix(".weight") for t in LLAMA_TARGETS)) and worst >= result.relative_error
    printed = run_cli(tmp_path / "run", "--adapter", "--rank", 2, "--out", tmp_path / "cli")
    assert f"{expected:.3g} over all modules" in printed.output


@pytest.mark.unit
def test_classifier_adapter_carries_the_head_in_modules_to_save(tmp_path, bert_dir):
    write_run(tmp_path / "run", topics_settings(bert_dir))
    export_model(tmp_path / "run", tmp_path / "model")
    result = export_adapter(tmp_path / "run", tmp_path / "adapter", rank=DELTA_RANK)
    assert result.relative_error < 1e-5 and result.num_labels == len(LABEL_NAMES)
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert "classifier" in config["modules_to_save"] and config["task_type"] == "SEQ_CLS"
    base = AutoModelForSequenceClassification.from_pretrained(bert_dir, num_labels=len(LABEL_NAMES))
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids()).logits, merged(ids()).logits, atol=1e-4, rtol=0)


@pytest.mark.unit
def test_a_module_the_base_checkpoint_lacks_travels_in_the_adapter(tmp_path_factory, tmp_path):
    """A base saved without a pooler: fedfuse seeded it, a user's from_pretrained would draw it at random."""
    folder = tmp_path_factory.mktemp("bert-without-pooler")
    save_tokenizer(folder)
    torch.manual_seed(1)
    BertForMaskedLM(bert_config()).bert.save_pretrained(folder)
    write_run(tmp_path / "run", topics_settings(folder))
    export_model(tmp_path / "run", tmp_path / "model")
    export_adapter(tmp_path / "run", tmp_path / "adapter", rank=DELTA_RANK)
    assert "bert.pooler.dense" in json.loads((tmp_path / "adapter/adapter_config.json").read_text())["modules_to_save"]
    base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=len(LABEL_NAMES))
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids()).logits, merged(ids()).logits, atol=1e-4, rtol=0)


@pytest.mark.unit
def test_an_adapter_refuses_a_round_that_changed_weights_outside_lora_and_head(tmp_path, bert_dir):
    settings = topics_settings(bert_dir)
    weights = write_run(tmp_path / "run", settings)[1]
    weights["bert.embeddings.word_embeddings.weight"] += 1.0
    save_checkpoint(tmp_path / "run", 2, weights, {}, settings.to_run_config())
    with pytest.raises(ExportError, match=r"outside the LoRA modules.*word_embeddings"):
        export_adapter(tmp_path / "run", tmp_path / "adapter", rank=2)


# --- user mistakes: one red line, exit code 1 ----------------------------------------------------


def assert_one_line_error(result: object, message: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.fixture()
def lm_run(tmp_path, llama_dir) -> Path:
    write_run(tmp_path / "run", lm_settings(llama_dir), rounds=(1, 2, 3), keep=2)
    return tmp_path / "run"


@pytest.mark.integration
def test_a_missing_run_folder_is_one_line(tmp_path):
    assert_one_line_error(run_cli(tmp_path / "nowhere", "--out", tmp_path / "out"), "does not exist")


@pytest.mark.integration
def test_a_folder_without_checkpoint_is_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    assert_one_line_error(run_cli(tmp_path / "run", "--out", tmp_path / "out"), "no checkpoint at")


@pytest.mark.integration
def test_a_round_that_was_not_kept_lists_the_kept_rounds(lm_run, tmp_path):
    result = run_cli(lm_run, "--out", tmp_path / "out", "--round", 1)
    assert_one_line_error(result, "round 1 is not kept")
    assert "kept rounds 2, 3" in result.output


@pytest.mark.integration
@pytest.mark.parametrize("rank, message", [(0, "--rank must be an integer >= 1"), (9, "use 1..8")])
def test_a_rank_below_one_or_above_the_narrowest_module_is_one_line(lm_run, tmp_path, rank, message):
    assert_one_line_error(run_cli(lm_run, "--adapter", "--rank", rank, "--out", tmp_path / "out"), message)
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_adapter_without_rank_and_rank_without_adapter_are_one_line(lm_run, tmp_path):
    assert_one_line_error(run_cli(lm_run, "--adapter", "--out", tmp_path / "out"), "--adapter needs --rank")
    assert_one_line_error(run_cli(lm_run, "--rank", 2, "--out", tmp_path / "out"), "--rank applies to --adapter only")


@pytest.mark.integration
def test_an_adapter_of_a_full_run_is_one_line(tmp_path, llama_dir):
    write_run(tmp_path / "run", lm_settings(llama_dir, mode="full"))
    result = run_cli(tmp_path / "run", "--adapter", "--rank", 2, "--out", tmp_path / "out")
    assert_one_line_error(result, "--adapter needs a LoRA run")


@pytest.mark.integration
def test_an_existing_output_without_force_is_one_line_and_left_alone(lm_run, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/keep.txt").write_text("mine")
    assert_one_line_error(run_cli(lm_run, "--out", tmp_path / "out"), "pass --force")
    assert (tmp_path / "out/keep.txt").read_text() == "mine"


@pytest.mark.integration
def test_settings_from_another_fedfuse_version_are_one_line(lm_run, tmp_path):
    state = lm_run / "checkpoint/state.json"
    document = json.loads(state.read_text())
    document["settings"]["from-the-future"] = 1
    state.write_text(json.dumps(document))
    result = run_cli(lm_run, "--out", tmp_path / "out")
    assert_one_line_error(result, "do not fit this fedfuse version")
    assert "from-the-future" in result.output


@pytest.mark.integration
def test_a_run_whose_base_model_folder_is_gone_is_one_line(lm_run, tmp_path):
    state = lm_run / "checkpoint/state.json"
    document = json.loads(state.read_text())
    document["settings"]["model"] = str(tmp_path / "moved-away")
    state.write_text(json.dumps(document))
    result = run_cli(lm_run, "--out", tmp_path / "out")
    assert_one_line_error(result, "cannot rebuild the run's base model")
    assert "moved-away" in result.output
