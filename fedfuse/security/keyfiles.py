"""Key and certificate material for a deployment, generated with ``cryptography``.

- A certificate authority and a SuperLink server certificate whose subject alternative names are the
  given host names and IP addresses (TLS between SuperNodes, the ``flwr`` CLI and the SuperLink).
- Per institution: an ECDSA P-384 key pair in OpenSSH format for Flower's SuperNode authentication,
  and an Ed25519 key pair (OpenSSH format) that signs the institution's updates.

Private keys are written with mode 0600; no file is ever overwritten unless ``force`` is given.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedfuse.checkpoints import atomic_output

SUPERNODE_AUTH_KEY = "supernode-auth.key"
UPDATE_SIGNING_KEY = "update-signing.key"


class KeyFileError(ValueError):
    """A key or certificate file would be overwritten, or cannot be read."""


def read_trusted(path: str | Path, what: str, *, private: bool = False) -> bytes:
    """The bytes of a key or registry file that no other user can have swapped (or, if ``private``, read).

    A world-writable file is refused (anyone on the machine could put their own key in it), and so is
    a private key readable by other users, as OpenSSH does.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
        if mode & 0o002:
            raise KeyFileError(f"{what} {path} is writable by every user, so anyone could swap it: chmod o-w {path}")
        if private and mode & 0o044:
            raise KeyFileError(f"{what} {path} is readable by other users: chmod 600 {path}")
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc


def write_file(path: Path, data: bytes, *, private: bool, force: bool) -> Path:
    """Write ``data`` to ``path`` (0600 when private, 0644 otherwise); refuse to overwrite without ``force``.

    The bytes go to a temporary file whose mode is set before anything is written, then renamed into
    place (:func:`fedfuse.checkpoints.atomic_output`), so a private key is never readable by others.
    """
    path = Path(path)
    if path.exists() and not force:
        raise KeyFileError(f"{path} exists; pass --force to overwrite it")
    with atomic_output(path, directory=False, overwrite=True) as temp:
        os.chmod(temp, 0o600 if private else 0o644)
        with open(temp, "wb") as handle:
            handle.write(data)
    return path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedfuse federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _subject_alternative_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


@dataclass(frozen=True)
class Certificates:
    """PEM bytes of the CA certificate and key and of the SuperLink certificate and key."""

    ca_cert: bytes
    ca_key: bytes
    server_cert: bytes
    server_key: bytes


def make_certificates(hosts: list[str], days: int = 825, common_name: str = "fedfuse-superlink") -> Certificates:
    """A P-384 CA and a SuperLink certificate signed by it, valid for ``hosts`` (DNS names or IPs)."""
    hosts = [h.strip() for h in hosts if h.strip()]
    if not hosts:
        raise ValueError("name at least one host or IP address for the SuperLink certificate")
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("fedfuse CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_subject_alternative_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    private = serialization.PrivateFormat.PKCS8
    plain = serialization.NoEncryption()
    return Certificates(
        ca_cert=ca_cert.public_bytes(pem),
        ca_key=ca_key.private_bytes(pem, private, plain),
        server_cert=server_cert.public_bytes(pem),
        server_key=server_key.private_bytes(pem, private, plain),
    )


def write_certificates(out: str | Path, hosts: list[str], *, days: int = 825, force: bool = False) -> dict[str, Path]:
    """Write ``ca.crt``, ``ca.key``, ``superlink.crt`` and ``superlink.key`` into ``out``."""
    out = Path(out)
    targets = {name: out / name for name in ("ca.crt", "ca.key", "superlink.crt", "superlink.key")}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not force:
        raise KeyFileError(f"{', '.join(existing)} exist; pass --force to overwrite them")
    made = make_certificates(hosts, days)
    write_file(targets["ca.key"], made.ca_key, private=True, force=force)
    write_file(targets["ca.crt"], made.ca_cert, private=False, force=force)
    write_file(targets["superlink.key"], made.server_key, private=True, force=force)
    write_file(targets["superlink.crt"], made.server_cert, private=False, force=force)
    return targets


def _openssh_pair(private_key, comment: str) -> tuple[bytes, bytes]:
    private = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = private_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" {comment}\n".encode()


def write_institution_keys(out: str | Path, institution: str, *, force: bool = False) -> dict[str, Path]:
    """Write the SuperNode authentication pair (ECDSA P-384) and update-signing pair (Ed25519) of one institution."""
    if not institution or any(c in institution for c in "/\\ \t\n") or institution.startswith("."):
        raise ValueError(f"institution must be a plain name (no spaces or slashes), got {institution!r}")
    folder = Path(out) / institution
    targets = {
        "supernode_auth_private": folder / SUPERNODE_AUTH_KEY,
        "supernode_auth_public": folder / (SUPERNODE_AUTH_KEY + ".pub"),
        "update_signing_private": folder / UPDATE_SIGNING_KEY,
        "update_signing_public": folder / (UPDATE_SIGNING_KEY + ".pub"),
    }
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not force:
        raise KeyFileError(f"{', '.join(existing)} exist; pass --force to overwrite them")
    auth_private, auth_public = _openssh_pair(ec.generate_private_key(ec.SECP384R1()), f"{institution}-supernode")
    sign_private, sign_public = _openssh_pair(ed25519.Ed25519PrivateKey.generate(), f"{institution}-updates")
    write_file(targets["supernode_auth_private"], auth_private, private=True, force=force)
    write_file(targets["supernode_auth_public"], auth_public, private=False, force=force)
    write_file(targets["update_signing_private"], sign_private, private=True, force=force)
    write_file(targets["update_signing_public"], sign_public, private=False, force=force)
    return targets
