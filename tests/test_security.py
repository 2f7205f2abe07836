"""Certificates, key pairs and signed updates: what each protects, and every way a signature fails."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from typer.testing import CliRunner

from fedfuse.cli.main import app
from fedfuse.security import (
    KeyFileError,
    Registry,
    SignatureRejected,
    UpdateSignature,
    load_signing_key,
    sign_update,
    write_certificates,
    write_institution_keys,
)

# Tiers are marked per test here: this module mixes integration and unit tests.

runner = CliRunner()


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.unit
def test_superlink_certificate_is_signed_by_the_ca_with_the_requested_sans(tmp_path):
    files = write_certificates(tmp_path, ["superlink", "localhost", "127.0.0.1"])
    ca = x509.load_pem_x509_certificate(files["ca.crt"].read_bytes())
    server = x509.load_pem_x509_certificate(files["superlink.crt"].read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["superlink", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert mode(files["ca.key"]) == 0o600 and mode(files["superlink.key"]) == 0o600
    assert mode(files["ca.crt"]) == 0o644


@pytest.mark.unit
def test_existing_files_are_never_overwritten_without_force(tmp_path):
    first = write_certificates(tmp_path, ["localhost"])["ca.crt"].read_bytes()
    with pytest.raises(KeyFileError, match="pass --force"):
        write_certificates(tmp_path, ["localhost"])
    assert (tmp_path / "ca.crt").read_bytes() == first
    write_certificates(tmp_path, ["localhost"], force=True)
    assert (tmp_path / "ca.crt").read_bytes() != first


@pytest.mark.unit
def test_institution_keys_are_openssh_p384_and_ed25519_with_private_files_0600(tmp_path):
    files = write_institution_keys(tmp_path, "hospital-a")
    auth = serialization.load_ssh_private_key(files["supernode_auth_private"].read_bytes(), password=None)
    assert isinstance(auth, ec.EllipticCurvePrivateKey) and auth.curve.name == "secp384r1"
    public = serialization.load_ssh_public_key(files["supernode_auth_public"].read_bytes())
    assert public.public_numbers() == auth.public_key().public_numbers()
    assert files["supernode_auth_public"].read_text().startswith("ecdsa-sha2-nistp384 ")
    assert isinstance(load_signing_key(files["update_signing_private"]), ed25519.Ed25519PrivateKey)
    assert mode(files["supernode_auth_private"]) == 0o600 and mode(files["update_signing_private"]) == 0o600
    with pytest.raises(KeyFileError, match="pass --force"):
        write_institution_keys(tmp_path, "hospital-a")
    with pytest.raises(ValueError, match="plain name"):
        write_institution_keys(tmp_path, "../evil")


@pytest.mark.integration
def test_cli_writes_certs_keys_and_registry(tmp_path):
    result = runner.invoke(app, ["certs", "--out", str(tmp_path / "certs"), "--hosts", "superlink,127.0.0.1"])
    assert result.exit_code == 0, result.output
    registry = tmp_path / "registry.json"
    for name in ("hospital-a", "hospital-b"):
        result = runner.invoke(app, ["keys", "-i", name, "--out", str(tmp_path / "keys"), "--registry", str(registry)])
        assert result.exit_code == 0, result.output
    assert sorted(Registry.load(registry).keys) == ["hospital-a", "hospital-b"]
    again = runner.invoke(app, ["keys", "-i", "hospital-a", "--out", str(tmp_path / "keys")])
    assert again.exit_code != 0 and "--force" in again.output
    received = write_institution_keys(tmp_path / "sent", "clinic-c")["update_signing_public"]
    added = runner.invoke(app, ["registry", "add", "-i", "clinic-c", "-k", str(received), "--registry", str(registry)])
    assert added.exit_code == 0, added.output
    assert sorted(Registry.load(registry).keys) == ["clinic-c", "hospital-a", "hospital-b"]
    clash = runner.invoke(
        app,
        [
            "registry",
            "add",
            "-i",
            "clinic-c",
            "-k",
            str(write_institution_keys(tmp_path / "other", "clinic-c")["update_signing_public"]),
            "--registry",
            str(registry),
        ],
    )
    assert clash.exit_code != 0 and "another key" in clash.output


@pytest.fixture
def signer(tmp_path):
    files = write_institution_keys(tmp_path, "hospital-a")
    registry = Registry({})
    registry.add("hospital-a", files["update_signing_public"].read_text())
    return load_signing_key(files["update_signing_private"]), registry


PAYLOAD = b"an encoded update"


def signed(key, **changes):
    fields = {
        "institution": "hospital-a",
        "run_id": "run-1",
        "round_number": 3,
        "base_fingerprint": "fp",
        "payload": PAYLOAD,
        **changes,
    }
    return sign_update(key, **fields)


def verify(registry, signature, payload=PAYLOAD):
    return registry.verify(signature, run_id="run-1", round_number=3, base_fingerprint="fp", payload=payload)


@pytest.mark.unit
def test_a_good_signature_names_its_institution(signer):
    key, registry = signer
    assert verify(registry, signed(key)) == "hospital-a"
    assert verify(registry, UpdateSignature.from_config(signed(key).to_config())) == "hospital-a"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("unsigned", "unsigned"),
        ("tampered payload", "bad_signature"),
        ("old round", "replayed"),
        ("other run", "replayed"),
        ("other base", "replayed"),
        ("unknown institution", "unknown_signer"),
        ("forged signature", "bad_signature"),
        ("incomplete record", "unsigned"),
    ],
)
def test_every_bad_signature_is_rejected_with_its_reason(signer, tmp_path, case, reason):
    key, registry = signer
    payload = PAYLOAD
    if case == "unsigned":
        signature = None
    elif case == "tampered payload":
        signature, payload = signed(key), PAYLOAD + b"!"
    elif case == "old round":
        signature = signed(key, round_number=2)
    elif case == "other run":
        signature = signed(key, run_id="run-0")
    elif case == "other base":
        signature = signed(key, base_fingerprint="older")
    elif case == "unknown institution":
        stranger = load_signing_key(write_institution_keys(tmp_path / "x", "clinic-z")["update_signing_private"])
        signature = signed(stranger, institution="clinic-z")
    elif case == "forged signature":
        stranger = load_signing_key(write_institution_keys(tmp_path / "x", "clinic-z")["update_signing_private"])
        signature = signed(stranger)
    else:
        with pytest.raises(SignatureRejected) as caught:
            UpdateSignature.from_config({"institution": "hospital-a"})
        assert caught.value.reason == reason
        return
    with pytest.raises(SignatureRejected) as caught:
        verify(registry, signature, payload)
    assert caught.value.reason == reason


@pytest.mark.unit
def test_registry_round_trips_and_guards_against_key_replacement(signer, tmp_path):
    _, registry = signer
    path = registry.save(tmp_path / "registry.json")
    loaded = Registry.load(path)
    assert loaded.lines == registry.lines
    other = write_institution_keys(tmp_path / "y", "hospital-a")["update_signing_public"].read_text()
    with pytest.raises(KeyFileError, match="another key"):
        loaded.add("hospital-a", other)
    auth = write_institution_keys(tmp_path / "z", "b")["supernode_auth_public"].read_text()
    with pytest.raises(KeyFileError, match="ssh-ed25519"):
        loaded.add("b", auth)
