"""Deployment security: certificates and keys (``fedfuse certs`` / ``fedfuse keys``) and signed updates."""

from fedfuse.security.keyfiles import (
    SUPERNODE_AUTH_KEY,
    UPDATE_SIGNING_KEY,
    Certificates,
    KeyFileError,
    make_certificates,
    write_certificates,
    write_institution_keys,
)
from fedfuse.security.signing import (
    SIGNATURE_REASONS,
    Registry,
    SignatureRejected,
    UpdateSignature,
    load_signing_key,
    sign_update,
    statement,
)

__all__ = [
    "SIGNATURE_REASONS",
    "SUPERNODE_AUTH_KEY",
    "UPDATE_SIGNING_KEY",
    "Certificates",
    "KeyFileError",
    "Registry",
    "SignatureRejected",
    "UpdateSignature",
    "load_signing_key",
    "make_certificates",
    "sign_update",
    "statement",
    "write_certificates",
    "write_institution_keys",
]
