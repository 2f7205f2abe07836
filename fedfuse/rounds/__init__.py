"""One round's merge without Flower: the round engine and the space updates are merged in.

>>> from fedfuse.rounds import RoundEngine, UpdateSpace
>>> # engine = RoundPolicy(clip_norm=1.0).engine(strategy, UpdateSpace.full(shapes), round_number=1, run_id="r")
>>> # engine.offer(payload) → Rejection | None;  engine.finalize(round_weights) → next weights

Everything here takes a :class:`RoundPolicy`, never run settings (``RunSettings.round_policy`` builds one).
"""

from fedfuse.rounds.broadcast import (
    BROADCAST_DTYPES,
    BROADCAST_MODES,
    Broadcaster,
    BroadcastPolicy,
    Delta,
    apply_delta,
)
from fedfuse.rounds.dp import CentralDP, CentralPrivacy, PrivacyAccountant, central_noise_std
from fedfuse.rounds.engine import (
    PAYLOAD_KINDS,
    WEIGHTINGS,
    Contribution,
    PayloadKind,
    RoundEngine,
    SignatureCheck,
    Weighting,
)
from fedfuse.rounds.policy import DEFAULT_MAX_NUM_EXAMPLES, RoundPolicy
from fedfuse.rounds.server_optimizer import ServerOptimizer
from fedfuse.rounds.space import UpdateSpace
from fedfuse.rounds.versions import (
    ModelChange,
    Step,
    Sync,
    VersionLog,
    VersionMismatch,
    base_version,
    next_version,
)

__all__ = [
    "BROADCAST_DTYPES",
    "BROADCAST_MODES",
    "DEFAULT_MAX_NUM_EXAMPLES",
    "PAYLOAD_KINDS",
    "WEIGHTINGS",
    "BroadcastPolicy",
    "Broadcaster",
    "CentralDP",
    "CentralPrivacy",
    "Contribution",
    "Delta",
    "ModelChange",
    "PayloadKind",
    "PrivacyAccountant",
    "RoundEngine",
    "RoundPolicy",
    "ServerOptimizer",
    "SignatureCheck",
    "Step",
    "Sync",
    "UpdateSpace",
    "VersionLog",
    "VersionMismatch",
    "Weighting",
    "apply_delta",
    "base_version",
    "central_noise_std",
    "next_version",
]
