"""Simulated attackers: the run-config keys turn exactly the chosen clients into the chosen attacker."""

from __future__ import annotations

import pytest
import torch

from fedfuse.algebra import to_dense
from fedfuse.client.attacks import attacked_tensors, flipped_labels, reported_examples, simulated_local_round
from fedfuse.client.local_round import Shard
from fedfuse.settings import AttackSettings, RunSettings, SettingsError
from fedfuse.training.client_datasets import ClientDatasets
from fedfuse.training.federated_dataset import Tokenized
from fedfuse.wire import MAX_NUM_EXAMPLES, Expectation, decode_update

# Tiers are marked per test here: this module mixes integration and unit tests.

TINY = {"mode": "full", "local-steps": 2, "batch-size": 4, "max-length": 16, "client-eval-examples": 4}


@pytest.mark.unit
@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"attack": "sign_flip"}, "needs attackers"),
        ({"attack": "sign_flip", "attackers": "0,x"}, "partition ids"),
        ({"attack": "bribe", "attackers": "0"}, "attack must be one of"),
        ({"attack": "scale", "attackers": "1", "attack_scale": 0.0}, "attack-scale"),
    ],
)
def test_bad_attack_settings_are_named(values, message) -> None:
    with pytest.raises(SettingsError, match=message):
        AttackSettings(**values)


@pytest.mark.unit
def test_only_listed_partitions_attack_and_label_flip_needs_labels() -> None:
    attack = AttackSettings("noise", "0, 3")
    assert [attack.attacks(i) for i in range(5)] == [True, False, False, True, False]
    assert not AttackSettings().attacks(0)
    with pytest.raises(SettingsError, match="classification"):
        RunSettings.from_run_config({}, task="lm", attack="label_flip", attackers="0")


@pytest.mark.unit
def test_model_attacks_flip_scale_or_replace_the_update_and_leave_lora_a_alone() -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = {"m.lora_A": torch.randn(2, 4), "m.lora_B": torch.randn(4, 2), "head.weight": torch.randn(3)}
    flipped = attacked_tensors(tensors, AttackSettings("sign_flip", "0", 5.0), generator)
    assert torch.equal(flipped["m.lora_A"], tensors["m.lora_A"])
    assert torch.equal(flipped["m.lora_B"], -5 * tensors["m.lora_B"])
    assert torch.equal(flipped["head.weight"], -5 * tensors["head.weight"])
    scaled = attacked_tensors(tensors, AttackSettings("scale", "0", 3.0), generator)
    assert torch.equal(scaled["m.lora_B"], 3 * tensors["m.lora_B"])
    noise = attacked_tensors(tensors, AttackSettings("noise", "0", 2.0), generator)
    for name, tensor in tensors.items():
        assert float(noise[name].norm()) == pytest.approx(2 * float(tensor.norm()), rel=1e-5)
        assert not torch.allclose(noise[name], tensor)


@pytest.mark.unit
def test_inflated_example_counts_stay_within_what_a_header_may_say() -> None:
    assert reported_examples(10, AttackSettings("inflate_examples", "0", 1000.0)) == 10_000
    assert reported_examples(10**10, AttackSettings("inflate_examples", "0", 1e6)) == MAX_NUM_EXAMPLES
    assert reported_examples(10, AttackSettings("noise", "0", 1000.0)) == 10


@pytest.mark.unit
def test_label_flip_maps_each_class_to_its_mirror_and_keeps_evaluation_data() -> None:
    labels = torch.tensor([0, 1, 2, -100])
    tokens = Tokenized(torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 2, dtype=torch.long), labels, torch.zeros(4))
    data = ClientDatasets(tokens, tokens, None, None, None, "topics", ("a", "b", "c"), ("x",), None)  # type: ignore[arg-type]
    flipped = flipped_labels(data)
    assert flipped.train.labels.tolist() == [2, 1, 0, -100]
    assert flipped.eval.labels.tolist() == [0, 1, 2, -100]


@pytest.mark.unit
@pytest.mark.parametrize("attack", ["sign_flip", "scale"])
def test_an_attacking_client_sends_s_times_its_honest_task_vector(attack) -> None:
    honest_settings = RunSettings.from_run_config({}, **TINY)
    attacker_settings = honest_settings.replace(attack=attack, attackers="1", attack_scale=4.0)
    shard = Shard(1, 3, "partition-1")
    factor = -4.0 if attack == "sign_flip" else 4.0
    payloads = [
        simulated_local_round(s, {}, round_number=1, run_id="r", shard=shard).payload
        for s in (honest_settings, attacker_settings)
    ]
    honest, attacked = (_decode(payload) for payload in payloads)
    for name, tensor in honest.items():
        torch.testing.assert_close(attacked[name], factor * tensor, rtol=1e-5, atol=1e-7)
    bystander = Shard(0, 3, "partition-0")
    untouched, alongside = (
        _decode(simulated_local_round(s, {}, round_number=1, run_id="r", shard=bystander).payload)
        for s in (honest_settings, attacker_settings)
    )
    assert all(torch.equal(untouched[name], alongside[name]) for name in untouched)


def _decode(payload: bytes) -> dict[str, torch.Tensor]:
    from fedfuse.training.run_model import update_shapes

    shapes = update_shapes(RunSettings.from_run_config({}, **TINY))
    return {name: to_dense(t) for name, t in decode_update(payload, expect=Expectation(shapes=shapes)).tensors.items()}


@pytest.mark.integration
def test_attackers_are_a_simulation_device_the_production_client_app_refuses(server_identity, tmp_path) -> None:
    """The attacker ClientApp (mod + data wrapper) sends what the bench round sends; the plain app refuses."""
    from flwr.app import Context, Message, RecordDict
    from seeded_grid import train_content

    from fedfuse.client.app import make_client_app
    from fedfuse.client.attacks import attacker_client_app
    from fedfuse.messages import RoundInstruction, TrainReply

    overrides = {**TINY, "attack": "scale", "attackers": "1", "attack-scale": 4.0}
    settings = RunSettings.from_run_config({}, **overrides)
    content = train_content(RoundInstruction(1, "r").to_config())
    node_config = {"partition-id": 1, "num-partitions": 3, "state-dir": str(tmp_path)}
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
    reply = attacker_client_app(overrides)(Message(content, dst_node_id=7, message_type="train"), context)
    shard = Shard(1, 3, "partition-1", sender="7")
    bench = simulated_local_round(settings, {}, round_number=1, run_id="r", shard=shard)
    sent, expected = (_decode(p) for p in (TrainReply.from_content(reply.content).payload, bench.payload))
    assert all(torch.equal(sent[name], expected[name]) for name in expected)
    with pytest.raises(ValueError, match="simulation-only"):
        make_client_app(overrides)(Message(content, dst_node_id=7, message_type="train"), context)
