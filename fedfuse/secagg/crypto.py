"""Key agreement, authenticated encryption and pseudorandom masks for SecAgg+ (X25519, HKDF, ChaCha20).

Two nodes agree on a pairwise secret from their advertised X25519 keys: one to encrypt the Shamir shares
they route through the server, one to seed the pairwise mask that cancels in the sum. Masks expand a
32-byte seed into uniform ring elements with the ChaCha20 keystream.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
MASK_INFO = b"fedfuse.secagg.mask:"
"""HKDF info prefix of the mask key: a mask key never equals a key derived for another use."""
RING_DTYPES = (np.dtype(np.uint32), np.dtype(np.uint64))


@dataclass(frozen=True)
class KeyPair:
    """One X25519 key pair, raw bytes: the public half is advertised, the private half may be shared."""

    private: bytes
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        """A fresh key pair from the OS CSPRNG."""
        return cls._of(X25519PrivateKey.generate())

    @classmethod
    def from_private(cls, private: bytes) -> KeyPair:
        """The key pair of a raw private key (e.g. one reconstructed from Shamir shares)."""
        _check_length("private key", private, KEY_BYTES)
        return cls._of(X25519PrivateKey.from_private_bytes(private))

    @classmethod
    def _of(cls, key: X25519PrivateKey) -> KeyPair:
        """The raw bytes of a cryptography private key and its public key."""
        return cls(private=key.private_bytes_raw(), public=key.public_key().public_bytes_raw())


def agree(private: bytes, peer_public: bytes, context: bytes) -> bytes:
    """X25519 shared secret → HKDF-SHA256 (info=context) → 32 bytes; symmetric in the two parties."""
    _check_length("private key", private, KEY_BYTES)
    _check_length("peer public key", peer_public, KEY_BYTES)
    own = X25519PrivateKey.from_private_bytes(private)
    try:
        shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise ValueError("secagg key agreement failed: the peer public key is a low-order point") from None
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=context).derive(shared)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """ChaCha20-Poly1305 with a random 12-byte nonce prepended: nonce ‖ ciphertext ‖ tag."""
    _check_length("encryption key", key, KEY_BYTES)
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    """The plaintext of `seal`, or ValueError when it is too short or does not authenticate."""
    _check_length("encryption key", key, KEY_BYTES)
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise ValueError(f"secagg sealed message has {len(sealed)} bytes, fewer than nonce and tag")
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)
    except InvalidTag:
        raise ValueError("secagg sealed message does not authenticate (wrong key, data or tampered)") from None


def mask(seed: bytes, length: int, dtype: np.dtype, purpose: bytes = b"") -> np.ndarray:
    """`length` uniform ring elements of `dtype` from a 32-byte seed: the ChaCha20 keystream, little-endian."""
    _check_length("mask seed", seed, KEY_BYTES)
    ring = np.dtype(dtype)
    if ring not in RING_DTYPES:
        raise ValueError(f"secagg masks are uint32 or uint64, got {ring}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"secagg mask length must be an int >= 0, got {length!r}")
    key = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=MASK_INFO + purpose).derive(seed)
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    stream = encryptor.update(bytes(length * ring.itemsize))
    return np.frombuffer(stream, dtype=ring.newbyteorder("<")).astype(ring)


def commitment(data: bytes) -> bytes:
    """SHA-256 of `data`: binds a node to a value it reveals later."""
    return hashlib.sha256(data).digest()


def random_seed() -> bytes:
    """32 bytes from the OS CSPRNG."""
    return secrets.token_bytes(KEY_BYTES)


def _check_length(what: str, value: bytes, expected: int) -> None:
    """`value` is bytes of exactly `expected` length, else a one-line ValueError."""
    if not isinstance(value, (bytes, bytearray)) or len(value) != expected:
        size = len(value) if isinstance(value, (bytes, bytearray)) else type(value).__name__
        raise ValueError(f"secagg {what} must be {expected} bytes, got {size}")
