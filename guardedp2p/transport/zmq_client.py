"""Client (data owner) side of the ZeroMQ transport: a DEALER socket pinned to the provider's CURVE key.

Why the socket monitor: libzmq hides handshake failures from ``send``/``recv`` (a refused client just waits
forever; a client with the wrong pinned key retries forever). The monitor socket reports the outcome of each
handshake within milliseconds on loopback, so :meth:`ZmqClientChannel.connect` turns it into an immediate,
actionable error and closes the socket, which also stops the reconnect storm.

Measured event mapping (pyzmq 27 / libzmq 4.3.5, our own probes; tests/transport/test_zmq_channels.py):
- HANDSHAKE_SUCCEEDED                      -> authenticated, ready
- HANDSHAKE_FAILED_AUTH (value = ZAP code) -> PeerRejected (400: our key is not on the provider's allow-list)
- HANDSHAKE_FAILED_NO_DETAIL (EPIPE)       -> ProviderKeyMismatch (the server could not decrypt our HELLO)
- HANDSHAKE_FAILED_PROTOCOL, MECHANISM_MISMATCH -> MechanismMismatch (one side runs --insecure)
- any failure while we run --insecure      -> MechanismMismatch (a CURVE server drops plaintext HELLOs; measured
                                              as NO_DETAIL against a ZAP-enabled server)
- HANDSHAKE_FAILED_PROTOCOL, other         -> ProviderKeyMismatch
- nothing within ``handshake_timeout``     -> PeerTimeout

After the handshake the monitor also reports a dropped connection (DISCONNECTED): a provider that was killed, or
restarted, will never answer what was sent before, so :meth:`ZmqClientChannel.recv` raises
:class:`~guardedp2p.transport.base.PeerDisconnected` at once (issue 20) instead of waiting out its timeout; the
run's retry ladder then opens a new session.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from zmq.utils.monitor import recv_monitor_message

from guardedp2p.crypto.keys import PUBLIC_SUFFIX, SECRET_SUFFIX, load_public_key, own_keypair
from guardedp2p.errors import ConfigError, TransportError
from guardedp2p.transport.base import (
    ChannelClosed,
    ClientChannel,
    Frames,
    MechanismMismatch,
    PeerDisconnected,
    PeerRejected,
    PeerTimeout,
    ProviderKeyMismatch,
    frames_nbytes,
)
from guardedp2p.transport.endpoints import check_endpoint
from guardedp2p.transport.zmq_server import DEFAULT_MAX_MESSAGE_BYTES, warn_insecure

log = logging.getLogger(__name__)

_MONITOR_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_CLOSED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
)
_FATAL_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
)
_POLL_SLICE_MS = 100


@dataclass
class ClientConfig:
    """How a client reaches its provider.

    ``provider_public_key`` (z85 key or the provider's NAME.key file) pins the server: the handshake fails unless
    the provider proves it holds the matching secret key. The client's own keypair comes from
    ``keys=(public, secret)`` or ``secret_key_file`` (a NAME.key_secret file, or a directory plus ``key_name``).
    ``public_key_file`` is only used to tell the user which file to send to the provider operator.
    """

    connect: str
    provider_public_key: str | os.PathLike | None = None
    secret_key_file: str | os.PathLike | None = None
    key_name: str | None = None
    keys: tuple[str, str] | None = field(default=None, repr=False)
    public_key_file: str | os.PathLike | None = None
    insecure: bool = False
    handshake_timeout: float = 2.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    send_timeout: float = 30.0
    reconnect_interval: float = 0.1
    zero_copy: bool = True


class ZmqClientChannel(ClientChannel):
    """DEALER connection to one provider. Call :meth:`connect` (or use :meth:`open`) before messaging.

    Not thread-safe beyond a coarse lock: meant for one client thread.
    """

    def __init__(self, config: ClientConfig):
        self.config = config
        self.bytes_sent = 0
        self.bytes_received = 0
        self._lock = threading.RLock()
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket[bytes] | None = None
        self._mon: zmq.Socket[bytes] | None = None
        self._poller: zmq.Poller | None = None
        self._connected = False
        self._link_up = False
        self._closed = False
        self._fatal: TransportError | None = None
        # for each message sent whose reply has not been received yet (oldest first): the number of dropped
        # connections seen when it was sent; one sent before a later drop can no longer be answered
        self._awaiting: deque[int] = deque(maxlen=1 << 16)
        self._drops = 0
        self.public_key: str | None = None
        self._secret: str | None = None
        self.provider_public_key: str | None = None

        check_endpoint(config.connect, "connect", resolve=True)
        if config.handshake_timeout <= 0:
            raise ConfigError("handshake_timeout must be positive (seconds to wait for the provider, e.g. 2).")
        if config.insecure:
            if config.provider_public_key is not None:
                log.warning("--insecure given: the pinned provider key is ignored (nothing is verified).")
        else:
            if config.provider_public_key is None:
                raise ConfigError(
                    "No provider key given: pass --provider-key with the provider's public key file (NAME.key) or its "
                    "z85 key, so this client can verify it talks to the right server. (--insecure skips this, test only.)"
                )
            self.provider_public_key = load_public_key(config.provider_public_key)
            self.public_key, self._secret = self._load_client_keys(config)

    @staticmethod
    def _load_client_keys(config: ClientConfig) -> tuple[str, str]:
        return own_keypair(
            config.keys,
            config.secret_key_file,
            config.key_name,
            who="client",
            missing="The client needs its own keypair: pass --keys DIR --name NAME (the folder holding NAME.key_secret from 'guardedp2p keys generate'), "
            "and send the matching NAME.key to the provider operator.",
        )

    def _curve_keys(self) -> tuple[str, str, str]:
        """(provider public, own public, own secret): loaded in ``__init__`` whenever ``insecure`` is off."""
        if self.provider_public_key is None or self.public_key is None or self._secret is None:
            raise ConfigError("CURVE keys are missing: pass --keys and --provider-key, or --insecure (test only).")
        return self.provider_public_key, self.public_key, self._secret

    @classmethod
    def open(cls, config: ClientConfig) -> ZmqClientChannel:
        """Create a channel and wait for the authenticated handshake (see :meth:`connect`)."""
        ch = cls(config)
        ch.connect()
        return ch

    # -- connection -----------------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    def _public_key_hint(self) -> str:
        if self.config.public_key_file is not None:
            return f"your public key file {self.config.public_key_file}"
        skf = self.config.secret_key_file
        if skf is not None:
            p = Path(skf)
            if p.is_dir() and self.config.key_name:
                cand = p / f"{self.config.key_name}{PUBLIC_SUFFIX}"
            elif p.name.endswith(SECRET_SUFFIX):
                cand = p.with_name(p.name[: -len(SECRET_SUFFIX)] + PUBLIC_SUFFIX)
            else:
                cand = None
            if cand is not None and cand.exists():
                return f"your public key file {cand}"
        return f"your public key {self.public_key}"

    def connect(self) -> None:
        """Connect and wait up to ``handshake_timeout`` for the CURVE handshake to finish.

        Raises :class:`PeerRejected`, :class:`ProviderKeyMismatch`, :class:`MechanismMismatch` or
        :class:`PeerTimeout`; the socket is closed on any of them, so libzmq stops retrying.
        """
        with self._lock:
            if self._closed:
                raise ChannelClosed("This client channel was closed; create a new one to connect again.")
            if self._connected:
                return
            self._release()  # a previous failed attempt
            self._fatal = None
            self._awaiting.clear()  # a new socket: nothing sent on the old one can be answered on it
            cfg = self.config
            ctx = zmq.Context()
            self._ctx = ctx
            try:
                sock = ctx.socket(zmq.DEALER)
                self._sock = sock
                sock.linger = 0
                sock.maxmsgsize = int(cfg.max_message_bytes)
                sock.sndtimeo = max(0, int(cfg.send_timeout * 1000))
                sock.reconnect_ivl = max(1, int(cfg.reconnect_interval * 1000))
                sock.reconnect_ivl_max = 2000
                try:  # draft option in libzmq 4.3; harmless if ignored, and we close the socket anyway
                    sock.setsockopt(zmq.RECONNECT_STOP, zmq.RECONNECT_STOP_HANDSHAKE_FAILED)
                except (AttributeError, zmq.ZMQError):
                    pass
                if cfg.insecure:
                    warn_insecure(cfg.connect)
                else:
                    server_key, public_key, secret_key = self._curve_keys()
                    sock.curve_serverkey = server_key.encode("ascii")
                    sock.curve_publickey = public_key.encode("ascii")
                    sock.curve_secretkey = secret_key.encode("ascii")
                mon_addr = f"inproc://guardedp2p-monitor-{uuid.uuid4().hex}"
                sock.monitor(mon_addr, _MONITOR_EVENTS)
                mon = ctx.socket(zmq.PAIR)
                self._mon = mon
                mon.linger = 0
                mon.connect(mon_addr)
                try:
                    sock.connect(cfg.connect)
                except zmq.ZMQError as e:
                    raise ConfigError(
                        f"Cannot connect to {cfg.connect!r}: {e.strerror}. Use tcp://HOST:PORT with a resolvable host."
                    ) from None
                poller = zmq.Poller()
                self._poller = poller
                poller.register(sock, zmq.POLLIN)
                poller.register(mon, zmq.POLLIN)
                self._wait_handshake(mon, time.monotonic() + cfg.handshake_timeout)
            except BaseException:
                self._release()
                raise
            self._connected = True
            log.info(
                "Connected to provider at %s (%s)",
                cfg.connect,
                "INSECURE plaintext" if cfg.insecure else f"CURVE, provider key {self.provider_public_key}",
            )

    def _wait_handshake(self, mon: zmq.Socket[bytes], deadline: float) -> None:
        seen_connect = False
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if seen_connect:
                    what = "a TCP connection opened but no ZeroMQ handshake completed (is it a guardedp2p provider?)"
                else:
                    what = "the connection was refused or unanswered"
                raise PeerTimeout(
                    f"No provider answered at {self.config.connect} within {self.config.handshake_timeout:g} s: {what}. "
                    "Check the address and port, that the provider is running ('guardedp2p provider serve ...'), and that no "
                    "firewall blocks the port."
                )
            if not mon.poll(min(_POLL_SLICE_MS, max(1, int(remaining * 1000)))):
                continue
            event, value = self._read_event(mon)
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._link_up = True
                return
            if event == zmq.EVENT_CONNECTED:
                seen_connect = True
            if event & _FATAL_EVENTS:
                raise self._fatal_error(event, value)

    def _read_event(self, mon: zmq.Socket[bytes]) -> tuple[int, int]:
        m = recv_monitor_message(mon)
        event, value = int(m["event"]), int(m["value"])  # pyzmq 27 decodes value as a bogus Event flag
        log.debug("monitor event %s value %#x", _event_name(event), value)
        return event, value

    def _fatal_error(self, event: int, value: int) -> TransportError:
        addr = self.config.connect
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            code = f"ZAP {value}" if value else "ZAP refusal"
            return PeerRejected(
                f"The provider at {addr} refused this client's key ({code}). Send {self._public_key_hint()} to the "
                "provider operator and ask them to add it with --allow, then retry."
            )
        if self.config.insecure:
            # A CURVE server drops a plaintext HELLO; the client sees MECHANISM_MISMATCH or, as measured against a
            # server with ZAP enabled, just HANDSHAKE_FAILED_NO_DETAIL (EPIPE).
            return MechanismMismatch(
                f"The provider at {addr} rejected this client's plaintext handshake ({_event_name(event)}): it "
                "requires CURVE encryption, but this client runs with --insecure. Drop --insecure and pass --keys and "
                "--provider-key (or, on a trusted test network only, start the provider with --insecure too)."
            )
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return MechanismMismatch(
                f"The provider at {addr} runs WITHOUT encryption (--insecure), but this client requires CURVE. "
                "Ask the operator to run it with keys; use --insecure on both sides only on a trusted test network."
            )
        return ProviderKeyMismatch(
            f"The provider at {addr} failed the CURVE handshake ({_event_name(event)}): its key does not match the "
            f"pinned --provider-key {self.provider_public_key}. You may be talking to the wrong server, or have an old "
            "key; get the provider's current public key file (NAME.key) from its operator. (A provider started with "
            "--insecure can also fail this way under load.)"
        )

    def _drain_monitor(self) -> None:
        """Handle pending monitor events without blocking; raise (and close) on a fatal handshake failure."""
        while (mon := self._mon) is not None and mon.poll(0):
            event, value = self._read_event(mon)
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                if not self._link_up:
                    log.info("Reconnected to provider at %s", self.config.connect)
                self._link_up = True
            elif event == zmq.EVENT_DISCONNECTED:
                if self._link_up:
                    log.warning("Lost the connection to the provider at %s; reconnecting.", self.config.connect)
                self._link_up = False
                self._drops += 1
            elif event & _FATAL_EVENTS:
                err = self._fatal_error(event, value)
                self._fatal = err
                self._connected = False
                self._release()
                raise err

    def _ensure_ready(self) -> tuple[zmq.Socket[bytes], zmq.Poller]:
        """Connect if needed; return the live DEALER socket and its poller."""
        if self._closed:
            raise ChannelClosed("This client channel is closed; create a new one to talk to the provider again.")
        if self._fatal is not None:
            raise ChannelClosed(f"The channel was closed after a fatal error: {self._fatal}")
        if not self._connected:
            self.connect()
        if self._sock is None or self._poller is None:
            raise ChannelClosed("The connection to the provider was released; create a new channel.")
        return self._sock, self._poller

    # -- messaging ------------------------------------------------------------------------------------------------

    def send(self, frames: Frames) -> None:
        """Queue one message for the provider. The buffers must not be modified afterwards (zero copy)."""
        if not frames:
            raise ValueError("a message needs at least one frame")
        with self._lock:
            sock, _ = self._ensure_ready()
            self._drain_monitor()
            try:
                sock.send_multipart(frames, copy=not self.config.zero_copy)
                self._awaiting.append(self._drops)
            except zmq.Again:
                raise PeerTimeout(
                    f"Could not hand a message to the provider at {self.config.connect} within "
                    f"{self.config.send_timeout:g} s: it is not reading (busy, stuck or unreachable). Retry later."
                ) from None
            except zmq.ZMQError as e:
                raise TransportError(
                    f"Sending to the provider at {self.config.connect} failed: {e.strerror}."
                ) from None
        self.bytes_sent += frames_nbytes(frames)

    def recv(self, timeout: float) -> list[memoryview | bytes]:
        """Wait up to ``timeout`` seconds for the next message; raise :class:`PeerTimeout` if none arrives."""
        with self._lock:
            sock, poller = self._ensure_ready()
            deadline = time.monotonic() + max(0.0, timeout)
            while True:
                remaining = deadline - time.monotonic()
                events = dict(poller.poll(max(0, min(_POLL_SLICE_MS, int(remaining * 1000)))))
                if self._mon in events:
                    self._drain_monitor()  # raises (and releases the sockets) on a fatal handshake failure
                if sock in events or self._lost_replies():
                    try:
                        parts = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        parts = None
                    if parts is not None:
                        frames: list[memoryview | bytes] = [f.buffer for f in parts]
                        self.bytes_received += frames_nbytes(frames)
                        if self._awaiting:
                            self._awaiting.popleft()
                        return frames
                    lost = self._lost_replies()
                    if lost:
                        for _ in range(lost):
                            self._awaiting.popleft()
                        raise PeerDisconnected(
                            f"The connection to the provider at {self.config.connect} dropped while {lost} repl"
                            f"{'y was' if lost == 1 else 'ies were'} awaited: the provider stopped, crashed or "
                            "restarted, and what it was sent before cannot be answered; open a new session."
                        )
                if time.monotonic() >= deadline:
                    state = (
                        "" if self._link_up else " The connection is currently down (provider stopped or restarting?)."
                    )
                    raise PeerTimeout(
                        f"No reply from the provider at {self.config.connect} within {timeout:g} s.{state} "
                        "It may be busy or gone; retry, or raise the timeout for slow steps."
                    )

    def _lost_replies(self) -> int:
        """How many of the awaited replies were asked for before a connection drop seen since (they cannot come)."""
        return sum(1 for drops in self._awaiting if drops < self._drops)

    # -- teardown -------------------------------------------------------------------------------------------------

    def _release(self) -> None:
        sock, mon, ctx = self._sock, self._mon, self._ctx
        self._sock = self._mon = self._ctx = self._poller = None
        self._link_up = False
        if sock is not None:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            sock.close(linger=0)
        if mon is not None:
            mon.close(linger=0)
        if ctx is not None:
            ctx.term()

    def close(self) -> None:
        """Drop the connection (unsent messages are discarded: linger 0). Idempotent."""
        with self._lock:
            self._closed = True
            self._connected = False
            self._release()

    def __enter__(self) -> ZmqClientChannel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if getattr(self, "_sock", None) is not None:
                self.close()
        except Exception:
            pass


def _event_name(event: int) -> str:
    try:
        return zmq.Event(event).name or hex(event)  # a composite flag value has no name
    except ValueError:
        return hex(event)


__all__ = ["ClientConfig", "ZmqClientChannel"]
