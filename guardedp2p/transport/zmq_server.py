"""Provider side of the ZeroMQ transport: a ROUTER socket with CURVE encryption and a ZAP allow-list.

Why this shape: CURVE gives each connection an encrypted, mutually authenticated channel; the ZAP handler
(pyzmq's ThreadAuthenticator) decides *who* may connect by looking the client's public key up in an in-memory
set, which can be changed while serving. libzmq stamps every accepted message with the client's key
("User-Id" metadata), so the identity handed to protocol code is cryptographic, not a routing id a client chose.

Notes from measurement (pyzmq 27 / libzmq 4.3.5):
- the ZAP domain given to ``configure_curve_callback`` must equal the socket's ``zap_domain``; "*" only matches an
  empty domain;
- ROUTER routing ids are random and identify nobody; the User-Id of the first payload frame is the client key.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass, field

import zmq
from zmq.auth.thread import ThreadAuthenticator

from guardedp2p.crypto.keys import is_z85_key, load_allow_list, own_keypair
from guardedp2p.errors import ConfigError, TransportError
from guardedp2p.transport.base import (
    INSECURE_PEER_PREFIX,
    ChannelClosed,
    Frames,
    Incoming,
    ServerChannel,
    frames_nbytes,
)
from guardedp2p.transport.endpoints import bind_error, check_endpoint

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 1 << 30
DEFAULT_ZAP_DOMAIN = "guardedp2p"
_POLL_SLICE_MS = 50


class InsecureTransportWarning(UserWarning):
    """Emitted whenever a channel runs without CURVE (``--insecure``): traffic is plaintext and unauthenticated."""


INSECURE_BANNER = (
    "!!! INSECURE TRANSPORT: --insecure disables CURVE encryption and authentication. Everything sent "
    "(activations, gradients, weights) travels as PLAINTEXT and anyone who can reach {where} can connect. "
    "Use only on a trusted, isolated network for testing. !!!"
)


def warn_insecure(where: str) -> None:
    """Log and warn loudly that a channel runs in plaintext."""
    msg = INSECURE_BANNER.format(where=where)
    log.warning(msg)
    warnings.warn(msg, InsecureTransportWarning, stacklevel=3)


@dataclass
class ServerConfig:
    """How a provider listens.

    Keys come from ``keys=(public_z85, secret_z85)`` or from ``secret_key_file`` (a NAME.key_secret file, or a
    directory plus ``key_name``). Allowed clients are ``allow`` (z85 keys or public key files) plus every ``*.key``
    in ``allow_dirs``. ``insecure=True`` drops CURVE entirely (plaintext, anyone may connect).
    """

    bind: str
    secret_key_file: str | os.PathLike | None = None
    key_name: str | None = None
    keys: tuple[str, str] | None = field(default=None, repr=False)
    allow: list[str | os.PathLike] = field(default_factory=list)
    allow_dirs: list[str | os.PathLike] = field(default_factory=list)
    insecure: bool = False
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    zap_domain: str = DEFAULT_ZAP_DOMAIN
    send_timeout: float = 30.0
    zero_copy: bool = True


class _AllowList:
    """Credentials provider for ThreadAuthenticator: a set of z85 keys read by the ZAP thread under a lock."""

    def __init__(self, domain: str, keys: set[str]):
        self._domain = domain
        self._keys = set(keys)
        self._lock = threading.Lock()

    def callback(self, domain: str, key: bytes) -> bool:
        # Runs on the authenticator thread; must never raise (that would kill the ZAP handler).
        try:
            k = key.decode("ascii") if isinstance(key, (bytes, bytearray)) else str(key)
            with self._lock:
                ok = domain == self._domain and k in self._keys
            if not ok:
                log.warning(
                    "Rejected client key %s (not on the allow-list). If this client should connect, add its public "
                    "key file with --allow.",
                    k,
                )
            return ok
        except Exception:  # pragma: no cover - defensive
            log.exception("allow-list callback failed; denying")
            return False

    def add(self, key: str) -> None:
        with self._lock:
            self._keys.add(key)

    def remove(self, key: str) -> None:
        with self._lock:
            self._keys.discard(key)

    def snapshot(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._keys)


class ZmqServerChannel(ServerChannel):
    """ROUTER socket serving many clients; ``recv`` yields :class:`Incoming` with the authenticated peer key.

    Use from one serving thread. A lock serialises socket access, so an occasional ``send`` from another thread is
    safe too (libzmq sockets are not thread-safe themselves).
    """

    def __init__(self, config: ServerConfig):
        self.config = config
        self.bytes_sent = 0
        self.bytes_received = 0
        self._lock = threading.RLock()
        self._closed = False
        self._auth: ThreadAuthenticator | None = None
        self._allow: _AllowList | None = None
        self.public_key: str | None = None

        check_endpoint(config.bind, "bind")
        if config.max_message_bytes <= 0:
            raise ConfigError("max_message_bytes must be positive (bytes per message, e.g. 1073741824 for 1 GiB).")

        keys: tuple[str, str] | None = None  # (public, secret); None exactly when config.insecure
        if not config.insecure:
            keys = self._load_server_keys(config)
            self.public_key = keys[0]
            allowed = load_allow_list([*config.allow], [*config.allow_dirs])
            if not allowed:
                log.warning(
                    "The allow-list is empty: every client will be refused. Add client public keys with --allow "
                    "(file or z85 key) or --allow-dir."
                )
            self._allow = _AllowList(config.zap_domain, allowed)

        self._ctx = zmq.Context()
        try:
            if not config.insecure:
                self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger("guardedp2p.transport.zap"))
                self._auth.start()
                self._auth.configure_curve_callback(domain=config.zap_domain, credentials_provider=self._allow)
            sock = self._ctx.socket(zmq.ROUTER)
            sock.linger = 0
            sock.maxmsgsize = int(config.max_message_bytes)
            sock.sndtimeo = max(0, int(config.send_timeout * 1000))
            sock.router_mandatory = True  # sending to a vanished client raises instead of dropping silently
            if keys is None:
                warn_insecure(config.bind)
            else:
                sock.zap_domain = config.zap_domain.encode("utf-8")
                sock.curve_secretkey = keys[1].encode("ascii")
                sock.curve_publickey = keys[0].encode("ascii")
                sock.curve_server = True
            del keys
            try:
                sock.bind(config.bind)
            except zmq.ZMQError as e:
                sock.close(linger=0)
                raise bind_error(config.bind, e.errno, e.strerror) from None
            self._sock = sock
            self._poller = zmq.Poller()
            self._poller.register(sock, zmq.POLLIN)
        except BaseException:
            self._teardown()
            raise
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info(
            "Provider listening on %s (%s)%s",
            self.endpoint,
            "INSECURE plaintext" if config.insecure else "CURVE",
            "" if config.insecure else f", public key {self.public_key}, {len(self.allowed)} allowed client(s)",
        )

    @staticmethod
    def _load_server_keys(config: ServerConfig) -> tuple[str, str]:
        return own_keypair(
            config.keys,
            config.secret_key_file,
            config.key_name,
            who="server",
            missing="The provider needs its secret key: pass --keys DIR --name NAME (the folder holding NAME.key_secret, from 'guardedp2p keys generate'), "
            "or --insecure for a plaintext test run.",
        )

    # -- allow-list management ------------------------------------------------------------------------------------

    @property
    def allowed(self) -> frozenset[str]:
        """Client keys currently accepted (empty in insecure mode, where everyone is accepted)."""
        return self._allow.snapshot() if self._allow else frozenset()

    def allow(self, key_or_file: str | os.PathLike) -> str:
        """Accept a client key from now on (takes effect for the next handshake). Returns the z85 key."""
        if self._allow is None:
            raise ConfigError("This server runs with --insecure; there is no allow-list to change.")
        key = load_allow_list([key_or_file], []).pop()
        self._allow.add(key)
        log.info("Allowed client key %s", key)
        return key

    def revoke(self, key_or_file: str | os.PathLike) -> None:
        """Refuse a client key for new connections (an already open connection keeps working until it drops)."""
        if self._allow is None:
            raise ConfigError("This server runs with --insecure; there is no allow-list to change.")
        key = load_allow_list([key_or_file], []).pop()
        self._allow.remove(key)
        log.info("Revoked client key %s", key)

    # -- messaging ------------------------------------------------------------------------------------------------

    def recv(self, timeout: float) -> Incoming | None:
        """Wait up to ``timeout`` s for a message; ``None`` on timeout. Never blocks forever."""
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            self._check_open()
            remaining = deadline - time.monotonic()
            slice_ms = max(0, min(_POLL_SLICE_MS, int(remaining * 1000)))
            with self._lock:
                self._check_open()
                if self._poller.poll(slice_ms):
                    try:
                        parts = self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        parts = None
                    if parts is not None:
                        msg = self._incoming(parts)
                        if msg is not None:
                            return msg
            if time.monotonic() >= deadline:
                return None

    def _incoming(self, parts: list[zmq.Frame]) -> Incoming | None:
        route = parts[0].bytes
        payload = parts[1:]
        if not payload:  # a ROUTER never delivers an empty message from DEALER; ignore defensively
            return None
        if self.config.insecure:
            peer = INSECURE_PEER_PREFIX + route.hex()
        else:
            try:
                user_id = payload[0].get("User-Id")
            except zmq.ZMQError:
                user_id = ""
            peer = user_id if isinstance(user_id, str) else ""
            # libzmq authenticates once per connection, so a key revoked after its handshake keeps its open
            # connection; here we only refuse a message that carries no key at all (cannot happen with ZAP on).
            if not is_z85_key(peer):
                log.error("Dropping a message without a valid authenticated User-Id (%r)", peer)
                return None
        frames: list[memoryview | bytes] = [f.buffer for f in payload]
        self.bytes_received += frames_nbytes(frames)
        return Incoming(peer=peer, route=route, frames=frames)

    def send(self, route: bytes, frames: Frames) -> None:
        """Send one message to the client with routing id ``route``.

        Raises :class:`ChannelClosed` if that client is gone, and :class:`TransportError` if it stops reading long
        enough for ``send_timeout`` to expire.
        """
        if not frames:
            raise ValueError("a message needs at least one frame")
        with self._lock:
            self._check_open()
            try:
                self._sock.send_multipart([route, *frames], copy=not self.config.zero_copy)
            except zmq.Again:
                raise TransportError(
                    f"Could not hand a reply to client {route.hex()} within {self.config.send_timeout:g} s: it is not "
                    "reading. It may be overloaded or stuck; the message was dropped."
                ) from None
            except zmq.ZMQError as e:
                if e.errno == zmq.EHOSTUNREACH:
                    raise ChannelClosed(
                        f"Client {route.hex()} has disconnected; the reply was dropped. It must reconnect and retry."
                    ) from None
                raise TransportError(f"Sending to client {route.hex()} failed: {e.strerror}.") from None
        self.bytes_sent += frames_nbytes(frames)

    def _check_open(self) -> None:
        if self._closed:
            raise ChannelClosed("The server channel is closed; create a new one to serve again.")

    def close(self, linger_s: float = 0.0) -> None:
        """Stop listening and release the socket, the authenticator thread and the context. Idempotent.

        ``linger_s``: how long replies still queued may take to leave (the last "provider-shutting-down" answers
        at shutdown); 0 drops them."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._teardown(linger_s)

    def _teardown(self, linger_s: float = 0.0) -> None:
        sock = getattr(self, "_sock", None)
        if sock is not None:
            sock.close(linger=max(0, int(linger_s * 1000)))
        if self._auth is not None:
            try:
                self._auth.stop()
            except Exception:  # pragma: no cover
                log.debug("authenticator stop failed", exc_info=True)
            self._auth = None
        ctx = getattr(self, "_ctx", None)
        if ctx is not None:
            ctx.term()

    def __enter__(self) -> ZmqServerChannel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; explicit close() is the contract
        try:
            if not getattr(self, "_closed", True):
                self.close()
        except Exception:
            pass


__all__ = ["ServerConfig", "ZmqServerChannel", "InsecureTransportWarning", "warn_insecure", "DEFAULT_ZAP_DOMAIN"]
