"""Sparsifiers are declared once, in a registry: a plug-in is one function and one registration.

The plug-in ``floor`` (a TIES trim that also drops kept entries below a declared ``floor``) is
registered here and then used, unchanged, by ``sparsify_update``, the run settings, the offline plan
and ``fedfuse merge``'s library path, and the wire header; the built-ins are checked to declare what
the settings, the CLI and the header used to hard-code.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fedfuse.algebra.sparsifiers as registry
from fedfuse.algebra import (
    Param,
    SparseTensor,
    Sparsifier,
    SparsifierSpec,
    available_sparsifiers,
    register_sparsifier,
    sparsifier_spec,
    sparsify_update,
    ties_trim,
)
from fedfuse.offline import MergeInputError, merge_models
from fedfuse.offline.plan import plan_sparsifier
from fedfuse.settings import WIRE_DTYPES, RunSettings, SettingsError
from fedfuse.strategies import available_strategies, build_strategy, method_spec
from fedfuse.wire import UPDATE_VALUE_DTYPES, Expectation, UpdateHeader, decode_update, encode_update

pytestmark = pytest.mark.unit

FLOOR = Param("floor", float, 1.0, help="kept entries below this magnitude are dropped too")


def floor_trim(tensor: torch.Tensor, sparsifier: Sparsifier, seed: int | None) -> SparseTensor:
    """The plug-in: the top ⌊d·n⌋ magnitudes, less those below ``floor``."""
    kept = ties_trim(tensor, sparsifier.density)
    keep = kept.values.abs() >= sparsifier.params["floor"]
    return SparseTensor(indices=kept.indices[keep], values=kept.values[keep], shape=tensor.shape)


def expected_floor(tensor: torch.Tensor, density: float, floor: float) -> torch.Tensor:
    flat = tensor.reshape(-1)
    top = torch.topk(flat.abs(), int(density * flat.numel())).indices
    out = torch.zeros_like(flat)
    out[top] = flat[top]
    out[out.abs() < floor] = 0.0
    return out.reshape(tensor.shape)


@pytest.fixture
def private_registry(monkeypatch):
    """The registry as it is, restored after the test (a plug-in registered here does not leak)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_plugin_sparsifiers", lambda: {})


@pytest.fixture
def floor_plugin(private_registry):
    register_sparsifier("floor", parameters=(FLOOR,), help="trim, then drop what is below a floor")(floor_trim)


def tau() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"w": torch.randn(8, 6, generator=gen), "b": torch.randn(10, generator=gen)}


# --- the built-ins declare what used to be hard-coded --------------------------------------------


def test_the_built_ins_are_registered_with_their_declarations() -> None:
    assert {"none", "trim", "dare", "breadcrumbs", "della"} <= set(available_sparsifiers())
    assert [p.name for p in sparsifier_spec("breadcrumbs").parameters] == ["gamma"]
    assert [p.name for p in sparsifier_spec("della").parameters] == ["epsilon"]
    built_ins = ("none", "trim", "dare", "breadcrumbs", "della")
    assert {n for n in built_ins if sparsifier_spec(n).seeded} == {"dare", "della"}
    assert sparsifier_spec("none").dense and not sparsifier_spec("trim").dense
    assert sparsifier_spec("trim").global_fn is not None and sparsifier_spec("dare").global_fn is None
    assert Sparsifier("breadcrumbs", 0.3, gamma=0.05).params == {"gamma": 0.05}
    assert Sparsifier("trim", 0.3).params == {}
    assert Sparsifier("dare", 0.3).resolved_rescale == "inverse" and Sparsifier("trim", 0.3).resolved_rescale == "none"


def test_every_strategy_default_sparsifier_is_a_registered_one() -> None:
    defaults = {name: method_spec(name).default_sparsifier for name in available_strategies()}
    assert {name: kind for name, kind in defaults.items() if kind not in available_sparsifiers()} == {}
    assert {defaults["ties"], defaults["dare_ties"], defaults["breadcrumbs"], defaults["della"]} == {
        "trim",
        "dare",
        "breadcrumbs",
        "della",
    }


def test_a_declared_parameter_given_by_name_is_the_same_sparsifier_as_its_field() -> None:
    assert Sparsifier("breadcrumbs", 0.3, options={"gamma": "0.05"}) == Sparsifier("breadcrumbs", 0.3, gamma=0.05)
    assert Sparsifier.of("della", 0.4, params={"epsilon": 0.1}) == Sparsifier("della", 0.4, epsilon=0.1)
    with pytest.raises(ValueError, match="sparsifier 'trim' has no parameter 'gamma'; its parameters: none"):
        Sparsifier.of("trim", 0.3, params={"gamma": 0.1})


def test_a_dense_kind_built_from_loose_values_ignores_density_and_rescale() -> None:
    assert Sparsifier.of("none", 0.2, rescale="inverse") == Sparsifier()
    assert Sparsifier.of("trim", 0.2, seed_scope="round") == Sparsifier("trim", 0.2, seed_scope="round")


def test_unknown_kinds_name_the_registered_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown sparsifier 'topk': choose breadcrumbs, dare, della, none, trim"):
        Sparsifier("topk", 0.5)


def test_the_wire_dtypes_are_declared_once() -> None:
    assert WIRE_DTYPES is UPDATE_VALUE_DTYPES
    with pytest.raises(SettingsError, match="wire-dtype must be one of float32, float16, bfloat16"):
        RunSettings.from_run_config(wire_dtype="float64")


# --- a plug-in: one function, one registration --------------------------------------------------


def test_an_unregistered_kind_is_refused_everywhere(private_registry) -> None:
    assert "floor" not in available_sparsifiers()
    with pytest.raises(SettingsError, match="sparsifier must be one of"):
        RunSettings.from_run_config(mode="full", sparsifier="floor")
    with pytest.raises(MergeInputError, match="unknown sparsifier 'floor'"):
        plan_sparsifier("ties", "floor", 0.5)


def test_a_registered_plugin_sparsifies_an_update(floor_plugin) -> None:
    update = tau()
    sparsifier = Sparsifier("floor", 0.5, options={"floor": 0.3})
    sent = sparsify_update(update, sparsifier)
    for name, tensor in update.items():
        assert isinstance(sent[name], SparseTensor)
        assert torch.equal(sent[name].to_dense(), expected_floor(tensor, 0.5, 0.3))
    assert Sparsifier("floor", 0.5).params == {"floor": 1.0}  # the declared default
    assert not sparsifier.seeded and sparsifier.resolved_rescale == "none"


def test_a_plugin_parameter_is_coerced_and_checked(floor_plugin) -> None:
    assert Sparsifier.of("floor", 0.5, params={"floor": "0.25"}).params == {"floor": 0.25}
    with pytest.raises(ValueError, match="parameter 'floor': cannot read 'high' as float"):
        Sparsifier.of("floor", 0.5, params={"floor": "high"})
    with pytest.raises(ValueError, match="sparsifier 'floor' has no parameter 'epsilon'; its parameters: floor"):
        Sparsifier("floor", 0.5, options={"epsilon": 0.1})
    with pytest.raises(ValueError, match=r"rescale 'inverse' .* needs a random drop"):
        Sparsifier("floor", 0.5, rescale="inverse")


def test_run_settings_accept_a_registered_plugin_and_its_declared_parameters(floor_plugin) -> None:
    settings = RunSettings.from_run_config(mode="full", sparsifier="floor", density=0.4, sparsifier_params="floor=0.2")
    assert settings.compression.sparsifier_spec == Sparsifier("floor", 0.4, options={"floor": 0.2})
    with pytest.raises(SettingsError, match="sparsifier 'floor' has no parameter 'gamma'"):
        RunSettings.from_run_config(sparsifier="floor", sparsifier_params="gamma=0.2")
    with pytest.raises(SettingsError, match="sparsifier-params: sparsifier parameters are name=value"):
        RunSettings.from_run_config(sparsifier="floor", sparsifier_params="floor")


def test_the_shorthand_keys_and_sparsifier_params_agree_or_are_refused() -> None:
    by_params = RunSettings.from_run_config(sparsifier="breadcrumbs", density=0.3, sparsifier_params="gamma=0.05")
    by_key = RunSettings.from_run_config(sparsifier="breadcrumbs", density=0.3, breadcrumbs_gamma=0.05)
    assert by_params.compression.sparsifier_spec == by_key.compression.sparsifier_spec
    assert by_key.compression.sparsifier_spec == Sparsifier("breadcrumbs", 0.3, gamma=0.05)
    with pytest.raises(SettingsError, match=r"breadcrumbs-gamma is 0\.05 but sparsifier-params sets gamma"):
        RunSettings.from_run_config(sparsifier="breadcrumbs", breadcrumbs_gamma=0.05, sparsifier_params="gamma=0.1")


def test_the_offline_plan_reads_the_plugin_declarations(floor_plugin) -> None:
    assert plan_sparsifier("ties", "floor", 0.5, floor=0.25) == Sparsifier("floor", 0.5, options={"floor": 0.25})
    with pytest.raises(
        MergeInputError, match="gamma applies to the breadcrumbs sparsifier, but this merge uses 'floor'"
    ):
        plan_sparsifier("ties", "floor", 0.5, gamma=0.1)
    with pytest.raises(MergeInputError, match="'floor' applies to the floor sparsifier, but this merge uses 'trim'"):
        plan_sparsifier("ties", None, 0.5, floor=0.1)
    with pytest.raises(MergeInputError, match="'floor': give density"):
        plan_sparsifier("ties", "floor", None)


def test_an_offline_merge_with_the_plugin_equals_the_in_memory_merge(floor_plugin, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(8, 6, generator=gen)}
    models = [{"w": base["w"] + torch.randn(8, 6, generator=gen)} for _ in range(2)]
    save_file(base, tmp_path / "base.safetensors")
    for k, model in enumerate(models):
        save_file(model, tmp_path / f"m{k}.safetensors")
    paths = [tmp_path / f"m{k}.safetensors" for k in range(2)]
    out = tmp_path / "out"
    merge_models(tmp_path / "base.safetensors", paths, method="ties", sparsifier="floor", density=0.5, out=out)
    state = build_strategy("ties").new_state()
    for model in models:  # the declared default floor (1.0) applies
        state.add(sparsify_update({"w": model["w"] - base["w"]}, Sparsifier("floor", 0.5)))
    trimmed = build_strategy("ties").new_state()
    for model in models:
        trimmed.add(sparsify_update({"w": model["w"] - base["w"]}, Sparsifier("trim", 0.5)))
    merged = state.finalize()["w"]
    assert not torch.allclose(merged, trimmed.finalize()["w"])  # the plug-in did something
    expected = base["w"] + merged
    assert torch.allclose(load_file(out / "model.safetensors")["w"], expected, atol=1e-6)
    # its own parameter, given as the CLI's --sparsifier-param NAME=VALUE strings
    low = tmp_path / "low"
    merge_models(
        tmp_path / "base.safetensors", paths, method="ties", sparsifier="floor", density=0.5,
        sparsifier_params=["floor=0.1"], out=low,
    )  # fmt: skip
    state = build_strategy("ties").new_state()
    for model in models:
        state.add(sparsify_update({"w": model["w"] - base["w"]}, Sparsifier("floor", 0.5, options={"floor": 0.1})))
    assert torch.allclose(load_file(low / "model.safetensors")["w"], base["w"] + state.finalize()["w"], atol=1e-6)


def test_a_plugin_sparsifier_crosses_the_wire_with_its_parameters(floor_plugin) -> None:
    sparsifier = Sparsifier("floor", 0.5, options={"floor": 0.3})
    update = sparsify_update(tau(), sparsifier)
    header = UpdateHeader("run", 1, "f" * 64, "node", sparsifier=sparsifier)
    shapes = {name: tuple(t.shape) for name, t in tau().items()}
    decoded = decode_update(encode_update(update, header=header), expect=Expectation(shapes, sparsifier=sparsifier))
    assert decoded.header.sparsifier == sparsifier


# --- registration is checked, and plug-ins can be installed through an entry point ---------------


def test_bad_registrations_are_refused(private_registry) -> None:
    register_sparsifier("floor", parameters=(FLOOR,))(floor_trim)
    register_sparsifier("floor", parameters=(FLOOR,))(floor_trim)  # the same declaration again is harmless
    with pytest.raises(ValueError, match="a sparsifier named 'floor' is already registered"):
        register_sparsifier("floor")(floor_trim)
    with pytest.raises(ValueError, match="parameter name 'density' is reserved"):
        register_sparsifier("floor2", parameters=(Param("density", float, 0.5),))(floor_trim)
    with pytest.raises(ValueError, match="rescales must be among"):
        register_sparsifier("floor3", default_rescale="inverse")(floor_trim)
    with pytest.raises(ValueError, match="must be an identifier"):
        SparsifierSpec("not a name", floor_trim)


PLUGIN_SOURCE = """
from fedfuse.algebra import Param, SparseTensor, register_sparsifier, ties_trim


@register_sparsifier("ep_floor", parameters=(Param("floor", float, 0.0),))
def ep_floor(tensor, sparsifier, seed):
    kept = ties_trim(tensor, sparsifier.density)
    keep = kept.values.abs() >= sparsifier.params["floor"]
    return SparseTensor(indices=kept.indices[keep], values=kept.values[keep], shape=tensor.shape)
"""


def test_a_sparsifier_installed_through_an_entry_point_is_found_and_used(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    (tmp_path / "fedfuse_test_sparsifier.py").write_text(PLUGIN_SOURCE)
    dist_info = tmp_path / "fedfuse_test_sparsifier-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fedfuse-test-sparsifier\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        textwrap.dedent(f"""\
            [{registry.ENTRY_POINT_GROUP}]
            ep_floor = fedfuse_test_sparsifier:ep_floor
            """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "fedfuse_test_sparsifier" not in sys.modules
        assert "ep_floor" in available_sparsifiers()
        settings = RunSettings.from_run_config(sparsifier="ep_floor", density=0.5, sparsifier_params="floor=0.3")
        sent = sparsify_update(tau(), settings.compression.sparsifier_spec)
        assert torch.equal(sent["w"].to_dense(), expected_floor(tau()["w"], 0.5, 0.3))
    finally:
        sys.modules.pop("fedfuse_test_sparsifier", None)
