"""One round's merge without Flower: the round engine and the space updates are merged in.

>>> from fedfuse.rounds import RoundEngine, UpdateSpace
>>> # engine = RoundEngine(strategy, UpdateSpace.full(shapes), round_number=1, run_id="r", base_fingerprint=fp)
>>> # engine.offer(payload) → Rejection | None;  engine.finalize(round_weights) → next weights
"""

from fedfuse.rounds.engine import (
    PAYLOAD_KINDS,
    WEIGHTINGS,
    Contribution,
    PayloadKind,
    RoundEngine,
    SignatureCheck,
    Weighting,
)
from fedfuse.rounds.privacy import CentralPrivacy, PrivacyAccountant, central_noise_std
from fedfuse.rounds.server_optimizer import ServerOptimizer
from fedfuse.rounds.space import UpdateSpace

__all__ = [
    "PAYLOAD_KINDS",
    "WEIGHTINGS",
    "CentralPrivacy",
    "Contribution",
    "PayloadKind",
    "PrivacyAccountant",
    "RoundEngine",
    "ServerOptimizer",
    "SignatureCheck",
    "UpdateSpace",
    "Weighting",
    "central_noise_std",
]
