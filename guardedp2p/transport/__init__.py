"""Transports: move lists of byte frames between a client and a provider.

Protocol code imports only :mod:`guardedp2p.transport.base` (interfaces and errors); the ZeroMQ classes are
imported lazily here so that ``import guardedp2p.transport`` does not pull in ``zmq``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from guardedp2p.transport.base import (
    INSECURE_PEER_PREFIX,
    ChannelClosed,
    ClientChannel,
    Frames,
    Incoming,
    MechanismMismatch,
    PeerDisconnected,
    PeerRejected,
    PeerTimeout,
    ProviderKeyMismatch,
    ServerChannel,
    frames_nbytes,
)

if TYPE_CHECKING:  # pragma: no cover
    from guardedp2p.transport.zmq_client import ClientConfig as ClientConfig
    from guardedp2p.transport.zmq_client import ZmqClientChannel as ZmqClientChannel
    from guardedp2p.transport.zmq_server import ServerConfig as ServerConfig
    from guardedp2p.transport.zmq_server import ZmqServerChannel as ZmqServerChannel

_LAZY = {
    "ClientConfig": "guardedp2p.transport.zmq_client",
    "ZmqClientChannel": "guardedp2p.transport.zmq_client",
    "ServerConfig": "guardedp2p.transport.zmq_server",
    "ZmqServerChannel": "guardedp2p.transport.zmq_server",
    "InsecureTransportWarning": "guardedp2p.transport.zmq_server",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Frames",
    "INSECURE_PEER_PREFIX",
    "Incoming",
    "ClientChannel",
    "ServerChannel",
    "PeerRejected",
    "ProviderKeyMismatch",
    "MechanismMismatch",
    "PeerTimeout",
    "ChannelClosed",
    "PeerDisconnected",
    "frames_nbytes",
    *_LAZY,
]
