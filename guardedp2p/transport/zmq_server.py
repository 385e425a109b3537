"""Provider side of the ZeroMQ transport: a ROUTER socket with CURVE encryption and a ZAP allow-list.

Why this shape: CURVE gives each connection an encrypted, mutually authenticated channel; the ZAP handler
(pyzmq's ThreadAuthenticator) decides *who* may connect by looking the client's public key up in an in-memory
set, which can be changed while serving. libzmq stamps every accepted message with the client's key
("User-Id" metadata), so the identity handed to protocol code is cryptographic, not a routing id a client chose.

Notes from measurement (pyzmq 27 / libzmq 4.3.5):
- the ZAP domain given to ``configure_curve_callback`` must equal the socket's ``zap_domain``; "*" only matches an
  empty domain;
- ROUTER routing ids are random and identify nobody; the User-Id of the first payload frame is the client key.

No peer can stall the provider (issue 20). Sends never block: :meth:`ZmqServerChannel.try_send` hands a reply to
libzmq with ``NOBLOCK`` under ``ROUTER_MANDATORY`` and an explicit small ``SNDHWM``, so a client that stops
reading fills only its own pipe and the send says so (the serve loop queues, caps and cuts off; see
``guardedp2p/service/serve.py``). Connections are tracked: each message's source socket (``ZMQ_SRCFD``) ties a
routing id to its TCP connection and its key, and a socket monitor on the ROUTER reports ``EVENT_DISCONNECTED``,
which :meth:`ZmqServerChannel.pop_disconnects` hands to the serve loop so the sessions of a vanished connection
are freed at once. :meth:`ZmqServerChannel.disconnect` closes one connection (``shutdown(2)`` on its socket;
libzmq then tears it down like any dropped connection): how a cut-off or revoked client is put out.

Revocation works on open connections: the allow-list is re-read when its files change
(:meth:`ZmqServerChannel.refresh_allow_list`, polled by the serve loop, and on SIGHUP), every message's key is
checked against the current list, and a removed key's connections are closed. Failed handshakes (unknown key,
wrong provider key, plaintext against CURVE) and refused keys are logged, throttled so a connect storm cannot
flood the log.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from guardedp2p.crypto.keys import (
    PUBLIC_SUFFIX,
    SIGN_SECRET_SUFFIX,
    is_z85_key,
    load_allow_list,
    load_public_key,
    own_keypair,
)
from guardedp2p.errors import ConfigError, GuardedP2PError, TransportError
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
_MONITOR_EVENTS = (
    zmq.EVENT_ACCEPTED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
)

_HANDSHAKE_FAILURES: dict[int, str] = {
    int(zmq.EVENT_HANDSHAKE_FAILED_AUTH): "client key not on the allow-list",
    int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL): "could not complete the handshake (wrong provider key?)",
    int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL): "protocol error (a plaintext --insecure client, or not ZeroMQ)",
}


class LogThrottle:
    """At most one log line per ``key`` every ``every_s`` seconds; what was held back is counted into the next.

    Why: a client reconnecting in a loop with a refused key (or a scanner speaking plaintext) would otherwise write
    a line per attempt. Keys are bounded (the oldest are forgotten), so a flood of distinct keys costs bounded
    memory."""

    def __init__(self, every_s: float = 10.0, max_keys: int = 1024, clock: Callable[[], float] = time.monotonic):
        self.every_s = every_s
        self.max_keys = max_keys
        self.clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, key: str) -> int | None:
        """None: stay silent. Otherwise log now; the value is how many were held back since the last line."""
        now = self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.every_s:
                self._held[key] = self._held.get(key, 0) + 1
                return None
            if last is None and len(self._last) >= self.max_keys:
                oldest = min(self._last, key=self._last.__getitem__)
                self._last.pop(oldest)
                self._held.pop(oldest, None)
            self._last[key] = now
            return self._held.pop(key, 0)


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
    send_timeout: float = 30.0  # only for send(): how long it retries a full peer before giving up
    zero_copy: bool = True
    sndhwm: int = 4  # replies libzmq queues per client before try_send says "full" (the serve loop queues more)
    rcvhwm: int = 32  # messages libzmq reads ahead per client (then that client's TCP backs off, nobody else's)
    io_threads: int = 2  # libzmq I/O threads: a client's large message (CURVE decrypts it whole) holds up only its own


class _AllowList:
    """Credentials provider for ThreadAuthenticator: a set of z85 keys read by the ZAP thread under a lock."""

    def __init__(self, domain: str, keys: set[str]):
        self._domain = domain
        self._keys = set(keys)
        self._lock = threading.Lock()
        self._throttle = LogThrottle(every_s=60.0)

    def callback(self, domain: str, key: bytes) -> bool:
        # Runs on the authenticator thread; must never raise (that would kill the ZAP handler).
        try:
            k = key.decode("ascii") if isinstance(key, (bytes, bytearray)) else str(key)
            with self._lock:
                ok = domain == self._domain and k in self._keys
            if not ok:
                held = self._throttle(k)
                if held is not None:
                    log.warning(
                        "Rejected client key %s (not on the allow-list)%s. If this client should connect, add its "
                        "public key file with --allow.",
                        k,
                        f"; {held} more attempt(s) with it since the last report" if held else "",
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

    def replace(self, keys: set[str]) -> tuple[set[str], set[str]]:
        """Make ``keys`` the list; returns (added, removed)."""
        with self._lock:
            added, removed = keys - self._keys, self._keys - keys
            self._keys = set(keys)
        return added, removed

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._keys

    def snapshot(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._keys)


@dataclass
class _Conn:
    """One accepted TCP connection: its socket (for shutdown) and, once a message came, its route and key."""

    fd: int
    route: bytes | None = None
    peer: str | None = None


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
        self._monitor: zmq.Socket | None = None
        self._wake_r: zmq.Socket | None = None  # an inproc pair: wake() makes a waiting recv() return at once
        self._wake_w: zmq.Socket | None = None
        self._wake_lock = threading.Lock()
        self._conns: dict[int, _Conn] = {}  # fd -> connection
        self._routes: dict[bytes, int] = {}  # route -> fd
        self._disconnects: list[tuple[str, bytes]] = []  # (peer, route) gone since the last pop_disconnects
        self._cut: set[bytes] = set()  # routes we closed ourselves (their messages still queued are dropped)
        self._allow_signature: tuple[object, ...] | None = None
        self._handshake_throttle = LogThrottle(every_s=10.0)
        self._refused_throttle = LogThrottle(every_s=10.0)
        self.stats = {"handshakes_failed": 0, "refused_messages": 0, "disconnects": 0, "cut_off": 0}

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

        self._ctx = zmq.Context(io_threads=max(1, int(config.io_threads)))
        try:
            if not config.insecure:
                self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger("guardedp2p.transport.zap"))
                self._auth.start()
                self._auth.configure_curve_callback(domain=config.zap_domain, credentials_provider=self._allow)
            sock = self._ctx.socket(zmq.ROUTER)
            sock.linger = 0
            sock.maxmsgsize = int(config.max_message_bytes)
            sock.sndhwm = max(1, int(config.sndhwm))
            sock.rcvhwm = max(1, int(config.rcvhwm))
            sock.router_mandatory = True  # a full or vanished client makes the send fail, never drops silently
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
            self._monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
            self._poller = zmq.Poller()
            self._poller.register(sock, zmq.POLLIN)
            self._poller.register(self._monitor, zmq.POLLIN)
            wake_addr = f"inproc://guardedp2p-wake-{id(self):x}"
            self._wake_r = self._ctx.socket(zmq.PAIR)
            self._wake_r.bind(wake_addr)
            self._wake_w = self._ctx.socket(zmq.PAIR)
            self._wake_w.connect(wake_addr)
            self._poller.register(self._wake_r, zmq.POLLIN)
            if not config.insecure:
                self._allow_signature = self._allow_files_signature()
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

    def revoke(self, key_or_file: str | os.PathLike) -> list[bytes]:
        """Refuse a client key from now on: new handshakes fail and its open connections are closed at once.

        Returns the routes closed (the serve loop frees the key's sessions: ``ProviderApp.drop_peer``)."""
        if self._allow is None:
            raise ConfigError("This server runs with --insecure; there is no allow-list to change.")
        key = load_allow_list([key_or_file], []).pop()
        self._allow.remove(key)
        closed = self.disconnect_peer(key)
        log.info("Revoked client key %s (%d open connection(s) closed)", key, len(closed))
        return closed

    def refresh_allow_list(self, force: bool = False) -> set[str]:
        """Re-read the allow-list (``allow`` files and ``allow_dirs``) if its files changed, or always when
        ``force`` (SIGHUP). Removed keys are revoked (connections closed). Returns the removed keys.

        A file that cannot be read is skipped with a warning (a broken file dropped into --allow-dir never blocks
        the revocation of a removed one); a listed --allow file that is gone no longer allows its key."""
        if self._allow is None:
            return set()
        signature = self._allow_files_signature()
        if not force and signature == self._allow_signature:
            return set()
        self._allow_signature = signature
        keys = self._read_allow_files()
        added, removed = self._allow.replace(keys)
        for key in removed:
            self.disconnect_peer(key)
        if added or removed or force:
            log.info(
                "allow-list reloaded: %d client key(s) (%d added, %d removed%s)",
                len(keys),
                len(added),
                len(removed),
                ": " + ", ".join(sorted(k[:12] + "…" for k in removed)) if removed else "",
            )
        return removed

    def _allow_paths(self) -> list[Path]:
        paths = [Path(a).expanduser() for a in self.config.allow if not is_z85_key(str(a))]
        for d in self.config.allow_dirs:
            dp = Path(d).expanduser()
            paths.append(dp)
            try:
                paths.extend(sorted(dp.glob(f"*{PUBLIC_SUFFIX}")))
            except OSError:
                pass
        return paths

    def _allow_files_signature(self) -> tuple[object, ...]:
        sig: list[object] = []
        for p in self._allow_paths():
            try:
                st = p.stat()
                sig.append((str(p), st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                sig.append((str(p), None))
        return tuple(sig)

    def _read_allow_files(self) -> set[str]:
        keys: set[str] = set()
        for a in self.config.allow:
            if is_z85_key(str(a)):
                keys.add(str(a))
                continue
            try:
                keys.add(load_public_key(a))
            except (GuardedP2PError, OSError) as exc:
                log.warning("allow-list: %s is skipped (%s)", a, exc)
        for d in self.config.allow_dirs:
            dp = Path(d).expanduser()
            try:
                files = sorted(dp.glob(f"*{PUBLIC_SUFFIX}"))
            except OSError as exc:
                log.warning("allow-list: folder %s cannot be read (%s); its keys are no longer allowed", dp, exc)
                continue
            for f in files:
                if f.name.endswith(SIGN_SECRET_SUFFIX) or not f.is_file():
                    continue
                try:
                    keys.add(load_public_key(f))
                except (GuardedP2PError, OSError) as exc:
                    log.warning("allow-list: %s is skipped (%s)", f, exc)
        return keys

    # -- connections ----------------------------------------------------------------------------------------------

    def pop_disconnects(self) -> list[tuple[str, bytes]]:
        """(peer, route) of every connection that went away since the last call (the client closed it, its
        process died, or we cut it off). The serve loop frees their sessions."""
        with self._lock:
            self._drain_monitor()
            out, self._disconnects = self._disconnects, []
        return out

    def routes_of(self, peer: str) -> list[bytes]:
        with self._lock:
            return [c.route for c in self._conns.values() if c.peer == peer and c.route is not None]

    def disconnect(self, route: bytes) -> bool:
        """Close the TCP connection of ``route`` now (its client sees the connection drop; libzmq frees its queues).

        Returns False if the connection is not known (already gone). Its messages already received but not yet
        read are dropped."""
        with self._lock:
            self._drain_monitor()  # an fd seen disconnected must not be mistaken for a reused one
            fd = self._routes.get(route)
            conn = self._conns.get(fd) if fd is not None else None
            if fd is None or conn is None or conn.route != route:
                return False
            self._cut.add(route)
            self.stats["cut_off"] += 1
            try:
                dup = socket.socket(fileno=os.dup(fd))
            except OSError:
                return False
            try:
                dup.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            finally:
                dup.close()  # closes only our duplicate; libzmq closes its own descriptor on the disconnect
            return True

    def disconnect_peer(self, peer: str) -> list[bytes]:
        """Close every connection of a client key; returns their routes."""
        routes = self.routes_of(peer)
        return [r for r in routes if self.disconnect(r)]

    def _drain_monitor(self) -> None:
        mon = self._monitor
        if mon is None:
            return
        while True:
            try:
                if not mon.poll(0):
                    return
                event = recv_monitor_message(mon, flags=zmq.NOBLOCK)
            except (zmq.Again, zmq.ZMQError):
                return
            self._on_event(int(event["event"]), int(event["value"]))

    def _on_event(self, kind: int, value: int) -> None:
        if kind == zmq.EVENT_ACCEPTED:
            self._conns[value] = _Conn(value)
        elif kind == zmq.EVENT_DISCONNECTED:
            conn = self._conns.pop(value, None)
            if conn is not None and conn.route is not None:
                if self._routes.get(conn.route) == value:
                    del self._routes[conn.route]
                self._cut.discard(conn.route)
                self.stats["disconnects"] += 1
                self._disconnects.append((conn.peer or "", conn.route))
        else:  # a failed handshake: the connection never carried a message
            self._conns.pop(value, None)
            self.stats["handshakes_failed"] += 1
            why = _HANDSHAKE_FAILURES.get(kind, "failed")
            held = self._handshake_throttle(why)
            if held is not None:
                log.warning(
                    "a client handshake failed: %s%s", why, f" ({held} more since the last report)" if held else ""
                )

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
                ready = dict(self._poller.poll(slice_ms))
                if self._monitor in ready:
                    self._drain_monitor()
                if self._wake_r is not None and self._wake_r in ready:
                    while self._wake_r.poll(0):
                        self._wake_r.recv(zmq.NOBLOCK)
                    if self._sock not in ready:
                        return None
                if self._sock in ready:
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

    def wake(self) -> None:
        """Make a ``recv`` waiting in another thread return now (with ``None`` if no message came): how the serve
        loop's worker says a reply is ready, so the receive thread need not poll for it."""
        with self._wake_lock:
            if self._closed or self._wake_w is None:
                return
            try:
                self._wake_w.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # wakes already pending are enough

    def _incoming(self, parts: list[zmq.Frame]) -> Incoming | None:
        route = parts[0].bytes
        payload = parts[1:]
        if not payload:  # a ROUTER never delivers an empty message from DEALER; ignore defensively
            return None
        if route in self._cut:  # queued before we closed its connection
            return None
        if self.config.insecure:
            peer = INSECURE_PEER_PREFIX + route.hex()
        else:
            try:
                user_id = payload[0].get("User-Id")
            except zmq.ZMQError:
                user_id = ""
            peer = user_id if isinstance(user_id, str) else ""
            # a message that carries no key at all cannot happen with ZAP on; refuse it defensively
            if not is_z85_key(peer):
                log.error("Dropping a message without a valid authenticated User-Id (%r)", peer)
                return None
        self._track(route, peer, payload[0])
        if self._allow is not None and peer not in self._allow:
            # revoked after its handshake: libzmq authenticates once per connection, so every message is checked
            self.stats["refused_messages"] += 1
            held = self._refused_throttle(peer)
            if held is not None:
                log.warning(
                    "dropping messages of client key %s: it is no longer on the allow-list; closing its connection%s",
                    peer[:12] + "…",
                    f" ({held} more dropped)" if held else "",
                )
            self.disconnect(route)
            return None
        frames: list[memoryview | bytes] = [f.buffer for f in payload]
        self.bytes_received += frames_nbytes(frames)
        return Incoming(peer=peer, route=route, frames=frames)

    def _track(self, route: bytes, peer: str, first: zmq.Frame) -> None:
        """Tie ``route`` to its TCP connection (the message's source socket) and its key."""
        if route in self._routes:
            return
        try:
            fd = int(first.get(zmq.SRCFD))
        except (zmq.ZMQError, TypeError, ValueError):
            return
        self._drain_monitor()  # the connection's ACCEPTED event comes before its first message
        conn = self._conns.setdefault(fd, _Conn(fd))
        conn.route, conn.peer = route, peer
        self._routes[route] = fd

    def try_send(self, route: bytes, frames: Frames) -> bool:
        """Hand one message for ``route`` to libzmq without ever blocking.

        Returns False when that client's queue is full (it is not reading; nothing was queued). Raises
        :class:`ChannelClosed` if that client is gone.
        """
        if not frames:
            raise ValueError("a message needs at least one frame")
        with self._lock:
            self._check_open()
            try:
                self._sock.send_multipart([route, *frames], flags=zmq.NOBLOCK, copy=not self.config.zero_copy)
            except zmq.Again:
                return False
            except zmq.ZMQError as e:
                if e.errno == zmq.EHOSTUNREACH:
                    raise ChannelClosed(
                        f"Client {route.hex()} has disconnected; the reply was dropped. It must reconnect and retry."
                    ) from None
                raise TransportError(f"Sending to client {route.hex()} failed: {e.strerror}.") from None
        self.bytes_sent += frames_nbytes(frames)
        return True

    def send(self, route: bytes, frames: Frames) -> None:
        """Send one message to the client with routing id ``route``, retrying a full queue for up to
        ``send_timeout`` without holding the socket (the serve loop uses :meth:`try_send` and never waits).

        Raises :class:`ChannelClosed` if that client is gone, and :class:`TransportError` if it stops reading long
        enough for ``send_timeout`` to expire.
        """
        deadline = time.monotonic() + max(0.0, self.config.send_timeout)
        while not self.try_send(route, frames):
            if time.monotonic() >= deadline:
                raise TransportError(
                    f"Could not hand a reply to client {route.hex()} within {self.config.send_timeout:g} s: it is not "
                    "reading. It may be overloaded or stuck; the message was dropped."
                )
            time.sleep(0.005)

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
        mon = getattr(self, "_monitor", None)
        if sock is not None and mon is not None:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
        if mon is not None:
            mon.close(linger=0)
        with self._wake_lock:
            for pair in (self._wake_r, self._wake_w):
                if pair is not None:
                    pair.close(linger=0)
            self._wake_r = self._wake_w = None
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


__all__ = [
    "ServerConfig",
    "ZmqServerChannel",
    "InsecureTransportWarning",
    "LogThrottle",
    "warn_insecure",
    "DEFAULT_ZAP_DOMAIN",
]
