"""Shared CLI plumbing: logging, turning our exceptions into a readable message and a clean exit code."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from guardedp2p.errors import GuardedP2PError

F = TypeVar("F", bound=Callable[..., Any])

err_console = Console(stderr=True)


def setup_logging(verbose: int = 0, *, quiet: bool = False) -> None:
    level = logging.WARNING if quiet else (logging.INFO if verbose <= 0 else logging.DEBUG)
    logging.basicConfig(
        level=level,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, markup=False)],
        force=True,
    )
    for noisy in ("transformers", "peft", "accelerate", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def friendly_errors(fn: F) -> F:
    """Print a :class:`GuardedP2PError` as one red line (no traceback) and exit with its code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GuardedP2PError as exc:
            # the message is plain text (it may contain z85 keys with brackets): never parse it as markup
            err_console.print(
                f"[bold red]error:[/] {escape(type(exc).__name__)}: {escape(str(exc))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def print_json(obj: Any) -> None:
    """Emit one JSON object on the last stdout line (the contract of every ``--json`` flag)."""
    sys.stdout.write(json.dumps(obj, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()
