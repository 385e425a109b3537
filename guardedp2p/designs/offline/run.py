"""The Offline design's client run: download the signed emulator, tune locally, upload the signed adapters.

Wire traffic is one-off: MANIFEST_REQ/CHUNK_REQ (requests naming files and byte ranges, nothing derived from
the data) down, and the adapter bundle UPLOAD up. Training runs the same :class:`SplitTrainer` as Online and
Gradfree, with the emulator's middle as a local trunk, so the numbers are comparable.

The summary carries the five numbers of offsite-tuning (offsite-tuning, Xiao, Lin, Han, arXiv 2302.04870): ``zero_shot_full``,
``full_finetune`` (the same adapters, seed, data order and steps trained on the full model locally: what the
Online design computes), ``emulator_zero_shot``, ``emulator_finetune`` and ``plug_in``. Three of them need the
full model. The demo model is public, so the client computes them locally; in a real deployment only the
provider can (``guardedp2p.designs.offline.plugin.plug_in`` on the uploaded bundle), and the summary says so.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from guardedp2p.crypto.manifest import DigestMismatchError, Manifest
from guardedp2p.designs.offline.transfer import TransferStats
from guardedp2p.errors import ConfigError
from guardedp2p.protocol.client import WireStats
from guardedp2p.service.client import ChannelFactory, PreparedData, TuneOptions, evaluate_metrics, prepare_data
from guardedp2p.service.runner import (
    BatchSource,
    HistoryRow,
    KeepOutputsOnStop,
    Resumed,
    RetryLadder,
    RunCheckpoint,
    RunRecord,
    SessionLink,
    Traffic,
    build_summary,
    primary_metric,
    progress_bar,
    train_steps,
    write_summary,
)
from guardedp2p.wire.handshake import Hello

if TYPE_CHECKING:
    from rich.console import Console

    from guardedp2p.designs.offline.emulator import Emulator
    from guardedp2p.train.trainer import SplitTrainer

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
    # lora: PEFT LoRA on the client blocks; full: train the client blocks themselves (offsite-tuning's adapters,
    # guardedp2p.designs.offline.plugin), with block_lr in place of the LoRA learning rate when given
    adapter: str = "lora"
    block_lr: float | None = None


def _signing_key(off: OfflineOptions) -> tuple[Any, bool]:
    from guardedp2p.crypto.keys import load_signing_key

    if off.client_keys:
        return load_signing_key(off.client_keys, off.client_key_name), True
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    log.warning("no client signing key given: the adapter bundle is signed with a one-off key (integrity only)")
    return Ed25519PrivateKey.generate(), False


def _full_logits_fn(model: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    from guardedp2p.designs.offline.plugin import logits_fn_of

    return logits_fn_of(model)


def _add_heldout_text(data: Any, tok: Any, opts: TuneOptions) -> None:
    """With a multiple-choice task, also score the token loss of its right answers in context.

    Accuracy on a few dozen items moves in steps of several points; the loss of "question + right answer" is a
    continuous number, and it gives the ppl gap between emulator and plug-in (offsite-tuning, Xiao, Lin, Han, arXiv 2302.04870).
    """
    if data.eval_kind != "mc" or data.eval_examples:
        return
    from guardedp2p.data.tokenize import DataConfig, encode_lm

    texts = [{"text": f"{it['question']} {it['choices'][int(it['label'])]}"} for it in data.eval_items]
    data.eval_examples = encode_lm(texts, tok, DataConfig(max_length=opts.train.max_length))


def _attach(bottom: Any, top: Any, opts: TuneOptions, adapter: str = "lora") -> None:
    from guardedp2p.designs.offline.plugin import check_adapter_type, enable_full_blocks
    from guardedp2p.engine.lora import LoraSettings, attach_lora

    if check_adapter_type(adapter) == "full":
        enable_full_blocks(bottom, top)
        return
    cfg = opts.train
    torch.manual_seed(cfg.seed)  # same LoRA init for the emulator run and the full-model baseline
    attach_lora(
        bottom,
        top,
        LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.lora_targets),
        bottom=True,
        top=True,
    )


def _ppl_gap(metrics: dict[str, Any]) -> float:
    """PPL(emulator fine-tuned) - PPL(plug-in) on the held-out text (NaN when either is missing)."""
    try:
        return math.exp(metrics["emulator_finetune"]["loss"]) - math.exp(metrics["plug_in"]["loss"])
    except (KeyError, TypeError, OverflowError):
        return math.nan


def _train_local(
    trainer: SplitTrainer,
    iterator: BatchSource,
    opts: TuneOptions,
    device: torch.device,
    *,
    label: str,
    console: Console | None,
    history: list[HistoryRow] | None = None,
    save: Callable[[], None] | None = None,
) -> list[HistoryRow]:
    """All remaining steps on a local trunk (no wire), with a checkpoint every N steps when ``save`` is given."""
    history = [] if history is None else history
    with progress_bar(
        label, total=opts.train.steps, completed=trainer.step, enabled=opts.progress, console=console
    ) as bar:
        train_steps(
            trainer,
            iterator,
            steps=opts.train.steps,
            grad_accum=trainer.cfg.grad_accum,
            device=device,
            history=history,
            progress=bar,
            checkpoint_every=opts.train.checkpoint_every,
            save=save,
        )
    return history


def _checked_options(opts: TuneOptions, off: OfflineOptions) -> TuneOptions:
    """Refuse what can be refused before connecting; full-block tuning trains at ``block_lr`` when given."""
    if off.provider_verify_key is None:
        raise ConfigError(
            "the offline design needs the provider's public signing key to verify the emulator: pass "
            "OfflineOptions(provider_verify_key=PATH/provider.sign.pub) (CLI: --provider-sign-key)"
        )
    if opts.protocol != "offline":
        raise ConfigError(f"tune_offline() runs the offline design; use tune() for {opts.protocol!r}")
    if off.adapter == "full" and off.block_lr:
        from dataclasses import replace

        opts = replace(opts, train=replace(opts.train, lr=off.block_lr))
    opts.train.validate()
    return opts


@dataclass
class _Emulator:
    emulator: Emulator
    tokenizer: Any
    base_model: Any  # the public base model, when loading the tokenizer needed it (reused by the baselines)
    base_tokenizer: Any


def _load_emulator(
    emu_dir: Path, off: OfflineOptions, opts: TuneOptions, device: torch.device, base_model: Any, base_tokenizer: Any
) -> _Emulator:
    """The verified emulator, and a tokenizer (the emulator's, else the public base model's)."""
    from guardedp2p.designs.offline.emulator import load_emulator

    loaded = load_emulator(emu_dir, off.provider_verify_key, device=device)
    split = loaded.emulator.split
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
    return _Emulator(loaded.emulator, tok, base_model, base_tokenizer)


@dataclass
class _LocalRun:
    """Local tuning on the emulator: what the summary reports about it."""

    steps: int
    resumed_from: int
    history: list[HistoryRow]
    before: dict[str, float]
    after: dict[str, float]
    train_s: float
    adapter_dir: Path


def _tune_on_emulator(
    emu: Emulator,
    manifest: Manifest,
    data: PreparedData,
    tok: Any,
    opts: TuneOptions,
    off: OfflineOptions,
    device: torch.device,
    console: Console | None,
) -> _LocalRun:
    """Train the client's adapters on the emulator's trunk, resumable from ``OUT/checkpoint``; save the adapter."""
    from guardedp2p.data.collate import BatchIterator
    from guardedp2p.engine.lora import save_adapter
    from guardedp2p.engine.split import loss_fn
    from guardedp2p.train.trainer import SplitTrainer

    out = Path(opts.out)
    _attach(emu.bottom, emu.top, opts, off.adapter)
    trainer = SplitTrainer(emu.bottom, emu.top, emu.trunk_fn(), opts.train, loss_fn=loss_fn, train_bottom=True)
    iterator = BatchIterator(data.train_examples, opts.train.batch_size, seed=opts.train.seed, pad_id=tok.pad_token_id)
    ckpt = RunCheckpoint(
        out / "checkpoint",
        {"protocol": "offline", "emulator": manifest.sha256, "fingerprint": manifest["fingerprint"]},
        mismatch="another run or emulator",
        train_config=opts.train.to_dict(),
    )
    resumed = ckpt.resume(trainer, iterator) if opts.resume else Resumed()
    history = resumed.history

    def save() -> None:
        ckpt.save(trainer, iterator.state_dict(), history)

    def evaluate() -> dict[str, float]:
        return evaluate_metrics(trainer.logits_fn, data, tok, opts, device)

    before = evaluate() if not opts.skip_eval and resumed.step == 0 else {}
    t0 = time.perf_counter()
    _train_local(
        trainer, iterator, opts, device, label="offline tuning (emulator)", console=console, history=history, save=save
    )
    train_s = time.perf_counter() - t0
    save()
    after = {} if opts.skip_eval else evaluate()
    adapter_dir = out / "adapter"
    if off.adapter == "full":
        from guardedp2p.designs.offline.plugin import save_full_blocks

        save_full_blocks(emu.bottom, emu.top, adapter_dir, base_model_name_or_path=opts.model)
    else:
        save_adapter(emu.bottom, emu.top, adapter_dir, base_model_name_or_path=opts.model)
    return _LocalRun(trainer.step, resumed.step, history, before, after, train_s, adapter_dir)


def tune_offline(
    opts: TuneOptions,
    connect: ChannelFactory,
    *,
    console: Console | None = None,
    offline: OfflineOptions | None = None,
    base_model: Any = None,
    base_tokenizer: Any = None,
) -> dict[str, Any]:
    """Run the whole Offline design; returns the summary (also written to ``OUT/summary.json``).

    ``base_model``/``base_tokenizer``: the public base model for the baselines (loaded from ``opts.model``
    when not given; never handed to the emulator code).
    """
    from guardedp2p.designs.offline.transfer import download_emulator
    from guardedp2p.engine.device import pick_device

    off = offline or OfflineOptions()
    opts = _checked_options(opts, off)
    started = time.perf_counter()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    wire = WireStats()
    link = SessionLink(
        connect,
        lambda: Hello("offline", "", (opts.bottom_layers, opts.top_layers), {}, {}),
        timeout=opts.timeout,
        stats=wire,
    )
    # a file that did not hash to its signed digest lost its partial copy: fetching it again at once is safe
    ladder = RetryLadder(opts.retries, refetch=(DigestMismatchError,))

    # ---------------------------------------------------------------- 1. the emulator (one-off download)
    emu_dir = Path(off.emulator_dir) if off.emulator_dir else out / "emulator"
    tstats = TransferStats()
    manifest, tstats = ladder.run(
        lambda: download_emulator(
            link.session,
            emu_dir,
            off.provider_verify_key,
            chunk_size=off.chunk_size,
            progress=opts.progress,
            console=console,
            stats=tstats,
        ),
        "downloading the emulator",
        link=link,
        stop=KeepOutputsOnStop(out),
    )
    download_wire = wire.total_down
    link.close()  # local training may outlast the provider's idle timeout: reconnect to upload
    device = pick_device(opts.device)
    emu = _load_emulator(emu_dir, off, opts, device, base_model, base_tokenizer)
    tok = emu.tokenizer
    data = prepare_data(opts, tok)
    _add_heldout_text(data, tok, opts)

    # ---------------------------------------------------------------- 2. local tuning on the emulator
    local = _tune_on_emulator(emu.emulator, manifest, data, tok, opts, off, device, console)

    # ---------------------------------------------------------------- 3. signed upload of the adapters
    upload = _sign_and_upload(local, manifest, opts, off, link, ladder)

    # ---------------------------------------------------------------- 4. the five numbers and the summary
    five = _five_numbers(opts, off, local, manifest, upload, data, device, console, emu, tok)
    record = RunRecord(
        "offline",
        opts.model,
        local.steps,
        local.resumed_from,
        local.history,
        data.eval_kind,
        local.before,
        local.after,
        local.train_s,
        local.adapter_dir,
        started,
        opts.train.to_dict(),
    )
    summary = build_summary(record, Traffic.of(wire), {**five, **_transfers(manifest, tstats, download_wire, upload)})
    write_summary(out, summary)
    return summary


@dataclass
class _Upload:
    bundle_dir: Path
    bundle_bytes: int
    wire_bytes: int
    ack: dict[str, Any]
    signing_key: Any  # the client's Ed25519 key that signed the bundle
    pinned_key: bool  # False: a one-off key (integrity only)


def _sign_and_upload(
    local: _LocalRun, manifest: Manifest, opts: TuneOptions, off: OfflineOptions, link: SessionLink, ladder: RetryLadder
) -> _Upload:
    """Sign the adapter bundle with the client's key and upload it on a new session (under the retry ladder)."""
    from guardedp2p.designs.offline.plugin import make_full_block_bundle
    from guardedp2p.designs.offline.transfer import make_adapter_bundle, upload_bundle

    sk, pinned_key = _signing_key(off)
    bundle_dir = Path(opts.out) / "bundle"
    make_bundle = make_full_block_bundle if off.adapter == "full" else make_adapter_bundle
    bundle = make_bundle(
        local.adapter_dir,
        bundle_dir,
        sk,
        emulator_manifest=manifest,
        extra={
            "steps": local.steps,
            "lr": opts.train.lr,
            "batch_size": opts.train.batch_size,
            "lora_r": opts.train.lora_r,
            "adapter": off.adapter,
            "seed": opts.train.seed,
        },
    )
    up0 = link.stats.total_up
    ack = ladder.run(
        lambda: upload_bundle(link.session, bundle_dir, chunk_size=off.chunk_size),
        "uploading the adapter bundle",
        link=link,
        stop=KeepOutputsOnStop(Path(opts.out)),
    )
    wire_bytes = link.stats.total_up - up0
    link.close()
    return _Upload(bundle_dir, bundle.total_bytes, wire_bytes, ack, sk, pinned_key)


def _transfers(manifest: Manifest, download: TransferStats, download_wire: int, upload: _Upload) -> dict[str, Any]:
    """The summary's keys about the one-off transfers: what was received from the provider, what was sent back."""
    from guardedp2p.crypto.keys import fingerprint

    params = dict(manifest.get("params") or {})
    return {
        "emulator_bytes": manifest.total_bytes,
        "emulator_download_wire_bytes": download_wire,
        "download": download.as_dict(),
        "adapter_upload_bytes": upload.bundle_bytes,
        "adapter_upload_wire_bytes": upload.wire_bytes,
        "param_fraction": params.get("fraction_of_full"),
        "params": params,
        "emulator": {
            "layers": manifest["layers"],
            "compression": manifest["compression"],
            "fingerprint": manifest["fingerprint"],
            "manifest_sha256": manifest.sha256,
            "signer": manifest["signer"]["fingerprint"],
        },
        "upload_ack": {k: upload.ack.get(k) for k in ("bundle_id", "verified", "signer", "signer_pinned")},
        "client_signer": fingerprint(upload.signing_key.public_key()),
        "client_signer_persistent": upload.pinned_key,
        "bundle_dir": str(upload.bundle_dir),
    }


def _five_numbers(
    opts: TuneOptions,
    off: OfflineOptions,
    local: _LocalRun,
    manifest: Manifest,
    upload: _Upload,
    data: PreparedData,
    device: torch.device,
    console: Console | None,
    emu: _Emulator,
    tok: Any,
) -> dict[str, Any]:
    """offsite-tuning's five numbers (offsite-tuning, Xiao, Lin, Han, arXiv 2302.04870), the gaps the design claims, and their notes."""
    five: dict[str, Any] = {
        "emulator_zero_shot": primary_metric(local.before) if local.before else math.nan,
        "emulator_finetune": primary_metric(local.after) if local.after else math.nan,
    }
    all_metrics: dict[str, Any] = {"emulator_zero_shot": local.before, "emulator_finetune": local.after}
    full_history: list[HistoryRow] = []
    if off.baselines and not opts.skip_eval:
        five_more, more_metrics, full_history, note = _baselines(
            opts,
            manifest,
            upload.bundle_dir,
            upload.signing_key,
            data,
            device,
            console,
            emu.base_model,
            emu.base_tokenizer,
            tok,
            off.adapter,
        )
        five.update(five_more)
        all_metrics.update(more_metrics)
    else:
        five.update({"zero_shot_full": math.nan, "full_finetune": math.nan, "plug_in": math.nan})
        note = "baselines skipped; the provider computes plug_in from the uploaded bundle"
    return {
        **{
            k: five[k]
            for k in ("zero_shot_full", "full_finetune", "emulator_zero_shot", "emulator_finetune", "plug_in")
        },
        "five_numbers_all": all_metrics,
        "utility_gap": five["plug_in"] - five["full_finetune"],  # utility claim: ~ 0
        "ip_gap": five["plug_in"] - five["emulator_finetune"],  # IP claim: plug-in clearly better than the emulator
        "five_numbers_note": note,
        "heldout_loss": {k: (v or {}).get("loss") for k, v in all_metrics.items()},
        "ppl_gap": _ppl_gap(all_metrics),
        "full_finetune_history": full_history,
    }


def _baselines(
    opts: TuneOptions,
    manifest: Manifest,
    bundle_dir: Path,
    sk: Any,
    data: PreparedData,
    device: torch.device,
    console: Console | None,
    base_model: Any,
    base_tokenizer: Any,
    tok: Any,
    adapter: str = "lora",
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
    zs = evaluate_metrics(_full_logits_fn(pristine), data, tok, opts, device)
    # plug-in: exactly what the provider does with the uploaded bundle
    plugged_model = copy.deepcopy(pristine)
    plugged = plug_in(plugged_model, bundle_dir, sk.public_key())
    pi = evaluate_metrics(_full_logits_fn(plugged.model), data, tok, opts, device)
    del plugged_model, plugged
    # full fine-tuning baseline: the Online design's computation, locally
    ft_model = pristine
    parts = build_client_parts(ft_model, split)
    trunk = build_trunk(ft_model, split)
    _attach(parts.bottom, parts.top, opts, adapter)
    trainer = SplitTrainer(
        parts.bottom,
        parts.top,
        lambda h1, mask, *, train, input_ids: trunk(h1, mask),
        opts.train,
        loss_fn=loss_fn,
        train_bottom=True,
    )
    iterator = BatchIterator(data.train_examples, opts.train.batch_size, seed=opts.train.seed, pad_id=tok.pad_token_id)
    hist = _train_local(trainer, iterator, opts, device, label="baseline: tuning the full model", console=console)
    ft = evaluate_metrics(trainer.logits_fn, data, tok, opts, device)
    five = {"zero_shot_full": primary_metric(zs), "full_finetune": primary_metric(ft), "plug_in": primary_metric(pi)}
    return five, {"zero_shot_full": zs, "full_finetune": ft, "plug_in": pi}, hist, PLUG_IN_NOTE
