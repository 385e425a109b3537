"""Build a provider application from a model: load, keep only the frozen trunk in memory, fingerprint."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from guardedp2p.handshake import FLOAT_CODECS, ProviderPolicy
from guardedp2p.protocols.provider import ProviderApp, ProviderConfig

log = logging.getLogger("guardedp2p.provider")


@dataclass
class ProviderOptions:
    model: str = "default"
    bottom_layers: int = 2
    top_layers: int = 2
    protocols: tuple[str, ...] = ("online", "gradfree", "offline")
    codecs: tuple[str, ...] = FLOAT_CODECS
    device: str = "auto"
    record_dir: str | None = None
    emulator_dir: str | None = None
    config: ProviderConfig = field(default_factory=ProviderConfig)


def session_factories(protocols: tuple[str, ...]) -> dict[str, Any]:
    """The fixed registry of provider-side session types (no lookup by received strings beyond this table)."""
    from guardedp2p.protocols.online import gradfree_session, online_session

    table: dict[str, Any] = {"online": online_session, "gradfree": gradfree_session}
    if "offline" in protocols:
        try:
            from guardedp2p.protocols.offline import offline_session

            table["offline"] = offline_session
        except ImportError:  # pragma: no cover - offline design not installed
            pass
    return {k: v for k, v in table.items() if k in protocols}


def build_provider_app(opts: ProviderOptions, *, model: Any = None) -> ProviderApp:
    """Load the model (unless given), split it and keep the trunk frozen; return the ready app."""
    from guardedp2p.engine.device import pick_device
    from guardedp2p.engine.fingerprint import model_fingerprint
    from guardedp2p.engine.loading import load_causal_lm
    from guardedp2p.engine.split import SplitConfig, build_trunk

    device = pick_device(opts.device)
    if model is None:
        model, _ = load_causal_lm(opts.model, device=device)
    split = SplitConfig(bottom_layers=opts.bottom_layers, top_layers=opts.top_layers)
    fingerprint = model_fingerprint(model, split)
    trunk = build_trunk(model, split)
    for p in trunk.parameters():
        p.requires_grad_(False)
    trunk.train(False)
    resources: dict[str, Any] = {"trunk": trunk, "hidden_size": int(model.config.hidden_size), "model_config": model.config}
    protocols = tuple(opts.protocols)
    if "offline" in protocols:
        if opts.emulator_dir:
            resources["emulator_dir"] = opts.emulator_dir
        else:
            log.warning("the offline design is not served: no --emulator folder was given (build one with `provider emulator build`)")
            protocols = tuple(p for p in protocols if p != "offline")
    if opts.record_dir:
        from guardedp2p.attacks.transcript import TranscriptRecorder

        resources["recorder"] = TranscriptRecorder(opts.record_dir)
    policy = ProviderPolicy(
        protocols=protocols,
        fingerprint=fingerprint,
        split=(opts.bottom_layers, opts.top_layers),
        codecs=tuple(opts.codecs),
        record=bool(opts.record_dir),
        model_name=opts.model,
    )
    log.info("provider ready: model %s, split %d/%d, fingerprint %s…, protocols %s", opts.model, opts.bottom_layers, opts.top_layers, fingerprint[:12], ",".join(protocols))
    torch.set_grad_enabled(True)
    return ProviderApp(policy, session_factories(protocols), opts.config, resources=resources)
