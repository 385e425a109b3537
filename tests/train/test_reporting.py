"""``--report-to`` (issue 21): the step loop hands every finished step to the trackers; TensorBoard writes event
files offline; a tracker that is not installed fails before the run with what to install."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from guardedp2p.errors import ConfigError
from guardedp2p.service.runner import StepProgress, reporting, train_steps
from guardedp2p.train.reporting import (
    ReportingError,
    check_available,
    make_reporters,
    parse_report_to,
    step_metrics,
    summary_metrics,
)


class Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.steps: list[tuple[dict, float]] = []

    def start(self, params: dict) -> None:
        pass

    def log_step(self, row: dict, *, seconds: float) -> None:
        self.steps.append((row, seconds))

    def finish(self, summary: dict) -> None:
        pass


class FakeTrainer:
    def __init__(self) -> None:
        self.step = 0

    def train_step(self, micro):
        self.step += 1
        return SimpleNamespace(step=self.step, loss=1.0 / self.step, task_loss=1.0 / self.step, lr=0.1, seconds=0.25)


class FakeData:
    def __init__(self) -> None:
        self.pos = 0

    def __next__(self):
        self.pos += 1
        return {"input_ids": torch.zeros(1, 2, dtype=torch.long)}

    def state_dict(self):
        return {"position": self.pos}

    def load_state_dict(self, state):
        self.pos = state["position"]


def test_the_step_loop_reports_every_step_inside_reporting_only():
    rec = Recorder()
    trainer = FakeTrainer()
    with reporting(rec):
        train_steps(
            trainer,
            FakeData(),
            steps=3,
            grad_accum=1,
            device=torch.device("cpu"),
            history=[],
            progress=StepProgress(),
        )
    assert [r["step"] for r, _ in rec.steps] == [1, 2, 3] and rec.steps[0][1] == 0.25
    train_steps(
        trainer, FakeData(), steps=4, grad_accum=1, device=torch.device("cpu"), history=[], progress=StepProgress()
    )
    assert len(rec.steps) == 3, "a reporter leaves with its reporting() block"


def test_metric_names_follow_transformers():
    row = {"step": 3, "loss": 2.5, "task_loss": 2.0, "lr": 1e-3, "dcor": 0.1, "bytes_up": 10, "eval": {"acc": 0.5}}
    m = step_metrics(row, 0.2)
    assert m["train/loss"] == 2.0 and m["train/learning_rate"] == 1e-3 and m["train/bytes_up"] == 10.0
    assert m["eval/acc"] == 0.5 and m["train/step_seconds"] == 0.2
    s = summary_metrics(
        {
            "eval_before_all": {"acc": 0.25},
            "eval_after_all": {"acc": 0.5},
            "bytes_up": 7,
            "privacy": {"noise": {"run": {"epsilon": 3.0}}},
        }
    )
    assert s["eval/acc_before"] == 0.25 and s["eval/acc_after"] == 0.5 and s["privacy/noise/run/epsilon"] == 3.0


def test_report_to_parsing():
    assert parse_report_to("none") == [] and parse_report_to("tensorboard, mlflow") == ["tensorboard", "mlflow"]
    with pytest.raises(ConfigError, match="choose one of tensorboard, mlflow, wandb, all, none"):
        parse_report_to("tensorbord")


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is not None, reason="mlflow is installed here")
def test_a_missing_tracker_says_what_to_install():
    with pytest.raises(ReportingError, match="pip install mlflow"):
        check_available(["mlflow"])


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs the tensorboard package")
def test_tensorboard_writes_scalars_offline(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (reporter,) = make_reporters(["tensorboard"], tmp_path, run_name="t")
    reporter.start({"train": {"lr": 0.001}, "privacy": {}})
    for step in (1, 2):
        reporter.log_step({"step": step, "task_loss": 3.0 - step, "lr": 0.001, "bytes_up": 100}, seconds=0.1)
    reporter.finish({"steps": 2, "eval_after_all": {"loss": 1.5}})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss")] == [2.0, 1.0]
    assert acc.Scalars("eval/loss_after")[0].value == 1.5
