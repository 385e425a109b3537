"""Shared CLI plumbing: logging, turning our exceptions into a readable message and a clean exit code.

Logging options are global (``guardedp2p --log-level debug --log-file run.jsonl client tune ...``) and reach
every sub-command through the process environment (``GUARDEDP2P_LOG_LEVEL``, ``GUARDEDP2P_LOG_FILE``,
``GUARDEDP2P_QUIET``), so a user can also set them once in the shell, as with ``TRANSFORMERS_VERBOSITY``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from guardedp2p.errors import GuardedP2PError

F = TypeVar("F", bound=Callable[..., Any])

err_console = Console(stderr=True)


LOG_LEVELS = ("debug", "info", "warning", "error")
_THIRD_PARTY = (
    "transformers",
    "peft",
    "accelerate",
    "urllib3",
    "filelock",
    "bitsandbytes",
    "huggingface_hub",
    "datasets",
    "kernels",  # "Skipping publisher trust check ... offline mode" on every load of a model, in the demo too
)


class JsonLineFormatter(logging.Formatter):
    """One JSON object per event and line (never wrapped): what a log shipper or ``jq`` expects of a log file."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, default=str)


def setup_logging(verbose: int = 0, *, quiet: bool = False) -> None:
    """Configure logging for one command.

    Level: ``GUARDEDP2P_LOG_LEVEL`` (set by ``--log-level``) wins; else ``GUARDEDP2P_QUIET`` / ``quiet`` give
    warnings only, ``-v`` debug, default info. Third-party libraries log only errors and their Python warnings
    are hidden unless ``-v`` or ``--log-level debug``. ``GUARDEDP2P_LOG_FILE`` adds a JSON-lines file handler.
    """
    named = os.environ.get("GUARDEDP2P_LOG_LEVEL", "").lower()
    if named in LOG_LEVELS:
        level = getattr(logging, named.upper())
    elif quiet or os.environ.get("GUARDEDP2P_QUIET") == "1":
        level = logging.WARNING
    else:
        level = logging.INFO if verbose <= 0 else logging.DEBUG
    handlers: list[logging.Handler] = [RichHandler(console=err_console, show_path=False, markup=False)]
    log_file = os.environ.get("GUARDEDP2P_LOG_FILE")
    if log_file:
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(JsonLineFormatter())
        handlers.append(fh)
    logging.basicConfig(level=level, format="%(message)s", handlers=handlers, force=True)
    chatty = level <= logging.DEBUG
    for noisy in _THIRD_PARTY:
        logging.getLogger(noisy).setLevel(logging.DEBUG if chatty else logging.ERROR)
    if not chatty:
        # e.g. bitsandbytes' "Hub is in offline mode" UserWarning on every run, even with --json
        for module in _THIRD_PARTY:
            warnings.filterwarnings("ignore", module=module)


def friendly_errors(fn: F) -> F:
    """Print a :class:`GuardedP2PError` as one red line (no traceback) and exit with its code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GuardedP2PError as exc:
            if kwargs.get("json_out") or kwargs.get("as_json"):
                # under --json a machine reads stdout: the error is one JSON object there too
                print_json(
                    {
                        "ok": False,
                        "error": type(exc).__name__,
                        "code": getattr(exc, "code", None),
                        "message": str(exc),
                        "exit_code": exc.exit_code,
                    }
                )
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
