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

Pinned signers and quotas (issue 20, SECURITY.md). A bundle is tied to the client key that uploads it: it must be
signed by a signing key pinned for that CURVE key (``ProviderResources.client_sign_keys``: the ``NAME.sign.pub``
lying beside an allowed ``NAME.key``, and every ``provider serve --client-sign-key``), or, with
``accept_unpinned``, by any key (integrity only, ``signer_pinned: false``). Staged bytes are capped per key and in
total, accepted bundles per key, and the upload folder as a whole; a session's staged upload is deleted when the
session ends (BYE, disconnect, idle timeout). Each accepted bundle's folder is logged and listed in
``UPLOAD_DIR/uploads.jsonl`` with the key that uploaded it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from guardedp2p.crypto.keys import PUBLIC_SUFFIX, SIGN_PUBLIC_SUFFIX, is_z85_key, load_public_key, load_verify_key
from guardedp2p.crypto.manifest import MANIFEST_NAME, SIGNATURE_NAME, FileEntry, parse_signature, resolve_in
from guardedp2p.errors import ArtifactError, ConfigError, GuardedP2PError, ProtocolError
from guardedp2p.protocol.provider import OverBudget
from guardedp2p.wire.codes import ErrorCode
from guardedp2p.wire.framing import Message
from guardedp2p.wire.messages import MsgType

if TYPE_CHECKING:
    from guardedp2p.protocol.provider import ProviderApp

log = logging.getLogger("guardedp2p.provider")

MAX_CHUNK = 4 * 1024 * 1024
DEFAULT_MAX_UPLOAD = 256 * 1024 * 1024
BUNDLE_FILES = ("adapter_config.json", "adapter_model.safetensors", MANIFEST_NAME, SIGNATURE_NAME)
UPLOAD_INDEX = "uploads.jsonl"
ANY_UPLOADER = "*"
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


class SignerPins(Mapping[str, list[Path]]):
    """Which client signing keys may sign the bundles each client CURVE key uploads: z85 key -> NAME.sign.pub files.

    Read from the files each time it is looked up (a commit is rare), so a key pair added to an ``--allow-dir``
    while serving is pinned at once:

    * automatically, the ``NAME.sign.pub`` lying beside each allowed ``NAME.key`` (``allow`` files, ``allow_dirs``);
    * ``sign_keys`` (``--client-sign-key``): ``SIGN.pub`` is tied to the ``NAME.key`` beside it, ``SIGN.pub=CLIENT``
      to the CURVE key ``CLIENT`` (a ``NAME.key`` file or a z85 key). ``SIGN.pub=*`` trusts it for every uploader.
    """

    def __init__(
        self,
        allow: Sequence[str | os.PathLike[str]] = (),
        allow_dirs: Sequence[str | os.PathLike[str]] = (),
        sign_keys: Sequence[str] = (),
    ) -> None:
        self.allow = [str(a) for a in allow]
        self.allow_dirs = [str(d) for d in allow_dirs]
        self.sign_keys = list(sign_keys)
        self.table()  # refuse a bad --client-sign-key at startup, not at the first upload

    def table(self) -> dict[str, list[Path]]:
        pins: dict[str, list[Path]] = {}
        curve_files = [Path(a) for a in self.allow if not is_z85_key(a)]
        for d in self.allow_dirs:
            try:
                curve_files.extend(sorted(Path(d).expanduser().glob(f"*{PUBLIC_SUFFIX}")))
            except OSError:
                continue
        for f in curve_files:
            sign = f.with_name(f.name[: -len(PUBLIC_SUFFIX)] + SIGN_PUBLIC_SUFFIX)
            if f.name.endswith(PUBLIC_SUFFIX) and sign.is_file():
                try:
                    pins.setdefault(load_public_key(f), []).append(sign)
                except (GuardedP2PError, OSError):
                    continue  # an unreadable key file is the allow-list's to report
        for spec in self.sign_keys:
            sign_s, _, owner = spec.partition("=")
            sign = Path(sign_s).expanduser()
            try:
                load_verify_key(sign)
            except (GuardedP2PError, OSError) as exc:
                raise ConfigError(f"--client-sign-key {spec}: {exc}") from None
            if owner == ANY_UPLOADER:
                pins.setdefault(ANY_UPLOADER, []).append(sign)
                continue
            if not owner:
                if not sign.name.endswith(SIGN_PUBLIC_SUFFIX):
                    raise ConfigError(
                        f"--client-sign-key {spec}: name the client it belongs to (SIGN.pub=CLIENT.key), or use the "
                        f"NAME{SIGN_PUBLIC_SUFFIX} lying beside the client's NAME{PUBLIC_SUFFIX}"
                    )
                owner = str(sign.with_name(sign.name[: -len(SIGN_PUBLIC_SUFFIX)] + PUBLIC_SUFFIX))
            try:
                pins.setdefault(load_public_key(owner), []).append(sign)
            except (GuardedP2PError, OSError) as exc:
                raise ConfigError(
                    f"--client-sign-key {spec}: cannot read the client key it is tied to ({exc}); write "
                    "SIGN.pub=CLIENT.key (or =*, for every client)"
                ) from None
        return pins

    def __getitem__(self, key: str) -> list[Path]:
        return self.table()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.table())

    def __len__(self) -> int:
        return len(self.table())


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
            log.warning(
                "no upload folder was given: adapter bundles go to %s (a temporary folder; pass --upload-dir)", root
            )
        p = Path(root)
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def peer(self) -> str:
        state = self.app.sessions.get(self.sid)
        return state.peer if state is not None else ""

    @property
    def staged_bytes(self) -> int:
        return sum(self.received.values())

    def _signing_keys(self) -> list[Any]:
        """The verify keys a bundle of this session's client must be signed with (empty: none is pinned)."""
        res = self.app.resources
        pins = res.client_sign_keys
        peer = self.peer
        keys: list[Any] = list(pins.get(peer, ())) + list(pins.get(ANY_UPLOADER, ()))
        if peer.startswith("insecure:"):  # no authenticated key to tie a bundle to: every pinned key counts
            keys = [k for ks in pins.values() for k in ks]
        keys += list(res.client_verify_keys or ())
        return keys

    def _check_quotas(self, name: str, new_bytes: int) -> None:
        res = self.app.resources
        peer = self.peer
        mine = others = 0
        for state in list(self.app.sessions.values()):
            if isinstance(state.handler, OfflineSession) and state.handler is not self:
                if state.peer == peer:
                    mine += state.handler.staged_bytes
                else:
                    others += state.handler.staged_bytes
        mine += self.staged_bytes + new_bytes
        if mine > res.max_staged_upload_bytes_per_peer:
            raise OverBudget(
                f"this client key's unfinished uploads would take {mine / 2**20:.1f} MiB, over the provider's limit of "
                f"{res.max_staged_upload_bytes_per_peer / 2**20:.0f} MiB (--max-staged-upload-mib-per-key)"
            )
        if mine + others > res.max_staged_upload_bytes:
            raise OverBudget("the provider holds as many unfinished uploads as it allows; try again later")

    def _check_bundle_quota(self, incoming: int) -> None:
        """Before a new bundle is staged and again at commit: accepted bundles per key, the folder's size."""
        res = self.app.resources
        root = self._upload_root()
        count = _accepted_count(root, self.peer)
        if count >= res.max_uploads_per_peer:
            raise OverBudget(
                f"this client key already uploaded {count} adapter bundle(s), the provider's limit "
                "(--max-uploads-per-key); ask the operator to make room"
            )
        used = _folder_bytes(root)
        if used + incoming > res.max_upload_dir_bytes:
            raise OverBudget(
                f"the provider's upload folder is full ({used / 2**20:.0f} MiB of {res.max_upload_dir_bytes / 2**20:.0f} "
                "MiB, --max-upload-dir-mib); ask the operator to make room"
            )

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
        if self.staging is None and not self._signing_keys() and self.app.resources.accept_unpinned is False:
            raise UploadRefused(
                "no signing key is pinned for this client, so its adapter bundle cannot be tied to it: the operator "
                "adds the client's NAME.sign.pub (beside its NAME.key in --allow-dir, or --client-sign-key), or "
                "starts the provider with --accept-unpinned"
            )
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
        self._check_quotas(name, max(0, offset + len(data) - have))
        if self.staging is None:
            self._check_bundle_quota(total)
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
        keys = self._signing_keys()
        if not keys and self.app.resources.accept_unpinned is False:
            raise UploadRefused("no signing key is pinned for this client (see the first UPLOAD's refusal)")
        try:
            self._check_bundle_quota(0)
            verified = verify_adapter_bundle(
                self.staging, keys or None, emulator_manifest_sha256=self.catalog.manifest_sha256
            )
        except (ArtifactError, OverBudget) as exc:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging, self.received = None, {}
            if isinstance(exc, OverBudget):
                raise
            raise UploadRefused(f"the adapter bundle failed verification: {exc}") from None
        bundle_id = verified.manifest.sha256[:16]
        root = self._upload_root()
        final = root / f"bundle-{bundle_id}"
        shutil.rmtree(final, ignore_errors=True)
        self.staging.rename(final)
        self.staging, self.received = None, {}
        if not verified.signer_pinned and self.app.resources.accept_unpinned is None:
            log.warning(
                "session %s: adapter bundle %s is signed by a key pinned nowhere (integrity only); pin the client's "
                "signing key (provider serve --client-sign-key) to tie bundles to their uploader",
                self.sid[:8],
                bundle_id,
            )
        _record_upload(root, bundle_id, final, self.peer, verified.signer, verified.signer_pinned)
        log.info(
            "session %s: adapter bundle %s accepted from %s (signer %s, pinned=%s), stored in %s",
            self.sid[:8],
            bundle_id,
            self.peer[:12] + "…",
            verified.signer,
            verified.signer_pinned,
            final,
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


def _record_upload(root: Path, bundle_id: str, folder: Path, peer: str, signer: str, pinned: bool) -> None:
    """One line per accepted bundle in ``UPLOAD_DIR/uploads.jsonl``: which key uploaded which bundle, where."""
    line = {
        "bundle_id": bundle_id,
        "folder": str(folder),
        "uploader": peer,
        "signer": signer,
        "signer_pinned": pinned,
        "time": time.time(),
    }
    with open(root / UPLOAD_INDEX, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(line) + "\n")


def _accepted_count(root: Path, peer: str) -> int:
    try:
        lines = (root / UPLOAD_INDEX).read_text(encoding="utf-8").splitlines()
    except OSError:
        return 0
    n = 0
    for line in lines:
        try:
            n += json.loads(line).get("uploader") == peer
        except (ValueError, AttributeError):
            continue
    return n


def _folder_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                total += os.stat(os.path.join(dirpath, f), follow_symlinks=False).st_size
            except OSError:
                pass
    return total


def offline_session(app: ProviderApp, sid: str, terms: dict[str, Any], *, peer: str = "") -> OfflineSession:
    return OfflineSession(app, sid, terms)  # the session reads its peer from the app (SessionState) when it needs it
