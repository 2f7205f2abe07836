"""The round policy: what every round enforces, whichever server runs it.

fedfuse's own ServerApp, ``FedMerge`` in a Flower app, a tier gateway and the benchmarks all build their
round engines from one :class:`RoundPolicy` (size cap before parsing, the sparsifier check, the per-update
bounds, clipping, central DP) and their server optimizer from it too, so no path silently loses a
protection. The policy is built from run settings (``RunSettings.round_policy``) or from ``FedMerge``'s
arguments; this layer never reads run settings itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedfuse.algebra.server_optim import ServerOptimizerRule
from fedfuse.rounds.dp import CentralDP, CentralPrivacy
from fedfuse.rounds.engine import WEIGHTINGS, RoundEngine, SignatureCheck
from fedfuse.rounds.server_optimizer import ServerOptimizer
from fedfuse.rounds.space import UpdateSpace
from fedfuse.secagg.protocol import SecAggParams
from fedfuse.strategies import MergeStrategy

DEFAULT_MAX_NUM_EXAMPLES = 1_000_000
"""An update reporting more examples weighs as this many, unless the run sets another cap."""


@dataclass(frozen=True)
class RoundPolicy:
    """The checks and transformations a round applies to every payload, and the step on its merge.

    Parameters
    ----------
    weighting : {"num_examples", "uniform"}
        An update's weight: its (capped) number of examples, or 1.
    max_update_bytes : int
        Refuse larger payloads before parsing them; 0: the largest the expected tensors can need.
    clip_norm : float
        When > 0, every update is scaled to at most this L2 norm before it is folded (any strategy).
        In central DP it is the mechanism's C.
    max_num_examples : int
        When > 0, an update reporting more examples weighs as this many.
    check_sparsifier : bool
        Updates must say they were shrunk as the round's sparsifier says (kind, DARE density).
    bind_senders : bool
        Unsigned payloads must name the transport peer that sent them.
    central_dp : CentralDP, optional
        Gaussian noise on the merge (the top server only; gateways just clip).
    server_optimizer : ServerOptimizerRule, optional
        FedAvgM / FedAdam / FedYogi on the merged task vector; None: the merge is applied as is.
    timeout : float
        Seconds a round waits for replies before the missing nodes count as timed out.
    secure_aggregation : SecAggParams, optional
        SecAgg+: nodes send masked statistics and the server folds only their sum; the weight, example cap
        and clipping above are then applied by each node to its own update (the server never sees one).
    diagnostics : bool
        Mergeability diagnostics of every round (norms, sketched cosines, sign conflicts, outlier scores:
        :meth:`RoundEngine.diagnostics_report`); gateways never keep them. Off: nothing is sketched.
    """

    weighting: str = "num_examples"
    max_update_bytes: int = 0
    clip_norm: float = 0.0
    max_num_examples: int = DEFAULT_MAX_NUM_EXAMPLES
    check_sparsifier: bool = True
    bind_senders: bool = True
    central_dp: CentralDP | None = None
    server_optimizer: ServerOptimizerRule | None = None
    timeout: float = 3600.0
    secure_aggregation: SecAggParams | None = None
    diagnostics: bool = True

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {self.weighting!r}")
        if self.max_update_bytes < 0:
            raise ValueError(
                f"max_update_bytes must be >= 0 (0 = what the expected tensors need); got {self.max_update_bytes}"
            )
        if not (math.isfinite(self.clip_norm) and self.clip_norm >= 0):
            raise ValueError(f"clip_norm must be >= 0 (0 = off); got {self.clip_norm}")
        if self.max_num_examples < 0:
            raise ValueError(f"max_num_examples must be >= 0 (0 = no cap); got {self.max_num_examples}")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"timeout must be > 0 seconds; got {self.timeout}")
        if self.central_dp is not None:
            self._check_central_dp(self.central_dp)
        if self.central_dp is not None and self.secure_aggregation is not None:
            raise ValueError(
                "central DP needs the server to clip each update, which secure aggregation hides from it: "
                "use local DP (each node clips and adds noise) with secure aggregation"
            )

    def _check_central_dp(self, dp: CentralDP) -> None:
        """Central DP clips at its C and weighs every update alike (more than 1/K of a mean is unbounded)."""
        if self.clip_norm != dp.clip_norm:
            raise ValueError(f"central DP clips at its clip norm {dp.clip_norm}; clip_norm is {self.clip_norm}")
        if self.weighting != "uniform":
            raise ValueError("central DP needs weighting 'uniform': weighting by examples is not bounded by clipping")

    @property
    def uses_reference(self) -> bool:
        """Whether the policy itself needs the round's weights (clipping, noise or a server optimizer on τ)."""
        return self.clip_norm > 0 or self.central_dp is not None or self.server_optimizer is not None

    def engine(
        self,
        strategy: MergeStrategy,
        space: UpdateSpace,
        *,
        round_number: int | None = None,
        run_id: str | None = None,
        base_fingerprint: str | None = None,
        check_signature: SignatureCheck | None = None,
        expected_updates: int | None = None,
        gateway: bool = False,
    ) -> RoundEngine:
        """One round's engine under this policy (a ``gateway`` clips like the server but adds no noise)."""
        privacy = None
        if self.central_dp is not None and not gateway:
            privacy = CentralPrivacy(self.central_dp, strategy, space, round_number or 0, expected_updates)
        return RoundEngine(
            strategy,
            space,
            round_number=round_number,
            run_id=run_id,
            base_fingerprint=base_fingerprint,
            weighting=self.weighting,
            check_signature=check_signature,
            max_bytes=self.max_update_bytes or "auto",
            clip_norm=self.clip_norm,
            max_num_examples=self.max_num_examples,
            check_sparsifier=self.check_sparsifier,
            bind_senders=self.bind_senders,
            privacy=privacy,
            fold_factors=self.secure_aggregation is None,
            diagnostics=self.diagnostics and not gateway,
        )

    def optimizer(self) -> ServerOptimizer:
        """A fresh server optimizer state for this policy's rule (plain merging when there is none)."""
        return ServerOptimizer(self.server_optimizer)
