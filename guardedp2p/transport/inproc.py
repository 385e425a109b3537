"""In-process transport: the client channel calls the provider application directly.

Frames are copied on the way in both directions, as a real wire would, so no tensor memory is shared between
the parties and byte counts are exactly those of the ZeroMQ transport. Tests run the real protocol code
through it without sockets or threads.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Sequence

from guardedp2p.transport.base import ChannelClosed, PeerTimeout


class InProcClientChannel:
    """A :class:`~guardedp2p.transport.base.ClientChannel` wired straight to a ``ProviderApp``."""

    def __init__(self, app: Any, peer: str = "inproc:client") -> None:
        self.app = app
        self.peer = peer
        self.replies: deque[list[bytes]] = deque()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.closed = False
        self.fail_after: int | None = None  # tests: simulate a provider that dies after N requests

    def send(self, frames: Sequence[Any]) -> None:
        if self.closed:
            raise ChannelClosed("the in-process channel is closed")
        if self.fail_after is not None:
            if self.fail_after <= 0:
                return  # the "provider" is dead: the request vanishes, recv times out
            self.fail_after -= 1
        copied = [bytes(f) for f in frames]
        self.bytes_sent += sum(len(f) for f in copied)
        reply = self.app.handle(self.peer, copied)
        self.replies.append([bytes(f) for f in reply])

    def recv(self, timeout: float) -> list[bytes]:
        if not self.replies:
            raise PeerTimeout(f"no reply from the in-process provider within {timeout:.1f} s")
        frames = self.replies.popleft()
        self.bytes_received += sum(len(f) for f in frames)
        return frames

    def close(self) -> None:
        self.closed = True
