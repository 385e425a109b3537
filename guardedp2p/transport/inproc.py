"""In-process transport: the client channel calls the provider application directly.

Frames are copied on the way in both directions, as a real wire would, so no tensor memory is shared between
the parties and byte counts are exactly those of the ZeroMQ transport. Tests run the real protocol code
through it without sockets or threads.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from typing import TYPE_CHECKING

from guardedp2p.transport.base import ChannelClosed, Frames, Incoming, PeerTimeout

if TYPE_CHECKING:
    from guardedp2p.protocol.provider import ProviderApp


class InProcClientChannel:
    """A :class:`~guardedp2p.transport.base.ClientChannel` wired straight to a ``ProviderApp``."""

    def __init__(self, app: ProviderApp, peer: str = "inproc:client") -> None:
        self.app = app
        self.peer = peer
        self.replies: deque[list[bytes]] = deque()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.closed = False
        self.fail_after: int | None = None  # tests: simulate a provider that dies after N requests

    def send(self, frames: Frames) -> None:
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


class InProcServerChannel:
    """A :class:`~guardedp2p.transport.base.ServerChannel` fed through queues by :class:`InProcQueueClient`\\ s.

    Unlike :class:`InProcClientChannel`, which calls the app directly, this drives the real serve loop
    (``serve_forever``) from client threads, so tests can exercise batching and shutdown without sockets.
    """

    def __init__(self) -> None:
        self._inbox: queue.Queue[Incoming] = queue.Queue()
        self._outboxes: dict[bytes, queue.Queue[list[bytes]]] = {}
        self._lock = threading.Lock()
        self.closed = False

    def connect(self, peer: str) -> InProcQueueClient:
        """A new client connection whose messages arrive as coming from ``peer`` (its authenticated key)."""
        with self._lock:
            route = len(self._outboxes).to_bytes(4, "big")
            self._outboxes[route] = queue.Queue()
        return InProcQueueClient(self, peer, route)

    def recv(self, timeout: float) -> Incoming | None:
        if self.closed:
            raise ChannelClosed("the in-process server channel is closed")
        try:
            return self._inbox.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def send(self, route: bytes, frames: Frames) -> None:
        if self.closed:
            raise ChannelClosed("the in-process server channel is closed")
        box = self._outboxes.get(route)
        if box is None:
            raise ChannelClosed(f"no in-process client with route {route.hex()}")
        box.put([bytes(f) for f in frames])

    def close(self) -> None:
        self.closed = True

    def _deliver(self, incoming: Incoming) -> None:
        self._inbox.put(incoming)

    def _reply_for(self, route: bytes, timeout: float) -> list[bytes]:
        return self._outboxes[route].get(timeout=max(0.0, timeout))


class InProcQueueClient:
    """Client end of :class:`InProcServerChannel` (a :class:`~guardedp2p.transport.base.ClientChannel`)."""

    def __init__(self, server: InProcServerChannel, peer: str, route: bytes) -> None:
        self.server = server
        self.peer = peer
        self.route = route
        self.bytes_sent = 0
        self.bytes_received = 0
        self.closed = False

    def send(self, frames: Frames) -> None:
        if self.closed or self.server.closed:
            raise ChannelClosed("the in-process channel is closed")
        copied = [bytes(f) for f in frames]
        self.bytes_sent += sum(len(f) for f in copied)
        self.server._deliver(Incoming(peer=self.peer, route=self.route, frames=list(copied)))

    def recv(self, timeout: float) -> list[bytes]:
        try:
            frames = self.server._reply_for(self.route, timeout)
        except queue.Empty:
            raise PeerTimeout(f"no reply from the in-process provider within {timeout:.1f} s") from None
        self.bytes_received += sum(len(f) for f in frames)
        return frames

    def close(self) -> None:
        self.closed = True
