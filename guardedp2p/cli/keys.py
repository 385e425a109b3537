"""``guardedp2p keys``: create and inspect the key files that authenticate the two parties.

Mounted by the main app as ``app.add_typer(keys_app, name="keys")``. Only public keys and file paths are ever
printed; secret key contents never leave their files.
"""

from __future__ import annotations

from pathlib import Path

import typer

from guardedp2p.cli.common import friendly_errors, print_json
from guardedp2p.crypto.keys import (
    fingerprint,
    generate_keypair,
    key_paths,
    load_public_key,
    load_verify_key,
)
from guardedp2p.errors import ConfigError

keys_app = typer.Typer(
    name="keys",
    help=(
        "Create and inspect key files. Each party (provider and client) runs 'keys generate' once, keeps the "
        "NAME.key_secret and NAME.sign.key files private (mode 0600), and gives the public NAME.key file to the "
        "other party: the provider allows it with --allow, the client pins it with --provider-key."
    ),
    no_args_is_help=True,
    add_completion=False,
)


@keys_app.command("generate")
@friendly_errors
def generate(
    out: Path = typer.Option(
        ..., "--out", "-o", help="Directory for the key files (created with mode 0700 if missing)."
    ),
    name: str = typer.Option(
        ...,
        "--name",
        "-n",
        help="Identity name, e.g. 'provider' or 'alice'; files are NAME.key, NAME.key_secret, NAME.sign.pub, NAME.sign.key.",
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Overwrite existing files. The old key stops working everywhere it was allowed or pinned.",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object (public key, fingerprint, public file paths) instead of text."
    ),
) -> None:
    """Generate a CURVE transport keypair and an Ed25519 signing keypair.

    Prints the PUBLIC key and the public files to share; secret files get mode 0600 and are never printed.
    """
    public_path, secret_path = generate_keypair(out, name, force=force)
    paths = key_paths(out, name)
    public = load_public_key(public_path)
    info = {
        "name": name,
        "public_key": public,
        "fingerprint": fingerprint(public),
        "public_key_file": str(public_path),
        "sign_public_key_file": str(paths.sign_public),
        "sign_fingerprint": fingerprint(load_verify_key(paths.sign_public)),
    }
    if as_json:
        print_json(info)
        return
    typer.echo(f"Public key        {public}")
    typer.echo(f"Fingerprint       {info['fingerprint']}")
    typer.echo(f"Share (transport) {public_path}")
    typer.echo(f"Share (signing)   {paths.sign_public}")
    typer.echo(f"Keep private      {secret_path}, {paths.sign_secret} (mode 0600, never send these)")
    typer.echo(
        "Next: a provider passes --allow CLIENT.key for each client; a client sends its NAME.key to the provider "
        "operator and pins the provider with --provider-key PROVIDER.key."
    )


@keys_app.command("show")
@friendly_errors
def show(
    public_file: Path = typer.Argument(..., help="A public key file: NAME.key (transport) or NAME.sign.pub (signing)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
) -> None:
    """Print the public key and fingerprint in a PUBLIC key file (refuses secret key files).

    Compare fingerprints over a trusted channel (phone, in person) before you allow or pin a key.
    """
    if not public_file.exists():
        raise ConfigError(f"{public_file} does not exist; give the path of a NAME.key or NAME.sign.pub file.")
    head = public_file.read_bytes()[:4096]
    if b"-----BEGIN" in head:
        vk = load_verify_key(public_file)
        info = {"file": str(public_file), "type": "ed25519-signing", "fingerprint": fingerprint(vk)}
    else:
        public = load_public_key(public_file)
        info = {"file": str(public_file), "type": "curve", "public_key": public, "fingerprint": fingerprint(public)}
    if as_json:
        print_json(info)
        return
    typer.echo(f"File         {info['file']}")
    typer.echo(
        f"Type         {'CURVE transport public key' if info['type'] == 'curve' else 'Ed25519 signing public key'}"
    )
    if "public_key" in info:
        typer.echo(f"Public key   {info['public_key']}")
    typer.echo(f"Fingerprint  {info['fingerprint']}")


__all__ = ["keys_app"]
