"""Resumable checkpoints of the client's training state.

A checkpoint holds everything needed to continue with no lost or repeated step: the trainable tensors
(safetensors), optimizer and schedule state (``torch.save``, read back with ``weights_only=True``), the step,
the data iterator's position and the configuration. It is written to a temporary folder and swapped in with
renames, so a kill during saving leaves the previous checkpoint intact.

The folder is 0700 and every file 0600: trained weights and optimizer moments are derived from the client's
private data's gradients (SECURITY.md), so other users of the machine must not read them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from guardedp2p.errors import ConfigError

TRAINABLE = "trainable.safetensors"
OPTIM = "optimizer.pt"
STATE = "state.json"


class CheckpointError(ConfigError):
    """A checkpoint is missing, incomplete or was made for another run."""


def save_checkpoint(
    directory: str | Path, trainable: dict[str, torch.Tensor], trainer_state: dict[str, Any], meta: dict[str, Any]
) -> Path:
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tmp.chmod(0o700)  # not traversable by others while the files in it are written (mkdir's mode obeys umask)
    _write(tmp, trainable, trainer_state, meta)
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def _write(tmp: Path, trainable: dict[str, torch.Tensor], trainer_state: dict[str, Any], meta: dict[str, Any]) -> None:
    save_file({k: v.contiguous() for k, v in trainable.items()}, str(tmp / TRAINABLE))
    torch.save(
        {
            "optimizer": trainer_state["optimizer"],
            "scheduler": trainer_state["scheduler"],
            "rng": torch.get_rng_state(),
        },
        tmp / OPTIM,
    )
    meta = dict(meta)
    meta["step"] = int(trainer_state["step"])
    (tmp / STATE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    for f in tmp.iterdir():
        f.chmod(0o600)


def has_checkpoint(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / STATE).is_file() or (d.with_name(d.name + ".old") / STATE).is_file()


def load_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Return (trainable tensors, trainer state, meta). Falls back to the ``.old`` copy of an interrupted save."""
    d = Path(directory)
    if not (d / STATE).is_file():
        old = d.with_name(d.name + ".old")
        if (old / STATE).is_file():
            d = old
        else:
            raise CheckpointError(f"no checkpoint in {directory}; run without --resume to start fresh")
    try:
        meta = json.loads((d / STATE).read_text())
        trainable = load_file(str(d / TRAINABLE))
        opt = torch.load(d / OPTIM, weights_only=True)
        state = {"step": int(meta["step"]), "optimizer": opt["optimizer"], "scheduler": opt["scheduler"]}
    except (OSError, ValueError, RuntimeError, SafetensorError, KeyError, TypeError) as exc:
        # a truncated tensor file raises SafetensorError, a state file without its fields KeyError/TypeError
        raise CheckpointError(
            f"checkpoint in {d} is unreadable ({type(exc).__name__}: {exc}); delete it or run without --resume"
        ) from None
    if isinstance(opt.get("rng"), torch.Tensor):
        torch.set_rng_state(opt["rng"])
    return trainable, state, meta
