"""The provider as a sans-I/O application: it consumes (peer, frames) and returns reply frames.

Drivers (the in-process channel in tests, the ZeroMQ serve loop in deployment) only move frames; all
session logic, validation and error handling live here, so both run the same code (the Flower idea). A bad
message from one peer becomes an ERROR reply to that peer and never an exception in the serve loop.

Batching (issue #6): :meth:`ProviderApp.handle_many` answers several messages that arrived together. Each is
decoded and checked exactly as :meth:`ProviderApp.handle` would; requests a session handler can *defer*
(forward-only trunk passes) are then computed in one call per group, and each session answers its own.

Per-client byte rate (issue #9): with ``max_bytes_per_s`` set, each peer (authenticated key) has its own token
bucket over the bytes it sends; a message over the limit is refused *before it is decoded* with ERROR
"rate-limited" and a ``retry_after_s`` hint, so a flooding client costs little and never slows another's
bucket. Shutdown: after :meth:`ProviderApp.begin_shutdown` every request but BYE is answered with ERROR
"provider-shutting-down" and its session is closed.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from guardedp2p.designs import DESIGNS
from guardedp2p.errors import ConfigError, GuardedP2PError, HandshakeRejected, ProtocolError, WireError
from guardedp2p.wire.codes import ErrorCode
from guardedp2p.wire.framing import DEFAULT_LIMITS, Frame, Message, WireLimits, decode, encode, error_message
from guardedp2p.wire.handshake import Hello, ProviderPolicy, negotiate
from guardedp2p.wire.messages import MsgType

if TYPE_CHECKING:
    import torch
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from torch import nn
    from transformers import PretrainedConfig

    from guardedp2p.designs.offline.plugin import VerifiedBundle

log = logging.getLogger("guardedp2p.provider")


class SessionOwnershipError(ProtocolError):
    code = ErrorCode.NOT_YOUR_SESSION


class UnknownSession(ProtocolError):
    code = ErrorCode.UNKNOWN_SESSION


class MessageNotAllowed(ProtocolError):
    code = ErrorCode.NOT_ALLOWED


class RateLimitExceeded(ProtocolError):
    """This peer sent more bytes than its share; it may send the same message again after ``retry_after_s``."""

    code = ErrorCode.RATE_LIMITED

    def __init__(self, message: str, retry_after_s: float, limit_bytes_per_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.limit_bytes_per_s = limit_bytes_per_s


class ShuttingDown(ProtocolError):
    code = ErrorCode.PROVIDER_SHUTTING_DOWN


@dataclass
class TokenBucket:
    """Bytes a peer may send: refills at ``rate`` per second up to ``capacity``.

    A message is admitted when the bucket holds its size, or is full if the message is larger than the whole
    bucket (it then goes into debt, which later messages wait out): so no message size is refused for ever and
    the long-run rate still holds. A refused message takes nothing, so a client that waits the hinted time and
    sends it again gets through.
    """

    rate: float
    capacity: float
    tokens: float
    updated: float

    def take(self, nbytes: int, now: float) -> float:
        """Admit ``nbytes`` (returns 0.0) or return the seconds until they would be admitted."""
        self.tokens = min(self.capacity, self.tokens + max(0.0, now - self.updated) * self.rate)
        self.updated = now
        need = min(float(nbytes), self.capacity)
        if self.tokens >= need:
            self.tokens -= nbytes
            return 0.0
        return (need - self.tokens) / self.rate

    def full(self, now: float) -> bool:
        """A full bucket is the same as a new one, so it can be forgotten (peers come and go)."""
        return self.tokens + max(0.0, now - self.updated) * self.rate >= self.capacity


@dataclass
class ProviderConfig:
    """Operational limits of one provider process."""

    session_idle_timeout: float = 600.0  # a session silent this long is dropped with everything it holds
    step_timeout: float = 300.0  # a kept forward graph older than this is freed
    max_sessions_per_peer: int = 4
    max_inflight_steps: int = 4
    max_tokens_per_step: int = 1 << 16  # also the most padded tokens one batched trunk call may hold
    limits: WireLimits = field(default_factory=lambda: DEFAULT_LIMITS)
    max_batch: int = 8  # most messages answered together (forward-only ones share a trunk call); 1 disables
    batch_wait_s: float = 0.002  # how long the serve loop waits for more messages to join a batch
    max_bytes_per_s: float | None = None  # per peer (client key): bytes it may send per second; None: no limit
    burst_bytes: float | None = None  # per peer: bytes it may send at once; None: one second's worth
    shutdown_grace_s: float = 2.0  # on Ctrl-C: how long to tell clients "provider-shutting-down" before closing
    max_kv_bytes_per_session: int = 256 << 20  # generation: the most trunk KV-cache bytes one session may hold

    def __post_init__(self) -> None:
        if self.max_bytes_per_s is not None and not self.max_bytes_per_s > 0:
            raise ConfigError(f"max_bytes_per_s must be positive (or None for no limit), got {self.max_bytes_per_s}")
        if self.burst_bytes is not None and not self.burst_bytes > 0:
            raise ConfigError(f"burst_bytes must be positive (or None for one second's worth), got {self.burst_bytes}")
        if not 0.0 <= self.shutdown_grace_s <= 600.0:
            raise ConfigError(f"shutdown_grace_s must be between 0 and 600 seconds, got {self.shutdown_grace_s}")
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1 (1 disables batching), got {self.max_batch}")
        if not 0.0 <= self.batch_wait_s <= 1.0:
            raise ConfigError(
                f"batch_wait_s must be between 0 and 1 second (a few ms is typical), got {self.batch_wait_s}"
            )


@dataclass
class Deferred:
    """A checked request whose computation may share one call with other sessions' requests.

    A session handler returns it from one of its ``batch_handlers`` after validating the message and updating
    its own state (e.g. claiming the step), so only the pure computation is postponed. Requests with equal
    ``key`` (e.g. the same trunk module) are run together by ``run(items)``, which returns, in order, each
    item's reply or the exception to turn into that item's ERROR reply.
    """

    key: Hashable
    run: Callable[[list[Deferred]], list[Message | BaseException]]
    data: Any


class SessionHandler(Protocol):
    """One protocol's provider side for one session.

    A handler may also have ``batch_handlers: dict[MsgType, Callable[[Message], Message | Deferred]]``, used
    by :meth:`ProviderApp.handle_many` instead of ``handlers`` for the types it lists.
    """

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


class TranscriptSink(Protocol):
    """Where a recording provider writes what it observes (``guardedp2p.attacks.transcript.TranscriptRecorder``).

    A protocol, not that class, so this layer does not depend on the attack code that reads the transcripts.
    """

    def record(
        self, sid: str, step: int, kind: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None
    ) -> object: ...


@dataclass
class ProviderResources:
    """What the provider process lends to the sessions of every design.

    Written by whoever assembles the app (``guardedp2p.service.provider.build_provider_app``, the evaluation
    grid, tests), read by the design session factories in ``guardedp2p.designs.*.provider``. A field a design
    does not use keeps its default; a design that needs a missing one refuses the session with an actionable
    error (e.g. Offline without ``emulator_dir``).
    """

    # Online and Gradfree: the frozen trunk, called as ``trunk(h, attention_mask)``, and its hidden width.
    trunk: nn.Module | None = None
    hidden_size: int | None = None
    model_config: PretrainedConfig | None = None
    # ``--record DIR``: every activation / gradient the provider sees, for the attack benches.
    recorder: TranscriptSink | None = None
    # Offline: the signed emulator folder served to clients.
    emulator_dir: str | os.PathLike[str] | None = None
    # Offline: where accepted adapter bundles land; None makes the first upload pick a temporary folder.
    upload_dir: str | os.PathLike[str] | None = None
    # Offline: the clients' verify keys (objects or NAME.sign.pub paths); None checks integrity only.
    client_verify_keys: Sequence[Ed25519PublicKey | str | os.PathLike[str]] | None = None
    # Offline: the largest adapter bundle accepted; None is the design's default.
    max_upload_bytes: int | None = None
    # Offline: called with (bundle folder, verification result) after each accepted bundle.
    on_adapter_bundle: Callable[[Path, VerifiedBundle], None] | None = None
    # Design-private caches keyed by design name (e.g. the parsed emulator catalog); not configuration.
    caches: dict[str, object] = field(default_factory=dict)


class ProviderApp:
    """Holds the sessions of all peers and routes each message through a fixed handler table."""

    def __init__(
        self,
        policy: ProviderPolicy,
        factories: dict[str, SessionFactory],
        config: ProviderConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        resources: ProviderResources | None = None,
    ) -> None:
        self.policy = policy
        self.factories = dict(factories)
        self.config = config or ProviderConfig()
        self.clock = clock
        self.resources = resources if resources is not None else ProviderResources()
        self.sessions: dict[str, SessionState] = {}
        self.stats = {
            "messages": 0,
            "errors": 0,
            "sessions_opened": 0,
            "batched_calls": 0,
            "batched_requests": 0,
            "rate_limited": 0,
        }
        self.buckets: dict[str, TokenBucket] = {}
        self._rate_warned: dict[str, float] = {}
        self.draining = False

    # ------------------------------------------------------------------ frames in, frames out
    def handle(self, peer: str, frames: Sequence[Frame]) -> list[Frame]:
        """Decode, dispatch and encode; every failure becomes an ERROR reply for this peer only."""
        reply, _, _ = self._process(peer, frames, defer=False)
        assert isinstance(reply, Message)
        return encode(reply)

    def _process(
        self,
        peer: str,
        frames: Sequence[Frame],
        *,
        defer: bool,
        on_decoded: Callable[[str, Message], None] | None = None,
    ) -> tuple[Message | Deferred, str, int]:
        """Charge, decode and dispatch one message (``on_decoded`` runs between decoding and dispatch); every
        failure becomes the ERROR reply for this peer only. Returns the reply (or deferred work) with the
        message's session and step. Shared by :meth:`handle` and :meth:`handle_many`."""
        self.stats["messages"] += 1
        sid, step = "", 0
        try:
            self._admit(peer, frames)
            msg = decode(frames, self.config.limits)
            sid, step = msg.session, msg.step
            if on_decoded is not None:
                on_decoded(peer, msg)
            return self._dispatch(peer, msg, defer=defer), sid, step
        except Exception as exc:  # noqa: BLE001 - keep serving other peers whatever happens
            return self._error_reply(peer, exc, sid, step), sid, step

    def handle_many(self, items: Sequence[tuple[str, Sequence[Frame]]]) -> list[list[Frame]]:
        """Answer several messages that arrived together; replies come back in the same order.

        Each message is decoded, checked and routed exactly as :meth:`handle` would (in arrival order, so the
        replay and step checks see the same sequence); a bad one gets its ERROR and nothing else changes.
        Requests a session defers (forward-only trunk passes) are computed in groups of at most
        ``config.max_batch`` sharing one call. Why: with several gradfree clients the trunk is called with
        a larger batch instead of N small ones, which is what an accelerator (and even a CPU) does best.
        """
        if self.config.max_batch <= 1 or len(items) <= 1:
            return [self.handle(peer, frames) for peer, frames in items]
        replies: list[list[Frame] | None] = [None] * len(items)
        pending: list[tuple[int, Deferred, str, str, int]] = []  # (index, deferred, peer, sid, step)

        def keep_order(peer: str, msg: Message) -> None:
            if msg.type != MsgType.ACT_UP and any(p[2] == peer for p in pending):
                # BYE, PING, HELLO (which may evict a session) of a peer with postponed work: finish that
                # work first, so the peer's messages take effect in the order it sent them
                self._run_deferred(pending, replies)
                pending.clear()

        for i, (peer, frames) in enumerate(items):
            out, sid, step = self._process(peer, frames, defer=True, on_decoded=keep_order)
            if isinstance(out, Deferred):
                pending.append((i, out, peer, sid, step))
            else:
                replies[i] = encode(out)
        self._run_deferred(pending, replies)
        return [
            r if r is not None else encode(error_message(ProtocolError("internal provider error: no reply")))
            for r in replies
        ]

    def _run_deferred(
        self, pending: list[tuple[int, Deferred, str, str, int]], replies: list[list[Frame] | None]
    ) -> None:
        """Run postponed requests, grouped by key in chunks of ``max_batch``; fill in their replies."""
        groups: dict[Hashable, list[tuple[int, Deferred, str, str, int]]] = {}
        for entry in pending:
            groups.setdefault(entry[1].key, []).append(entry)
        size = self.config.max_batch
        for group in groups.values():
            for start in range(0, len(group), size):
                chunk = group[start : start + size]
                results = self._run_chunk([e[1] for e in chunk])
                if len(chunk) > 1:
                    self.stats["batched_calls"] += 1
                    self.stats["batched_requests"] += len(chunk)
                for (i, _, peer, sid, step), res in zip(chunk, results):
                    replies[i] = encode(res if isinstance(res, Message) else self._error_reply(peer, res, sid, step))

    def _run_chunk(self, chunk: list[Deferred]) -> list[Message | BaseException]:
        """One shared computation; if it fails as a whole, retry each request alone so that whatever is wrong
        (one odd request, memory) costs only the request that causes it."""
        try:
            results = chunk[0].run(chunk)
            if len(results) != len(chunk):
                raise RuntimeError(f"a batch runner returned {len(results)} results for {len(chunk)} requests")
            return results
        except Exception as exc:  # noqa: BLE001
            if len(chunk) == 1:
                return [exc]
            log.warning(
                "a batched computation of %d requests failed (%s: %s); running them one by one",
                len(chunk),
                type(exc).__name__,
                exc,
            )
        singles: list[Message | BaseException] = []
        for d in chunk:
            try:
                singles.extend(d.run([d]))
            except Exception as exc:  # noqa: BLE001
                singles.append(exc)
        return singles

    def _admit(self, peer: str, frames: Sequence[Frame]) -> None:
        """Charge the peer's byte bucket; raise :class:`RateLimitExceeded` (nothing charged) when it is empty."""
        rate = self.config.max_bytes_per_s
        if rate is None:
            return
        now = self.clock()
        bucket = self.buckets.get(peer)
        if bucket is None:
            capacity = float(self.config.burst_bytes or rate)
            bucket = self.buckets[peer] = TokenBucket(rate, capacity, capacity, now)
        wait = bucket.take(sum(len(f) for f in frames), now)
        if wait > 0.0:
            raise RateLimitExceeded(
                f"this client sends more than the provider's limit of {rate / 1e6:g} MB/s; send the request again in "
                f"{wait:.3f} s (the client does this by itself)",
                retry_after_s=wait,
                limit_bytes_per_s=rate,
            )

    def _error_reply(self, peer: str, exc: BaseException, sid: str, step: int) -> Message:
        """The reply to a refused or failed message: our errors say why; anything else stays an internal error."""
        self.stats["errors"] += 1
        if isinstance(exc, RateLimitExceeded):
            self.stats["rate_limited"] += 1
            now = self.clock()
            if now - self._rate_warned.get(peer, -1e9) >= 10.0:  # a flood must not flood the log too
                self._rate_warned[peer] = now
                log.warning("rate-limiting %s (over %g MB/s)", _short(peer), exc.limit_bytes_per_s / 1e6)
            reply = error_message(exc, sid, step)
            reply.meta["retry_after_s"] = round(exc.retry_after_s, 6)
            reply.meta["limit_bytes_per_s"] = exc.limit_bytes_per_s
            return reply
        if isinstance(exc, GuardedP2PError):
            log.warning("refused a message from %s: %s", _short(peer), printable(exc))
            return _reject_or_error(exc, sid, step)
        log.error("internal error while handling a message from %s", _short(peer), exc_info=exc)
        return error_message(ProtocolError(f"internal provider error: {type(exc).__name__}"), sid, step)

    def _dispatch(self, peer: str, msg: Message, *, defer: bool) -> Message | Deferred:
        self.expire()
        if self.draining and msg.type != MsgType.BYE:
            state = self.sessions.get(msg.session)
            if state is not None and state.peer == peer:
                self.close_session(state.sid, "provider shutting down (client told)")
            raise ShuttingDown(
                "the provider is shutting down (its operator stopped it); no new work is accepted. Resume later."
            )
        if msg.type == MsgType.HELLO:
            return self._open(peer, msg)
        state = self.sessions.get(msg.session)
        if state is None:
            raise UnknownSession(f"session {msg.session[:16]!r} is unknown or expired; start a new session (HELLO)")
        if state.peer != peer:
            raise SessionOwnershipError("this session belongs to another client key")
        if msg.type.name not in DESIGNS[state.protocol].session_types:
            raise MessageNotAllowed(f"{msg.type.value} is not part of the {state.protocol} protocol")
        state.last_seen = self.clock()
        state.messages += 1
        if msg.type == MsgType.PING:
            return Message(MsgType.PONG, session=state.sid, step=msg.step)
        if msg.type == MsgType.BYE:
            self.close_session(state.sid, "client said BYE")
            return Message(MsgType.BYE_ACK, session=state.sid, step=msg.step)
        if defer:
            batch_handler = getattr(state.handler, "batch_handlers", {}).get(msg.type)  # constant name, our own object
            if batch_handler is not None:
                return batch_handler(msg)
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
        log.info("session %s opened: %s for %s (%s)", sid[:8], hello.protocol, _short(peer), printable(hello.software))
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
        for peer in [p for p, b in self.buckets.items() if b.full(now)]:
            del self.buckets[peer]
            self._rate_warned.pop(peer, None)

    def active_peers(self) -> set[str]:
        """Peers holding at least one open session (the serve loop waits for these to join a batch)."""
        return {s.peer for s in self.sessions.values()}

    def drop_peer(self, peer: str, reason: str) -> None:
        """Free every session of a peer (used when the transport knows the peer is gone)."""
        for sid, state in list(self.sessions.items()):
            if state.peer == peer:
                self.close_session(sid, reason)

    def begin_shutdown(self) -> None:
        """From now on answer every request but BYE with ERROR "provider-shutting-down" (and close its session),
        so clients learn at once why the provider goes away instead of timing out."""
        if not self.draining:
            self.draining = True
            log.info("shutting down: telling the clients of %d open session(s)", len(self.sessions))

    def shutdown(self) -> None:
        for sid in list(self.sessions):
            self.close_session(sid, "provider shutting down")


def _reject_or_error(exc: GuardedP2PError, sid: str, step: int) -> Message:
    if isinstance(exc, HandshakeRejected):
        return Message(MsgType.REJECT, session=sid, step=step, meta={"code": str(exc.code), "message": str(exc)[:2000]})
    if isinstance(exc, (WireError, ProtocolError)):
        return error_message(exc, sid, step)
    return error_message(exc, sid, step)


def _short(peer: str) -> str:
    return peer[:12] + "…" if len(peer) > 12 else peer


def printable(text: object, limit: int = 200) -> str:
    """``text`` safe for one log line: control characters (newlines, ANSI escapes) escaped, length capped.

    Client-chosen strings (``software``, error details quoting a request) reach the provider's log; unescaped, a
    client could forge log lines or clear the operator's terminal.
    """
    s = str(text)
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s[:limit])
    return out + "…" if len(s) > limit else out
