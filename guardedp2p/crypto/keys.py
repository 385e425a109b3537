"""Key files: CURVE keypairs for the transport and Ed25519 keys for signing artifacts.

Layout for an identity called ``NAME`` in a directory::

    NAME.key          CURVE public key, z85 (40 chars) on one line, after '#' comments. Share it.
    NAME.key_secret   CURVE secret key (mode 0600). Never share it.
    NAME.sign.pub     Ed25519 public key, PEM (SubjectPublicKeyInfo). Share it.
    NAME.sign.key     Ed25519 private key, PEM (PKCS#8, unencrypted, mode 0600). Never share it.

The readers also accept the ZPL certificate files written by ``zmq.auth.create_certificates``
(``public-key = "..."`` / ``secret-key = "..."`` lines), so existing pyzmq keys can be reused.

Secret keys are never logged and never appear in exception messages; only public keys and paths do.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import zmq
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from zmq.utils import z85

from guardedp2p.errors import ConfigError

log = logging.getLogger(__name__)

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
SIGN_PUBLIC_SUFFIX = ".sign.pub"
SIGN_SECRET_SUFFIX = ".sign.key"

Z85_ALPHABET = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")
Z85_KEY_LEN = 40
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_ZPL_RE = re.compile(r'^(public-key|secret-key)\s*=\s*"?([^"\s]*)"?$')


class KeyFileError(ConfigError):
    """A key file or key string is missing, malformed, or of the wrong kind."""


class KeyExistsError(KeyFileError):
    """Refusing to overwrite existing key files (pass force=True / --force to replace them)."""


@dataclass(frozen=True)
class KeyPaths:
    """Where the four files of one identity live."""

    public: Path
    secret: Path
    sign_public: Path
    sign_secret: Path

    def all(self) -> list[Path]:
        return [self.public, self.secret, self.sign_public, self.sign_secret]


def key_paths(out_dir: str | os.PathLike, name: str) -> KeyPaths:
    """The file names used for identity ``name`` in ``out_dir`` (nothing is read or written)."""
    _check_name(name)
    d = Path(out_dir)
    return KeyPaths(
        public=d / f"{name}{PUBLIC_SUFFIX}",
        secret=d / f"{name}{SECRET_SUFFIX}",
        sign_public=d / f"{name}{SIGN_PUBLIC_SUFFIX}",
        sign_secret=d / f"{name}{SIGN_SECRET_SUFFIX}",
    )


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.endswith(".sign"):
        raise KeyFileError(
            f"Invalid key name {name!r}: use 1-64 letters, digits, '_', '-' or '.', not starting with '.' "
            "and not ending in '.sign' (e.g. --name provider)."
        )


# ---------------------------------------------------------------------------------------------------------------
# z85 validation and parsing
# ---------------------------------------------------------------------------------------------------------------


def is_z85_key(text: str) -> bool:
    """True when ``text`` is a 40-character z85 string that decodes to a 32-byte key."""
    return isinstance(text, str) and len(text) == Z85_KEY_LEN and all(c in Z85_ALPHABET for c in text)


def validate_z85_key(text: str | bytes, what: str = "key", source: str | None = None) -> str:
    """Return ``text`` as a str if it is a valid z85 CURVE key, else raise :class:`KeyFileError`.

    ``what`` names the key in the message ("public key"); the key itself is only echoed if it is public.
    """
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("ascii")
        except UnicodeDecodeError:
            raise KeyFileError(f"The {what}{_from(source)} is not ASCII text; expected 40 z85 characters.") from None
    text = text.strip()
    if len(text) != Z85_KEY_LEN:
        raise KeyFileError(
            f"The {what}{_from(source)} has {len(text)} characters; a CURVE key in z85 has exactly {Z85_KEY_LEN}. "
            "Check that the file or value was copied completely (guardedp2p keys show FILE prints a valid one)."
        )
    bad = sorted({c for c in text if c not in Z85_ALPHABET})
    if bad:
        raise KeyFileError(
            f"The {what}{_from(source)} contains characters that are not z85 ({''.join(bad)!r}); "
            "a CURVE key looks like 'rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7'. Was a different file given?"
        )
    return text


def _from(source: str | None) -> str:
    return f" from {source}" if source else ""


def fingerprint(public_key: str | bytes | Ed25519PublicKey) -> str:
    """Short, human-comparable fingerprint of a public key: ``sha256:`` + 16 hex digits of its raw bytes.

    The one fingerprint of the package: a CURVE key given as z85 (str or bytes) or an Ed25519 verify key (the
    ``signer.fingerprint`` of signed manifests); ``keys show`` prints the same value for either file."""
    if isinstance(public_key, Ed25519PublicKey):
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = z85.decode(public_key.encode("ascii") if isinstance(public_key, str) else public_key)
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:16]


def _parse_curve_file(path: Path) -> dict[str, str]:
    """Read a CURVE key file and return {'public': z85, 'secret': z85} with the entries that are present.

    Accepts our format (comments + one bare z85 line for public files) and pyzmq's ZPL certificates.
    """
    if not path.exists():
        raise KeyFileError(
            f"Key file {path} does not exist. Create one with: guardedp2p keys generate --out DIR --name NAME"
        )
    if path.is_dir():
        raise KeyFileError(f"{path} is a directory, but a key file was expected (e.g. {path}/NAME.key).")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KeyFileError(f"Cannot read key file {path}: {e.strerror}. Check the path and its permissions.") from None
    if len(data) > 64 * 1024:
        raise KeyFileError(f"{path} is {len(data)} bytes, far too large for a key file; was the wrong file given?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyFileError(
            f"{path} is not a text file; expected a CURVE key file written by 'guardedp2p keys generate'."
        ) from None
    if "-----BEGIN" in text:
        raise KeyFileError(
            f"{path} is a PEM file (an Ed25519 signing key, NAME.sign.pub / NAME.sign.key), not a CURVE transport key. "
            "Use the NAME.key file (public) or NAME.key_secret file (secret) instead."
        )
    found: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        # A bare key may itself start with '#' (it is in the z85 alphabet), so test for a key before comments.
        if is_z85_key(line):
            kind = "public"
            value = line
        elif line.startswith("#") or line in ("metadata", "curve"):
            continue
        else:
            m = _ZPL_RE.match(line)
            if not m:
                raise KeyFileError(
                    f"{path}, line {lineno}: not a key line. Expected a 40-character z85 key, "
                    "'public-key = \"...\"' or 'secret-key = \"...\"'. Was a different file given?"
                )
            kind = "public" if m.group(1) == "public-key" else "secret"
            value = m.group(2)
        if kind in found:
            raise KeyFileError(f"{path} holds more than one {kind} key (line {lineno}); keep exactly one.")
        found[kind] = validate_z85_key(value, what=f"{kind} key", source=f"{path}, line {lineno}")
    if not found:
        raise KeyFileError(
            f"{path} contains no key. Regenerate it with: guardedp2p keys generate --out DIR --name NAME --force"
        )
    return found


def _warn_if_exposed(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "Secret key file %s is readable by other users (mode %o); run: chmod 600 %s", path, mode & 0o777, path
        )


# ---------------------------------------------------------------------------------------------------------------
# Public API: CURVE keys
# ---------------------------------------------------------------------------------------------------------------


def load_public_key(path_or_z85: str | os.PathLike) -> str:
    """Return a z85 CURVE public key given either the key itself (40 chars) or a public key file.

    Refuses secret key files: a secret must never be passed where a public key (which is shared) is expected.
    """
    if isinstance(path_or_z85, str):
        s = path_or_z85.strip()
        if is_z85_key(s) and not Path(s).exists():
            return s
    path = Path(path_or_z85).expanduser()
    if not path.exists() and isinstance(path_or_z85, str):
        raise KeyFileError(
            f"{path_or_z85!r} is neither a 40-character z85 public key nor an existing key file. "
            "Pass the path of the peer's NAME.key file or paste the key printed by 'guardedp2p keys show'."
        )
    found = _parse_curve_file(path)
    if "secret" in found:
        raise KeyFileError(
            f"{path} is a SECRET key file, but a public key was expected here. Use the matching public file "
            f"(e.g. {_public_sibling(path)}) and never send the secret file to anyone."
        )
    return found["public"]


def _public_sibling(path: Path) -> Path:
    name = path.name
    if name.endswith(SECRET_SUFFIX):
        return path.with_name(name[: -len(SECRET_SUFFIX)] + PUBLIC_SUFFIX)
    return path.with_name("NAME" + PUBLIC_SUFFIX)


def _resolve_secret_file(dir_or_secret_file: str | os.PathLike, name: str | None, suffix: str) -> Path:
    p = Path(dir_or_secret_file).expanduser()
    if p.is_dir():
        if name is not None:
            _check_name(name)
            return p / f"{name}{suffix}"
        candidates = sorted(x for x in p.glob(f"*{suffix}") if x.is_file())
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise KeyFileError(
                f"No *{suffix} file in {p}. Create one with: guardedp2p keys generate --out {p} --name NAME"
            )
        names = ", ".join(c.name for c in candidates)
        raise KeyFileError(f"{p} holds several secret keys ({names}); say which one to use (--name NAME).")
    if name is not None and not p.exists():
        return p.parent / f"{name}{suffix}"
    return p


def load_keypair(dir_or_secret_file: str | os.PathLike, name: str | None = None) -> tuple[str, str]:
    """Return ``(public_z85, secret_z85)`` from a NAME.key_secret file, or from a directory plus ``name``.

    The public key is derived from the secret; if the file also lists one, both must agree.
    """
    path = _resolve_secret_file(dir_or_secret_file, name, SECRET_SUFFIX)
    found = _parse_curve_file(path)
    if "secret" not in found:
        raise KeyFileError(
            f"{path} holds only a public key, but this side needs its own SECRET key file "
            f"(NAME{SECRET_SUFFIX}, written by 'guardedp2p keys generate')."
        )
    _warn_if_exposed(path)
    secret = found["secret"]
    public = _public_of(secret)
    if "public" in found and found["public"] != public:
        raise KeyFileError(
            f"{path} is inconsistent: its public-key line does not belong to its secret key. "
            "The file was edited or corrupted; regenerate it with 'guardedp2p keys generate --force'."
        )
    return public, secret


def _public_of(secret: str) -> str:
    """The CURVE public key that belongs to a z85 secret key."""
    return zmq.curve_public(secret.encode("ascii")).decode("ascii")


def own_keypair(
    keys: tuple[str, str] | None,
    secret_key_file: str | os.PathLike | None,
    key_name: str | None,
    *,
    who: str,
    missing: str,
) -> tuple[str, str]:
    """``(public_z85, secret_z85)`` of one end of a channel: the values given in ``keys`` (checked to be z85 and a
    pair) or the NAME.key_secret file (:func:`load_keypair`); ``missing`` is the error when neither is given."""
    if keys is not None:
        pub = validate_z85_key(keys[0], f"{who} public key")
        sec = validate_z85_key(keys[1], f"{who} secret key")
        if _public_of(sec) != pub:
            raise KeyFileError(f"The {who} public key does not belong to its secret key; pass a matching pair.")
        return pub, sec
    if secret_key_file is None:
        raise ConfigError(missing)
    return load_keypair(secret_key_file, key_name)


def load_allow_list(files: list | tuple = (), dirs: list | tuple = ()) -> set[str]:
    """Collect allowed client public keys from key files / z85 strings and from every ``*.key`` in ``dirs``.

    Signing keys (``*.sign.key``) lying in the same directory are skipped; any other unreadable file is an error,
    so a typo never silently shrinks the allow-list.
    """
    keys: set[str] = set()
    for f in files or ():
        keys.add(load_public_key(f))
    for d in dirs or ():
        dp = Path(d).expanduser()
        if not dp.is_dir():
            raise KeyFileError(
                f"Allow directory {dp} does not exist or is not a directory; create it and put client NAME.key files in it."
            )
        n = 0
        for f in sorted(dp.glob(f"*{PUBLIC_SUFFIX}")):
            if f.name.endswith(SIGN_SECRET_SUFFIX) or not f.is_file():
                continue
            keys.add(load_public_key(f))
            n += 1
        if n == 0:
            log.warning("Allow directory %s holds no *.key public key files; no client from it will be accepted.", dp)
    return keys


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write atomically (temp file + rename) with ``mode`` set before any content is written."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    os.chmod(path, mode)


def generate_keypair(out_dir: str | os.PathLike, name: str, force: bool = False) -> tuple[Path, Path]:
    """Create identity ``name`` in ``out_dir``: a CURVE keypair plus an Ed25519 signing keypair.

    Returns ``(public_path, secret_path)`` of the CURVE pair (see :func:`key_paths` for the signing files).
    Secret files get mode 0600. Existing files are never overwritten unless ``force`` is true, because losing a
    secret key locks its owner out of every peer that pinned or allowed it.
    """
    paths = key_paths(out_dir, name)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise KeyFileError(f"{out} exists and is not a directory; choose another --out.")
    existing = [p for p in paths.all() if p.exists()]
    if existing and not force:
        raise KeyExistsError(
            "Refusing to overwrite existing key files: "
            + ", ".join(str(p) for p in existing)
            + ". Replacing them invalidates the old key everywhere it is allowed or pinned; pass --force if you mean it, "
            "or choose another --name."
        )
    try:
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise KeyFileError(f"Cannot create key directory {out}: {e.strerror}.") from None

    public, secret = (k.decode("ascii") for k in zmq.curve_keypair())
    sk = Ed25519PrivateKey.generate()
    sign_secret_pem = sk.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    sign_public_pem = sk.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public_text = (
        f"# guardedp2p CURVE public key {name!r} (z85). Safe to share: give this file to the other party.\n"
        f"# fingerprint: {fingerprint(public)}\n"
        f"{public}\n"
    )
    secret_text = (
        f"# guardedp2p CURVE SECRET key {name!r}. NEVER share or copy this file; it proves who you are.\n"
        f"# The public half is in {paths.public.name}.\n"
        f'public-key = "{public}"\n'
        f'secret-key = "{secret}"\n'
    )
    try:
        _write_file(paths.secret, secret_text.encode("ascii"), 0o600)
        _write_file(paths.sign_secret, sign_secret_pem, 0o600)
        _write_file(paths.public, public_text.encode("ascii"), 0o644)
        _write_file(paths.sign_public, sign_public_pem, 0o644)
    except OSError as e:
        raise KeyFileError(f"Cannot write key files in {out}: {e.strerror}.") from None
    log.info("Generated keys %r in %s (public key %s)", name, out, public)
    return paths.public, paths.secret


# ---------------------------------------------------------------------------------------------------------------
# Ed25519 signing keys
# ---------------------------------------------------------------------------------------------------------------


def _read_pem(path: Path, what: str) -> bytes:
    if not path.exists():
        raise KeyFileError(
            f"{what} file {path} does not exist. Create it with: guardedp2p keys generate --out DIR --name NAME"
        )
    if path.is_dir():
        raise KeyFileError(f"{path} is a directory, but a {what} file was expected.")
    data = path.read_bytes()
    if b"-----BEGIN" not in data:
        raise KeyFileError(
            f"{path} is not a PEM {what} file. Signing keys are the NAME.sign.key (private) and NAME.sign.pub (public) files."
        )
    return data


def load_signing_key(dir_or_file: str | os.PathLike, name: str | None = None) -> Ed25519PrivateKey:
    """Load the Ed25519 private key (NAME.sign.key) used to sign artifacts."""
    path = _resolve_secret_file(dir_or_file, name, SIGN_SECRET_SUFFIX)
    data = _read_pem(path, "signing key")
    if b"PUBLIC KEY" in data:
        raise KeyFileError(f"{path} is a public verify key; signing needs the private NAME.sign.key file.")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{path} is not a readable unencrypted PEM private key ({type(e).__name__}).") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, but an Ed25519 key is required.")
    _warn_if_exposed(path)
    return key


def load_verify_key(path: str | os.PathLike) -> Ed25519PublicKey:
    """Load the Ed25519 public key (NAME.sign.pub) used to verify artifact signatures."""
    p = Path(path).expanduser()
    data = _read_pem(p, "verify key")
    if b"PRIVATE KEY" in data:
        raise KeyFileError(
            f"{p} is a PRIVATE signing key; verification needs the public NAME.sign.pub file. Never share the private one."
        )
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{p} is not a readable PEM public key ({type(e).__name__}).") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{p} holds a {type(key).__name__}, but an Ed25519 key is required.")
    return key


def verify_key_fingerprint(key: Ed25519PublicKey) -> str:
    """Deprecated alias of :func:`fingerprint` (which takes Ed25519 keys too); goes away in 0.3."""
    import warnings

    warnings.warn("verify_key_fingerprint is deprecated: use fingerprint", DeprecationWarning, stacklevel=2)
    return fingerprint(key)


__all__ = [
    "KeyFileError",
    "KeyExistsError",
    "KeyPaths",
    "key_paths",
    "generate_keypair",
    "load_public_key",
    "load_keypair",
    "own_keypair",
    "load_allow_list",
    "load_signing_key",
    "load_verify_key",
    "fingerprint",
    "verify_key_fingerprint",
    "is_z85_key",
    "validate_z85_key",
]
