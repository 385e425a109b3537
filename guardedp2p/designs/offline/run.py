"""The Offline design's client run: download the signed emulator, tune locally, upload the signed adapters.

Wire traffic is one-off: MANIFEST_REQ/CHUNK_REQ (requests naming files and byte ranges, nothing derived from
the data) down, and the adapter bundle UPLOAD up. Training runs the same :class:`SplitTrainer` as Online and
Gradfree, with the emulator's middle as a local trunk, so the numbers are comparable.

The summary carries the five numbers of offsite-tuning (algorithms.md 3.5): ``zero_shot_full``,
``full_finetune`` (the same adapters, seed, data order and steps trained on the full model locally: what the
Online design computes), ``emulator_zero_shot``, ``emulator_finetune`` and ``plug_in``. Three of them need the
full model. The demo model is public, so the client computes them locally; in a real deployment only the
provider can (``guardedp2p.designs.offline.plugin.plug_in`` on the uploaded bundle), and the summary says so.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from guardedp2p.crypto.manifest import DigestMismatchError
from guardedp2p.errors import ConfigError, ProviderShuttingDown, RateLimited, RemoteError, TransportError
from guardedp2p.protocol.client import ClientSession, WireStats
from guardedp2p.service.client import TrainingInterrupted, TuneOptions, _evaluate, _primary, prepare_data
from guardedp2p.wire.handshake import Hello

log = logging.getLogger("guardedp2p.client")

PLUG_IN_NOTE = (
    "zero_shot_full, full_finetune and plug_in need the full model; the demo model is public, so the client "
    "computed them locally. In a real deployment the provider computes plug_in from the uploaded bundle "
    "(guardedp2p.designs.offline.plugin.plug_in) and the client never sees the full model."
)


@dataclass
class OfflineOptions:
    """What the Offline run needs beyond :class:`TuneOptions`."""

    provider_verify_key: Any = None  # the provider's NAME.sign.pub (path or key object), pinned: required
    client_keys: str | None = None  # folder holding the client's NAME.sign.key (signs the bundle); None: a one-off key
    client_key_name: str = "client"
    emulator_dir: str | None = None  # download target (default: OUT/emulator)
    baselines: bool = True  # compute zero_shot_full, full_finetune and plug_in with a local copy of the base model
    chunk_size: int = 4 * 1024 * 1024


def _signing_key(off: OfflineOptions) -> tuple[Any, bool]:
    from guardedp2p.crypto.keys import load_signing_key

    if off.client_keys:
        return load_signing_key(off.client_keys, off.client_key_name), True
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    log.warning("no client signing key given: the adapter bundle is signed with a one-off key (integrity only)")
    return Ed25519PrivateKey.generate(), False


def _metrics_of(
    logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data: Any,
    tok: Any,
    opts: TuneOptions,
    device: torch.device,
) -> dict[str, float]:
    return _evaluate(SimpleNamespace(logits_fn=logits_fn), data, tok, opts, device)


def _full_logits_fn(model: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    from guardedp2p.designs.offline.plugin import logits_fn_of

    return logits_fn_of(model)


def _train(
    trainer: Any,
    iterator: Any,
    steps: int,
    device: torch.device,
    *,
    label: str,
    progress: bool,
    console: Any,
    on_step: Callable[[Any], None] | None = None,
    history: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    history = [] if history is None else history
    ctx: Any = nullcontext()
    if progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        ctx = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
    with ctx as bar:
        task = bar.add_task(label, total=steps, completed=trainer.step, loss="-") if bar is not None else None
        while trainer.step < steps:
            micro = [{k: v.to(device) for k, v in next(iterator).items()} for _ in range(trainer.cfg.grad_accum)]
            res = trainer.train_step(micro)
            history.append(
                {"step": res.step, "loss": round(res.loss, 5), "task_loss": round(res.task_loss, 5), "lr": res.lr}
            )
            if bar is not None:
                bar.update(task, completed=trainer.step, loss=f"{res.task_loss:.3f}")
            if on_step is not None:
                on_step(res)
    return history


def _add_heldout_text(data: Any, tok: Any, opts: TuneOptions) -> None:
    """With a multiple-choice task, also score the token loss of its right answers in context.

    Accuracy on a few dozen items moves in steps of several points; the loss of "question + right answer" is a
    continuous number, and it gives the ppl gap between emulator and plug-in (algorithms.md 3.5).
    """
    if data.eval_kind != "mc" or data.eval_examples:
        return
    from guardedp2p.data.tokenize import DataConfig, encode_lm

    texts = [{"text": f"{it['question']} {it['choices'][int(it['label'])]}"} for it in data.eval_items]
    data.eval_examples = encode_lm(texts, tok, DataConfig(max_length=opts.train.max_length))


def _attach(bottom: Any, top: Any, opts: TuneOptions) -> None:
    from guardedp2p.engine.lora import LoraSettings, attach_lora

    cfg = opts.train
    torch.manual_seed(cfg.seed)  # same LoRA init for the emulator run and the full-model baseline
    attach_lora(
        bottom,
        top,
        LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.lora_targets),
        bottom=True,
        top=True,
    )


def tune_offline(
    opts: TuneOptions,
    connect: Callable[[], Any],
    *,
    console: Any = None,
    offline: OfflineOptions | None = None,
    base_model: Any = None,
    base_tokenizer: Any = None,
) -> dict[str, Any]:
    """Run the whole Offline design; returns the summary (also written to ``OUT/summary.json``).

    ``base_model``/``base_tokenizer``: the public base model for the baselines (loaded from ``opts.model``
    when not given; never handed to the emulator code).
    """
    from guardedp2p.crypto.manifest import key_fingerprint
    from guardedp2p.data.collate import BatchIterator
    from guardedp2p.designs.offline.emulator import load_emulator
    from guardedp2p.designs.offline.transfer import TransferStats, download_emulator, make_adapter_bundle, upload_bundle
    from guardedp2p.engine.lora import save_adapter
    from guardedp2p.engine.split import loss_fn
    from guardedp2p.train.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
    from guardedp2p.train.trainer import SplitTrainer

    off = offline or OfflineOptions()
    if off.provider_verify_key is None:
        raise ConfigError(
            "the offline design needs the provider's public signing key to verify the emulator: pass "
            "OfflineOptions(provider_verify_key=PATH/provider.sign.pub) (CLI: --provider-sign-key)"
        )
    if opts.protocol != "offline":
        raise ConfigError(f"tune_offline() runs the offline design; use tune() for {opts.protocol!r}")
    opts.train.validate()
    wall0 = time.perf_counter()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    emu_dir = Path(off.emulator_dir) if off.emulator_dir else out / "emulator"
    stats = WireStats()
    state: dict[str, Any] = {"session": None}

    def session() -> ClientSession:
        if state["session"] is None:
            s = ClientSession(connect(), timeout=opts.timeout, stats=stats)
            s.open(Hello("offline", "", (opts.bottom_layers, opts.top_layers), {}, {}))
            state["session"] = s
        return state["session"]

    def with_retries(fn: Callable[[ClientSession], Any], what: str) -> Any:
        delay = 0.5
        for attempt in range(opts.retries + 1):
            try:
                return fn(session())
            except DigestMismatchError as exc:
                # a downloaded file did not hash to the signed digest; its partial copy is gone, so retrying refetches it
                if attempt == opts.retries:
                    raise
                log.warning("%s: %s", what, exc)
            except (ProviderShuttingDown, RateLimited) as exc:
                # the provider said why it cannot serve us now: retrying within seconds cannot help
                state["session"] = None
                why = (
                    "the provider is shutting down (its operator stopped it)"
                    if isinstance(exc, ProviderShuttingDown)
                    else str(exc)
                )
                raise TrainingInterrupted(
                    f"{what} stopped: {why}. What was done is kept in {out}; run the same command again (with --resume) "
                    "once the provider is back."
                ) from None
            except (TransportError, RemoteError) as exc:
                log.warning("%s failed (%s); attempt %d of %d", what, exc, attempt + 1, opts.retries + 1)
                state["session"] = None
                if attempt == opts.retries:
                    raise TrainingInterrupted(
                        f"{what} failed after {opts.retries + 1} attempts: {exc}. What was done is kept in {out}; "
                        "run the same command again (with --resume) to continue where it stopped."
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 8.0)
        raise AssertionError("unreachable")

    # ---------------------------------------------------------------- 1. the emulator (one-off download)
    tstats = TransferStats()
    manifest, tstats = with_retries(
        lambda s: download_emulator(
            s,
            emu_dir,
            off.provider_verify_key,
            chunk_size=off.chunk_size,
            progress=opts.progress,
            console=console,
            stats=tstats,
        ),
        "downloading the emulator",
    )
    download_wire = stats.total_down
    if state["session"] is not None:  # local training may outlast the provider's idle timeout: reconnect to upload
        state["session"].close()
        state["session"] = None
    from guardedp2p.engine.device import pick_device

    device = pick_device(opts.device)
    loaded = load_emulator(emu_dir, off.provider_verify_key, device=device)
    emu = loaded.emulator
    split = emu.split
    if (split.bottom_layers, split.top_layers) != (opts.bottom_layers, opts.top_layers):
        log.warning(
            "the emulator fixes the split at %d/%d blocks (asked for %d/%d)",
            split.bottom_layers,
            split.top_layers,
            opts.bottom_layers,
            opts.top_layers,
        )
    tok = loaded.tokenizer
    if tok is None:
        from guardedp2p.engine.loading import load_causal_lm

        if base_tokenizer is None:
            base_model, base_tokenizer = load_causal_lm(opts.model, device=device)
        tok = base_tokenizer
    data = prepare_data(opts, tok)
    _add_heldout_text(data, tok, opts)

    # ---------------------------------------------------------------- 2. local tuning on the emulator
    _attach(emu.bottom, emu.top, opts)
    trainer = SplitTrainer(emu.bottom, emu.top, emu.trunk_fn(), opts.train, loss_fn=loss_fn, train_bottom=True)
    iterator = BatchIterator(data.train_examples, opts.train.batch_size, seed=opts.train.seed, pad_id=tok.pad_token_id)
    ckpt_dir = out / "checkpoint"
    history: list[dict[str, Any]] = []
    resumed_from = 0
    if opts.resume and has_checkpoint(ckpt_dir):
        trainable, tstate, meta = load_checkpoint(ckpt_dir)
        if meta.get("protocol") != "offline" or meta.get("emulator") != manifest.sha256:
            raise ConfigError(
                f"the checkpoint in {ckpt_dir} is for another run or emulator; use a new --out or drop --resume"
            )
        trainer.load_trainable_state(trainable)
        trainer.load_state_dict(tstate)
        iterator.load_state_dict(meta["data"])
        history, resumed_from = list(meta.get("history", [])), trainer.step

    def checkpoint() -> None:
        save_checkpoint(
            ckpt_dir,
            trainer.trainable_state(),
            trainer.state_dict(),
            {
                "protocol": "offline",
                "emulator": manifest.sha256,
                "fingerprint": manifest["fingerprint"],
                "data": iterator.state_dict(),
                "history": history,
                "train": opts.train.to_dict(),
            },
        )

    def on_step(res: Any) -> None:
        if opts.train.checkpoint_every and trainer.step % opts.train.checkpoint_every == 0:
            checkpoint()

    emu_before: dict[str, float] = {}
    if not opts.skip_eval and resumed_from == 0:
        emu_before = _metrics_of(trainer.logits_fn, data, tok, opts, device)
    t_train = time.perf_counter()
    _train(
        trainer,
        iterator,
        opts.train.steps,
        device,
        label="offline tuning (emulator)",
        progress=opts.progress,
        console=console,
        on_step=on_step,
        history=history,
    )
    train_s = time.perf_counter() - t_train
    checkpoint()
    emu_after = {} if opts.skip_eval else _metrics_of(trainer.logits_fn, data, tok, opts, device)
    adapter_dir = out / "adapter"
    save_adapter(emu.bottom, emu.top, adapter_dir, base_model_name_or_path=opts.model)

    # ---------------------------------------------------------------- 3. signed upload of the adapters
    sk, pinned_key = _signing_key(off)
    bundle_dir = out / "bundle"
    bundle = make_adapter_bundle(
        adapter_dir,
        bundle_dir,
        sk,
        emulator_manifest=manifest,
        extra={
            "steps": trainer.step,
            "lr": opts.train.lr,
            "batch_size": opts.train.batch_size,
            "lora_r": opts.train.lora_r,
            "seed": opts.train.seed,
        },
    )
    up0 = stats.total_up
    ack = with_retries(
        lambda s: upload_bundle(s, bundle_dir, chunk_size=off.chunk_size), "uploading the adapter bundle"
    )
    upload_wire = stats.total_up - up0
    if state["session"] is not None:
        state["session"].close()

    # ---------------------------------------------------------------- 4. the five numbers
    five: dict[str, Any] = {
        "emulator_zero_shot": _primary(emu_before) if emu_before else math.nan,
        "emulator_finetune": _primary(emu_after) if emu_after else math.nan,
    }
    all_metrics: dict[str, Any] = {"emulator_zero_shot": emu_before, "emulator_finetune": emu_after}
    baseline_note = PLUG_IN_NOTE
    full_history: list[dict[str, Any]] = []
    if off.baselines and not opts.skip_eval:
        five_more, more_metrics, full_history, baseline_note = _baselines(
            opts, manifest, bundle_dir, sk, data, device, console, base_model, base_tokenizer, tok
        )
        five.update(five_more)
        all_metrics.update(more_metrics)
    else:
        five.update({"zero_shot_full": math.nan, "full_finetune": math.nan, "plug_in": math.nan})
        baseline_note = "baselines skipped; the provider computes plug_in from the uploaded bundle"

    params = dict(manifest.get("params") or {})
    metric = "acc" if data.eval_kind == "mc" else "loss"
    summary: dict[str, Any] = {
        "protocol": "offline",
        "model": opts.model,
        "steps": trainer.step,
        "resumed_from": resumed_from,
        "loss_first": history[0]["task_loss"] if history else math.nan,
        "loss_last": history[-1]["task_loss"] if history else math.nan,
        "eval_metric": metric,
        "eval_before": five["emulator_zero_shot"],
        "eval_after": five["emulator_finetune"],
        "eval_before_all": emu_before,
        "eval_after_all": emu_after,
        **{
            k: five[k]
            for k in ("zero_shot_full", "full_finetune", "emulator_zero_shot", "emulator_finetune", "plug_in")
        },
        "five_numbers_all": all_metrics,
        "utility_gap": five["plug_in"] - five["full_finetune"],  # utility claim: ~ 0
        "ip_gap": five["plug_in"] - five["emulator_finetune"],  # IP claim: plug-in clearly better than the emulator
        "five_numbers_note": baseline_note,
        "heldout_loss": {k: (v or {}).get("loss") for k, v in all_metrics.items()},
        "ppl_gap": _ppl_gap(all_metrics),
        "bytes_up": stats.total_up,
        "bytes_down": stats.total_down,
        "bytes_by_type": {"up": dict(stats.bytes_up), "down": dict(stats.bytes_down)},
        "emulator_bytes": manifest.total_bytes,
        "emulator_download_wire_bytes": download_wire,
        "download": tstats.as_dict(),
        "adapter_upload_bytes": bundle.total_bytes,
        "adapter_upload_wire_bytes": upload_wire,
        "train_bytes_up": 0,
        "train_bytes_down": 0,
        "bytes_per_step": 0.0,
        "gradient_bytes": 0,
        "param_fraction": params.get("fraction_of_full"),
        "params": params,
        "emulator": {
            "layers": manifest["layers"],
            "compression": manifest["compression"],
            "fingerprint": manifest["fingerprint"],
            "manifest_sha256": manifest.sha256,
            "signer": manifest["signer"]["fingerprint"],
        },
        "upload_ack": {k: ack.get(k) for k in ("bundle_id", "verified", "signer", "signer_pinned")},
        "client_signer": key_fingerprint(sk.public_key()),
        "client_signer_persistent": pinned_key,
        "train_s": round(train_s, 3),
        "adapter_dir": str(adapter_dir),
        "bundle_dir": str(bundle_dir),
        "wall_s": round(time.perf_counter() - wall0, 3),
        "train_config": opts.train.to_dict(),
        "history": history,
        "full_finetune_history": full_history,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _ppl_gap(metrics: dict[str, Any]) -> float:
    """PPL(emulator fine-tuned) - PPL(plug-in) on the held-out text (NaN when either is missing)."""
    try:
        return math.exp(metrics["emulator_finetune"]["loss"]) - math.exp(metrics["plug_in"]["loss"])
    except (KeyError, TypeError, OverflowError):
        return math.nan


def _baselines(
    opts: TuneOptions,
    manifest: Any,
    bundle_dir: Path,
    sk: Any,
    data: Any,
    device: torch.device,
    console: Any,
    base_model: Any,
    base_tokenizer: Any,
    tok: Any,
) -> tuple[dict[str, float], dict[str, Any], list[dict[str, Any]], str]:
    """zero_shot_full, full_finetune (same adapters, seed, data order and steps on the full model) and plug_in."""
    from guardedp2p.data.collate import BatchIterator
    from guardedp2p.designs.offline.plugin import plug_in
    from guardedp2p.engine.fingerprint import model_fingerprint
    from guardedp2p.engine.loading import load_causal_lm
    from guardedp2p.engine.split import SplitConfig, build_client_parts, build_trunk, loss_fn
    from guardedp2p.train.trainer import SplitTrainer

    if base_model is None:
        base_model, _ = load_causal_lm(opts.model, device=device)
    split = SplitConfig(**manifest["split"])
    if model_fingerprint(base_model, split) != manifest["fingerprint"]:
        log.warning("the local base model is not the provider's: baselines skipped")
        nan = math.nan
        return (
            {"zero_shot_full": nan, "full_finetune": nan, "plug_in": nan},
            {},
            [],
            "baselines skipped: the local model is not the provider's base model",
        )
    pristine = copy.deepcopy(base_model)
    for p in pristine.parameters():
        p.requires_grad_(False)
    zs = _metrics_of(_full_logits_fn(pristine), data, tok, opts, device)
    # plug-in: exactly what the provider does with the uploaded bundle
    plugged_model = copy.deepcopy(pristine)
    plugged = plug_in(plugged_model, bundle_dir, sk.public_key())
    pi = _metrics_of(_full_logits_fn(plugged.model), data, tok, opts, device)
    del plugged_model, plugged
    # full fine-tuning baseline: the Online design's computation, locally
    ft_model = pristine
    parts = build_client_parts(ft_model, split)
    trunk = build_trunk(ft_model, split)
    _attach(parts.bottom, parts.top, opts)
    trainer = SplitTrainer(
        parts.bottom,
        parts.top,
        lambda h1, mask, *, train, input_ids: trunk(h1, mask),
        opts.train,
        loss_fn=loss_fn,
        train_bottom=True,
    )
    iterator = BatchIterator(data.train_examples, opts.train.batch_size, seed=opts.train.seed, pad_id=tok.pad_token_id)
    hist = _train(
        trainer,
        iterator,
        opts.train.steps,
        device,
        label="baseline: tuning the full model",
        progress=opts.progress,
        console=console,
    )
    ft = _metrics_of(trainer.logits_fn, data, tok, opts, device)
    five = {"zero_shot_full": _primary(zs), "full_finetune": _primary(ft), "plug_in": _primary(pi)}
    return five, {"zero_shot_full": zs, "full_finetune": ft, "plug_in": pi}, hist, PLUG_IN_NOTE
