"""Wire format: one msgpack header frame followed by raw tensor frames.

Why this shape: the header is small, typed and parsed with hard limits before any tensor byte is touched;
tensor bytes travel as separate frames so they can be sent and received without copies (ZeroMQ frames map
straight onto ``torch.frombuffer``). Nothing here executes or instantiates anything named by the peer:
message types, codecs and dtypes are looked up in fixed tables. The full specification is ``docs/wire.md``.

Chunked parts (issue 19): a tensor part larger than ``CHUNK_BYTES`` goes as several frames of at most that size
(``memoryview`` slices of the tensor, so sending still copies nothing) and the tensor's spec says how many
frames each part takes. Why: libzmq's CURVE copies and encrypts a frame as a whole, several passes over it, and
frames that fit the CPU's cache go through those passes several times faster than one 256 MiB frame
(measured in ``docs/results/perf.md``). The receiver checks every length against the header and the limits
before it allocates, then assembles the frames into one buffer (one copy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import torch

from guardedp2p.errors import WireError
from guardedp2p.wire.codes import ErrorCode
from guardedp2p.wire.messages import WIRE_VERSION, MsgType

Frame = bytes | bytearray | memoryview

CHUNK_BYTES = 1 << 20
"""Frame size of a chunked part: a part larger than this goes as ceil(size / CHUNK_BYTES) frames. 1 MiB was the
fastest CURVE size on the loopback bench (``python -m benchmarks.bench_channel --wire``, docs/results/perf.md)."""
MAX_CHUNK_BYTES = 4 << 20
"""The largest frame size ``encode`` accepts for chunks (a 4 MiB frame already loses most of the cache gain)."""


# --------------------------------------------------------------------------------------------- errors
class MalformedHeader(WireError):
    code = ErrorCode.MALFORMED_HEADER


class VersionMismatch(WireError):
    code = ErrorCode.VERSION


class UnknownMessageType(WireError):
    code = ErrorCode.UNKNOWN_TYPE


class BadTensorSpec(WireError):
    code = ErrorCode.BAD_TENSOR


class FrameLengthMismatch(WireError):
    code = ErrorCode.FRAME_LENGTH


class MessageTooLarge(WireError):
    code = ErrorCode.TOO_LARGE


# --------------------------------------------------------------------------------------------- dtypes
from guardedp2p.wire.codecs import DTYPES as _DTYPES  # noqa: E402 - the one allow-list of wire dtypes
from guardedp2p.wire.codecs import dtype_name  # noqa: E402 - re-exported: the name of a local tensor's dtype


def dtype_from_name(name: Any) -> torch.dtype:
    """Map a received dtype name to a torch dtype through the allow-list (never getattr on the string)."""
    if not isinstance(name, str) or name not in _DTYPES:
        raise BadTensorSpec(f"dtype {name!r} is not allowed on the wire (allowed: {', '.join(_DTYPES)})")
    return _DTYPES[name]


# --------------------------------------------------------------------------------------------- limits
@dataclass(frozen=True)
class WireLimits:
    """Hard limits applied while decoding untrusted input. Defaults suit a 7B model at batch 8 x 2048."""

    max_header_bytes: int = 64 * 1024
    max_tensors: int = 16
    max_parts_per_tensor: int = 4
    max_ndim: int = 6
    max_tensor_bytes: int = 1 << 30
    max_message_bytes: int = 1 << 31
    max_str_len: int = 16 * 1024
    max_bin_len: int = 4 * 1024
    max_array_len: int = 1024
    max_map_len: int = 128
    max_session_len: int = 64
    max_step: int = 1 << 53
    max_frames: int = 4096  # data frames per message: 2 GiB in 1 MiB chunks is 2048


DEFAULT_LIMITS = WireLimits()


# --------------------------------------------------------------------------------------------- message
@dataclass
class Message:
    """One typed message. ``codecs`` maps a tensor name to its wire codec ("raw" when absent)."""

    type: MsgType
    session: str = ""
    step: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    codecs: dict[str, str] = field(default_factory=dict)
    #: local only, never sent: tensors whose lossy codec rounds stochastically (unbiased, for gradients)
    stochastic: tuple[str, ...] = ()

    def codec_of(self, name: str) -> str:
        return self.codecs.get(name, "raw")


def _raw_view(t: torch.Tensor) -> memoryview:
    """Zero-copy byte view of a CPU tensor (bf16 through int16, which numpy lacks)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    if t.numel() == 0:
        return memoryview(b"")
    # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12; the buffer protocol works on 3.11 too.
    return memoryview(t.numpy()).cast("B")  # type: ignore[arg-type]


def _encode_tensor(t: torch.Tensor, codec_name: str, stochastic: bool) -> tuple[dict[str, Any], list[memoryview]]:
    if codec_name == "raw":
        spec = {"codec": "raw", "dtype": dtype_name(t.dtype), "shape": list(t.shape), "params": {}}
        spec["parts"] = [[spec["dtype"], list(t.shape)]]
        return spec, [_raw_view(t)]
    from guardedp2p.wire.codecs import get_codec

    codec = get_codec(codec_name)
    enc = codec.encode(t.detach(), stochastic=stochastic)
    parts = [[dtype_name(p.dtype), list(p.shape)] for p in enc.parts]
    spec = {
        "codec": codec_name,
        "dtype": dtype_name(t.dtype),
        "shape": list(t.shape),
        "params": dict(enc.params),
        "parts": parts,
    }
    return spec, [_raw_view(p) for p in enc.parts]


def _chunks(view: memoryview, chunk_bytes: int) -> list[memoryview]:
    """``view`` as consecutive slices of at most ``chunk_bytes`` (zero copy: slices share the tensor's memory)."""
    return [view[i : i + chunk_bytes] for i in range(0, view.nbytes, chunk_bytes)]


def encode(msg: Message, *, chunk_bytes: int | None = CHUNK_BYTES) -> list[Frame]:
    """Serialise a message into frames: ``[header, part frames...]``.

    A part larger than ``chunk_bytes`` goes as several frames of at most ``chunk_bytes`` and its tensor spec gets
    ``frames`` (frames per part); ``None`` sends every part as one frame (what peers before chunking sent)."""
    if chunk_bytes is not None and not 1024 <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be between 1 KiB and {MAX_CHUNK_BYTES} bytes, got {chunk_bytes}")
    specs: list[dict[str, Any]] = []
    frames: list[Frame] = []
    for name, t in msg.tensors.items():
        spec, parts = _encode_tensor(t, msg.codec_of(name), name in msg.stochastic)
        spec["name"] = name
        if chunk_bytes is not None and any(p.nbytes > chunk_bytes for p in parts):
            split = [_chunks(p, chunk_bytes) if p.nbytes > chunk_bytes else [p] for p in parts]
            spec["frames"] = [len(c) for c in split]
            parts = [c for chunks in split for c in chunks]
        specs.append(spec)
        frames.extend(parts)
    header = {
        "v": WIRE_VERSION,
        "t": msg.type.value,
        "sid": msg.session,
        "step": int(msg.step),
        "meta": msg.meta,
        "tensors": specs,
    }
    return [msgpack.packb(header, use_bin_type=True), *frames]


def _reject_ext(code: int, data: bytes) -> Any:
    raise MalformedHeader("msgpack extension types are not allowed in headers")


def _unpack_header(buf: Frame, limits: WireLimits) -> dict[str, Any]:
    if len(buf) > limits.max_header_bytes:
        raise MessageTooLarge(f"header of {len(buf)} bytes exceeds the limit of {limits.max_header_bytes}")
    try:
        header = msgpack.unpackb(
            buf,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_reject_ext,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bin_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except WireError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise MalformedHeader(f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise MalformedHeader("header must be a msgpack map")
    return header


def _field(header: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in header:
        raise MalformedHeader(f"header field {key!r} is missing")
    value = header[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MalformedHeader(f"header field {key!r} has the wrong type ({type(value).__name__})")
    return value


def _check_shape(shape: Any, limits: WireLimits, what: str) -> tuple[int, ...]:
    if not isinstance(shape, list) or len(shape) > limits.max_ndim:
        raise BadTensorSpec(f"{what}: shape must be a list of at most {limits.max_ndim} dimensions")
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or d < 0 or d > (1 << 40):
            raise BadTensorSpec(f"{what}: bad dimension {d!r} in shape {shape!r}")
    return tuple(shape)


def _frame_to_tensor(frame: Frame, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape)
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    mv = memoryview(frame)
    buf: Any = mv if not mv.readonly else bytearray(mv)
    raw_dtype = torch.int16 if dtype == torch.bfloat16 else dtype
    t = torch.frombuffer(buf, dtype=raw_dtype).view(shape)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def _chunks_to_tensor(chunks: Sequence[Frame], dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A chunked part assembled into one buffer (one copy); the lengths were checked by :func:`parse_header`."""
    buf = torch.empty(math.prod(shape) * dtype.itemsize, dtype=torch.uint8)
    dst = buf.numpy()
    offset = 0
    for c in chunks:
        n = _nbytes(c)
        dst[offset : offset + n] = np.frombuffer(c, dtype=np.uint8)
        offset += n
    raw_dtype = torch.int16 if dtype == torch.bfloat16 else dtype
    t = buf.view(raw_dtype).view(shape)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def _frame_counts(spec: dict[str, Any], nparts: int, limits: WireLimits, name: str) -> tuple[int, ...]:
    """The spec's ``frames`` (frames per part; absent: one each), checked against the part count and the limit."""
    if "frames" not in spec:
        return (1,) * nparts
    counts = spec["frames"]
    if (
        not isinstance(counts, list)
        or len(counts) != nparts
        or not all(isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= limits.max_frames for c in counts)
    ):
        raise BadTensorSpec(
            f"tensor {name!r}: 'frames' must list one count in 1..{limits.max_frames} per part ({nparts})"
        )
    return tuple(counts)


def _nbytes(frame: Frame) -> int:
    return frame.nbytes if isinstance(frame, memoryview) else len(frame)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor as announced by a header: checked against the limits and its codec, not yet decoded."""

    name: str
    codec: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    params: dict[str, Any]
    parts: tuple[tuple[str, tuple[int, ...]], ...]
    frames: tuple[int, ...]  # frames per part (1 unless the part was chunked)

    @property
    def decoded_nbytes(self) -> int:
        """Bytes of the tensor once decoded (what a lossy codec expands to)."""
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Header:
    """A message's header, parsed and checked against the frames, with no tensor decoded (:func:`parse_header`).

    Why a separate step: a receiver can refuse a message for its session, type, step or tensor shapes *before*
    it spends memory and time decoding tensors (a lossy codec expands its bytes up to 8 times)."""

    type: MsgType
    session: str
    step: int
    meta: dict[str, Any]
    tensors: tuple[TensorSpec, ...]

    @property
    def decoded_nbytes(self) -> int:
        return sum(t.decoded_nbytes for t in self.tensors)

    def spec(self, name: str) -> TensorSpec | None:
        return next((t for t in self.tensors if t.name == name), None)


def parse_header(frames: Sequence[Frame], limits: WireLimits = DEFAULT_LIMITS) -> Header:
    """Parse and validate a message's header and frame lengths, decoding no tensor.

    Every check of :func:`decode` except the codecs' own decoding runs here, so ``decode_body(parse_header(f), f)``
    accepts exactly what ``decode(f)`` accepts. Raises a :class:`WireError` subclass on any violation."""
    if not frames:
        raise MalformedHeader("empty message (no header frame)")
    if len(frames) - 1 > limits.max_frames:
        raise MessageTooLarge(f"{len(frames) - 1} data frames exceed the limit of {limits.max_frames}")
    total = frames_nbytes(frames)
    if total > limits.max_message_bytes:
        raise MessageTooLarge(f"message of {total} bytes exceeds the limit of {limits.max_message_bytes}")
    header = _unpack_header(frames[0], limits)
    version = _field(header, "v", int)
    if version != WIRE_VERSION:
        raise VersionMismatch(f"wire version {version} is not supported (this peer speaks version {WIRE_VERSION})")
    type_name = _field(header, "t", str)
    try:
        mtype = MsgType(type_name)
    except ValueError:
        raise UnknownMessageType(f"unknown message type {type_name[:40]!r}") from None
    session = _field(header, "sid", str)
    if len(session) > limits.max_session_len:
        raise MalformedHeader("session id too long")
    step = _field(header, "step", int)
    if not 0 <= step <= limits.max_step:
        raise MalformedHeader(f"step id {step} out of range")
    meta = _field(header, "meta", dict)
    specs = _field(header, "tensors", list)
    if len(specs) > limits.max_tensors:
        raise MessageTooLarge(f"{len(specs)} tensors exceed the limit of {limits.max_tensors}")

    out: list[TensorSpec] = []
    names: set[str] = set()
    cursor = 1
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise BadTensorSpec(f"tensor spec #{i} must be a map")
        name = _field(spec, "name", str)
        if not name or len(name) > 64 or name in names:
            raise BadTensorSpec(f"tensor #{i}: bad or duplicate name {name[:64]!r}")
        names.add(name)
        codec_name = _field(spec, "codec", str)
        dtype = dtype_from_name(_field(spec, "dtype", str))
        shape = _check_shape(_field(spec, "shape", list), limits, name)
        if math.prod(shape) * 4 > limits.max_tensor_bytes:
            raise MessageTooLarge(f"tensor {name!r} with shape {list(shape)} exceeds the per-tensor limit")
        params = _field(spec, "params", dict)
        for k, v in params.items():
            if not isinstance(v, (int, float, str)) or isinstance(v, bool):
                raise BadTensorSpec(f"tensor {name!r}: codec parameter {k!r} must be a number or string")
        declared = _field(spec, "parts", list)
        if not 1 <= len(declared) <= limits.max_parts_per_tensor:
            raise BadTensorSpec(f"tensor {name!r}: {len(declared)} parts (1..{limits.max_parts_per_tensor} allowed)")
        if codec_name == "raw":
            expected = [(dtype_name(dtype), shape)]
        else:
            from guardedp2p.wire.codecs import get_codec

            codec = get_codec(codec_name)  # raises UnknownCodec (a WireError) for names outside the table
            try:
                expected = [(d, tuple(s)) for d, s in codec.expected_parts(shape, params)]
            except WireError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure here is the peer's malformed params
                raise BadTensorSpec(f"tensor {name!r}: bad parameters for codec {codec_name!r}: {exc}") from None
        got = []
        for p in declared:
            if not isinstance(p, list) or len(p) != 2 or not isinstance(p[0], str):
                raise BadTensorSpec(f"tensor {name!r}: a part must be [dtype, shape]")
            got.append((p[0], _check_shape(p[1], limits, name)))
        if got != expected:
            raise BadTensorSpec(
                f"tensor {name!r}: parts {got} do not match codec {codec_name!r} for shape {list(shape)}"
            )
        counts = _frame_counts(spec, len(got), limits, name)
        for (pdtype_name, pshape), count in zip(got, counts):
            if cursor + count > len(frames):
                raise FrameLengthMismatch(f"tensor {name!r}: missing data frame (message truncated)")
            want = math.prod(pshape) * dtype_from_name(pdtype_name).itemsize
            chunks = frames[cursor : cursor + count]
            if count > 1 and any(_nbytes(c) == 0 for c in chunks):
                raise FrameLengthMismatch(f"tensor {name!r}: an empty chunk frame")
            have = frames_nbytes(chunks)
            if have != want:
                raise FrameLengthMismatch(f"tensor {name!r}: frame(s) hold {have} bytes, dtype x shape needs {want}")
            cursor += count
        out.append(TensorSpec(name, codec_name, dtype, shape, dict(params), tuple(got), counts))
    if cursor != len(frames):
        raise FrameLengthMismatch(f"{len(frames) - cursor} unexpected extra frame(s) after the declared tensors")
    return Header(type=mtype, session=session, step=step, meta=meta, tensors=tuple(out))


def decode_body(header: Header, frames: Sequence[Frame]) -> Message:
    """The message of a header from :func:`parse_header`: its tensors built from ``frames`` and decoded."""
    tensors: dict[str, torch.Tensor] = {}
    codecs: dict[str, str] = {}
    cursor = 1
    for spec in header.tensors:
        parts: list[torch.Tensor] = []
        for (pdtype_name, pshape), count in zip(spec.parts, spec.frames):
            pdtype = dtype_from_name(pdtype_name)
            if count == 1:
                parts.append(_frame_to_tensor(frames[cursor], pdtype, pshape))
            else:
                parts.append(_chunks_to_tensor(frames[cursor : cursor + count], pdtype, pshape))
            cursor += count
        if spec.codec == "raw":
            tensor = parts[0]
        else:
            from guardedp2p.wire.codecs import Encoded, get_codec

            codec = get_codec(spec.codec)
            try:
                tensor = codec.decode(
                    Encoded(parts=parts, params=spec.params), spec.shape, spec.dtype, torch.device("cpu")
                )
            except WireError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise BadTensorSpec(f"tensor {spec.name!r}: codec {spec.codec!r} could not decode it: {exc}") from None
        tensors[spec.name] = tensor
        codecs[spec.name] = spec.codec
    return Message(
        type=header.type, session=header.session, step=header.step, meta=header.meta, tensors=tensors, codecs=codecs
    )


def decode(frames: Sequence[Frame], limits: WireLimits = DEFAULT_LIMITS) -> Message:
    """Parse and validate frames from an untrusted peer. Raises a :class:`WireError` subclass on any violation."""
    return decode_body(parse_header(frames, limits), frames)


def frames_nbytes(frames: Sequence[Frame]) -> int:
    """Total payload size of a message in bytes: what the size limit and every byte counter measure.

    A ``memoryview`` counts its ``nbytes`` (``len`` would count items, fewer than bytes for a non-byte format).
    The transport counts with this function too (``guardedp2p.transport.base`` re-exports it)."""
    return sum(f.nbytes if isinstance(f, memoryview) else len(f) for f in frames)


def error_message(exc: Exception, session: str = "", step: int = 0) -> Message:
    """The ERROR reply sent to a peer whose message was refused (never includes local tracebacks)."""
    code = getattr(type(exc), "code", ErrorCode.ERROR)  # attribute of our own exception class, not of received data
    return Message(MsgType.ERROR, session=session, step=step, meta={"code": str(code), "message": str(exc)[:2000]})
