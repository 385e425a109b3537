"""Chunked tensor frames (issue 19): round trips around the threshold, zero-copy sends, and every malformed chunk
layout refused as a WireError before anything is allocated (docs/wire.md, section 2)."""

from __future__ import annotations

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from guardedp2p.errors import WireError
from guardedp2p.wire import framing
from guardedp2p.wire.framing import (
    CHUNK_BYTES,
    BadTensorSpec,
    FrameLengthMismatch,
    Message,
    MessageTooLarge,
    WireLimits,
    decode,
    encode,
)
from guardedp2p.wire.messages import MsgType

CHUNK = 1024  # the smallest chunk size encode accepts: keeps the tests small


def _msg(t: torch.Tensor, codec: str = "raw") -> Message:
    return Message(MsgType.ACT_UP, session="s", step=7, tensors={"h": t}, codecs={"h": codec})


def _header(frames: list) -> dict:
    return msgpack.unpackb(bytes(frames[0]), raw=False)


def _with_header(frames: list, header: dict) -> list:
    return [msgpack.packb(header, use_bin_type=True), *frames[1:]]


@pytest.mark.parametrize("nbytes", [CHUNK - 4, CHUNK, CHUNK + 4, 2 * CHUNK, 2 * CHUNK + 4, 7 * CHUNK + 12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8, torch.bool])
def test_round_trip_at_and_around_the_threshold(nbytes: int, dtype: torch.dtype) -> None:
    n = nbytes // torch.empty((), dtype=dtype).element_size()
    t = torch.randn(n).to(dtype) if dtype.is_floating_point else (torch.arange(n) % 7).to(dtype)
    frames = encode(_msg(t), chunk_bytes=CHUNK)
    size = n * t.element_size()
    expected_frames = 1 if size <= CHUNK else -(-size // CHUNK)
    assert len(frames) == 1 + expected_frames
    spec = _header(frames)["tensors"][0]
    assert spec.get("frames", [1]) == [expected_frames]
    assert all(framing._nbytes(f) <= CHUNK for f in frames[1:])
    out = decode(frames).tensors["h"]
    assert out.dtype == dtype and torch.equal(out, t)


def test_small_messages_are_unchanged_by_chunking() -> None:
    """Below the threshold the bytes are exactly those of an unchunked encoder (no ``frames`` key)."""
    msg = _msg(torch.randn(4, 8))
    assert [bytes(f) for f in encode(msg)] == [bytes(f) for f in encode(msg, chunk_bytes=None)]
    assert "frames" not in _header(encode(msg))["tensors"][0]


def test_default_chunk_size_on_a_large_tensor() -> None:
    t = torch.randn(3 * CHUNK_BYTES // 4 + 5)  # a little over 3 chunks of fp32
    frames = encode(_msg(t))
    assert _header(frames)["tensors"][0]["frames"] == [4]
    assert torch.equal(decode(frames).tensors["h"], t)


def test_codec_parts_are_chunked_independently() -> None:
    """int8: the codes part is chunked, the per-row scales part (small) stays one frame."""
    t = torch.randn(4, 3, 600)
    frames = encode(_msg(t, "int8"), chunk_bytes=CHUNK)
    counts = _header(frames)["tensors"][0]["frames"]
    assert counts[0] == -(-t.numel() // CHUNK) and counts[1:] == [1]
    ref = decode(encode(_msg(t, "int8"), chunk_bytes=None)).tensors["h"]
    assert torch.equal(decode(frames).tensors["h"], ref)


def test_several_tensors_keep_their_frames_in_order() -> None:
    a, b = torch.randn(3000), torch.arange(5000, dtype=torch.int64)
    msg = Message(MsgType.ACT_UP, tensors={"a": a, "m": torch.ones(3, dtype=torch.int8), "b": b})
    out = decode(encode(msg, chunk_bytes=CHUNK)).tensors
    assert torch.equal(out["a"], a) and torch.equal(out["b"], b) and out["m"].tolist() == [1, 1, 1]


def test_sending_copies_nothing() -> None:
    """Chunk frames are views of the tensor's memory (so the transport may send them zero-copy)."""
    t = torch.zeros(4 * CHUNK)
    frames = encode(_msg(t), chunk_bytes=CHUNK)
    t[CHUNK // 4 + 1] = 1.0  # lands in the second frame of the part
    assert isinstance(frames[2], memoryview) and bytes(frames[2]) != bytes(len(bytes(frames[2])))


def test_encode_refuses_a_chunk_size_out_of_range() -> None:
    with pytest.raises(ValueError):
        encode(_msg(torch.zeros(10)), chunk_bytes=16)
    with pytest.raises(ValueError):
        encode(_msg(torch.zeros(10)), chunk_bytes=framing.MAX_CHUNK_BYTES + 1)


def _chunked() -> list:
    t = torch.arange(3 * CHUNK // 4 + 3, dtype=torch.float32)
    return [bytes(f) for f in encode(_msg(t), chunk_bytes=CHUNK)]  # 4 frames


@pytest.mark.parametrize("counts", ["4", 4, [], [4, 1], [0], [-1], [True], [4.0], [None], [10**9]])
def test_malformed_frame_counts_are_bad_tensor(counts: object) -> None:
    h = _header(_chunked())
    h["tensors"][0]["frames"] = counts
    with pytest.raises(BadTensorSpec):
        decode(_with_header(_chunked(), h))


@pytest.mark.parametrize("counts", [[3], [5], [1], [2]])
def test_frame_counts_that_disagree_with_the_frames_are_refused(counts: list) -> None:
    h = _header(_chunked())
    h["tensors"][0]["frames"] = counts
    with pytest.raises(FrameLengthMismatch):
        decode(_with_header(_chunked(), h))


def test_chunk_lengths_must_add_up() -> None:
    frames = _chunked()
    frames[2] = frames[2][:-1]
    with pytest.raises(FrameLengthMismatch):
        decode(frames)
    frames = _chunked()
    frames[2], frames[3] = frames[2] + frames[3][:8], frames[3][8:]  # same total, other boundaries: allowed
    ref = decode(_chunked()).tensors["h"]
    assert torch.equal(decode(frames).tensors["h"], ref)
    frames = _chunked()
    frames.insert(3, b"")  # an empty chunk frame
    h = _header(frames)
    h["tensors"][0]["frames"] = [5]
    with pytest.raises(FrameLengthMismatch, match="empty"):
        decode(_with_header(frames, h))


def test_missing_and_extra_chunk_frames() -> None:
    with pytest.raises(FrameLengthMismatch, match="missing"):
        decode(_chunked()[:-1])
    with pytest.raises(FrameLengthMismatch, match="extra"):
        decode([*_chunked(), b"x"])


def test_too_many_frames_refused_before_the_header_is_parsed() -> None:
    with pytest.raises(MessageTooLarge):
        decode(_chunked(), WireLimits(max_frames=3))
    with pytest.raises(BadTensorSpec):  # a count over the limit in the header
        h = _header(_chunked())
        h["tensors"][0]["frames"] = [5]
        decode(_with_header(_chunked(), h), WireLimits(max_frames=4))


def test_limits_are_checked_before_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing of a declared size is allocated before the lengths and the limits agree with it."""
    allocated: list[int] = []
    real_empty = torch.empty

    def spy(*size: object, **kw: object) -> torch.Tensor:
        if kw.get("dtype") == torch.uint8:
            allocated.append(int(size[0]))  # type: ignore[call-overload]
        return real_empty(*size, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr(framing.torch, "empty", spy)
    big = 1 << 28  # 256 Mi elements: 1 GiB as fp32, over a 512 MiB tensor limit
    h = _header(_chunked())
    h["tensors"][0]["shape"] = [big]
    h["tensors"][0]["parts"] = [["float32", [big]]]
    with pytest.raises(MessageTooLarge):
        decode(_with_header(_chunked(), h), WireLimits(max_tensor_bytes=1 << 29))
    h["tensors"][0]["shape"] = [1 << 20]  # allowed size, but the chunks hold far fewer bytes
    h["tensors"][0]["parts"] = [["float32", [1 << 20]]]
    with pytest.raises(FrameLengthMismatch):
        decode(_with_header(_chunked(), h))
    with pytest.raises(MessageTooLarge):  # the whole message over its limit: refused before the header
        decode(_chunked(), WireLimits(max_message_bytes=2 * CHUNK))
    assert allocated == []
    decode(_chunked())
    assert allocated == [3 * CHUNK + 12]


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_property_chunk_mutations_raise_only_wire_errors(data: st.DataObject) -> None:
    """Mutated counts, split / merged / dropped / duplicated chunks: a WireError or a tensor of the declared shape,
    never another exception (the bytes themselves are CURVE's to protect, not the framing's)."""
    t = torch.arange(3 * CHUNK // 4 + 3, dtype=torch.float32)
    frames = [bytes(f) for f in encode(_msg(t), chunk_bytes=CHUNK)]
    header = _header(frames)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["count", "split", "merge", "drop", "dup", "cut"]))
        i = data.draw(st.integers(1, max(1, len(frames) - 1))) if len(frames) > 1 else 0
        if op == "count":
            header["tensors"][0]["frames"] = [data.draw(st.integers(-2, 10))]
        elif op == "split" and i and len(frames[i]) > 1:
            k = data.draw(st.integers(1, len(frames[i]) - 1))
            frames[i : i + 1] = [frames[i][:k], frames[i][k:]]
        elif op == "merge" and 0 < i < len(frames) - 1:
            frames[i : i + 2] = [frames[i] + frames[i + 1]]
        elif op == "drop" and i:
            frames.pop(i)
        elif op == "dup" and i:
            frames.insert(i, frames[i])
        elif op == "cut" and i:
            frames[i] = frames[i][: data.draw(st.integers(0, len(frames[i])))]
    try:
        out = decode(_with_header(frames, header))
    except WireError:
        return
    assert out.tensors["h"].shape == t.shape and out.tensors["h"].dtype == t.dtype
