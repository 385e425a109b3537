"""Entry point of the ``guardedp2p`` command."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path

import typer

from guardedp2p import __version__
from guardedp2p.cli.client import client_app
from guardedp2p.cli.config import ConfigCommand
from guardedp2p.cli.data import data_app
from guardedp2p.cli.demo import demo
from guardedp2p.cli.evaluate import evaluate
from guardedp2p.cli.keys import keys_app
from guardedp2p.cli.model import model_app
from guardedp2p.cli.provider import provider_app

app = typer.Typer(
    name="guardedp2p",
    help=(
        "Two-party privacy-preserving fine-tuning of LLMs (GuardedTuning). The client keeps its training text, "
        "the provider keeps its model weights. Start with `guardedp2p demo`."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class LogLevel(str, Enum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"guardedp2p {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version_flag: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
    log_level: LogLevel = typer.Option(
        None,
        "--log-level",
        envvar="GUARDEDP2P_LOG_LEVEL",
        case_sensitive=False,
        help="Log level for every sub-command (overrides -v / --quiet).",
    ),
    log_file: Path = typer.Option(
        None, "--log-file", envvar="GUARDEDP2P_LOG_FILE", help="Also write logs to FILE, one JSON event per line."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", envvar="GUARDEDP2P_QUIET", help="Warnings and errors only."),
) -> None:
    """Global options; they reach every sub-command through GUARDEDP2P_* environment variables."""
    if log_level:
        os.environ["GUARDEDP2P_LOG_LEVEL"] = log_level.value
    if log_file:
        os.environ["GUARDEDP2P_LOG_FILE"] = str(log_file)
    if quiet:
        os.environ["GUARDEDP2P_QUIET"] = "1"


app.add_typer(keys_app, name="keys")
app.add_typer(provider_app, name="provider")
app.add_typer(client_app, name="client")
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")
app.command("demo", cls=ConfigCommand)(demo)
app.command("evaluate")(evaluate)


@app.command("version")
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
