"""The run machinery every design shares: the retry ladder, the provider session it reconnects, checkpoints
and resumption, the training-step loop, progress display and the run summary.

The designs' own loops (:mod:`guardedp2p.designs.online.run` for Online and Gradfree,
:mod:`guardedp2p.designs.offline.run` for Offline) are short compositions of these pieces, so a failure is
handled, a run resumed and its numbers reported the same way in all three designs, which is what makes their
summaries comparable (GuardedTuning, arXiv 2501.04323, compares the designs on the same utility and cost axes).

How a failure ends (the ladder's verdicts, :meth:`RetryLadder.verdict`):

* a refusal that retrying cannot change (:class:`~guardedp2p.errors.HandshakeRejected`,
  :class:`~guardedp2p.errors.ConfigError`) is raised at once;
* a key or mechanism mismatch of the encrypted channel is raised at once too, after saving what was trained;
* "provider-shutting-down" (its operator stopped it) and a rate limit that outlasted the session's own waiting
  (see :class:`~guardedp2p.protocol.client.ClientSession`) stop the run with its checkpoint: reconnecting
  within seconds cannot succeed, and the user should learn why now rather than after the retries;
* any other channel failure or ERROR reply is retried on a fresh session, with doubling back-off; when the
  attempts are used up the run stops with its checkpoint.

What "stopping with its checkpoint" saves and says is the design's :class:`StopPolicy`.

How a signal ends a run (:func:`stop_on_signals`, which the CLI wraps around every run): SIGINT and SIGTERM set a
flag that the step loop checks between steps, so the run stops at a step boundary with a checkpoint, says BYE to
the provider and raises :class:`RunStopped`. A second Ctrl-C (or a signal outside the step loop: loading,
evaluation) abandons the work in flight (:class:`StepAborted`); the checkpoint then holds the data position
*before* the abandoned step, so ``--resume`` repeats it rather than losing it.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch

from guardedp2p.errors import (
    ConfigError,
    GuardedP2PError,
    HandshakeRejected,
    ProviderShuttingDown,
    RateLimited,
    RemoteError,
    TransportError,
)
from guardedp2p.protocol.client import ClientSession, FrameChannel, WireStats
from guardedp2p.train.checkpoint import CheckpointError, has_checkpoint, load_checkpoint, save_checkpoint
from guardedp2p.transport.base import ChannelClosed, MechanismMismatch, PeerRejected, ProviderKeyMismatch

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from guardedp2p.train.reporting import Reporter
    from guardedp2p.train.trainer import StepResult
    from guardedp2p.wire.handshake import Hello

log = logging.getLogger("guardedp2p.client")

T = TypeVar("T")
Batch = dict[str, torch.Tensor]
DataState = dict[str, Any]  # a BatchIterator position (plain ints and strings)
HistoryRow = dict[str, Any]
ChannelFactory = Callable[[], FrameChannel]  # in-process or ZeroMQ: the run never knows which


class TrainingInterrupted(TransportError):
    """The provider went away mid-run; the message says where the checkpoint is and how to resume."""


# ------------------------------------------------------------------------------------------------ signals
SIGNAL_NAMES: dict[int, str] = {int(signal.SIGINT): "Ctrl-C (SIGINT)", int(signal.SIGTERM): "SIGTERM"}


class StepAborted(KeyboardInterrupt):
    """The work in flight was abandoned: a second Ctrl-C, or a signal outside the step loop.

    A :class:`KeyboardInterrupt` so that no ``except Exception`` (the retry ladder, best-effort clean-ups) can
    take it for a failure to retry.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class RunStopped(GuardedP2PError):
    """The run stopped on a signal. ``step`` is the last step done; ``saved`` whether a checkpoint holds it.

    The exit code is the shell's convention for a death by that signal (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int, step: int, *, saved: bool, aborted: bool) -> None:
        self.signum, self.step, self.saved, self.aborted = signum, step, saved, aborted
        self.exit_code = 128 + int(signum)
        what = "the step in flight was abandoned" if aborted else "stopped between steps"
        super().__init__(
            f"{SIGNAL_NAMES.get(signum, f'signal {signum}')}: {what} after step {step}"
            + (" (checkpoint saved)" if saved else " (nothing new to save)")
        )


class StopSignals:
    """SIGINT/SIGTERM turned into a flag the step loop checks, so a run stops at a step boundary.

    Why not the default KeyboardInterrupt: raised at an arbitrary point it can land inside a C extension's
    clean-up (pyzmq's ``Frame.__dealloc__``), where Python prints "Exception ignored" and the run carries on to
    the end; and a step cut anywhere leaves no consistent state to save. The first signal during the step loop
    only sets the flag; a second one (or any signal outside the loop, where there is no boundary to wait for)
    raises :class:`StepAborted`. Should that exception be swallowed all the same, the flag stays set: channels
    opened while the handlers are installed refuse to send or receive (:meth:`check_aborted`), and the loop
    stops at its next boundary.
    """

    def __init__(self) -> None:
        self.installed = False
        self.reset()

    def reset(self) -> None:
        self.signum: int | None = None
        self.aborted = False
        self.in_steps = False
        self.closing = False  # saying BYE after an abort: the channels may be used once more

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def handle(self, signum: int, frame: object) -> None:
        if self.closing:  # saving the checkpoint and saying BYE takes a moment: do not cut it short
            log.warning("saving the checkpoint and telling the provider; one moment")
            return
        if self.signum is None and self.in_steps:
            self.signum = signum
            log.warning(
                "%s: stopping after the step in flight (checkpoint, then exit); Ctrl-C again to abandon the step",
                SIGNAL_NAMES.get(signum, f"signal {signum}"),
            )
            return
        self.signum = self.signum if self.signum is not None else signum
        self.aborted = True
        raise StepAborted(self.signum)

    def check_aborted(self) -> None:
        if self.aborted and not self.closing:
            raise StepAborted(self.signum if self.signum is not None else signal.SIGINT)


STOP = StopSignals()
_OPEN_LINKS: weakref.WeakSet[SessionLink] = weakref.WeakSet()
_REPORTERS: list[Reporter] = []


@contextmanager
def _closing() -> Iterator[None]:
    """Finishing a stopped run: further signals wait, aborted channels may carry the BYE."""
    before, STOP.closing = STOP.closing, True
    try:
        yield
    finally:
        STOP.closing = before


def say_goodbye(timeout: float = 2.0) -> None:
    """BYE on every open provider session (best effort, each waiting at most ``timeout`` s for its reply)."""
    with _closing():
        for link in list(_OPEN_LINKS):
            link.close(timeout=timeout)


@contextmanager
def stop_on_signals() -> Iterator[StopSignals]:
    """Install the SIGINT/SIGTERM handlers of :class:`StopSignals` around a run (main thread only).

    On the way out after a signal every open session is told BYE, so the provider frees it at once instead of
    at its idle timeout. The previous handlers come back afterwards.
    """
    if threading.current_thread() is not threading.main_thread():
        yield STOP
        return
    STOP.reset()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, STOP.handle)
    STOP.installed = True
    try:
        yield STOP
    except BaseException:
        if STOP.requested:
            say_goodbye()
        raise
    finally:
        STOP.installed = False
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def reporting(*reporters: Reporter) -> Iterator[None]:
    """Hand every training step of the runs inside to ``reporters`` (``--report-to``), then close them."""
    _REPORTERS.extend(reporters)
    try:
        yield
    finally:
        for r in reporters:
            _REPORTERS.remove(r)


class _AbortAware:
    """A channel that refuses to go on once a run was aborted (see :class:`StopSignals`)."""

    def __init__(self, channel: FrameChannel) -> None:
        self.inner = channel

    def send(self, frames: Any) -> None:
        STOP.check_aborted()
        self.inner.send(frames)

    def recv(self, timeout: float) -> Any:
        frames = self.inner.recv(timeout)
        STOP.check_aborted()
        return frames

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if callable(close):
            close()


# ------------------------------------------------------------------------------------------------ retry ladder
FATAL: tuple[type[Exception], ...] = (HandshakeRejected, ConfigError)
KEY_MISMATCH: tuple[type[Exception], ...] = (PeerRejected, ProviderKeyMismatch, MechanismMismatch)
STOPS: tuple[type[Exception], ...] = (ProviderShuttingDown, RateLimited)
RETRIED: tuple[type[Exception], ...] = (TransportError, RemoteError)


class Verdict(Enum):
    """What the ladder does with an exception."""

    RAISE = "raise"  # retrying cannot change it (a refusal, a configuration error, not ours): raise at once
    SAVE_AND_RAISE = "save-and-raise"  # the channel's key or mechanism does not match: keep what was trained, raise
    STOP = "stop"  # the provider said why it cannot serve now: stop with the checkpoint and say why
    REFETCH = "refetch"  # content failed its signed digest (its partial copy is gone): fetch again at once
    RETRY = "retry"  # the channel or the peer failed: reconnect with back-off


class Link(Protocol):
    """A provider session the ladder can (re)open before an attempt and forget after a failure."""

    def ensure_open(self) -> None: ...

    def drop(self) -> None: ...


class StopPolicy(Protocol):
    """What a design saves and tells the user when the ladder gives up."""

    def before_raise(self) -> None:
        """Called before a key or mechanism mismatch is raised."""
        ...

    def stopped(self, what: str, why: str) -> Exception:
        """The exception for a provider that said it cannot serve now (shutting down, rate limit)."""
        ...

    def gave_up(self, what: str, attempts: int, exc: Exception) -> Exception | None:
        """The exception once every attempt failed; ``None`` re-raises ``exc`` itself."""
        ...


@dataclass
class RetryLadder:
    """Attempts with doubling back-off (``first_delay_s``, x2, capped at ``max_delay_s``) around one request.

    ``retries`` is the number of attempts after the first. ``refetch`` names exceptions retried at once on the
    same session (Offline: a file whose digest did not match the signed manifest is fetched again).
    """

    retries: int = 3
    first_delay_s: float = 0.5
    max_delay_s: float = 8.0
    refetch: tuple[type[Exception], ...] = ()
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ConfigError(f"--retries must be 0 or more (got {self.retries})")

    @property
    def attempts(self) -> int:
        return self.retries + 1

    def backoff(self, n: int) -> float:
        """The wait before the ``n``-th reconnection (0-based)."""
        return min(self.first_delay_s * 2.0**n, self.max_delay_s)

    def verdict(self, exc: BaseException) -> Verdict:
        if isinstance(exc, FATAL):
            return Verdict.RAISE
        if isinstance(exc, KEY_MISMATCH):
            return Verdict.SAVE_AND_RAISE
        if isinstance(exc, STOPS):
            return Verdict.STOP
        if self.refetch and isinstance(exc, self.refetch):
            return Verdict.REFETCH
        if isinstance(exc, RETRIED):
            return Verdict.RETRY
        return Verdict.RAISE

    def run(self, fn: Callable[[], T], what: str, *, link: Link, stop: StopPolicy) -> T:
        """``fn()`` on an open session of ``link``; ``what`` names the request in messages ("step 7")."""
        backoffs = 0
        for attempt in range(self.attempts):
            last = attempt == self.retries
            try:
                link.ensure_open()
                return fn()
            except Exception as exc:
                verdict = self.verdict(exc)
                if verdict is Verdict.RAISE:
                    raise
                if verdict is Verdict.SAVE_AND_RAISE:
                    stop.before_raise()
                    raise
                if verdict is Verdict.STOP:
                    link.drop()
                    why = (
                        "the provider is shutting down (its operator stopped it)"
                        if isinstance(exc, ProviderShuttingDown)
                        else str(exc)
                    )
                    log.warning("%s: %s", what, why)
                    raise stop.stopped(what, why) from None
                if verdict is Verdict.REFETCH:
                    if last:
                        raise
                    log.warning("%s: %s", what, exc)
                    continue
                log.warning("%s failed (%s); attempt %d of %d", what, exc, attempt + 1, self.attempts)
                link.drop()
                if last:
                    replacement = stop.gave_up(what, self.attempts, exc)
                    if replacement is None:
                        raise
                    raise replacement from None
                self.sleep(self.backoff(backoffs))
                backoffs += 1
        raise AssertionError("unreachable")


@dataclass
class CheckpointOnStop:
    """Online/Gradfree: stopping saves the checkpoint at the data position *before* the failed step.

    ``--resume`` then continues with no lost or repeated step. Before anything was trained there is nothing to
    save, and a failure to connect is raised as it is (it says what is wrong with the address or keys).
    """

    save: Callable[[], None]
    step: Callable[[], int]
    resumed_from: int
    directory: Path

    def _nothing_trained(self) -> bool:
        return self.step() == 0 and self.resumed_from == 0

    def before_raise(self) -> None:
        if self.step() > 0:
            self.save()

    def stopped(self, what: str, why: str) -> Exception:
        if self._nothing_trained():
            return TrainingInterrupted(
                f"{what} stopped: {why}. Nothing was trained yet, so there is no checkpoint; run the same "
                "command again once the provider is back."
            )
        self.save()
        return TrainingInterrupted(
            f"{what} stopped: {why}. Your checkpoint is at step {self.step()} in {self.directory}; run the same "
            "command with --resume once the provider is back."
        )

    def gave_up(self, what: str, attempts: int, exc: Exception) -> Exception | None:
        if self._nothing_trained():
            return None
        self.save()
        return TrainingInterrupted(
            f"{what} failed after {attempts} attempts: {str(exc).rstrip('.')}. Checkpoint saved at step "
            f"{self.step()} in {self.directory}; run the same command with --resume to continue."
        )


@dataclass
class KeepOutputsOnStop:
    """Offline: what was done is already on disk (partial downloads resume, local training has its checkpoint)."""

    out: Path

    def before_raise(self) -> None:
        pass

    def stopped(self, what: str, why: str) -> Exception:
        return TrainingInterrupted(
            f"{what} stopped: {why}. What was done is kept in {self.out}; run the same command again (with --resume) "
            "once the provider is back."
        )

    def gave_up(self, what: str, attempts: int, exc: Exception) -> Exception | None:
        return TrainingInterrupted(
            f"{what} failed after {attempts} attempts: {exc}. What was done is kept in {self.out}; "
            "run the same command again (with --resume) to continue where it stopped."
        )


# ------------------------------------------------------------------------------------------------ session link
class SessionLink:
    """The client's session with the provider: opened on demand, forgotten after a failure.

    After a failure the provider's old session is gone (or will time out), so the ladder's next attempt opens a
    new one with a fresh HELLO (``hello()`` is asked each time: Online/Gradfree announce the step they resume
    from). ``on_open(session, terms)`` checks the provider's terms and builds what runs over the session.
    ``channel``, when given, is an already connected channel used for the first session.
    """

    def __init__(
        self,
        connect: ChannelFactory,
        hello: Callable[[], Hello],
        *,
        timeout: float,
        stats: WireStats,
        on_open: Callable[[ClientSession, dict[str, Any]], None] | None = None,
        channel: FrameChannel | None = None,
    ) -> None:
        self._connect = connect
        self._hello = hello
        self.timeout = timeout
        self.stats = stats
        self._on_open = on_open
        self._session: ClientSession | None = None
        self._early = channel  # connected before slow work (loading a model), so a wrong address or key fails early

    @property
    def session(self) -> ClientSession:
        if self._session is None:
            raise ChannelClosed("no open session with the provider")
        return self._session

    @property
    def is_open(self) -> bool:
        return self._session is not None

    def ensure_open(self) -> None:
        if self._session is not None:
            return
        channel, self._early = (self._early, None) if self._early is not None else (self._connect(), None)
        if STOP.installed:
            channel = _AbortAware(channel)
        session = ClientSession(channel, timeout=self.timeout, stats=self.stats)
        terms = session.open(self._hello())
        if self._on_open is not None:
            self._on_open(session, terms)
        self._session = session
        _OPEN_LINKS.add(self)

    def drop(self) -> None:
        self._session = None
        _OPEN_LINKS.discard(self)

    def close(self, timeout: float | None = None) -> None:
        """Say BYE (best effort; waiting at most ``timeout`` s for the reply when given) and forget the session."""
        if self._session is not None:
            if timeout is not None:
                self._session.timeout = min(self._session.timeout, timeout)
            self._session.close()
            self._session = None
        _OPEN_LINKS.discard(self)


# ------------------------------------------------------------------------------------------------ checkpoints
class CheckpointedTrainer(Protocol):
    """The trainer state a checkpoint holds (:class:`~guardedp2p.train.trainer.SplitTrainer`)."""

    step: int

    def trainable_state(self) -> dict[str, torch.Tensor]: ...

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class DataPosition(Protocol):
    """A data iterator whose position can be saved and restored (:class:`~guardedp2p.data.collate.BatchIterator`)."""

    def state_dict(self) -> DataState: ...

    def load_state_dict(self, state: DataState) -> None: ...


@dataclass
class Resumed:
    history: list[HistoryRow] = field(default_factory=list)
    step: int = 0  # 0: started fresh
    extra: dict[str, Any] = field(default_factory=dict)  # the checkpoint's ``RunCheckpoint.extra``


@dataclass
class RunCheckpoint:
    """The run's checkpoint folder, tied to what it was made for.

    ``identity`` (protocol plus model fingerprint, or emulator digest) is written into every checkpoint and must
    match on resume: adapters trained against one model must not continue against another. ``mismatch`` says
    what differs in the refusal ("another protocol or model").

    ``extra`` (JSON values) is what the run measured once and needs again when it is resumed, e.g. the untuned
    model's evaluation, taken before the first step (issue 20: a resumed run's ``eval_before`` was NaN because it
    is not measured again). Every save writes it; :meth:`resume` restores it here and in :class:`Resumed`.
    """

    directory: Path
    identity: dict[str, str]
    mismatch: str = "another protocol or model"
    train_config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, trainer: CheckpointedTrainer, data_state: DataState, history: list[HistoryRow]) -> None:
        meta = {**self.identity, "data": data_state, "history": history, "train": self.train_config}
        if self.extra:
            meta["extra"] = self.extra
        save_checkpoint(self.directory, trainer.trainable_state(), trainer.state_dict(), meta)

    def resume(self, trainer: CheckpointedTrainer, iterator: DataPosition) -> Resumed:
        """Restore trainer, data position and history; a fresh start when there is no checkpoint yet."""
        if not has_checkpoint(self.directory):
            log.info("no checkpoint in %s: starting fresh", self.directory)
            return Resumed()
        trainable, tstate, meta = load_checkpoint(self.directory)
        if any(meta.get(k) != v for k, v in self.identity.items()):
            raise CheckpointError(
                f"the checkpoint in {self.directory} is for {self.mismatch}; use a new --out, or --overwrite instead of "
                "--resume to replace that run"
            )
        trainer.load_trainable_state(trainable)
        trainer.load_state_dict(tstate)
        iterator.load_state_dict(meta["data"])
        log.info("resumed from step %d", trainer.step)
        extra = meta.get("extra")
        if isinstance(extra, dict):
            self.extra = {**extra, **self.extra}  # what this run set already wins
        return Resumed(list(meta.get("history", [])), trainer.step, dict(self.extra))


# ------------------------------------------------------------------------------------------------ progress
class StepProgress:
    """A progress bar of training steps with the last task loss, or nothing (``bar`` None)."""

    def __init__(self, bar: Progress | None = None, task: TaskID | None = None) -> None:
        self.bar, self.task = bar, task

    def update(self, completed: int, loss: float) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, completed=completed, loss=f"{loss:.3f}")


@contextmanager
def progress_bar(
    label: str, *, total: int, completed: int, enabled: bool, console: Console | None
) -> Iterator[StepProgress]:
    """A rich progress bar (steps, loss, elapsed and remaining time) when ``enabled``, else a silent one."""
    if not enabled:
        yield StepProgress()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as bar:
        yield StepProgress(bar, bar.add_task(label, total=total, completed=completed, loss="-"))


class PhaseProgress:
    """The progress of a long forward-only phase (evaluation): a bar once the work is counted, else a spinner.

    The phase's code finds it with :func:`current_phase` (it may run inside :func:`status` or not at all) and says
    how much work there is (:meth:`set_total`) and how much is done (:meth:`advance`).
    """

    def __init__(self, bar: Progress | None = None, task: TaskID | None = None) -> None:
        self.bar, self.task = bar, task

    def set_total(self, total: int) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, total=total, completed=0)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.advance(self.task, n)


_PHASES: list[PhaseProgress] = []


def current_phase() -> PhaseProgress:
    """The innermost :func:`status` phase, or an inert one (so phase code never needs to check)."""
    return _PHASES[-1] if _PHASES else PhaseProgress()


@contextmanager
def status(enabled: bool, console: Console | None, text: str) -> Iterator[PhaseProgress]:
    """A progress bar (elapsed and remaining time) for long forward-only phases, when progress display is on.

    Why a bar and not a spinner: evaluation can take most of a short run (the demo's was 150 s of 152), and a
    spinner gave no idea of how long it would last.
    """
    if not enabled:
        yield PhaseProgress()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.table import Column

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}", table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        expand=True,  # the description column takes what the counts and times leave, cut with an ellipsis
    ) as bar:
        phase = PhaseProgress(bar, bar.add_task(text.rstrip("…"), total=None))
        _PHASES.append(phase)
        try:
            yield phase
        finally:
            _PHASES.remove(phase)


# ------------------------------------------------------------------------------------------------ the step loop
class StepTrainer(Protocol):
    step: int

    def train_step(self, micro_batches: list[Batch]) -> StepResult: ...


class BatchSource(DataPosition, Protocol):
    def __next__(self) -> Batch: ...


StepFn = Callable[[list[Batch], DataState], "tuple[StepResult, dict[str, Any]]"]


def history_row(res: StepResult, **extra: Any) -> HistoryRow:
    """One step's line in the run history (losses rounded to 5 decimals)."""
    return {"step": res.step, "loss": round(res.loss, 5), "task_loss": round(res.task_loss, 5), "lr": res.lr, **extra}


def train_steps(
    trainer: StepTrainer,
    iterator: BatchSource,
    *,
    steps: int,
    grad_accum: int,
    device: torch.device,
    history: list[HistoryRow],
    progress: StepProgress,
    step: StepFn | None = None,
    checkpoint_every: int = 0,
    save: Callable[[], None] | None = None,
    after_step: Callable[[], None] | None = None,
) -> None:
    """Train until ``trainer.step == steps``, appending one :func:`history_row` per step.

    ``step(micro_batches, data_state)`` runs one optimizer step and returns its result and extra history fields
    (default: ``trainer.train_step``, no extras); ``data_state`` is the data position before the step, which a
    checkpoint written on its failure must hold. ``save`` runs every ``checkpoint_every`` steps, then ``after_step``.

    Between steps the loop checks :data:`STOP`: after a signal it saves, says BYE and raises :class:`RunStopped`.
    A step abandoned by a second signal (:class:`StepAborted`) is saved as not done: the data position goes back
    to before it (the optimizer had not stepped: the abort lands in the forward/backward or the wire wait).
    Each finished step also goes to the ``--report-to`` reporters (:func:`reporting`).
    """

    def local_step(micro: list[Batch], _: DataState) -> tuple[StepResult, dict[str, Any]]:
        return trainer.train_step(micro), {}

    def stop(aborted: bool) -> RunStopped:
        saved = save is not None and trainer.step > 0
        with _closing():
            if save is not None and saved:
                save()
            say_goodbye()
        log.info("stopped after step %d%s; the provider was told", trainer.step, " (checkpoint saved)" if saved else "")
        signum = STOP.signum if STOP.signum is not None else signal.SIGINT
        return RunStopped(signum, trainer.step, saved=saved, aborted=aborted)

    run_step = step or local_step
    STOP.in_steps = True
    try:
        while trainer.step < steps:
            if STOP.requested:
                raise stop(aborted=STOP.aborted)
            data_state = iterator.state_dict()
            done = trainer.step
            try:
                micro = [{k: v.to(device) for k, v in next(iterator).items()} for _ in range(grad_accum)]
                res, extra = run_step(micro, data_state)
            except StepAborted:
                if trainer.step == done:  # not finished: resume repeats it
                    iterator.load_state_dict(data_state)
                raise stop(aborted=True) from None
            row = history_row(res, **extra)
            history.append(row)
            progress.update(trainer.step, res.task_loss)
            try:
                if save is not None and checkpoint_every and trainer.step % checkpoint_every == 0:
                    save()
                if after_step is not None and not STOP.requested:
                    after_step()
            except StepAborted:
                raise stop(aborted=True) from None
            for reporter in _REPORTERS:
                reporter.log_step(row, seconds=res.seconds)
    finally:
        STOP.in_steps = False


# ------------------------------------------------------------------------------------------------ summary
def primary_metric(metrics: dict[str, float]) -> float:
    """The headline number of an evaluation: accuracy for multiple choice, else the held-out loss."""
    return metrics.get("acc", metrics.get("loss", math.nan))


@dataclass
class Traffic:
    """Bytes a run put on the wire: in all, per message type, and during the training steps only."""

    bytes_up: int = 0
    bytes_down: int = 0
    up_by_type: dict[str, int] = field(default_factory=dict)
    down_by_type: dict[str, int] = field(default_factory=dict)
    train_bytes_up: int = 0
    train_bytes_down: int = 0

    @classmethod
    def of(cls, stats: WireStats, *, train_bytes_up: int = 0, train_bytes_down: int = 0) -> Traffic:
        return cls(
            stats.total_up,
            stats.total_down,
            dict(stats.bytes_up),
            dict(stats.bytes_down),
            train_bytes_up,
            train_bytes_down,
        )


@dataclass
class RunRecord:
    """What every design's summary reports, measured by its run."""

    protocol: str
    model: str
    steps: int
    resumed_from: int
    history: list[HistoryRow]
    eval_kind: str  # "mc" (multiple choice: accuracy) or "loss"
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    train_s: float
    adapter_dir: Path
    started: float  # time.perf_counter() at the start of the run
    train_config: dict[str, Any]


def time_split(train_s: float, *, wait_s: float, codec_s: float, provider_s: float) -> dict[str, float]:
    """Training time split into client compute, provider compute, (de)serialisation, and wire plus queueing.

    ``wait_s`` is the time between sending requests and having their replies, which includes the provider's
    compute (``provider_s``, as it reported it); the rest of the step time is the client's own.
    """
    return {
        "provider_compute_s": round(provider_s, 3),
        "serialisation_s": round(codec_s, 3),
        "wire_s": round(max(0.0, wait_s - provider_s), 3),
        "client_compute_s": round(max(0.0, train_s - wait_s - codec_s), 3),
    }


def build_summary(run: RunRecord, traffic: Traffic, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run summary all designs share (``summary.json``, ``--json``, ``guardedp2p evaluate``, the README).

    ``eval_before``/``eval_after`` are the :func:`primary_metric` of the evaluations (NaN when skipped),
    ``bytes_per_step`` counts the training steps' traffic only, averaged over the steps this run made, and
    ``gradient_bytes`` the GRAD_UP and GRAD_DOWN bytes (zero unless gradients crossed the wire). ``extra`` holds
    the design's own keys.
    """
    h = run.history
    steps_run = max(1, run.steps - run.resumed_from)
    return {
        "protocol": run.protocol,
        "model": run.model,
        "steps": run.steps,
        "resumed_from": run.resumed_from,
        "loss_first": h[0]["task_loss"] if h else math.nan,
        "loss_last": h[-1]["task_loss"] if h else math.nan,
        "eval_metric": "acc" if run.eval_kind == "mc" else "loss",
        "eval_before": primary_metric(run.eval_before) if run.eval_before else math.nan,
        "eval_after": primary_metric(run.eval_after) if run.eval_after else math.nan,
        "eval_before_all": run.eval_before,
        "eval_after_all": run.eval_after,
        "bytes_up": traffic.bytes_up,
        "bytes_down": traffic.bytes_down,
        "train_bytes_up": traffic.train_bytes_up,
        "train_bytes_down": traffic.train_bytes_down,
        "bytes_per_step": (traffic.train_bytes_up + traffic.train_bytes_down) / steps_run,
        "gradient_bytes": traffic.up_by_type.get("GRAD_UP", 0) + traffic.down_by_type.get("GRAD_DOWN", 0),
        "bytes_by_type": {"up": dict(traffic.up_by_type), "down": dict(traffic.down_by_type)},
        **(extra or {}),
        "train_s": round(run.train_s, 3),
        "adapter_dir": str(run.adapter_dir),
        "wall_s": round(time.perf_counter() - run.started, 3),
        "train_config": run.train_config,
        "history": h,
    }


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))


__all__ = [
    "STOP",
    "CheckpointOnStop",
    "KeepOutputsOnStop",
    "Resumed",
    "RetryLadder",
    "RunCheckpoint",
    "RunRecord",
    "RunStopped",
    "SessionLink",
    "StepAborted",
    "StopSignals",
    "PhaseProgress",
    "StepProgress",
    "TrainingInterrupted",
    "Traffic",
    "Verdict",
    "build_summary",
    "current_phase",
    "history_row",
    "primary_metric",
    "progress_bar",
    "reporting",
    "say_goodbye",
    "status",
    "stop_on_signals",
    "time_split",
    "train_steps",
    "write_summary",
]
