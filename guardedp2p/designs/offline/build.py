"""Provider-side assembly of the Offline design: build, optionally distil and quantize, and sign an emulator.

Used by ``guardedp2p provider emulator build`` (full control) and by ``guardedp2p demo --protocol offline``
(:func:`build_demo_emulator`). Distillation runs through :func:`~guardedp2p.designs.offline.emulator.distill_cached`:
keyed by the full model's digest, the layer map, the settings and the text, so a provider distils once and every
later build (for any number of clients) loads the result; an interrupted distillation resumes from its last
checkpoint. Without ``distill_data`` the provider's own public text is used
(:data:`~guardedp2p.designs.offline.emulator.PUBLIC_CORPUS`, the CPython language reference).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guardedp2p.crypto.keys import fingerprint
from guardedp2p.crypto.manifest import Manifest
from guardedp2p.designs.offline.emulator import (
    PUBLIC_CORPUS,
    DistillConfig,
    EmulatorConfig,
    build_emulator,
    distill_cached,
    load_text_examples,
    save_emulator,
)
from guardedp2p.errors import ConfigError

log = logging.getLogger("guardedp2p.provider")


@dataclass
class EmulatorBuildOptions:
    model: str = "default"
    out: str = "emulator"
    keys: str | None = None  # folder holding NAME.sign.key
    key_name: str = "provider"
    emulator: EmulatorConfig = field(default_factory=EmulatorConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    distill_data: str | None = None  # None: PUBLIC_CORPUS
    distill_cache: str | None = None  # None: $GUARDEDP2P_CACHE/emulators
    device: str = "auto"
    progress: bool = True
    include_tokenizer: bool = True


def build_emulator_folder(
    opts: EmulatorBuildOptions,
    *,
    model: Any = None,
    tokenizer: Any = None,
    signing_key: Any = None,
    console: Any = None,
) -> Manifest:
    """Load the model (unless given), build the emulator, distil it if asked, write and sign the folder."""
    from guardedp2p.crypto.keys import load_signing_key
    from guardedp2p.engine.device import pick_device
    from guardedp2p.engine.loading import load_causal_lm

    t0 = time.perf_counter()
    opts.emulator.validate()
    opts.distill.validate()
    if signing_key is None:
        if not opts.keys:
            raise ConfigError(
                "the emulator must be signed: pass --keys DIR holding NAME.sign.key (from `guardedp2p keys generate`)"
            )
        signing_key = load_signing_key(opts.keys, opts.key_name)
    if model is None:
        model, tokenizer = load_causal_lm(opts.model, device=pick_device(opts.device))
    emu = build_emulator(model, opts.emulator)
    if opts.distill.steps > 0:
        if tokenizer is None:
            raise ConfigError("distillation needs the model's tokenizer")
        examples = load_text_examples(str(opts.distill_data or PUBLIC_CORPUS), tokenizer, opts.distill.max_length)
        if opts.distill.checkpoint_every == 0:
            opts.distill.checkpoint_every = 25
        summary = distill_cached(
            emu,
            model,
            examples,
            opts.distill,
            cache_dir=opts.distill_cache,
            pad_id=int(tokenizer.pad_token_id or 0),
            console=console,
            progress=opts.progress,
        )
        summary["data"] = str(opts.distill_data or PUBLIC_CORPUS)
        emu.info["distillation"] = {k: v for k, v in summary.items() if k != "cache"}
        log.info("distillation %s (%s)", "loaded from the cache" if summary.get("cached") else "done", summary["cache"])
    manifest = save_emulator(
        emu,
        opts.out,
        signing_key,
        tokenizer=tokenizer if opts.include_tokenizer else None,
        model_name=opts.model,
        extra={"built_s": round(time.perf_counter() - t0, 2)},
    )
    log.info(
        "emulator written to %s: %d of %d middle blocks, %s, %.1f%% of the parameters, signed by %s",
        opts.out,
        len(emu.layer_map.middle_kept),
        len(emu.layer_map.middle),
        opts.emulator.quantize,
        100 * (manifest["params"]["fraction_of_full"] or 0),
        fingerprint(signing_key.public_key()),
    )
    return manifest


# Set from the offline sweep (docs/results/offline.md, benchmarks/bench_offline_sweep.py). On the demo task no
# measured setting let adapters tuned on the emulator keep their gain in the full model (plug-in stayed at the
# zero-shot 0.25-0.28 with 25, 50 or 75 % of the middle and 0, 40 or 120 distillation steps on public text), so the
# demo takes the cheapest setting that protects the model: half the middle (the emulator's public-text perplexity
# is ~600x the full model's; the client still learns its task on it, emulator fine-tune 0.97) and no
# distillation (it bought no transfer and costs CPU minutes). int8 codes shrink the download (not in the sweep).
DEMO_KEEP_FRACTION = 0.5
DEMO_QUANTIZE = "int8"
DEMO_DISTILL_STEPS = 0


def demo_distill_config(steps: int = DEMO_DISTILL_STEPS) -> DistillConfig:
    """The sweep's distillation: LM + 30 x normalised hidden MSE, AdamW 1e-4, 4 x 64 tokens, 10 warm-up steps."""
    return DistillConfig(
        steps=steps, lr=1e-4, batch_size=4, max_length=64, warmup_steps=10, w_lm=1.0, w_kd=30.0, checkpoint_every=25
    )


def build_demo_emulator(
    model: str, out_dir: Path, keys_dir: Path, *, console: Any = None, distill_steps: int = DEMO_DISTILL_STEPS
) -> Path:
    """The demo's emulator, signed with ``keys_dir/provider.sign.key``.

    It keeps half of the middle blocks (13 of 26 for SmolLM2-135M) as int8 codes. ``distill_steps > 0`` distils
    them first on the provider's public text (:data:`~guardedp2p.designs.offline.emulator.PUBLIC_CORPUS`, never
    the client's task) with the sweep's settings, through the distillation cache (paid once, then loaded).
    """
    opts = EmulatorBuildOptions(
        model=model,
        out=str(out_dir),
        keys=str(keys_dir),
        key_name="provider",
        emulator=EmulatorConfig(keep_fraction=DEMO_KEEP_FRACTION, quantize=DEMO_QUANTIZE),
        distill=demo_distill_config(distill_steps),
        progress=console is not None,
    )
    if console is not None:
        console.print(
            f"building the signed emulator for the offline design ({DEMO_KEEP_FRACTION:.0%} of the middle, "
            f"{DEMO_QUANTIZE}, {distill_steps} distillation steps)…"
        )
    build_emulator_folder(opts, console=console)
    return Path(out_dir)
