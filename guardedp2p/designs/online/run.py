"""The split training run of Online, which Gradfree runs with its own trunk.

The client holds the bottom and top blocks, the provider the trunk (GuardedTuning, arXiv 2501.04323, Online
and Gradfree designs). Each step sends activations up and the trunk output down; Online also sends gradients
both ways, Gradfree trains only the top and asks the provider only for forward passes (which it can cache).
What differs is a :class:`SplitDesign`; the loop, failure handling, resumption and summary are the same code
(:mod:`guardedp2p.service.runner`).

Failures of the channel end in a checkpoint that ``--resume`` continues from, with no lost or repeated step:
the data position saved is the one *before* the step that failed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from guardedp2p.designs.online.client import RemoteTrunk
from guardedp2p.errors import ConfigError, HandshakeRejected
from guardedp2p.protocol.client import ClientSession, FrameChannel, WireStats
from guardedp2p.service.client import (
    ChannelFactory,
    ClientModel,
    TuneOptions,
    check_codecs,
    evaluate_metrics,
    prepare_client,
    prepare_data,
)
from guardedp2p.service.runner import (
    Batch,
    CheckpointOnStop,
    DataState,
    Resumed,
    RetryLadder,
    RunCheckpoint,
    RunRecord,
    SessionLink,
    Traffic,
    build_summary,
    progress_bar,
    status,
    time_split,
    train_steps,
    write_summary,
)
from guardedp2p.wire.handshake import CODEC_DIRECTIONS, Hello

if TYPE_CHECKING:
    from rich.console import Console

    from guardedp2p.privacy.session import SessionPrivacy
    from guardedp2p.train.trainer import SplitTrainer, StepResult, TrunkFn

log = logging.getLogger("guardedp2p.client")

T = TypeVar("T")


@dataclass
class SplitTrunk:
    """The trunk as the trainer calls it, built on one provider session; ``stats`` adds keys to the summary;
    ``step`` (``--micro-batches`` > 1) runs a whole optimizer step with its micro-batches pipelined
    (:class:`guardedp2p.designs.online.pipeline.PipelinedStep`) instead of the trainer's own step."""

    fn: TrunkFn
    stats: Callable[[], dict[str, Any]] = field(default=dict)
    step: Callable[[SplitTrainer, list[Batch]], StepResult] | None = None


@dataclass(frozen=True)
class SplitDesign:
    """What Online and Gradfree differ in."""

    protocol: str
    codec_directions: tuple[str, ...]  # the codecs negotiated in the HELLO
    train_bottom: bool  # LoRA on the bottom blocks too (needs gradients back through the trunk)
    build_trunk: Callable[[TuneOptions, ClientSession, ClientModel], SplitTrunk]


def online_trunk(opts: TuneOptions, session: ClientSession, client: ClientModel) -> SplitTrunk:
    """The provider's trunk as an autograd function: gradients cross the wire both ways."""
    from guardedp2p.designs.online.pipeline import pipelined_step

    remote = RemoteTrunk(session, opts.codecs, gradients=True)

    def fn(h1: torch.Tensor, mask: torch.Tensor, *, train: bool, input_ids: torch.Tensor) -> torch.Tensor:
        return remote(h1, mask, train=train)

    return SplitTrunk(fn, step=pipelined_step(remote, opts.micro_batches))


ONLINE = SplitDesign("online", CODEC_DIRECTIONS, train_bottom=True, build_trunk=online_trunk)


def tune_online(
    opts: TuneOptions, connect: ChannelFactory, *, client: ClientModel | None = None, console: Console | None = None
) -> dict[str, Any]:
    """Run the Online design; return the run summary (also written to ``OUT/summary.json``)."""
    return run_split(ONLINE, opts, connect, client=client, console=console)


# ------------------------------------------------------------------------------------------------ HELLO terms
def wire_codecs(design: SplitDesign, opts: TuneOptions) -> dict[str, str]:
    return {k: v for k, v in opts.codecs.items() if k in design.codec_directions}


def privacy_terms(opts: TuneOptions) -> dict[str, Any]:
    """The defences announced to the provider (and reported in the summary)."""
    privacy: dict[str, Any] = {"dcor_alpha": opts.train.dcor_alpha, "dcor_mode": opts.train.dcor_mode}
    if opts.noise:
        from guardedp2p.privacy.noise import NoiseConfig

        privacy["noise"] = NoiseConfig(**opts.noise).describe()  # never the seed: it would let anyone remove the noise
    if opts.pseudonym:
        privacy["pseudonym"] = pseudonym_terms(opts)
    return privacy


def pseudonym_terms(opts: TuneOptions) -> dict[str, Any]:
    """What a pseudonymising client announces: the fields it substitutes (guardedp2p/privacy/pseudonym.py)."""
    from guardedp2p.privacy.pseudonym import load_schema

    assert opts.pseudonym
    return {"fields": [f for f, _ in load_schema(opts.pseudonym).fields], "mechanism": "keyed permutation per field"}


def split_hello(
    design: SplitDesign, opts: TuneOptions, fingerprint: str, step: int, privacy: dict[str, Any] | None = None
) -> Hello:
    """The HELLO of a split run; ``privacy``: the run's resolved privacy map (default: :func:`privacy_terms`)."""
    return Hello(
        design.protocol,
        fingerprint,
        (opts.bottom_layers, opts.top_layers),
        wire_codecs(design, opts),
        privacy if privacy is not None else privacy_terms(opts),
        resume_from_step=step,
    )


def check_recording(session: ClientSession, terms: dict[str, Any], *, refuse: bool) -> None:
    """Warn when the provider announces that it records the session; end it when the user refuses that."""
    if not terms.get("record"):
        return
    if refuse:
        session.close()
        raise HandshakeRejected(
            "the provider announced that it records what it observes (transcripts), and --refuse-recording is set"
        )
    log.warning("the provider RECORDS what it observes in this session (activations, gradients) for analysis")


def privacy_digest(privacy: SessionPrivacy) -> str:
    """A short digest of a run's mechanisms (noise, preset, dCor, obfuscation): what its checkpoint was made with.
    Not the accountant's ε, which also depends on the number of steps a resumed run may extend."""
    import hashlib
    import json

    ident = {
        "noise": privacy.noise_dict,
        "preset": privacy.preset.name if privacy.preset is not None else "off",
        "dcor": privacy.dcor_alpha,
        "obfuscation": privacy.obfuscation.describe() if privacy.obfuscation is not None else None,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def session_privacy(design: SplitDesign, opts: TuneOptions, client: ClientModel, *, n_records: int) -> SessionPrivacy:
    """The run's :class:`~guardedp2p.privacy.session.SessionPrivacy` from ``--privacy``, ``--noise``, ``--dcor``
    and ``--obfuscate``, with the run's shape for the accountant and a generator on the client's device."""
    from guardedp2p.privacy.noise import token_embedding
    from guardedp2p.privacy.presets import RunShape
    from guardedp2p.privacy.session import resolve_session_privacy

    t = opts.train
    shape = RunShape(
        design.protocol,
        t.steps,
        t.batch_size,
        n_records,
        t.grad_accum,
        t.max_length,
        cached=design.protocol == "gradfree" and opts.cache,
    )
    weight = token_embedding(client.bottom).weight
    if not isinstance(weight, torch.Tensor):
        raise ConfigError("the client's token embedding has no weight tensor")
    pad = client.tokenizer.pad_token_id
    return resolve_session_privacy(
        preset=opts.privacy,
        noise=opts.noise,
        dcor_alpha=t.dcor_alpha,
        obfuscation=opts.obfuscation,
        design=design.protocol,
        shape=shape,
        tokenizer=client.tokenizer,
        bottom=client.bottom if design.train_bottom else None,
        d_model=int(weight.shape[1]),
        public_text=opts.public_text,
        device=client.device,
        pad_id=pad if pad is not None else 0,
    )


def check_split_options(design: SplitDesign, opts: TuneOptions) -> None:
    """Everything about the options that can be refused before connecting or loading a model."""
    if opts.protocol != design.protocol:
        raise ConfigError(f"this runner runs the {design.protocol} design; opts.protocol is {opts.protocol!r}")
    opts.train.validate()
    check_codecs(opts)
    if opts.train.dcor_alpha > 0 and not design.train_bottom:
        raise ConfigError(
            f"--dcor needs a trainable bottom, which the {design.protocol} design freezes; use --noise instead"
        )


# ------------------------------------------------------------------------------------------------ the run
class _TrunkSlot:
    """The trainer's trunk: the one built on the current session (a reconnect builds a new one)."""

    current: SplitTrunk | None = None

    def __call__(self, h1: torch.Tensor, mask: torch.Tensor, *, train: bool, input_ids: torch.Tensor) -> torch.Tensor:
        if self.current is None:
            raise AssertionError("the trunk is used before a session was opened")
        return self.current.fn(h1, mask, train=train, input_ids=input_ids)


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """torch's global generators (CPU and every initialised CUDA device): dropout draws from them."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
    torch.set_rng_state(state[0])
    if state[1]:
        torch.cuda.set_rng_state_all(state[1])


class SplitRun:
    """One Online or Gradfree run: its session, trainer, data position, checkpoint and wire counters."""

    def __init__(
        self,
        design: SplitDesign,
        opts: TuneOptions,
        connect: ChannelFactory,
        client: ClientModel,
        *,
        first_channel: FrameChannel | None = None,
    ) -> None:
        from guardedp2p.data.collate import BatchIterator
        from guardedp2p.engine.split import loss_fn
        from guardedp2p.train.trainer import SplitTrainer

        self.design, self.opts, self.client = design, opts, client
        self.data = prepare_data(opts, client.tokenizer)
        self.iterator = BatchIterator(
            self.data.train_examples, opts.train.batch_size, seed=opts.train.seed, pad_id=client.tokenizer.pad_token_id
        )
        self.privacy = session_privacy(design, opts, client, n_records=len(self.data.train_examples))
        self.privacy.install(client.bottom)  # dχ on the input embeddings: every forward of the run
        cached = design.protocol == "gradfree" and opts.cache  # each record's (noised) activation sent once
        self.privacy_map = self.privacy.block(
            design=design.protocol,
            steps=opts.train.steps,
            batch_size=opts.train.batch_size,
            n_records=len(self.data.train_examples),
            grad_accum=opts.train.grad_accum,
            cached=cached,
            max_tokens=opts.train.max_length,
        )
        if opts.pseudonym:  # the provider's record says which fields were substituted, never how
            self.privacy_map["pseudonym"] = pseudonym_terms(opts)
        # what the trunk builders see: the noise actually applied (a preset's, unless --noise replaced it), and no
        # pipelining when a defence is defined per batch (dCor's estimate, the obfuscation's inner inverter steps)
        micro = opts.micro_batches
        if micro > 1 and (self.privacy.obfuscator is not None or opts.train.dcor_alpha > 0):
            log.info("--micro-batches %d ignored: dCor and the learned obfuscation are defined per batch", micro)
            micro = 1
        self.trunk_opts = replace(opts, noise=self.privacy.noise_dict, micro_batches=micro)
        dcor_fn = None
        if opts.train.dcor_alpha > 0:
            from guardedp2p.privacy.dcor import dcor_penalty

            dcor_fn = dcor_penalty
        self.trunk = _TrunkSlot()
        self.trainer = SplitTrainer(
            client.bottom,
            client.top,
            self.trunk,
            opts.train,
            loss_fn=loss_fn,
            train_bottom=design.train_bottom,
            transform_sent=self.privacy.sent,
            grad_transform=self.privacy.grad if design.train_bottom else None,
            dcor_fn=dcor_fn,
            obfuscation=self.privacy.obfuscator,
        )
        self.wire = WireStats()
        self.link = SessionLink(
            connect,
            lambda: split_hello(design, opts, client.fingerprint, self.trainer.step, self.privacy_map),
            timeout=opts.timeout,
            stats=self.wire,
            on_open=self._on_open,
            channel=first_channel,
        )
        self.checkpoint = RunCheckpoint(
            Path(opts.out) / "checkpoint",
            # the protection is part of what the checkpoint was made for: resuming under other settings would
            # make the summary's privacy map (and its epsilon) describe a run that did not happen
            {"protocol": opts.protocol, "fingerprint": client.fingerprint, "privacy": privacy_digest(self.privacy)},
            train_config=opts.train.to_dict(),
            mismatch="another protocol, model or privacy setting (--privacy, --noise, --dcor, --obfuscate)",
        )
        resumed = self.checkpoint.resume(self.trainer, self.iterator) if opts.resume else Resumed()
        self.resumed_from, self.history = resumed.step, resumed.history
        self.resumed_extra = resumed.extra  # what the interrupted run measured once (its untuned evaluation)
        self.ladder = RetryLadder(opts.retries)
        self.train_bytes = [0, 0]  # up, down during the training steps
        self.plugged: dict[str, Any] | None = None  # ACCEPT's plugged trunk for this key, if any

    def _on_open(self, session: ClientSession, terms: dict[str, Any]) -> None:
        check_recording(session, terms, refuse=self.opts.refuse_recording)
        announced = terms.get("plugged")
        plugged = (
            {k: announced[k] for k in ("bundle", "blocks") if k in announced} if isinstance(announced, dict) else None
        )
        if plugged and plugged != self.plugged:  # said once per trunk, not on every reconnect
            # the provider runs a trunk with this key's earlier (Offline) adapters plugged in: what is tuned now
            # builds on that trunk, so the adapter saved at the end needs it too (docs/user-guide.md, Generation)
            log.warning(
                "the provider serves your key a trunk with adapter bundle %s… plugged in (trunk blocks %s): the "
                "adapter this run saves is tuned on top of it and needs that trunk, not the base model's; the "
                "summary records it as provider_trunk",
                str(plugged.get("bundle", "?"))[:16],
                plugged.get("blocks", "?"),
            )
            self.plugged = plugged
        self.trunk.current = self.design.build_trunk(self.trunk_opts, session, self.client)

    def save(self, data_state: DataState | None = None) -> None:
        at = self.iterator.state_dict() if data_state is None else data_state
        self.checkpoint.save(self.trainer, at, self.history)

    def guarded(self, fn: Callable[[], T], what: str, data_state: DataState | None = None) -> T:
        """``fn`` under the retry ladder; a stop saves the checkpoint at ``data_state`` (default: now)."""
        at = self.iterator.state_dict() if data_state is None else data_state
        stop = CheckpointOnStop(
            lambda: self.save(at), lambda: self.trainer.step, self.resumed_from, self.checkpoint.directory
        )
        mark, rng = self.privacy.mark(), _rng_state()

        def again() -> T:
            # a retry recomputes exactly what the failed attempt sent: the noise draws already released
            # (SessionPrivacy.mark) and the dropout masks, so the provider sees the same tensors, not a new view
            self.privacy.rewind(mark)
            _set_rng_state(rng)
            return fn()

        return self.ladder.run(again, what, link=self.link, stop=stop)

    def evaluate(self) -> dict[str, float]:
        c = self.client
        return self.guarded(
            lambda: evaluate_metrics(self.trainer.logits_fn, self.data, c.tokenizer, self.opts, c.device), "evaluation"
        )

    def step(self, micro: list[Batch], data_state: DataState) -> tuple[StepResult, dict[str, Any]]:
        """One optimizer step through the provider, with the bytes it put on the wire."""

        def attempt() -> tuple[StepResult, int, int]:
            up, down = self.wire.total_up, self.wire.total_down
            pipelined = self.trunk.current.step if self.trunk.current is not None else None
            res = pipelined(self.trainer, micro) if pipelined is not None else self.trainer.train_step(micro)
            return res, self.wire.total_up - up, self.wire.total_down - down

        res, bu, bd = self.guarded(attempt, f"step {self.trainer.step + 1}", data_state)
        self.train_bytes[0] += bu
        self.train_bytes[1] += bd
        extra: dict[str, Any] = {"dcor": round(res.dcor, 5), "bytes_up": bu, "bytes_down": bd}
        if self.privacy.obfuscator is not None:
            extra["obfuscation"] = round(res.obfuscation, 5)  # the penalty: 0 when the client's inverter is at chance
        return res, extra

    def evaluate_between(self) -> None:
        every, step = self.opts.train.eval_every, self.trainer.step
        if every and step % every == 0 and step < self.opts.train.steps:
            self.history[-1]["eval"] = self.evaluate()

    def train(self, console: Console | None) -> tuple[float, dict[str, float]]:
        """All remaining steps; returns the training time and its split (client, provider, codec, wire)."""
        opts, w = self.opts, self.wire
        t0, wait0, codec0, prov0 = time.perf_counter(), w.wait_s, w.codec_s, w.provider_s
        with progress_bar(
            f"{opts.protocol} tuning",
            total=opts.train.steps,
            completed=self.trainer.step,
            enabled=opts.progress,
            console=console,
        ) as bar:
            train_steps(
                self.trainer,
                self.iterator,
                steps=opts.train.steps,
                grad_accum=opts.train.grad_accum,
                device=self.client.device,
                history=self.history,
                progress=bar,
                step=self.step,
                checkpoint_every=opts.train.checkpoint_every,
                save=self.save,
                after_step=self.evaluate_between,
            )
        train_s = time.perf_counter() - t0
        split = time_split(
            train_s, wait_s=w.wait_s - wait0, codec_s=w.codec_s - codec0, provider_s=w.provider_s - prov0
        )
        return train_s, split

    def summary(
        self,
        started: float,
        eval_before: dict[str, float],
        eval_after: dict[str, float],
        train_s: float,
        split: dict[str, float],
        adapter_dir: Path,
    ) -> dict[str, Any]:
        opts, w = self.opts, self.wire
        record = RunRecord(
            opts.protocol,
            opts.model,
            self.trainer.step,
            self.resumed_from,
            self.history,
            self.data.eval_kind,
            eval_before,
            eval_after,
            train_s,
            adapter_dir,
            started,
            opts.train.to_dict(),
        )
        traffic = Traffic.of(w, train_bytes_up=self.train_bytes[0], train_bytes_down=self.train_bytes[1])
        extra = {
            "rate_limited": w.rate_limited,  # requests the provider's per-client rate limit made us send again
            "rate_limited_wait_s": round(w.rate_limited_wait_s, 4),
            "codecs": wire_codecs(self.design, opts),
            "privacy": self.privacy_map,
            "client_cost": self.trainer.client_cost(),
            "micro_batches": opts.micro_batches,
            "time_split": split,  # training steps only: client compute, provider compute, (de)serialisation, wire
            "fingerprint": self.client.fingerprint,
            "provider_trunk": {"plugged": self.plugged} if self.plugged else "base",
            **(self.trunk.current.stats() if self.trunk.current else {}),
        }
        return build_summary(record, traffic, extra)


def run_split(
    design: SplitDesign,
    opts: TuneOptions,
    connect: ChannelFactory,
    *,
    client: ClientModel | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run a whole split fine-tuning of ``design``; return the summary (also written to ``OUT/summary.json``)."""

    check_split_options(design, opts)
    started = time.perf_counter()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    # connect (CURVE handshake: wrong address or keys fail here) before spending time on loading the model
    channel = connect()
    run = SplitRun(design, opts, connect, client or prepare_client(opts), first_channel=channel)
    try:
        return _run_split(run, opts, out, started, console)
    finally:
        run.privacy.remove()  # the dχ hook leaves the client's bottom with the run


def _run_split(run: SplitRun, opts: TuneOptions, out: Path, started: float, console: Console | None) -> dict[str, Any]:
    from guardedp2p.engine.lora import save_adapter

    run.guarded(lambda: None, "opening the session")
    eval_before: dict[str, float] = dict(run.resumed_extra.get("eval_before") or {}) if run.resumed_from else {}
    if not opts.skip_eval and run.resumed_from == 0:
        with status(opts.progress, console, "evaluating the untuned model (forward passes through the provider)…"):
            eval_before = run.evaluate()
        run.checkpoint.extra["eval_before"] = eval_before  # a resumed run reports it instead of NaN
    train_s, split = run.train(console)
    run.save()
    with status(opts.progress, console, "evaluating the tuned model…"):
        eval_after = {} if opts.skip_eval else run.evaluate()
    adapter_dir = out / "adapter"
    save_adapter(
        run.client.bottom,
        run.client.top,
        adapter_dir,
        base_model_name_or_path=opts.model,
        top_blocks=opts.train.top_train == "blocks",
    )
    run.link.close()  # BYE, counted in the summary's bytes
    summary = run.summary(started, eval_before, eval_after, train_s, split, adapter_dir)
    write_summary(out, summary)
    return summary


__all__ = [
    "ONLINE",
    "SplitDesign",
    "SplitRun",
    "SplitTrunk",
    "check_recording",
    "online_trunk",
    "privacy_terms",
    "pseudonym_terms",
    "run_split",
    "session_privacy",
    "split_hello",
    "tune_online",
    "wire_codecs",
]
