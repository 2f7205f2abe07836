"""Federated coefficient learning and per-round λ: extra message stages of one round, after its replies are folded.

**Coefficient learning** (``coefficient-learning = "loss" | "entropy"``). The round engine keeps each accepted
update's merge input (``RoundEngine.keep_updates``: LoRA factors stay factors). They become
:class:`~fedfuse.automerge.Candidates` (K institutions × G layer groups); the initial coefficients are what the
strategy would have used (``c(W)·wₖ``: FedAvg wₖ/W, task arithmetic λ·wₖ), so zero steps give the strategy's
own merge. The candidates go once to the nodes that contributed (``setup``, with the first coefficients);
each later step sends only the K×G coefficients. Every node answers its objective on its held-out rows, its
K×G gradient and the count it scored (:class:`~fedfuse.messages.CoefficientReply`); the server combines them
(:func:`~fedfuse.automerge.learn.combine_gradients`) and steps with
:class:`~fedfuse.automerge.learn.CoefficientOptimizer` — the step rule of the central
:func:`~fedfuse.automerge.learn.learn`, so a federation takes the steps a central run on the same rows takes
(:func:`learn_centrally`). A node whose reply is an error or malformed is dropped from later steps; with none
left the round falls back to the strategy's merge. The round's change is Σₖ c[k, g]·τₖ (stacked LoRA factors
when every candidate is factored), through the server optimizer when one is configured.

**Per-round λ** (``lambda-candidates``). The round's change δ (as the server optimizer gives it) goes once to the
contributing nodes with the candidate λs; each answers its held-out loss at θ + λ·δ for every λ, landed as the
broadcast lands it (:func:`~fedfuse.rounds.apply_delta`). The λ with the least count-weighted mean loss (ties:
the smaller |λ − 1|) scales the round's change. δ travels in that message *and again* in the next round's
model sync (the node does not keep it): the option costs one extra copy of the round's change per node.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from logging import WARNING
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedfuse.algebra import to_dense
from fedfuse.algebra.low_rank import LowRank, densified, factors_are_smaller, stack
from fedfuse.automerge.coefficients import Candidates, CoefficientModel, Direction
from fedfuse.automerge.learn import CoefficientOptimizer, LearnedCoefficients, combine_gradients, learn
from fedfuse.automerge.objectives import Rows
from fedfuse.messages import CoefficientReply, CoefficientRequest, instruction_destinations, reply_node
from fedfuse.rejections import Rejected
from fedfuse.rounds import Delta, RoundEngine
from fedfuse.rounds.engine import KeptUpdate
from fedfuse.server.streaming import stream_replies
from fedfuse.strategies import MergeStrategy

if TYPE_CHECKING:
    from fedfuse.server.fedmerge import FedMerge
    from fedfuse.settings import RunSettings

Change = dict[str, torch.Tensor | LowRank]


@dataclass(frozen=True)
class CoefficientPlan:
    """What a round's extra stages do: learn coefficients (``objective`` loss/entropy) or pick λ (``lambdas``)."""

    objective: str = "none"
    steps: int = 20
    learning_rate: float = 0.05
    groups: int = 1
    lambdas: tuple[float, ...] = ()
    batch_size: int = 8
    keep_candidates: bool = False
    """Keep the last round's candidates on the strategy (``last_candidates``: tests and benchmarks)."""

    @property
    def learns(self) -> bool:
        """Whether the round learns its coefficients (else it picks λ)."""
        return self.objective != "none"

    @classmethod
    def from_settings(cls, settings: RunSettings) -> CoefficientPlan | None:
        """The run's plan (None when neither ``coefficient-learning`` nor ``lambda-candidates`` is set)."""
        merge = settings.merge
        if not merge.learns_coefficients and not merge.lambdas:
            return None
        return cls(
            merge.coefficient_learning, merge.coefficient_steps, merge.coefficient_learning_rate,
            merge.coefficient_groups, merge.lambdas, settings.training.batch_size,
        )  # fmt: skip


def coefficient_bounds(initial: torch.Tensor) -> tuple[float, float]:
    """The box coefficients stay in: [min(0, 2·min c₀), max(2, 2·max c₀)] (task arithmetic's λ·wₖ may exceed 2)."""
    return min(0.0, 2 * float(initial.min())), max(2.0, 2 * float(initial.max()))


def initial_coefficients(strategy: MergeStrategy, weights: Sequence[float], num_groups: int) -> torch.Tensor:
    """K×G: what a linear ``strategy`` gives updates of these weights, ``c(W)·wₖ`` in every group.

    FedAvg: wₖ/W; task arithmetic: λ·wₖ; normalized linear: wₖ/W (a benchmark calls this for its central run).
    """
    scale = strategy.linear_coefficient(sum(weights))
    column = torch.tensor([scale * weight for weight in weights], dtype=torch.float64)
    return column[:, None].expand(len(weights), num_groups).clone()


def candidate_vectors(engine: RoundEngine, kept: Sequence[KeptUpdate]) -> list[dict[str, Direction]]:
    """Each kept update as a task vector in the model's names (factors kept; frozen A redrawn)."""
    vectors: list[dict[str, Direction]] = []
    for update in kept:
        tensors: dict[str, Direction] = {
            name: t if isinstance(t, LowRank) else to_dense(t)  # type: ignore[arg-type]
            for name, t in update.tensors.items()
        }
        if engine.space.kind == "lora-frozen-a":
            dense = {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor)}
            tensors = dict(engine.space.task_vector(dense, round_number=engine.round_number))
        vectors.append(tensors)
    return vectors


def combined_change(candidates: Candidates, coefficients: torch.Tensor) -> Change:
    """Σₖ c[k, g]·τₖ per name: stacked factors where every term is factored (and smaller), dense elsewhere."""
    c = candidates.check(coefficients).double()
    change: Change = {}
    for name in candidates.names:
        group = candidates.groups[name]
        terms = [(float(c[k, group]), v[name]) for k, v in enumerate(candidates.vectors) if name in v]
        if all(isinstance(t, LowRank) for _, t in terms):
            factored = stack([t.scaled(ck).to(torch.float32) for ck, t in terms])  # type: ignore[union-attr]
            if factors_are_smaller(factored.shape, factored.rank):
                change[name] = factored
                continue
        dense = [(ck, t.dense(torch.float64) if isinstance(t, LowRank) else t.double()) for ck, t in terms]
        change[name] = sum((ck * t for ck, t in dense), torch.zeros_like(dense[0][1])).float()
    return change


def scaled_change(change: Mapping[str, torch.Tensor | LowRank], lam: float) -> Change:
    """λ·change (factors: B scaled)."""
    return {name: t.scaled(lam) if isinstance(t, LowRank) else t * lam for name, t in change.items()}


def learn_centrally(
    model: torch.nn.Module,
    candidates: Candidates,
    parts: Sequence[Rows],
    initial: torch.Tensor,
    *,
    steps: int,
    objective: str,
    learning_rate: float = 0.05,
    batch_size: int = 8,
) -> LearnedCoefficients:
    """The federated algorithm run centrally: ``learn`` on each institution's rows, with the round's bounds."""
    return learn(
        CoefficientModel(model, candidates), parts, initial, steps=steps, objective=objective,
        learning_rate=learning_rate, bounds=coefficient_bounds(initial), batch_size=batch_size,
    )  # fmt: skip


def pick_lambda(lambdas: Sequence[float], parts: Sequence[tuple[Sequence[float], int]]) -> tuple[float, list[float]]:
    """The λ with the least count-weighted mean loss over ``parts`` (losses per λ, count); ties: smaller |λ − 1|."""
    total = sum(count for _, count in parts)
    means = [sum(losses[i] * count for losses, count in parts) / total for i in range(len(lambdas))]
    best = min(range(len(lambdas)), key=lambda i: (means[i], abs(lambdas[i] - 1.0)))
    return float(lambdas[best]), means


@dataclass
class CoefficientRound:
    """The extra stages of one round of ``strategy`` (a FedMerge), run when its change is asked for."""

    strategy: FedMerge
    grid: Grid
    timeout: float
    server_round: int
    plan: CoefficientPlan
    run_key: str = ""
    version: str = ""
    labels: dict[int, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    bytes_up: list[int] = field(default_factory=list)
    train_rows: set[str] = field(default_factory=set)
    """Institutions that hold no rows out and scored their training rows instead."""

    def round_change(self, engine: RoundEngine) -> Change | None:
        """The round's change after the stages (None when nothing was accepted)."""
        if not engine.contributions:
            return None
        started = time.perf_counter()
        if self.plan.learns:
            learned, record = self._learned(engine)
            record["seconds"] = round(time.perf_counter() - started, 3)
            self.strategy.last_coefficients = record
            return learned
        change, record = self._lambda(engine)
        record["seconds"] = round(time.perf_counter() - started, 3)
        self.strategy.last_lambda = record
        return change

    def _through_optimizer(self, change: Change, engine: RoundEngine) -> Change:
        optimizer = self.strategy.optimizer
        if optimizer.rule is None:
            return change
        return dict(optimizer.step(densified(change), engine.round_number))

    def _nodes(self, kept: Sequence[KeptUpdate]) -> list[int]:
        ids = {name: node for node, name in self.strategy._names.items()}
        nodes = [int(u.node) if u.node.isdigit() else ids.get(u.node, -1) for u in kept]
        self.labels = {node: update.label for node, update in zip(nodes, kept, strict=True)}
        return nodes

    def _learned(self, engine: RoundEngine) -> tuple[Change, dict[str, Any]]:
        """Learn the coefficients with the contributing nodes; fall back to the strategy's merge when none answer."""
        kept = list(engine.kept_updates)
        merged = engine.merged_factored()  # the strategy's own merge: diagnostics, and the fallback
        engine.kept_updates = []
        if len(kept) != len(engine.contributions):
            return self._fallback(engine, merged, "a tier gateway's partial state has no per-institution candidates")
        candidates = Candidates.build([u.label for u in kept], candidate_vectors(engine, kept), self.plan.groups)
        if self.plan.keep_candidates:
            self.strategy.last_candidates = candidates
        initial = initial_coefficients(engine.strategy, [u.weight for u in kept], candidates.num_groups)
        lower, upper = coefficient_bounds(initial)
        optimizer = CoefficientOptimizer(initial, self.plan.learning_rate, lower=lower, upper=upper)
        nodes = self._nodes(kept)
        setup, arrays = self._setup(candidates, initial)
        history: list[float] = []
        active = [node for node in nodes if node >= 0]
        for step in range(self.plan.steps):
            request = setup if step == 0 else self._request("step", optimizer.coefficients)
            parts = self._ask(active, request, arrays if step == 0 else None)
            active = [node for node in active if node in parts]
            if not parts:
                return self._fallback(engine, merged, f"no node answered step {step + 1}", history)
            value, gradient, _ = combine_gradients(list(parts.values()))
            history.append(value)
            optimizer.step(gradient)
        learned = optimizer.coefficients
        record = self._record(candidates, initial, learned, history, setup, len(active))
        return self._through_optimizer(combined_change(candidates, learned), engine), record

    def _fallback(
        self, engine: RoundEngine, merged: Change, why: str, history: list[float] | None = None
    ) -> tuple[Change, dict[str, Any]]:
        log(WARNING, "round %s: coefficient learning fell back to the strategy's merge: %s", self.server_round, why)
        record = {"objective": self.plan.objective, "fallback": why, "history": history or [],
                  "dropped": dict(self.dropped), "bytes_up": sum(self.bytes_up)}  # fmt: skip
        return self._through_optimizer(merged, engine), record

    def _setup(self, candidates: Candidates, initial: torch.Tensor) -> tuple[CoefficientRequest, Any]:
        base = self._request("setup", initial)
        vectors = tuple(Delta(dict(vector)) for vector in candidates.vectors)
        names = tuple(candidates.names)
        groups = tuple(candidates.groups[n] for n in names)
        setup = replace(base, labels=candidates.labels, names=names, groups=groups, vectors=vectors)
        return setup, setup.arrays()

    def _request(self, stage: str, coefficients: torch.Tensor) -> CoefficientRequest:
        rows, columns = coefficients.shape
        return CoefficientRequest(
            stage, self.server_round, self.run_key, self.version, self.plan.objective, (int(rows), int(columns)),
            tuple(float(v) for v in coefficients.reshape(-1).tolist()), batch_size=self.plan.batch_size,
        )  # fmt: skip

    def _ask(
        self, nodes: Sequence[int], request: CoefficientRequest, arrays: Any = None
    ) -> dict[int, tuple[float, torch.Tensor, int]]:
        """One step's (value, gradient, count) per node that answered well; the others are dropped."""
        shape = request.shape
        parts: dict[int, tuple[float, torch.Tensor, int]] = {}
        up = 0
        for node, reply in self._exchange(nodes, request, arrays):
            try:
                parsed = CoefficientReply.from_message(reply, request.stage, 1, shape[0] * shape[1])
            except (Rejected, ValueError) as exc:
                self._drop(node, getattr(exc, "reason", "malformed_reply"), str(exc))
                continue
            up += 8 * (len(parsed.values) + len(parsed.gradient) + 1)
            if parsed.rows != "validation":
                self.train_rows.add(self.labels.get(node, str(node)))
            gradient = torch.tensor(parsed.gradient, dtype=torch.float64).reshape(shape)
            parts[node] = (parsed.values[0], gradient, parsed.count)
        self.bytes_up.append(up)
        return {node: parts[node] for node in nodes if node in parts}  # the nodes' order, not arrival order

    def _exchange(
        self, nodes: Sequence[int], request: CoefficientRequest, arrays: Any = None
    ) -> Iterator[tuple[int, Message]]:
        """Send ``request`` to ``nodes``; each reply with the node it answers for; silent nodes dropped."""
        messages = [request.to_message(node, arrays) for node in nodes]
        destinations: dict[str, int] = {}
        replied: set[int] = set()
        for reply in stream_replies(self.grid, messages, timeout=self.timeout):
            if reply.metadata.reply_to_message_id not in destinations:
                destinations = instruction_destinations(messages)
            node = reply_node(reply, destinations)
            replied.add(node)
            yield node, reply
        for node in nodes:
            if node not in replied:
                self._drop(node, "timed_out", f"no {request.stage!r} reply within {self.timeout:g} s")

    def _drop(self, node: int, reason: str, message: str) -> None:
        label = self.labels.get(node, str(node))
        self.dropped[label] = f"{reason}: {message}"
        log(WARNING, "round %s: %s dropped from the coefficient stages (%s): %s", self.server_round, label, reason,
            message)  # fmt: skip

    def _record(
        self, candidates: Candidates, initial: torch.Tensor, learned: torch.Tensor, history: list[float],
        setup: CoefficientRequest, nodes: int,
    ) -> dict[str, Any]:  # fmt: skip
        shape = initial.shape
        candidate_bytes = sum(delta.nbytes for delta in setup.vectors)
        return {
            "objective": self.plan.objective, "labels": list(candidates.labels), "groups": candidates.num_groups,
            "initial": initial.tolist(), "coefficients": learned.tolist(), "history": history,
            "steps": len(history), "nodes": nodes, "dropped": dict(self.dropped),
            "candidate_bytes": candidate_bytes, "bytes_down_candidates": candidate_bytes * len(self.labels),
            "bytes_down_per_step": 8 * shape[0] * shape[1] * len(self.labels), "bytes_up": sum(self.bytes_up),
            "bytes_up_per_step": list(self.bytes_up), "scored_training_rows": sorted(self.train_rows),
        }  # fmt: skip

    def _lambda(self, engine: RoundEngine) -> tuple[Change | None, dict[str, Any]]:
        """Scale the round's change by the candidate λ the contributing nodes' held-out losses prefer."""
        kept = [KeptUpdate(c.node, self.strategy._label(c.node), c.weight, {}) for c in engine.contributions.values()]
        change = self.strategy.optimizer.round_change(engine)
        if change is None:
            return None, {}
        nodes = [node for node in self._nodes(kept) if node >= 0]
        lambdas = self.plan.lambdas
        base = CoefficientRequest("lambda", self.server_round, self.run_key, self.version, "loss", lambdas=lambdas,
                                  vectors=(Delta(dict(change)),), batch_size=self.plan.batch_size)  # fmt: skip
        parts: list[tuple[tuple[float, ...], int]] = []
        for node, reply in self._exchange(nodes, base, base.arrays()):
            try:
                parsed = CoefficientReply.from_message(reply, "lambda", len(lambdas), 0)
            except (Rejected, ValueError) as exc:
                self._drop(node, getattr(exc, "reason", "malformed_reply"), str(exc))
                continue
            parts.append((parsed.values, parsed.count))
        record: dict[str, Any] = {"candidates": list(lambdas), "nodes": len(parts), "dropped": dict(self.dropped),
                                  "delta_bytes": Delta(dict(change)).nbytes,
                                  "bytes_down": Delta(dict(change)).nbytes * len(nodes)}  # fmt: skip
        if not parts:
            log(WARNING, "round %s: no node scored the λ candidates: λ = 1", self.server_round)
            return change, {**record, "lambda": 1.0, "fallback": "no node scored the candidates"}
        chosen, losses = pick_lambda(lambdas, parts)
        return scaled_change(change, chosen), {**record, "lambda": chosen, "losses": losses}


def coefficients_markdown(rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    """report.md's section: each round's learned coefficients (or fallback) and each round's λ search."""
    lines: list[str] = []
    for index, record in enumerate(rounds):
        number = record.get("round", index + 1)
        learned = record.get("coefficients") or {}
        if learned.get("coefficients"):
            groups = learned.get("groups", 1)
            rows = [f"| {label} | " + " | ".join(f"{v:.4f}" for v in values) + " |"
                    for label, values in zip(learned["labels"], learned["coefficients"], strict=False)]  # fmt: skip
            history = learned.get("history") or [float("nan")]
            lines += [
                f"### Round {number}: {learned['objective']} {history[0]:.4f} → {history[-1]:.4f} in "
                f"{learned['steps']} steps ({learned['nodes']} institutions; candidates "
                f"{learned['bytes_down_candidates']} B down once, {learned['bytes_up']} B up)",
                "", "| institution | " + " | ".join(f"group {g}" for g in range(groups)) + " |",
                "|---|" + "---|" * groups, *rows, "",
            ]  # fmt: skip
        elif learned.get("fallback"):
            lines += [f"### Round {number}: the strategy's own merge ({learned['fallback']})", ""]
        search = record.get("lambda_search") or {}
        if search:
            pairs = zip(search["candidates"], search.get("losses", []), strict=False)
            losses = ", ".join(f"λ={lam:g}: {loss:.4f}" for lam, loss in pairs)
            lines += [f"- round {number}: λ = {search['lambda']:g} ({losses or search.get('fallback', '')})"]
    return ["## Learned merge coefficients", "", *lines, ""] if lines else []
