"""Signed manifests: what an artifact folder holds, the SHA-256 of every file, and an Ed25519 signature.

Both one-off transfers of the Offline design are signed artifacts: the provider's emulator (provider -> client)
and the client's adapter bundle (client -> provider). The receiver verifies in a fixed order and loads nothing
before the last check passed:

1. the signature over the exact bytes of ``manifest.json`` (raw bytes, before any JSON parsing);
2. the manifest's shape (format, version, kind, file table, safe relative file names);
3. every listed file: present, of the listed size, with the listed SHA-256.

Each failure is its own :class:`~guardedp2p.errors.ArtifactError` subclass, so callers and the CLI can say
exactly what is wrong (bad signature, digest mismatch, missing file). File names are only ever mapped to paths
through a verified manifest and must stay inside the artifact folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from guardedp2p.crypto.keys import fingerprint
from guardedp2p.errors import ArtifactError

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
FORMAT = "guardedp2p-artifact"
VERSION = 1
MAX_MANIFEST_BYTES = 12 * 1024  # travels inside one MANIFEST message header (wire limit: 16 KiB strings)
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class BadSignatureError(ArtifactError):
    """The manifest's signature does not verify with the trusted public key (tampered, or signed by someone else)."""


class DigestMismatchError(ArtifactError):
    """A file's size or SHA-256 differs from what the signed manifest lists (corrupted or tampered)."""


class MissingFileError(ArtifactError):
    """A file the manifest lists (or the manifest / signature itself) is absent."""


class ManifestFormatError(ArtifactError):
    """The manifest is not a guardedp2p artifact manifest, or lists unsafe file names."""


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A manifest whose signature has been verified (only :func:`verify_manifest_bytes` makes one)."""

    data: dict[str, Any]
    raw: bytes
    signature: bytes

    @property
    def sha256(self) -> str:
        """Digest of the signed bytes: what a later artifact cites to say which manifest it builds on."""
        return hashlib.sha256(self.raw).hexdigest()

    @property
    def kind(self) -> str:
        return str(self.data["kind"])

    @property
    def files(self) -> dict[str, FileEntry]:
        return {n: FileEntry(n, int(e["size"]), str(e["sha256"])) for n, e in self.data["files"].items()}

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files.values())

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)


# ---------------------------------------------------------------------------------------------- helpers
def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def safe_name(name: Any) -> str:
    """Accept only short relative POSIX names made of safe components (``tokenizer/tokenizer.json``)."""
    if not isinstance(name, str) or not name or len(name) > 200 or "\\" in name or "\x00" in name:
        raise ManifestFormatError(f"unsafe file name in manifest: {str(name)[:60]!r}")
    p = PurePosixPath(name)
    if p.is_absolute() or len(p.parts) > 3 or any(not _NAME_RE.match(part) or part in (".", "..") for part in p.parts):
        raise ManifestFormatError(
            f"unsafe file name in manifest: {name[:60]!r} (relative names of [A-Za-z0-9_.-] only)"
        )
    if str(p) != name or name in (MANIFEST_NAME, SIGNATURE_NAME):
        raise ManifestFormatError(f"file name {name[:60]!r} is not in canonical form or is reserved")
    return name


def resolve_in(folder: str | Path, name: str) -> Path:
    """Path of manifest file ``name`` inside ``folder``; refuses anything that would resolve outside it."""
    root = Path(folder).resolve()
    path = (root / safe_name(name)).resolve()
    if not path.is_relative_to(root):
        raise ManifestFormatError(f"{name!r} resolves outside the artifact folder (symbolic link?)")
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def public_key_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def key_fingerprint(key: Ed25519PublicKey) -> str:
    """Deprecated alias of :func:`guardedp2p.crypto.keys.fingerprint`; goes away in 0.3."""
    import warnings

    warnings.warn(
        "guardedp2p.crypto.manifest.key_fingerprint is deprecated: use guardedp2p.crypto.keys.fingerprint",
        DeprecationWarning,
        stacklevel=2,
    )
    return fingerprint(key)


def load_key(key: Ed25519PublicKey | str | os.PathLike) -> Ed25519PublicKey:
    if isinstance(key, Ed25519PublicKey):
        return key
    from guardedp2p.crypto.keys import load_verify_key

    return load_verify_key(key)


# ---------------------------------------------------------------------------------------------- writing
def sign_folder(
    folder: str | Path, body: Mapping[str, Any], files: Iterable[str], signing_key: Ed25519PrivateKey
) -> Manifest:
    """Hash ``files`` (names relative to ``folder``), write ``manifest.json`` + ``manifest.sig``; return the manifest.

    ``body`` must carry ``kind``; ``format``, ``version``, ``created``, ``files`` and the signer are added here.
    """
    folder = Path(folder)
    if "kind" not in body:
        raise ManifestFormatError("a manifest body needs a 'kind'")
    table: dict[str, dict[str, Any]] = {}
    for name in sorted(set(files)):
        path = resolve_in(folder, name)
        if not path.is_file():
            raise MissingFileError(f"cannot sign {folder}: {name} does not exist")
        table[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    pub = signing_key.public_key()
    data = dict(body)
    data.update(
        {
            "format": FORMAT,
            "version": VERSION,
            "created": data.get("created") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": table,
            "signer": {"fingerprint": fingerprint(pub), "public_key": public_key_hex(pub)},
        }
    )
    raw = canonical_json(data)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestFormatError(f"manifest of {len(raw)} bytes exceeds {MAX_MANIFEST_BYTES}; ship fewer files")
    sig = signing_key.sign(raw)
    (folder / MANIFEST_NAME).write_bytes(raw)
    (folder / SIGNATURE_NAME).write_text(sig.hex() + "\n")
    return Manifest(data, raw, sig)


# ---------------------------------------------------------------------------------------------- reading
def parse_signature(text: str | bytes) -> bytes:
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise BadSignatureError("the signature is not hex text") from None
    text = text.strip()
    if not re.fullmatch(r"[0-9a-f]{128}", text):
        raise BadSignatureError("the signature must be 128 hex digits (an Ed25519 signature)")
    return bytes.fromhex(text)


def _check_shape(data: Any, kind: str | None) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ManifestFormatError("the manifest is not a JSON object")
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ManifestFormatError(
            f"not a {FORMAT} v{VERSION} manifest (format={data.get('format')!r}, version={data.get('version')!r})"
        )
    if not isinstance(data.get("kind"), str):
        raise ManifestFormatError("the manifest has no kind")
    if kind is not None and data["kind"] != kind:
        raise ManifestFormatError(f"expected a {kind!r} artifact, this manifest is a {data['kind']!r}")
    files = data.get("files")
    if not isinstance(files, dict) or not files:
        raise ManifestFormatError("the manifest lists no files")
    for name, entry in files.items():
        safe_name(name)
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("size"), int)
            or isinstance(entry.get("size"), bool)
            or entry["size"] < 0
        ):
            raise ManifestFormatError(f"bad size for {name!r} in the manifest")
        if not isinstance(entry.get("sha256"), str) or not _HEX64.match(entry["sha256"]):
            raise ManifestFormatError(f"bad sha256 for {name!r} in the manifest")
    return data


def verify_manifest_bytes(
    raw: bytes,
    signature: bytes,
    verify_key: Ed25519PublicKey | str | os.PathLike | None,
    *,
    kind: str | None = None,
) -> Manifest:
    """Verify ``signature`` over ``raw`` (before parsing it), then check the manifest's shape.

    ``verify_key=None`` trusts the public key embedded in the manifest: that proves the files are what the
    signer listed, not *who* signed; callers must say so (``signer_pinned=False``).
    """
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestFormatError(f"manifest of {len(raw)} bytes exceeds {MAX_MANIFEST_BYTES}")
    if verify_key is None:
        try:
            embedded = json.loads(raw)["signer"]["public_key"]
            key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(embedded))
        except (ValueError, KeyError, TypeError):
            raise BadSignatureError("the manifest names no usable signer key") from None
    else:
        key = load_key(verify_key)
    try:
        key.verify(signature, raw)
    except InvalidSignature:
        raise BadSignatureError(
            f"the manifest signature does not verify with the trusted key {fingerprint(key)}: the artifact was "
            "modified or signed by another key; do not use it, fetch it again from the right party"
        ) from None
    try:
        data = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ManifestFormatError("the signed manifest is not JSON") from None
    data = _check_shape(data, kind)
    return Manifest(data, bytes(raw), bytes(signature))


def read_manifest(
    folder: str | Path, verify_key: Ed25519PublicKey | str | os.PathLike | None, *, kind: str | None = None
) -> Manifest:
    """Read and verify the signature of ``folder``'s manifest (files are not checked: see :func:`verify_files`)."""
    folder = Path(folder)
    mpath, spath = folder / MANIFEST_NAME, folder / SIGNATURE_NAME
    for p in (mpath, spath):
        if not p.is_file():
            raise MissingFileError(f"{p} is missing: {folder} is not a complete signed artifact")
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise ManifestFormatError(f"{mpath} is larger than {MAX_MANIFEST_BYTES} bytes")
    return verify_manifest_bytes(mpath.read_bytes(), parse_signature(spath.read_bytes()[:300]), verify_key, kind=kind)


def verify_files(folder: str | Path, manifest: Manifest) -> None:
    """Check presence, size and SHA-256 of every listed file (sizes first: a cheap check before hashing GBs)."""
    folder = Path(folder)
    entries = manifest.files
    paths = {}
    for name, e in entries.items():
        path = resolve_in(folder, name)
        if not path.is_file():
            raise MissingFileError(f"{name} is listed in the signed manifest but missing from {folder}")
        size = path.stat().st_size
        if size != e.size:
            raise DigestMismatchError(
                f"{name} has {size} bytes, the signed manifest says {e.size}: incomplete or tampered"
            )
        paths[name] = path
    for name, e in entries.items():
        digest = sha256_file(paths[name])
        if digest != e.sha256:
            raise DigestMismatchError(
                f"{name} has SHA-256 {digest[:16]}…, the signed manifest says {e.sha256[:16]}…: corrupted or tampered"
            )


def verify_artifact(
    folder: str | Path, verify_key: Ed25519PublicKey | str | os.PathLike | None, *, kind: str | None = None
) -> Manifest:
    """Signature, shape and every file digest; returns the verified manifest. Loads nothing."""
    manifest = read_manifest(folder, verify_key, kind=kind)
    verify_files(folder, manifest)
    return manifest
