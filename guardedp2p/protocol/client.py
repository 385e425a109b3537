"""The client end of a session: handshake, request/reply with checks, and byte accounting per message type.

It sits on any :class:`~guardedp2p.transport.base.ClientChannel` (in-process or ZeroMQ), so the protocol
code above it is identical in tests and in deployment. Cost is measured here, on the encoded frames, not
estimated from shapes.

Several requests may be outstanding (issue 19: the pipelined split step keeps micro-batches in flight):
:meth:`ClientSession.send` sends without waiting and :meth:`ClientSession.receive` takes the reply of one sent
request. Replies are matched to requests by the step id every reply repeats (the requests in flight have
distinct steps: ACT_UP steps strictly increase, and a GRAD_UP goes only after its ACT_DOWN came), so no new id
travels on the wire; the provider computes a client's requests in order, but refuses a request as soon as it
reads it, which may be before earlier replies (docs/wire.md, section 1). A refusal over the provider's byte rate
names the refused request's step (the provider reads the header first), so that request alone is sent again. A
refusal that names no step (a header the provider could not read) can only be matched when one request is in
flight; with several, the session is given up (a :class:`RemoteError`, which the run's retry ladder answers with a
new session). :meth:`ClientSession.request` is the two in a row.

Backpressure (issue 19): the provider's ACCEPT announces its bounds (``limits``, docs/wire.md section 5); the
session never has more requests in flight than its ``max_unanswered`` (over it the provider cuts the client off):
:meth:`ClientSession.send` first reads replies (kept for :meth:`ClientSession.receive`) until there is room. A
provider that announces none gets today's behaviour: no cap here (callers bound themselves, e.g. the pipeline's
window).
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from guardedp2p.errors import HandshakeRejected, ProtocolError, ProviderShuttingDown, RateLimited, RemoteError
from guardedp2p.wire.framing import DEFAULT_LIMITS, Frame, Message, WireLimits, decode, encode, frames_nbytes
from guardedp2p.wire.handshake import Hello
from guardedp2p.wire.messages import ERROR_RATE_LIMITED, ERROR_SHUTTING_DOWN, MsgType

log = logging.getLogger("guardedp2p.client")


class FrameChannel(Protocol):
    """The two calls a session makes on its channel.

    Every client channel of :mod:`guardedp2p.transport` (``ClientChannel``: in-process or ZeroMQ) has them; the
    protocol is declared here so that this sans-I/O layer never imports the transports (the import contracts in
    pyproject.toml check it).
    """

    def send(self, frames: Sequence[Frame]) -> None: ...

    def recv(self, timeout: float) -> Sequence[Frame]: ...


@dataclass
class WireStats:
    """Bytes and messages per direction and message type, plus time spent waiting on the peer."""

    bytes_up: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes_down: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    messages: int = 0
    wait_s: float = 0.0  # wall time spent sending requests and blocked on their replies (wire + provider compute)
    codec_s: float = 0.0  # local encode + decode time
    provider_s: float = 0.0  # compute time the provider reported in its replies
    rate_limited: int = 0  # requests the provider refused as over its per-client byte rate (then sent again)
    rate_limited_wait_s: float = 0.0  # time spent waiting for the provider's rate limit

    @property
    def total_up(self) -> int:
        return sum(self.bytes_up.values())

    @property
    def total_down(self) -> int:
        return sum(self.bytes_down.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "bytes_up": self.total_up,
            "bytes_down": self.total_down,
            "bytes_up_by_type": dict(self.bytes_up),
            "bytes_down_by_type": dict(self.bytes_down),
            "messages": self.messages,
            "wait_s": round(self.wait_s, 4),
            "codec_s": round(self.codec_s, 4),
            "provider_s": round(self.provider_s, 4),
            "rate_limited": self.rate_limited,
            "rate_limited_wait_s": round(self.rate_limited_wait_s, 4),
        }


def announced_limit(terms: object, name: str) -> int | None:
    """The positive integer limit ``name`` of an ACCEPT's ``limits`` map, or None when the provider announced none
    (an older provider) or an unusable value (the terms are data from the peer)."""
    limits = terms.get("limits") if isinstance(terms, dict) else None
    value = limits.get(name) if isinstance(limits, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return None


MAX_RETRY_AFTER_S = 60.0
"""The longest single wait a provider's ``retry_after_s`` hint can impose (a hint is data from the peer)."""


@dataclass(eq=False)
class PendingRequest:
    """A request sent by :meth:`ClientSession.send`; pass it to :meth:`ClientSession.receive` for its reply."""

    msg: Message
    expect: MsgType
    frames: list[Frame]
    waited: float = 0.0  # seconds waited so far for the provider's rate limit (then sent again)
    reply: Message | None = None  # set once its reply has arrived


class ClientSession:
    """Request/reply over a channel, bound to one provider session after :meth:`open`.

    A request the provider refuses as over its per-client byte rate ("rate-limited") was not processed, so it
    is sent again after the provider's ``retry_after_s`` hint, for at most ``rate_limit_wait_s`` in all per
    request; only then does it fail (:class:`RateLimited`). Why here: every caller (training, evaluation,
    offline transfers) then rides out a limit the same way, without using up its reconnect retries.
    """

    def __init__(
        self,
        channel: FrameChannel,
        *,
        timeout: float = 30.0,
        limits: WireLimits = DEFAULT_LIMITS,
        stats: WireStats | None = None,
        rate_limit_wait_s: float = 300.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.channel = channel
        self.timeout = timeout
        self.limits = limits
        self.stats = stats if stats is not None else WireStats()  # shared across reconnects of one run
        self.rate_limit_wait_s = rate_limit_wait_s
        self.sleep = sleep
        self.sid = ""
        self.terms: dict[str, Any] = {}
        self._in_flight: deque[PendingRequest] = deque()  # sent, reply not yet read: the order replies come in

    def open(self, hello: Hello) -> dict[str, Any]:
        """Send HELLO; return the agreed terms or raise :class:`HandshakeRejected` with the provider's reason."""
        reply = self.request(Message(MsgType.HELLO, meta=hello.to_meta()), expect=MsgType.ACCEPT)
        sid = reply.meta.get("session")
        if not isinstance(sid, str) or not sid:
            raise ProtocolError("the provider's ACCEPT carries no session id")
        self.sid = sid
        self.terms = reply.meta
        log.info("session %s opened (%s)", sid[:8], hello.protocol)
        return reply.meta

    def request(self, msg: Message, *, expect: MsgType) -> Message:
        """Send one message and wait for its reply; the reply's type and step id are checked."""
        return self.receive(self.send(msg, expect=expect))

    @property
    def in_flight(self) -> int:
        """Requests sent whose replies have not been read yet."""
        return len(self._in_flight)

    def limit(self, name: str) -> int | None:
        """A bound the provider announced in its ACCEPT (``limits``), or None (not announced, or no session yet)."""
        return announced_limit(self.terms, name)

    @property
    def max_in_flight(self) -> int | None:
        """The most requests this session keeps in flight: the provider's announced ``max_unanswered`` (None: no
        cap announced)."""
        return self.limit("max_unanswered") if self.sid else None

    def send(self, msg: Message, *, expect: MsgType) -> PendingRequest:
        """Send one message without waiting for its reply; :meth:`receive` takes the reply later.

        Replies come in the order the requests were sent, so later requests may be sent first and their replies
        read in any order (earlier replies are kept until asked for). Every request needs its own step id where
        the protocol checks them (ACT_UP steps strictly increase). With :attr:`max_in_flight` requests in flight
        already, the oldest replies are read first (backpressure: the provider would cut the client off)."""
        cap = self.max_in_flight if msg.type != MsgType.HELLO else None
        while cap is not None and len(self._in_flight) >= cap:
            self._read_reply()
        if msg.type != MsgType.HELLO:
            msg.session = self.sid
        t0 = time.perf_counter()
        frames = encode(msg)
        self.stats.codec_s += time.perf_counter() - t0
        pending = PendingRequest(msg, expect, frames)
        self._transmit(pending)
        self._in_flight.append(pending)
        return pending

    def receive(self, pending: PendingRequest) -> Message:
        """The reply to ``pending`` (waiting for it and reading the replies before it); checked like
        :meth:`request`'s. A request refused as rate-limited is sent again by itself, as in :meth:`request`."""
        if pending.reply is None and pending not in self._in_flight:
            raise ProtocolError(
                f"no reply is awaited for {pending.msg.type.value} step {pending.msg.step} on this session"
            )
        while pending.reply is None:
            self._read_reply()
        return self._checked(pending, pending.reply)

    def _transmit(self, pending: PendingRequest) -> None:
        t1 = time.perf_counter()
        self.channel.send(pending.frames)
        self.stats.wait_s += time.perf_counter() - t1  # an in-process provider computes inside send
        self.stats.bytes_up[pending.msg.type.value] += frames_nbytes(pending.frames)

    def _read_reply(self) -> None:
        """Read the next reply and give it to its request (or send that request again, when the provider refused
        it for its rate limit). A failure leaves nothing in flight: the replies of this channel can no longer be
        matched, so the session must be replaced (the run's retry ladder does)."""
        try:
            reply = self._next_reply()
            head = self._match(reply)
        except BaseException:
            self._in_flight.clear()
            raise
        self._in_flight.remove(head)
        if (
            reply.type == MsgType.ERROR
            and reply.meta.get("code") == ERROR_RATE_LIMITED
            and head.waited < self.rate_limit_wait_s
        ):
            delay = min(_retry_after(reply.meta), self.rate_limit_wait_s - head.waited)
            log.debug("rate-limited by the provider; sending %s again in %.3f s", head.msg.type.value, delay)
            self.stats.rate_limited += 1
            self.stats.rate_limited_wait_s += delay
            self.sleep(delay)
            head.waited += delay
            self._transmit(head)
            self._in_flight.append(head)
            return
        head.reply = reply

    def _match(self, reply: Message) -> PendingRequest:
        """The request in flight that ``reply`` answers: the one with its step (and this session); with a single
        request in flight, that one (its checks then report a reply for another step)."""
        for pending in self._in_flight:
            if pending.msg.step == reply.step and (pending.msg.type == MsgType.HELLO or reply.session == self.sid):
                return pending
        if len(self._in_flight) == 1:
            return self._in_flight[0]
        n = len(self._in_flight)
        if reply.type == MsgType.ERROR:
            code = str(reply.meta.get("code", "?"))
            raise RemoteError(
                f"the provider refused one of the {n} requests in flight without naming its step: [{code}] "
                f"{reply.meta.get('message', '?')}; this session's replies can no longer be matched",
                remote_code=code,
                meta=reply.meta,
            )
        raise ProtocolError(
            f"a {reply.type.value} reply for session/step {reply.session[:8]}/{reply.step} matches none of the {n} "
            "requests in flight"
        )

    def _checked(self, pending: PendingRequest, reply: Message) -> Message:
        msg, expect, waited = pending.msg, pending.expect, pending.waited
        if reply.type == MsgType.REJECT:
            raise HandshakeRejected(f"the provider rejected the session: {reply.meta.get('message', '?')}")
        if reply.type == MsgType.ERROR:
            code = str(reply.meta.get("code", "?"))
            text = f"the provider refused {msg.type.value} (step {msg.step}): [{code}] {reply.meta.get('message', '?')}"
            if code == ERROR_SHUTTING_DOWN:
                raise ProviderShuttingDown(text, remote_code=code, meta=reply.meta)
            if code == ERROR_RATE_LIMITED:
                limit = reply.meta.get("limit_bytes_per_s")
                rate = (
                    f" of {limit / 1e6:g} MB/s"
                    if isinstance(limit, (int, float)) and not isinstance(limit, bool)
                    else ""
                )
                raise RateLimited(
                    f"{text}. Still over the provider's per-client rate limit{rate} after waiting {waited:.0f} s: send less per "
                    "step (smaller --batch-size or --max-length, a smaller --codec) or ask the operator to raise --max-mb-per-s",
                    remote_code=code,
                    meta=reply.meta,
                )
            raise RemoteError(text, remote_code=code, meta=reply.meta)
        if reply.type != expect:
            raise ProtocolError(f"expected {expect.value} in reply to {msg.type.value}, got {reply.type.value}")
        if msg.type != MsgType.HELLO and (reply.session != self.sid or reply.step != msg.step):
            raise ProtocolError(
                f"reply is for session/step {reply.session[:8]}/{reply.step}, expected {self.sid[:8]}/{msg.step}"
            )
        return reply

    def _next_reply(self) -> Message:
        """The next reply off the channel, with the byte and time accounting."""
        t1 = time.perf_counter()
        reply_frames = self.channel.recv(self.timeout)
        t2 = time.perf_counter()
        reply = decode(reply_frames, self.limits)
        t3 = time.perf_counter()
        self.stats.bytes_down[reply.type.value] += frames_nbytes(reply_frames)
        self.stats.messages += 1
        self.stats.codec_s += t3 - t2
        self.stats.wait_s += t2 - t1
        provider_s = reply.meta.get("compute_s")
        if isinstance(provider_s, float):
            self.stats.provider_s += provider_s
        return reply

    def ping(self) -> None:
        self.request(Message(MsgType.PING), expect=MsgType.PONG)

    def close(self) -> None:
        """Say BYE so the provider frees the session now rather than at its idle timeout."""
        if not self.sid:
            return
        try:
            self.request(Message(MsgType.BYE), expect=MsgType.BYE_ACK)
        except Exception as exc:  # noqa: BLE001 - closing is best effort
            log.debug("BYE failed: %s", exc)
        self.sid = ""


def _retry_after(meta: dict[str, Any]) -> float:
    """The provider's retry hint, bounded (it is data from the peer); 1 s when absent or unusable."""
    value = meta.get("retry_after_s")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return 1.0
    return min(MAX_RETRY_AFTER_S, max(0.001, float(value) * 1.01 + 0.001))  # a hair late rather than early again
