"""``FedMerge``: any fedfuse merge method as a drop-in for Flower's ``FedAvg`` in an existing Flower app.

A ServerApp that runs ``FedAvg(...).start(grid=..., initial_arrays=..., ...)`` switches to
``FedMerge("ties", density=0.2, ...)`` with the same options, the same ``start`` and the same
``Result``. Replies may be Flower's standard ones — the trained weights in an ArrayRecord and
``num-examples`` in a MetricRecord — or fedfuse update payloads (made on the client by
:func:`fedfuse.client.mods.task_vector_mod`). Each reply is folded into the round's
:class:`~fedfuse.rounds.RoundEngine` as it arrives, never kept in a list: a standard reply becomes
τ = weights − round weights here, shrunk by the strategy's sparsifier; a payload is decoded and
folded as the fedfuse server does. Bad replies are rejected with fedfuse's reasons and the round goes
on. Sampling, configuration, federated evaluation and metric aggregation are Flower's ``FedAvg``.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from fedfuse.algebra import Sparsifier
from fedfuse.messages import (
    PAYLOAD_RECORDS,
    TrainReply,
    array_record,
    instruction_destinations,
    record_tensors,
    reply_error_reason,
    reply_node,
)
from fedfuse.rejections import Rejected, Rejection
from fedfuse.rounds import WEIGHTINGS, RoundEngine, UpdateSpace
from fedfuse.security import Registry
from fedfuse.server.streaming import stream_replies
from fedfuse.strategies import MergeStrategy, build_strategy
from fedfuse.wire import fingerprint

MetricsAggregation = Callable[[list[RecordDict], str], MetricRecord]
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


class FedMerge(FedAvg):
    """Flower's ``FedAvg`` with the merge done by a fedfuse strategy, folding replies as they arrive.

    Parameters
    ----------
    strategy : str or MergeStrategy
        A fedfuse strategy name (built-in, preset or plug-in, see ``fedfuse strategies``) or an
        instance. ``**params`` are its declared parameters (``FedMerge("ties", vote="count")``).
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes,
    weighted_by_key, arrayrecord_key, configrecord_key, train_metrics_aggr_fn, evaluate_metrics_aggr_fn
        As Flower's ``FedAvg``.
    sparsifier : {"trim", "dare", "none"}, optional
        How the server shrinks the task vectors it forms from standard replies; default: the
        strategy's own (TIES trims, DARE presets drop, FedAvg keeps everything).
    density : float
        The kept fraction for that sparsifier (default 0.1, as ``fedfuse simulate``).
    seed, seed_scope
        Seed DARE masks per node and round (``seed_scope="round"``: one mask per round).
    fisher_key : str
        The reply's ArrayRecord holding the diagonal Fisher, per array name (for ``"fisher"``).
    weighting : {"num_examples", "uniform"}
        A reply's weight: its ``weighted_by_key`` value (FedAvg's convention) or 1 (plain task arithmetic).
    registry : Registry, optional
        Institutions' signing keys: only payloads signed for this run and round by a registered
        institution are folded (standard replies, which carry no signature, are then refused).
    device : str
        Where the merge state lives (``"cuda"`` on a GPU server).
    """

    def __init__(
        self,
        strategy: str | MergeStrategy = "fedavg",
        *,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: MetricsAggregation | None = None,
        evaluate_metrics_aggr_fn: MetricsAggregation | None = None,
        sparsifier: str | None = None,
        density: float = 0.1,
        seed: int = 0,
        seed_scope: str = "node",
        fisher_key: str = "fisher",
        weighting: str = "num_examples",
        registry: Registry | None = None,
        device: str = "cpu",
        **params: Any,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        if isinstance(strategy, MergeStrategy):
            if params:
                raise ValueError(f"pass parameters to the strategy instance, not to FedMerge: {', '.join(params)}")
            self.merge = strategy
        else:
            self.merge = build_strategy(strategy, params, device=device)
        if self.merge.needs_gram:
            raise ValueError(
                f"strategy {self.merge.name!r} needs Gram matrices with every update, which Flower replies do not "
                "carry: run it with fedfuse's own ClientApp (fedfuse simulate, flwr run .)"
            )
        kind = self.merge.default_sparsifier if sparsifier is None else sparsifier
        self.sparsifier = Sparsifier(kind, 1.0 if kind == "none" else density, seed_scope=seed_scope)  # type: ignore[arg-type]
        self.seed = seed
        self.fisher_key = fisher_key
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}")
        self.weighting = weighting
        self.registry = registry
        self.last_rejections: list[Rejection] = []
        self._round_arrays = ArrayRecord()
        self._run_id = ""
        self._instructions: list[Message] = []

    def summary(self) -> None:
        """Log the merge method and its sparsifier, then FedAvg's sampling and record keys."""
        log(INFO, "\t├──> Merge: %s %s", self.merge.name, self.merge.params())
        log(INFO, "\t│\t└──Sparsifier (standard replies): %s d=%s", self.sparsifier.kind, self.sparsifier.density)
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling and messages; the round's weights are kept to form task vectors against."""
        self._round_arrays = arrays
        self._run_id = str(grid.run.run_id)
        self._instructions = list(super().configure_train(server_round, arrays, config, grid))
        return self._instructions

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Fold each reply into the round engine as it comes; the merged weights and aggregated metrics."""
        round_state = record_tensors(self._round_arrays)
        base = fingerprint(round_state)
        run_id = self._run_id
        check = None
        if self.registry is not None:
            check = self.registry.round_check(run_id=run_id, round_number=server_round, base_fingerprint=base)
        engine = RoundEngine(
            self.merge,
            UpdateSpace(
                "full",
                {name: tuple(t.shape) for name, t in round_state.items()},
                sparsifier=self.sparsifier,
                seed=self.seed,
                seed_scope=self.sparsifier.seed_scope,
            ),
            round_number=server_round,
            run_id=run_id or None,
            base_fingerprint=base,
            weighting=self.weighting,
            check_signature=check,
            bind_senders=True,
        )
        float_round = {name: t.to(torch.float32) for name, t in round_state.items()}
        accepted_metrics: list[RecordDict] = []
        destinations = instruction_destinations(self._instructions)
        for reply in replies:
            sender = str(reply_node(reply, destinations))
            rejection = self._fold(engine, reply, sender, float_round)
            if rejection is None:
                accepted_metrics.append(RecordDict({"metrics": _metric_record(reply.content)}))
            else:
                log(
                    WARNING,
                    "round %s: rejected a reply from %s (%s): %s",
                    server_round,
                    sender,
                    rejection.reason,
                    rejection.message,
                )
        self.last_rejections = list(engine.rejections)
        counts = MetricRecord(engine.metrics())
        if not engine.contributions:
            log(WARNING, "round %s: no reply accepted; the global model stays as it was", server_round)
            return None, counts
        merged = engine.merged_task_vector()
        arrays = ArrayRecord(
            {name: Array(_as_original(float_round[name] + merged[name], round_state[name])) for name in round_state}
        )
        metrics = self.train_metrics_aggr_fn(accepted_metrics, self.weighted_by_key) if accepted_metrics else None
        return arrays, MetricRecord({**dict(counts), **dict(metrics or {})})

    def _fold(
        self, engine: RoundEngine, reply: Message, sender: str, round_state: Mapping[str, torch.Tensor]
    ) -> Rejection | None:
        """Offer one reply: a fedfuse payload as is, standard weights as their task vector."""
        if reply.has_error():
            return engine.reject(
                sender, reply_error_reason(reply), reply.error.reason or "the client reported an error"
            )
        content = reply.content
        if any(record in content.array_records for record in PAYLOAD_RECORDS.values()):
            try:
                parsed = TrainReply.from_content(content)
            except Rejected as exc:
                return engine.reject(sender, exc.reason, str(exc))
            return engine.offer(parsed.payload, kind=parsed.kind, sender=sender, signature=parsed.signature)
        if self.registry is not None:
            return engine.reject(sender, "unsigned", "a standard reply carries no signature (this run requires one)")
        weights = array_record(content.array_records, self.arrayrecord_key, ignore=[self.fisher_key])
        if weights is None:
            return engine.reject(sender, "no_payload", f"reply has no {self.arrayrecord_key!r} ArrayRecord")
        metrics = _metric_record(content)
        weight = metrics.get(self.weighted_by_key)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            return engine.reject(
                sender, "bad_num_examples", f"reply's MetricRecord has no number {self.weighted_by_key!r}"
            )
        try:
            trained = {name: t.to(torch.float32) for name, t in record_tensors(weights).items()}
            fisher_record = content.array_records.get(self.fisher_key)
            fisher = None
            if fisher_record is not None:
                fisher = {name: t.to(torch.float32) for name, t in record_tensors(fisher_record).items()}
        except (TypeError, ValueError, RuntimeError) as exc:
            return engine.reject(sender, "incompatible_update", f"arrays cannot be read as tensors: {exc}")
        tau = {  # only same-shaped arrays are differenced; the engine refuses other names and shapes
            name: t - round_state[name] if name in round_state and t.shape == round_state[name].shape else t
            for name, t in trained.items()
        }
        scalars = {key: value for key, value in metrics.items() if isinstance(value, (int, float))}
        nbytes = sum(len(array.data) for record in content.array_records.values() for array in record.values())
        return engine.offer_task_vector(
            tau, node=sender, num_examples=float(weight), fisher=fisher, metrics=scalars, nbytes=nbytes
        )

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> Result:
        """Flower's ``Strategy.start``, except that training replies are folded as they arrive."""
        log(INFO, "Starting %s strategy:", type(self).__name__)
        self.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result()
        started = time.time()
        if evaluate_fn:
            initial = evaluate_fn(0, initial_arrays)
            if initial is not None:
                result.evaluate_metrics_serverapp[0] = initial
        arrays = initial_arrays
        for server_round in range(1, num_rounds + 1):
            log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
            messages = self.configure_train(server_round, arrays, train_config, grid)
            new_arrays, train_metrics = self.aggregate_train(
                server_round, stream_replies(grid, messages, timeout=timeout)
            )
            if new_arrays is not None:
                arrays = result.arrays = new_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics
            evaluate_messages = self.configure_evaluate(server_round, arrays, evaluate_config, grid)
            client_eval = self.aggregate_evaluate(
                server_round, grid.send_and_receive(messages=evaluate_messages, timeout=timeout)
            )
            if client_eval is not None:
                result.evaluate_metrics_clientapp[server_round] = client_eval
            if evaluate_fn:
                server_eval = evaluate_fn(server_round, arrays)
                if server_eval is not None:
                    result.evaluate_metrics_serverapp[server_round] = server_eval
        log(INFO, "Strategy execution finished in %.2fs", time.time() - started)
        for line in io.StringIO(str(result)):
            log(INFO, "\t%s", line.rstrip("\n"))
        return result


def _metric_record(content: RecordDict) -> MetricRecord:
    """The reply's MetricRecord (Flower's convention: the first, and only, one), or an empty one."""
    return next(iter(content.metric_records.values()), MetricRecord())


def _as_original(merged: torch.Tensor, original: torch.Tensor) -> np.ndarray:
    """The merged fp32 weights in the array's own dtype (integer arrays such as counters rounded)."""
    if not original.is_floating_point():
        merged = merged.round()
    return merged.to(original.dtype).numpy()
