"""Simulated attackers (``settings.attack``), a testing feature: chosen clients misbehave on purpose.

A researcher turns some simulated clients into attackers to see what a merge strategy withstands;
``fedfuse bench robust`` runs every attack against every strategy. Honest clients ignore these keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedfuse.settings.fields import SettingsError, check_choice, setting

ATTACKS = ("none", "sign_flip", "noise", "scale", "label_flip", "inflate_examples")
"""What an attacker does: send −s·τ; pure Gaussian noise s times τ's norm; s·τ; train on flipped labels;
report s times its number of examples."""


@dataclass(frozen=True)
class AttackSettings:
    """Which simulated clients attack, and how.

    Parameters
    ----------
    attack : str
        One of :data:`ATTACKS` (``none``: every client is honest).
    attackers : str
        Comma-separated partition ids of the attacking clients (e.g. ``"0,5"``).
    attack_scale : float
        s: the factor of ``sign_flip``, ``scale`` and ``inflate_examples``, the noise norm of ``noise``.
    """

    attack: str = setting(
        "none", "simulated attack (testing): `sign_flip`, `noise`, `scale`, `label_flip`, `inflate_examples` or `none`"
    )
    attackers: str = setting("", "comma-separated partition ids of the simulated attackers (e.g. `0,5`)")
    attack_scale: float = setting(
        10.0, "s: factor of sign_flip (−s·τ), scale (s·τ) and inflate_examples; noise norm ÷ ‖τ‖ for noise"
    )

    def __post_init__(self) -> None:
        check_choice(self, "attack", ATTACKS)
        ids = self.attacker_ids
        if self.attack != "none" and not ids:
            raise SettingsError(f"attack {self.attack!r} needs attackers (comma-separated partition ids)")
        if not self.attack_scale > 0 or self.attack_scale == float("inf"):
            raise SettingsError(f"attack-scale must be finite and > 0; got {self.attack_scale}")

    @property
    def attacker_ids(self) -> frozenset[int]:
        """The attacking partition ids (``SettingsError`` naming a part that is not one)."""
        parts = [part.strip() for part in self.attackers.split(",") if part.strip()]
        try:
            ids = frozenset(int(part) for part in parts)
        except ValueError:
            raise SettingsError(f"attackers must be comma-separated partition ids; got {self.attackers!r}") from None
        if any(i < 0 for i in ids):
            raise SettingsError(f"attackers must be partition ids >= 0; got {self.attackers!r}")
        return ids

    def attacks(self, partition_id: int) -> bool:
        """Whether the client of ``partition_id`` is a simulated attacker."""
        return self.attack != "none" and partition_id in self.attacker_ids
