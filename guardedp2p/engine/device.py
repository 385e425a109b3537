"""Device selection.

Kept tiny and separate so the CLI can resolve ``--device`` without importing transformers.
"""

from __future__ import annotations

import torch

from guardedp2p.errors import ConfigError


class DeviceError(ConfigError):
    """The requested device does not exist on this machine."""


def pick_device(pref: str | torch.device | None = "auto") -> torch.device:
    """Return the torch device to run on.

    ``"auto"`` (or ``None``) picks CUDA when a GPU is visible and the CPU otherwise, so the same command line
    works on a laptop and on a GPU box. An explicit ``"cuda"`` on a machine without CUDA is an error rather
    than a silent fallback: a provider that asked for a GPU should know it is not getting one.
    """
    if isinstance(pref, torch.device):
        pref = str(pref)
    if pref is None or pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(pref)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"unknown device {pref!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {pref!r} requested but CUDA is not available; use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {pref!r} requested but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    elif dev.type not in ("cpu", "mps"):
        raise DeviceError(f"unsupported device type {dev.type!r}; use 'auto', 'cpu' or 'cuda'")
    return dev
