"""The one table of error codes: what an ``ERROR`` (or ``REJECT``) reply's ``meta.code`` may say, and what it means.

Why one table: both peers must spell a code the same way, and a client decides from the code alone whether to
send a request again (``rate-limited``) or to stop and resume later (``provider-shutting-down``). Every
exception class with a ``code`` takes it from :class:`ErrorCode`; ``docs/wire.md`` section 7 lists the same rows,
and ``tests/wire/test_codes.py`` checks both directions. Codes are lowercase words joined by hyphens.

A few codes never cross the wire (``local``): they label errors a client raises about a reply it received
(``remote``, ``transfer``), so logs and exit messages use the same vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

__all__ = ["CODES", "CodeInfo", "ErrorCode", "info"]


class ErrorCode(StrEnum):
    """Every error code guardedp2p uses. A member *is* its string (``ErrorCode.RATE_LIMITED == "rate-limited"``)."""

    # generic
    ERROR = "error"
    # wire format (guardedp2p.wire.framing, guardedp2p.wire.codecs)
    WIRE = "wire"
    MALFORMED_HEADER = "malformed-header"
    VERSION = "version"
    UNKNOWN_TYPE = "unknown-type"
    BAD_TENSOR = "bad-tensor"
    FRAME_LENGTH = "frame-length"
    TOO_LARGE = "too-large"
    CODEC = "codec"
    UNKNOWN_CODEC = "unknown-codec"
    MALFORMED_ENCODING = "malformed-encoding"
    # sessions (guardedp2p.protocol)
    PROTOCOL = "protocol"
    REJECTED = "rejected"
    UNKNOWN_SESSION = "unknown-session"
    NOT_YOUR_SESSION = "not-your-session"
    NOT_ALLOWED = "not-allowed"
    RATE_LIMITED = "rate-limited"
    PROVIDER_SHUTTING_DOWN = "provider-shutting-down"
    OVER_BUDGET = "over-budget"
    # online / gradfree trunk (guardedp2p.designs.online)
    REPLAYED_STEP = "replayed-step"
    NO_PENDING_STEP = "no-pending-step"
    BAD_ACTIVATION = "bad-activation"
    CODEC_MISMATCH = "codec-mismatch"
    CACHE_MISMATCH = "cache-mismatch"
    CACHE_BUDGET = "cache-budget"
    # offline (guardedp2p.designs.offline)
    NO_EMULATOR = "no-emulator"
    BAD_REQUEST = "bad-request"
    UNKNOWN_FILE = "unknown-file"
    UPLOAD_REFUSED = "upload-refused"
    # raised by the client about a reply, never sent
    REMOTE = "remote"
    TRANSFER = "transfer"


@dataclass(frozen=True)
class CodeInfo:
    """One row: a one-line meaning, whether the same request may succeed if sent again unchanged (``retry``), and
    whether the code only labels a client-side error and never travels (``local``)."""

    meaning: str
    retry: bool = False
    local: bool = False


_E = ErrorCode
CODES: Mapping[ErrorCode, CodeInfo] = MappingProxyType(
    {
        _E.ERROR: CodeInfo("the provider refused the message for a reason without a more specific code"),
        _E.WIRE: CodeInfo("the message violates the wire format (base of the wire codes below)"),
        _E.MALFORMED_HEADER: CodeInfo(
            "header not msgpack, not a map, a field missing or of the wrong type, an extension type, a bad sid or step"
        ),
        _E.VERSION: CodeInfo("header field v is not the receiver's wire version"),
        _E.UNKNOWN_TYPE: CodeInfo("header field t is not a message type of section 4"),
        _E.BAD_TENSOR: CodeInfo(
            "a tensor spec is wrong: dtype not allowed, bad name or shape, parts that disagree with the codec"
        ),
        _E.FRAME_LENGTH: CodeInfo("a frame's length is not dtype x shape, or frames are missing or extra"),
        _E.TOO_LARGE: CodeInfo("a decoding limit is exceeded (header, tensor count, tensor or message size)"),
        _E.CODEC: CodeInfo("a codec could not decode the tensor (base of the codec codes)"),
        _E.UNKNOWN_CODEC: CodeInfo("the tensor's codec is not in the codec table (section 3)"),
        _E.MALFORMED_ENCODING: CodeInfo(
            "a codec's parts or params do not fit the announced shape (count, dtype, size, blocksize, scales)"
        ),
        _E.PROTOCOL: CodeInfo(
            "the message is not valid in the session's state (e.g. too many steps in flight), or an internal "
            "provider error"
        ),
        _E.REJECTED: CodeInfo(
            "HELLO refused (sent in REJECT): version, protocol, split, fingerprint or codec mismatch"
        ),
        _E.UNKNOWN_SESSION: CodeInfo("sid names no open session (never opened, closed, or expired): send HELLO"),
        _E.NOT_YOUR_SESSION: CodeInfo("sid names a session opened by another client key"),
        _E.NOT_ALLOWED: CodeInfo("the message type is outside the session's protocol table (e.g. GRAD_UP in gradfree)"),
        _E.RATE_LIMITED: CodeInfo(
            "over the provider's per-client byte rate; not processed: send it again after meta.retry_after_s",
            retry=True,
        ),
        _E.PROVIDER_SHUTTING_DOWN: CodeInfo(
            "the provider is stopping and closed the session: stop, resume later from the checkpoint"
        ),
        _E.OVER_BUDGET: CodeInfo(
            "over a provider budget (tokens per step, kept training graphs per key or in total, upload quotas); "
            "refused before it was decoded or computed: send GRAD_UP for kept steps, smaller requests, or later"
        ),
        _E.REPLAYED_STEP: CodeInfo("ACT_UP step is not greater than the session's last one"),
        _E.NO_PENDING_STEP: CodeInfo("GRAD_UP names a step with no kept graph (never sent, freed, or expired)"),
        _E.BAD_ACTIVATION: CodeInfo(
            "ACT_UP/GRAD_UP tensors are missing, of the wrong shape or dtype, non-finite, or over the token limit"
        ),
        _E.CODEC_MISMATCH: CodeInfo("a tensor travels in a codec other than the one negotiated for its direction"),
        _E.CACHE_MISMATCH: CodeInfo(
            "a generation ACT_UP extends a KV cache the session does not hold (never started, freed at the step "
            "timeout, or past_len / batch out of step): start again with cache 'new'"
        ),
        _E.CACHE_BUDGET: CodeInfo(
            "a generation would grow the session's trunk KV cache beyond the provider's per-session budget; the "
            "cache is freed"
        ),
        _E.NO_EMULATOR: CodeInfo("the provider serves no emulator (offline session without --emulator)"),
        _E.BAD_REQUEST: CodeInfo("a CHUNK_REQ/UPLOAD meta field or tensor is missing or out of range"),
        _E.UNKNOWN_FILE: CodeInfo("CHUNK_REQ names a file that is not in the signed manifest"),
        _E.UPLOAD_REFUSED: CodeInfo(
            "UPLOAD refused: not a bundle file, a gap, over the size limit, or the bundle failed verification"
        ),
        _E.REMOTE: CodeInfo("the peer answered ERROR; the peer's code is in the exception's remote_code", local=True),
        _E.TRANSFER: CodeInfo(
            "a downloaded chunk is damaged or not the one asked for; fetching it again resumes", retry=True, local=True
        ),
    }
)
del _E


def info(code: str) -> CodeInfo | None:
    """The row of a received code, or None for a code this version does not know (show it, do not act on it)."""
    try:
        return CODES[ErrorCode(code)]
    except ValueError:
        return None
