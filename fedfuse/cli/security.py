"""``fedfuse certs`` and ``fedfuse keys``: what a coordinator and an institution need to join a federation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console


def certs(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for ca.crt, ca.key, superlink.crt, superlink.key.")
    ] = Path("certs"),
    hosts: Annotated[
        str, typer.Option("--hosts", help="Comma list of DNS names and IPs the SuperLink is reached at (its SANs).")
    ] = "localhost,127.0.0.1",
    days: Annotated[int, typer.Option("--days", help="Validity in days.", min=1)] = 825,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing files.")] = False,
) -> None:
    """Make a CA and a SuperLink TLS certificate (ECDSA P-384) signed by it."""
    from fedfuse.security import KeyFileError, write_certificates

    try:
        written = write_certificates(out, hosts.split(","), days=days, force=force)
    except (KeyFileError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
    console = Console()
    for path in written.values():
        console.print(f"wrote {path}")
    console.print(
        "SuperLink: --ssl-ca-certfile {ca} --ssl-certfile {crt} --ssl-keyfile {key}; "
        "give institutions only {ca}".format(
            ca=written["ca.crt"], crt=written["superlink.crt"], key=written["superlink.key"]
        )
    )


def keys(
    institution: Annotated[
        str, typer.Option("--institution", "-i", help="The institution's name (as in its node config).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Keys go to OUT/INSTITUTION/.")] = Path("keys"),
    registry: Annotated[
        Path | None,
        typer.Option("--registry", help="Also add the update-signing public key to this signer registry (JSON)."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite existing keys / a different registered key.")
    ] = False,
) -> None:
    """Make an institution's SuperNode auth key pair (ECDSA P-384, OpenSSH) and update-signing pair (Ed25519)."""
    from fedfuse.security import KeyFileError, Registry, write_institution_keys

    try:
        written = write_institution_keys(out, institution, force=force)
        if registry is not None:
            book = Registry.load(registry) if registry.exists() else Registry({})
            book.add(institution, written["update_signing_public"].read_text(), force=force)
            book.save(registry)
    except (KeyFileError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
    console = Console()
    for path in written.values():
        console.print(f"wrote {path}")
    if registry is not None:
        console.print(f"registered {institution} in {registry}")
    console.print(
        f"send the coordinator only {written['supernode_auth_public']} and {written['update_signing_public']}; "
        "keep the private keys (mode 0600) at the institution"
    )


def registry_add(
    institution: Annotated[
        str, typer.Option("--institution", "-i", help="The institution's name (as in its node config).")
    ],
    public_key: Annotated[Path, typer.Option("--public-key", "-k", help="The update-signing.key.pub it sent.")],
    registry: Annotated[
        Path, typer.Option("--registry", help="The signer registry (JSON), created if missing.")
    ] = Path("registry.json"),
    force: Annotated[
        bool, typer.Option("--force", help="Replace a different key already registered for the name.")
    ] = False,
) -> None:
    """Add a received Ed25519 update-signing public key to the coordinator's signer registry."""
    from fedfuse.security import KeyFileError, Registry

    try:
        book = Registry.load(registry) if registry.exists() else Registry({})
        book.add(institution, public_key.read_text(), force=force)
        book.save(registry)
    except (KeyFileError, ValueError, OSError) as exc:
        raise typer.BadParameter(str(exc)) from None
    Console().print(f"registered {institution} in {registry} ({len(book.keys)} institutions)")


registry_app = typer.Typer(no_args_is_help=True)
"""The ``registry`` group; its help is in :mod:`fedfuse.cli.main`."""
registry_app.command("add", help="Register an institution's update-signing public key.")(registry_add)
