"""Specification of RegMean: the closed form, its monoid (tiers = flat), Grams on the wire, in rounds, offline."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from own_data_helpers import chat_rows, tiny_chat_llama, write_jsonl
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fedfuse.algebra import factor_names
from fedfuse.algebra.regmean import gram_of, reduce_gram, regmean_solve
from fedfuse.cli.main import app
from fedfuse.rounds import RoundEngine, UpdateSpace
from fedfuse.settings import RunSettings, SettingsError
from fedfuse.strategies import MergeState, build_strategy
from fedfuse.training.federated_dataset import Tokenized
from fedfuse.training.gram import gram_matrices
from fedfuse.wire import (
    Expectation,
    UpdateHeader,
    UpdateRejected,
    decode_partial,
    decode_update,
    encode_partial,
    encode_update,
)
from fedfuse.wire import tensors as wire_tensors

# Tiers are marked per test here: this module mixes e2e and integration and unit tests.

OUT, IN = 5, 4


def inputs(seed: int, rows: int = 12, size: int = IN) -> torch.Tensor:
    return torch.randn(rows, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def client(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs X, task vector of the linear weight, task vector of a bias) of one client."""
    generator = torch.Generator().manual_seed(1000 + seed)
    tau = torch.randn(OUT, IN, generator=generator, dtype=torch.float64)
    return inputs(seed), tau, torch.randn(OUT, generator=generator, dtype=torch.float64)


def regmean(alpha: float = 1.0, **extra):
    return build_strategy("regmean", {"alpha": alpha, **extra}, dtype="float64")


def add_client(state: MergeState, seed: int, weight: float = 1.0) -> MergeState:
    """One client's update: a linear weight with its Gram matrix, a bias and a 2-D weight without one."""
    x, tau, bias = client(seed)
    return state.add({"w": tau, "b": bias, "e": tau.flip(0)}, weight, gram={"w": gram_of(x)})


@pytest.mark.unit
def test_unregularized_regmean_is_the_least_squares_fit_of_every_clients_outputs():
    state = regmean().new_state()
    for k in range(3):
        add_client(state, k)
    merged = state.finalize()["w"]
    stacked_x = torch.cat([client(k)[0] for k in range(3)])
    stacked_y = torch.cat([client(k)[0] @ client(k)[1].T for k in range(3)])
    least_squares = torch.linalg.lstsq(stacked_x, stacked_y).solution.T
    torch.testing.assert_close(merged, least_squares, rtol=1e-9, atol=1e-9)


@pytest.mark.unit
def test_parameters_without_a_gram_are_the_weighted_mean_and_weights_scale_each_gram():
    state = regmean().new_state()
    add_client(state, 0, weight=1.0)
    add_client(state, 1, weight=3.0)
    merged = state.finalize()
    torch.testing.assert_close(merged["b"], (client(0)[2] + 3 * client(1)[2]) / 4)
    grams = [gram_of(client(k)[0]) for k in range(2)]
    expected = regmean_solve(client(0)[1] @ grams[0] + 3 * client(1)[1] @ grams[1], grams[0] + 3 * grams[1])
    torch.testing.assert_close(merged["w"], expected)


@pytest.mark.unit
def test_alpha_zero_is_a_per_input_feature_weighted_average():
    state = regmean(alpha=0.0).new_state()
    for k in range(2):
        add_client(state, k)
    diagonals = [torch.diagonal(gram_of(client(k)[0])) for k in range(2)]
    expected = (client(0)[1] * diagonals[0] + client(1)[1] * diagonals[1]) / (diagonals[0] + diagonals[1])
    torch.testing.assert_close(state.finalize()["w"], expected)
    reduced = reduce_gram(torch.ones(3, 3), 0.25)
    assert torch.equal(reduced, torch.full((3, 3), 0.25) + 0.75 * torch.eye(3))


@pytest.mark.unit
def test_a_singular_gram_sum_merges_the_unseen_input_feature_to_zero():
    x = inputs(0)
    x[:, 0] = 0.0  # no client ever saw input feature 0
    tau = client(0)[1]
    state = regmean().new_state().add({"w": tau}, gram={"w": gram_of(x)})
    merged = state.finalize()["w"]
    assert torch.isfinite(merged).all()
    assert torch.equal(merged[:, 0], torch.zeros(OUT, dtype=merged.dtype))
    torch.testing.assert_close(merged[:, 1:], tau[:, 1:])


@pytest.mark.unit
@settings(max_examples=25, deadline=None)
@given(
    weights=st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=2, max_size=6),
    cuts=st.lists(st.integers(1, 5), max_size=3),
    restore=st.booleans(),
    alpha=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
)
def test_any_split_into_tiers_gives_the_flat_result(weights, cuts, restore, alpha):
    strategy = regmean(alpha)
    flat = strategy.new_state()
    for k, weight in enumerate(weights):
        add_client(flat, k, weight)
    bounds = sorted({0, len(weights), *(c for c in cuts if c < len(weights))})
    root = strategy.new_state()
    for start, stop in itertools.pairwise(bounds):
        tier = strategy.new_state()
        for k in range(start, stop):
            add_client(tier, k, weights[k])
        if restore:  # as a gateway in another process would send it
            tier = MergeState.from_tensors(strategy, tier.to_tensors(), tier.metadata())
        strategy.combine(root, tier)
    expected, got = flat.finalize(), root.finalize()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-9)


@pytest.mark.unit
def test_bad_grams_are_refused_before_anything_is_added():
    state = regmean().new_state()
    add_client(state, 0)
    before = {key: value.clone() for key, value in state.to_tensors().items()}
    _, tau, bias = client(1)
    eye = torch.eye(IN, dtype=torch.float64)
    bad = [
        ({"w": tau, "e": tau}, {"w": eye, "e": eye}, "a Gram matrix given with some updates only"),
        ({"w": tau}, {"w": torch.eye(3, dtype=torch.float64)}, "must be a float 4 × 4 tensor"),
        ({"w": tau}, {"w": -eye}, "negative diagonal"),
        ({"w": tau}, {"w": torch.full((IN, IN), float("nan"))}, "NaN or infinite"),
        ({"w": tau, "b": bias}, {"w": eye, "b": torch.eye(OUT)}, "needs a 2-D weight"),
        ({"w": tau}, {"w": eye, "v": eye}, "names a tensor the update lacks"),
    ]
    for update, gram, message in bad:
        with pytest.raises(ValueError, match=message):
            state.add(update, gram=gram)
    assert all(torch.equal(state.to_tensors()[key], value) for key, value in before.items())
    assert state.num_updates == 1


HEADER = UpdateHeader(run_id="run", round=1, base_fingerprint="sha256:base", node_id="node-1", num_examples=12)


@pytest.mark.unit
def test_grams_travel_in_float32_beside_their_tensor_and_damaged_ones_are_rejected(monkeypatch):
    _, tau, bias = client(0)
    gram = gram_of(client(0)[0]).float()
    payload = encode_update(
        {"w": tau.float(), "b": bias.float()}, header=HEADER, value_dtype="float16", grams={"w": gram}
    )
    decoded = decode_update(payload, expect=Expectation({"w": (OUT, IN), "b": (OUT,)}))
    assert set(decoded.grams) == {"w"} and decoded.grams["w"].dtype == torch.float32
    assert torch.equal(decoded.grams["w"], gram)
    plain = decode_update(encode_update({"w": tau.float()}, header=HEADER), expect=Expectation({"w": (OUT, IN)}))
    assert plain.grams == {}
    monkeypatch.setattr(wire_tensors, "check_gram", lambda *args: None)  # a sender that skips the check
    damaged = encode_update({"w": tau.float()}, header=HEADER, grams={"w": -gram})
    monkeypatch.undo()
    with pytest.raises(UpdateRejected) as error:
        decode_update(damaged, expect=Expectation({"w": (OUT, IN)}))
    assert error.value.reason == "bad_gram"
    with pytest.raises(ValueError, match="2-D weight"):
        encode_update({"b": bias.float()}, header=HEADER, grams={"b": torch.eye(OUT)})


@pytest.mark.unit
def test_a_regmean_partial_state_survives_the_wire():
    strategy = regmean()
    state = strategy.new_state()
    for k in range(3):
        add_client(state, k)
    header = UpdateHeader(run_id="run", round=1, base_fingerprint="sha256:base", node_id="gw", num_examples=3)
    decoded = decode_partial(
        encode_partial(state, header=header),
        strategy=strategy,
        expect=Expectation({"w": (OUT, IN), "b": (OUT,), "e": (OUT, IN)}),
    )
    for name, tensor in state.finalize().items():
        torch.testing.assert_close(decoded.state.finalize()[name], tensor, rtol=0, atol=0)


@pytest.mark.unit
def test_lora_clients_grams_weight_the_delta_w_the_server_forms():
    rank, scale = 2, 2.0
    module = "layer.q"
    a_name, b_name = factor_names(module)
    space = UpdateSpace("lora-exact", {a_name: (rank, IN), b_name: (OUT, rank)}, scale)
    strategy = build_strategy("regmean", {"alpha": 1.0})
    engine = RoundEngine(strategy, space, round_number=1, weighting="uniform", max_bytes="auto")
    deltas, grams = [], []
    for k in range(2):
        generator = torch.Generator().manual_seed(k)
        a, b = torch.randn(rank, IN, generator=generator), torch.randn(OUT, rank, generator=generator)
        gram = gram_of(inputs(k).float())
        deltas.append(scale * b @ a)
        grams.append(gram)
        header = UpdateHeader(run_id="", round=1, base_fingerprint="", node_id=f"n{k}", num_examples=10)
        assert engine.offer(encode_update({a_name: a, b_name: b}, header=header, grams={a_name: gram})) is None
    header = UpdateHeader(run_id="", round=1, base_fingerprint="", node_id="n2", num_examples=10)
    refused = engine.offer(encode_update({a_name: a, b_name: b}, header=header))
    assert refused is not None and "needs Gram matrices" in refused.message
    merged = engine.merged_task_vector()[module + ".weight"]
    expected = regmean_solve(deltas[0] @ grams[0] + deltas[1] @ grams[1], grams[0] + grams[1])
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)


class EmbedThenLinear(torch.nn.Module):
    """input ids → embedding → one linear layer, taking an attention mask like a transformer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, IN)
        self.proj = torch.nn.Linear(IN, OUT)

    def forward(self, input_ids, attention_mask):
        return self.proj(self.embed(input_ids))


@pytest.mark.unit
def test_client_grams_count_real_tokens_only():
    model = EmbedThenLinear()
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    data = Tokenized(ids, mask, ids.clone(), np.zeros(2, dtype=np.int64))
    grams = gram_matrices(model, data, {"proj.weight": model.proj}, num_batches=1, batch_size=2, seed=0)
    real = model.embed(torch.tensor([1, 2, 3, 4, 5])).detach()
    torch.testing.assert_close(grams["proj.weight"], real.T @ real)


@pytest.mark.unit
def test_settings_ask_for_grams_and_refuse_what_cannot_carry_them():
    settings = RunSettings.from_run_config({}, strategy="regmean")
    assert settings.gram_batch_count == 4 and RunSettings.from_run_config({}).gram_batch_count == 0
    with pytest.raises(SettingsError, match="gram-batches >= 1"):
        RunSettings.from_run_config({}, strategy="regmean", gram_batches=0)
    with pytest.raises(SettingsError, match="lora-aggregation exact"):
        RunSettings.from_run_config({}, strategy="regmean", lora_aggregation="factors")
    with pytest.raises(SettingsError, match="RegMean sends"):
        RunSettings.from_run_config({}, strategy="regmean", dp="central", weighting="uniform")


@pytest.fixture(scope="module")
def tuned_pair(tmp_path_factory):
    """A tiny chat Llama, two 'fine-tuned' copies of it and one calibration file per copy."""
    root = tmp_path_factory.mktemp("regmean")
    base = tiny_chat_llama(root / "base")
    models = []
    for k in range(2):
        weights = load_file(base / "model.safetensors")
        generator = torch.Generator().manual_seed(k)
        tuned = {name: t + 0.05 * torch.randn(t.shape, generator=generator) for name, t in weights.items()}
        folder = root / f"tuned-{k}"
        folder.mkdir()
        for extra in base.iterdir():
            if extra.name != "model.safetensors":
                (folder / extra.name).write_bytes(extra.read_bytes())
        save_file(tuned, folder / "model.safetensors", metadata={"format": "pt"})
        models.append(folder)
    data = [write_jsonl(root / f"site-{k}.jsonl", chat_rows(12 + 4 * k)) for k in range(2)]
    return root, base, models, data


@pytest.mark.integration
def test_offline_regmean_merges_with_the_grams_each_institution_computed(tuned_pair, tmp_path):
    _, base, models, data = tuned_pair
    runner = CliRunner()
    grams = []
    for k, (model, rows) in enumerate(zip(models, data, strict=True)):
        out = tmp_path / f"grams-{k}.safetensors"
        result = runner.invoke(app, ["grams", str(model), "--data", str(rows), "--out", str(out), "--batches", "2"])
        assert result.exit_code == 0, result.output
        assert "Gram matrices" in result.output
        grams.append(out)
    stored = load_file(grams[0])
    assert "model.layers.0.self_attn.q_proj.weight" in stored and "lm_head.weight" in stored
    assert all(t.shape[0] == t.shape[1] and t.dtype == torch.float32 for t in stored.values())
    out = tmp_path / "merged"
    args = ["merge", "--method", "regmean", "--base", str(base), "--out", str(out), "--param", "alpha=0.8"]
    for model, gram in zip(models, grams, strict=True):
        args += ["--model", str(model), "--gram", str(gram)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    merged = load_file(out / "model.safetensors")
    base_weights = load_file(base / "model.safetensors")
    strategy = build_strategy("regmean", {"alpha": 0.8})
    for name in ("model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        state = strategy.new_state()
        for model, gram in zip(models, grams, strict=True):
            tau = {name: load_file(model / "model.safetensors")[name] - base_weights[name]}
            gram_file = load_file(gram)
            state.add(tau, gram={name: gram_file[name]} if name in gram_file else {})
        expected = base_weights[name] + state.finalize()[name]
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.integration
def test_offline_regmean_mistakes_are_one_line_errors(tuned_pair, tmp_path):
    root, base, models, _ = tuned_pair
    runner = CliRunner()
    common = ["merge", "--base", str(base), "--model", str(models[0]), "--model", str(models[1])]
    result = runner.invoke(app, [*common, "--method", "regmean", "--out", str(tmp_path / "a")])
    assert result.exit_code != 0 and "--gram" in result.output and "Traceback" not in result.output
    bogus = tmp_path / "bogus.safetensors"
    save_file({"model.norm.weight": torch.eye(2)}, bogus)
    result = runner.invoke(
        app, [*common, "--method", "regmean", "--gram", str(bogus), "--gram", str(bogus), "--out", str(tmp_path / "b")]
    )
    assert result.exit_code != 0 and "not a 2-D floating weight" in result.output
    result = runner.invoke(
        app, [*common, "--method", "fedavg", "--gram", str(bogus), "--gram", str(bogus), "--out", str(tmp_path / "c")]
    )
    assert result.exit_code != 0 and "does not use Gram matrices" in result.output
    result = runner.invoke(app, ["grams", str(models[0]), "--data", str(root / "missing.jsonl"), "--out", str(bogus)])
    assert result.exit_code == 2 and "missing.jsonl" in result.output and "Traceback" not in result.output


@pytest.mark.e2e
def test_a_federated_lora_round_merges_by_regmean_with_the_clients_grams(tmp_path):
    from tiny_runs import TINY_RUN

    from fedfuse.export.run import open_run
    from fedfuse.simulation import simulate

    run = {**TINY_RUN, "num-server-rounds": 1, "strategy": "regmean", "output-dir": str(tmp_path / "run")}
    history = simulate(run, num_clients=2)
    record = history["rounds"][0]
    assert record["accepted"] == 2 and record["rejected"] == 0
    assert record["client_phases"]["gram"] > 0
    settings = RunSettings.from_run_config(run)
    weights = open_run(tmp_path / "run").checkpoint.weights
    changed = [name for name in weights if ".attention.self.query.weight" in name]
    assert changed and all(torch.isfinite(weights[name]).all() for name in changed)
    assert settings.gram_batch_count == 4
