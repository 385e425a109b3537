"""Offline design, provider side: serve the signed emulator in chunks and receive the signed adapter bundle.

A session answers three requests (``SESSION_TYPES["offline"]``):

``MANIFEST_REQ -> MANIFEST``
    the emulator's ``manifest.json`` text and its Ed25519 signature (hex) in ``meta``.
``CHUNK_REQ(file, offset, length <= 4 MiB) -> CHUNK``
    those bytes as a uint8 tensor plus their SHA-256. ``file`` is looked up in the manifest's file table;
    a name that is not there is refused, so no path outside the emulator folder can ever be served.
``UPLOAD(file, offset, total, sha256, commit) -> UPLOAD_ACK``
    one chunk of the client's adapter bundle. Only the four bundle file names are accepted, each chunk's
    SHA-256 is checked, the total per session is capped, and on ``commit`` the whole bundle is verified
    (signature + digests + that it was trained on *this* emulator) before it is kept.

The provider never loads the uploaded tensors here; :mod:`guardedp2p.designs.offline.plugin` does that later, after
verifying the bundle again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from guardedp2p.crypto.manifest import MANIFEST_NAME, SIGNATURE_NAME, FileEntry, parse_signature, resolve_in
from guardedp2p.errors import ArtifactError, ConfigError, ProtocolError
from guardedp2p.wire.codes import ErrorCode
from guardedp2p.wire.framing import Message
from guardedp2p.wire.messages import MsgType

if TYPE_CHECKING:
    from guardedp2p.protocol.provider import ProviderApp

log = logging.getLogger("guardedp2p.provider")

MAX_CHUNK = 4 * 1024 * 1024
DEFAULT_MAX_UPLOAD = 256 * 1024 * 1024
BUNDLE_FILES = ("adapter_config.json", "adapter_model.safetensors", MANIFEST_NAME, SIGNATURE_NAME)
_HEX64 = frozenset("0123456789abcdef")


class BadRequest(ProtocolError):
    code = ErrorCode.BAD_REQUEST


class UnknownFile(ProtocolError):
    code = ErrorCode.UNKNOWN_FILE


class UploadRefused(ProtocolError):
    code = ErrorCode.UPLOAD_REFUSED


class EmulatorUnavailable(ProtocolError):
    code = ErrorCode.NO_EMULATOR


@dataclass(frozen=True)
class EmulatorCatalog:
    """The provider's emulator as served: signed manifest bytes and a name -> (path, size) table."""

    folder: Path
    manifest_raw: bytes
    signature: bytes
    files: dict[str, tuple[Path, FileEntry]]

    @property
    def manifest_sha256(self) -> str:
        return hashlib.sha256(self.manifest_raw).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(e.size for _, e in self.files.values())


def load_catalog(folder: str | os.PathLike[str]) -> EmulatorCatalog:
    """Read the provider's own emulator manifest and map its file names to paths inside ``folder``.

    Sizes are checked (cheap); digests are not re-hashed on every start (they were computed when signing, and
    every client verifies them anyway).
    """
    folder = Path(folder)
    try:
        raw = (folder / MANIFEST_NAME).read_bytes()
        sig = parse_signature((folder / SIGNATURE_NAME).read_bytes()[:300])
        data = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{folder} is not a signed emulator folder ({exc}); build one with `guardedp2p provider emulator build`"
        ) from None
    if not isinstance(data, dict) or data.get("kind") != "emulator" or not isinstance(data.get("files"), dict):
        raise ConfigError(f"{folder / MANIFEST_NAME} is not an emulator manifest")
    files: dict[str, tuple[Path, FileEntry]] = {}
    for name, e in data["files"].items():
        path = resolve_in(folder, name)
        entry = FileEntry(name, int(e["size"]), str(e["sha256"]))
        if not path.is_file() or path.stat().st_size != entry.size:
            raise ConfigError(f"emulator file {path} is missing or has the wrong size; rebuild the emulator")
        files[name] = (path, entry)
    return EmulatorCatalog(folder, raw, sig, files)


@dataclass(frozen=True)
class _CachedCatalog:
    """The parsed catalog of one emulator folder, valid while its manifest's mtime is unchanged."""

    key: tuple[str, int | None]
    catalog: EmulatorCatalog


def _catalog(app: ProviderApp) -> EmulatorCatalog:
    folder = app.resources.emulator_dir
    if not folder:
        raise EmulatorUnavailable("this provider serves no emulator (start it with --emulator DIR)")
    cached = app.resources.caches.get("offline")
    mtime = (Path(folder) / MANIFEST_NAME).stat().st_mtime_ns if (Path(folder) / MANIFEST_NAME).exists() else None
    key = (str(folder), mtime)
    if isinstance(cached, _CachedCatalog) and cached.key == key:
        return cached.catalog
    cat = load_catalog(folder)
    app.resources.caches["offline"] = _CachedCatalog(key, cat)
    return cat


def _int(meta: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = meta.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise BadRequest(f"meta field {key!r} must be an integer in [{lo}, {hi}], got {str(v)[:30]!r}")
    return v


def _bytes_tensor(msg: Message) -> bytes:
    t = msg.tensors.get("data")
    if t is None or t.dtype != torch.uint8 or t.dim() != 1:
        raise BadRequest("the chunk must travel as tensor 'data' (uint8, 1-D)")
    return t.numpy().tobytes()


class OfflineSession:
    """Provider side of one Offline session."""

    def __init__(self, app: ProviderApp, sid: str, terms: dict[str, Any]) -> None:
        self.app = app
        self.sid = sid
        self.catalog = _catalog(app)
        limit = app.resources.max_upload_bytes
        self.max_upload = DEFAULT_MAX_UPLOAD if limit is None else int(limit)
        self.staging: Path | None = None
        self.received: dict[str, int] = {}
        self.bytes_served = 0
        self.handlers = {
            MsgType.MANIFEST_REQ: self.on_manifest_req,
            MsgType.CHUNK_REQ: self.on_chunk_req,
            MsgType.UPLOAD: self.on_upload,
        }

    # ------------------------------------------------------------------ download
    def on_manifest_req(self, msg: Message) -> Message:
        c = self.catalog
        return Message(
            MsgType.MANIFEST,
            session=self.sid,
            step=msg.step,
            meta={
                "kind": "emulator",
                "manifest": c.manifest_raw.decode("ascii"),
                "signature": c.signature.hex(),
                "total_bytes": c.total_bytes,
                "max_chunk": MAX_CHUNK,
            },
        )

    def on_chunk_req(self, msg: Message) -> Message:
        t0 = time.perf_counter()
        name = msg.meta.get("file")
        if not isinstance(name, str) or name not in self.catalog.files:
            raise UnknownFile(f"file {str(name)[:80]!r} is not in the emulator manifest")
        path, entry = self.catalog.files[name]
        offset = _int(msg.meta, "offset", 0, entry.size)
        length = _int(msg.meta, "length", 1, MAX_CHUNK)
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(min(length, entry.size - offset))
        self.bytes_served += len(data)
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return Message(
            MsgType.CHUNK,
            session=self.sid,
            step=msg.step,
            tensors={"data": tensor},
            meta={
                "file": name,
                "offset": offset,
                "length": len(data),
                "size": entry.size,
                "eof": offset + len(data) >= entry.size,
                "sha256": hashlib.sha256(data).hexdigest(),
                "compute_s": time.perf_counter() - t0,
            },
        )

    # ------------------------------------------------------------------ upload
    def _upload_root(self) -> Path:
        root = self.app.resources.upload_dir
        if not root:
            root = tempfile.mkdtemp(prefix="guardedp2p-uploads-")
            self.app.resources.upload_dir = root
        p = Path(root)
        p.mkdir(parents=True, exist_ok=True)
        return p

    def on_upload(self, msg: Message) -> Message:
        name = msg.meta.get("file")
        if not isinstance(name, str) or name not in BUNDLE_FILES:
            raise UploadRefused(f"an adapter bundle holds only {', '.join(BUNDLE_FILES)}; got {str(name)[:80]!r}")
        total = _int(msg.meta, "total", 0, 1 << 50)
        if total > self.max_upload:
            raise UploadRefused(
                f"{name} of {total} bytes exceeds this provider's upload limit of {self.max_upload} bytes"
            )
        offset = _int(msg.meta, "offset", 0, total)
        digest = msg.meta.get("sha256")
        if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX64:
            raise BadRequest("meta field 'sha256' must be 64 lowercase hex digits")
        data = _bytes_tensor(msg)
        if hashlib.sha256(data).hexdigest() != digest:
            raise UploadRefused(
                f"chunk of {name} at offset {offset} does not match its SHA-256 (corrupted); send it again"
            )
        if offset + len(data) > total:
            raise UploadRefused(f"chunk runs past the declared size of {name} ({total} bytes)")
        have = self.received.get(name, 0)
        if offset > have:
            raise UploadRefused(f"{name}: chunk at offset {offset} leaves a gap (received {have} bytes so far)")
        others = sum(v for k, v in self.received.items() if k != name)
        if others + offset + len(data) > self.max_upload:
            raise UploadRefused(f"the adapter bundle exceeds this provider's upload limit of {self.max_upload} bytes")
        if self.staging is None:
            self.staging = Path(tempfile.mkdtemp(prefix=f"incoming-{self.sid[:8]}-", dir=self._upload_root()))
        path = self.staging / name  # name is one of the four fixed names above, never a peer-chosen path
        with open(path, "r+b" if path.exists() else "wb") as fh:
            fh.truncate(offset)  # a re-sent chunk (lost reply) overwrites, it never duplicates
            fh.seek(offset)
            fh.write(data)
        self.received[name] = offset + len(data)
        meta: dict[str, Any] = {"file": name, "received": self.received[name]}
        if msg.meta.get("commit") is True:
            meta.update(self._commit())
        return Message(MsgType.UPLOAD_ACK, session=self.sid, step=msg.step, meta=meta)

    def _commit(self) -> dict[str, Any]:
        from guardedp2p.designs.offline.plugin import verify_adapter_bundle

        assert self.staging is not None
        missing = [n for n in BUNDLE_FILES if not (self.staging / n).is_file()]
        if missing:
            raise UploadRefused(f"commit before the whole bundle arrived (missing {', '.join(missing)})")
        try:
            verified = verify_adapter_bundle(
                self.staging,
                self.app.resources.client_verify_keys,
                emulator_manifest_sha256=self.catalog.manifest_sha256,
            )
        except ArtifactError as exc:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging, self.received = None, {}
            raise UploadRefused(f"the adapter bundle failed verification: {exc}") from None
        bundle_id = verified.manifest.sha256[:16]
        final = self._upload_root() / f"bundle-{bundle_id}"
        shutil.rmtree(final, ignore_errors=True)
        self.staging.rename(final)
        self.staging, self.received = None, {}
        log.info(
            "session %s: adapter bundle %s accepted (signer %s, pinned=%s)",
            self.sid[:8],
            bundle_id,
            verified.signer,
            verified.signer_pinned,
        )
        hook = self.app.resources.on_adapter_bundle
        if hook is not None:
            try:
                hook(final, verified)
            except Exception:  # noqa: BLE001 - a failing local hook must not fail the client's upload
                log.exception("the on_adapter_bundle hook failed for %s", final)
        return {
            "committed": True,
            "bundle_id": bundle_id,
            "verified": True,
            "signer": verified.signer,
            "signer_pinned": verified.signer_pinned,
            "bundle_sha256": verified.manifest.sha256,
        }

    # ------------------------------------------------------------------ lifecycle
    def expire(self, now: float) -> None:
        pass

    def close(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None


def offline_session(app: ProviderApp, sid: str, terms: dict[str, Any]) -> OfflineSession:
    return OfflineSession(app, sid, terms)
