"""What an honest-but-curious provider records, and how the attack harness reads it back.

The provider's ``TrunkSession`` calls :meth:`TranscriptRecorder.record` with exactly the tensors it received
or produced (``kind="forward"``: ``h1`` as decoded from the wire, ``mask``, ``h2``; ``kind="backward"``: ``g2``,
``g1``) and the message metadata. Nothing of the client's ground truth (token ids, labels, text) is ever passed
to the recorder, so a transcript is precisely the attacker's view of the GuardedTuning threat model (arXiv 2501.04323; SECURITY.md). Ground truth for scoring
is kept by the *client* side of an experiment and handed to :func:`guardedp2p.attacks.runner.run_attacks`
separately.

Layout of a record directory::

    <dir>/index.jsonl                      one JSON line per record call (append-only)
    <dir>/<session>/<step:08d>-<kind>.safetensors

Tensors are stored with ``safetensors`` (no pickle); the index carries the metadata (JSON-serialisable values
only; anything else is stored as its ``repr`` so a surprising value never breaks the provider).
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from guardedp2p.errors import ConfigError

INDEX_FILE = "index.jsonl"
KINDS = ("forward", "backward")
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class TranscriptError(ConfigError):
    """A transcript directory is missing, unreadable or inconsistent."""


def _safe_name(s: str) -> str:
    """A filesystem-safe rendering of a session id (ids come from the provider, but never trust a name)."""
    out = _SAFE.sub("_", str(s))[:120].lstrip(".")
    return out or "_"


def _jsonable(meta: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (meta or {}).items():
        try:
            json.dumps(v)
            out[str(k)] = v
        except (TypeError, ValueError):
            out[str(k)] = repr(v)
    return out


class TranscriptRecorder:
    """Write every observation of the provider to ``record_dir`` (thread-safe, append-only).

    An unusable directory fails at construction time; a failed write (disk full, permissions) raises
    ``TranscriptError`` naming the directory, so an experiment never silently records a partial transcript.
    """

    def __init__(self, record_dir: str | os.PathLike[str]) -> None:
        self.root = Path(record_dir)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TranscriptError(f"cannot create the transcript directory {str(self.root)!r}: {exc}") from exc
        self._lock = threading.Lock()

    def record(
        self, sid: str, step: int, kind: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None
    ) -> Path:
        """Store one observation; returns the tensor file's path."""
        from safetensors.torch import save_file

        if kind not in KINDS:
            raise TranscriptError(f"unknown observation kind {kind!r}; use one of {list(KINDS)}")
        folder = self.root / _safe_name(sid)
        name = f"{int(step):08d}-{kind}.safetensors"
        clean = {str(k): v.detach().to("cpu").contiguous() for k, v in tensors.items() if v is not None}
        entry = {
            "session": str(sid),
            "step": int(step),
            "kind": kind,
            "file": f"{folder.name}/{name}",
            "tensors": {
                k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in clean.items()
            },
            "meta": _jsonable(meta),
        }
        with self._lock:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                save_file(clean, str(folder / name))
                with open(self.root / INDEX_FILE, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(entry, separators=(",", ":")) + "\n")
            except OSError as exc:
                raise TranscriptError(f"cannot write the transcript to {str(self.root)!r}: {exc}") from exc
        return folder / name


@dataclass
class Observation:
    """The attacker's view of one training step of one session (forward and, in Online, backward).

    ``h1`` is the bottom output as received (after the uplink codec / noise), ``h2`` the trunk output, ``g2`` the
    client's gradient w.r.t. ``h2`` and ``g1`` the provider's gradient w.r.t. ``h1``; ``mask`` the attention mask.
    Gradfree and evaluation steps have no ``g2``/``g1``.
    """

    session: str
    step: int
    mask: torch.Tensor
    h1: torch.Tensor | None = None
    h2: torch.Tensor | None = None
    g2: torch.Tensor | None = None
    g1: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int]:
        return (self.session, self.step)

    @property
    def has_gradients(self) -> bool:
        return self.g2 is not None

    @property
    def batch_size(self) -> int:
        return int(self.mask.shape[0])


def _read_index(root: Path) -> list[dict[str, Any]]:
    path = root / INDEX_FILE
    if not path.is_file():
        raise TranscriptError(
            f"{str(root)!r} holds no {INDEX_FILE}; point to the folder given to `provider serve --record`"
        )
    entries = []
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if n == last:  # a provider killed mid-write leaves a truncated last line: skip only that one
                break
            raise TranscriptError(f"{path}: line {n + 1} is not valid JSON ({exc})") from exc
    return entries


def load_transcript(
    record_dir: str | os.PathLike[str],
    *,
    sessions: Iterable[str] | None = None,
    train_only: bool = False,
) -> list[Observation]:
    """Read a record directory into observations ordered by (session, step).

    Forward and backward records of the same (session, step) are merged into one :class:`Observation`. A
    backward record without its forward is dropped (it cannot be attacked without the mask). ``train_only``
    keeps steps whose metadata says ``train`` (evaluation forwards carry no gradient and repeat the eval set).
    """
    from safetensors.torch import load_file

    root = Path(record_dir)
    want = set(sessions) if sessions is not None else None
    merged: dict[tuple[str, int], dict[str, Any]] = {}
    for e in _read_index(root):
        sid, step, kind = str(e["session"]), int(e["step"]), e.get("kind")
        if want is not None and sid not in want:
            continue
        if kind not in KINDS:
            raise TranscriptError(f"{root / INDEX_FILE}: unknown kind {kind!r}")
        rel = Path(str(e["file"]))
        if rel.is_absolute() or ".." in rel.parts:
            raise TranscriptError(f"{root / INDEX_FILE}: file entry {str(rel)!r} escapes the record directory")
        path = root / rel
        if not path.is_file():
            raise TranscriptError(f"transcript file {str(path)!r} listed in the index is missing")
        slot = merged.setdefault((sid, step), {"tensors": {}, "meta": {}})
        slot["tensors"].update(load_file(str(path)))
        slot["meta"].update(e.get("meta") or {})
    out = []
    for (sid, step), slot in sorted(merged.items()):
        t = slot["tensors"]
        if "mask" not in t:
            continue
        if train_only and not slot["meta"].get("train", False):
            continue
        out.append(
            Observation(
                session=sid,
                step=step,
                mask=t["mask"].to(torch.long),
                h1=t.get("h1"),
                h2=t.get("h2"),
                g2=t.get("g2"),
                g1=t.get("g1"),
                meta=slot["meta"],
            )
        )
    return out
