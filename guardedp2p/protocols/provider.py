"""The provider as a sans-I/O application: it consumes (peer, frames) and returns reply frames.

Drivers (the in-process channel in tests, the ZeroMQ serve loop in deployment) only move frames; all
session logic, validation and error handling live here, so both run the same code (the Flower idea). A bad
message from one peer becomes an ERROR reply to that peer and never an exception in the serve loop.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from guardedp2p.errors import GuardedP2PError, HandshakeRejected, ProtocolError, WireError
from guardedp2p.handshake import Hello, ProviderPolicy, negotiate
from guardedp2p.messages import SESSION_TYPES, MsgType
from guardedp2p.wire import DEFAULT_LIMITS, Frame, Message, WireLimits, decode, encode, error_message

log = logging.getLogger("guardedp2p.provider")


class SessionOwnershipError(ProtocolError):
    code = "not-your-session"


class UnknownSession(ProtocolError):
    code = "unknown-session"


class MessageNotAllowed(ProtocolError):
    code = "not-allowed"


@dataclass
class ProviderConfig:
    """Operational limits of one provider process."""

    session_idle_timeout: float = 600.0  # a session silent this long is dropped with everything it holds
    step_timeout: float = 300.0  # a kept forward graph older than this is freed
    max_sessions_per_peer: int = 4
    max_inflight_steps: int = 4
    max_tokens_per_step: int = 1 << 16
    limits: WireLimits = field(default_factory=lambda: DEFAULT_LIMITS)


class SessionHandler(Protocol):
    """One protocol's provider side for one session."""

    handlers: dict[MsgType, Callable[[Message], Message]]

    def close(self) -> None: ...

    def expire(self, now: float) -> None: ...


@dataclass
class SessionState:
    sid: str
    peer: str
    protocol: str
    terms: dict[str, Any]
    handler: SessionHandler
    last_seen: float
    messages: int = 0


SessionFactory = Callable[["ProviderApp", str, dict[str, Any]], SessionHandler]


class ProviderApp:
    """Holds the sessions of all peers and routes each message through a fixed handler table."""

    def __init__(
        self,
        policy: ProviderPolicy,
        factories: dict[str, SessionFactory],
        config: ProviderConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        resources: dict[str, Any] | None = None,
    ) -> None:
        self.policy = policy
        self.factories = dict(factories)
        self.config = config or ProviderConfig()
        self.clock = clock
        self.resources = resources or {}
        self.sessions: dict[str, SessionState] = {}
        self.stats = {"messages": 0, "errors": 0, "sessions_opened": 0}

    # ------------------------------------------------------------------ frames in, frames out
    def handle(self, peer: str, frames: Sequence[Frame]) -> list[Frame]:
        """Decode, dispatch and encode; every failure becomes an ERROR reply for this peer only."""
        self.stats["messages"] += 1
        sid, step = "", 0
        try:
            msg = decode(frames, self.config.limits)
            sid, step = msg.session, msg.step
            reply = self.on_message(peer, msg)
        except GuardedP2PError as exc:
            self.stats["errors"] += 1
            log.warning("refused a message from %s: %s", _short(peer), exc)
            reply = _reject_or_error(exc, sid, step)
        except Exception as exc:  # noqa: BLE001 - keep serving other peers whatever happens
            self.stats["errors"] += 1
            log.exception("internal error while handling a message from %s", _short(peer))
            reply = error_message(ProtocolError(f"internal provider error: {type(exc).__name__}"), sid, step)
        return encode(reply)

    def on_message(self, peer: str, msg: Message) -> Message:
        self.expire()
        if msg.type == MsgType.HELLO:
            return self._open(peer, msg)
        state = self.sessions.get(msg.session)
        if state is None:
            raise UnknownSession(f"session {msg.session[:16]!r} is unknown or expired; start a new session (HELLO)")
        if state.peer != peer:
            raise SessionOwnershipError("this session belongs to another client key")
        if msg.type not in SESSION_TYPES[state.protocol]:
            raise MessageNotAllowed(f"{msg.type.value} is not part of the {state.protocol} protocol")
        state.last_seen = self.clock()
        state.messages += 1
        if msg.type == MsgType.PING:
            return Message(MsgType.PONG, session=state.sid, step=msg.step)
        if msg.type == MsgType.BYE:
            self.close_session(state.sid, "client said BYE")
            return Message(MsgType.BYE_ACK, session=state.sid, step=msg.step)
        handler = state.handler.handlers.get(msg.type)
        if handler is None:
            raise MessageNotAllowed(f"{msg.type.value} has no handler in a {state.protocol} session")
        return handler(msg)

    # ------------------------------------------------------------------ sessions
    def _open(self, peer: str, msg: Message) -> Message:
        hello = Hello.from_meta(msg.meta)
        terms = negotiate(hello, self.policy)
        owned = [s for s in self.sessions.values() if s.peer == peer]
        if len(owned) >= self.config.max_sessions_per_peer:
            oldest = min(owned, key=lambda s: s.last_seen)
            self.close_session(oldest.sid, "too many sessions for this key; closing the oldest")
        factory = self.factories.get(hello.protocol)
        if factory is None:
            raise HandshakeRejected(f"protocol {hello.protocol!r} is not available on this provider")
        sid = secrets.token_hex(16)
        handler = factory(self, sid, terms)
        self.sessions[sid] = SessionState(sid, peer, hello.protocol, terms, handler, self.clock())
        self.stats["sessions_opened"] += 1
        log.info("session %s opened: %s for %s (%s)", sid[:8], hello.protocol, _short(peer), hello.software)
        meta = dict(terms)
        meta["session"] = sid
        meta["limits"] = {
            "max_tokens_per_step": self.config.max_tokens_per_step,
            "step_timeout": self.config.step_timeout,
            "session_idle_timeout": self.config.session_idle_timeout,
        }
        return Message(MsgType.ACCEPT, session=sid, meta=meta)

    def close_session(self, sid: str, reason: str) -> None:
        state = self.sessions.pop(sid, None)
        if state is not None:
            state.handler.close()
            log.info("session %s closed: %s (%d messages)", sid[:8], reason, state.messages)

    def expire(self) -> None:
        now = self.clock()
        for sid, state in list(self.sessions.items()):
            if now - state.last_seen > self.config.session_idle_timeout:
                self.close_session(sid, "idle timeout")
            else:
                state.handler.expire(now)

    def drop_peer(self, peer: str, reason: str) -> None:
        """Free every session of a peer (used when the transport knows the peer is gone)."""
        for sid, state in list(self.sessions.items()):
            if state.peer == peer:
                self.close_session(sid, reason)

    def shutdown(self) -> None:
        for sid in list(self.sessions):
            self.close_session(sid, "provider shutting down")


def _reject_or_error(exc: GuardedP2PError, sid: str, step: int) -> Message:
    if isinstance(exc, HandshakeRejected):
        return Message(MsgType.REJECT, session=sid, step=step, meta={"code": "rejected", "message": str(exc)[:2000]})
    if isinstance(exc, (WireError, ProtocolError)):
        return error_message(exc, sid, step)
    return error_message(exc, sid, step)


def _short(peer: str) -> str:
    return peer[:12] + "…" if len(peer) > 12 else peer
