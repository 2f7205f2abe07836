"""Federated coefficient learning and per-round λ through fedfuse's real ClientApp on an in-process grid.

Nodes are fedfuse's own ClientApp (``make_client_app``: training, the uplink, the coefficient mod) called in
process for each message, a tiny chat Llama trained with LoRA on 3 institutions' chats; the server is
``FedFuseStrategy`` driven by its own ``start`` (no Ray, no processes).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from own_data_helpers import chat_rows, write_jsonl
from seeded_grid import InProcessGrid
from tiny_runs import TINY_RUN

from fedfuse.automerge.learn import combine_gradients
from fedfuse.automerge.objectives import value
from fedfuse.client.app import make_client_app, node_model_loader
from fedfuse.client.residuals import STATE_DIR_ENV
from fedfuse.messages import COEFFICIENTS_RECORD, CoefficientRequest
from fedfuse.rounds import ModelChange, base_version
from fedfuse.server.coefficient_round import coefficients_markdown, combined_change, learn_centrally, pick_lambda
from fedfuse.server.strategy import FedFuseStrategy
from fedfuse.settings import RunSettings, SettingsError
from fedfuse.training.run_model import base_identity, lora_scale, update_shapes

pytestmark = pytest.mark.integration

NODES = 3


class AppGrid(InProcessGrid):
    """Nodes 101.. answer every message with fedfuse's ClientApp, each with its own Context."""

    def __init__(self, overrides: dict, count: int = NODES) -> None:
        self.app = make_client_app(overrides)
        self.nodes = [101 + i for i in range(count)]
        self.run = SimpleNamespace(run_id=1)
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config={"partition-id": i, "num-partitions": count},
                          state=RecordDict(), run_config={})
            for i, node in enumerate(self.nodes)
        }  # fmt: skip
        self.pending: dict[str, Message] = {}
        self.pushed = 0
        self.failing: dict[int, int] = {}
        """node → the coefficient message (0 = setup) from which it answers with an error."""
        self.coefficient_messages: dict[int, int] = {}
        self.malformed = False
        """Failing nodes answer with a NaN in their gradient instead of an error."""

    def _reply(self, message: Message) -> Message:
        node = int(message.metadata.dst_node_id)
        if COEFFICIENTS_RECORD in message.content.config_records:
            seen = self.coefficient_messages.get(node, 0)
            self.coefficient_messages[node] = seen + 1
            if node in self.failing and seen >= self.failing[node] and not self.malformed:
                return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="RuntimeError: boom"),
                               reply_to=message)  # fmt: skip
        reply = self.app(message, self.contexts[node])
        if self.malformed and node in self.failing and self.coefficient_messages.get(node, 0) > self.failing[node]:
            record = reply.content.config_records[COEFFICIENTS_RECORD]
            record["gradient"] = [float("nan"), *list(record["gradient"])[1:]]  # type: ignore[arg-type]
        reply.metadata.__dict__["_src_node_id"] = node
        return reply


@pytest.fixture
def chat_run(tmp_path: Path, tiny_chat_llama_dir: Path, monkeypatch, server_identity) -> dict:
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "state"))
    write_jsonl(tmp_path / "chat.jsonl", chat_rows(48, institutions=NODES))
    return {
        **TINY_RUN, "model": str(tiny_chat_llama_dir), "task": "sft", "data": str(tmp_path / "chat.jsonl"),
        "partition": "iid", "max-length": 24, "learning-rate": 0.05, "local-steps": 3,
        "output-dir": str(tmp_path / "out"), "num-server-rounds": 1,
    }  # fmt: skip


def _federate(overrides: dict, grid: AppGrid | None = None) -> tuple[FedFuseStrategy, AppGrid]:
    """One round of a FedFuseStrategy over ``grid`` (fresh nodes unless given); the strategy keeps its candidates."""
    settings = RunSettings.from_run_config(overrides)
    grid = grid or AppGrid(overrides)
    space = settings.update_space(update_shapes(settings), lora_scale(settings))
    change = ModelChange(base_version(base_identity(settings)))
    strategy = FedFuseStrategy(settings, space, "run", change, run_key="run")
    if strategy.coefficients is not None:
        strategy.coefficients = dataclasses.replace(strategy.coefficients, keep_candidates=True)
    strategy.start(grid, ArrayRecord(), num_rounds=1, timeout=60)
    return strategy, grid


def _central_parts(grid: AppGrid, overrides: dict, labels: list[str], version: str):
    """Each labelled node's model and held-out rows, loaded as the node loads them (in the labels' order)."""
    loader = node_model_loader(overrides)
    request = CoefficientRequest("step", 1, "run", version)
    by_label = {f"partition-{i}": context for i, context in enumerate(grid.contexts.values())}
    nodes = [loader(None, by_label[label], request) for label in labels]  # type: ignore[arg-type]
    return nodes[0].model, [node.rows for node in nodes]


def test_a_federation_learns_the_coefficients_a_central_run_learns_and_they_lower_the_objective(chat_run):
    overrides = {**chat_run, "coefficient-learning": "loss", "coefficient-steps": 6,
                 "coefficient-learning-rate": 0.1, "coefficient-groups": 2}  # fmt: skip
    version = base_version(base_identity(RunSettings.from_run_config(overrides)))
    strategy, grid = _federate(overrides)
    record = strategy.last_coefficients
    assert record["nodes"] == NODES and record["steps"] == 6 and not record["dropped"]
    assert record["scored_training_rows"] == []  # every institution holds validation rows out
    assert record["labels"] == sorted(record["labels"]) and len(record["coefficients"]) == NODES
    assert all(len(row) == 2 for row in record["coefficients"])  # K × G, G = 2 layer groups
    assert record["bytes_down_candidates"] > 0 and record["bytes_up_per_step"] == [8 * (1 + NODES * 2 + 1) * NODES] * 6
    model, parts = _central_parts(grid, overrides, record["labels"], version)
    candidates = strategy.last_candidates
    initial = torch.tensor(record["initial"], dtype=torch.float64)
    central = learn_centrally(model, candidates, parts, initial, steps=6, objective="loss", learning_rate=0.1,
                              batch_size=overrides["batch-size"])  # fmt: skip
    # the same rows, the same step rule: equal up to float summation order
    torch.testing.assert_close(torch.tensor(record["coefficients"]), central.coefficients, rtol=0, atol=1e-5)
    assert record["history"] == pytest.approx(central.history, rel=1e-5)
    # (b) the learned coefficients lower the federated objective against the strategy's own (initial) ones
    from fedfuse.automerge import CoefficientModel

    cmodel = CoefficientModel(model, candidates)

    def objective(c: torch.Tensor) -> float:
        return combine_gradients([(value(cmodel, c, rows, "loss"), torch.zeros(1), rows.scored) for rows in parts])[0]

    learned = torch.tensor(record["coefficients"], dtype=torch.float32)
    assert objective(learned) < objective(initial.float()) - 1e-4
    # the applied change is Σ c·τ of the learned coefficients, the factored matrices sent as stacked factors
    expected = combined_change(candidates, learned)
    for name, tensor in strategy.model.tensors.items():
        want = expected[name].dense() if hasattr(expected[name], "dense") else expected[name]
        torch.testing.assert_close(tensor, want, rtol=1e-5, atol=1e-6)
    assert strategy.last_broadcast["factored"] > 0
    section = "\n".join(coefficients_markdown([{"round": 1, "coefficients": record}]))
    assert "## Learned merge coefficients" in section and "| partition-2 |" in section


@pytest.mark.parametrize(
    "setup",
    [
        {},
        {"lora-aggregation": "frozen-a"},
        {"mode": "full", "sparsifier": "none", "strategy": "task_arithmetic", "lam": 0.5},
    ],
    ids=["lora-exact-fedavg", "frozen-a", "full-task-arithmetic"],
)
def test_the_initial_coefficients_are_the_strategys_own_merge(chat_run, setup):
    plain, _ = _federate({**chat_run, **setup})
    learned, _ = _federate({**chat_run, **setup, "coefficient-learning": "loss", "coefficient-steps": 1})
    record = learned.last_coefficients
    assert record["nodes"] == NODES and not record["dropped"], record
    initial = torch.tensor(record["initial"])
    merged = combined_change(learned.last_candidates, initial)
    assert set(merged) == set(plain.model.tensors)
    for name, tensor in plain.model.tensors.items():
        want = merged[name].dense() if hasattr(merged[name], "dense") else merged[name]
        torch.testing.assert_close(want, tensor, rtol=1e-5, atol=1e-6)
    if setup.get("strategy") == "task_arithmetic":  # λ·wₖ: the weights are the examples, not normalized
        weights = initial[:, 0] / 0.5
        assert float(weights.min()) >= 1 and float(initial.max()) > 2  # beyond [0, 2]: the bounds widen with it
    else:
        assert initial.sum(0).tolist() == pytest.approx([1.0])  # FedAvg: wₖ / W in every group


@pytest.mark.parametrize(("malformed", "reason"), [(False, "client_error"), (True, "malformed_reply")])
def test_a_node_failing_mid_steps_is_dropped_and_the_round_finishes(chat_run, malformed, reason):
    overrides = {**chat_run, "coefficient-learning": "entropy", "coefficient-steps": 4}
    grid = AppGrid(overrides)
    grid.failing[102], grid.malformed = 2, malformed  # answers the setup and step 2, then fails
    strategy, _ = _federate(overrides, grid)
    record = strategy.last_coefficients
    assert record["steps"] == 4 and record["nodes"] == NODES - 1
    assert list(record["dropped"]) == ["partition-1"] and reason in record["dropped"]["partition-1"]
    assert grid.coefficient_messages[102] == 3 and grid.coefficient_messages[101] == 4
    assert strategy.model.tensors, "the round's learned change was applied"


def test_with_no_node_left_the_round_falls_back_to_the_strategys_merge(chat_run):
    plain, _ = _federate(chat_run)
    overrides = {**chat_run, "coefficient-learning": "loss", "coefficient-steps": 2}
    grid = AppGrid(overrides)
    grid.failing = dict.fromkeys(grid.nodes, 0)
    strategy, _ = _federate(overrides, grid)
    assert "no node answered step 1" in strategy.last_coefficients["fallback"]
    for name, tensor in plain.model.tensors.items():
        torch.testing.assert_close(strategy.model.tensors[name], tensor, rtol=0, atol=0)


def test_the_chosen_lambda_is_the_argmin_of_the_weighted_losses_and_scales_the_change(chat_run):
    plain, _ = _federate(chat_run)
    strategy, _ = _federate({**chat_run, "lambda-candidates": "0.5,2,3"})  # 1 is not a candidate: δ is rescaled
    record = strategy.last_lambda
    losses, chosen = record["losses"], record["lambda"]
    assert record["candidates"] == [0.5, 2.0, 3.0] and record["nodes"] == NODES and len(losses) == 3
    assert chosen == record["candidates"][min(range(3), key=lambda i: losses[i])]
    assert record["bytes_down"] == record["delta_bytes"] * NODES > 0
    for name, tensor in plain.model.tensors.items():
        torch.testing.assert_close(strategy.model.tensors[name], chosen * tensor, rtol=1e-5, atol=1e-7)


def test_pick_lambda_weights_by_count_and_breaks_ties_towards_one():
    chosen, means = pick_lambda([0.5, 1.0, 2.0], [((3.0, 2.0, 1.0), 1), ((1.0, 2.0, 5.0), 3)])
    assert means == [1.5, 2.0, 4.0] and chosen == 0.5
    assert pick_lambda([0.5, 1.5, 2.0], [((1.0, 1.0, 3.0), 2)])[0] == 0.5  # |0.5 − 1| = |1.5 − 1|: the first
    assert pick_lambda([2.0, 1.0], [((1.0, 1.0), 2)])[0] == 1.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"coefficient-learning": "loss", "strategy": "ties"}, "linear strategy"),
        ({"coefficient-learning": "loss", "strategy": "median"}, "linear strategy"),
        ({"coefficient-learning": "loss", "lora-aggregation": "factors"}, "lora-aggregation"),
        ({"coefficient-learning": "loss", "lambda-candidates": "1,2"}, "both set"),
        ({"coefficient-learning": "gradient"}, "coefficient-learning must be one of"),
        ({"coefficient-learning": "loss", "coefficient-steps": 0}, "coefficient-steps"),
        ({"coefficient-learning": "loss", "coefficient-learning-rate": -1.0}, "coefficient-learning-rate"),
        ({"lambda-candidates": "1"}, "at least two"),
        ({"lambda-candidates": "1,x"}, "numbers separated by commas"),
        ({"coefficient-learning": "loss", "mode": "full", "secure-aggregation": "secagg+"}, "secure-aggregation"),
        ({"lambda-candidates": "1,2", "dp": "central", "weighting": "uniform"}, "privacy accounting"),
    ],
)
def test_settings_refuse_what_cannot_work_in_one_line(overrides, message):
    with pytest.raises(SettingsError, match=message) as raised:
        RunSettings.from_run_config(**overrides)
    assert "\n" not in str(raised.value)


class _Tiny(torch.nn.Module):
    """A classifier a plain Flower app trains: mean embedding → 3 classes (``.logits`` as transformers give)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3)

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.head(self.embed(input_ids).mean(1)))


def _flower_handler(msg: Message, context: Context) -> Message:
    """A Flower app's training: the received weights plus a seeded change; it keeps the round's weights."""
    from flwr.app import MetricRecord

    received = msg.content.array_records["arrays"]
    context.state.array_records["round"] = received
    generator = torch.Generator().manual_seed(context.node_id)
    trained = {
        n: t + 0.3 * torch.randn(t.shape, generator=generator) for n, t in received.to_torch_state_dict().items()
    }
    content = RecordDict(
        {"arrays": ArrayRecord(trained), "metrics": MetricRecord({"num-examples": context.node_id % 7 + 3})}
    )
    return Message(content, reply_to=msg)


def _flower_loader(msg: Message, context: Context, request: CoefficientRequest):
    """Any Flower app's loader: its round weights (kept by its handler) and its own labelled rows."""
    from fedfuse.automerge.objectives import Rows
    from fedfuse.client.coefficient_mod import NodeModel

    model = _Tiny()
    weights = context.state.array_records["round"].to_torch_state_dict()
    model.load_state_dict(weights)
    generator = torch.Generator().manual_seed(50 + context.node_id)
    ids = torch.randint(0, 10, (12, 5), generator=generator)
    rows = Rows(ids, torch.ones_like(ids), ids[:, 0] % 3, causal=False)

    def land(delta):
        return {name: weights[name] + (t.dense() if hasattr(t, "dense") else t) for name, t in delta.tensors.items()}

    return NodeModel(model, rows, "validation", land)


@pytest.mark.parametrize("plan", [{"objective": "loss", "steps": 5, "learning_rate": 0.2}, {"lambdas": (0.5, 1.5)}])
def test_any_flower_app_learns_coefficients_with_fedmerge_and_the_mod(server_identity, plan):
    from mod_grid import ModGrid

    from fedfuse.client.coefficient_mod import coefficient_mod
    from fedfuse.flower import FedMerge
    from fedfuse.server.coefficient_round import CoefficientPlan

    grid = ModGrid([101, 102, 103], _flower_handler, [coefficient_mod(_flower_loader)])
    coefficients = CoefficientPlan(**plan, keep_candidates=True)
    strategy = FedMerge("fedavg", fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=3,
                        coefficients=coefficients)  # fmt: skip
    initial = ArrayRecord(_Tiny().state_dict())
    result = strategy.start(grid, initial, num_rounds=1, timeout=5.0)
    merged, start = result.arrays.to_torch_state_dict(), initial.to_torch_state_dict()
    if "lambdas" in plan:
        record = strategy.last_lambda
        assert record["nodes"] == 3 and record["lambda"] in (0.5, 1.5) and len(record["losses"]) == 2
        plain = FedMerge("fedavg", fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=3)
        plain_result = plain.start(ModGrid([101, 102, 103], _flower_handler), initial, num_rounds=1, timeout=5.0)
        expected = {
            n: start[n] + record["lambda"] * (t - start[n])
            for n, t in plain_result.arrays.to_torch_state_dict().items()
        }
    else:
        record = strategy.last_coefficients
        assert record["nodes"] == 3 and record["history"][-1] < record["history"][0], record
        change = combined_change(strategy.last_candidates, torch.tensor(record["coefficients"]))
        expected = {name: start[name] + change[name] for name in start}
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6)


def test_a_node_that_holds_no_rows_out_scores_its_training_rows_and_says_so(chat_run):
    strategy, _ = _federate({**chat_run, "validation-fraction": 0.0, "coefficient-learning": "entropy",
                             "coefficient-steps": 1})  # fmt: skip
    record = strategy.last_coefficients
    assert record["nodes"] == NODES and record["scored_training_rows"] == ["partition-0", "partition-1", "partition-2"]
