"""fedfuse in a plain Flower app: ``FedMerge`` replaces ``FedAvg`` on the server, mods add the uplink on the client.

The end-to-end tests run a quickstart-style app (``tests/flower_apps.py``) through Flower's simulation
engine; the others drive ``FedMerge`` and the mods with hand-built Flower messages.
"""

from __future__ import annotations

import flower_apps
import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import FedAvg
from seeded_grid import LoopbackGrid

from fedfuse.algebra import SparseTensor, to_dense
from fedfuse.client.mods import FACTORS_RECORD, FISHER_RECORD, GRAM_RECORD
from fedfuse.flower import FedMerge, signing_mod, task_vector_mod
from fedfuse.messages import RESIDUAL_RECORD, TrainReply
from fedfuse.security import Registry, write_institution_keys
from fedfuse.strategies import get_strategy
from fedfuse.wire import Expectation, decode_update, fingerprint

# Tiers are marked per test here: this module mixes e2e and integration and unit tests.

SHAPES = {"w": (4, 3), "b": (3,)}


def _weights(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def _train_messages(strategy: FedMerge, weights: dict[str, torch.Tensor], nodes: list[int]) -> dict[int, Message]:
    grid = LoopbackGrid(nodes)
    messages = strategy.configure_train(1, ArrayRecord(weights), ConfigRecord(), grid)
    return {message.metadata.dst_node_id: message for message in messages}


def _standard_reply(message: Message, weights: dict[str, torch.Tensor], examples: object = 10, **records) -> Message:
    metrics = MetricRecord({"num-examples": examples, "train_loss": 0.5}) if examples is not None else MetricRecord()
    content = RecordDict({"arrays": ArrayRecord(weights), "metrics": metrics, **records})
    return Message(content, reply_to=message)


@pytest.mark.unit
def test_fedmerge_is_a_flower_fedavg_with_its_options_and_checks_its_strategy_name_and_parameters():
    strategy = FedMerge("ties", vote="count", fraction_train=0.5, min_available_nodes=3, arrayrecord_key="w")
    assert isinstance(strategy, FedAvg)
    assert (strategy.fraction_train, strategy.min_available_nodes, strategy.arrayrecord_key) == (0.5, 3, "w")
    assert strategy.merge.params()["vote"] == "count" and strategy.sparsifier.kind == "trim"
    with pytest.raises(ValueError, match="unknown merge strategy 'tiez'"):
        FedMerge("tiez")
    with pytest.raises(ValueError, match="density"):
        FedMerge("ties", density=2.0)
    with pytest.raises(ValueError, match="has no parameter 'votes'; its parameters: lam, vote"):
        FedMerge("ties", votes="count")
    with pytest.raises(ValueError, match="needs Gram matrices with every update"):
        FedMerge("regmean")


@pytest.mark.integration
def test_fedmerge_rejects_bad_standard_replies_with_fedfuse_reasons_and_merges_the_good_ones(server_identity):
    round_weights = _weights(0)
    strategy = FedMerge("fedavg")
    messages = _train_messages(strategy, round_weights, [1, 2, 3, 4, 5, 6, 7, 8])
    good = {1: (_weights(1), 10), 2: (_weights(2), 30)}
    nan = _weights(3)
    nan["w"][0, 0] = float("nan")
    replies = [
        _standard_reply(messages[1], good[1][0], 10),
        Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="boom"), reply_to=messages[3]),
        _standard_reply(messages[4], _weights(4), None),
        _standard_reply(messages[5], {"w": torch.zeros(4, 3), "b": torch.zeros(1)}),  # b would broadcast
        _standard_reply(messages[6], nan),
        _standard_reply(messages[7], {**_weights(7), "extra": torch.zeros(2)}),
        _standard_reply(messages[2], good[2][0], 30),
        _standard_reply(messages[2], _weights(9), 30),
        Message(RecordDict({"metrics": MetricRecord({"num-examples": 5})}), reply_to=messages[8]),
    ]
    arrays, metrics = strategy.aggregate_train(1, iter(replies))
    reasons = sorted(rejection.reason for rejection in strategy.last_rejections)
    expected = ["client_error", "bad_num_examples", "incompatible_update", "non_finite", "incompatible_update"]
    assert reasons == sorted([*expected, "duplicate_node", "no_payload"])
    assert metrics["accepted"] == 2 and metrics["rejected"] == 7 and metrics["rejected.incompatible_update"] == 2
    assert metrics["train_loss"] == pytest.approx(0.5)
    merged = arrays.to_torch_state_dict()
    for name in SHAPES:
        expected = (10 * good[1][0][name] + 30 * good[2][0][name]) / 40
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)


@pytest.mark.integration
def test_fedmerge_fisher_uses_the_replies_fisher_record_and_rejects_replies_without_one(server_identity):
    round_weights = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    strategy = FedMerge("fisher")
    messages = _train_messages(strategy, round_weights, [1, 2, 3])
    tuned = {1: _weights(1), 2: _weights(2)}
    fisher = {k: {name: torch.rand(shape) + 0.1 for name, shape in SHAPES.items()} for k in tuned}
    replies = [_standard_reply(messages[k], tuned[k], 10, fisher=ArrayRecord(fisher[k])) for k in tuned]
    replies.append(_standard_reply(messages[3], _weights(3), 10))
    arrays, metrics = strategy.aggregate_train(1, iter(replies))
    assert metrics["accepted"] == 2 and [r.reason for r in strategy.last_rejections] == ["incompatible_update"]
    merged = arrays.to_torch_state_dict()
    for name in SHAPES:
        weighted = sum(fisher[k][name] * tuned[k][name] for k in tuned) / sum(fisher[k][name] for k in tuned)
        torch.testing.assert_close(merged[name], weighted, rtol=1e-5, atol=1e-6)


@pytest.mark.integration
def test_fedmerge_ties_trims_standard_replies_on_the_server_as_fedfuse_ties_merges_trimmed_task_vectors(
    server_identity,
):
    round_weights = _weights(0)
    strategy = FedMerge("ties", density=0.5)
    messages = _train_messages(strategy, round_weights, [1, 2, 3])
    tuned = {k: _weights(k) for k in (1, 2, 3)}
    arrays, _ = strategy.aggregate_train(1, iter(_standard_reply(messages[k], tuned[k], 10) for k in tuned))
    reference = get_strategy("ties").new_state()
    for k in tuned:
        tau = {name: tuned[k][name] - round_weights[name] for name in SHAPES}
        trimmed = {name: _trim(t, 0.5) for name, t in tau.items()}
        reference.add(trimmed, weight=10)
    expected = reference.finalize()
    merged = arrays.to_torch_state_dict()
    for name in SHAPES:
        torch.testing.assert_close(merged[name], round_weights[name] + expected[name], rtol=0, atol=1e-6)


def _trim(tensor: torch.Tensor, density: float) -> torch.Tensor:
    keep = int(density * tensor.numel())
    flat = tensor.reshape(-1)
    out = torch.zeros_like(flat)
    top = flat.abs().topk(keep).indices
    out[top] = flat[top]
    return out.reshape(tensor.shape)


def _client_round(mod, message: Message, trained: dict[str, torch.Tensor], context: Context) -> Message:
    def train(msg: Message, ctx: Context) -> Message:
        return _standard_reply(msg, trained, 12)

    return mod(message, context, train)


def _context(node_id: int = 3, **node_config) -> Context:
    return Context(run_id=1, node_id=node_id, node_config=dict(node_config), state=RecordDict(), run_config={})


@pytest.mark.integration
def test_task_vector_mod_replies_with_a_trimmed_task_vector_and_keeps_the_error_feedback_residual(server_identity):
    round_weights = _weights(0)
    strategy = FedMerge("ties")
    message = _train_messages(strategy, round_weights, [3, 4])[3]
    trained = _weights(5)
    context = _context()
    mod = task_vector_mod(sparsifier="trim", density=0.25, wire_dtype="float32")
    reply = _client_round(mod, message, trained, context)
    assert not reply.has_error() and "arrays" not in reply.content.array_records
    assert reply.content.metric_records["metrics"]["num-examples"] == 12
    payload = TrainReply.from_content(reply.content)
    update = decode_update(payload.payload, expect=Expectation(SHAPES, 1, "1", fingerprint(round_weights)))
    assert (update.header.node_id, update.header.num_examples) == ("3", 12)
    residual = context.state.array_records[RESIDUAL_RECORD].to_torch_state_dict()
    for name in SHAPES:
        tau = trained[name] - round_weights[name]
        sent = update.tensors[name]
        assert isinstance(sent, SparseTensor) and sent.values.numel() == int(0.25 * tau.numel())
        torch.testing.assert_close(sent.to_dense() + residual[name], tau, rtol=0, atol=1e-6)
    _, metrics = strategy.aggregate_train(1, iter([reply]))
    assert metrics["accepted"] == 1 and metrics["uplink-bytes"] == len(payload.payload)


@pytest.mark.integration
def test_task_vector_mod_passes_evaluate_messages_and_client_errors_through_and_refuses_mismatched_arrays(
    server_identity,
):
    mod = task_vector_mod()
    strategy = FedMerge("fedavg")
    message = _train_messages(strategy, _weights(0), [3, 4])[3]
    evaluate = Message(RecordDict({"arrays": ArrayRecord(_weights(0))}), dst_node_id=3, message_type="evaluate")
    answer = Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=evaluate)
    assert mod(evaluate, _context(), lambda msg, ctx: answer) is answer
    failed = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="oom"), reply_to=message)
    assert mod(message, _context(), lambda msg, ctx: failed) is failed
    refused = _client_round(mod, message, {"w": torch.zeros(4, 3)}, _context())
    assert refused.has_error() and refused.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert "differ from the received ones" in refused.error.reason
    with pytest.raises(ValueError, match="wire_dtype"):
        task_vector_mod(wire_dtype="int8")


@pytest.mark.integration
def test_an_unsigned_payload_must_name_the_flower_node_that_sent_it(server_identity):
    strategy = FedMerge("fedavg")
    messages = _train_messages(strategy, _weights(0), [3, 4])
    impostor = _client_round(task_vector_mod(node_name="4"), messages[3], _weights(1), _context(node_id=3))
    honest = _client_round(task_vector_mod(), messages[4], _weights(2), _context(node_id=4))
    _, metrics = strategy.aggregate_train(1, iter([impostor, honest]))
    assert metrics["accepted"] == 1 and [r.reason for r in strategy.last_rejections] == ["sender_mismatch"]


@pytest.mark.integration
def test_signing_mod_signs_the_update_and_fedmerge_folds_only_registered_signatures(server_identity, tmp_path):
    keys = write_institution_keys(tmp_path, "hospital-a")
    other = write_institution_keys(tmp_path / "other", "clinic-b")
    registry = Registry({"hospital-a": keys["update_signing_public"].read_text()})
    strategy = FedMerge("fedavg", registry=registry)
    messages = _train_messages(strategy, _weights(0), [3, 4, 5, 6])
    signed = signing_mod(str(keys["update_signing_private"]), "hospital-a")
    stranger = signing_mod(str(other["update_signing_private"]), "clinic-b")
    chain = lambda outer: lambda msg, ctx, nxt: outer(msg, ctx, lambda m, c: task_vector_mod()(m, c, nxt))  # noqa: E731
    replies = [
        _client_round(chain(signed), messages[3], _weights(1), _context(node_id=3)),
        _client_round(chain(stranger), messages[4], _weights(2), _context(node_id=4)),
        _client_round(task_vector_mod(), messages[5], _weights(3), _context(node_id=5)),
        _standard_reply(messages[6], _weights(4)),
    ]
    _, metrics = strategy.aggregate_train(1, iter(replies))
    assert metrics["accepted"] == 1 and metrics["signatures-verified"] == 1
    assert [r.reason for r in strategy.last_rejections] == ["unknown_signer", "unsigned", "unsigned"]


@pytest.mark.integration
def test_fedfuses_own_client_app_signs_through_signing_mod_with_its_node_configs_key(server_identity, tmp_path):
    from seeded_grid import train_content

    from fedfuse.client.app import make_client_app
    from fedfuse.messages import RoundInstruction

    keys = write_institution_keys(tmp_path, "partition-0")
    registry = Registry({"partition-0": keys["update_signing_public"].read_text()})
    run = {"mode": "full", "local-steps": 1, "batch-size": 4, "max-length": 16, "sparsifier": "dare", "density": 0.3}
    instruction = RoundInstruction(1, "run-7", "f" * 64, "")
    content = train_content(instruction.to_config(), version="f" * 64)
    node = {"partition-id": 0, "num-partitions": 2, "signing-key": str(keys["update_signing_private"])}
    context = Context(run_id=1, node_id=9, node_config=node, state=RecordDict(), run_config={})
    reply = TrainReply.from_content(
        make_client_app(run)(Message(content, dst_node_id=9, message_type="train"), context).content
    )
    check = registry.round_check(run_id="run-7", round_number=1, base_fingerprint="f" * 64)
    assert check(reply.payload, reply.signature) == "partition-0"
    assert reply.timing["sign"] > 0 and reply.timing["total"] >= reply.timing["train"]


@pytest.mark.integration
def test_task_vector_mod_carries_a_replys_fisher_and_gram_records_and_sends_lora_factors_as_they_are(server_identity):
    round_weights = _weights(0)
    message = _train_messages(FedMerge("fedavg"), round_weights, [3, 4])[3]
    fisher = {name: torch.rand(shape) for name, shape in SHAPES.items()}
    grams = {"w": torch.eye(3) * 2}

    def train(msg: Message, ctx: Context) -> Message:
        records = {FISHER_RECORD: ArrayRecord(fisher), GRAM_RECORD: ArrayRecord(grams)}
        return _standard_reply(msg, _weights(5), 12, **records)

    reply = task_vector_mod(sparsifier="none", wire_dtype="float32")(message, _context(), train)
    assert FISHER_RECORD not in reply.content and GRAM_RECORD not in reply.content
    payload = TrainReply.from_content(reply.content).payload
    update = decode_update(payload, expect=Expectation(SHAPES, 1, "1", fingerprint(round_weights)))
    assert update.fisher is not None
    for name in SHAPES:
        torch.testing.assert_close(to_dense(update.fisher[name]), fisher[name], rtol=0, atol=0)
    torch.testing.assert_close(update.grams["w"], grams["w"])
    factors = {"m.lora_A": torch.randn(2, 3), "m.lora_B": torch.randn(4, 2)}

    def lora(msg: Message, ctx: Context) -> Message:
        return _standard_reply(msg, {}, 12, **{FACTORS_RECORD: ArrayRecord(factors)})

    reply = task_vector_mod(sparsifier="trim", density=0.1, wire_dtype="float32")(message, _context(), lora)
    shapes = {name: tuple(t.shape) for name, t in factors.items()}
    sent = decode_update(TrainReply.from_content(reply.content).payload, expect=Expectation(shapes, 1, "1"))
    assert sent.header.sparsifier.kind == "none" and sent.header.num_examples == 12
    assert all(torch.equal(to_dense(sent.tensors[name]), factors[name]) for name in factors)


@pytest.mark.integration
def test_fedmerge_accepts_a_strategy_instance_such_as_a_plug_in(server_identity):
    strategy = FedMerge(get_strategy("task_arithmetic", lam=0.5), weighting="uniform")
    round_weights = _weights(0)
    messages = _train_messages(strategy, round_weights, [1, 2])
    tuned = {1: _weights(1), 2: _weights(2)}
    arrays, _ = strategy.aggregate_train(1, iter(_standard_reply(messages[k], tuned[k]) for k in tuned))
    merged = arrays.to_torch_state_dict()
    for name in SHAPES:
        expected = round_weights[name] + 0.5 * sum(tuned[k][name] - round_weights[name] for k in tuned)
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="strategy instance"):
        FedMerge(get_strategy("ties"), vote="count")


def _sum_train_loss(records: list[RecordDict], weighting: str) -> MetricRecord:
    return MetricRecord({"summed_loss": sum(float(r["metrics"]["train_loss"]) for r in records)})


@pytest.mark.e2e
@pytest.mark.slow
def test_fedmerge_fedavg_gives_flowers_fedavg_result_over_three_rounds_of_a_real_simulation():
    results = {}
    options = dict(min_train_nodes=4, min_evaluate_nodes=4, min_available_nodes=4)

    def main(grid, context):
        initial = ArrayRecord(flower_apps.make_model().state_dict())
        for name, strategy in (
            ("flower", FedAvg(**options)),
            ("fedmerge", FedMerge("fedavg", **options)),
            ("custom-metrics", FedMerge("ties", density=0.2, train_metrics_aggr_fn=_sum_train_loss, **options)),
        ):
            results[name] = strategy.start(
                grid=grid, initial_arrays=initial, num_rounds=3, evaluate_fn=flower_apps.central_evaluate
            )

    flower_apps.simulate(main, flower_apps.client_app(), nodes=4)
    flower, ours = results["flower"], results["fedmerge"]
    theirs, mine = flower.arrays.to_torch_state_dict(), ours.arrays.to_torch_state_dict()
    assert list(mine) == list(theirs)
    assert max(float((mine[k] - theirs[k]).abs().max()) for k in theirs) <= 1e-5
    for server_round in (1, 2, 3):
        assert ours.train_metrics_clientapp[server_round]["train_loss"] == pytest.approx(
            flower.train_metrics_clientapp[server_round]["train_loss"], abs=1e-5
        )
        assert ours.train_metrics_clientapp[server_round]["accepted"] == 4
        for key in ("eval_acc", "eval_loss"):
            assert ours.evaluate_metrics_clientapp[server_round][key] == pytest.approx(
                flower.evaluate_metrics_clientapp[server_round][key], abs=1e-5
            )
    for server_round in (0, 1, 2, 3):
        assert ours.evaluate_metrics_serverapp[server_round]["accuracy"] == pytest.approx(
            flower.evaluate_metrics_serverapp[server_round]["accuracy"], abs=1e-5
        )
    custom = results["custom-metrics"]
    assert "summed_loss" in custom.train_metrics_clientapp[3] and "train_loss" not in custom.train_metrics_clientapp[3]
    assert custom.evaluate_metrics_serverapp[3]["accuracy"] > 0.5 > custom.evaluate_metrics_serverapp[0]["accuracy"]


@pytest.mark.e2e
@pytest.mark.slow
def test_task_vector_mod_with_fedmerge_ties_sends_at_most_0_35_bytes_per_parameter_and_matches_dense_fedavg():
    results = {}
    options = dict(min_train_nodes=4, min_available_nodes=4, fraction_evaluate=0.0)
    rounds = 8

    def run(name, strategy):
        def main(grid, context):
            initial = ArrayRecord(flower_apps.make_model().state_dict())
            results[name] = strategy.start(
                grid=grid, initial_arrays=initial, num_rounds=rounds, evaluate_fn=flower_apps.central_evaluate
            )

        return main

    client = dict(learning_rate=0.02)
    flower_apps.simulate(run("dense", FedAvg(**options)), flower_apps.client_app(**client), nodes=4)
    uplink = [task_vector_mod(sparsifier="trim", density=0.1, wire_dtype="float16")]
    flower_apps.simulate(run("ties", FedMerge("ties", **options)), flower_apps.client_app(uplink, **client), nodes=4)
    dense, ties = results["dense"], results["ties"]
    params = flower_apps.parameter_count()
    per_parameter = [m["uplink-bytes"] / (m["accepted"] * params) for m in ties.train_metrics_clientapp.values()]
    assert len(per_parameter) == rounds and max(per_parameter) <= 0.35
    dense_accuracy = dense.evaluate_metrics_serverapp[rounds]["accuracy"]
    ties_accuracy = ties.evaluate_metrics_serverapp[rounds]["accuracy"]
    assert dense_accuracy > 0.9 > ties.evaluate_metrics_serverapp[0]["accuracy"]
    assert ties_accuracy >= dense_accuracy - 0.01, (ties_accuracy, dense_accuracy, per_parameter)
    print(
        f"uplink {np.mean(per_parameter):.3f} B/param; accuracy TIES {ties_accuracy:.4f} vs dense {dense_accuracy:.4f}"
    )


@pytest.mark.integration
def test_fedmerge_returns_arrays_in_the_dtypes_it_was_given(server_identity):
    round_weights = {"w": np.zeros((2, 2), dtype=np.float64), "steps": np.array([3], dtype=np.int64)}
    strategy = FedMerge("fedavg")
    grid = LoopbackGrid([1, 2])
    arrays = ArrayRecord({name: Array(value) for name, value in round_weights.items()})
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, arrays, ConfigRecord(), grid)}
    replies = [
        Message(
            RecordDict(
                {
                    "arrays": ArrayRecord(
                        {"w": Array(np.full((2, 2), float(k))), "steps": Array(np.array([3 + 2 * k]))}
                    ),
                    "metrics": MetricRecord({"num-examples": 1}),
                }
            ),
            reply_to=messages[k],
        )
        for k in (1, 2)
    ]
    merged, _ = strategy.aggregate_train(1, iter(replies))
    assert merged["w"].numpy().dtype == np.float64 and merged["steps"].numpy().dtype == np.int64
    assert merged["w"].numpy().tolist() == [[1.5, 1.5], [1.5, 1.5]] and merged["steps"].numpy().tolist() == [6]
