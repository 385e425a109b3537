"""Build a provider application from a model: load, keep only the frozen trunk in memory, fingerprint."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from guardedp2p.designs import DESIGN_NAMES, get_design
from guardedp2p.errors import ArtifactError, ConfigError, GuardedP2PError
from guardedp2p.protocol.provider import PeerTrunk, ProviderApp, ProviderConfig, ProviderResources
from guardedp2p.wire.handshake import FLOAT_CODECS, ProviderPolicy

log = logging.getLogger("guardedp2p.provider")


@dataclass
class UploadOptions:
    """Where Offline adapter bundles go, who may sign them and how much they may take (issue 20, SECURITY.md)."""

    upload_dir: str | None = None  # None: a temporary folder (logged)
    client_sign_keys: Mapping[str, Sequence[str | Path]] = field(default_factory=dict)  # key -> NAME.sign.pub
    accept_unpinned: bool | None = None  # see ProviderResources.accept_unpinned; provider serve passes False
    max_upload_bytes: int | None = None  # one bundle; None: the design's default (256 MiB)
    max_staged_bytes_per_peer: int = 512 << 20
    max_staged_bytes: int = 2 << 30
    max_uploads_per_peer: int = 16
    max_upload_dir_bytes: int = 8 << 30


@dataclass
class ProviderOptions:
    model: str = "default"
    bottom_layers: int = 2
    top_layers: int = 2
    protocols: tuple[str, ...] = DESIGN_NAMES
    codecs: tuple[str, ...] = FLOAT_CODECS
    device: str = "auto"
    record_dir: str | None = None
    emulator_dir: str | None = None
    config: ProviderConfig = field(default_factory=ProviderConfig)
    device_map: str | None = None  # auto|balanced|cpu|cuda[:N]; None: follow ``device`` (one device)
    dtype: str | None = None  # fp32|bf16|fp16|auto (the checkpoint's own) for the trunk; None: fp32
    load_in: str | None = None  # 8bit|4bit: bitsandbytes weights for the trunk (never the client-side modules)
    uploads: UploadOptions = field(default_factory=UploadOptions)
    # Offline bundles served plugged into the trunk, each to its owner only: client key (z85) -> bundle folder
    # (``provider serve --serve-plugged CLIENT.key=BUNDLE_DIR``, :func:`parse_serve_plugged`; docs/architecture.md)
    plugged: Mapping[str, str] = field(default_factory=dict)

    def trunk_loading(self) -> Any:
        """The engine's ``TrunkLoading``; ``--device`` is the one-device shorthand of ``--device-map``."""
        from guardedp2p.engine.placement import TrunkLoading

        if self.device_map is not None and self.device not in ("auto", self.device_map):
            raise ConfigError(
                f"--device {self.device} and --device-map {self.device_map} disagree; pass only --device-map"
            )
        loading = TrunkLoading(
            device_map=self.device_map or self.device, dtype=self.dtype or "fp32", load_in=self.load_in
        )
        loading.validate()
        return loading


def session_factories(protocols: tuple[str, ...]) -> dict[str, Any]:
    """Provider-side session factories of the served designs, from the fixed registry in :mod:`guardedp2p.designs`."""
    return {name: get_design(name).load_session_factory() for name in protocols}


def parse_serve_plugged(specs: Sequence[str]) -> dict[str, str]:
    """``CLIENT.key=BUNDLE_DIR`` (repeatable; CLIENT may also be the z85 key itself) -> {z85 key: bundle folder}.

    Checks what needs no model: the key is readable, the folder exists, one bundle per key."""
    from guardedp2p.crypto.keys import load_public_key

    out: dict[str, str] = {}
    for spec in specs:
        key_s, sep, folder = spec.rpartition("=")
        if not sep or not key_s or not folder:
            raise ConfigError(f"--serve-plugged {spec!r}: write CLIENT.key=BUNDLE_DIR (the client's public key file)")
        try:
            key = load_public_key(key_s)
        except (GuardedP2PError, OSError) as exc:
            raise ConfigError(f"--serve-plugged {spec}: cannot read the client key ({exc})") from None
        if not Path(folder).expanduser().is_dir():
            raise ConfigError(
                f"--serve-plugged {spec}: {folder} is not a folder (pass the adapter bundle the client uploaded: a "
                "bundle-… folder under --upload-dir, listed with its uploader in uploads.jsonl)"
            )
        if key in out:
            raise ConfigError(f"--serve-plugged {spec}: that client already gets {out[key]} (one bundle per key)")
        out[key] = str(Path(folder).expanduser())
    return out


def _plugged_signers(opts: ProviderOptions, key: str, folder: str) -> list[Any]:
    """The verify keys a plugged bundle of ``key`` must be signed with: those pinned for it or for every uploader,
    as for an Offline upload (``designs.offline.provider``); none pinned is refused unless ``accept_unpinned``."""
    from guardedp2p.designs.offline.provider import ANY_UPLOADER

    pins = opts.uploads.client_sign_keys
    signers = list(pins.get(key, ())) + list(pins.get(ANY_UPLOADER, ()))
    if not signers and opts.uploads.accept_unpinned is not True:
        raise ConfigError(
            f"--serve-plugged {key[:12]}…={folder}: no signing key is pinned for that client; put its NAME.sign.pub "
            "beside the allowed NAME.key, or pass --client-sign-key SIGN.pub=CLIENT.key (--accept-unpinned checks "
            "integrity only)"
        )
    return signers


def check_plugged(opts: ProviderOptions) -> None:
    """Verify every ``opts.plugged`` bundle's signature and digests before any model is loaded (fail fast)."""
    from guardedp2p.designs.offline.plugin import verify_adapter_bundle

    for key, folder in opts.plugged.items():
        signers = _plugged_signers(opts, key, folder)
        try:
            verify_adapter_bundle(folder, signers or None)
        except ArtifactError as exc:
            raise type(exc)(f"--serve-plugged {key[:12]}…={folder}: {exc}") from None


def build_peer_trunks(
    opts: ProviderOptions, base: Any, fingerprint: str, load_model: Callable[[], Any]
) -> dict[str, PeerTrunk]:
    """Each ``opts.plugged`` bundle verified as an Offline upload is (signed by a key pinned for its client, or
    integrity only with ``accept_unpinned``) and plugged into its own copy of the trunk blocks it changes."""
    from guardedp2p.designs.offline.plugin import plug_into_trunk

    out: dict[str, PeerTrunk] = {}
    for key, folder in opts.plugged.items():
        signers = _plugged_signers(opts, key, folder)
        try:
            plugged = plug_into_trunk(base, folder, signers or None, load_model=load_model, fingerprint=fingerprint)
        except (ArtifactError, ConfigError) as exc:  # same type, the message names the option it came from
            raise type(exc)(f"--serve-plugged {key[:12]}…={folder}: {exc}") from None
        out[key] = PeerTrunk(plugged.trunk, plugged.announcement())
        log.info(
            "client %s… gets its own trunk: bundle %s (signer %s, pinned=%s) plugged into trunk block(s) %s; every "
            "other key gets the base trunk",
            key[:12],
            folder,
            plugged.bundle.signer,
            plugged.bundle.signer_pinned,
            plugged.blocks,
        )
    return out


def _trunk_of_given_model(model: Any, split: Any, opts: ProviderOptions, loading: Any) -> Any:
    """A model built by the caller (tests, benchmarks) stays where it is unless ``device_map``/``dtype`` say
    otherwise; quantizing needs the loader (bitsandbytes quantizes while reading the checkpoint)."""
    from guardedp2p.engine.placement import count_parts, plan_trunk_devices, trunk_from_model

    if opts.load_in:
        raise ConfigError(
            "load_in quantizes while loading from disk: pass the model path in ProviderOptions.model instead of a model object"
        )
    devices = None
    if opts.device_map is not None:
        counts = count_parts(model, split)
        elt = next(model.parameters()).element_size()
        devices = plan_trunk_devices(loading.device_map, counts.trunk_blocks, counts.block_max * elt)
    return trunk_from_model(model, split, dtype=loading.torch_dtype if opts.dtype else None, devices=devices)


def _model_loader(opts: ProviderOptions, model: Any) -> Callable[[], Any]:
    """A fresh full copy of the served model for plugging a bundle into (on the CPU, float32 as the client has it)."""
    if model is not None:
        return lambda: copy.deepcopy(model)

    def load() -> Any:
        from guardedp2p.engine.loading import load_causal_lm

        return load_causal_lm(opts.model, device="cpu", dtype=torch.float32)[0]

    return load


def build_provider_app(opts: ProviderOptions, *, model: Any = None) -> ProviderApp:
    """Load the model (unless given), split it and keep the trunk frozen; return the ready app."""
    from guardedp2p.engine.placement import load_provider_trunk
    from guardedp2p.engine.split import SplitConfig

    split = SplitConfig(bottom_layers=opts.bottom_layers, top_layers=opts.top_layers)
    loading = opts.trunk_loading()
    if model is None:
        loaded = load_provider_trunk(opts.model, split, loading)
    else:
        loaded = _trunk_of_given_model(model, split, opts, loading)
    fingerprint, trunk = loaded.fingerprint, loaded.trunk
    resources = ProviderResources(trunk=trunk, hidden_size=int(loaded.config.hidden_size), model_config=loaded.config)
    if opts.plugged:
        resources.peer_trunks = build_peer_trunks(opts, trunk, fingerprint, _model_loader(opts, model))
    protocols = tuple(opts.protocols)
    if "offline" in protocols:
        if opts.emulator_dir:
            resources.emulator_dir = opts.emulator_dir
        else:
            log.warning(
                "the offline design is not served: no --emulator folder was given (build one with `provider emulator build`)"
            )
            protocols = tuple(p for p in protocols if p != "offline")
    up = opts.uploads
    resources.upload_dir = up.upload_dir
    resources.client_sign_keys = up.client_sign_keys
    resources.accept_unpinned = up.accept_unpinned
    resources.max_upload_bytes = up.max_upload_bytes
    resources.max_staged_upload_bytes_per_peer = up.max_staged_bytes_per_peer
    resources.max_staged_upload_bytes = up.max_staged_bytes
    resources.max_uploads_per_peer = up.max_uploads_per_peer
    resources.max_upload_dir_bytes = up.max_upload_dir_bytes
    if opts.record_dir:
        from guardedp2p.attacks.transcript import TranscriptRecorder

        resources.recorder = TranscriptRecorder(opts.record_dir)
    policy = ProviderPolicy(
        protocols=protocols,
        fingerprint=fingerprint,
        split=(opts.bottom_layers, opts.top_layers),
        codecs=tuple(opts.codecs),
        record=bool(opts.record_dir),
        model_name=opts.model,
    )
    log.info(
        "provider ready: model %s, split %d/%d, fingerprint %s…, protocols %s",
        opts.model,
        opts.bottom_layers,
        opts.top_layers,
        fingerprint[:12],
        ",".join(protocols),
    )
    torch.set_grad_enabled(True)
    return ProviderApp(policy, session_factories(protocols), opts.config, resources=resources)
