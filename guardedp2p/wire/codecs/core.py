"""Tensor codecs: how a tensor becomes raw parts on the wire, and back.

A codec turns one tensor into an :class:`Encoded`: a list of *parts* (CPU, contiguous tensors whose dtypes are in
:data:`RAW_DTYPES`; the wire layer sends each as one raw frame and checks its length from dtype x shape) plus a
small ``params`` dict (msgpack-able). The receiver calls :meth:`Codec.expected_parts` to validate what arrived
*before* decoding, so a malformed message is rejected with a :class:`MalformedEncoding` (a ``WireError``) instead
of crashing or allocating something huge.

Registered codecs (``CODECS``) and their wire format, fixed here so that every peer produces the same bytes:

``fp32`` / ``fp16`` / ``bf16``
    One part, the tensor cast to that dtype (round-to-nearest-even, torch semantics), original shape.
    ``fp16`` refuses finite inputs that would overflow to inf (|x| > 65504). ``stochastic`` is ignored.

``int8`` (per-row absmax, "vector-wise" as in LLM.int8())
    Rows are all dims but the last (R = numel / C, C = shape[-1]; a 0-d tensor is one 1x1 row).
    ``s_r = max_c |x_rc| / 127`` in fp32 (``s_r = 1`` for an all-zero row);
    ``q = clamp(round_half_to_even(x / s_r), -127, 127)`` as int8 (-128 is never produced);
    decode ``x̂ = q * s_r``, so ``|x - x̂| <= s_r / 2``.
    Parts: ``q`` int8 with the tensor's shape, ``scales`` float32 of shape (R,).
    Scales are fp32 (not fp16) on purpose: gradient rows can be smaller than fp16's range (a scale of
    ``|g|max/127 < 6e-8`` underflows to 0) and activations can exceed it; fp32 costs 2 more bytes per row
    (0.35 % at d = 576), and keeps :meth:`Codec.nbytes` a function of the shape alone.
    ``stochastic=True``: ``q = floor(x / s_r + u)``, ``u ~ U[0, 1)``, so ``E[x̂] = x`` (use it for gradients).

``int8-block`` (blockwise dynamic 8-bit, Dettmers et al. 2110.02861, bitsandbytes ``quantize_blockwise``)
    Flatten; blocks of ``blocksize`` elements (256 by default; the last block may be shorter, nothing is padded
    on the wire); ``a_j`` = block absmax (fp32). Scaled value ``y = x * (1 / a_j)`` (fp32 reciprocal, then
    multiply) for full blocks and ``y = x / a_j`` for the final partial block, with ``a_j`` clamped to
    >= 1e-38 so an all-zero block encodes 0 exactly; the absmax sent is the unclamped one for full blocks and the
    clamped one for the partial block. These quirks mirror bitsandbytes' reference kernel bit for bit.
    Code = index of the nearest value of bitsandbytes' signed "dynamic" 256-entry map (``DYNAMIC8_CODE``);
    an exact tie between two neighbours goes to the lower index (``torch.bucketize(..., right=False)`` over
    the midpoints; implemented with an exact 64K-entry cell table, tested equal to the binary search).
    Parts: ``codes`` uint8 (n,), ``absmax`` float32 (ceil(n / blocksize),).
    Params: ``{"blocksize": int}`` (power of two, 64..4096).

``nf4`` / ``fp4`` (QLoRA 4-bit, blocksize 64, fp32 absmax)
    Same blocking and scaling as ``int8-block``; 16-entry codebooks ``NF4_CODE`` / ``FP4_CODE`` (identical to
    bitsandbytes' ``get_4bit_type``), nearest value, ties to the lower value. For ``fp4``, whose table is in bit
    order (sign bit 8) and holds two zeros, the nearest *value* is mapped back to a code with the fixed
    permutation ``FP4_SORT_ORDER``; this reproduces bitsandbytes' reference kernel (which picks code 8 for
    tiny positive and code 0 for tiny negative values; both decode to 0).
    Packing: two codes per byte, **element 2i in the high nibble, element 2i+1 in the low nibble** (the
    bitsandbytes order, :mod:`~guardedp2p.wire.codecs.nibbles`); an odd element count is padded with the code
    of 0.0 in the last low nibble.
    Parts: ``packed`` uint8 (ceil(n / 2),), ``absmax`` float32 (ceil(n / blocksize),).
    Params: ``{"blocksize": int}`` (power of two, 16..4096).

Quantized codecs refuse non-finite inputs (:class:`CodecInputError`): a NaN absmax would silently turn a whole
block into garbage.

**bitsandbytes.** Every codec is implemented in pure torch, and that implementation is used on every device,
CUDA included. bitsandbytes is only a test oracle. Measured and read in bitsandbytes 0.50.2:

* ``nf4`` / ``fp4``: our bytes equal ``bitsandbytes.functional.quantize_4bit`` on CPU (its Python reference
  kernel), byte for byte, for any size (tests/test_codecs.py). Its CUDA kernels differ: the library is built
  with ``--use_fast_math`` (approximate ``1/absmax``, flush-to-zero), an all-zero block becomes NaN there and
  is coded as nibble 0, and the fp4 kernel uses its own decimal thresholds (5 of 7 differ from the fp32
  midpoints by an ulp) and sign-magnitude zeros. So CUDA bnb bytes can differ from any CPU encoder.
* ``int8-block``: the bytes do *not* equal bitsandbytes on CPU: its native CPU kernel uses an approximate
  search (0.0 is coded as index 131, i.e. 2.1e-5 * absmax; about 0.15 % of Gaussian entries land one code
  away from the nearest), and the CUDA kernel uses a binary search with its own tie rule under fast-math.
  The *format* is the same (codebook, absmax, layout): bitsandbytes decodes our bytes and we decode its bytes
  identically (tested).
* ``int8``: bitsandbytes' ``int8_vectorwise_quant`` sends absmax (not the scale) and its CUDA kernel uses
  ``__fdividef``; no byte equality is possible, so it is not used.

Pure torch on CUDA uses IEEE division and the same bucketize, so a CPU peer and a GPU peer produce the same
bytes for deterministic encodes (``tests/test_codecs.py::test_cuda_cpu_bytes_equal``, marked ``gpu``).
"""

from __future__ import annotations

import math
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from guardedp2p.errors import GuardedP2PError, WireError
from guardedp2p.wire.codecs.nibbles import pack_nibbles, packed_len, unpack_nibbles
from guardedp2p.wire.codes import ErrorCode

__all__ = [
    "RAW_DTYPES",
    "DTYPES",
    "Encoded",
    "Codec",
    "CodecError",
    "UnknownCodec",
    "MalformedEncoding",
    "CodecInputError",
    "Float32Codec",
    "Float16Codec",
    "BFloat16Codec",
    "Int8RowCodec",
    "Int8BlockCodec",
    "FourBitCodec",
    "CODECS",
    "get_codec",
    "dtype_name",
    "DYNAMIC8_CODE",
    "NF4_CODE",
    "FP4_CODE",
    "FP4_SORT_ORDER",
]

# ----------------------------------------------------------------------------------------------------- dtypes

RAW_DTYPES = {"float32", "float16", "bfloat16", "int8", "uint8", "int16", "int32", "int64", "bool"}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of a torch dtype (one of :data:`RAW_DTYPES`, torch's own name); the one such helper of the package.

    Raises :class:`CodecInputError` for a dtype the wire cannot carry (only local tensors are named here: received
    names go through ``guardedp2p.wire.framing.dtype_from_name``)."""
    name = _NAMES.get(dtype)
    if name is None:
        raise CodecInputError(f"dtype {dtype} cannot be sent (allowed: {', '.join(DTYPES)}); cast the tensor first")
    return name


# ----------------------------------------------------------------------------------------------------- errors


class CodecError(WireError):
    """Base class of codec errors that concern received data."""

    code = ErrorCode.CODEC


class UnknownCodec(CodecError):
    """The codec name is not one of :data:`CODECS`."""

    code = ErrorCode.UNKNOWN_CODEC


class MalformedEncoding(CodecError):
    """Parts or params of a received tensor do not match what the codec expects for the announced shape."""

    code = ErrorCode.MALFORMED_ENCODING


class CodecInputError(GuardedP2PError):
    """The local tensor cannot be encoded by this codec (non-finite values, out of range for fp16)."""


# ----------------------------------------------------------------------------------------------------- tables


def _table(hexwords: str) -> torch.Tensor:
    """Decode a string of big-endian IEEE-754 float32 bit patterns (8 hex digits each) to a float32 tensor.

    The codebooks are wire constants; spelling out their bits keeps them independent of how any library or
    torch version happens to round when it generates them.
    """
    raw = bytes.fromhex(hexwords)
    vals = struct.unpack(f">{len(raw) // 4}f", raw)
    return torch.tensor(vals, dtype=torch.float32)


# bitsandbytes create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), sorted ascending.
# sha256 of the little-endian float32 bytes: e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c
DYNAMIC8_CODE = _table(
    "bf7e3333bf7a999abf770000bf736666bf6fcccdbf6c3333bf68999abf650000bf616666bf5dcccdbf5a3333bf56999a"
    "bf530000bf4f6666bf4bcccdbf483333bf44999abf410000bf3d6666bf39cccdbf363334bf32999abf2f0000bf2b6666"
    "bf27cccdbf243334bf20999abf1d0000bf196666bf15cccdbf123334bf0e999abf0b0000bf076666bf03ccccbf003333"
    "bef93332bef20000beeaccccbee3999abedc6666bed53333bece0000bec6ccccbebf999abeb86666beb13333beaa0000"
    "bea2ccccbe9b999abe946666be8d3334be860000be7d9999be6f3333be60cccdbe526666be440000be35999abe273333"
    "be18cccdbe0a6666bdf80000bddb3334bdc9eb85bdc428f7bdbe6667bdb8a3d7bdb2e148bdad1eb8bda75c2abda1999a"
    "bd9bd70abd96147bbd9051ebbd8a8f5dbd84cccdbd7e147bbd728f5dbd670a3dbd5b851fbd500000bd447ae1bd38f5c3"
    "bd2d70a3bd21eb85bd166667bd0ae148bcfeb852bce7ae15bcd0a3d7bcb9999abca28f5dbc8b851fbc68f5c3bc3ae148"
    "bc1f3b64bc160418bc0ccccdbc039581bbf4bc6abbe24dd3bbcfdf3bbbbd70a4bbab020dbb989374bb8624ddbb676c8a"
    "bb428f5cbb1db22dbaf1a9fcbaa7ef9dba7765ffba59e83eba3c6a80ba1eecc1ba016f01b9c7e283b98ce705b923d70b"
    "b8ba1f4bb88aefb3b8378034b7b24206b70205ffb65a1a94b513a3b7000000003513a3b7365a1a94370205ff37b24206"
    "38378034388aefb338ba1f4b3923d70b398ce70539c7e2833a016f013a1eecc13a3c6a803a59e83e3a7765ff3aa7ef9d"
    "3af1a9fc3b1db22d3b428f5c3b676c8a3b8624dd3b9893743bab020d3bbd70a43bcfdf3b3be24dd33bf4bc6a3c039581"
    "3c0ccccd3c1604183c1f3b643c3ae1483c68f5c33c8b851f3ca28f5d3cb9999a3cd0a3d73ce7ae153cfeb8523d0ae148"
    "3d1666673d21eb853d2d70a33d38f5c33d447ae13d5000003d5b851f3d670a3d3d728f5d3d7e147b3d84cccd3d8a8f5d"
    "3d9051eb3d96147b3d9bd70a3da1999a3da75c2a3dad1eb83db2e1483db8a3d73dbe66673dc428f73dc9eb853ddb3334"
    "3df800003e0a66663e18cccd3e2733333e35999a3e4400003e5266663e60cccd3e6f33333e7d99993e8600003e8d3334"
    "3e9466663e9b999a3ea2cccc3eaa00003eb133333eb866663ebf999a3ec6cccc3ece00003ed533333edc66663ee3999a"
    "3eeacccc3ef200003ef933323f0033333f03cccc3f0766663f0b00003f0e999a3f1233343f15cccd3f1966663f1d0000"
    "3f20999a3f2433343f27cccd3f2b66663f2f00003f32999a3f3633343f39cccd3f3d66663f4100003f44999a3f483333"
    "3f4bcccd3f4f66663f5300003f56999a3f5a33333f5dcccd3f6166663f6500003f68999a3f6c33333f6fcccd3f736666"
    "3f7700003f7a999a3f7e33333f800000"
)
# QLoRA NormalFloat4 (N(0,1) quantiles rescaled to [-1, 1]; 0 exact), index = code.
NF4_CODE = _table(
    "bf800000bf3239b1bf066b30beca32a0be91a24dbe3d353fbdba787100000000"
    "3da2faff3e24cae33e7c04dd3ead033a3ee1a4b83f1007ab3f3913b33f800000"
)
# bitsandbytes FP4 (1 sign bit = bit 3, 2 exponent bits, 1 mantissa bit), divided by 12; index = code.
FP4_CODE = _table(
    "000000003baaaaab3f2aaaab3f8000003eaaaaab3f0000003e2aaaab3e800000"
    "00000000bbaaaaabbf2aaaabbf800000beaaaaabbf000000be2aaaabbe800000"
)
# Codes of FP4_CODE listed by ascending value (the two zeros as bitsandbytes' reference kernel orders them).
FP4_SORT_ORDER = torch.tensor([11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3], dtype=torch.int64)

_TABLE_CACHE: dict[tuple[str, str], torch.Tensor] = {}


def _on(name: str, t: torch.Tensor, device: torch.device) -> torch.Tensor:
    key = (name, str(device))
    hit = _TABLE_CACHE.get(key)
    if hit is None:
        hit = t.to(device)
        _TABLE_CACHE[key] = hit
    return hit


# ----------------------------------------------------------------------------------------------------- base


@dataclass
class Encoded:
    """One encoded tensor: raw ``parts`` (CPU, contiguous, dtypes in :data:`RAW_DTYPES`) and small ``params``."""

    parts: list[torch.Tensor]
    params: dict[str, int | float | str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Payload bytes of all parts (what the wire carries, headers excluded)."""
        return sum(p.numel() * p.element_size() for p in self.parts)


Shape = tuple[int, ...]


def _check_shape(shape: Any) -> Shape:
    if not isinstance(shape, (tuple, list, torch.Size)):
        raise MalformedEncoding(f"tensor shape must be a list of ints, got {type(shape).__name__}")
    if len(shape) > 16:
        raise MalformedEncoding(f"tensor shape has {len(shape)} dims; at most 16 are accepted")
    out = []
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise MalformedEncoding(f"tensor shape {list(shape)!r} must contain non-negative ints only")
        out.append(int(d))
    return tuple(out)


def _numel(shape: Shape) -> int:
    return math.prod(shape)


class Codec(ABC):
    """Encode a tensor into raw parts and decode it back. Subclasses fix the wire format (see module doc)."""

    name: str
    lossy: bool

    @abstractmethod
    def _encode(self, t: torch.Tensor, stochastic: bool, generator: torch.Generator | None) -> Encoded:
        """Encode on ``t``'s own device; ``t`` is detached and contiguous. Parts may stay on that device."""

    @abstractmethod
    def _decode(self, parts: list[torch.Tensor], params: dict, shape: Shape) -> torch.Tensor:
        """Decode validated parts (already on the target device) to an fp32 (or native) tensor of ``shape``."""

    @abstractmethod
    def expected_parts(self, shape: Shape, params: dict) -> list[tuple[str, Shape]]:
        """(dtype name, shape) of each part for a tensor of ``shape``; raises :class:`MalformedEncoding` on bad params."""

    def default_params(self) -> dict[str, int | float | str]:
        """Params this codec instance writes when encoding."""
        return {}

    # -- public API ------------------------------------------------------------------------------------

    def encode(self, t: torch.Tensor, *, stochastic: bool = False, generator: torch.Generator | None = None) -> Encoded:
        """Encode ``t`` (any float dtype, any device). Parts come back on the CPU, contiguous.

        ``stochastic=True`` selects stochastic rounding in the quantizing codecs (unbiased: ``E[x̂] = x``);
        ``generator`` must live on ``t``'s device. Float casts ignore it.
        """
        enc = self._encode_local(t, stochastic=stochastic, generator=generator)
        enc.parts = [p.cpu().contiguous() for p in enc.parts]
        return enc

    def _encode_local(self, t: torch.Tensor, *, stochastic: bool = False, generator=None) -> Encoded:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"codec {self.name!r} encodes torch tensors, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise CodecInputError(f"codec {self.name!r} encodes floating-point tensors, got {t.dtype}")
        return self._encode(t.detach().contiguous(), bool(stochastic), generator)

    def decode(self, enc: Encoded, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        """Validate ``enc`` against ``shape`` and decode it to ``dtype`` on ``device``.

        Every check happens before any allocation proportional to ``shape``: a peer announcing a huge shape
        with small parts gets a :class:`MalformedEncoding`, not an out-of-memory.
        """
        shape = _check_shape(shape)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise MalformedEncoding(f"codec {self.name!r} decodes to a floating-point dtype, got {dtype!r}")
        parts = self.validate(enc, shape)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        parts = [p.to(dev, non_blocking=False) for p in parts]
        out = self._decode(parts, enc.params, shape)
        return out.to(dtype)

    def validate(self, enc: Encoded, shape: tuple[int, ...]) -> list[torch.Tensor]:
        """Check that ``enc`` is what this codec produces for ``shape``; return its parts (reshaped views)."""
        shape = _check_shape(shape)
        if not isinstance(enc, Encoded):
            raise MalformedEncoding(f"expected an Encoded, got {type(enc).__name__}")
        if not isinstance(enc.params, dict):
            raise MalformedEncoding(f"codec {self.name!r}: params must be a dict, got {type(enc.params).__name__}")
        spec = self.expected_parts(shape, enc.params)
        if not isinstance(enc.parts, (list, tuple)) or len(enc.parts) != len(spec):
            got = len(enc.parts) if isinstance(enc.parts, (list, tuple)) else type(enc.parts).__name__
            raise MalformedEncoding(
                f"codec {self.name!r} sends {len(spec)} part(s) for shape {list(shape)}, received {got}"
            )
        out = []
        for i, (p, (dname, pshape)) in enumerate(zip(enc.parts, spec)):
            if not isinstance(p, torch.Tensor):
                raise MalformedEncoding(f"codec {self.name!r}: part {i} is not a tensor")
            if p.dtype != DTYPES[dname]:
                raise MalformedEncoding(f"codec {self.name!r}: part {i} must be {dname}, received {p.dtype}")
            if p.numel() != _numel(pshape):
                raise MalformedEncoding(
                    f"codec {self.name!r}: part {i} must hold {_numel(pshape)} {dname} values "
                    f"(shape {list(pshape)}) for tensor shape {list(shape)}, received {p.numel()}"
                )
            out.append(p.reshape(pshape))
        return out

    def nbytes(self, shape: tuple[int, ...], params: dict | None = None) -> int:
        """Exact payload bytes for a tensor of ``shape`` (sum over parts of numel x itemsize)."""
        spec = self.expected_parts(_check_shape(shape), self.default_params() if params is None else params)
        return sum(_numel(s) * torch.empty((), dtype=DTYPES[d]).element_size() for d, s in spec)

    def __repr__(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.default_params().items())
        return f"{type(self).__name__}({extra})"

    def _check_params(self, params: dict, allowed: dict[str, type]) -> None:
        for k in params:
            if k not in allowed:
                raise MalformedEncoding(
                    f"codec {self.name!r}: unknown param {k!r} (accepted: {sorted(allowed) or 'none'})"
                )
        for k, typ in allowed.items():
            if k not in params:
                raise MalformedEncoding(f"codec {self.name!r}: missing param {k!r}")
            v = params[k]
            if isinstance(v, bool) or not isinstance(v, typ):
                raise MalformedEncoding(f"codec {self.name!r}: param {k!r} must be {typ.__name__}, got {v!r}")


# ----------------------------------------------------------------------------------------------------- floats


class _CastCodec(Codec):
    wire_dtype: torch.dtype

    def _encode(self, t, stochastic, generator):
        out = t.to(self.wire_dtype)
        return Encoded([out], {})

    def _decode(self, parts, params, shape):
        return parts[0]

    def expected_parts(self, shape, params):
        self._check_params(params, {})
        return [(dtype_name(self.wire_dtype), tuple(shape))]


class Float32Codec(_CastCodec):
    """Lossless for fp32 input (fp16/bf16 inputs are widened exactly)."""

    name = "fp32"
    lossy = False
    wire_dtype = torch.float32


class Float16Codec(_CastCodec):
    """IEEE half: 11 significant bits (relative error <= 2^-11), range +-65504."""

    name = "fp16"
    lossy = True
    wire_dtype = torch.float16

    def _encode(self, t, stochastic, generator):
        out = t.to(torch.float16)
        if t.dtype != torch.float16 and bool(torch.isinf(out).any()) and not bool(torch.isinf(t).any()):
            raise CodecInputError(
                f"tensor has values beyond fp16's range (max |x| = {t.abs().max().item():.4g} > 65504); "
                "use codec 'bf16' or 'fp32', or an int8 codec (per-row scales)"
            )
        return Encoded([out], {})


class BFloat16Codec(_CastCodec):
    """bfloat16: fp32's range, 8 significant bits (relative error <= 2^-8)."""

    name = "bf16"
    lossy = True
    wire_dtype = torch.bfloat16


# ----------------------------------------------------------------------------------------------------- int8 rows


def _rows(shape: Shape) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    c = shape[-1]
    return _numel(shape[:-1]), c


def _uniform_like(x: torch.Tensor, generator) -> torch.Tensor:
    return torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)


class Int8RowCodec(Codec):
    """Per-row (last dim) symmetric absmax int8 with fp32 scales; see the module docstring for the exact rule."""

    name = "int8"
    lossy = True

    def _encode(self, t, stochastic, generator):
        shape = tuple(t.shape)
        r, c = _rows(shape)
        x = t.reshape(r, c).float()
        if x.numel() == 0:
            scale = torch.ones(r, dtype=torch.float32, device=t.device)
            return Encoded([torch.empty(shape, dtype=torch.int8, device=t.device), scale], {})
        absmax = x.abs().amax(dim=1)
        if not bool(torch.isfinite(absmax).all()):
            raise CodecInputError("tensor contains NaN or inf; int8 cannot encode it (did training diverge?)")
        scale = absmax / 127.0
        scale = torch.where(absmax > 0, scale, torch.ones_like(scale))
        y = x / scale[:, None]
        if stochastic:
            y = torch.floor(y + _uniform_like(y, generator))
        else:
            y = torch.round(y)  # round half to even
        q = y.clamp_(-127, 127).to(torch.int8).reshape(shape)
        return Encoded([q, scale], {})

    def _decode(self, parts, params, shape):
        q, scale = parts
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise MalformedEncoding("codec 'int8': scales must be finite and >= 0")
        r, c = _rows(shape)
        return (q.reshape(r, c).float() * scale[:, None]).reshape(shape)

    def expected_parts(self, shape, params):
        self._check_params(params, {})
        r, _ = _rows(shape)
        return [("int8", tuple(shape)), ("float32", (r,))]


# ----------------------------------------------------------------------------------------------------- codebooks


def _cell_tables(bounds: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """Exact lookup tables that replace ``order[bucketize(y, bounds)]`` (a binary search, slow on CPU).

    Key = the top 16 bits of y's float32 pattern (a bfloat16-sized cell of consecutive floats). When no cell
    holds more than one bound -- true for these codebooks, whose bounds are >= 1 % apart relative to their
    magnitude while a cell is 0.4 % wide -- the count of bounds below y is ``base[key] + (y > thr[key])``
    exactly, with ``thr`` the bound inside the cell (+inf if none). Returns (code_lo, code_hi, thr) per key,
    or None when the property fails (then bucketize is used).
    """
    keys = torch.arange(1 << 16, dtype=torch.int64)

    def as_f32(bits: torch.Tensor) -> torch.Tensor:  # uint32 pattern held in int64 -> float32
        return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)

    start = as_f32(keys << 16)
    end = as_f32((keys << 16) | 0xFFFF)
    neg = keys >= 1 << 15
    cmin = torch.where(neg, end, start)
    cmax = torch.where(neg, start, end)
    finite = torch.isfinite(cmin) & torch.isfinite(cmax)
    cmin = torch.where(finite, cmin, torch.zeros_like(cmin))
    cmax = torch.where(finite, cmax, torch.zeros_like(cmax))
    below = torch.searchsorted(bounds, cmin, side="left")  # bounds < cmin
    upto = torch.searchsorted(bounds, cmax, side="right")  # bounds <= cmax
    if int((upto - below).max()) > 1:
        return None
    has = upto > below
    thr = torch.where(has, bounds[below.clamp(max=bounds.numel() - 1)], torch.full_like(cmin, math.inf))
    lo = order[below]
    hi = order[(below + has.long()).clamp(max=order.numel() - 1)]
    return lo.to(torch.uint8), hi.to(torch.uint8), thr.contiguous()


class _CodebookCodec(Codec):
    """Blockwise absmax scaling + nearest entry of a fixed codebook (bitsandbytes-style)."""

    lossy = True
    code_name: str
    code: torch.Tensor  # value of each code (index = code)
    sort_order: torch.Tensor | None = None  # codes by ascending value, when the table is not sorted
    bits: int
    min_blocksize: int

    def __init__(self, blocksize: int):
        self._validate_blocksize(blocksize)
        self.blocksize = blocksize
        order = self.sort_order if self.sort_order is not None else torch.arange(self.code.numel())
        self._sorted = self.code[order].contiguous()
        self._order = order.contiguous()
        self._bounds = ((self._sorted[:-1] + self._sorted[1:]) / 2).contiguous()
        self._lut = _cell_tables(self._bounds, self._order)

    def _validate_blocksize(self, bs: Any) -> int:
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < self.min_blocksize or bs > 4096 or bs & (bs - 1):
            raise MalformedEncoding(
                f"codec {self.name!r}: blocksize must be a power of two in [{self.min_blocksize}, 4096], got {bs!r}"
            )
        return bs

    def default_params(self):
        return {"blocksize": self.blocksize}

    def _blocksize_from(self, params: dict) -> int:
        self._check_params(params, {"blocksize": int})
        return self._validate_blocksize(params["blocksize"])

    # -- scaling ---------------------------------------------------------------------------------------

    @staticmethod
    def _scale(flat: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (scaled values in [-1, 1], absmax per block) exactly as bitsandbytes' reference kernel."""
        n = flat.numel()
        full = (n // bs) * bs
        parts_y, parts_a = [], []
        if full:
            blk = flat[:full].view(-1, bs)
            a = blk.abs().amax(dim=1)
            parts_a.append(a)
            parts_y.append((blk * (1.0 / a.clamp(min=1e-38))[:, None]).clamp_(-1, 1).reshape(-1))
        if n > full:
            tail = flat[full:]
            a = tail.abs().amax().clamp(min=1e-38)  # the clamped value is what goes on the wire (as in bnb)
            parts_a.append(a.reshape(1))
            parts_y.append(torch.clamp(tail / a, -1, 1))
        if not parts_y:
            return flat.new_zeros(0), flat.new_zeros(0)
        y = parts_y[0] if len(parts_y) == 1 else torch.cat(parts_y)
        absmax = parts_a[0] if len(parts_a) == 1 else torch.cat(parts_a)
        return y, absmax

    def _quantize(self, y: torch.Tensor, stochastic: bool, generator) -> torch.Tensor:
        dev = y.device
        srt = _on(self.code_name + ":sorted", self._sorted, dev)
        if stochastic:
            k = srt.numel()
            lo = (torch.bucketize(y, srt, right=True) - 1).clamp_(0, k - 2)
            c_lo, c_hi = srt[lo], srt[lo + 1]
            gap = c_hi - c_lo
            p = torch.where(gap > 0, (y - c_lo) / torch.where(gap > 0, gap, torch.ones_like(gap)), torch.zeros_like(y))
            pos = lo + (_uniform_like(y, generator) < p.clamp(0, 1)).to(lo.dtype)
            if self.sort_order is not None:
                pos = _on(self.code_name + ":order", self._order, dev)[pos]
            return pos.to(torch.uint8)
        if self._lut is None:  # pragma: no cover - every registered codebook has a cell table
            pos = torch.bucketize(y, _on(self.code_name + ":bounds", self._bounds, dev))
            if self.sort_order is not None:
                pos = _on(self.code_name + ":order", self._order, dev)[pos]
            return pos.to(torch.uint8)
        lo, hi, thr = (_on(f"{self.code_name}:lut{i}", t, dev) for i, t in enumerate(self._lut))
        key = (y.view(torch.int32) >> 16) & 0xFFFF
        pick = torch.index_select(thr, 0, key) < y
        return torch.where(pick, torch.index_select(hi, 0, key), torch.index_select(lo, 0, key))

    def _encode(self, t, stochastic, generator):
        flat = t.reshape(-1).float()
        y, absmax = self._scale(flat, self.blocksize)
        if absmax.numel() and not bool(torch.isfinite(absmax).all()):
            raise CodecInputError(f"tensor contains NaN or inf; {self.name} cannot encode it (did training diverge?)")
        codes = self._quantize(y, stochastic, generator)
        return Encoded([self._pack(codes), absmax], {"blocksize": self.blocksize})

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        return codes

    def _unpack(self, packed: torch.Tensor, n: int) -> torch.Tensor:
        return packed

    def _decode(self, parts, params, shape):
        packed, absmax = parts
        if not bool(torch.isfinite(absmax).all()) or bool((absmax < 0).any()):
            raise MalformedEncoding(f"codec {self.name!r}: absmax values must be finite and >= 0")
        bs = params["blocksize"]
        n = _numel(shape)
        codes = self._unpack(packed, n).to(torch.int32)
        vals = torch.index_select(_on(self.code_name, self.code, packed.device), 0, codes)
        full = (n // bs) * bs
        out = torch.empty(n, dtype=torch.float32, device=packed.device)
        if full:
            out[:full] = (vals[:full].view(-1, bs) * absmax[: full // bs, None]).reshape(-1)
        if n > full:
            out[full:] = vals[full:] * absmax[-1]
        return out.reshape(shape)

    def expected_parts(self, shape, params):
        bs = self._blocksize_from(params)
        n = _numel(shape)
        return [("uint8", (self._packed_len(n),)), ("float32", (-(-n // bs),))]

    def _packed_len(self, n: int) -> int:
        return n


class Int8BlockCodec(_CodebookCodec):
    """Blockwise dynamic 8-bit (bitsandbytes ``quantize_blockwise`` format), default blocksize 256."""

    name = "int8-block"
    code_name = "dynamic8"
    code = DYNAMIC8_CODE
    bits = 8
    min_blocksize = 64

    def __init__(self, blocksize: int = 256):
        super().__init__(blocksize)


class FourBitCodec(_CodebookCodec):
    """Blockwise 4-bit (NF4 or FP4) with fp32 absmax, two codes per byte, element 2i in the high nibble."""

    bits = 4
    min_blocksize = 16

    def __init__(self, kind: str, blocksize: int = 64):
        if kind == "nf4":
            self.name, self.code_name, self.code, self.sort_order = "nf4", "nf4", NF4_CODE, None
        elif kind == "fp4":
            self.name, self.code_name, self.code, self.sort_order = "fp4", "fp4", FP4_CODE, FP4_SORT_ORDER
        else:
            raise ValueError(f"4-bit kind must be 'nf4' or 'fp4', got {kind!r}")
        super().__init__(blocksize)
        zero_pos = int(torch.bucketize(torch.zeros(()), self._bounds))
        self._pad_code = int(self._order[zero_pos])

    def _pack(self, codes):
        return pack_nibbles(codes, self._pad_code)

    def _unpack(self, packed, n):
        return unpack_nibbles(packed, n)

    def _packed_len(self, n):
        return packed_len(n)


# ----------------------------------------------------------------------------------------------------- registry

CODECS: dict[str, Codec] = {
    c.name: c
    for c in (
        Float32Codec(),
        Float16Codec(),
        BFloat16Codec(),
        Int8RowCodec(),
        Int8BlockCodec(),
        FourBitCodec("nf4"),
        FourBitCodec("fp4"),
    )
}


def get_codec(name: str | Codec) -> Codec:
    """Look up a codec by name (a :class:`Codec` passes through); :class:`UnknownCodec` lists the valid names."""
    if isinstance(name, Codec):
        return name
    if isinstance(name, str):
        codec = CODECS.get(name)
        if codec is not None:
            return codec
    raise UnknownCodec(f"unknown codec {name!r}; valid codecs: {', '.join(CODECS)}")
