"""AdaMerging: coefficients learned by Adam on the merged model's prediction entropy, without labels.

The candidates are built so the entropy-minimising direction is known: ``sharp`` scales the output layer up
(θ_head·(1 + 19c): sharper predictions as c grows), ``flat`` scales it down and adds noise to the blocks
(flatter predictions as c grows). Learning must lower the entropy and raise sharp's coefficient over flat's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import tiny_llama_config
from transformers import LlamaForCausalLM, LlamaForSequenceClassification
from typer.testing import CliRunner

from fedfuse.automerge.adamerging import (
    REPORT_JSON,
    REPORT_PNG,
    AdaMergingSettings,
    adamerging,
    read_prompts,
    save_adamerging,
)
from fedfuse.automerge.coefficients import Candidates
from fedfuse.automerge.inputs import MergeInputs, load_base, load_inputs
from fedfuse.cli.main import app
from fedfuse.data.files import DataError

# Tiers are marked per test here: the library's tests are unit, the command's (CliRunner) integration.

PROMPTS = ["What is two plus two?", "Sort these letters: b a c", "Repeat hello", "Name a colour", "Count to three"]
FAST = {"max_new_tokens": 6, "max_length": 48, "batch_size": 8}


def _sharp_and_flat(model: torch.nn.Module, head: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Task vectors: ``head`` × 19 (sharper), and ``head`` × −0.9 plus noise on the blocks' projections."""
    parameters = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(0)
    noise = {
        n: 0.05 * torch.randn(p.shape, generator=generator)
        for n, p in parameters.items()
        if ".layers." in n and n.endswith("proj.weight")
    }
    weight = parameters[head].detach()
    return {head: 19 * weight}, {**noise, head: -0.9 * weight}


def _inputs(base: Path) -> MergeInputs:
    model, tokenizer, causal = load_base(base)
    sharp, flat = _sharp_and_flat(model, "lm_head.weight")
    return MergeInputs(model, tokenizer, Candidates.build(["sharp", "flat"], [sharp, flat]), causal)


def _save_model(base: Path, out: Path, vector: dict[str, torch.Tensor]) -> Path:
    """``base`` + ``vector`` saved as a model folder (a 'fine-tuned' candidate)."""
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in vector:
                parameter.add_(vector[name])
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def folders(tiny_chat_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The base, sharp and flat model folders, two LoRA adapters of the base, and a prompts file."""
    root = tmp_path_factory.mktemp("adamerging")
    base = tiny_chat_llama_dir
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    sharp, flat = _sharp_and_flat(model, "lm_head.weight")
    paths = {
        "base": base,
        "sharp": _save_model(base, root / "sharp", sharp),
        "flat": _save_model(base, root / "flat", flat),
    }
    for seed in (1, 2):
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(base, dtype=torch.float32), config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_" in name:
                    parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
        peft_model.save_pretrained(root / f"adapter{seed}")
        paths[f"adapter{seed}"] = root / f"adapter{seed}"
    prompts = root / "prompts.jsonl"
    rows = [{"prompt": PROMPTS[0]}, {"messages": [{"role": "user", "content": PROMPTS[1]}]}, *PROMPTS[2:]]
    prompts.write_text(
        "".join(json.dumps(r if isinstance(r, dict) else {"prompt": r}) + "\n" for r in rows), encoding="utf-8"
    )
    paths["prompts"] = prompts
    return paths


@pytest.mark.unit
def test_task_wise_learning_lowers_the_entropy_and_favours_the_sharpening_candidate(folders):
    settings = AdaMergingSettings(layer_wise=False, steps=12, learning_rate=0.05, refresh_every=0, **FAST)
    result = adamerging(_inputs(folders["base"]), PROMPTS, settings)
    assert result.coefficients.shape == (2, 1) and result.labels == ("sharp", "flat")
    assert result.history[-1] < result.history[0] - 0.5 and result.final_entropy < result.history[-1]
    sharp, flat = result.coefficients[:, 0].tolist()
    assert sharp > 0.7 and flat < 0.1  # both started at 0.3: sharp rose, flat fell
    assert len(result.trajectory) == 13 and result.refreshed_at == [0]
    assert all(0.0 <= x <= 1.0 for row in result.trajectory for k in row for x in k)


@pytest.mark.unit
def test_layer_wise_learns_one_coefficient_per_candidate_and_block_and_refreshes_the_answers(folders):
    settings = AdaMergingSettings(layer_wise=True, steps=5, learning_rate=0.1, refresh_every=2, **FAST)
    inputs = _inputs(folders["base"])
    before = {n: p.detach().clone() for n, p in inputs.model.named_parameters()}
    result = adamerging(inputs, PROMPTS, settings)
    assert result.coefficients.shape == (2, 2) and result.group_blocks == [[0], [1]]
    assert result.refreshed_at == [0, 2, 4]
    # the head is in the last block's group, whichever candidate names it first: there sharp rises, flat falls
    assert result.coefficients[0, 1] > 0.6 and result.coefficients[1, 1] < 0.1
    assert all(torch.equal(p, before[n]) for n, p in inputs.model.named_parameters())  # left as the base
    record = result.to_json(settings)
    assert set(record["coefficients"]) == {"sharp", "flat"} and len(record["entropy"]["per_step"]) == 5


@pytest.mark.unit
def test_adapters_learn_and_write_base_plus_the_weighted_low_rank_changes(folders, tmp_path):
    adapters = [folders["adapter1"], folders["adapter2"]]
    inputs = load_inputs(folders["base"], adapters=adapters)
    settings = AdaMergingSettings(layer_wise=True, steps=3, learning_rate=0.1, refresh_every=0, **FAST)
    result = adamerging(inputs, PROMPTS, settings)
    assert result.coefficients.shape == (2, 2) and not torch.allclose(result.coefficients, torch.tensor(0.3))
    out = save_adamerging(inputs, folders["base"], result, settings, tmp_path / "merged")
    written = load_file(out / "model.safetensors")
    base = load_file(folders["base"] / "model.safetensors")
    deltas = []
    for adapter in adapters:  # each adapter's ΔW through PEFT's own merge: independent of fedfuse's reading
        merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(folders["base"]), adapter)
        state = merged.merge_and_unload().state_dict()
        deltas.append({n: state[n] - base[n] for n in base})
    changed = 0
    for name, tensor in base.items():
        group = 1 if ".layers.1." in name else 0
        expected = tensor + sum(result.coefficients[k, group] * deltas[k][name] for k in range(2))
        torch.testing.assert_close(written[name], expected, rtol=1e-5, atol=1e-6, msg=name)
        changed += int(not torch.equal(written[name], tensor))
    assert changed == 4  # q_proj and v_proj of both blocks
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert json.loads((out / REPORT_JSON).read_text())["labels"] == ["adapter1", "adapter2"]
    assert (out / REPORT_PNG).stat().st_size > 1000


@pytest.mark.unit
def test_a_failure_while_writing_leaves_no_folder(folders, tmp_path, monkeypatch):
    inputs = _inputs(folders["base"])
    settings = AdaMergingSettings(layer_wise=False, steps=1, refresh_every=0, **FAST)
    result = adamerging(inputs, PROMPTS[:2], settings)

    def broken(*_args: object) -> None:
        raise RuntimeError("disk gone")

    monkeypatch.setattr("fedfuse.automerge.adamerging.plot_adamerging", broken)
    with pytest.raises(RuntimeError, match="disk gone"):
        save_adamerging(inputs, folders["base"], result, settings, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.unit
def test_a_hub_base_is_written_from_the_loaded_model_with_the_merge_in_it(folders, tmp_path, monkeypatch):
    inputs = _inputs(folders["base"])
    settings = AdaMergingSettings(layer_wise=True, steps=2, learning_rate=0.2, refresh_every=0, **FAST)
    result = adamerging(inputs, PROMPTS[:2], settings)
    before = {n: p.detach().clone() for n, p in inputs.model.named_parameters()}
    monkeypatch.setattr("fedfuse.models.loading.resolve_model_source", lambda _base: "org/tiny-chat-llama")
    out = save_adamerging(inputs, "org/tiny-chat-llama", result, settings, tmp_path / "merged")
    written = load_file(out / "model.safetensors")
    c = result.coefficients
    expected_head = before["lm_head.weight"] * (1 + 19 * c[0, 1] - 0.9 * c[1, 1])
    torch.testing.assert_close(written["lm_head.weight"], expected_head, rtol=1e-5, atol=1e-6)
    noisy = "model.layers.0.self_attn.q_proj.weight"
    _, flat = _sharp_and_flat(inputs.model, "lm_head.weight")
    torch.testing.assert_close(written[noisy], before[noisy] + c[1, 0] * flat[noisy], rtol=1e-5, atol=1e-6)
    assert all(torch.equal(p, before[n]) for n, p in inputs.model.named_parameters())  # the base again
    assert (out / "tokenizer_config.json").is_file() and (out / REPORT_JSON).is_file()


@pytest.mark.unit
def test_a_classifier_learns_from_texts_without_labels(tiny_chat_llama_dir, tmp_path):
    from fedfuse.models.loading import load_tokenizer

    tokenizer = load_tokenizer(tiny_chat_llama_dir)
    config = tiny_llama_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_labels=3)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    sharp, _ = _sharp_and_flat(model, "score.weight")
    flat = {"score.weight": -0.9 * model.score.weight.detach()}  # the head alone: noise may sharpen 3 classes
    for label, vector in (("sharp", sharp), ("flat", flat)):
        with torch.no_grad():
            tuned = LlamaForSequenceClassification(config)
            tuned.load_state_dict(model.state_dict())
            for name, parameter in tuned.named_parameters():
                parameter.add_(vector.get(name, torch.zeros_like(parameter)))
        tuned.save_pretrained(tmp_path / label)
    inputs = load_inputs(tmp_path / "base", models=[tmp_path / "sharp", tmp_path / "flat"])
    assert not inputs.causal
    settings = AdaMergingSettings(layer_wise=False, steps=10, learning_rate=0.1, **FAST)
    result = adamerging(inputs, PROMPTS * 2, settings)
    assert result.final_entropy < result.history[0] - 0.05
    assert result.coefficients[0, 0] > 0.6 and result.coefficients[1, 0] < 0.15


@pytest.mark.unit
def test_prompts_come_from_prompt_messages_or_text_columns(folders, tmp_path):
    assert read_prompts(folders["prompts"]) == PROMPTS
    (tmp_path / "bad.jsonl").write_text('{"answer": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="needs a column messages, prompt, text"):
        read_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match=r"init 1\.5 lies outside"):
        AdaMergingSettings(init=1.5).check()


def _cli(*args: object):
    return CliRunner().invoke(app, ["merge", "adamerging", *(str(a) for a in args)])


@pytest.mark.integration
def test_the_command_writes_the_model_its_record_and_plot(folders, tmp_path):
    out = tmp_path / "merged"
    common = ["--base", folders["base"], "-m", folders["sharp"], "-m", folders["flat"], "--prompts", folders["prompts"]]
    fast = ["--steps", 4, "--max-new-tokens", 4, "--max-length", 48, "--learning-rate", 0.1, "--refresh-every", 2]
    result = _cli(*common, *fast, "--task-wise", "--out", out)
    assert result.exit_code == 0, result.output
    assert "entropy" in result.output and "sharp" in result.output
    record = json.loads((out / REPORT_JSON).read_text())
    assert record["settings"]["layer_wise"] is False and record["entropy"]["refreshed_at"] == [0, 2]
    c_sharp, c_flat = record["coefficients"]["sharp"][0], record["coefficients"]["flat"][0]
    assert c_sharp > c_flat
    base, written = load_file(folders["base"] / "model.safetensors"), load_file(out / "model.safetensors")
    expected = base["lm_head.weight"] * (1 + 19 * c_sharp - 0.9 * c_flat)
    torch.testing.assert_close(written["lm_head.weight"], expected, rtol=1e-4, atol=1e-6)
    assert (out / REPORT_PNG).is_file() and (out / "tokenizer_config.json").is_file()
    again = _cli(*common, *fast, "--out", out)
    assert again.exit_code == 2 and "--force" in again.output


@pytest.mark.integration
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--prompts", "missing.jsonl"], "missing.jsonl does not exist"),
        (["--bounds", "1,0"], "--bounds must have LO < HI"),
        (["--init", "2"], "init 2.0 lies outside the bounds"),
        (["--device", "toaster"], "device must be cpu, cuda, cuda:N or mps"),
    ],
)
def test_user_mistakes_are_one_line_with_exit_code_2(folders, tmp_path, change, message):
    args = {"--base": folders["base"], "--prompts": folders["prompts"], "--out": tmp_path / "merged"}
    args.update(dict(zip(change[::2], change[1::2], strict=True)))
    flat = [x for pair in args.items() for x in pair]
    result = _cli(*flat, "-m", folders["sharp"], "-m", folders["flat"])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "merged").exists()


@pytest.mark.unit
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_coefficients_are_those_learned_on_the_cpu(folders):
    from fedfuse.automerge.objectives import chat_rows

    settings = AdaMergingSettings(layer_wise=True, steps=6, learning_rate=0.05, **FAST)
    cpu_inputs = _inputs(folders["base"])
    rows = chat_rows(cpu_inputs.tokenizer, [(p, "one two three") for p in PROMPTS], 48)  # fixed: no greedy ties
    on_cpu = adamerging(cpu_inputs, rows, settings)
    inputs = _inputs(folders["base"])
    on_gpu = adamerging(inputs, rows, AdaMergingSettings(**{**settings.__dict__, "device": "cuda"}))
    assert next(inputs.model.parameters()).is_cuda
    torch.testing.assert_close(on_gpu.coefficients, on_cpu.coefficients, rtol=0, atol=1e-3)
    assert on_gpu.history == pytest.approx(on_cpu.history, rel=1e-3)
    answered = adamerging(inputs, PROMPTS, AdaMergingSettings(**{**settings.__dict__, "steps": 2}))  # generates on it
    assert answered.history[-1] < answered.history[0]
