"""Entry point of the ``guardedp2p`` command."""

from __future__ import annotations

import typer

from guardedp2p import __version__
from guardedp2p.cli.client import client_app
from guardedp2p.cli.demo import demo
from guardedp2p.cli.evaluate import evaluate
from guardedp2p.cli.keys import keys_app
from guardedp2p.cli.provider import provider_app

app = typer.Typer(
    name="guardedp2p",
    help=(
        "Two-party privacy-preserving fine-tuning of LLMs (GuardedTuning). The client keeps its training text, "
        "the provider keeps its model weights. Start with `guardedp2p demo`."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(keys_app, name="keys")
app.add_typer(provider_app, name="provider")
app.add_typer(client_app, name="client")
app.command("demo")(demo)
app.command("evaluate")(evaluate)


@app.command("version")
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
