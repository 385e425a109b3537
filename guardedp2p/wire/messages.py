"""The fixed set of message types and which protocol may use which.

The sets below are the single source of truth for the handler tables: a protocol registers handlers only
for the types listed here, so, for example, a Gradfree session cannot even route a gradient message.
"""

from __future__ import annotations

from enum import Enum

from guardedp2p.wire.codes import ErrorCode

WIRE_VERSION = 1


class MsgType(str, Enum):
    """Every message type that may appear on the wire (anything else is rejected by the decoder)."""

    HELLO = "HELLO"  # C->P: open a session (negotiation)
    ACCEPT = "ACCEPT"  # P->C: session accepted, carries the session id
    REJECT = "REJECT"  # P->C: session refused, carries the reason
    ERROR = "ERROR"  # either way: the last message was refused; carries code + text
    PING = "PING"  # C->P: liveness / keep-alive
    PONG = "PONG"  # P->C
    BYE = "BYE"  # C->P: close the session, provider frees everything it holds for it
    BYE_ACK = "BYE_ACK"  # P->C
    ACT_UP = "ACT_UP"  # C->P: bottom activations h1 (+ attention mask)
    ACT_DOWN = "ACT_DOWN"  # P->C: trunk output h2
    GRAD_UP = "GRAD_UP"  # C->P: dL/dh2 (Online only)
    GRAD_DOWN = "GRAD_DOWN"  # P->C: dL/dh1 (Online only)
    MANIFEST_REQ = "MANIFEST_REQ"  # C->P: ask for the signed emulator manifest (Offline)
    MANIFEST = "MANIFEST"  # P->C
    CHUNK_REQ = "CHUNK_REQ"  # C->P: ask for bytes [offset, offset+length) of one manifest file
    CHUNK = "CHUNK"  # P->C: the bytes + their SHA-256
    UPLOAD = "UPLOAD"  # C->P: one chunk of the signed adapter bundle (Offline)
    UPLOAD_ACK = "UPLOAD_ACK"  # P->C


#: ERROR codes a client acts on (the rest it only shows); short names for rows of :mod:`guardedp2p.wire.codes`.
ERROR_RATE_LIMITED = ErrorCode.RATE_LIMITED  # meta["retry_after_s"]: when the same request will be accepted
ERROR_SHUTTING_DOWN = ErrorCode.PROVIDER_SHUTTING_DOWN  # the provider stops; resume later


def __getattr__(name: str) -> object:
    """Deprecated names (one release): the design table moved to :mod:`guardedp2p.designs`."""
    import warnings

    if name in ("PROTOCOLS", "SESSION_TYPES"):
        from guardedp2p.designs import DESIGN_NAMES, DESIGNS

        warnings.warn(
            f"guardedp2p.wire.messages.{name} moved to guardedp2p.designs.DESIGNS", DeprecationWarning, stacklevel=2
        )
        if name == "PROTOCOLS":
            return DESIGN_NAMES
        return {n: frozenset(MsgType[m] for m in d.session_types) for n, d in DESIGNS.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
