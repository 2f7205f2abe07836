"""One partial-state format: ``--partial-out`` files are gateway payloads, written and read blob by blob."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fedfuse.wire.container_file as container_file
from fedfuse.algebra import Sparsifier, apply_task_vector, dare_drop, sparsify_update, task_vector, ties_trim
from fedfuse.offline import MergeInputError, combine_partials, merge_models
from fedfuse.strategies import FedAvg, get_strategy, register_strategy
from fedfuse.wire import Expectation, UpdateHeader, UpdateRejected, decode_partial, encode_partial, fingerprint
from fedfuse.wire.partial_file import PartialWriter, open_partial

pytestmark = pytest.mark.unit

HEADER = UpdateHeader("run-1", 3, "sha256:base", "gateway-eu", num_examples=40, metrics={"members": 2})


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def state_of(name: str, **params):
    """A state over dense, sparse and mostly-zero tensors (so some statistics travel sparse, some dense)."""
    strategy = get_strategy(name, **params)
    state = strategy.new_state()
    for k in range(3):
        update = {
            "a": randn(8, seed=k),
            "a.b": ties_trim(randn(30, 8, seed=10 + k), 0.2),
            "c": dare_drop(randn(200, seed=20 + k), 0.05, seed=k),
        }
        fisher = (
            {n: randn(*t.shape, seed=30 + k).abs() for n, t in update.items()}
            if strategy.capabilities.needs_fisher
            else None
        )
        if fisher is not None:
            update = {n: t.to_dense() if hasattr(t, "to_dense") else t for n, t in update.items()}
        state.add(update, weight=k + 1, fisher=fisher)
    return strategy, state


def one_parameter(strategy, state, name: str):
    """The state's statistics of parameter ``name`` alone (what the offline loop holds at a time)."""
    part = strategy.new_state()
    part.shapes, part.stats = {name: state.shapes[name]}, {name: state.stats[name]}
    part.stat_shapes = {name: state.stat_shapes[name]}
    part.total_weight, part.num_updates = state.total_weight, state.num_updates
    return part


@pytest.mark.parametrize(
    "name, params",
    [("fedavg", {}), ("ties", {"vote": "count"}), ("fisher", {}), ("task_arithmetic", {"dtype": "float64"})],
)
def test_a_file_written_parameter_by_parameter_is_the_encode_partial_payload(tmp_path, monkeypatch, name, params):
    monkeypatch.setattr(container_file, "CHUNK", 7)  # copy and checksum in many small pieces
    strategy, state = state_of(name, **params)
    with PartialWriter(tmp_path / "p", strategy=strategy, metadata=state.metadata()) as writer:
        for parameter in ("c", "a.b", "a"):  # any order: the file lays blobs out by key
            writer.add(one_parameter(strategy, state, parameter))
        size = writer.finish(HEADER)
    data = encode_partial(state, header=HEADER)
    assert (tmp_path / "p").read_bytes() == data and size == len(data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # the spool left nothing behind
    with open_partial(tmp_path / "p") as opened:
        opened.check(strategy, Expectation({"a": (8,), "a.b": (30, 8), "c": (200,)}))
        assert opened.header == HEADER
        decoded = opened.state_of(["a.b"])
    assert list(decoded.stats) == ["a.b"]
    for stat, tensor in state.stats["a.b"].items():
        assert torch.equal(decoded.stats["a.b"][stat], tensor)


def test_a_state_added_with_other_scalars_is_refused(tmp_path) -> None:
    strategy, state = state_of("fedavg")
    other = one_parameter(strategy, state, "a")
    other.total_weight += 1
    with (
        PartialWriter(tmp_path / "p", strategy=strategy, metadata=state.metadata()) as writer,
        pytest.raises(ValueError, match=r"state scalars"),
    ):
        writer.add(other)


def corrupt(data: bytes, how: str) -> bytes:
    if how == "flipped":
        return data[:-3] + bytes([data[-3] ^ 1]) + data[-2:]
    if how == "truncated":
        return data[:-5]
    if how == "trailing":
        return data + b"\0"
    return data[:4]


@pytest.mark.parametrize(
    "how, reason",
    [("flipped", "corrupted"), ("truncated", "truncated"), ("trailing", "corrupted"), ("stub", "truncated")],
)
def test_a_damaged_file_is_refused_for_the_reason_its_bytes_are(tmp_path, how, reason) -> None:
    strategy, state = state_of("ties")
    damaged = corrupt(encode_partial(state, header=HEADER), how)
    (tmp_path / "p").write_bytes(damaged)
    with pytest.raises(UpdateRejected) as from_file:
        open_partial(tmp_path / "p")
    with pytest.raises(UpdateRejected) as from_bytes:
        decode_partial(damaged, strategy=strategy, expect=Expectation({}, allow_missing=True))
    assert from_file.value.reason == from_bytes.value.reason == reason


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path) -> None:
    _, state = state_of("fedavg")
    (tmp_path / "p").write_bytes(encode_partial(state, header=HEADER))
    with pytest.raises(UpdateRejected) as info:
        open_partial(tmp_path / "p", max_bytes=100)
    assert info.value.reason == "too_large"


# ---------------------------------------------------------------- offline merge ↔ gateways


@pytest.fixture
def model_files(tmp_path) -> dict:
    base = {"w": randn(12, 6, seed=1), "b": randn(6, seed=2), "frozen": randn(4, seed=3), "step": torch.tensor(5)}
    save_file(base, tmp_path / "base.safetensors")
    tuned = []
    for k in range(3):
        model = {n: t + 0.1 * randn(*t.shape, seed=50 + k) if n in ("w", "b") else t for n, t in base.items()}
        save_file(model, tmp_path / f"m{k}.safetensors")
        tuned.append(model)
    return {
        "base": base,
        "tuned": tuned,
        "base_path": tmp_path / "base.safetensors",
        "models": [tmp_path / f"m{k}.safetensors" for k in range(3)],
    }


def in_memory_state(files: dict, strategy, ks, names=("w", "b", "frozen")):
    state = strategy.new_state()
    for k in ks:
        tau = task_vector({n: files["tuned"][k][n] for n in names}, {n: files["base"][n] for n in names})
        state.add(sparsify_update(tau, Sparsifier(strategy.default_sparsifier, 0.5), None), weight=k + 1)
    return state


def test_a_partial_out_file_decodes_with_decode_partial(tmp_path, model_files) -> None:
    merge_models(
        model_files["base_path"],
        model_files["models"][:2],
        method="ties",
        density=0.5,
        weights=[1, 2],
        partial_out=tmp_path / "group",
    )
    strategy = get_strategy("ties")
    shapes = {"w": (12, 6), "b": (6,), "frozen": (4,)}
    base_fp = fingerprint(load_file(model_files["base_path"]))
    decoded = decode_partial(
        (tmp_path / "group").read_bytes(), strategy=strategy, expect=Expectation(shapes, base_fingerprint=base_fp)
    )
    expected = in_memory_state(model_files, strategy, [0, 1])
    assert decoded.state.num_updates == 2 and decoded.state.total_weight == 3.0
    assert decoded.header.sparsifier == Sparsifier("trim", 0.5)
    for name, stats in expected.stats.items():
        for stat, tensor in stats.items():
            assert torch.equal(decoded.state.stats[name][stat], tensor), (name, stat)


def test_a_gateway_payload_saved_to_a_file_combines_with_an_offline_group(tmp_path, model_files) -> None:
    """A gateway merged models 0 and 1 against the base's weights; an offline group holds model 2."""
    strategy = get_strategy("ties")
    gateway = in_memory_state(model_files, strategy, [0, 1], names=("w", "b"))  # "frozen" never trained
    header = UpdateHeader("run-1", 1, fingerprint(load_file(model_files["base_path"])), "gateway-eu", num_examples=9)
    Path(tmp_path / "gateway.payload").write_bytes(encode_partial(gateway, header=header))
    combine_partials([tmp_path / "gateway.payload"], base=model_files["base_path"], out=tmp_path / "alone")
    alone = load_file(tmp_path / "alone" / "model.safetensors")
    expected = apply_task_vector(model_files["base"], gateway.finalize())
    for name in expected:
        assert torch.equal(alone[name], expected[name]), name
    assert torch.equal(alone["frozen"], model_files["base"]["frozen"])

    group = strategy.new_state()
    tau = task_vector(
        {n: model_files["tuned"][2][n] for n in ("w", "b")}, {n: model_files["base"][n] for n in ("w", "b")}
    )
    group.add(sparsify_update(tau, Sparsifier("trim", 0.5), None), weight=3)
    Path(tmp_path / "group.payload").write_bytes(encode_partial(group, header=header))
    combine_partials(
        [tmp_path / "gateway.payload", tmp_path / "group.payload"],
        base=model_files["base_path"],
        partial_out=tmp_path / "region",
    )
    region = decode_partial(
        (tmp_path / "region").read_bytes(), strategy=strategy, expect=Expectation({"w": (12, 6), "b": (6,)})
    ).state
    flat = in_memory_state(model_files, strategy, [0, 1, 2], names=("w", "b")).finalize()
    for name, tensor in region.finalize().items():
        torch.testing.assert_close(tensor, flat[name], rtol=1e-6, atol=1e-7)


def test_a_partial_made_against_other_base_weights_is_refused(tmp_path, model_files) -> None:
    merge_models(model_files["base_path"], model_files["models"], method="fedavg", partial_out=tmp_path / "p")
    moved = {n: t + 1 if t.is_floating_point() else t for n, t in model_files["base"].items()}
    save_file(moved, tmp_path / "moved.safetensors")  # same names, shapes and dtypes: other weights
    with pytest.raises(MergeInputError, match=r"p was made against other base weights than .*moved.safetensors"):
        combine_partials([tmp_path / "p"], base=tmp_path / "moved.safetensors", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_crash_while_writing_a_partial_leaves_no_file(tmp_path, model_files, monkeypatch) -> None:
    calls = []
    real_add = PartialWriter.add

    def failing_add(self, state):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        real_add(self, state)

    monkeypatch.setattr(PartialWriter, "add", failing_add)
    out = tmp_path / "outputs"
    out.mkdir()
    with pytest.raises(RuntimeError, match=r"disk on fire"):
        merge_models(model_files["base_path"], model_files["models"], method="fedavg", partial_out=out / "p")
    assert list(out.iterdir()) == []


class NotAMonoid(FedAvg):
    """A stand-in for a robust method (median, Krum) whose state cannot be summed."""

    capabilities = dataclasses.replace(FedAvg.capabilities, mergeable=False)


def test_methods_declared_not_mergeable_make_no_partials(tmp_path, model_files) -> None:
    register_strategy("test_not_a_monoid")(NotAMonoid)
    with pytest.raises(MergeInputError, match=r"'test_not_a_monoid' is not mergeable.*partial_out"):
        merge_models(
            model_files["base_path"], model_files["models"], method="test_not_a_monoid", partial_out=tmp_path / "p"
        )
    strategy = get_strategy("test_not_a_monoid")
    header = UpdateHeader("r", 0, fingerprint(load_file(model_files["base_path"])), "gw")
    (tmp_path / "p").write_bytes(encode_partial(in_memory_state(model_files, strategy, [0]), header=header))
    with pytest.raises(MergeInputError, match=r"'test_not_a_monoid' is not mergeable.*partials"):
        combine_partials([tmp_path / "p"], base=model_files["base_path"], out=tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "base.safetensors",
        "m0.safetensors",
        "m1.safetensors",
        "m2.safetensors",
        "p",
    ]
