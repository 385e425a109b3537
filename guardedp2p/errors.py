"""Exception hierarchy.

Every error a user can meet is a subclass of :class:`GuardedP2PError` and carries a message that says
what happened and what to do, so the CLI can print it and exit with a clean code instead of a traceback.

``code`` is what an ERROR reply carries (``docs/wire.md`` section 7). Every code is a row of
:class:`guardedp2p.wire.codes.ErrorCode`; this module spells the four below as plain strings because the wire
package imports it (``tests/wire/test_codes.py`` checks that they are rows of the table).
"""

from __future__ import annotations

from typing import Any


class GuardedP2PError(Exception):
    """Base class of every error guardedp2p raises on purpose."""

    exit_code: int = 1


class ConfigError(GuardedP2PError):
    """A configuration value or a file the user gave is unusable."""

    exit_code = 2


class WireError(GuardedP2PError):
    """A received message violates the wire format; the peer gets an ERROR reply, the process keeps running."""

    code: str = "wire"  # ErrorCode.WIRE
    exit_code = 3


class TransportError(GuardedP2PError):
    """The channel to the peer failed (refused, wrong key, timeout, closed)."""

    exit_code = 4


class ProtocolError(GuardedP2PError):
    """A well-formed message arrived in a state where the protocol does not allow it."""

    code: str = "protocol"  # ErrorCode.PROTOCOL
    exit_code = 5


class HandshakeRejected(ProtocolError):
    """The peer refused the session (version, protocol, model fingerprint, codec or privacy mismatch)."""

    code: str = "rejected"  # ErrorCode.REJECTED
    exit_code = 6


class RemoteError(ProtocolError):
    """The peer replied with an ERROR message; its text is in the message, its code in ``remote_code``."""

    code: str = "remote"  # ErrorCode.REMOTE
    exit_code = 7

    def __init__(self, message: str, *, remote_code: str = "", meta: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.remote_code = remote_code
        self.meta: dict[str, Any] = dict(meta or {})


class ProviderShuttingDown(RemoteError):
    """The provider is stopping (its operator pressed Ctrl-C) and said so instead of going silent.

    Retrying at once cannot help (a restart takes longer than any back-off), so a run stops with its checkpoint."""


class RateLimited(RemoteError):
    """The provider kept refusing our traffic as over its per-client byte rate for longer than we wait."""


class ArtifactError(GuardedP2PError):
    """A signed artifact failed verification (bad signature, digest mismatch, missing file)."""

    exit_code = 8
