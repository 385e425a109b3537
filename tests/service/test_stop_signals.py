"""The step loop's side of stopping on a signal (issue 21), without processes: a stop request ends the loop at
a step boundary with a checkpoint; an abandoned step is saved as not done (the data position before it)."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest
import torch

from guardedp2p.service.runner import STOP, RunStopped, StepAborted, StepProgress, stop_on_signals, train_steps


class Trainer:
    def __init__(self, abort_at: int | None = None) -> None:
        self.step = 0
        self.abort_at = abort_at

    def train_step(self, micro):
        if self.abort_at is not None and self.step + 1 == self.abort_at:
            raise StepAborted(signal.SIGINT)  # what the handler raises on a second Ctrl-C
        self.step += 1
        return SimpleNamespace(step=self.step, loss=1.0, task_loss=1.0, lr=0.1, seconds=0.0)


class Data:
    def __init__(self) -> None:
        self.pos = 0

    def __next__(self):
        self.pos += 1
        return {"x": torch.zeros(1)}

    def state_dict(self):
        return {"position": self.pos}

    def load_state_dict(self, state):
        self.pos = state["position"]


def _run(trainer, data, saved, after_step=None):
    train_steps(
        trainer,
        data,
        steps=10,
        grad_accum=1,
        device=torch.device("cpu"),
        history=[],
        progress=StepProgress(),
        save=lambda: saved.append((trainer.step, data.state_dict()["position"])),
        after_step=after_step,
    )


def test_a_stop_request_ends_the_loop_at_the_next_boundary_with_a_checkpoint():
    trainer, data, saved = Trainer(), Data(), []
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background (nohup) process
    with stop_on_signals():

        def request_after_three() -> None:
            if trainer.step == 3:
                STOP.handle(signal.SIGTERM, None)  # as if SIGTERM arrived during step 3

        with pytest.raises(RunStopped) as info:
            _run(trainer, data, saved, after_step=request_after_three)
    assert info.value.step == 3 and info.value.saved and not info.value.aborted
    assert info.value.exit_code == 143 and saved == [(3, 3)]
    assert signal.getsignal(signal.SIGINT) is before, "the previous handler is back"


def test_a_second_signal_raises_and_the_first_only_asks():
    with stop_on_signals():
        STOP.in_steps = True
        STOP.handle(signal.SIGINT, None)
        assert STOP.requested and not STOP.aborted
        with pytest.raises(StepAborted):
            STOP.handle(signal.SIGINT, None)
        STOP.closing = True
        STOP.handle(signal.SIGINT, None)  # while saving: ignored
    assert not STOP.installed


def test_abandoned_step_restores_the_data_position():
    trainer, data, saved = Trainer(abort_at=4), Data(), []
    with stop_on_signals(), pytest.raises(RunStopped) as info:
        _run(trainer, data, saved)
    assert info.value.aborted and info.value.step == 3 and info.value.exit_code == 130
    assert saved == [(3, 3)], "position 3: the abandoned 4th step's batch is trained on --resume"
