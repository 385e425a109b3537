"""Wire format: exact round trips and a specific WireError for every kind of malformed input."""

from __future__ import annotations

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from guardedp2p.errors import WireError
from guardedp2p.wire.framing import (
    BadTensorSpec,
    FrameLengthMismatch,
    MalformedHeader,
    Message,
    MessageTooLarge,
    UnknownMessageType,
    VersionMismatch,
    WireLimits,
    decode,
    encode,
)
from guardedp2p.wire.messages import WIRE_VERSION, MsgType

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
]


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_raw_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    t = _sample(dtype, (3, 5, 7))
    msg = Message(MsgType.ACT_UP, session="abc", step=42, meta={"train": True}, tensors={"h": t})
    out = decode(encode(msg))
    assert out.type == MsgType.ACT_UP and out.session == "abc" and out.step == 42 and out.meta == {"train": True}
    assert out.tensors["h"].dtype == dtype
    assert torch.equal(
        out.tensors["h"].view(torch.uint8) if dtype != torch.bool else out.tensors["h"],
        t.view(torch.uint8) if dtype != torch.bool else t,
    )


def test_empty_and_scalar_tensors() -> None:
    msg = Message(MsgType.ACT_UP, tensors={"a": torch.empty(0, 4), "b": torch.tensor(3.5)})
    out = decode(encode(msg))
    assert out.tensors["a"].shape == (0, 4)
    assert out.tensors["b"].item() == 3.5


def _header(frames: list) -> dict:
    return msgpack.unpackb(frames[0], raw=False)


def _with_header(frames: list, header: dict) -> list:
    return [msgpack.packb(header, use_bin_type=True), *frames[1:]]


def _good() -> list:
    return encode(Message(MsgType.ACT_UP, session="s", step=1, tensors={"h": torch.ones(2, 3)}))


def test_unknown_type() -> None:
    h = _header(_good())
    h["t"] = "EXEC_SHELL"
    with pytest.raises(UnknownMessageType):
        decode(_with_header(_good(), h))


def test_version_mismatch() -> None:
    h = _header(_good())
    h["v"] = WIRE_VERSION + 1
    with pytest.raises(VersionMismatch):
        decode(_with_header(_good(), h))


@pytest.mark.parametrize("frames", [[], [b""], [b"\xc1"], [b"\x93\x01\x02"], [msgpack.packb([1, 2, 3])]])
def test_malformed_header(frames: list) -> None:
    with pytest.raises(MalformedHeader):
        decode(frames)


def test_missing_field_and_wrong_type() -> None:
    h = _header(_good())
    del h["sid"]
    with pytest.raises(MalformedHeader, match="sid"):
        decode(_with_header(_good(), h))
    h = _header(_good())
    h["step"] = "one"
    with pytest.raises(MalformedHeader, match="step"):
        decode(_with_header(_good(), h))


def test_truncated_frame() -> None:
    frames = _good()
    frames[1] = bytes(frames[1])[:-1]
    with pytest.raises(FrameLengthMismatch):
        decode(frames)


def test_missing_and_extra_frames() -> None:
    with pytest.raises(FrameLengthMismatch, match="missing"):
        decode(_good()[:1])
    with pytest.raises(FrameLengthMismatch, match="extra"):
        decode([*_good(), b"xx"])


def test_wrong_dtype() -> None:
    h = _header(_good())
    h["tensors"][0]["dtype"] = "object"
    h["tensors"][0]["parts"][0][0] = "object"
    with pytest.raises(BadTensorSpec, match="not allowed"):
        decode(_with_header(_good(), h))


def test_parts_disagree_with_shape() -> None:
    h = _header(_good())
    h["tensors"][0]["parts"][0][1] = [3, 2]
    with pytest.raises(BadTensorSpec):
        decode(_with_header(_good(), h))


def test_oversized_tensor_refused_before_allocation() -> None:
    h = _header(_good())
    h["tensors"][0]["shape"] = [1 << 20, 1 << 20]
    h["tensors"][0]["parts"][0][1] = [1 << 20, 1 << 20]
    with pytest.raises(MessageTooLarge):
        decode(_with_header(_good(), h))


def test_oversized_header_and_message() -> None:
    with pytest.raises(MessageTooLarge):
        decode([b"\x80" * 100], WireLimits(max_header_bytes=10))
    with pytest.raises(MessageTooLarge):
        decode(_good(), WireLimits(max_message_bytes=10))


def test_msgpack_ext_types_refused() -> None:
    h = _header(_good())
    h["meta"] = {"x": msgpack.ExtType(5, b"boom")}
    with pytest.raises(MalformedHeader):
        decode(_with_header(_good(), h))


def test_negative_dimension_and_huge_ndim() -> None:
    h = _header(_good())
    h["tensors"][0]["shape"] = [-2, -3]
    with pytest.raises(BadTensorSpec):
        decode(_with_header(_good(), h))
    h["tensors"][0]["shape"] = [1] * 20
    with pytest.raises(BadTensorSpec):
        decode(_with_header(_good(), h))


def test_unknown_codec_is_a_wire_error() -> None:
    h = _header(_good())
    h["tensors"][0]["codec"] = "__import__"
    with pytest.raises(WireError):
        decode(_with_header(_good(), h))


# ------------------------------------------------------------------------------------------ properties
shapes = st.lists(st.integers(0, 6), min_size=0, max_size=4).map(tuple)


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    shape=shapes,
    step=st.integers(0, 1 << 40),
    sid=st.text(max_size=32),
    meta=st.dictionaries(
        st.text(max_size=8), st.one_of(st.integers(-1000, 1000), st.text(max_size=8), st.booleans()), max_size=4
    ),
)
def test_property_round_trip(dtype: torch.dtype, shape: tuple, step: int, sid: str, meta: dict) -> None:
    t = _sample(dtype, shape)
    out = decode(encode(Message(MsgType.GRAD_UP, session=sid, step=step, meta=meta, tensors={"x": t})))
    assert out.session == sid and out.step == step and out.meta == meta
    assert out.tensors["x"].shape == t.shape and out.tensors["x"].dtype == dtype
    assert torch.equal(out.tensors["x"].float(), t.float())


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_property_mutations_raise_only_wire_errors(data: st.DataObject) -> None:
    frames = [
        bytearray(f)
        for f in encode(
            Message(
                MsgType.ACT_UP,
                session="s",
                step=3,
                tensors={"h": torch.ones(2, 4), "mask": torch.ones(2, 4, dtype=torch.int8)},
            )
        )
    ]
    n = data.draw(st.integers(1, 8))
    for _ in range(n):
        i = data.draw(st.integers(0, len(frames) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "grow", "drop", "dup"]))
        f = frames[i]
        if op == "flip" and f:
            j = data.draw(st.integers(0, len(f) - 1))
            f[j] = data.draw(st.integers(0, 255))
        elif op == "cut":
            frames[i] = f[: data.draw(st.integers(0, len(f)))]
        elif op == "grow":
            frames[i] = f + bytes(data.draw(st.integers(1, 16)))
        elif op == "drop" and len(frames) > 1:
            frames.pop(i)
        elif op == "dup":
            frames.insert(i, bytearray(f))
    try:
        decode([bytes(f) for f in frames])
    except WireError:
        pass
