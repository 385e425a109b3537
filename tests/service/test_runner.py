"""The shared run machinery on its own (guardedp2p.service.runner): which failures are retried, stop or are
raised, the back-off, the checkpoint written on a stop, resumption refusing another run's checkpoint, the step
loop and the summary. Fakes stand in for the trainer, the data and the session: no model is needed, except
for the one session test, which talks to a tiny in-process provider."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from guardedp2p.errors import (
    ArtifactError,
    ConfigError,
    HandshakeRejected,
    ProviderShuttingDown,
    RateLimited,
    RemoteError,
    TransportError,
)
from guardedp2p.service.runner import (
    CheckpointOnStop,
    KeepOutputsOnStop,
    RetryLadder,
    RunCheckpoint,
    RunRecord,
    StepProgress,
    Traffic,
    TrainingInterrupted,
    Verdict,
    build_summary,
    history_row,
    primary_metric,
    time_split,
    train_steps,
)
from guardedp2p.train.checkpoint import CheckpointError
from guardedp2p.transport.base import MechanismMismatch, PeerRejected, PeerTimeout, ProviderKeyMismatch


# ---------------------------------------------------------------------------------------------- fakes
@dataclass
class FakeResult:
    step: int
    loss: float
    task_loss: float
    dcor: float = 0.0
    lr: float = 1e-3
    seconds: float = 0.0


class FakeTrainer:
    """A trainer whose one weight counts the steps it trained."""

    def __init__(self) -> None:
        self.step = 0
        self.w = torch.zeros(3)
        self.seen: list[int] = []

    def train_step(self, micro_batches):
        self.seen.extend(int(b["input_ids"][0, 0]) for b in micro_batches)
        self.step += 1
        self.w += 1
        return FakeResult(self.step, loss=1.0 / self.step + 1e-7, task_loss=1.0 / self.step)

    def trainable_state(self):
        return {"w": self.w.clone()}

    def load_trainable_state(self, state):
        self.w = state["w"].clone()

    def state_dict(self):
        return {"step": self.step, "optimizer": {"state": {}}, "scheduler": {"last_epoch": self.step}}

    def load_state_dict(self, state):
        self.step = int(state["step"])


class FakeData:
    """Batches numbered 0, 1, 2, ... with a saveable position."""

    def __init__(self) -> None:
        self.position = 0

    def __next__(self):
        self.position += 1
        return {"input_ids": torch.tensor([[self.position - 1]])}

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = int(state["position"])


class FakeLink:
    def __init__(self) -> None:
        self.opened = 0
        self.dropped = 0
        self.is_open = False

    def ensure_open(self) -> None:
        if not self.is_open:
            self.opened += 1
            self.is_open = True

    def drop(self) -> None:
        self.dropped += 1
        self.is_open = False


def failing(*excs: Exception, result: str = "done"):
    """A request failing with each of ``excs`` in turn, then returning ``result``."""
    calls: list[int] = []

    def fn() -> str:
        calls.append(1)
        if len(calls) <= len(excs):
            raise excs[len(calls) - 1]
        return result

    fn.calls = calls  # type: ignore[attr-defined]
    return fn


def ladder(retries: int = 3, **kw) -> tuple[RetryLadder, list[float]]:
    sleeps: list[float] = []
    return RetryLadder(retries, sleep=sleeps.append, **kw), sleeps


def checkpoint_stop(tmp_path: Path, trainer: FakeTrainer, resumed_from: int = 0):
    saves: list[int] = []
    stop = CheckpointOnStop(lambda: saves.append(trainer.step), lambda: trainer.step, resumed_from, tmp_path / "ckpt")
    return stop, saves


# ---------------------------------------------------------------------------------------------- verdicts
@pytest.mark.parametrize(
    ("exc", "verdict"),
    [
        (HandshakeRejected("split mismatch"), Verdict.RAISE),
        (ConfigError("bad option"), Verdict.RAISE),
        (CheckpointError("another run"), Verdict.RAISE),
        (ValueError("a bug, not a failure of the peer"), Verdict.RAISE),
        (PeerRejected("refused this client's key"), Verdict.SAVE_AND_RAISE),
        (ProviderKeyMismatch("does not match"), Verdict.SAVE_AND_RAISE),
        (MechanismMismatch("curve vs plain"), Verdict.SAVE_AND_RAISE),
        (ProviderShuttingDown("bye", remote_code="provider-shutting-down"), Verdict.STOP),
        (RateLimited("over --max-mb-per-s", remote_code="rate-limited"), Verdict.STOP),
        (PeerTimeout("silent"), Verdict.RETRY),
        (RemoteError("trunk failed", remote_code="internal"), Verdict.RETRY),
        (ArtifactError("digest mismatch"), Verdict.RAISE),
    ],
)
def test_each_failure_gets_its_verdict(exc, verdict):
    assert RetryLadder().verdict(exc) is verdict


def test_refetch_is_only_for_the_exceptions_named():
    assert RetryLadder(refetch=(ArtifactError,)).verdict(ArtifactError("digest")) is Verdict.REFETCH
    assert RetryLadder(refetch=(ArtifactError,)).verdict(PeerTimeout("x")) is Verdict.RETRY


# ---------------------------------------------------------------------------------------------- retry
def test_transport_failures_are_retried_on_a_fresh_session_with_doubling_backoff(tmp_path):
    lad, sleeps = ladder(3)
    link, trainer = FakeLink(), FakeTrainer()
    stop, saves = checkpoint_stop(tmp_path, trainer)
    fn = failing(PeerTimeout("a"), RemoteError("b"), PeerTimeout("c"))
    assert lad.run(fn, "step 1", link=link, stop=stop) == "done"
    assert len(fn.calls) == 4 and sleeps == [0.5, 1.0, 2.0]
    assert link.dropped == 3 and link.opened == 4, "every retry opens a new session"
    assert saves == []


def test_backoff_is_capped(tmp_path):
    lad, sleeps = ladder(7)
    stop, _ = checkpoint_stop(tmp_path, FakeTrainer())
    with pytest.raises(PeerTimeout):
        lad.run(failing(*[PeerTimeout(str(i)) for i in range(8)]), "x", link=FakeLink(), stop=stop)
    assert sleeps == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_backoff_values_and_negative_retries():
    lad = RetryLadder(first_delay_s=0.5, max_delay_s=8.0)
    assert [lad.backoff(n) for n in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    with pytest.raises(ConfigError, match="--retries"):
        RetryLadder(-1)


def test_exhausted_retries_save_the_checkpoint_and_say_how_to_resume(tmp_path):
    lad, sleeps = ladder(2)
    trainer = FakeTrainer()
    trainer.step = 7
    stop, saves = checkpoint_stop(tmp_path, trainer)
    with pytest.raises(TrainingInterrupted) as info:
        lad.run(failing(*[PeerTimeout("No provider answered.")] * 3), "step 8", link=FakeLink(), stop=stop)
    assert str(info.value) == (
        f"step 8 failed after 3 attempts: No provider answered. Checkpoint saved at step 7 in {tmp_path / 'ckpt'}; "
        "run the same command with --resume to continue."
    )
    assert saves == [7] and sleeps == [0.5, 1.0]
    assert info.value.exit_code == 4


def test_exhausted_retries_before_any_step_raise_the_channel_error_itself(tmp_path):
    lad, _ = ladder(1)
    stop, saves = checkpoint_stop(tmp_path, FakeTrainer())
    with pytest.raises(PeerTimeout, match="no provider"):
        lad.run(
            failing(PeerTimeout("no provider"), PeerTimeout("no provider")),
            "opening the session",
            link=FakeLink(),
            stop=stop,
        )
    assert saves == []


# ---------------------------------------------------------------------------------------------- stop
def test_shutting_down_stops_at_once_with_the_checkpoint(tmp_path):
    lad, sleeps = ladder(3)
    link, trainer = FakeLink(), FakeTrainer()
    trainer.step = 3
    stop, saves = checkpoint_stop(tmp_path, trainer)
    fn = failing(ProviderShuttingDown("x", remote_code="provider-shutting-down"))
    with pytest.raises(TrainingInterrupted) as info:
        lad.run(fn, "step 4", link=link, stop=stop)
    assert str(info.value) == (
        "step 4 stopped: the provider is shutting down (its operator stopped it). Your checkpoint is at step 3 in "
        f"{tmp_path / 'ckpt'}; run the same command with --resume once the provider is back."
    )
    assert len(fn.calls) == 1 and sleeps == [] and saves == [3] and link.dropped == 1


def test_a_rate_limit_stop_before_any_step_says_there_is_no_checkpoint(tmp_path):
    lad, _ = ladder(3)
    stop, saves = checkpoint_stop(tmp_path, FakeTrainer())
    with pytest.raises(TrainingInterrupted) as info:
        lad.run(failing(RateLimited("over 1 MB/s for 300 s")), "evaluation", link=FakeLink(), stop=stop)
    assert str(info.value) == (
        "evaluation stopped: over 1 MB/s for 300 s. Nothing was trained yet, so there is no checkpoint; run the "
        "same command again once the provider is back."
    )
    assert saves == []


def test_a_resumed_run_saves_even_before_its_first_new_step(tmp_path):
    lad, _ = ladder(0)
    trainer = FakeTrainer()
    trainer.step = 5
    stop, saves = checkpoint_stop(tmp_path, trainer, resumed_from=5)
    with pytest.raises(TrainingInterrupted, match="step 5"):
        lad.run(failing(PeerTimeout("gone")), "step 6", link=FakeLink(), stop=stop)
    assert saves == [5]


def test_offline_stops_keep_what_was_done(tmp_path):
    lad, sleeps = ladder(1)
    stop = KeepOutputsOnStop(tmp_path)
    with pytest.raises(TrainingInterrupted) as info:
        lad.run(failing(ProviderShuttingDown("x")), "downloading the emulator", link=FakeLink(), stop=stop)
    assert str(info.value) == (
        "downloading the emulator stopped: the provider is shutting down (its operator stopped it). What was done "
        f"is kept in {tmp_path}; run the same command again (with --resume) once the provider is back."
    )
    with pytest.raises(TrainingInterrupted) as info:
        lad.run(failing(PeerTimeout("silent."), PeerTimeout("silent.")), "uploading", link=FakeLink(), stop=stop)
    assert str(info.value) == (
        f"uploading failed after 2 attempts: silent.. What was done is kept in {tmp_path}; run the same command "
        "again (with --resume) to continue where it stopped."
    )
    assert sleeps == [0.5]


# ---------------------------------------------------------------------------------------------- raise
@pytest.mark.parametrize("exc", [HandshakeRejected("split mismatch"), ConfigError("bad"), ValueError("bug")])
def test_refusals_and_bugs_are_raised_at_once_without_saving(tmp_path, exc):
    lad, sleeps = ladder(3)
    trainer = FakeTrainer()
    trainer.step = 2
    stop, saves = checkpoint_stop(tmp_path, trainer)
    fn = failing(exc)
    with pytest.raises(type(exc)):
        lad.run(fn, "step 3", link=FakeLink(), stop=stop)
    assert len(fn.calls) == 1 and sleeps == [] and saves == []


@pytest.mark.parametrize("step,saved", [(0, []), (4, [4])])
def test_key_mismatches_are_raised_at_once_after_saving_what_was_trained(tmp_path, step, saved):
    lad, sleeps = ladder(3)
    trainer = FakeTrainer()
    trainer.step = step
    stop, saves = checkpoint_stop(tmp_path, trainer)
    with pytest.raises(PeerRejected, match="--allow"):
        lad.run(failing(PeerRejected("refused this client's key; ask for --allow")), "x", link=FakeLink(), stop=stop)
    assert saves == saved and sleeps == []


def test_refetch_retries_at_once_on_the_same_session_then_gives_up_with_the_error():
    lad, sleeps = ladder(2, refetch=(ArtifactError,))
    link = FakeLink()
    fn = failing(ArtifactError("digest"), ArtifactError("digest"))
    assert lad.run(fn, "download", link=link, stop=KeepOutputsOnStop(Path("."))) == "done"
    assert sleeps == [] and link.dropped == 0 and link.opened == 1
    with pytest.raises(ArtifactError):
        lad.run(failing(*[ArtifactError("digest")] * 3), "download", link=link, stop=KeepOutputsOnStop(Path(".")))


# ---------------------------------------------------------------------------------------------- checkpoints
def test_a_stop_writes_a_checkpoint_that_resumes_the_trainer_and_data_position(tmp_path):
    trainer, data = FakeTrainer(), FakeData()
    ckpt = RunCheckpoint(tmp_path / "checkpoint", {"protocol": "online", "fingerprint": "fp1"}, train_config={"lr": 1})
    history = [history_row(trainer.train_step([next(data)])) for _ in range(2)]
    before_step = data.state_dict()
    stop = CheckpointOnStop(lambda: ckpt.save(trainer, before_step, history), lambda: trainer.step, 0, ckpt.directory)
    lad, _ = ladder(0)
    with pytest.raises(TrainingInterrupted, match="step 2"):
        lad.run(failing(ProviderShuttingDown("x")), "step 3", link=FakeLink(), stop=stop)

    again, data2 = FakeTrainer(), FakeData()
    resumed = RunCheckpoint(tmp_path / "checkpoint", {"protocol": "online", "fingerprint": "fp1"}).resume(again, data2)
    assert resumed.step == 2 and again.step == 2 and data2.position == 2
    assert resumed.history == history
    assert torch.equal(again.w, trainer.w)


def test_what_a_run_measured_once_comes_back_on_resume(tmp_path):
    """The untuned model's evaluation is taken before the first step only: a resumed run gets it from the
    checkpoint (its summary's eval_before was NaN otherwise), and keeps it in the checkpoints it writes."""
    trainer, data = FakeTrainer(), FakeData()
    trainer.train_step([next(data)])
    identity = {"protocol": "online", "fingerprint": "fp1"}
    ckpt = RunCheckpoint(tmp_path / "c", identity)
    ckpt.extra["eval_before"] = {"acc": 0.25, "loss": 3.5}
    ckpt.save(trainer, data.state_dict(), [])
    again = RunCheckpoint(tmp_path / "c", identity)
    resumed = again.resume(FakeTrainer(), FakeData())
    assert resumed.extra == {"eval_before": {"acc": 0.25, "loss": 3.5}} and again.extra == resumed.extra
    again.save(trainer, data.state_dict(), [])  # the resumed run's own checkpoint
    third = RunCheckpoint(tmp_path / "c", identity).resume(FakeTrainer(), FakeData())
    assert third.extra["eval_before"]["acc"] == 0.25


@pytest.mark.parametrize(
    "identity",
    [{"protocol": "gradfree", "fingerprint": "fp1"}, {"protocol": "online", "fingerprint": "another-model"}],
)
def test_resume_refuses_a_checkpoint_of_another_protocol_or_model(tmp_path, identity):
    trainer = FakeTrainer()
    trainer.train_step([{"input_ids": torch.zeros(1, 1)}])
    RunCheckpoint(tmp_path / "c", {"protocol": "online", "fingerprint": "fp1"}).save(trainer, {"position": 1}, [])
    fresh = FakeTrainer()
    with pytest.raises(ConfigError) as info:
        RunCheckpoint(tmp_path / "c", identity).resume(fresh, FakeData())
    assert str(info.value) == (
        f"the checkpoint in {tmp_path / 'c'} is for another protocol or model; use a new --out, or --overwrite "
        "instead of --resume to replace that run"
    )
    assert fresh.step == 0, "nothing was restored"


def test_resume_without_a_checkpoint_starts_fresh(tmp_path):
    trainer = FakeTrainer()
    resumed = RunCheckpoint(tmp_path / "none", {"protocol": "online"}).resume(trainer, FakeData())
    assert resumed.step == 0 and resumed.history == [] and trainer.step == 0


# ---------------------------------------------------------------------------------------------- the loop
def test_train_steps_checkpoints_every_n_steps_and_hands_each_step_its_data_position():
    trainer, data = FakeTrainer(), FakeData()
    history: list[dict] = []
    saves, positions, updates = [], [], []

    class Bar(StepProgress):
        def update(self, completed: int, loss: float) -> None:
            updates.append((completed, loss))

    def step(micro, data_state):
        positions.append(data_state["position"])
        res = trainer.train_step(micro)
        return res, {"bytes_up": 10}

    train_steps(
        trainer,
        data,
        steps=5,
        grad_accum=2,
        device=torch.device("cpu"),
        history=history,
        progress=Bar(),
        step=step,
        checkpoint_every=2,
        save=lambda: saves.append(trainer.step),
    )
    assert trainer.step == 5 and saves == [2, 4]
    assert positions == [0, 2, 4, 6, 8], "the position before each step's micro-batches"
    assert trainer.seen == list(range(10))
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5] and all(h["bytes_up"] == 10 for h in history)
    assert history[1] == {"step": 2, "loss": 0.5, "task_loss": 0.5, "lr": 1e-3, "bytes_up": 10}
    assert updates == [(s, 1.0 / s) for s in range(1, 6)]


# ---------------------------------------------------------------------------------------------- summary
def _record(**kw) -> RunRecord:
    base = dict(
        protocol="online",
        model="tiny",
        steps=10,
        resumed_from=6,
        history=[{"step": 7, "task_loss": 2.5}, {"step": 10, "task_loss": 1.25}],
        eval_kind="mc",
        eval_before={"acc": 0.25, "acc_norm": 0.3, "loss": 3.0},
        eval_after={"acc": 0.75, "acc_norm": 0.7, "loss": 1.0},
        train_s=12.34567,
        adapter_dir=Path("out/adapter"),
        started=0.0,
        train_config={"steps": 10},
    )
    base.update(kw)
    return RunRecord(**base)


def test_summary_from_a_fake_history():
    traffic = Traffic(
        bytes_up=1000,
        bytes_down=900,
        up_by_type={"HELLO": 100, "ACT_UP": 500, "GRAD_UP": 400},
        down_by_type={"ACT_DOWN": 500, "GRAD_DOWN": 300, "WELCOME": 100},
        train_bytes_up=800,
        train_bytes_down=400,
    )
    s = build_summary(_record(), traffic, {"codecs": {"up": "int8"}})
    assert s["loss_first"] == 2.5 and s["loss_last"] == 1.25
    assert s["eval_metric"] == "acc" and s["eval_before"] == 0.25 and s["eval_after"] == 0.75
    assert s["eval_before_all"]["loss"] == 3.0
    assert s["bytes_per_step"] == (800 + 400) / 4, "training bytes over the steps this run made"
    assert s["gradient_bytes"] == 700
    assert s["bytes_by_type"] == {"up": traffic.up_by_type, "down": traffic.down_by_type}
    assert s["train_s"] == 12.346 and s["adapter_dir"] == str(Path("out/adapter"))
    assert s["codecs"] == {"up": "int8"} and s["history"] == _record().history
    assert s["steps"] == 10 and s["resumed_from"] == 6 and s["wall_s"] > 0


def test_summary_without_evaluation_or_history_is_nan_not_an_error():
    s = build_summary(_record(history=[], eval_kind="loss", eval_before={}, eval_after={}, resumed_from=10), Traffic())
    assert s["eval_metric"] == "loss"
    assert all(math.isnan(s[k]) for k in ("loss_first", "loss_last", "eval_before", "eval_after"))
    assert s["bytes_per_step"] == 0.0 and s["gradient_bytes"] == 0


def test_primary_metric_and_time_split():
    assert primary_metric({"acc": 0.5, "loss": 2.0}) == 0.5
    assert primary_metric({"loss": 2.0}) == 2.0
    assert math.isnan(primary_metric({}))
    assert time_split(10.0, wait_s=6.0, codec_s=1.0, provider_s=4.0) == {
        "provider_compute_s": 4.0,
        "serialisation_s": 1.0,
        "wire_s": 2.0,
        "client_compute_s": 3.0,
    }


# ---------------------------------------------------------------------------------------------- session
def test_session_link_uses_the_early_channel_first_and_reopens_with_a_fresh_hello():
    from guardedp2p.protocol.client import WireStats
    from guardedp2p.service.runner import SessionLink
    from guardedp2p.transport.inproc import InProcClientChannel
    from guardedp2p.wire.handshake import Hello
    from tests.protocol_helpers import SPLIT, client_parts, provider_app
    from tests.tiny_models import tiny_model

    model = tiny_model("llama")
    app = provider_app(model)
    _, fp = client_parts(model, lora=False)
    channels: list[InProcClientChannel] = []
    hellos: list[int] = []
    opened: list[dict] = []

    def connect() -> InProcClientChannel:
        channels.append(InProcClientChannel(app))
        return channels[-1]

    def hello() -> Hello:
        hellos.append(len(hellos))
        return Hello("gradfree", fp, (SPLIT.bottom_layers, SPLIT.top_layers), {"up": "fp32", "down": "fp32"})

    early = connect()
    link = SessionLink(
        connect, hello, timeout=5.0, stats=WireStats(), on_open=lambda s, t: opened.append(t), channel=early
    )
    with pytest.raises(TransportError, match="no open session"):
        link.session  # noqa: B018 - not open yet
    link.ensure_open()
    link.ensure_open()
    assert len(channels) == 1 and link.session.channel is early and len(opened) == 1
    link.drop()
    link.ensure_open()
    assert len(channels) == 2 and hellos == [0, 1] and len(opened) == 2
    link.close()
    assert not link.is_open and link.stats.total_up > 0
