"""Client assembly and the ``tune`` run shared by the CLI, the demo, the examples and the benchmarks.

``tune`` takes a *channel factory* rather than an address: the in-process channel (tests, simulations) and
the ZeroMQ channel (deployment) run exactly the same code. Failures of the channel end in a checkpoint that
``--resume`` continues from, with no lost or repeated step: the data position saved is the one *before* the
step that failed.

Two provider answers end a run at once, with that checkpoint, instead of being retried: "provider-shutting-down"
(its operator stopped it; reconnecting within seconds cannot succeed, and the user should learn why now rather
than after the retries) and a rate limit that outlasted the session's own waiting (see ClientSession).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from guardedp2p.errors import (
    ConfigError,
    HandshakeRejected,
    ProviderShuttingDown,
    RateLimited,
    RemoteError,
    TransportError,
)
from guardedp2p.protocol.client import ClientSession, WireStats
from guardedp2p.train.config import TrainConfig
from guardedp2p.transport.base import MechanismMismatch, PeerRejected, ProviderKeyMismatch
from guardedp2p.wire.handshake import CODEC_DIRECTIONS, Hello

log = logging.getLogger("guardedp2p.client")

ChannelFactory = Callable[[], Any]


class TrainingInterrupted(TransportError):
    """The provider went away mid-run; the message says where the checkpoint is and how to resume."""


@dataclass
class TuneOptions:
    protocol: str = "online"
    model: str = "default"
    data: str | None = None  # None: the shipped demo records
    eval_data: str | None = None  # None: the shipped demo multiple-choice task (when data is None)
    out: str = "runs/tune"
    train: TrainConfig = field(default_factory=TrainConfig)
    bottom_layers: int = 2
    top_layers: int = 2
    codecs: dict[str, str] = field(default_factory=lambda: {d: "fp32" for d in CODEC_DIRECTIONS})
    noise: dict[str, Any] = field(default_factory=dict)  # NoiseConfig fields; empty: none
    resume: bool = False
    timeout: float = 30.0
    retries: int = 3
    cache: bool = True  # gradfree: trunk-output cache
    device: str = "auto"
    dtype: str | None = None  # fp32|bf16|fp16 of the client's frozen weights (LoRA stays fp32); None: fp32 when loading
    eval_batch_size: int = 8
    eval_max_items: int | None = None
    skip_eval: bool = False
    progress: bool = True
    refuse_recording: bool = False  # end the session if the provider announces transcript recording


@dataclass
class ClientModel:
    """The client's parts of the model, ready to train."""

    model: Any
    tokenizer: Any
    bottom: torch.nn.Module
    top: torch.nn.Module
    fingerprint: str
    split: Any
    device: torch.device


def prepare_client(opts: TuneOptions, *, model: Any = None, tokenizer: Any = None) -> ClientModel:
    """Load the model (unless given), cut out the client parts, fingerprint them, attach LoRA.

    A model loaded here is read on the CPU in the checkpoint's own precision, fingerprinted, split, and only
    then are the client's parts cast to ``opts.dtype`` and moved to the device: the trunk's weights never reach
    the GPU, an fp16 checkpoint is not doubled in RAM on the way, and the fingerprint is the same whatever
    ``dtype`` each party runs in. A model passed in stays on its device and dtype unless ``opts.dtype`` is set.
    LoRA weights are kept in fp32 in every case (AdamW updates underflow in fp16/bf16).
    """
    from guardedp2p.engine.device import pick_device
    from guardedp2p.engine.fingerprint import model_fingerprint
    from guardedp2p.engine.loading import load_causal_lm
    from guardedp2p.engine.lora import LoraSettings, attach_lora
    from guardedp2p.engine.placement import cast_floating_parameters, parse_dtype
    from guardedp2p.engine.split import SplitConfig, build_client_parts

    device = pick_device(opts.device)
    dtype = parse_dtype(opts.dtype) if opts.dtype else None
    loaded_here = model is None
    if model is None:
        model, tokenizer = load_causal_lm(opts.model, device="cpu", dtype="auto")
        dtype = dtype or torch.float32
    split = SplitConfig(bottom_layers=opts.bottom_layers, top_layers=opts.top_layers)
    fingerprint = model_fingerprint(model, split)  # over pre-trained weights, before any adapter exists
    parts = build_client_parts(model, split)
    for p in model.parameters():
        p.requires_grad_(False)
    # keep no reference to the full model: the trunk's weights are then freed (the parts hold placeholders)
    del model
    import gc

    gc.collect()
    for part in parts:
        if dtype is not None:
            cast_floating_parameters(part, dtype)
        if loaded_here:
            part.to(device)
    cfg = opts.train
    settings = LoraSettings(
        r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.lora_targets
    )
    train_bottom = opts.protocol != "gradfree"
    torch.manual_seed(cfg.seed)
    for p in attach_lora(parts.bottom, parts.top, settings, bottom=train_bottom, top=True):
        if p.dtype != torch.float32:
            p.data = p.data.float()
    return ClientModel(None, tokenizer, parts.bottom, parts.top, fingerprint, split, device)


@dataclass
class PreparedData:
    train_examples: list[dict[str, list[int]]]
    eval_kind: str  # "mc" or "loss"
    eval_items: list[dict[str, Any]]
    eval_examples: list[dict[str, list[int]]]


def prepare_data(opts: TuneOptions, tokenizer: Any) -> PreparedData:
    """Load and tokenize the training data and pick the evaluation (multiple choice if given, else held-out loss)."""
    from guardedp2p.data.demo import demo_paths
    from guardedp2p.data.loaders import load_data
    from guardedp2p.data.tokenize import DataConfig, encode_records

    paths = demo_paths() if opts.data is None else None
    train_path = opts.data or paths.train
    eval_path = opts.eval_data or (paths.eval_mc if paths is not None else None)
    loaded = load_data(train_path)
    examples = encode_records(loaded.records, tokenizer, DataConfig(max_length=opts.train.max_length), kind=loaded.kind)
    if not examples:
        raise ConfigError(f"{train_path} produced no training example (all records too long or empty?)")
    eval_examples: list[dict[str, list[int]]] = []
    eval_items: list[dict[str, Any]] = []
    eval_kind = "loss"
    if eval_path:
        ev = load_data(eval_path)
        if ev.kind == "mc":
            eval_kind, eval_items = "mc", ev.records[: opts.eval_max_items] if opts.eval_max_items else ev.records
        else:
            eval_examples = encode_records(
                ev.records, tokenizer, DataConfig(max_length=opts.train.max_length), kind=ev.kind
            )
    if eval_kind == "loss" and not eval_examples:
        n_hold = max(1, min(32, len(examples) // 10))
        eval_examples, examples = examples[-n_hold:], examples[:-n_hold]
    return PreparedData(examples, eval_kind, eval_items, eval_examples)


def _evaluate(
    trainer: Any, data: PreparedData, tokenizer: Any, opts: TuneOptions, device: torch.device
) -> dict[str, float]:
    from guardedp2p.data.collate import collate
    from guardedp2p.data.mc_eval import evaluate_loss, evaluate_mc

    def logits_fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return trainer.logits_fn(ids.to(device), mask.to(device))

    out: dict[str, float] = {}
    if data.eval_kind == "mc":
        res = evaluate_mc(
            logits_fn, tokenizer, data.eval_items, batch_size=opts.eval_batch_size, max_length=opts.train.max_length
        )
        out["acc"] = float(res["acc"])
        out["acc_norm"] = float(res["acc_norm"])
    if data.eval_examples:
        bs = opts.eval_batch_size
        batches = [
            collate(data.eval_examples[i : i + bs], tokenizer.pad_token_id)
            for i in range(0, len(data.eval_examples), bs)
        ]
        out["loss"] = float(evaluate_loss(logits_fn, batches))
    return out


def _status(opts: TuneOptions, console: Any, text: str) -> Any:
    """A spinner for long forward-only phases (evaluation), when progress display is on."""
    from contextlib import nullcontext

    if not opts.progress:
        return nullcontext()
    from rich.console import Console

    return (console or Console(stderr=True)).status(text)


def _check_codecs(opts: TuneOptions) -> None:
    """Refuse unknown codec names before loading anything (the provider would refuse them only later)."""
    from guardedp2p.wire.handshake import FLOAT_CODECS

    for direction, codec in opts.codecs.items():
        if codec not in FLOAT_CODECS:
            raise ConfigError(f"unknown codec {codec!r} for {direction}: use one of {', '.join(FLOAT_CODECS)}")


def _primary(metrics: dict[str, float]) -> float:
    return metrics.get("acc", metrics.get("loss", math.nan))


def build_trunk_fn(opts: TuneOptions, session: ClientSession, client: ClientModel) -> Any:
    from guardedp2p.designs.gradfree.client import CachedRemoteTrunk, TrunkOutputCache
    from guardedp2p.designs.online.client import RemoteTrunk

    if opts.protocol == "online":
        remote = RemoteTrunk(session, opts.codecs, gradients=True)
        return lambda h1, mask, *, train, input_ids: remote(h1, mask, train=train)
    remote = RemoteTrunk(session, {k: v for k, v in opts.codecs.items() if k in ("up", "down")}, gradients=False)
    noisy = bool(opts.noise) and opts.noise.get("kind", "none") != "none"
    cache = None
    if opts.cache and not noisy:
        cache = TrunkOutputCache(Path(opts.out) / "trunk_cache", client.fingerprint, opts.codecs["down"])
    return CachedRemoteTrunk(remote, cache)


def _hello(opts: TuneOptions, client: ClientModel, start_step: int) -> Hello:
    codecs = dict(opts.codecs) if opts.protocol == "online" else {k: opts.codecs[k] for k in ("up", "down")}
    privacy: dict[str, Any] = {"dcor_alpha": opts.train.dcor_alpha, "dcor_mode": opts.train.dcor_mode}
    if opts.noise:
        from guardedp2p.privacy.noise import NoiseConfig

        privacy["noise"] = NoiseConfig(**opts.noise).describe()  # never the seed: it would let anyone remove the noise
    return Hello(
        opts.protocol,
        client.fingerprint,
        (opts.bottom_layers, opts.top_layers),
        codecs,
        privacy,
        resume_from_step=start_step,
    )


def _noise_transform(opts: TuneOptions) -> Callable[[torch.Tensor], torch.Tensor] | None:
    from guardedp2p.engine.device import pick_device

    if not opts.noise or opts.noise.get("kind", "none") == "none":
        return None
    from guardedp2p.privacy.noise import NoiseConfig, add_activation_noise

    cfg = NoiseConfig(**opts.noise)
    gen = cfg.make_generator(pick_device(opts.device))  # OS entropy unless the user fixed a seed
    return lambda h: add_activation_noise(h, cfg, gen)


def tune(
    opts: TuneOptions,
    connect: ChannelFactory,
    *,
    client: ClientModel | None = None,
    console: Any = None,
) -> dict[str, Any]:
    """Run a whole Online or Gradfree fine-tuning; return the run summary (also written to ``out/summary.json``)."""
    from guardedp2p.data.collate import BatchIterator
    from guardedp2p.engine.lora import save_adapter
    from guardedp2p.engine.split import loss_fn
    from guardedp2p.train.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
    from guardedp2p.train.trainer import SplitTrainer

    if opts.protocol not in ("online", "gradfree"):
        raise ConfigError(f"tune() runs online or gradfree; use the offline runner for {opts.protocol!r}")
    opts.train.validate()
    _check_codecs(opts)
    wall0 = time.perf_counter()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoint"
    # connect (CURVE handshake: wrong address or keys fail here) before spending time on loading the model
    early_channel: list[Any] = [connect()]
    client = client or prepare_client(opts)
    data = prepare_data(opts, client.tokenizer)
    tok = client.tokenizer
    iterator = BatchIterator(data.train_examples, opts.train.batch_size, seed=opts.train.seed, pad_id=tok.pad_token_id)

    dcor_fn = None
    if opts.train.dcor_alpha > 0:
        if opts.protocol == "gradfree":
            raise ConfigError("--dcor needs a trainable bottom, which the gradfree design freezes; use --noise instead")
        from guardedp2p.privacy.dcor import dcor_penalty

        dcor_fn = dcor_penalty

    state: dict[str, Any] = {"session": None, "trunk": None}
    wire_stats = WireStats()

    def open_session() -> ClientSession:
        channel = early_channel.pop() if early_channel else connect()
        session = ClientSession(channel, timeout=opts.timeout, stats=wire_stats)
        terms = session.open(_hello(opts, client, trainer_step()))
        if terms.get("record"):
            if opts.refuse_recording:
                session.close()
                raise HandshakeRejected(
                    "the provider announced that it records what it observes (transcripts), and --refuse-recording is set"
                )
            log.warning("the provider RECORDS what it observes in this session (activations, gradients) for analysis")
        state["session"] = session
        state["trunk"] = build_trunk_fn(opts, session, client)
        return session

    trainer_ref: dict[str, Any] = {}

    def trainer_step() -> int:
        return trainer_ref["t"].step if "t" in trainer_ref else 0

    def trunk_proxy(h1: torch.Tensor, mask: torch.Tensor, *, train: bool, input_ids: torch.Tensor) -> torch.Tensor:
        return state["trunk"](h1, mask, train=train, input_ids=input_ids)

    trainer = SplitTrainer(
        client.bottom,
        client.top,
        trunk_proxy,
        opts.train,
        loss_fn=loss_fn,
        train_bottom=opts.protocol == "online",
        transform_sent=_noise_transform(opts),
        dcor_fn=dcor_fn,
    )
    trainer_ref["t"] = trainer
    resumed_from = 0
    history: list[dict[str, Any]] = []
    if opts.resume and has_checkpoint(ckpt_dir):
        trainable, tstate, meta = load_checkpoint(ckpt_dir)
        if meta.get("protocol") != opts.protocol or meta.get("fingerprint") != client.fingerprint:
            raise ConfigError(
                f"the checkpoint in {ckpt_dir} is for another protocol or model; use a new --out or drop --resume"
            )
        trainer.load_trainable_state(trainable)
        trainer.load_state_dict(tstate)
        iterator.load_state_dict(meta["data"])
        history = meta.get("history", [])
        resumed_from = trainer.step
        log.info("resumed from step %d", resumed_from)
    elif opts.resume:
        log.info("no checkpoint in %s: starting fresh", ckpt_dir)

    def checkpoint(data_state: dict[str, Any]) -> None:
        save_checkpoint(
            ckpt_dir,
            trainer.trainable_state(),
            trainer.state_dict(),
            {
                "protocol": opts.protocol,
                "fingerprint": client.fingerprint,
                "data": data_state,
                "history": history,
                "train": opts.train.to_dict(),
            },
        )

    def with_retries(fn: Callable[[], Any], what: str, data_state: dict[str, Any]) -> Any:
        delay = 0.5
        for attempt in range(opts.retries + 1):
            try:
                if state["session"] is None:
                    open_session()
                return fn()
            except (HandshakeRejected, ConfigError):
                raise
            except (PeerRejected, ProviderKeyMismatch, MechanismMismatch):
                # a key or mechanism problem does not go away by retrying: say it at once
                if trainer.step > 0:
                    checkpoint(data_state)
                raise
            except (ProviderShuttingDown, RateLimited) as exc:
                # the provider said why it cannot serve us now: retrying within seconds cannot help, stop and say so
                state["session"] = None
                why = (
                    "the provider is shutting down (its operator stopped it)"
                    if isinstance(exc, ProviderShuttingDown)
                    else str(exc)
                )
                log.warning("%s: %s", what, why)
                if trainer.step == 0 and resumed_from == 0:
                    raise TrainingInterrupted(
                        f"{what} stopped: {why}. Nothing was trained yet, so there is no checkpoint; run the same "
                        "command again once the provider is back."
                    ) from None
                checkpoint(data_state)
                raise TrainingInterrupted(
                    f"{what} stopped: {why}. Your checkpoint is at step {trainer.step} in {ckpt_dir}; run the same "
                    "command with --resume once the provider is back."
                ) from None
            except (TransportError, RemoteError) as exc:
                log.warning("%s failed (%s); attempt %d of %d", what, exc, attempt + 1, opts.retries + 1)
                state["session"] = None
                if attempt == opts.retries:
                    if trainer.step == 0 and resumed_from == 0:
                        raise
                    checkpoint(data_state)
                    raise TrainingInterrupted(
                        f"{what} failed after {opts.retries + 1} attempts: {str(exc).rstrip('.')}. Checkpoint saved at step "
                        f"{trainer.step} in {ckpt_dir}; run the same command with --resume to continue."
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 8.0)
        raise AssertionError("unreachable")

    with_retries(lambda: None, "opening the session", iterator.state_dict())
    eval_before: dict[str, float] = {}
    if not opts.skip_eval and resumed_from == 0:
        with _status(opts, console, "evaluating the untuned model (forward passes through the provider)…"):
            eval_before = with_retries(
                lambda: _evaluate(trainer, data, tok, opts, client.device), "evaluation", iterator.state_dict()
            )

    from contextlib import nullcontext

    progress_ctx: Any = nullcontext()
    task = None
    if opts.progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        progress_ctx = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
    t_train0 = time.perf_counter()
    wait0, codec0, prov0 = wire_stats.wait_s, wire_stats.codec_s, wire_stats.provider_s
    train_bytes_up = train_bytes_down = 0
    with progress_ctx as progress:
        if progress is not None:
            task = progress.add_task(
                f"{opts.protocol} tuning", total=opts.train.steps, completed=trainer.step, loss="-"
            )
        while trainer.step < opts.train.steps:
            data_state = iterator.state_dict()
            micro = [{k: v.to(client.device) for k, v in next(iterator).items()} for _ in range(opts.train.grad_accum)]

            def one_step(micro: list[dict[str, torch.Tensor]] = micro) -> Any:
                u, d = wire_stats.total_up, wire_stats.total_down
                r = trainer.train_step(micro)
                return r, wire_stats.total_up - u, wire_stats.total_down - d

            res, bu, bd = with_retries(one_step, f"step {trainer.step + 1}", data_state)
            train_bytes_up += bu
            train_bytes_down += bd
            history.append(
                {
                    "step": res.step,
                    "loss": round(res.loss, 5),
                    "task_loss": round(res.task_loss, 5),
                    "dcor": round(res.dcor, 5),
                    "lr": res.lr,
                    "bytes_up": bu,
                    "bytes_down": bd,
                }
            )
            if progress is not None:
                progress.update(task, completed=trainer.step, loss=f"{res.task_loss:.3f}")
            if opts.train.checkpoint_every and trainer.step % opts.train.checkpoint_every == 0:
                checkpoint(iterator.state_dict())
            if opts.train.eval_every and trainer.step % opts.train.eval_every == 0 and trainer.step < opts.train.steps:
                m = with_retries(
                    lambda: _evaluate(trainer, data, tok, opts, client.device), "evaluation", iterator.state_dict()
                )
                history[-1]["eval"] = m
    train_s = time.perf_counter() - t_train0
    train_wait, train_codec, train_prov = (
        wire_stats.wait_s - wait0,
        wire_stats.codec_s - codec0,
        wire_stats.provider_s - prov0,
    )
    checkpoint(iterator.state_dict())
    with _status(opts, console, "evaluating the tuned model…"):
        eval_after = (
            {}
            if opts.skip_eval
            else with_retries(
                lambda: _evaluate(trainer, data, tok, opts, client.device), "evaluation", iterator.state_dict()
            )
        )
    adapter_dir = out / "adapter"
    save_adapter(client.bottom, client.top, adapter_dir, base_model_name_or_path=opts.model)
    cache_obj = getattr(state["trunk"], "cache", None)
    state["session"].close()
    stats = wire_stats.as_dict()
    steps_run = max(1, trainer.step - resumed_from)
    client_s = max(0.0, train_s - train_wait - train_codec)
    summary = {
        "protocol": opts.protocol,
        "model": opts.model,
        "steps": trainer.step,
        "resumed_from": resumed_from,
        "loss_first": history[0]["task_loss"] if history else math.nan,
        "loss_last": history[-1]["task_loss"] if history else math.nan,
        "eval_metric": "acc" if data.eval_kind == "mc" else "loss",
        "eval_before": _primary(eval_before) if eval_before else math.nan,
        "eval_after": _primary(eval_after) if eval_after else math.nan,
        "eval_before_all": eval_before,
        "eval_after_all": eval_after,
        "bytes_up": stats["bytes_up"],
        "bytes_down": stats["bytes_down"],
        "train_bytes_up": train_bytes_up,
        "train_bytes_down": train_bytes_down,
        "bytes_per_step": (train_bytes_up + train_bytes_down) / steps_run,
        "gradient_bytes": stats["bytes_up_by_type"].get("GRAD_UP", 0) + stats["bytes_down_by_type"].get("GRAD_DOWN", 0),
        "bytes_by_type": {"up": stats["bytes_up_by_type"], "down": stats["bytes_down_by_type"]},
        "rate_limited": stats["rate_limited"],  # requests the provider's per-client rate limit made us send again
        "rate_limited_wait_s": stats["rate_limited_wait_s"],
        "codecs": dict(opts.codecs) if opts.protocol == "online" else {k: opts.codecs[k] for k in ("up", "down")},
        "privacy": _hello(opts, client, 0).privacy,
        "train_s": round(train_s, 3),
        "time_split": {  # training steps only: client compute, provider compute, (de)serialisation, wire + queueing
            "provider_compute_s": round(train_prov, 3),
            "serialisation_s": round(train_codec, 3),
            "wire_s": round(max(0.0, train_wait - train_prov), 3),
            "client_compute_s": round(client_s, 3),
        },
        "fingerprint": client.fingerprint,
        "adapter_dir": str(adapter_dir),
        "wall_s": round(time.perf_counter() - wall0, 3),
        "train_config": opts.train.to_dict(),
        "history": history,
    }
    if cache_obj is not None:
        summary.update(cache_obj.stats())
    import json

    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
