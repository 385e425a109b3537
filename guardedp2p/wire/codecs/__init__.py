"""Tensor codecs: how a tensor becomes bytes on the wire, by name, from one registry.

The implementations live in :mod:`~guardedp2p.wire.codecs.core`; ``get_codec(name)`` is the only way protocol
code reaches them, so a received codec name is looked up in a fixed table and never used as an attribute name.
"""

from guardedp2p.wire.codecs.core import (
    CODECS,
    DTYPES,
    DYNAMIC8_CODE,
    FP4_CODE,
    FP4_SORT_ORDER,
    NF4_CODE,
    RAW_DTYPES,
    BFloat16Codec,
    Codec,
    CodecError,
    CodecInputError,
    Encoded,
    Float16Codec,
    Float32Codec,
    FourBitCodec,
    Int8BlockCodec,
    Int8RowCodec,
    MalformedEncoding,
    UnknownCodec,
    dtype_name,
    get_codec,
)

__all__ = [
    "CODECS",
    "DTYPES",
    "DYNAMIC8_CODE",
    "FP4_CODE",
    "FP4_SORT_ORDER",
    "NF4_CODE",
    "RAW_DTYPES",
    "BFloat16Codec",
    "Codec",
    "CodecError",
    "CodecInputError",
    "Encoded",
    "Float16Codec",
    "Float32Codec",
    "FourBitCodec",
    "Int8BlockCodec",
    "Int8RowCodec",
    "MalformedEncoding",
    "UnknownCodec",
    "dtype_name",
    "get_codec",
]
