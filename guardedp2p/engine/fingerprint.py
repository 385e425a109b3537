"""Model fingerprint both parties compute independently and compare in the handshake.

It covers what both of them hold: a stable config subset, the split points, and the pre-trained weights of the
client parts (embedding step, bottom blocks, top blocks, final norm, LM head). The trunk is deliberately left
out: the client never has it. LoRA tensors are excluded and PEFT's ``.base_layer`` renaming is undone, so the
value does not change when adapters are attached.

Canonical form: tensors are hashed in sorted HF key order as little-endian float32 bytes (integer tensors as
they are), each preceded by its key and shape. Casting to float32 makes an fp16/bf16 copy of a bf16 checkpoint
match the checkpoint, while any change of a weight value changes the hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from guardedp2p.engine.arch import get_arch, num_layers
from guardedp2p.engine.split import ClientBottom, ClientParts, ClientTop, SplitConfig, SplitParts, build_client_parts
from guardedp2p.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

ModelOrParts = nn.Module | SplitParts | ClientParts | Sequence[nn.Module]
"""What ``model_fingerprint`` accepts: a HF model, split parts, or ``(bottom, top)`` / ``(bottom, trunk, top)``."""

FINGERPRINT_VERSION = 1


def _config_header(config: PretrainedConfig, cfg: SplitConfig) -> bytes:
    header = {
        "fingerprint_version": FINGERPRINT_VERSION,
        "model_type": str(config.model_type),
        "hidden_size": int(config.hidden_size),
        "num_hidden_layers": int(config.num_hidden_layers),
        "vocab_size": int(config.vocab_size),
        "split": {"bottom_layers": int(cfg.bottom_layers), "top_layers": int(cfg.top_layers)},
    }
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def _canonical_name(name: str) -> str | None:
    parts = name.split(".")
    if any(p.startswith("lora_") for p in parts):
        return None
    return ".".join(p for p in parts if p != "base_layer")


def _shared_weights(parts: Iterable[nn.Module]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        for name, p in part.named_parameters(remove_duplicate=False):
            key = _canonical_name(name)
            if key is None:
                continue
            if key in out and out[key] is not p:
                raise ConfigError(f"two different tensors claim the name {key!r}; are both parts from one model?")
            out[key] = p
    return out


def _update_tensor(h: hashlib._Hash, name: str, t: torch.Tensor) -> None:
    if t.is_meta:
        raise ConfigError(f"weight {name} is not materialized (meta device); load the model fully before hashing")
    t = t.detach()
    if t.is_floating_point():
        t = t.to(device="cpu", dtype=torch.float32)
    else:
        t = t.to(device="cpu")
    t = t.contiguous()
    h.update(f"{name}|{list(t.shape)}|{str(t.dtype)}\n".encode())
    # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12; the buffer protocol works on 3.11 too.
    h.update(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def _as_client_parts(model_or_parts: ModelOrParts, cfg: SplitConfig) -> tuple[ClientBottom, ClientTop]:
    if isinstance(model_or_parts, (SplitParts, ClientParts)):
        bottom, top = model_or_parts.bottom, model_or_parts.top
    elif isinstance(model_or_parts, (tuple, list)) and len(model_or_parts) in (2, 3):
        items = list(model_or_parts)
        bottom, top = items[0], items[-1]
    elif isinstance(model_or_parts, nn.Module):
        get_arch(model_or_parts)  # clear error for unsupported architectures
        cp = build_client_parts(model_or_parts, cfg)
        return cp.bottom, cp.top
    else:
        raise TypeError("model_fingerprint expects a HF model, SplitParts, ClientParts or (bottom, top)")
    if not isinstance(bottom, ClientBottom) or not isinstance(top, ClientTop):
        raise TypeError("model_fingerprint expects (ClientBottom, ClientTop) parts")
    for part in (bottom, top):
        if part.split_config != cfg:
            raise ConfigError(f"the {part.role} was built with split {part.split_config}, not {cfg}")
    return bottom, top


def model_fingerprint(model_or_parts: ModelOrParts, cfg: SplitConfig) -> str:
    """SHA-256 hex digest of config subset + split + the client parts' pre-trained weights.

    The provider passes its full model, the client its (bottom, top) parts; equal inputs give equal digests in
    any process. Cost is one pass over the client-side weights (~0.5 s for SmolLM2-135M on a CPU).
    """
    bottom, top = _as_client_parts(model_or_parts, cfg)
    cfg.validate(num_layers(bottom.config))
    h = hashlib.sha256()
    h.update(_config_header(bottom.config, cfg))
    weights = _shared_weights((bottom, top))
    for name in sorted(weights):
        _update_tensor(h, name, weights[name])
    return h.hexdigest()
