"""The wire: everything two parties agree on byte for byte.

- :mod:`~guardedp2p.wire.framing`: a message is a msgpack header frame plus one raw frame per tensor, decoded
  under hard :class:`WireLimits` before anything is allocated;
- :mod:`~guardedp2p.wire.messages`: the message types and which session may send which;
- :mod:`~guardedp2p.wire.handshake`: HELLO / ACCEPT / REJECT and the negotiation of codecs and terms;
- :mod:`~guardedp2p.wire.codecs`: the tensor codec registry (fp32, fp16, bf16, int8, int8-block, nf4, fp4);
- :mod:`~guardedp2p.wire.codes`: the one table of error codes an ``ERROR`` reply may carry.

Nothing here imports a transport: these modules turn messages into frames and back, nothing more (the
sans-I/O style of h11). The bytes are documented in ``docs/wire.md``.
"""

from guardedp2p.wire.framing import (
    DEFAULT_LIMITS,
    BadTensorSpec,
    Frame,
    FrameLengthMismatch,
    MalformedHeader,
    Message,
    MessageTooLarge,
    UnknownMessageType,
    VersionMismatch,
    WireLimits,
    decode,
    dtype_from_name,
    dtype_name,
    encode,
    error_message,
    frames_nbytes,
)

__all__ = [
    "DEFAULT_LIMITS",
    "BadTensorSpec",
    "Frame",
    "FrameLengthMismatch",
    "MalformedHeader",
    "Message",
    "MessageTooLarge",
    "UnknownMessageType",
    "VersionMismatch",
    "WireLimits",
    "decode",
    "dtype_from_name",
    "dtype_name",
    "encode",
    "error_message",
    "frames_nbytes",
]
