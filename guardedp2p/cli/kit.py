"""``guardedp2p provider kit …``: build and verify the signed client kit (only the client's weights, never the
trunk; docs/user-guide.md "Client kit"). Mounted by the provider CLI."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from guardedp2p.cli.common import friendly_errors, print_json, setup_logging

if TYPE_CHECKING:
    from guardedp2p.crypto.manifest import Manifest

kit_app = typer.Typer(
    help="Online/Gradfree: build and sign the client kit (embeddings, bottom and top blocks, head; no trunk).",
    no_args_is_help=True,
)


def _summary(folder: Path, m: Manifest) -> dict[str, object]:
    return {
        "folder": str(folder),
        "kind": m.kind,
        "files": len(m.files),
        "bytes": m.total_bytes,
        "split": m.get("split"),
        "fingerprint": m.get("fingerprint"),
        "client_parameters": (m.get("params") or {}).get("client"),
        "full_model_parameters": (m.get("params") or {}).get("full_model"),
        "signer": m["signer"]["fingerprint"],
    }


@kit_app.command("build")
@friendly_errors
def build(
    model: str = typer.Option(
        "default", help="Hugging Face model folder, or 'default' for the embedded SmolLM2-135M-Instruct."
    ),
    bottom_layers: int = typer.Option(2, help="Blocks the client runs before the trunk (must match serve)."),
    top_layers: int = typer.Option(2, help="Blocks the client runs after the trunk (must match serve)."),
    keys: Path = typer.Option(
        ..., help="Folder holding the provider's signing key NAME.sign.key (from `guardedp2p keys generate`)."
    ),
    name: str = typer.Option("provider", help="Key name inside --keys."),
    out: Path = typer.Option(Path("client-kit"), help="Folder to write the signed kit into."),
    json_out: bool = typer.Option(False, "--json", help="Print the manifest summary as JSON."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True),
) -> None:
    """Write the client kit of MODEL for the split and sign it; the trunk's weights are never written."""
    setup_logging(verbose)
    from guardedp2p.crypto.keys import load_signing_key
    from guardedp2p.designs.kit import build_kit
    from guardedp2p.engine.loading import load_causal_lm
    from guardedp2p.engine.split import SplitConfig

    signing_key = load_signing_key(keys, name)
    split = SplitConfig(bottom_layers=bottom_layers, top_layers=top_layers)
    lm, tokenizer = load_causal_lm(model, device="cpu", dtype="auto")
    m = build_kit(lm, tokenizer, split, signing_key, out, model_name=model)
    summary = _summary(out, m)
    if json_out:
        print_json(summary)
    else:
        typer.echo(
            f"client kit written to {out}: {summary['bytes']} bytes, {summary['client_parameters']} of "
            f"{summary['full_model_parameters']} parameters (no trunk block), split {bottom_layers}/{top_layers}, "
            f"signed by {summary['signer']}"
        )


@kit_app.command("verify")
@friendly_errors
def verify(
    folder: Path = typer.Argument(..., help="Client kit folder."),
    key: Path = typer.Option(..., help="The provider's public key NAME.sign.pub."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Verify a client kit (signature and every SHA-256); loads nothing."""
    from guardedp2p.crypto.manifest import verify_artifact
    from guardedp2p.designs.kit import KIT_KIND

    m = verify_artifact(folder, key, kind=KIT_KIND)
    summary = _summary(folder, m)
    if json_out:
        print_json(summary)
    else:
        typer.echo(
            f"OK: client kit {folder}, {len(m.files)} files, {m.total_bytes} bytes, signed by {summary['signer']}"
        )
