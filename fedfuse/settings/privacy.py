"""Client-level differential privacy settings (``settings.privacy``).

``central``: the server clips every update to ``dp-clip-norm`` C and adds Gaussian noise of standard
deviation σ·C to their sum (Flower's server-side fixed-clipping convention: σ·C / sampled clients on
a FedAvg mean). ``local``: each client clips its own update and adds N(0, σ²C²) before sending. The
privacy spent is accounted per round by Opacus's RDP accountant at ``dp-delta``.

``secure-aggregation = "secagg+"``: nodes send their merge statistics masked (SecAgg+), so the server learns
only their sum (see :mod:`fedfuse.secagg`); its threshold, graph degree, fixed-point bits and clipping range.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedfuse.secagg.protocol import SecAggParams
from fedfuse.settings.fields import SettingsError, check_choice, check_positive, setting

DP_MODES = ("none", "central", "local")
SECURE_AGGREGATIONS = ("none", "secagg+")
DP_STRATEGIES = ("fedavg", "task_arithmetic")
"""Methods whose merge is a linear function of the clipped sum, so the Gaussian mechanism bounds them."""


@dataclass(frozen=True)
class PrivacySettings:
    """Client-level differential privacy for FedAvg and task arithmetic (dense or round-seeded DARE).

    Parameters
    ----------
    dp : str
        ``none``, ``central`` (server clips and adds noise) or ``local`` (each client does).
    dp_clip_norm : float
        C, the L2 norm every update is clipped to.
    dp_noise_multiplier : float
        σ: the noise's standard deviation is σ·C.
    dp_delta : float
        δ of the reported (ε, δ).
    dp_noise_seed : int
        Seed of the noise for tests only; -1 (default) draws it from the operating system, as DP needs.
    secure_aggregation : str
        ``none`` or ``secagg+`` (the server sees only the sum of the nodes' statistics).
    secagg_threshold, secagg_degree : int
        Shares needed to unmask (t) and neighbours per node (k); 0: from the number of sampled nodes.
    secagg_bits, secagg_clip_range : int, float
        Fixed point: each statistic is clipped to ±range and encoded in this many bits.
    """

    dp: str = setting(
        "none", "client-level differential privacy: `central`, `local` or `none` (docs/guides/security.md)"
    )
    dp_clip_norm: float = setting(1.0, "C: every update is clipped to this L2 norm (DP runs)")
    dp_noise_multiplier: float = setting(1.0, "σ: Gaussian noise of standard deviation σ·C (DP runs)")
    dp_delta: float = setting(1e-5, "δ of the (ε, δ) reported each round (Opacus RDP accountant)")
    dp_noise_seed: int = setting(-1, "seed of the DP noise, for tests only (-1: the OS's randomness)")
    secure_aggregation: str = setting(
        "none", "`secagg+`: nodes send masked statistics, the server learns only their sum (docs/guides/security.md)"
    )
    secagg_threshold: int = setting(
        0, "shares a node's secrets need to be rebuilt (t); 0: a majority of its neighbours"
    )
    secagg_degree: int = setting(0, "neighbours per node in the masking graph (k, even); 0: O(log n) from the sample")
    secagg_bits: int = setting(
        0, "bits of one statistic in SecAgg's fixed point (sign included); 0: as many as keep a 32-bit ring"
    )
    secagg_clip_range: float = setting(1024.0, "statistics are clipped to ±this before SecAgg's fixed point")

    def __post_init__(self) -> None:
        check_choice(self, "dp", DP_MODES)
        check_positive(self, "dp_clip_norm", "dp_noise_multiplier")
        if not 0 < self.dp_delta < 1:
            raise SettingsError(f"dp-delta must be in (0, 1); got {self.dp_delta}")
        if self.dp_noise_seed < -1:
            raise SettingsError(f"dp-noise-seed must be >= 0, or -1 for the OS's randomness; got {self.dp_noise_seed}")
        check_choice(self, "secure_aggregation", SECURE_AGGREGATIONS)
        check_positive(self, "secagg_clip_range")
        if self.secagg_threshold < 0 or self.secagg_degree < 0:
            raise SettingsError("secagg-threshold and secagg-degree must be >= 0 (0: chosen from the sampled nodes)")
        if self.secagg_bits != 0 and not 2 <= self.secagg_bits <= 62:
            raise SettingsError(f"secagg-bits must be in [2, 62], or 0 for a 32-bit ring; got {self.secagg_bits}")

    @property
    def enabled(self) -> bool:
        """Whether the run is differentially private."""
        return self.dp != "none"

    @property
    def secure(self) -> SecAggParams | None:
        """The SecAgg+ knobs, or None when the server may see each update."""
        if self.secure_aggregation == "none":
            return None
        return SecAggParams(self.secagg_threshold, self.secagg_degree, self.secagg_bits, self.secagg_clip_range)
