"""``coefficient_mod``: a node's side of federated coefficient learning and per-round λ, as a Flower mod.

A ``train`` message carrying a ``"fedfuse.coefficients"`` record (:class:`~fedfuse.messages.CoefficientRequest`)
is a coefficient stage, answered here without training; any other message passes through. List it first.

- ``setup``: the round's K candidates (LoRA factors stay factors), kept on disk by run key
  (``<state-dir>/<run key>/node-<id>/coefficients/``: simulated nodes' ``Context`` lives in the server's
  process), then answered as a step at the first coefficients;
- ``step``: the node's model at the round's version and its held-out rows (:class:`NodeModel`, from the
  ``loader`` the app gives; cached in this process between steps, by run key, node, round and version), a
  :class:`~fedfuse.automerge.CoefficientModel`, and
  :func:`~fedfuse.automerge.objectives.value_and_gradient`: the reply is the objective's mean, its K×G
  gradient and the count scored — a few hundred numbers, no per-example output;
- ``lambda``: the round's change δ and candidate λs; for each λ the node lands λ·δ as the broadcast would
  (:meth:`NodeModel.land`) and answers its mean held-out loss, and the count.

fedfuse's ClientApp gives its own loader (:func:`fedfuse.client.app.node_model_loader`); any Flower app can
pass one that returns its model and rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from safetensors import safe_open
from safetensors.torch import save_file

from fedfuse.automerge.coefficients import Candidates, CoefficientModel, Direction
from fedfuse.automerge.objectives import Rows, value_and_gradient
from fedfuse.checkpoints import atomic_output
from fedfuse.client.mods import _failed
from fedfuse.client.residuals import ResidualFiles
from fedfuse.messages import COEFFICIENTS_RECORD, CoefficientReply, CoefficientRequest
from fedfuse.rounds import Delta
from fedfuse.training.tasks import IGNORE

CANDIDATES_FILE = "candidates.safetensors"
CACHED_MODELS = 4
"""Node models kept in the process between steps (a simulation worker may serve several nodes)."""


@dataclass
class NodeModel:
    """A node's model at the round's version, its held-out rows, and how a broadcast delta would land on it.

    ``land(delta)`` gives the values the model's changed parameters take once ``delta`` is applied as the
    broadcast applies it (names → tensors). ``rows_source`` is ``validation`` or ``train`` (no rows held out).
    """

    model: torch.nn.Module
    rows: Rows
    rows_source: str
    land: Callable[[Delta], Mapping[str, torch.Tensor]]


ModelLoader = Callable[[Message, Context, CoefficientRequest], NodeModel]
"""Builds the node's model for a request (raises ``ValueError`` when it holds another version)."""

_CACHE: dict[tuple[str, int, int, str], tuple[NodeModel, CoefficientModel | None]] = {}


def coefficient_mod(loader: ModelLoader) -> Callable[[Message, Context, ClientAppCallable], Message]:
    """The mod answering coefficient stages with the node's model from ``loader``."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN or COEFFICIENTS_RECORD not in msg.content.config_records:
            return call_next(msg, context)  # errors of the handlers after this mod are theirs, not caught here
        try:
            request = CoefficientRequest.from_content(msg.content)
            assert request is not None
            return _answer(msg, context, request, loader).reply_to(msg)
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            return _failed(msg, f"coefficient stage: {exc}")

    return mod


def _answer(msg: Message, context: Context, request: CoefficientRequest, loader: ModelLoader) -> CoefficientReply:
    """Run one stage: keep the candidates (setup), then a step; or score the λ candidates."""
    key = (request.run_key, int(context.node_id), request.server_round, request.version)
    if request.stage == "setup":
        _keep_candidates(context, request)
        _CACHE.pop(key, None)
    node, cmodel = _cached(msg, context, request, loader, key)
    if request.stage == "lambda":
        return _lambda_reply(node, request)
    if cmodel is None:
        cmodel = CoefficientModel(node.model, _load_candidates(context, request, _device(node.model)))
        _CACHE[key] = (node, cmodel)
    shape = request.shape
    if tuple(shape) != (len(cmodel.candidates), cmodel.candidates.num_groups):
        raise ValueError(f"coefficients are {shape}, the candidates kept here are {len(cmodel.candidates)}×groups")
    c = torch.tensor(request.coefficients, dtype=torch.float64).reshape(shape).to(torch.float32)
    value, gradient, count = value_and_gradient(
        cmodel, c.to(_device(node.model)), node.rows, request.objective, request.batch_size
    )
    flat = tuple(float(v) for v in gradient.detach().cpu().reshape(-1).tolist())
    return CoefficientReply(request.stage, (float(value),), flat, int(count), node.rows_source)


def _cached(
    msg: Message, context: Context, request: CoefficientRequest, loader: ModelLoader, key: tuple[str, int, int, str]
) -> tuple[NodeModel, CoefficientModel | None]:
    """The node's model for this round (loaded once per round and version in this process)."""
    if key in _CACHE:
        return _CACHE[key]
    node = loader(msg, context, request)
    device = _device(node.model)
    rows = node.rows
    node.rows = Rows(rows.input_ids.to(device), rows.attention_mask.to(device), rows.targets.to(device), rows.causal)
    while len(_CACHE) >= CACHED_MODELS:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = (node, None)
    return node, None


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _folder(context: Context, request: CoefficientRequest) -> Path:
    return ResidualFiles.of(context, request.run_key or "run", f"node-{context.node_id}", "coefficients").folder


def _keep_candidates(context: Context, request: CoefficientRequest) -> None:
    """The setup's candidates on disk (atomically), with their labels, names, groups, round and version."""
    if not request.vectors or len(request.names) != len(request.groups):
        raise ValueError("the setup carries no candidates, or names and groups that do not pair")
    folder = _folder(context, request)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    tensors = {f"{k}/{n}": t.contiguous() for k, v in enumerate(request.vectors) for n, t in v.arrays().items()}
    meta = {"labels": list(request.labels), "names": list(request.names), "groups": list(request.groups),
            "round": request.server_round, "version": request.version}  # fmt: skip
    with atomic_output(folder / CANDIDATES_FILE, directory=False, overwrite=True) as temp:
        save_file(tensors, str(temp), metadata={"fedfuse.candidates": json.dumps(meta)})


def _load_candidates(context: Context, request: CoefficientRequest, device: torch.device) -> Candidates:
    """The candidates kept at this round's setup (``ValueError`` when none, or another round's)."""
    path = _folder(context, request) / CANDIDATES_FILE
    if not path.is_file():
        raise ValueError("no candidates kept on this node (it missed the setup, or restarted without its state)")
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads((handle.metadata() or {}).get("fedfuse.candidates", "{}"))
        arrays = {name: handle.get_tensor(name).to(device) for name in handle.keys()}  # noqa: SIM118
    if meta.get("round") != request.server_round or meta.get("version") != request.version:
        raise ValueError("the candidates kept here are another round's")
    grouped: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in arrays.items():
        index, _, name = key.partition("/")
        grouped.setdefault(int(index), {})[name] = tensor
    vectors: list[dict[str, Direction]] = [dict(Delta.from_arrays(grouped[k]).tensors) for k in sorted(grouped)]
    groups = dict(zip(meta["names"], meta["groups"], strict=True))
    return Candidates(tuple(meta["labels"]), tuple(vectors), groups, 1 + max(groups.values(), default=0))


@torch.no_grad()
def _lambda_reply(node: NodeModel, request: CoefficientRequest) -> CoefficientReply:
    """The mean held-out loss at θ + λ·δ for each candidate λ (δ landed as the broadcast lands it)."""
    if len(request.vectors) != 1 or not request.lambdas:
        raise ValueError("a lambda stage carries one change and at least one λ")
    delta = request.vectors[0]
    parameters = dict(node.model.named_parameters())
    kept = {name: parameters[name].detach().clone() for name in delta.tensors if name in parameters}
    losses = []
    try:
        for lam in request.lambdas:
            scaled = Delta({n: t.scaled(lam) if not isinstance(t, torch.Tensor) else t * lam
                            for n, t in delta.tensors.items()})  # fmt: skip
            for name, value in node.land(scaled).items():
                if name in parameters:
                    parameters[name].copy_(value.to(parameters[name].device, parameters[name].dtype))
            losses.append(mean_loss(node.model, node.rows, request.batch_size))
    finally:
        for name, value in kept.items():
            parameters[name].copy_(value)
    return CoefficientReply("lambda", tuple(losses), (), node.rows.scored, node.rows_source)


@torch.no_grad()
def mean_loss(model: torch.nn.Module, rows: Rows, batch_size: int = 8) -> float:
    """Cross-entropy over the scored positions (causal LMs) or rows (classifiers), averaged."""
    model.eval()
    total = 0.0
    for batch in rows.batches(batch_size):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        if batch.causal:
            targets = batch.targets[:, 1:]
            scored = targets != IGNORE
            total += float(torch.nn.functional.cross_entropy(logits[:, :-1][scored], targets[scored], reduction="sum"))
        else:
            total += float(torch.nn.functional.cross_entropy(logits, batch.targets, reduction="sum"))
    return total / max(rows.scored, 1)
