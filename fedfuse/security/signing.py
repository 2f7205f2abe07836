"""Ed25519 signatures over updates, and the coordinator's registry of institutions' public keys.

A client signs the statement (run, round, base fingerprint, node, SHA-256 of the payload). The server
rebuilds the statement from what *it* expects this round (its run id, round and base fingerprint) and
from the bytes it received, so a payload changed in transit (tampered), an update replayed from another
round or run, one signed by a key the registry does not hold, or one without a signature is rejected
with its own reason. The node named in the signature must be the node named inside the payload.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedfuse.rejections import SIGNATURE_REASONS, Rejected
from fedfuse.security.keyfiles import KeyFileError, read_trusted, write_file

STATEMENT_VERSION = "fedfuse-update-signature-v1"


class SignatureRejected(Rejected):
    """An update's signature is missing or does not hold; ``reason`` is one of SIGNATURE_REASONS."""

    allowed = SIGNATURE_REASONS


@dataclass(frozen=True)
class UpdateSignature:
    """What travels next to a payload: who signed, what they claim the round is, and the signature."""

    institution: str
    run_id: str
    round: int
    base_fingerprint: str
    signature: str

    def to_config(self) -> dict[str, str | int]:
        """As flat config-record entries."""
        return {
            "institution": self.institution,
            "run-id": self.run_id,
            "server-round": self.round,
            "base-fingerprint": self.base_fingerprint,
            "signature": self.signature,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> UpdateSignature:
        """Read it back; a missing or mistyped field is an unsigned update."""
        try:
            return cls(
                str(config["institution"]),
                str(config["run-id"]),
                int(str(config["server-round"])),
                str(config["base-fingerprint"]),
                str(config["signature"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SignatureRejected("unsigned", f"signature record is incomplete ({exc})") from None


def statement(run_id: str, round_number: int, base_fingerprint: str, node: str, payload: bytes) -> bytes:
    """The exact bytes that are signed."""
    digest = hashlib.sha256(payload).hexdigest()
    lines = (STATEMENT_VERSION, f"run={run_id}", f"round={round_number}", f"base={base_fingerprint}", f"node={node}")
    return "\n".join((*lines, f"sha256={digest}")).encode()


def load_signing_key(path: str | Path) -> ed25519.Ed25519PrivateKey:
    """An institution's Ed25519 private key (OpenSSH or PEM); refused if other users can read or replace it."""
    data = read_trusted(path, "update-signing key", private=True)
    try:
        key = (serialization.load_ssh_private_key if b"OPENSSH" in data else serialization.load_pem_private_key)(
            data, password=None
        )
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not a readable private key: {exc}") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 update-signing key")
    return key


def sign_update(
    key: ed25519.Ed25519PrivateKey,
    *,
    institution: str,
    run_id: str,
    round_number: int,
    base_fingerprint: str,
    payload: bytes,
) -> UpdateSignature:
    """Sign one update payload."""
    signature = key.sign(statement(run_id, round_number, base_fingerprint, institution, payload))
    return UpdateSignature(institution, run_id, round_number, base_fingerprint, base64.b64encode(signature).decode())


def _public_key(line: str, where: str) -> ed25519.Ed25519PublicKey:
    try:
        key = serialization.load_ssh_public_key(line.strip().encode())
    except (ValueError, TypeError, IndexError) as exc:
        raise KeyFileError(f"{where}: not an OpenSSH public key ({exc})") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise KeyFileError(f"{where}: an update-signing key must be ssh-ed25519, got {type(key).__name__}")
    return key


class Registry:
    """Institution name → Ed25519 public key.

    Read from the coordinator's JSON file ``{"institutions": {name: "ssh-ed25519 …"}}``.
    """

    def __init__(self, keys: Mapping[str, str]) -> None:
        self.lines = dict(keys)
        self.keys = {name: _public_key(line, f"registry entry {name!r}") for name, line in self.lines.items()}

    @classmethod
    def load(cls, path: str | Path) -> Registry:
        """Read a registry file (refused if every user may write it, or if an entry is malformed)."""
        data = read_trusted(path, "signer registry")
        try:
            document = json.loads(data)
            institutions = document["institutions"]
        except (ValueError, KeyError, TypeError) as exc:
            raise KeyFileError(f"cannot read the signer registry {path}: {exc}") from exc
        if not isinstance(institutions, dict):
            raise KeyFileError(f"{path}: 'institutions' must map names to public keys")
        for name, line in institutions.items():
            if not isinstance(line, str) or not name:
                raise KeyFileError(f"{path}: entry {name!r} must map a name to an 'ssh-ed25519 …' public key line")
        try:
            return cls(institutions)
        except KeyFileError as exc:
            raise KeyFileError(f"{path}: {exc}") from None

    def save(self, path: str | Path) -> Path:
        """Write the registry (atomically, readable by everyone: it holds public keys only)."""
        text = json.dumps({"institutions": dict(sorted(self.lines.items()))}, indent=2) + "\n"
        return write_file(Path(path), text.encode(), private=False, force=True)

    def add(self, institution: str, public_key_line: str, *, force: bool = False) -> None:
        """Register an institution's key; a different key for a known name needs ``force``."""
        _public_key(public_key_line, f"key of {institution!r}")
        line = " ".join(public_key_line.split()[:2])
        known = self.lines.get(institution)
        if known is not None and known.split()[:2] != line.split() and not force:
            raise KeyFileError(f"{institution!r} is registered with another key; pass --force to replace it")
        self.lines[institution] = line
        self.keys[institution] = _public_key(line, institution)

    def verify(
        self, signed: UpdateSignature | None, *, run_id: str, round_number: int, base_fingerprint: str, payload: bytes
    ) -> str:
        """Check ``signed`` against this round's expectations; return the institution or raise SignatureRejected."""
        if signed is None:
            raise SignatureRejected("unsigned", "update carries no signature (this run requires signed updates)")
        key = self.keys.get(signed.institution)
        if key is None:
            raise SignatureRejected("unknown_signer", f"{signed.institution!r} is not in the signer registry")
        try:
            raw = base64.b64decode(signed.signature, validate=True)
        except ValueError:
            raise SignatureRejected("bad_signature", f"signature of {signed.institution!r} is not base64") from None
        expected = statement(run_id, round_number, base_fingerprint, signed.institution, payload)
        try:
            key.verify(raw, expected)
            return signed.institution
        except InvalidSignature:
            pass
        claimed = statement(signed.run_id, signed.round, signed.base_fingerprint, signed.institution, payload)
        try:
            key.verify(raw, claimed)
        except InvalidSignature:
            raise SignatureRejected(
                "bad_signature", f"signature of {signed.institution!r} does not match the payload (tampered?)"
            ) from None
        raise SignatureRejected(
            "replayed",
            f"{signed.institution!r} signed this payload for run {signed.run_id} round {signed.round}, "
            f"not run {run_id} round {round_number} (replayed or stale)",
        )

    def round_check(self, *, run_id: str, round_number: int, base_fingerprint: str) -> Callable[[bytes, object], str]:
        """``check(payload, signature) -> institution`` for one round (the round engine's signature hook)."""

        def check(payload: bytes, signature: object) -> str:
            signed = signature if isinstance(signature, UpdateSignature) else None
            return self.verify(
                signed, run_id=run_id, round_number=round_number, base_fingerprint=base_fingerprint, payload=payload
            )

        return check
