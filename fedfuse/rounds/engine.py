"""One round's merge without Flower: offer each payload as it arrives, then finalize.

The engine holds a single merge state whatever the number of clients, so memory stays flat when
replies are folded and dropped one by one. For each payload it checks the signature (a hook), decodes
and validates it against what the round expects, refuses a node that already contributed this round
(under any tier), maps the update into the run's update space (full, exact LoRA ΔW, factors) and
folds it. A refused payload leaves the state untouched and is recorded as a :class:`Rejection`.

Tiers are exact because merge states are monoids: a tier gateway's partial state is folded like its
members' updates would be. The engine keeps the tier map (tier → contributing nodes) for the report;
the tier and every other fact about a contribution come from the payload's signed header only.
The server, the tier gateway and ``fedfuse bench quality`` all merge through this class.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from fedfuse.algebra import apply_task_vector, derive_seed, name_mismatch
from fedfuse.algebra.diagnostics import DiagnosticsReport, MergeDiagnostics
from fedfuse.algebra.low_rank import LowRank
from fedfuse.algebra.sketch import SketchInput
from fedfuse.rejections import Rejected, Rejection, counts_by_reason
from fedfuse.rounds.bounds import UpdateBounds
from fedfuse.rounds.dp import CentralPrivacy
from fedfuse.rounds.space import UpdateSpace
from fedfuse.strategies import MergeState, MergeStrategy
from fedfuse.strategies.factored import FactoredState
from fedfuse.wire import (
    Expectation,
    UpdateHeader,
    UpdateRejected,
    decode_partial,
    decode_update,
    encode_partial,
    max_partial_bytes,
    max_update_bytes,
)

PayloadKind = Literal["update", "partial", "secure"]
PAYLOAD_KINDS = ("update", "partial")
Weighting = Literal["num_examples", "uniform"]
WEIGHTINGS = ("num_examples", "uniform")
DIAGNOSTICS_SEED = 27
"""The constant a round's diagnostics seed is derived from (with the round number): deterministic sketches."""

MetricValue = int | float | list[int] | list[float]
"""A round metric, typed as Flower's ``MetricRecord`` values are."""

SignatureCheck = Callable[[bytes, object], str]
"""``check(payload, signature) -> signer``: the verified institution, or raises a :class:`Rejected`
(``SignatureRejected``). The server binds it to its registry, run, round and base fingerprint."""


@dataclass(frozen=True)
class Contribution:
    """One accepted payload, as its signed header describes it."""

    node: str
    kind: PayloadKind
    tier: str
    num_examples: int
    weight: float
    metrics: Mapping[str, int | float | str] = field(default_factory=dict)


@dataclass(frozen=True)
class KeptUpdate:
    """An accepted update's merge input as folded (``RoundEngine.keep_updates``: coefficient learning)."""

    node: str
    """The transport peer that sent it (a Flower node id), else the node its header names."""
    label: str
    weight: float
    tensors: Mapping[str, object]


class RoundEngine:
    """Fold one round's client updates and gateway partial states into one merge state.

    Parameters
    ----------
    strategy : MergeStrategy
        The merge method; its state is the only thing kept between payloads.
    space : UpdateSpace
        How decoded updates become merge inputs, and the merge result a task vector.
    round_number, run_id, base_fingerprint
        What every payload's header must say (None: not checked).
    weighting : {"num_examples", "uniform"}
        An update's weight: its number of examples (FedAvg's convention) or 1.
    check_signature : callable, optional
        When given, every payload must carry a signature it accepts; the signer must be the node
        the payload names.
    max_bytes : int or "auto", optional
        Refuse larger payloads before parsing them; ``"auto"``: the largest the expected tensors can
        need (:func:`fedfuse.wire.max_update_bytes`, :func:`fedfuse.wire.max_partial_bytes`).
    clip_norm : float
        When > 0, every update (in the space the strategy merges: ΔW for exact LoRA) is scaled to at
        most this L2 norm before it is folded, whatever the strategy; counted in ``clipped``.
    max_num_examples : int
        When > 0, an update reporting more examples weighs as this many (counted in ``capped``).
    check_sparsifier : bool
        Updates must say they were shrunk as the space's wire sparsifier says (kind, DARE density).
    bind_senders : bool
        Unsigned payloads must name the transport peer that sent them (``sender``), so no peer can
        contribute under, or suppress, another's name; a signed payload names its signer instead.
    privacy : CentralPrivacy, optional
        Central differential privacy: Gaussian noise added to the merged task vector (with clipping
        at ``clip_norm`` = C, this is the Gaussian mechanism on the clipped sum).
    fold_factors : bool
        Fold exact LoRA updates as stacked factors when the strategy is linear and the space keeps
        them whole (:attr:`UpdateSpace.has_factors`): O(r·(in + out)) per update instead of forming ΔW.
    diagnostics : bool
        Sketch every folded update (exactly as folded, labelled by its node) into a
        :class:`~fedfuse.algebra.diagnostics.MergeDiagnostics` (one fixed-size sketch per update); the round's
        :meth:`diagnostics_report` is made when the merge is finalized. Partial states are counted, not seen.
    """

    def __init__(
        self,
        strategy: MergeStrategy,
        space: UpdateSpace,
        *,
        round_number: int | None = None,
        run_id: str | None = None,
        base_fingerprint: str | None = None,
        weighting: Weighting | str = "num_examples",
        check_signature: SignatureCheck | None = None,
        max_bytes: int | Literal["auto"] | None = None,
        clip_norm: float = 0.0,
        max_num_examples: int = 0,
        check_sparsifier: bool = False,
        bind_senders: bool = False,
        privacy: CentralPrivacy | None = None,
        fold_factors: bool = True,
        diagnostics: bool = True,
    ) -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}")
        self.strategy = strategy
        self.space = space
        self.weighting = weighting
        self.check_signature = check_signature
        self.bind_senders = bind_senders
        self.privacy = privacy
        self.round_number = round_number
        self.run_id = run_id
        self.base_fingerprint = base_fingerprint
        self.bounds = UpdateBounds(float(clip_norm), int(max_num_examples), weighting)
        gram, stats = strategy.capabilities.needs_gram, len(strategy.statistics)
        update_cap = max_update_bytes(space.wire_shapes, gram=gram) if max_bytes == "auto" else max_bytes
        partial_cap = max_partial_bytes(space.merge_shapes, stats, gram=gram) if max_bytes == "auto" else max_bytes
        wire_sparsifier = space.wire_sparsifier if check_sparsifier else None
        self.update_expect = Expectation(
            space.wire_shapes, round_number, run_id, base_fingerprint, update_cap, sparsifier=wire_sparsifier
        )
        self.partial_expect = Expectation(space.merge_shapes, round_number, run_id, base_fingerprint, partial_cap)
        self.folds_factors = fold_factors and space.has_factors and strategy.capabilities.linear and privacy is None
        self.state: MergeState = FactoredState(strategy) if self.folds_factors else strategy.new_state()
        self.contributions: dict[str, Contribution] = {}
        self.rejections: list[Rejection] = []
        self.bytes_received = 0
        self.signatures_verified = 0
        seed = derive_seed(DIAGNOSTICS_SEED, round_number or 0, None, "diagnostics")
        self.diagnostics: MergeDiagnostics | None = MergeDiagnostics(seed=seed) if diagnostics else None
        self.last_diagnostics: DiagnosticsReport | None = None
        self.keep_updates = False
        """Keep each accepted update's merge input in :attr:`kept_updates` (coefficient learning sets it)."""
        self.kept_updates: list[KeptUpdate] = []

    @property
    def tiers(self) -> dict[str, list[str]]:
        """The tier map: each tier's contributing nodes, in arrival order ("" = no tier)."""
        tiers: dict[str, list[str]] = {}
        for contribution in self.contributions.values():
            tiers.setdefault(contribution.tier, []).append(contribution.node)
        return tiers

    def reject(self, node: str | None, reason: str, message: str) -> Rejection:
        """Record a refusal decided outside the engine too (e.g. a client that replied with an error)."""
        rejection = Rejection(node, reason, message)
        self.rejections.append(rejection)
        return rejection

    def offer(
        self,
        payload: bytes | None,
        *,
        kind: PayloadKind = "update",
        sender: str | None = None,
        signature: object = None,
    ) -> Rejection | None:
        """Check, decode, validate and fold one payload; return its rejection, or None when folded.

        ``sender`` names the transport peer (e.g. a Flower node id) for refusals decided before the
        payload's own header can be read; ``signature`` is what the sender signed it with.
        """
        if kind not in PAYLOAD_KINDS:
            raise ValueError(f"kind must be one of {', '.join(PAYLOAD_KINDS)}; got {kind!r}")
        if payload is None:
            return self.reject(sender, "no_payload", "reply carries neither an update nor a partial state")
        if isinstance(payload, (bytes, bytearray, memoryview)):
            self.bytes_received += len(payload)
        signer = None
        if self.check_signature is not None:
            try:
                signer = self.check_signature(bytes(payload), signature)
            except Rejected as exc:
                return self.reject(sender, exc.reason, str(exc))
            self.signatures_verified += 1
        try:
            if kind == "update":
                return self._fold_update(payload, signer, sender)
            return self._fold_partial(payload, signer, sender)
        except UpdateRejected as exc:
            return self.reject(sender, exc.reason, str(exc))

    def _admit(self, node: str, signer: str | None, sender: str | None, role: str) -> Rejection | None:
        """Refuse a payload whose named node is not its signer (or sender), or a node that already contributed."""
        if signer is not None and node != signer:
            return self.reject(node, "signer_mismatch", f"payload names {role} {node} but {signer} signed it")
        if signer is None and self.bind_senders and node != sender:
            return self.reject(sender, "sender_mismatch", f"unsigned payload from {sender} names {role} {node}")
        known = self.contributions.get(node)
        if known is not None:
            where = f" (tier {known.tier!r})" if known.tier else ""
            return self.reject(node, "duplicate_node", f"{role} {node} already contributed this round{where}")
        return None

    def _fold_update(self, payload: bytes, signer: str | None, sender: str | None) -> Rejection | None:
        update = decode_update(payload, expect=self.update_expect)
        header = update.header
        node = str(header.node_id)
        refused = self._admit(node, signer, sender, "node")
        if refused is not None:
            return refused
        weight = self.bounds.weight(header.num_examples)
        if weight <= 0:
            return self.reject(node, "zero_weight", f"node {node} reported {header.num_examples} examples")
        if self.strategy.capabilities.needs_gram and not update.grams:
            return self.reject(node, "incompatible_update", f"node {node}: {self.strategy.name!r} needs Gram matrices")
        try:
            tensors, fisher = (
                self.space.merge_input(update, factored=True) if self.folds_factors else self.space.merge_input(update)
            )
            clipped, norm = self.bounds.clip(tensors)
            self.state.add(clipped, weight=weight, fisher=fisher, gram=self.space.merge_grams(update))  # type: ignore[arg-type]
        except ValueError as exc:
            return self.reject(node, "incompatible_update", f"node {node}: {exc}")
        self._diagnose(str(header.metrics.get("institution") or node), clipped, weight)
        if self.keep_updates:
            label = str(header.metrics.get("institution") or node)
            self.kept_updates.append(KeptUpdate(sender or node, label, weight, clipped))
        self.bounds.admitted(header.num_examples, norm)
        self._record(header, "update", weight)
        return None

    def offer_task_vector(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        node: str,
        num_examples: float,
        fisher: Mapping[str, torch.Tensor] | None = None,
        metrics: Mapping[str, int | float | str] | None = None,
        nbytes: int = 0,
    ) -> Rejection | None:
        """Fold a dense task vector the server formed itself (e.g. from a Flower reply's plain weights).

        ``nbytes`` is what the reply weighed on the transport (counted in ``uplink-bytes``).
        It must have exactly the space's tensors and shapes and finite values; it is then shrunk by the
        space's sparsifier (TIES trim or DARE, seeded for ``node`` and the round) and folded like an update.
        """
        self.bytes_received += nbytes
        refused = self._admit(node, None, node, "node")
        if refused is not None:
            return refused
        problem = _space_mismatch(self.space.merge_shapes, tensors)
        if self.strategy.capabilities.needs_gram:
            problem = f"strategy {self.strategy.name!r} needs Gram matrices, which a plain task vector lacks"
        if problem:
            return self.reject(node, "incompatible_update", f"node {node}: {problem}")
        bad = next((name for name, t in tensors.items() if not bool(torch.isfinite(t).all())), None)
        if bad is not None:
            return self.reject(node, "non_finite", f"node {node}: tensor {bad!r} has NaN or infinite values")
        for name, diagonal in (fisher or {}).items():
            if not bool(torch.isfinite(diagonal).all()):
                return self.reject(node, "non_finite", f"node {node}: Fisher of {name!r} has NaN or infinite values")
            if bool((diagonal < 0).any()):
                return self.reject(node, "negative_fisher", f"node {node}: Fisher of {name!r} has negative entries")
        if not math.isfinite(num_examples) or num_examples < 0:
            return self.reject(node, "bad_num_examples", f"node {node} reported {num_examples} examples")
        weight = self.bounds.weight(num_examples)
        if weight <= 0:
            return self.reject(node, "zero_weight", f"node {node} reported {num_examples} examples")
        sparse = self.space.server_sparsified(tensors, round_number=self.round_number or 0, node=node)
        try:
            clipped, norm = self.bounds.clip(sparse)
            self.state.add(clipped, weight=weight, fisher=fisher)  # type: ignore[arg-type]  # dense in, dense out
        except ValueError as exc:
            return self.reject(node, "incompatible_update", f"node {node}: {exc}")
        self._diagnose(str((metrics or {}).get("institution") or node), clipped, weight)
        if self.keep_updates:
            self.kept_updates.append(KeptUpdate(node, str((metrics or {}).get("institution") or node), weight, clipped))
        self.bounds.admitted(num_examples, norm)
        self.contributions[node] = Contribution(node, "update", "", int(num_examples), weight, dict(metrics or {}))
        return None

    def fold_secure_sum(
        self, state: MergeState, nodes: Mapping[str, Mapping[str, int | float | str]], nbytes: int = 0
    ) -> None:
        """Fold the unmasked secure sum of ``nodes``' statistics (the engine never sees one node's update).

        ``nodes`` maps each node whose input is in the sum to the facts it sent in the clear (its metrics).
        Their weights are inside the sum only, so each is recorded with 0 examples; ``nbytes`` is what the
        protocol's replies weighed (counted in ``uplink-bytes``).
        """
        for node in nodes:
            refused = self._admit(node, None, node, "node")
            if refused is not None:
                raise ValueError(refused.message)
        self.state.combine(state)
        self.bytes_received += nbytes
        for node, metrics in nodes.items():
            self.contributions[node] = Contribution(node, "secure", "", 0, 0.0, dict(metrics))

    def _fold_partial(self, payload: bytes, signer: str | None, sender: str | None) -> Rejection | None:
        if not self.strategy.capabilities.mergeable:
            return self.reject(
                None,
                "incompatible_update",
                f"strategy {self.strategy.name!r} is not a monoid: it cannot fold partial states",
            )
        partial = decode_partial(payload, strategy=self.strategy, expect=self.partial_expect)
        header = partial.header
        refused = self._admit(str(header.node_id), signer, sender, "gateway")
        if refused is not None:
            return refused
        try:
            self.state.combine(partial.state)
        except ValueError as exc:
            return self.reject(str(header.node_id), "incompatible_update", f"gateway {header.node_id}: {exc}")
        if self.diagnostics is not None:
            self.diagnostics.skip()
        self._record(header, "partial", partial.state.total_weight)
        return None

    def _diagnose(self, label: str, tensors: Mapping[str, SketchInput], weight: float) -> None:
        """Sketch an accepted update as folded; a failing sketch turns the round's diagnostics off, never the fold."""
        if self.diagnostics is None:
            return
        try:
            self.diagnostics.add(label, tensors, weight)
        except (ValueError, RuntimeError):
            self.diagnostics = None

    def diagnostics_report(self, merged: Mapping[str, SketchInput] | None = None) -> DiagnosticsReport | None:
        """The round's mergeability report: against ``merged`` when given, else the one made at finalize.

        None when diagnostics are off, no individual update was seen (a secure sum, only partial states), or
        the round has not been finalized yet.
        """
        if merged is None or self.diagnostics is None or not len(self.diagnostics):
            return self.last_diagnostics
        return self.diagnostics.report(merged)

    def _diagnose_merged(self, merged: Mapping[str, SketchInput]) -> None:
        """Make the round's report against the merged update, in the space the updates were folded in."""
        if self.diagnostics is None or not len(self.diagnostics):
            return
        try:
            self.last_diagnostics = self.diagnostics.report(merged)
        except (ValueError, RuntimeError):
            self.last_diagnostics = None

    def _record(self, header: UpdateHeader, kind: PayloadKind, weight: float) -> None:
        node = str(header.node_id)
        self.contributions[node] = Contribution(node, kind, header.tier, header.num_examples, weight, header.metrics)

    @property
    def accepted(self) -> list[str]:
        """The nodes (and gateways) whose payloads were folded, in arrival order."""
        return list(self.contributions)

    def metrics(self) -> dict[str, MetricValue]:
        """The round's counts: accepted, rejected (and per reason), bytes, tiers, signatures, clipped, capped, loss."""
        metrics: dict[str, MetricValue] = {
            "accepted": len(self.contributions),
            "rejected": len(self.rejections),
            "uplink-bytes": self.bytes_received,
            "tiers": len(self.tiers),
            "signatures-verified": self.signatures_verified,
            **self.bounds.metrics(),
            **{f"rejected.{reason}": n for reason, n in counts_by_reason(self.rejections).items()},
        }
        loss = _example_weighted(self.contributions.values(), "train-loss")
        if loss is None:  # a secure sum's contributions keep their weights inside it: their plain mean
            loss = _mean(self.contributions.values(), "train-loss")
        if loss is not None:
            metrics["train-loss"] = loss
        return metrics

    def merged_task_vector(self) -> dict[str, torch.Tensor]:
        """The merged change to the round's weights (raises if nothing was accepted).

        Ends the round: statistics are freed as results appear, so the peak stays at one state.
        """
        return {name: to_dense_matrix(t) for name, t in self.merged_factored().items()}

    def merged_factored(self) -> dict[str, torch.Tensor | LowRank]:
        """The merged change with matrices folded as factors kept as :class:`LowRank` (ends the round)."""
        if not self.contributions:
            reasons = ", ".join(counts_by_reason(self.rejections)) or "no payloads"
            raise ValueError(f"no update was accepted this round ({reasons})")
        if isinstance(self.state, FactoredState):
            factored = self.state.finalize_factored(release=True)
            result = {name: t if isinstance(t, LowRank) else t.cpu() for name, t in factored.items()}
            self._diagnose_merged(result)
            return result
        merged = {name: tensor.cpu() for name, tensor in self.state.finalize(release=True).items()}
        if self.privacy is not None:
            merged = self.privacy.apply(merged, len(self.contributions))
        self._diagnose_merged(merged)
        out: dict[str, torch.Tensor | LowRank] = {**self.space.task_vector(merged, round_number=self.round_number)}
        return out

    def finalize(self, round_weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The next round's weights: ``round_weights`` plus the merged task vector; None if nothing was accepted."""
        if not self.contributions:
            return None
        return apply_task_vector(dict(round_weights), self.merged_task_vector())

    def encode_partial(self, header: UpdateHeader) -> bytes:
        """The round's state as a partial-state payload (what a tier gateway forwards)."""
        return encode_partial(self.state, header=header)


def _space_mismatch(shapes: Mapping[str, tuple[int, ...]], tensors: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``tensors`` do not fit the space's names and shapes, or None."""
    problem = name_mismatch(shapes, tensors, missing="missing tensors", extra="unexpected tensors")
    if problem:
        return problem
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != shapes[name]:
            return f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {shapes[name]}"
    return None


def _example_weighted(contributions: Iterable[Contribution], key: str) -> float | None:
    """Example-weighted mean of a numeric header metric over the contributions that report it."""
    total = weight = 0.0
    for contribution in contributions:
        value = contribution.metrics.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value) and contribution.num_examples > 0:
            total += contribution.num_examples * float(value)
            weight += contribution.num_examples
    return total / weight if weight else None


def _mean(contributions: Iterable[Contribution], key: str) -> float | None:
    """Plain mean of a numeric header metric over the contributions that report it."""
    values = [float(v) for c in contributions if isinstance(v := c.metrics.get(key), (int, float)) and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def to_dense_matrix(tensor: torch.Tensor | LowRank) -> torch.Tensor:
    """A merged tensor as a dense one (a :class:`LowRank` matrix's product formed on the CPU)."""
    return tensor.dense().cpu() if isinstance(tensor, LowRank) else tensor
