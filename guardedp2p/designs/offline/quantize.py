"""Weight quantization of the emulator's middle blocks, shipped as integer codes plus per-tensor scales.

Offsite-tuning only *simulates* quantization (weights stay float on disk); guardedp2p must save bytes on the
download, so it ships the codes (algorithms.md section 3.3). Pure torch, no bitsandbytes needed.

Schemes (only floating tensors with ``dim >= 2`` are quantized; norms and biases stay float):

``int8`` / ``int4``
    Uniform min-max per tensor, ``s = (max - min) / (2^b - 1)``, codes ``q = round((w - min) / s)`` in
    ``[0, 2^b - 1]``, ``w^ = min + q * s``. Same step size as the reference; the grid is anchored at ``min``
    rather than at the mid-point ``(max + min) / 2``, because the reference's mid-point grid needs ``2^b + 1``
    levels and so does not fit in ``b`` bits. int4 codes are packed two per byte.
``nf4``
    NormalFloat-4 (QLoRA): blocks of 64 values, each scaled by its absolute maximum and rounded to the nearest
    of 16 normal-quantile levels; two codes per byte plus one fp32 scale per block.

Stored keys for a quantized tensor ``W``: ``W.__qcodes`` (uint8), ``W.__qscale`` and, for int8/int4,
``W.__qmin`` (float32), and ``W.__qshape`` (int64, the original shape). A reader accepts exactly these
suffixes; anything else in the file is an error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from guardedp2p.errors import ArtifactError, ConfigError

SCHEMES = ("none", "int8", "int4", "nf4")
NF4_BLOCK = 64
_SUFFIXES = (".__qcodes", ".__qscale", ".__qmin", ".__qshape")

#: The 16 NF4 levels of QLoRA (Dettmers et al., 2023), quantiles of N(0, 1) rescaled to [-1, 1].
NF4_LEVELS = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)


class QuantizedFormatError(ArtifactError):
    """A quantized tensor in an emulator file is inconsistent (codes, scales and shape do not fit)."""


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown quantization {scheme!r}; choose one of {', '.join(SCHEMES)}")
    return scheme


def should_quantize(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.dim() >= 2 and t.numel() > 0


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def _unpack4(packed: torch.Tensor, n: int) -> torch.Tensor:
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack([lo, hi], dim=1).reshape(-1)[:n]


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
        codes = q if bits == 8 else _pack4(q)
        return {
            ".__qcodes": codes,
            ".__qscale": torch.tensor([s], dtype=torch.float32),
            ".__qmin": torch.tensor([lo], dtype=torch.float32),
            ".__qshape": shape,
        }
    if scheme == "nf4":
        n = x.numel()
        pad = (-n) % NF4_BLOCK
        xb = torch.cat([x, x.new_zeros(pad)]).view(-1, NF4_BLOCK)
        absmax = xb.abs().amax(dim=1)
        scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        normed = (xb / scale[:, None]).clamp_(-1.0, 1.0)
        mids = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
        q = torch.bucketize(normed, mids).to(torch.uint8).reshape(-1)[:n]
        return {".__qcodes": _pack4(q), ".__qscale": scale.to(torch.float32), ".__qshape": shape}
    raise ConfigError("scheme 'none' stores tensors as they are")


def dequantize_tensor(
    parts: Mapping[str, torch.Tensor], scheme: str, dtype: torch.dtype, name: str = "tensor"
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
        want = n if scheme == "int8" else (n + 1) // 2
        if codes.numel() != want:
            raise QuantizedFormatError(f"{name}: {codes.numel()} code bytes, shape {shape} needs {want}")
        q = codes.reshape(-1) if scheme == "int8" else _unpack4(codes.reshape(-1), n)
        out = q.to(torch.float32) * float(scale) + float(lo_t)
        return out.view(shape).to(dtype)
    if scheme == "nf4":
        blocks = -(-n // NF4_BLOCK)
        if codes.numel() != (n + 1) // 2 or scale.numel() != blocks:
            raise QuantizedFormatError(
                f"{name}: nf4 sizes do not fit shape {shape} ({codes.numel()} bytes, {scale.numel()} scales)"
            )
        q = _unpack4(codes.reshape(-1), n).long()
        vals = NF4_LEVELS[q]
        pad = blocks * NF4_BLOCK - n
        vals = torch.cat([vals, vals.new_zeros(pad)]).view(blocks, NF4_BLOCK) * scale.to(torch.float32)[:, None]
        return vals.reshape(-1)[:n].view(shape).to(dtype)
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
    stored: Mapping[str, torch.Tensor], scheme: str, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`quantize_state`; float tensors come back as ``dtype``."""
    check_scheme(scheme)
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
        out[name] = dequantize_tensor(parts, scheme, dtype, name)
    return out


def stored_nbytes(stored: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in stored.values())
