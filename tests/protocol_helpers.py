"""Shared builders for protocol tests: a provider app and a client over the in-process channel."""

from __future__ import annotations

import copy
from typing import Any

import torch

from guardedp2p.designs.gradfree.provider import gradfree_session
from guardedp2p.designs.online.provider import online_session
from guardedp2p.engine.fingerprint import model_fingerprint
from guardedp2p.engine.lora import LoraSettings, attach_lora
from guardedp2p.engine.split import SplitConfig, build_client_parts, build_trunk
from guardedp2p.protocol.client import ClientSession
from guardedp2p.protocol.provider import ProviderApp, ProviderConfig, ProviderResources
from guardedp2p.transport.inproc import InProcClientChannel
from guardedp2p.wire.handshake import Hello, ProviderPolicy

SPLIT = SplitConfig(bottom_layers=2, top_layers=2)


def provider_app(
    model: torch.nn.Module,
    split: SplitConfig = SPLIT,
    *,
    config: ProviderConfig | None = None,
    recorder: Any = None,
    clock: Any = None,
) -> ProviderApp:
    """A provider holding only the frozen trunk of its own copy of ``model``."""
    mine = copy.deepcopy(model)
    trunk = build_trunk(mine, split)
    for p in trunk.parameters():
        p.requires_grad_(False)
    policy = ProviderPolicy(
        protocols=("online", "gradfree"),
        fingerprint=model_fingerprint(mine, split),
        split=(split.bottom_layers, split.top_layers),
    )
    resources = ProviderResources(trunk=trunk, hidden_size=model.config.hidden_size, recorder=recorder)
    kwargs = {"clock": clock} if clock is not None else {}
    return ProviderApp(
        policy, {"online": online_session, "gradfree": gradfree_session}, config, resources=resources, **kwargs
    )


def client_parts(
    model: torch.nn.Module, split: SplitConfig = SPLIT, *, lora: bool = True, bottom: bool = True, seed: int = 0
) -> Any:
    """The client's own copy: bottom + top with LoRA whose B matrices are random (so every gradient is non-zero)."""
    mine = copy.deepcopy(model)
    fp = model_fingerprint(mine, split)
    parts = build_client_parts(mine, split)
    for p in mine.parameters():
        p.requires_grad_(False)
    if lora:
        torch.manual_seed(seed)
        attach_lora(parts.bottom, parts.top, LoraSettings(r=4, alpha=8), bottom=bottom, top=True)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in list(parts.bottom.named_parameters()) + list(parts.top.named_parameters()):
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return parts, fp


def open_session(
    app: ProviderApp,
    fp: str,
    *,
    protocol: str = "online",
    codecs: dict[str, str] | None = None,
    peer: str = "inproc:client",
) -> ClientSession:
    codecs = codecs or (
        {d: "fp32" for d in ("up", "down", "grad_up", "grad_down")}
        if protocol == "online"
        else {"up": "fp32", "down": "fp32"}
    )
    session = ClientSession(InProcClientChannel(app, peer=peer), timeout=5.0)
    session.open(Hello(protocol, fp, (SPLIT.bottom_layers, SPLIT.top_layers), codecs))
    return session


def batch(vocab: int, *, b: int = 3, length: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch with -100 labels on pads (row i has i pads)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    for i in range(b):
        if i:
            mask[i, length - i :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
