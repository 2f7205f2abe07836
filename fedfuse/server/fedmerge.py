"""``FedMerge``: any fedfuse merge method as a drop-in for Flower's ``FedAvg``, and fedfuse's one server path.

A ServerApp that runs ``FedAvg(...).start(grid=..., initial_arrays=..., ...)`` switches to
``FedMerge("ties", density=0.2, ...)`` with the same options, the same ``start`` and the same
``Result``. Replies may be Flower's standard ones — the trained weights in an ArrayRecord and
``num-examples`` in a MetricRecord — or fedfuse update payloads (made on the client by
:func:`fedfuse.client.mods.task_vector_mod`). Each reply is folded into the round's
:class:`~fedfuse.rounds.RoundEngine` as it arrives, never kept in a list, under one
:class:`~fedfuse.rounds.RoundPolicy` (size cap, sparsifier check, bounds, clipping, central DP, server
optimizer): a standard reply becomes τ = weights − round weights, shrunk by the strategy's sparsifier;
a payload is decoded and folded as is. Bad replies are rejected with fedfuse's reasons and the round
goes on. fedfuse's own ServerApp strategy (:class:`~fedfuse.server.strategy.FedFuseStrategy`) is this
class plus seeded sampling, its broadcast and its reports: ``start`` below is the only round loop.

Used the way Flower's strategies are used, ``aggregate_train(server_round, replies)`` works without
``configure_train``: the round's weights come from ``arrays=``, ``current_arrays`` (as Flower's
FedAvgM and FedOpt keep them) or the last ``configure_train``; methods whose result does not depend on
them (averages at λ = 1: FedAvg, median, trimmed mean, Krum, ...) merge the replied weights directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from logging import INFO, WARNING
from typing import Any, ClassVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from fedfuse.algebra import Sparsifier, apply_task_vector
from fedfuse.algebra.low_rank import densified
from fedfuse.automerge import Candidates
from fedfuse.messages import (
    PAYLOAD_RECORDS,
    TrainReply,
    array_record,
    instruction_destinations,
    record_tensors,
    reply_error_reason,
    short_reason,
)
from fedfuse.rejections import Rejected, Rejection
from fedfuse.rounds import DEFAULT_MAX_NUM_EXAMPLES, CentralDP, RoundEngine, RoundPolicy, UpdateSpace
from fedfuse.secagg.protocol import SecAggParams
from fedfuse.security import Registry
from fedfuse.server.coefficient_round import CoefficientPlan, CoefficientRound
from fedfuse.server.flower_names import merge_arguments
from fedfuse.server.round_loop import EvaluateFn, InitialCallback, LoopConfig, RoundCallback, run_rounds
from fedfuse.server.round_state import RoundReference, merge_dtype, reply_sender
from fedfuse.server.secure_round import SecureRound
from fedfuse.server.streaming import stream_replies
from fedfuse.strategies import MergeStrategy, build_strategy
from fedfuse.timing import Phases

MetricsAggregation = Callable[[list[RecordDict], str], MetricRecord]


class FedMerge(FedAvg):
    """Flower's ``FedAvg`` with the merge done by a fedfuse strategy, folding replies as they arrive.

    Parameters
    ----------
    strategy : str or MergeStrategy
        A fedfuse strategy name (built-in, preset or plug-in, see ``fedfuse strategies``), a Flower
        strategy name fedfuse has (``fedmedian``, ``fedtrimmedavg``, ``multikrum``, ``fedavgm``,
        ``fedadam``, ``fedyogi``) or an instance. ``**params`` are its declared parameters
        (``FedMerge("ties", vote="count")``) or Flower's names for them (``beta``,
        ``num_malicious_nodes``, ``num_nodes_to_select``, ``server_learning_rate``, ``eta``, ``beta_1``, ...).
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes,
    weighted_by_key, arrayrecord_key, configrecord_key, train_metrics_aggr_fn, evaluate_metrics_aggr_fn
        As Flower's ``FedAvg``.
    sparsifier : str, optional
        How the server shrinks the task vectors it forms from standard replies; default: the
        strategy's own (TIES trims, DARE presets drop, FedAvg keeps everything). When given, fedfuse
        payloads must say they were shrunk the same way.
    density : float
        The kept fraction for that sparsifier (default 0.1, as ``fedfuse simulate``).
    sparsifier_params : mapping, optional
        That sparsifier's other declared parameters (``{"gamma": 0.02}`` for breadcrumbs, a plug-in's own).
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
    clip_norm, max_num_examples, max_update_bytes
        The round policy's bounds, as the run-config keys of the same names.
    server_optimizer, server_lr, server_momentum, server_beta2, server_tau
        A server optimizer on the merged task vector (``fedavgm``, ``fedadam``, ``fedyogi``).
    dp, dp_clip_norm, dp_noise_multiplier, dp_noise_seed
        ``dp="central"``: clip every update to ``dp_clip_norm`` and add Gaussian noise to the merge.
    secure_aggregation : {"none", "secagg+"} or SecAggParams
        SecAgg+: nodes (with :func:`fedfuse.client.secure_aggregation_mod` before the uplink mod) send
        masked statistics and the server folds only their sum; a ``SecAggParams`` sets its threshold,
        graph degree, bits and clipping range. Clipping and the example cap then run on the nodes.
    policy : RoundPolicy, optional
        The whole round policy at once (then the bound, optimizer and DP arguments must stay unset).
    coefficients : CoefficientPlan, optional
        Extra stages after each round's replies are folded (:mod:`fedfuse.server.coefficient_round`): learn the
        merge coefficients with the contributing nodes, or pick the round's λ from their held-out losses
        (nodes answer with :func:`fedfuse.client.coefficient_mod.coefficient_mod`). Linear methods only for the
        former; not with secure aggregation.
    """

    evaluates_initial_model_on_clients: ClassVar[bool] = False
    """Without server-side evaluation, ask the clients to evaluate the initial model (round 0)."""
    logs_progress: ClassVar[bool] = True
    """Log rounds and the final result through Flower's logger, as Flower's strategies do."""
    accepts_standard_replies: ClassVar[bool] = True
    """Fold Flower's standard replies (trained weights) too, not only fedfuse payloads."""

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
        sparsifier_params: Mapping[str, object] | None = None,
        seed: int = 0,
        seed_scope: str = "node",
        fisher_key: str = "fisher",
        weighting: str = "num_examples",
        registry: Registry | None = None,
        device: str = "cpu",
        clip_norm: float = 0.0,
        max_num_examples: int = DEFAULT_MAX_NUM_EXAMPLES,
        max_update_bytes: int = 0,
        server_optimizer: str = "none",
        dp: str = "none",
        dp_clip_norm: float = 1.0,
        dp_noise_multiplier: float = 1.0,
        dp_noise_seed: int = -1,
        secure_aggregation: str | SecAggParams | None = None,
        policy: RoundPolicy | None = None,
        coefficients: CoefficientPlan | None = None,
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
        self._build_merge(strategy, server_optimizer, params, device)
        kind = self.merge.default_sparsifier if sparsifier is None else sparsifier
        self.sparsifier = Sparsifier.of(kind, density, seed_scope=seed_scope, params=sparsifier_params)
        self.seed = seed
        self.fisher_key = fisher_key
        self.registry = registry
        if policy is not None:
            _check_no_policy_arguments(
                weighting=weighting != "num_examples",
                clip_norm=clip_norm != 0.0,
                max_num_examples=max_num_examples != DEFAULT_MAX_NUM_EXAMPLES,
                max_update_bytes=max_update_bytes != 0,
                server_optimizer=self._rule is not None,
                dp=dp != "none",
                secure_aggregation=secure_aggregation not in (None, "none"),
            )
        else:
            central = _central_dp(dp, dp_clip_norm, dp_noise_multiplier, dp_noise_seed)
            policy = RoundPolicy(
                weighting=weighting,
                max_update_bytes=max_update_bytes,
                clip_norm=central.clip_norm if central is not None and not clip_norm else clip_norm,
                max_num_examples=max_num_examples,
                check_sparsifier=sparsifier is not None,
                central_dp=central,
                server_optimizer=self._rule,
                secure_aggregation=_secure_params(secure_aggregation),
            )
        self.policy = policy
        _check_secure_method(self.merge, policy)
        self.optimizer = policy.optimizer()
        self.coefficients = _check_coefficients(self.merge, policy, coefficients)
        self._init_round_state()

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
        *,
        first_round: int = 1,
        on_round: RoundCallback | None = None,
        on_initial: InitialCallback | None = None,
    ) -> Result:
        """Flower's ``Strategy.start``, except that training replies are folded as they arrive.

        ``timeout`` defaults to the round policy's deadline. ``first_round`` > 1 continues a resumed run;
        ``on_round`` receives each finished round's :class:`~fedfuse.server.round_loop.RoundOutcome` (the new
        weights, metrics, refusals, timings) before the next starts; ``on_initial`` the clients' evaluation of
        the initial model.
        """
        self.log_progress("Starting %s strategy:", type(self).__name__)
        self.summary()
        self._deadline = self.policy.timeout if timeout is None else float(timeout)
        loop = LoopConfig(
            grid,
            self._deadline,
            train_config or ConfigRecord(),
            evaluate_config or ConfigRecord(),
            evaluate_fn,
            on_round,
            on_initial,
        )
        return run_rounds(self, loop, initial_arrays, first_round, num_rounds)

    def log_progress(self, message: str, *args: object) -> None:
        """Log at INFO through Flower's logger, unless the app shows progress its own way."""
        if self.logs_progress:
            log(INFO, message, *args)

    def _build_merge(
        self, strategy: str | MergeStrategy, server_optimizer: str, params: dict[str, Any], device: str
    ) -> None:
        """The merge method (and the server optimizer a Flower strategy name or argument names)."""
        if isinstance(strategy, MergeStrategy):
            arguments = merge_arguments(strategy.name, server_optimizer, params)
            if arguments.params:
                raise ValueError(
                    f"pass parameters to the strategy instance, not to FedMerge: {', '.join(arguments.params)}"
                )
            self.merge, self._method_args = strategy, None
        else:
            arguments = merge_arguments(strategy, server_optimizer, params)
            self.merge = build_strategy(arguments.method, arguments.params, device=device)
            self._method_args = (arguments.method, arguments.params, device)
        self._rule = arguments.optimizer
        if self.merge.capabilities.needs_gram and self.accepts_standard_replies:
            raise ValueError(
                f"strategy {self.merge.name!r} needs Gram matrices with every update, which Flower replies do not "
                "carry: run it with fedfuse's own ClientApp (fedfuse simulate, flwr run .)"
            )

    def _init_round_state(self) -> None:
        """What a round remembers between ``configure_train`` and ``aggregate_train``."""
        self.current_arrays: ArrayRecord | None = None
        self.last_rejections: list[Rejection] = []
        self.last_clients: dict[str, dict[str, Any]] = {}
        self.last_phases = Phases()
        self.last_client_phases: dict[str, float] = {}
        self.last_broadcast: dict[str, Any] = {}
        """How the round's change was sent (fedfuse's own app: mode, bytes, relative error, version)."""
        self.last_diagnostics: dict[str, Any] = {}
        """The round's mergeability diagnostics (``DiagnosticsReport.to_json``); empty when none were made."""
        self.last_coefficients: dict[str, Any] = {}
        """The round's learned coefficients (labels, K×G values, objective per step, bytes); empty when off."""
        self.last_lambda: dict[str, Any] = {}
        """The round's λ search (candidates, weighted losses, the λ chosen, bytes); empty when off."""
        self.last_candidates: Candidates | None = None
        self._stages: CoefficientRound | None = None
        self._reference: RoundReference | None = None
        self._run_id = ""
        self._instructions: list[Message] = []
        self._names: dict[int, str] = {}
        self._deadline = 0.0

    def summary(self) -> None:
        """Log the merge method, its sparsifier and the round policy, then FedAvg's sampling and record keys."""
        log(INFO, "\t├──> Merge: %s %s, server %s", self.merge.name, self.merge.params(), self.optimizer.describe())
        log(INFO, "\t│\t└──Sparsifier (standard replies): %s d=%s", self.sparsifier.kind, self.sparsifier.density)
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling and messages; the round's weights are kept to form task vectors against."""
        self.current_arrays = arrays
        self._run_id = str(grid.run.run_id)
        self._instructions = list(super().configure_train(server_round, arrays, config, grid))
        return self._instructions

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message], *, arrays: ArrayRecord | None = None
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Fold each reply into the round engine as it comes; the merged weights and aggregated metrics.

        The round's weights are ``arrays``, else ``current_arrays``; without either, only a method whose
        result does not depend on them merges (the replied weights directly), others raise ``ValueError``.
        """
        replies = iter(replies)
        reference, replies = self._round_reference(arrays, replies)
        engine = self._round_engine(server_round, reference)
        self.last_clients, self.last_phases, self.last_client_phases = {}, Phases(), {}
        accepted_metrics = self._fold_all(engine, replies, reference, server_round)
        return self._finish_round(server_round, engine, reference, accepted_metrics)

    def _round_reference(
        self, arrays: ArrayRecord | None, replies: Iterator[Message]
    ) -> tuple[RoundReference, Iterator[Message]]:
        """The weights task vectors are formed against, and the replies (one peeked at when there are none)."""
        given = arrays if arrays is not None else self.current_arrays
        if given is not None:
            cached = self._reference
            if cached is None or cached.record is not given:
                cached = self._reference = RoundReference.of(given)
            return cached, replies
        if not self._reference_free():
            raise ValueError(
                f"strategy {self.merge.name!r} with this sparsifier, bounds and server optimizer needs the round's "
                "weights: call configure_train, set current_arrays or pass arrays= to aggregate_train"
            )
        return RoundReference.zeros_like_first(replies, self.arrayrecord_key, self.fisher_key)

    def aggregate_secure(
        self, server_round: int, messages: list[Message], grid: Grid, timeout: float
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """A secure round: SecAgg+'s stages from the round's train messages, then the secure sum applied."""
        secure = self.policy.secure_aggregation
        if secure is None:
            raise ValueError("this strategy's round policy has no secure aggregation")
        reference, _ = self._round_reference(None, iter(()))
        engine = self._round_engine(server_round, reference)
        self.last_clients, self.last_phases, self.last_client_phases = {}, Phases(), {}
        space = self._space(reference)
        run = SecureRound(self, engine, space, grid, timeout, server_round, secure, reference.fingerprint)
        with self.last_phases("secure_aggregation"):
            notes = run.run(list(messages))
        arrays, metrics = self._finish_round(server_round, engine, reference, [])
        return arrays, MetricRecord({**dict(metrics or {}), **notes})

    def aggregate_coefficients(
        self, server_round: int, messages: list[Message], grid: Grid, timeout: float
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """A round with coefficient stages: replies folded as usual, then the stages run when its change is made."""
        if self.coefficients is None:
            raise ValueError("this strategy has no coefficient plan")
        run_key, version = self._stage_identity()
        self.last_coefficients, self.last_lambda = {}, {}
        self._stages = CoefficientRound(self, grid, timeout, server_round, self.coefficients, run_key, version)
        try:
            return self.aggregate_train(server_round, stream_replies(grid, messages, timeout=timeout, ordered=True))
        finally:
            self._stages = None

    def _stage_identity(self) -> tuple[str, str]:
        """The run key and model version coefficient stages name (fedfuse's app: its run key and version)."""
        reference = self._reference
        return self._run_id, "" if reference is None else reference.fingerprint

    def _round_change(self, engine: RoundEngine) -> dict[str, Any] | None:
        """The round's change: the optimizer's step on the merge, or what the round's coefficient stages make."""
        if self._stages is None:
            return self.optimizer.round_change(engine)
        return self._stages.round_change(engine)

    def _reference_free(self) -> bool:
        """Whether this merge may take the replied weights for task vectors (the round's weights being unknown)."""
        return self.merge.reference_free and self.sparsifier.kind == "none" and not self.policy.uses_reference

    def _round_engine(self, server_round: int, reference: RoundReference) -> RoundEngine:
        """The round's engine under the policy; task vectors must be made against ``reference``."""
        fingerprint = None if reference.implicit else reference.fingerprint
        check = None
        if self.registry is not None:
            check = self.registry.round_check(
                run_id=self._run_id, round_number=server_round, base_fingerprint=reference.fingerprint
            )
        engine = self.policy.engine(
            self._merge_for(merge_dtype(reference.tensors)),
            self._space(reference),
            round_number=server_round,
            run_id=self._run_id or None,
            base_fingerprint=fingerprint,
            check_signature=check,
            expected_updates=len(self._instructions) or None,
        )
        engine.keep_updates = self._stages is not None and self._stages.plan.learns
        return engine

    def _space(self, reference: RoundReference) -> UpdateSpace:
        """Full weights of the reference's names and shapes, shrunk on the server by ``sparsifier``."""
        shapes = {name: tuple(t.shape) for name, t in reference.tensors.items()}
        return UpdateSpace(
            "full", shapes, sparsifier=self.sparsifier, seed=self.seed, seed_scope=self.sparsifier.seed_scope
        )

    def _merge_for(self, dtype: str) -> MergeStrategy:
        """The merge method accumulating in ``dtype`` (float64 arrays are merged in float64)."""
        if self._method_args is None or dtype == self.merge.dtype_name:
            return self.merge
        method, params, device = self._method_args
        return build_strategy(method, params, device=device, dtype=dtype)

    def _fold_all(
        self, engine: RoundEngine, replies: Iterator[Message], reference: RoundReference, server_round: int
    ) -> list[RecordDict]:
        """Offer every reply; the MetricRecords of accepted standard replies (Flower aggregates them)."""
        destinations: dict[str, int] = {}
        accepted: list[RecordDict] = []
        replied: set[str] = set()
        for index, reply in enumerate(replies):
            if reply.metadata.reply_to_message_id not in destinations:  # streamed: pushed, so ids known, only now
                destinations = instruction_destinations(self._instructions)
            self._on_reply(index + 1)
            sender = reply_sender(reply, destinations, index)
            replied.add(sender)
            with self.last_phases("decode_fold"):
                rejection = self._fold(engine, reply, sender, reference)
            if rejection is None:
                metrics = _metric_record(reply)
                if isinstance(metrics.get(self.weighted_by_key), (int, float)):
                    accepted.append(RecordDict({"metrics": metrics}))
                continue
            log(WARNING, "round %s: rejected a reply from %s (%s): %s", server_round,
                rejection.node or sender, rejection.reason, rejection.message)  # fmt: skip
        self._reject_missing(engine, replied)
        return accepted

    def _on_reply(self, received: int) -> None:
        """Called as each reply arrives (fedfuse's ServerApp shows progress)."""

    def _label(self, sender: str) -> str:
        """How a refusal decided before a payload's header is read names the node (its name, when known)."""
        return self._names.get(int(sender), sender) if sender.isdigit() else sender

    def _reject_missing(self, engine: RoundEngine, replied: set[str]) -> None:
        """Record every sampled node that did not reply before the round's deadline."""
        for message in self._instructions:
            node = int(message.metadata.dst_node_id)
            if str(node) not in replied:
                deadline = f"{self._deadline:g} s" if self._deadline else "its deadline"
                engine.reject(
                    self._label(str(node)), "timed_out", f"no reply within the round's deadline of {deadline}"
                )

    def _fold(self, engine: RoundEngine, reply: Message, sender: str, reference: RoundReference) -> Rejection | None:
        """Offer one reply: a fedfuse payload as is, standard weights as their task vector."""
        if reply.has_error():
            return engine.reject(self._label(sender), reply_error_reason(reply), short_reason(reply.error.reason))
        content = reply.content
        payload = any(record in content.array_records for record in PAYLOAD_RECORDS.values())
        if self.accepts_standard_replies and not payload:
            return self._fold_weights(engine, content, sender, reference)
        return self._fold_payload(engine, content, sender, reference)

    def _fold_payload(
        self, engine: RoundEngine, content: RecordDict, sender: str, reference: RoundReference
    ) -> Rejection | None:
        """Offer a fedfuse update or partial state (it needs the round's weights it was made against)."""
        if reference.implicit:
            return engine.reject(sender, "incompatible_update",
                                 "a fedfuse update is a task vector: it needs the round's weights "
                                 "(configure_train, current_arrays or arrays=)")  # fmt: skip
        try:
            parsed = TrainReply.from_content(content)
        except Rejected as exc:
            return engine.reject(self._label(sender), exc.reason, str(exc))
        self._count_client_phases(parsed.timing)
        return engine.offer(parsed.payload, kind=parsed.kind, sender=sender, signature=parsed.signature)

    def _fold_weights(
        self, engine: RoundEngine, content: RecordDict, sender: str, reference: RoundReference
    ) -> Rejection | None:
        """Offer a standard reply's trained weights as τ = weights − the round's weights."""
        if self.registry is not None:
            return engine.reject(sender, "unsigned", "a standard reply carries no signature (this run requires one)")
        weights = array_record(content.array_records, self.arrayrecord_key, ignore=[self.fisher_key])
        if weights is None:
            return engine.reject(sender, "no_payload", f"reply has no {self.arrayrecord_key!r} ArrayRecord")
        metrics = next(iter(content.metric_records.values()), MetricRecord())
        weight = metrics.get(self.weighted_by_key)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            return engine.reject(
                sender, "bad_num_examples", f"reply's MetricRecord has no number {self.weighted_by_key!r}"
            )
        try:
            tau = reference.task_vector(record_tensors(weights))
            fisher_record = content.array_records.get(self.fisher_key)
            fisher = None if fisher_record is None else reference.in_merge_dtype(record_tensors(fisher_record))
        except (TypeError, ValueError, RuntimeError) as exc:
            return engine.reject(sender, "incompatible_update", f"arrays cannot be read as tensors: {exc}")
        scalars = {key: value for key, value in metrics.items() if isinstance(value, (int, float))}
        nbytes = sum(len(array.data) for record in content.array_records.values() for array in record.values())
        return engine.offer_task_vector(
            tau, node=sender, num_examples=float(weight), fisher=fisher, metrics=scalars, nbytes=nbytes
        )

    def _count_client_phases(self, timing: Mapping[str, float]) -> None:
        """Add one reply's phase seconds to the round's sums (replies without timings are not counted)."""
        if not timing:
            return
        sums = self.last_client_phases
        for name, seconds in timing.items():
            sums[name] = sums.get(name, 0.0) + seconds
        sums["replies"] = sums.get("replies", 0.0) + 1

    def _finish_round(
        self, server_round: int, engine: RoundEngine, reference: RoundReference, accepted_metrics: list[RecordDict]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Apply the merge (through the server optimizer) and aggregate the accepted replies' metrics."""
        self.last_rejections = list(engine.rejections)
        self._record_clients(engine)
        counts = MetricRecord(engine.metrics())
        with self.last_phases("finalize"):
            arrays = self._merged_arrays(engine, reference)
        report = engine.diagnostics_report()
        self.last_diagnostics = report.to_json() if report is not None else {}
        if arrays is None:
            log(WARNING, "round %s: no reply accepted; the global model stays as it was", server_round)
            return None, counts
        metrics = self.train_metrics_aggr_fn(accepted_metrics, self.weighted_by_key) if accepted_metrics else None
        return arrays, MetricRecord({**dict(counts), **dict(metrics or {})})

    def _merged_arrays(self, engine: RoundEngine, reference: RoundReference) -> ArrayRecord | None:
        """The round's new weights (through the server optimizer); None when it accepted nothing."""
        change = self._round_change(engine)
        if change is None:
            return None
        new_state = apply_task_vector(dict(reference.tensors), densified(change))
        arrays = reference.to_record(new_state)
        if not reference.implicit:
            self.current_arrays = arrays
        return arrays

    def _record_clients(self, engine: RoundEngine) -> None:
        """What each accepted contribution reported (the report's per-client table); fedfuse's app adds evaluation."""


def _check_coefficients(
    merge: MergeStrategy, policy: RoundPolicy, plan: CoefficientPlan | None
) -> CoefficientPlan | None:
    """Coefficient learning needs a linear method; both options need the updates (no secure sum, no central DP)."""
    if plan is None:
        return None
    if plan.learns and (not merge.capabilities.linear or merge.capabilities.needs_gram):
        raise ValueError(
            f"coefficient learning needs a linear strategy (fedavg, task_arithmetic, linear); got {merge.name!r}"
        )
    if policy.secure_aggregation is not None or policy.central_dp is not None:
        raise ValueError("coefficient stages need the merged change in the clear: no secure aggregation or central DP")
    return plan


def _check_no_policy_arguments(**given: bool) -> None:
    """Refuse policy arguments next to a whole ``policy=`` (they would be silently ignored)."""
    named = [name for name, was_given in given.items() if was_given]
    if named:
        raise ValueError(f"pass {', '.join(named)} inside policy=, not next to it")


def _central_dp(dp: str, clip_norm: float, noise_multiplier: float, noise_seed: int) -> CentralDP | None:
    """Central DP's mechanism for ``dp="central"``; None for ``"none"``."""
    if dp not in ("none", "central"):
        raise ValueError(f"dp must be 'none' or 'central' (local DP is the clients' own); got {dp!r}")
    return None if dp == "none" else CentralDP(clip_norm, noise_multiplier, noise_seed)


def _check_secure_method(merge: MergeStrategy, policy: RoundPolicy) -> None:
    """Secure aggregation sums statistics: the method's state must be that sum (no robust or offline-only method)."""
    capabilities = merge.capabilities
    if policy.secure_aggregation is not None and (not capabilities.mergeable or capabilities.needs_base):
        raise ValueError(
            f"secure aggregation needs a method whose state is a sum over nodes; {merge.name!r} is refused: "
            "it looks at each update (a median or Krum score needs them one by one)"
        )


def _secure_params(secure_aggregation: str | SecAggParams | None) -> SecAggParams | None:
    """SecAgg+'s knobs for ``secure_aggregation`` ("none", "secagg+" or the knobs themselves)."""
    if isinstance(secure_aggregation, SecAggParams):
        return secure_aggregation
    if secure_aggregation in (None, "none"):
        return None
    if secure_aggregation != "secagg+":
        raise ValueError(f"secure_aggregation must be 'none' or 'secagg+'; got {secure_aggregation!r}")
    return SecAggParams()


def _metric_record(reply: Message) -> MetricRecord:
    """The reply's MetricRecord (Flower's convention: the first, and only, one), or an empty one."""
    return next(iter(reply.content.metric_records.values()), MetricRecord())
