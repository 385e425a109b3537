"""Two 4-bit codes per byte: the one packing used by the ``nf4`` / ``fp4`` wire codecs and the emulator's int4/nf4
weight codes.

Order: **element 2i in the high nibble, element 2i+1 in the low nibble** (bitsandbytes' order, so our ``nf4``
bytes equal ``bitsandbytes.functional.quantize_4bit``); an odd count is padded with ``pad`` in the last low
nibble. Emulators written before the two shared this (``nibble_order`` absent from their manifest) stored the
opposite order; :func:`swap_nibbles` turns such bytes into this order.
"""

from __future__ import annotations

import torch

__all__ = ["pack_nibbles", "unpack_nibbles", "swap_nibbles", "packed_len"]


def packed_len(n: int) -> int:
    """Bytes that hold ``n`` 4-bit codes."""
    return (n + 1) // 2


def pack_nibbles(codes: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """Pack 4-bit codes (any integer dtype, values 0..15, any shape: flattened) into ``packed_len(n)`` uint8."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_full((1,), pad)])
    return ((flat[0::2] << 4) | flat[1::2]).contiguous()


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` codes (uint8, 1-D) of bytes written by :func:`pack_nibbles`."""
    flat = packed.reshape(-1)
    out = torch.empty(flat.numel() * 2, dtype=torch.uint8, device=flat.device)
    out[0::2] = flat >> 4
    out[1::2] = flat & 0x0F
    return out[:n]


def swap_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Exchange the two nibbles of every byte (converts the legacy low-nibble-first order, and back)."""
    return ((packed << 4) | (packed >> 4)).to(torch.uint8)
