"""Options from a file and the environment: ``--config FILE`` (TOML or YAML), ``--print-config``, choices that
name their valid values, and the help panels of the long commands.

Why: ``client tune`` has some sixty options. People coming from transformers' ``TrainingArguments``, accelerate or
flwr keep a run's settings in a file and override one or two on the command line; that is what ``--config``
does (:class:`ConfigCommand` reads it into Click's ``default_map``), so the precedence is the usual one: a flag on the command line, then a
``GUARDEDP2P_<OPTION>`` environment variable, then the file, then the built-in default. ``--print-config``
shows the merged result as TOML, which ``--config`` reads back.

A config file holds the options by their flag names (``batch-size = 8`` or ``batch_size = 8``), either at the
top level or in a table named after the command (``[client.tune]``, ``[demo]``, ``[provider.serve]``), so one
file can serve several commands.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import typer

from guardedp2p.errors import ConfigError

ENV_PREFIX = "GUARDEDP2P"
"""Options of ``client tune`` and ``demo`` may be set as ``GUARDEDP2P_<OPTION>`` (e.g. ``GUARDEDP2P_MODEL``)."""

# help panels (typer rich_help_panel), in the order they appear
CONNECTION = "Connection"
MODEL = "Model and split"
DATA = "Data"
TRAINING = "Training"
PRIVACY = "Wire and privacy"
DESIGN = "Design-specific"
OUTPUTS = "Outputs and reporting"
CONFIG = "Configuration"

#: Options a config file may not set (what a run does with an existing --out is decided per command line).
CLI_ONLY = {"config", "print_config", "dry_run", "resume", "overwrite", "help"}


class ConfigFileError(ConfigError):
    """A ``--config`` file cannot be read or names an option the command does not have."""


def in_panel(panel: str, option: Any) -> Any:
    """Put a ready-made ``typer.Option`` (e.g. from :mod:`guardedp2p.cli.data_options`) into a help panel."""
    option.rich_help_panel = panel
    return option


# ------------------------------------------------------------------------------------------------ choices
def choice(what: str, names: Sequence[str]) -> Callable[[str], str]:
    """A ``parser`` for ``typer.Option`` accepting one of ``names``; a typo is answered with the valid values.

    (``--protocol offlne`` -> "'offlne' is not a design; choose one of online, gradfree, offline (did you mean
    offline?)".)
    """
    valid = tuple(names)

    def parse(value: str) -> str:
        if value in valid:
            return value
        close = difflib.get_close_matches(str(value), valid, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise typer.BadParameter(f"{value!r} is not {what}; choose one of {', '.join(valid)}{hint}")

    return parse


def metavar(names: Sequence[str]) -> str:
    return "[" + "|".join(names) + "]"


# ------------------------------------------------------------------------------------------------ the file
def read_config_file(path: Path) -> dict[str, Any]:
    """The file's mapping: TOML for ``.toml``, YAML for ``.yaml``/``.yml``, else whichever parses."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigFileError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return _toml(path, text)
    if suffix in (".yaml", ".yml"):
        return _yaml(path, text)
    try:
        return _toml(path, text)
    except ConfigFileError:
        return _yaml(path, text)


def _toml(path: Path, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"--config {path} is not valid TOML: {exc}") from None


def _yaml(path: Path, text: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"--config {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"--config {path}: the top level must be a mapping of option names to values")
    return data


def _section(data: dict[str, Any], command_path: Sequence[str]) -> dict[str, Any]:
    """The command's own table (``[client.tune]``, ``[client_tune]``, ``[tune]``) merged over the top-level keys."""
    flat = {k: v for k, v in data.items() if not isinstance(v, dict)}
    node: Any = data
    for part in command_path:
        node = node.get(part) if isinstance(node, dict) else None
    for candidate in (node, data.get("_".join(command_path)), data.get(command_path[-1]) if command_path else None):
        if isinstance(candidate, dict):
            return {**flat, **candidate}
    return flat


def _options(command: Any) -> list[Any]:
    """The command's options (Click parameters of type "option"; typer vendors its own Click, so no isinstance)."""
    return [p for p in command.params if getattr(p, "param_type_name", "") == "option"]


def option_names(command: Any) -> dict[str, Any]:
    """Every spelling a config file may use for an option -> the option (``batch-size``, ``batch_size``, the
    parameter name); ``config`` and ``print-config`` themselves are left out."""
    names: dict[str, Any] = {}
    for param in _options(command):
        if param.name in CLI_ONLY:
            continue
        spellings = {str(param.name)}
        for opt in param.opts:
            if opt.startswith("--"):
                spellings |= {opt[2:], opt[2:].replace("-", "_")}
        for s in spellings:
            names[s] = param
    return names


def config_defaults(command: Any, command_path: Sequence[str], data: dict[str, Any]) -> dict[str, Any]:
    """The ``default_map`` of ``command`` from a parsed config file; an unknown key names the closest option."""
    known = option_names(command)
    out: dict[str, Any] = {}
    for key, value in _section(data, command_path).items():
        param = known.get(str(key))
        if param is None and str(key).replace("-", "_") in CLI_ONLY:
            raise ConfigFileError(
                f"{key!r} cannot come from a config file; give --{str(key).replace('_', '-')} on the command line"
            )
        if param is None:
            close = difflib.get_close_matches(str(key), [k for k in known if "_" not in k], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigFileError(
                f"{' '.join(command_path)} has no option {key!r}{hint}; "
                f"`guardedp2p {' '.join(command_path)} --print-config` lists them"
            )
        out[str(param.name)] = value
    return out


def _config_arg(args: list[str]) -> str | None:
    """The value of ``--config`` among raw arguments (``--config F`` or ``--config=F``), if any."""
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--config" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


class ConfigCommand(typer.core.TyperCommand):
    """A command whose ``--config FILE`` becomes its ``default_map`` before any option is parsed.

    Why here and not in an option callback: the file must be read before every other option wherever ``--config``
    stands on the line, and not at all when only ``--help`` is asked for (a help request must not fail on a
    missing file). Pass ``cls=ConfigCommand`` to ``Typer.command``.
    """

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        value = _config_arg(args)
        if value is None and self.context_settings.get("auto_envvar_prefix"):
            value = os.environ.get(f"{ENV_PREFIX}_CONFIG") or None
        if value is not None and not any(a in ("-h", "--help") for a in args):
            try:
                data = read_config_file(Path(value))
            except ConfigFileError as exc:
                raise typer.BadParameter(str(exc).removeprefix("--config "), ctx=ctx, param_hint="'--config'") from None
            try:
                defaults = config_defaults(self, _command_path(ctx), data)
            except ConfigFileError as exc:
                raise typer.BadParameter(f"{value}: {exc}", ctx=ctx, param_hint="'--config'") from None
            ctx.default_map = {**(ctx.default_map or {}), **defaults}
        return list(super().parse_args(ctx, args))


def _command_path(ctx: Any) -> list[str]:
    names: list[str] = []
    c: Any = ctx
    while c is not None and c.parent is not None:
        names.append(str(c.info_name))
        c = c.parent
    return list(reversed(names))


def config_option() -> Any:
    """The ``--config FILE`` option of a :class:`ConfigCommand` (which reads the file before parsing)."""
    return typer.Option(
        None,
        "--config",
        dir_okay=False,
        help="Read options from a TOML or YAML file (flag names as keys, at the top level or in a table named after "
        "the command, e.g. [client.tune]). Flags and GUARDEDP2P_* variables override it; --print-config shows the "
        "result.",
        rich_help_panel=CONFIG,
    )


def print_config_option() -> Any:
    return typer.Option(
        False,
        "--print-config",
        help="Print the merged options (file, environment, flags) as TOML that --config reads back, and exit.",
        rich_help_panel=CONFIG,
        allow_from_autoenv=False,
    )


# ------------------------------------------------------------------------------------------------ printing
_SOURCE = {"COMMANDLINE": "command line", "ENVIRONMENT": "environment", "DEFAULT_MAP": "config file"}


def merged_options(ctx: typer.Context) -> list[tuple[str, Any, str]]:
    """``(flag name, value, where it came from)`` of every option of the running command."""
    rows: list[tuple[str, Any, str]] = []
    for param in _options(ctx.command):
        if param.name in CLI_ONLY or param.hidden:
            continue
        long = next((o[2:] for o in param.opts if o.startswith("--")), str(param.name))
        source = ctx.get_parameter_source(str(param.name))
        where = _SOURCE.get(getattr(source, "name", ""), "default")
        rows.append((long, ctx.params.get(str(param.name)), where))
    return rows


def to_toml(rows: list[tuple[str, Any, str]], table: Sequence[str]) -> str:
    """Rows as a TOML table; an unset option (None) becomes a comment, each value says where it came from."""
    lines = [f"[{'.'.join(table)}]"] if table else []
    for name, value, source in rows:
        note = f"  # {source}" if source != "default" else ""
        if value is None or (isinstance(value, (list, tuple)) and not value):
            lines.append(f"# {name} =   (unset)")
        else:
            lines.append(f"{name} = {_toml_value(value)}{note}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf" if value < 0 else "nan")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    return json.dumps(str(value))  # a TOML basic string is a JSON string


def print_merged_config(ctx: typer.Context) -> None:
    """``--print-config``: the running command's options as TOML on stdout."""
    typer.echo(to_toml(merged_options(ctx), _command_path(ctx)), nl=False)


__all__ = [
    "CONFIG",
    "CONNECTION",
    "DATA",
    "DESIGN",
    "ENV_PREFIX",
    "MODEL",
    "OUTPUTS",
    "PRIVACY",
    "TRAINING",
    "ConfigFileError",
    "choice",
    "config_defaults",
    "config_option",
    "in_panel",
    "ConfigCommand",
    "merged_options",
    "metavar",
    "print_config_option",
    "print_merged_config",
    "read_config_file",
    "to_toml",
]
