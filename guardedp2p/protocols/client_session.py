"""The client end of a session: handshake, request/reply with checks, and byte accounting per message type.

It sits on any :class:`~guardedp2p.transport.base.ClientChannel` (in-process or ZeroMQ), so the protocol
code above it is identical in tests and in deployment. Cost is measured here, on the encoded frames, not
estimated from shapes.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from guardedp2p.errors import HandshakeRejected, ProtocolError, RemoteError
from guardedp2p.handshake import Hello
from guardedp2p.messages import MsgType
from guardedp2p.wire import DEFAULT_LIMITS, Message, WireLimits, decode, encode, frames_nbytes

log = logging.getLogger("guardedp2p.client")


@dataclass
class WireStats:
    """Bytes and messages per direction and message type, plus time spent waiting on the peer."""

    bytes_up: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes_down: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    messages: int = 0
    wait_s: float = 0.0  # wall time between sending a request and having its reply (wire + provider compute)
    codec_s: float = 0.0  # local encode + decode time
    provider_s: float = 0.0  # compute time the provider reported in its replies

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
        }


class ClientSession:
    """Request/reply over a channel, bound to one provider session after :meth:`open`."""

    def __init__(self, channel: Any, *, timeout: float = 30.0, limits: WireLimits = DEFAULT_LIMITS, stats: WireStats | None = None) -> None:
        self.channel = channel
        self.timeout = timeout
        self.limits = limits
        self.stats = stats if stats is not None else WireStats()  # shared across reconnects of one run
        self.sid = ""
        self.terms: dict[str, Any] = {}

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
        if msg.type != MsgType.HELLO:
            msg.session = self.sid
        t0 = time.perf_counter()
        frames = encode(msg)
        t1 = time.perf_counter()
        self.channel.send(frames)
        self.stats.bytes_up[msg.type.value] += frames_nbytes(frames)
        reply_frames = self.channel.recv(self.timeout)
        t2 = time.perf_counter()
        reply = decode(reply_frames, self.limits)
        t3 = time.perf_counter()
        self.stats.bytes_down[reply.type.value] += frames_nbytes(reply_frames)
        self.stats.messages += 1
        self.stats.codec_s += (t1 - t0) + (t3 - t2)
        self.stats.wait_s += t2 - t1
        provider_s = reply.meta.get("compute_s")
        if isinstance(provider_s, float):
            self.stats.provider_s += provider_s
        if reply.type == MsgType.REJECT:
            raise HandshakeRejected(f"the provider rejected the session: {reply.meta.get('message', '?')}")
        if reply.type == MsgType.ERROR:
            raise RemoteError(f"the provider refused {msg.type.value} (step {msg.step}): [{reply.meta.get('code', '?')}] {reply.meta.get('message', '?')}")
        if reply.type != expect:
            raise ProtocolError(f"expected {expect.value} in reply to {msg.type.value}, got {reply.type.value}")
        if msg.type != MsgType.HELLO and (reply.session != self.sid or reply.step != msg.step):
            raise ProtocolError(f"reply is for session/step {reply.session[:8]}/{reply.step}, expected {self.sid[:8]}/{msg.step}")
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
