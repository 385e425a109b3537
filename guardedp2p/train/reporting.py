"""Experiment tracking: ``--report-to tensorboard|mlflow|wandb|all|none``, as transformers' ``TrainingArguments``.

Why: people who tune with transformers already watch their runs in one of these; a split run should show up there
the same way (loss, learning rate, step time, evaluation), plus what is particular to it: the bytes each step put
on the wire and the privacy settings the client announced (with ε where a formal accountant gives one; see
``docs/user-guide.md``). Metric names follow transformers' (``train/loss``, ``train/learning_rate``,
``eval/...``) so dashboards built for those runs keep working.

The run loop knows only the :class:`Reporter` protocol (:func:`guardedp2p.service.runner.reporting` hands it
every finished step). TensorBoard is the offline default (``torch.utils.tensorboard``; needs the ``tensorboard``
package); MLflow and Weights & Biases are optional extras imported only when asked for, with an error that says
what to install. Nothing here sends anything anywhere unless the user chose that tracker and configured it.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from guardedp2p.errors import ConfigError

REPORTERS = ("tensorboard", "mlflow", "wandb")
"""The trackers ``--report-to`` knows, in the order ``all`` tries them."""

_PACKAGE = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


class ReportingError(ConfigError):
    """A tracker was asked for but cannot be used (not installed, or it refused to start)."""


class Reporter(Protocol):
    """What the run loop and the CLI call on a tracker."""

    name: str

    def start(self, params: dict[str, Any]) -> None:
        """Record the run's settings (hyper-parameters, privacy settings) before the first step."""
        ...

    def log_step(self, row: dict[str, Any], *, seconds: float) -> None:
        """One finished optimizer step: its history row (``step``, ``loss``, ``lr``, bytes, ``eval``...)."""
        ...

    def finish(self, summary: dict[str, Any]) -> None:
        """The run's summary (evaluation before/after, traffic, privacy); then release the tracker."""
        ...


# ------------------------------------------------------------------------------------------------ what is logged
def step_metrics(row: dict[str, Any], seconds: float) -> dict[str, float]:
    """The scalars of one history row, under transformers' names where there is one."""
    out: dict[str, float] = {}
    names = {
        "task_loss": "train/loss",
        "loss": "train/total_loss",  # task loss + the distance-correlation penalty, when --dcor is on
        "lr": "train/learning_rate",
        "dcor": "train/dcor",
        "bytes_up": "train/bytes_up",
        "bytes_down": "train/bytes_down",
    }
    for key, name in names.items():
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    out["train/step_seconds"] = float(seconds)
    evaluation = row.get("eval")
    if isinstance(evaluation, dict):
        out.update({f"eval/{k}": float(v) for k, v in evaluation.items() if _is_number(v)})
    return out


def summary_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """End-of-run scalars: evaluation before and after, traffic, time, and ε where the run has one."""
    out: dict[str, float] = {}
    for when in ("before", "after"):
        for k, v in (summary.get(f"eval_{when}_all") or {}).items():
            if _is_number(v):
                out[f"eval/{k}_{when}"] = float(v)
    for key in ("bytes_up", "bytes_down", "bytes_per_step", "gradient_bytes", "train_s", "wall_s"):
        if _is_number(summary.get(key)):
            out[f"run/{key}"] = float(summary[key])
    for path, value in _leaves(summary.get("privacy") or {}, "privacy"):
        if path.rsplit("/", 1)[-1].startswith("epsilon") and _is_number(value):
            out[path] = float(value)
    return out


def flat_params(params: dict[str, Any], prefix: str = "") -> dict[str, str | float | int | bool]:
    """Nested settings as ``a/b`` keys with scalar values (what every tracker's parameter table accepts)."""
    out: dict[str, str | float | int | bool] = {}
    for path, value in _leaves(params, prefix):
        out[path] = value if isinstance(value, (str, int, float, bool)) else str(value)
    return out


def _leaves(obj: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}/{k}" if prefix else str(k))
    else:
        yield prefix, obj


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


# ------------------------------------------------------------------------------------------------ the trackers
class TensorBoardReporter:
    """Event files in ``OUT/tensorboard`` (``tensorboard --logdir OUT/tensorboard``); works offline."""

    name = "tensorboard"

    def __init__(self, log_dir: Path) -> None:
        _require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def start(self, params: dict[str, Any]) -> None:
        lines = [f"| {k} | {v} |" for k, v in flat_params(params).items()]
        self.writer.add_text("run/settings", "\n".join(["| setting | value |", "|---|---|", *lines]), 0)

    def log_step(self, row: dict[str, Any], *, seconds: float) -> None:
        step = int(row["step"])
        for name, value in step_metrics(row, seconds).items():
            self.writer.add_scalar(name, value, step)

    def finish(self, summary: dict[str, Any]) -> None:
        step = int(summary.get("steps", 0))
        for name, value in summary_metrics(summary).items():
            self.writer.add_scalar(name, value, step)
        self.writer.close()


class MlflowReporter:
    """An MLflow run (tracking URI from ``MLFLOW_TRACKING_URI``, else MLflow's default local ``mlruns``)."""

    name = "mlflow"

    def __init__(self, run_name: str) -> None:
        _require("mlflow")
        import mlflow

        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=run_name)

    def start(self, params: dict[str, Any]) -> None:
        flat = flat_params(params)
        # MLflow caps a parameter value at 6000 characters and a batch at 100 entries
        items = [(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.mlflow.log_params(dict(items[i : i + 100]))

    def log_step(self, row: dict[str, Any], *, seconds: float) -> None:
        self.mlflow.log_metrics(_mlflow_names(step_metrics(row, seconds)), step=int(row["step"]))

    def finish(self, summary: dict[str, Any]) -> None:
        self.mlflow.log_metrics(_mlflow_names(summary_metrics(summary)), step=int(summary.get("steps", 0)))
        self.mlflow.end_run()


def _mlflow_names(metrics: dict[str, float]) -> dict[str, float]:
    return {k.replace(" ", "_"): v for k, v in metrics.items()}


class WandbReporter:
    """A Weights & Biases run (project from ``WANDB_PROJECT``, default ``guardedp2p``; ``WANDB_MODE=offline`` works)."""

    name = "wandb"

    def __init__(self, run_name: str, out: Path) -> None:
        _require("wandb")
        import os

        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "guardedp2p"), name=run_name, dir=str(out))

    def start(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_step(self, row: dict[str, Any], *, seconds: float) -> None:
        self.run.log(step_metrics(row, seconds), step=int(row["step"]))

    def finish(self, summary: dict[str, Any]) -> None:
        for k, v in summary_metrics(summary).items():
            self.run.summary[k] = v
        self.run.finish()


def _require(name: str) -> None:
    package = _PACKAGE[name]
    if importlib.util.find_spec(package) is None:
        raise ReportingError(
            f"--report-to {name} needs the {package!r} package, which is not installed: `pip install {package}` "
            "(or pick another tracker, or --report-to none)"
        )


# ------------------------------------------------------------------------------------------------ choosing
def parse_report_to(value: str | Sequence[str] | None) -> list[str]:
    """``tensorboard,mlflow`` / ``all`` / ``none`` (also as a list) -> tracker names; ``all``: the installed ones."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    names: list[str] = []
    for item in items:
        for part in (p.strip().lower() for p in item.split(",")):
            if not part or part == "none":
                continue
            if part == "all":
                names += [n for n in REPORTERS if importlib.util.find_spec(_PACKAGE[n]) is not None]
            elif part in REPORTERS:
                names.append(part)
            else:
                raise ConfigError(f"--report-to {part!r}: choose one of {', '.join((*REPORTERS, 'all', 'none'))}")
    return list(dict.fromkeys(names))


def make_reporters(names: Sequence[str], out: Path, run_name: str) -> list[Reporter]:
    """Start the named trackers for a run writing to ``out`` (raises :class:`ReportingError` if one is missing)."""
    reporters: list[Reporter] = []
    for name in names:
        if name == "tensorboard":
            reporters.append(TensorBoardReporter(out / "tensorboard"))
        elif name == "mlflow":
            reporters.append(MlflowReporter(run_name))
        elif name == "wandb":
            reporters.append(WandbReporter(run_name, out))
        else:
            raise ConfigError(f"unknown tracker {name!r}: choose one of {', '.join(REPORTERS)}")
    return reporters


def check_available(names: Sequence[str]) -> None:
    """Refuse a tracker that is not installed before a run starts (``--dry-run`` and the checks before connecting)."""
    for name in names:
        _require(name)


__all__ = [
    "REPORTERS",
    "MlflowReporter",
    "Reporter",
    "ReportingError",
    "TensorBoardReporter",
    "WandbReporter",
    "check_available",
    "flat_params",
    "make_reporters",
    "parse_report_to",
    "step_metrics",
    "summary_metrics",
]
