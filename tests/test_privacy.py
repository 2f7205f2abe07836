"""Client-level differential privacy: the noise has the stated scale, sits only where it may, and ε is Opacus's.

The statistical checks draw 2·10⁵ noise values, so a 2% tolerance on the standard deviation is about
nine standard errors: the test fails on a wrong scale (a factor K, λ or C off), not by chance.
"""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from fedfuse.algebra import dare_indices, derive_seed
from fedfuse.client.local_round import locally_private
from fedfuse.rounds import PrivacyAccountant
from fedfuse.settings import RunSettings, SettingsError
from fedfuse.wire import UpdateHeader, encode_update, fingerprint

pytestmark = pytest.mark.unit

SHAPES = {"big": (400, 500)}
BASE = {"big": torch.zeros(400, 500)}
FINGERPRINT = fingerprint(BASE)
CENTRAL = {
    "mode": "full",
    "dp": "central",
    "dp-clip-norm": 2.0,
    "dp-noise-multiplier": 0.5,
    "weighting": "uniform",
    "dp-noise-seed": 7,
}


def _central_merge(overrides: dict, updates: list[dict[str, torch.Tensor]], expected: int) -> dict[str, torch.Tensor]:
    settings = RunSettings.from_run_config({}, **overrides)
    engine = settings.round_engine(
        settings.update_space(SHAPES, 1.0),
        round_number=1,
        run_id="run",
        base_fingerprint=FINGERPRINT,
        expected_updates=expected,
    )
    for node, tensors in enumerate(updates):
        header = UpdateHeader("run", 1, FINGERPRINT, str(node), 10, settings.compression.sparsifier_spec)
        if settings.compression.sparsifier == "dare":
            from fedfuse.algebra import dare_drop

            seed = derive_seed(settings.run.seed, 1, None, "big")
            tensors = {"big": dare_drop(tensors["big"], settings.compression.density, seed)}
        assert engine.offer(encode_update(tensors, header=header), sender=str(node)) is None
    return engine.merged_task_vector()


def test_central_noise_on_a_fedavg_mean_has_std_sigma_c_over_the_sampled_clients() -> None:
    updates = [{"big": torch.zeros(400, 500)} for _ in range(3)]
    merged = _central_merge(CENTRAL, updates, expected=4)
    values = merged["big"].double()
    assert float(values.std()) == pytest.approx(0.5 * 2.0 / 4, rel=0.02)
    assert abs(float(values.mean())) < 5 * 0.25 / math.sqrt(values.numel())


def test_central_noise_on_task_arithmetic_is_on_the_sum_and_clipping_bounds_each_update() -> None:
    big = torch.full((400, 500), 1.0)  # norm 447 ≫ C = 2: clipped to norm 2
    merged = _central_merge({**CENTRAL, "strategy": "task_arithmetic", "dp-noise-multiplier": 0.01}, [{"big": big}], 1)
    signal = 2.0 / math.sqrt(big.numel())
    noise = merged["big"].double() - signal
    assert float(noise.std()) == pytest.approx(0.01 * 2.0, rel=0.02)
    assert float(noise.mean()) == pytest.approx(0.0, abs=1e-3)


def test_round_seeded_dare_keeps_noise_on_the_public_mask_only() -> None:
    overrides = {**CENTRAL, "sparsifier": "dare", "density": 0.1, "seed-scope": "round"}
    merged = _central_merge(overrides, [{"big": torch.zeros(400, 500)} for _ in range(2)], expected=2)
    flat = merged["big"].reshape(-1)
    support = dare_indices(flat.numel(), 0.1, derive_seed(0, 1, None, "big"))
    off = torch.ones(flat.numel(), dtype=torch.bool)
    off[support] = False
    assert bool((flat[off] == 0).all())
    assert float(flat[support].double().std()) == pytest.approx(0.5 * 2.0 / 2, rel=0.02)


def test_the_dp_noise_comes_from_the_os_unless_a_test_fixes_its_seed() -> None:
    zeros = [{"big": torch.zeros(400, 500)}]
    fixed = [_central_merge(CENTRAL, zeros, 1)["big"] for _ in range(2)]
    assert torch.equal(*fixed)
    unseeded = {**CENTRAL, "dp-noise-seed": -1}
    fresh = [_central_merge(unseeded, zeros, 1)["big"] for _ in range(2)]
    assert not torch.equal(*fresh)


def test_local_dp_clips_each_update_to_c_then_adds_sigma_c_noise() -> None:
    settings = RunSettings.from_run_config({}, **{**CENTRAL, "dp": "local", "dp-noise-multiplier": 0.3})
    tau = {"big": torch.full((400, 500), 3.0)}
    noisy = locally_private(tau, settings, round_number=1, node="partition-0")
    residual = noisy["big"].double() - 2.0 / math.sqrt(tau["big"].numel())
    assert float(residual.std()) == pytest.approx(0.3 * 2.0, rel=0.02)


@pytest.mark.parametrize(("rates", "sigma", "delta"), [([1.0] * 5, 1.0, 1e-5), ([0.25] * 20, 0.8, 1e-6)])
def test_epsilon_is_opacus_rdp_accountants_for_the_same_rounds(rates, sigma, delta) -> None:
    ours = PrivacyAccountant(sigma, delta)
    reference = RDPAccountant()
    for rate in rates:
        epsilon = ours.step(rate)
        reference.step(noise_multiplier=sigma, sample_rate=rate)
        assert epsilon == pytest.approx(reference.get_epsilon(delta=delta), rel=1e-12)
    resumed = PrivacyAccountant(sigma, delta, [tuple(entry) for entry in ours.history])
    assert resumed.epsilon() == pytest.approx(reference.get_epsilon(delta=delta), rel=1e-12)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strategy": "ties"}, "TIES elects signs"),
        ({"strategy": "median"}, "robust"),
        ({"strategy": "dare_ties"}, "dare_ties"),
        ({"sparsifier": "trim"}, "trimmed support"),
        ({"sparsifier": "dare", "seed-scope": "node"}, "node-seeded"),
        ({"weighting": "num_examples"}, "weighting uniform"),
        ({"clip-norm": 5.0}, "differs from dp-clip-norm"),
        ({"dp": "local", "mode": "lora"}, "mode full"),
        ({"mode": "lora", "lora-aggregation": "factors"}, "lora-aggregation exact"),
    ],
)
def test_runs_dp_cannot_bound_are_refused_with_the_reason(overrides, message) -> None:
    with pytest.raises(SettingsError, match=message):
        RunSettings.from_run_config({}, **{**CENTRAL, **overrides})


def test_dp_linear_methods_and_lora_exact_central_dp_are_accepted() -> None:
    for overrides in ({"strategy": "dare_linear", "sparsifier": "dare", "seed-scope": "round"}, {"mode": "lora"}):
        assert RunSettings.from_run_config({}, **{**CENTRAL, **overrides}).server_clip_norm == 2.0


def test_only_the_servers_engine_adds_the_noise_a_gateway_only_clips() -> None:
    settings = RunSettings.from_run_config({}, **CENTRAL)
    space = settings.update_space(SHAPES, 1.0)
    common = {"round_number": 1, "run_id": "run", "base_fingerprint": FINGERPRINT}
    assert settings.round_engine(space, bind_senders=False, **common).privacy is not None
    gateway = settings.round_engine(space, bind_senders=False, gateway=True, **common)
    assert gateway.privacy is None and gateway.bounds.clip_norm == 2.0
