"""A Flower quickstart-style app, as a user of plain Flower writes it: a small classifier on local data.

The ClientApp trains the received weights and replies with ``"arrays"`` and ``num-examples``; it
knows nothing of fedfuse (the tests add fedfuse's mods to it). Training is seeded by node and round,
so two strategies run on the same federation see the same client computation for the same weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

FEATURES, CLASSES, HIDDEN = 32, 10, 256
SEPARATION = 0.9


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, CLASSES),
    )


def parameter_count() -> int:
    return sum(p.numel() for p in make_model().parameters())


def dataset(seed: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian classes around fixed centres (the same centres for every node); ``seed`` draws the rows."""
    centres = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(1234)) * SEPARATION
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (rows,), generator=generator)
    return centres[labels] + torch.randn(rows, FEATURES, generator=generator), labels


def accuracy_and_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(x)
        return float((logits.argmax(1) == y).float().mean()), float(torch.nn.functional.cross_entropy(logits, y))


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Flower's ``evaluate_fn``: accuracy of the global model on a held-out set."""
    model = make_model()
    model.load_state_dict(arrays.to_torch_state_dict())
    accuracy, loss = accuracy_and_loss(model, *dataset(999, 2000))
    return MetricRecord({"accuracy": accuracy, "loss": loss})


def client_app(mods: Sequence[Mod] = (), *, learning_rate: float = 0.05, momentum: float = 0.9) -> ClientApp:
    """The quickstart-style ClientApp (node ``p`` holds 150 + 50·p rows), with ``mods`` if given."""
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        partition = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"]["server-round"])
        model = make_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        x, y = dataset(partition, 150 + 50 * partition)
        torch.manual_seed(1000 * partition + server_round)
        optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
        for _ in range(2):
            for batch in torch.randperm(len(x)).split(32):
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
                loss.backward()
                optimizer.step()
        metrics = MetricRecord({"train_loss": float(loss.detach()), "num-examples": len(x)})
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        model = make_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        x, y = dataset(100 + partition, 200)
        accuracy, loss = accuracy_and_loss(model, x, y)
        metrics = MetricRecord({"eval_acc": accuracy, "eval_loss": loss, "num-examples": len(x)})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def simulate(main: Callable[[Grid, Context], Any], client: ClientApp, nodes: int) -> None:
    """Run ``main`` as a real ServerApp against ``nodes`` SuperNodes in Flower's simulation engine."""
    server = ServerApp()
    server.main()(main)
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=nodes,
        backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2, "logging_level": "ERROR"}},
    )
