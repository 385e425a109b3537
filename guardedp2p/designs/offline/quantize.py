"""Weight quantization of the emulator's middle blocks, shipped as integer codes plus per-tensor scales.

Offsite-tuning (Xiao, Lin, Han, arXiv 2302.04870) only *simulates* quantization (weights stay float on disk);
guardedp2p must save bytes on the download, so it ships the codes. Pure torch, no bitsandbytes needed.

Schemes (only floating tensors with ``dim >= 2`` are quantized; norms and biases stay float):

``int8`` / ``int4``
    Uniform min-max per tensor, ``s = (max - min) / (2^b - 1)``, codes ``q = round((w - min) / s)`` in
    ``[0, 2^b - 1]``, ``w^ = min + q * s``. Same step size as the reference; the grid is anchored at ``min``
    rather than at the mid-point ``(max + min) / 2``, because the reference's mid-point grid needs ``2^b + 1``
    levels and so does not fit in ``b`` bits. int4 codes are packed two per byte.
``nf4``
    NormalFloat-4 (QLoRA): exactly the ``nf4`` wire codec (:mod:`guardedp2p.wire.codecs.core`) with blocks of 64:
    each block scaled by its absolute maximum, rounded to the nearest of the 16 levels of ``NF4_CODE``; two
    codes per byte plus one fp32 absmax per block.

Two codes per byte are packed by :mod:`guardedp2p.wire.codecs.nibbles` (element 2i in the high nibble). Emulators
written before that (their manifest has no ``compression.nibble_order``) hold the low nibble first; the loader
passes ``nibble_order="low-first"`` for them and they keep loading.

Stored keys for a quantized tensor ``W``: ``W.__qcodes`` (uint8), ``W.__qscale`` and, for int8/int4,
``W.__qmin`` (float32), and ``W.__qshape`` (int64, the original shape). A reader accepts exactly these
suffixes; anything else in the file is an error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from guardedp2p.errors import ArtifactError, ConfigError
from guardedp2p.wire.codecs import CodecInputError, Encoded, FourBitCodec, MalformedEncoding
from guardedp2p.wire.codecs.nibbles import pack_nibbles, packed_len, swap_nibbles, unpack_nibbles

SCHEMES = ("none", "int8", "int4", "nf4")
NF4_BLOCK = 64
_SUFFIXES = (".__qcodes", ".__qscale", ".__qmin", ".__qshape")
#: How int4/nf4 codes share a byte: what this version writes, and what emulators before it wrote.
NIBBLE_ORDER = "high-first"
LEGACY_NIBBLE_ORDER = "low-first"
NIBBLE_ORDERS = (NIBBLE_ORDER, LEGACY_NIBBLE_ORDER)
PACKED_SCHEMES = ("int4", "nf4")  # the schemes whose codes share a byte
_NF4 = FourBitCodec("nf4", blocksize=NF4_BLOCK)  # fixed here: the blocksize is part of the stored format


class QuantizedFormatError(ArtifactError):
    """A quantized tensor in an emulator file is inconsistent (codes, scales and shape do not fit)."""


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown quantization {scheme!r}; choose one of {', '.join(SCHEMES)}")
    return scheme


def should_quantize(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.dim() >= 2 and t.numel() > 0


def check_nibble_order(order: str) -> str:
    if order not in NIBBLE_ORDERS:
        raise QuantizedFormatError(f"unknown nibble order {order!r}; this version reads {', '.join(NIBBLE_ORDERS)}")
    return order


def _codes4(codes: torch.Tensor, n: int, nibble_order: str) -> torch.Tensor:
    """Stored 4-bit codes in the packing of :mod:`~guardedp2p.wire.codecs.nibbles` (legacy bytes swapped first)."""
    return codes if check_nibble_order(nibble_order) == NIBBLE_ORDER else swap_nibbles(codes)


def quantize_tensor(w: torch.Tensor, scheme: str) -> dict[str, torch.Tensor]:
    """Return the stored parts (suffix -> tensor) of one weight tensor."""
    check_scheme(scheme)
    x = w.detach().to("cpu", torch.float32).reshape(-1)
    shape = torch.tensor(list(w.shape), dtype=torch.int64)
    if scheme in ("int8", "int4"):
        bits = 8 if scheme == "int8" else 4
        levels = (1 << bits) - 1
        lo, hi = float(x.min()), float(x.max())
        s = (hi - lo) / levels
        if not math.isfinite(s):
            raise ConfigError("cannot quantize a tensor holding NaN or Inf")
        if s == 0.0:
            s = 1.0  # constant tensor: every code is 0, w^ = min exactly
        q = torch.round((x - lo) / s).clamp_(0, levels).to(torch.uint8)
        codes = q if bits == 8 else pack_nibbles(q)
        return {
            ".__qcodes": codes,
            ".__qscale": torch.tensor([s], dtype=torch.float32),
            ".__qmin": torch.tensor([lo], dtype=torch.float32),
            ".__qshape": shape,
        }
    if scheme == "nf4":
        try:
            packed, absmax = _NF4.encode(x).parts
        except CodecInputError:
            raise ConfigError("cannot quantize a tensor holding NaN or Inf") from None
        return {".__qcodes": packed, ".__qscale": absmax, ".__qshape": shape}
    raise ConfigError("scheme 'none' stores tensors as they are")


def dequantize_tensor(
    parts: Mapping[str, torch.Tensor],
    scheme: str,
    dtype: torch.dtype,
    name: str = "tensor",
    nibble_order: str = NIBBLE_ORDER,
) -> torch.Tensor:
    """Rebuild the float tensor from its stored parts, checking every size first."""
    try:
        codes, scale, shape_t = parts[".__qcodes"], parts[".__qscale"], parts[".__qshape"]
    except KeyError as exc:
        raise QuantizedFormatError(f"{name}: quantized tensor lacks part {exc.args[0]!r}") from None
    if codes.dtype != torch.uint8 or shape_t.dtype != torch.int64 or shape_t.dim() != 1 or shape_t.numel() > 8:
        raise QuantizedFormatError(f"{name}: codes must be uint8 and the shape a short int64 vector")
    shape = [int(v) for v in shape_t.tolist()]
    if any(d < 0 for d in shape):
        raise QuantizedFormatError(f"{name}: negative dimension in shape {shape}")
    n = math.prod(shape)
    if scheme in ("int8", "int4"):
        lo_t = parts.get(".__qmin")
        if lo_t is None or lo_t.numel() != 1 or scale.numel() != 1:
            raise QuantizedFormatError(f"{name}: {scheme} needs one scale and one minimum per tensor")
        want = n if scheme == "int8" else packed_len(n)
        if codes.numel() != want:
            raise QuantizedFormatError(f"{name}: {codes.numel()} code bytes, shape {shape} needs {want}")
        flat = codes.reshape(-1)
        q = flat if scheme == "int8" else unpack_nibbles(_codes4(flat, n, nibble_order), n)
        out = q.to(torch.float32) * float(scale) + float(lo_t)
        return out.view(shape).to(dtype)
    if scheme == "nf4":
        blocks = -(-n // NF4_BLOCK)
        if codes.numel() != packed_len(n) or scale.numel() != blocks or scale.dtype != torch.float32:
            raise QuantizedFormatError(
                f"{name}: nf4 sizes do not fit shape {shape} ({codes.numel()} bytes, {scale.numel()} scales)"
            )
        enc = Encoded([_codes4(codes.reshape(-1), n, nibble_order), scale.reshape(-1)], _NF4.default_params())
        try:
            return _NF4.decode(enc, tuple(shape), torch.float32, "cpu").to(dtype)
        except MalformedEncoding as exc:
            raise QuantizedFormatError(f"{name}: {exc}") from None
    raise QuantizedFormatError(f"{name}: unknown quantization scheme {scheme!r}")


def quantize_state(
    state: Mapping[str, torch.Tensor], scheme: str, float_dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Tensors as stored on disk: quantized parts for weight matrices, ``float_dtype`` copies of the rest."""
    check_scheme(scheme)
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if any(s in name for s in _SUFFIXES):
            raise ConfigError(f"tensor name {name!r} collides with the quantization suffixes")
        if scheme != "none" and should_quantize(t):
            for suffix, part in quantize_tensor(t, scheme).items():
                out[name + suffix] = part.contiguous()
        else:
            t = t.detach().to("cpu")
            out[name] = (t.to(float_dtype) if t.is_floating_point() else t).contiguous()
    return out


def dequantize_state(
    stored: Mapping[str, torch.Tensor],
    scheme: str,
    dtype: torch.dtype = torch.float32,
    nibble_order: str = NIBBLE_ORDER,
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`quantize_state`; float tensors come back as ``dtype``.

    ``nibble_order``: how the stored int4/nf4 bytes are packed (``LEGACY_NIBBLE_ORDER`` for emulators whose
    manifest does not record it)."""
    check_scheme(scheme)
    check_nibble_order(nibble_order)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, t in stored.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            out[key] = t.to(dtype) if t.is_floating_point() else t
            continue
        if scheme == "none":
            raise QuantizedFormatError(f"{key}: quantized part in an emulator declared unquantized")
        groups.setdefault(key[: -len(suffix)], {})[suffix] = t
    for name, parts in groups.items():
        if name in out:
            raise QuantizedFormatError(f"{name} is stored both plain and quantized")
        out[name] = dequantize_tensor(parts, scheme, dtype, name, nibble_order)
    return out


def stored_nbytes(stored: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in stored.values())
