"""One round's merge without Flower: the round engine and the space updates are merged in.

>>> from fedfuse.rounds import RoundEngine, UpdateSpace
>>> # engine = RoundPolicy(clip_norm=1.0).engine(strategy, UpdateSpace.full(shapes), round_number=1, run_id="r")
>>> # engine.offer(payload) → Rejection | None;  engine.finalize(round_weights) → next weights

Everything here takes a :class:`RoundPolicy`, never run settings (``RunSettings.round_policy`` builds one).
"""

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

__all__ = [
    "DEFAULT_MAX_NUM_EXAMPLES",
    "PAYLOAD_KINDS",
    "WEIGHTINGS",
    "CentralDP",
    "CentralPrivacy",
    "Contribution",
    "PayloadKind",
    "PrivacyAccountant",
    "RoundEngine",
    "RoundPolicy",
    "ServerOptimizer",
    "SignatureCheck",
    "UpdateSpace",
    "Weighting",
    "central_noise_std",
]
