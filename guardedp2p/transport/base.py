"""Transport-neutral channel interfaces and errors.

The transport moves *lists of byte frames* between exactly two kinds of endpoint: a client (data owner) that
talks to one provider, and a server (model provider) that answers many clients. It knows nothing about what the
frames mean; the wire format sits on top. Protocol code depends only on this module, never on ``zmq``, so an
in-process transport can replace ZeroMQ in tests.

Buffer ownership: ``send`` may hand buffers to the transport *without copying* (zero copy). A buffer passed to
``send`` must therefore not be modified afterwards (send a fresh tensor/bytes, or copy first). Received frames are
``memoryview`` (writable, each keeping its own buffer alive) or ``bytes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from guardedp2p.errors import TransportError
from guardedp2p.wire.framing import Frame, frames_nbytes  # bytes only; the transport never reads their meaning

Frames = Sequence[Frame]
"""What a channel sends: one message is an ordered sequence of byte frames (what ``wire.framing.encode`` returns)."""

INSECURE_PEER_PREFIX = "insecure:"
"""Peer ids of unauthenticated (``--insecure``) clients start with this, followed by the routing id in hex."""


class PeerRejected(TransportError):
    """The provider refused our client key (ZAP status 400, HANDSHAKE_FAILED_AUTH)."""


class ProviderKeyMismatch(TransportError):
    """The provider's key does not match the pinned provider key (CURVE handshake failed on the client)."""


class MechanismMismatch(TransportError):
    """One side runs CURVE and the other plaintext (``--insecure``); libzmq refuses to mix them."""


class PeerTimeout(TransportError):
    """Nothing was heard from the peer within the timeout."""


class ChannelClosed(TransportError):
    """The channel was closed (by us) or the peer is gone, so it cannot carry messages any more."""


class PeerDisconnected(ChannelClosed):
    """The connection to the peer dropped while replies were awaited: those replies cannot arrive (the peer stopped,
    crashed or restarted, and a restarted provider holds none of the old sessions). Raised at once instead of after
    the reply timeout; the channel itself may reconnect, so a new session can be opened on it or on a new one."""


@dataclass
class Incoming:
    """One message received by a server.

    ``peer`` is who sent it: the client's authenticated CURVE public key (z85 str, 40 chars), or
    ``"insecure:<routing id hex>"`` when the server runs without encryption. ``route`` is the opaque routing id
    to pass back to :meth:`ServerChannel.send` to answer this client.
    """

    peer: str
    route: bytes
    frames: list[memoryview | bytes] = field(default_factory=list)

    @property
    def authenticated(self) -> bool:
        """True when ``peer`` is a CURVE key checked against the allow-list, not an insecure routing id."""
        return not self.peer.startswith(INSECURE_PEER_PREFIX)


@runtime_checkable
class ClientChannel(Protocol):
    """A client's connection to one provider."""

    bytes_sent: int
    bytes_received: int

    def send(self, frames: Frames) -> None:
        """Queue one message for the provider. Do not modify the buffers afterwards."""
        ...

    def recv(self, timeout: float) -> Sequence[memoryview | bytes]:
        """Wait up to ``timeout`` seconds for the next message; raise :class:`PeerTimeout` if none came."""
        ...

    def close(self) -> None:
        """Release the connection; idempotent."""
        ...


@runtime_checkable
class ServerChannel(Protocol):
    """A provider's listening endpoint, serving many clients (one serving thread)."""

    def recv(self, timeout: float) -> Incoming | None:
        """Wait up to ``timeout`` seconds for a message from any client; ``None`` on timeout."""
        ...

    def send(self, route: bytes, frames: Frames) -> None:
        """Send one message to the client identified by ``route`` (from :attr:`Incoming.route`)."""
        ...

    def close(self) -> None:
        """Stop serving; idempotent."""
        ...


__all__ = [
    "Frames",
    "INSECURE_PEER_PREFIX",
    "PeerRejected",
    "ProviderKeyMismatch",
    "MechanismMismatch",
    "PeerTimeout",
    "ChannelClosed",
    "Incoming",
    "ClientChannel",
    "ServerChannel",
    "frames_nbytes",
]
