"""Client side of the Offline design's two transfers: emulator download and adapter-bundle upload.

Download: the signed manifest first (its signature is checked with the *pinned* provider key before anything
else), then every listed file in chunks of at most 4 MiB, each checked against the SHA-256 the provider sent
with it and appended to ``NAME.part``. A cut transfer resumes from the size of the ``.part`` files; a file is
renamed into place only when its whole-file SHA-256 equals the signed one, and the folder is verified once
more as a whole at the end. Partial files of another manifest (the provider rebuilt its emulator) are
discarded, never mixed.

Upload: the trained PEFT adapter plus a manifest signed with the client's key (:func:`make_adapter_bundle`),
sent file by file in chunks; the last chunk commits, and the provider answers with its verification result.
These UPLOAD messages are the only data-derived bytes a client sends in this design.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from guardedp2p.crypto.manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    DigestMismatchError,
    Manifest,
    parse_signature,
    resolve_in,
    sha256_file,
    sign_folder,
    verify_artifact,
    verify_manifest_bytes,
)
from guardedp2p.designs.offline.plugin import ADAPTER_FILES, BUNDLE_KIND
from guardedp2p.errors import ProtocolError
from guardedp2p.wire.codes import ErrorCode
from guardedp2p.wire.framing import Message
from guardedp2p.wire.messages import MsgType

log = logging.getLogger("guardedp2p.client")

CHUNK_SIZE = 4 * 1024 * 1024
PARTIAL_MANIFEST = ".manifest.partial"


class TransferError(ProtocolError):
    """A chunk arrived damaged or not as requested (the transfer can be resumed)."""

    code = ErrorCode.TRANSFER


@dataclass
class TransferStats:
    files: int = 0
    chunks: int = 0
    bytes_fetched: int = 0  # payload bytes fetched in this call
    bytes_resumed: int = 0  # payload bytes already on disk from an earlier, interrupted call
    bytes_total: int = 0
    seconds: float = 0.0
    by_file: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "chunks": self.chunks,
            "bytes_fetched": self.bytes_fetched,
            "bytes_resumed": self.bytes_resumed,
            "bytes_total": self.bytes_total,
            "seconds": round(self.seconds, 3),
        }


class _Steps:
    """Step ids for requests (the client session checks each reply carries the request's step)."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> int:
        self.n += 1
        return self.n


def fetch_manifest(session: Any, verify_key: Any, steps: _Steps | None = None) -> Manifest:
    """Ask for the emulator manifest and verify its signature with the pinned provider key."""
    steps = steps or _Steps()
    reply = session.request(Message(MsgType.MANIFEST_REQ, step=steps()), expect=MsgType.MANIFEST)
    text, sig = reply.meta.get("manifest"), reply.meta.get("signature")
    if not isinstance(text, str) or not isinstance(sig, str):
        raise ProtocolError("the MANIFEST reply carries no manifest text and signature")
    return verify_manifest_bytes(
        text.encode("ascii", errors="strict"), parse_signature(sig), verify_key, kind="emulator"
    )


def _progress(enabled: bool, console: Any, total: int, done: int, label: str) -> tuple[Any, Any]:
    if not enabled:
        return nullcontext(), None
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    bar = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    return bar, (total, done)


def download_emulator(
    session: Any,
    dest: str | Path,
    verify_key: Any,
    *,
    chunk_size: int = CHUNK_SIZE,
    progress: bool = False,
    console: Any = None,
    stats: TransferStats | None = None,
) -> tuple[Manifest, TransferStats]:
    """Download (or finish downloading) the emulator into ``dest``; returns the verified manifest.

    Raises transport errors as they come (the caller reconnects and calls again: finished files are kept,
    ``.part`` files continue where they stopped) and :class:`DigestMismatchError` for a file whose bytes do
    not hash to the signed digest (its partial file is deleted so the retry starts it over).
    """
    if not 1 <= chunk_size <= CHUNK_SIZE:
        raise ValueError(f"chunk_size must be in [1, {CHUNK_SIZE}]")
    t0 = time.perf_counter()
    stats = stats or TransferStats()
    steps = _Steps()
    manifest = fetch_manifest(session, verify_key, steps)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    marker = dest / PARTIAL_MANIFEST
    if marker.exists() and marker.read_bytes() != manifest.raw:
        log.info("the provider's emulator changed since the interrupted download: starting over")
        for p in dest.rglob("*.part"):
            p.unlink()
    marker.write_bytes(manifest.raw)
    entries = manifest.files
    stats.bytes_total = manifest.total_bytes
    done_before = 0
    plan = []
    for name in sorted(entries):
        e = entries[name]
        final = resolve_in(dest, name)
        part = final.with_name(final.name + ".part")
        if final.is_file() and final.stat().st_size == e.size and sha256_file(final) == e.sha256:
            done_before += e.size
            continue
        have = part.stat().st_size if part.is_file() else 0
        if have > e.size:
            part.unlink()
            have = 0
        done_before += have
        plan.append((name, e, final, part, have))
    stats.bytes_resumed += done_before
    ctx, init = _progress(progress, console, manifest.total_bytes, done_before, "downloading the emulator")
    with ctx as bar:
        task = bar.add_task("dl", total=init[0], completed=init[1]) if bar is not None else None
        for name, e, final, part, offset in plan:
            final.parent.mkdir(parents=True, exist_ok=True)
            with open(part, "ab") as fh:
                while offset < e.size:
                    want = min(chunk_size, e.size - offset)
                    reply = session.request(
                        Message(MsgType.CHUNK_REQ, step=steps(), meta={"file": name, "offset": offset, "length": want}),
                        expect=MsgType.CHUNK,
                    )
                    data = _chunk_bytes(reply, name, offset, want)
                    fh.write(data)
                    fh.flush()
                    offset += len(data)
                    stats.chunks += 1
                    stats.bytes_fetched += len(data)
                    stats.by_file[name] = stats.by_file.get(name, 0) + len(data)
                    if bar is not None:
                        bar.update(task, advance=len(data))
                os.fsync(fh.fileno())
            if sha256_file(part) != e.sha256:
                part.unlink()
                raise DigestMismatchError(
                    f"{name} does not hash to the signed SHA-256 after download; it will be fetched again"
                )
            os.replace(part, final)
            stats.files += 1
    (dest / MANIFEST_NAME).write_bytes(manifest.raw)
    (dest / SIGNATURE_NAME).write_text(manifest.signature.hex() + "\n")
    verified = verify_artifact(dest, verify_key, kind="emulator")
    marker.unlink(missing_ok=True)
    stats.seconds += time.perf_counter() - t0
    return verified, stats


def _chunk_bytes(reply: Message, name: str, offset: int, want: int) -> bytes:
    meta = reply.meta
    if meta.get("file") != name or meta.get("offset") != offset:
        raise TransferError(f"asked for {name}@{offset}, got {str(meta.get('file'))[:60]}@{meta.get('offset')}")
    t = reply.tensors.get("data")
    if t is None or t.dtype != torch.uint8 or t.dim() != 1 or t.numel() != want:
        raise TransferError(f"chunk {name}@{offset} should hold {want} bytes")
    data = t.numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise TransferError(f"chunk {name}@{offset} is damaged (SHA-256 mismatch); resume to fetch it again")
    return data


# ============================================================================================ upload
def make_adapter_bundle(
    adapter_dir: str | Path,
    bundle_dir: str | Path,
    signing_key: Any,
    *,
    emulator_manifest: Manifest,
    extra: Mapping[str, Any] | None = None,
) -> Manifest:
    """Copy the PEFT adapter into ``bundle_dir`` and sign it, citing the emulator it was trained on."""
    src, out = Path(adapter_dir), Path(bundle_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        shutil.copyfile(src / name, out / name)
    body = {
        "kind": BUNDLE_KIND,
        "base_fingerprint": emulator_manifest["fingerprint"],
        "split": dict(emulator_manifest["split"]),
        "emulator_manifest_sha256": emulator_manifest.sha256,
        "adapter": {
            "format": "peft-lora",
            "client_layers": list(emulator_manifest["layers"]["adapter_bottom"])
            + list(emulator_manifest["layers"]["adapter_top"]),
        },
    }
    if extra:
        body["training"] = dict(extra)
    return sign_folder(out, body, ADAPTER_FILES, signing_key)


def upload_bundle(session: Any, bundle_dir: str | Path, *, chunk_size: int = CHUNK_SIZE) -> dict[str, Any]:
    """Send the four bundle files in chunks; the last chunk commits. Returns the provider's commit reply."""
    bundle_dir = Path(bundle_dir)
    order = [*ADAPTER_FILES, MANIFEST_NAME, SIGNATURE_NAME]
    steps = _Steps()
    result: dict[str, Any] = {}
    for i, name in enumerate(order):
        data = (bundle_dir / name).read_bytes()
        offset = 0
        while True:
            piece = data[offset : offset + chunk_size]
            last = offset + len(piece) >= len(data)
            commit = last and i == len(order) - 1
            tensor = (
                torch.frombuffer(bytearray(piece), dtype=torch.uint8) if piece else torch.empty(0, dtype=torch.uint8)
            )
            msg = Message(
                MsgType.UPLOAD,
                step=steps(),
                tensors={"data": tensor},
                meta={
                    "file": name,
                    "offset": offset,
                    "total": len(data),
                    "sha256": hashlib.sha256(piece).hexdigest(),
                    "commit": commit,
                },
            )
            reply = session.request(msg, expect=MsgType.UPLOAD_ACK)
            if reply.meta.get("received") != offset + len(piece):
                raise TransferError(
                    f"the provider acknowledged {reply.meta.get('received')} bytes of {name}, expected {offset + len(piece)}"
                )
            offset += len(piece)
            if commit:
                result = dict(reply.meta)
            if last:
                break
    if not result.get("committed"):
        raise TransferError("the provider did not confirm the adapter bundle")
    return result
