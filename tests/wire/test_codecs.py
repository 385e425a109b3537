"""Codecs: error bounds, exact byte counts, validation of received data, bitsandbytes compatibility."""

from __future__ import annotations

import importlib.util
import math
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardedp2p.errors import WireError
from guardedp2p.wire.codecs import (
    CODECS,
    DYNAMIC8_CODE,
    FP4_CODE,
    NF4_CODE,
    RAW_DTYPES,
    CodecInputError,
    Encoded,
    FourBitCodec,
    Int8BlockCodec,
    MalformedEncoding,
    UnknownCodec,
    get_codec,
)

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")
CUDA = torch.cuda.is_available()

ALL = list(CODECS)
QUANT = ["int8", "int8-block", "nf4", "fp4"]
BOOKS = {"int8-block": DYNAMIC8_CODE, "nf4": NF4_CODE, "fp4": FP4_CODE}


def rt(name: str, x: torch.Tensor, **kw) -> tuple[Encoded, torch.Tensor]:
    c = get_codec(name)
    enc = c.encode(x, **kw)
    return enc, c.decode(enc, tuple(x.shape), torch.float32, "cpu")


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.float() - y.float()).norm() / x.float().norm())


def block_bound(name: str, x: torch.Tensor, bs: int) -> torch.Tensor:
    """Largest possible |x - x̂| per element for a codebook codec: absmax x worst gap to the nearest code."""
    code = torch.sort(BOOKS[name])[0]
    half_gap = float(((code[1:] - code[:-1]) / 2).max())
    edge = max(float(1 + code[0]), float(1 - code[-1]))  # -1 / +1 not representable exactly
    flat = x.reshape(-1).float()
    n = flat.numel()
    nb = -(-n // bs)
    padded = torch.nn.functional.pad(flat, (0, nb * bs - n)).view(nb, bs)
    am = padded.abs().amax(1).repeat_interleave(bs)[:n]
    return (am * max(half_gap, edge) * (1 + 1e-5) + 1e-30).reshape(x.shape)


# ------------------------------------------------------------------------------------------- registry / API


def test_registry_and_unknown():
    assert set(CODECS) == {"fp32", "fp16", "bf16", "int8", "int8-block", "nf4", "fp4"}
    for n, c in CODECS.items():
        assert c.name == n and get_codec(n) is c
    assert not CODECS["fp32"].lossy and all(CODECS[n].lossy for n in ALL if n != "fp32")
    with pytest.raises(UnknownCodec) as ei:
        get_codec("zstd")
    assert isinstance(ei.value, WireError)
    assert "nf4" in str(ei.value) and "int8-block" in str(ei.value)
    with pytest.raises(UnknownCodec):
        get_codec(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ALL)
def test_parts_are_raw_cpu_contiguous(name):
    x = torch.randn(3, 5, 7).transpose(0, 2)  # non-contiguous input
    enc = get_codec(name).encode(x)
    for p in enc.parts:
        assert p.device.type == "cpu" and p.is_contiguous()
        assert str(p.dtype).replace("torch.", "") in RAW_DTYPES
    for k, v in enc.params.items():
        assert isinstance(k, str) and isinstance(v, (int, float, str)) and not isinstance(v, bool)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_dtype_and_device(name, dtype):
    x = torch.randn(2, 3, 64).to(dtype)
    c = get_codec(name)
    enc = c.encode(x)
    out = c.decode(enc, tuple(x.shape), dtype, torch.device("cpu"))
    assert out.dtype == dtype and out.shape == x.shape and out.device.type == "cpu"


# ------------------------------------------------------------------------------------------- error bounds


def test_fp32_exact_fp16_bf16_relative():
    x = torch.randn(4, 32, 64) * 3
    assert torch.equal(rt("fp32", x)[1], x)
    _, y = rt("fp16", x)
    assert ((x - y).abs() <= x.abs() * 2**-11 + 2**-24).all()
    assert rel(x, y) < 1e-3
    _, y = rt("bf16", x)
    assert ((x - y).abs() <= x.abs() * 2**-8).all()
    assert rel(x, y) < 5e-3


def test_fp16_overflow_refused():
    with pytest.raises(CodecInputError, match="fp16"):
        get_codec("fp16").encode(torch.tensor([1.0, 1e6]))
    # bf16 keeps fp32's range
    assert torch.isfinite(rt("bf16", torch.tensor([1.0, 1e30]))[1]).all()


def test_int8_per_row_bound():
    x = torch.randn(6, 10, 96) * torch.logspace(-6, 3, 60).view(6, 10, 1)
    enc, y = rt("int8", x)
    q, scale = enc.parts
    assert q.dtype == torch.int8 and q.shape == x.shape and scale.shape == (60,)
    assert int(q.min()) >= -127
    s = scale.view(6, 10, 1)
    assert torch.allclose(s.squeeze(-1) * 127, x.abs().amax(-1), rtol=1e-6)
    assert ((x - y).abs() <= s / 2 * (1 + 1e-5)).all()
    assert rel(x, y) < 0.01


def test_int8_rounding_rule_is_half_to_even():
    # row absmax 127 -> scale 1; halves round to even
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49]])
    enc, y = rt("int8", x)
    assert enc.parts[0].tolist() == [[127, 0, 2, 2, 0, -2, -2, 3]]


@pytest.mark.parametrize("name,bs", [("int8-block", 256), ("nf4", 64), ("fp4", 64)])
def test_codebook_bound_and_error(name, bs):
    torch.manual_seed(0)
    x = torch.randn(4, 128, 576)
    _, y = rt(name, x)
    assert ((x - y).abs() <= block_bound(name, x, bs)).all()
    r = rel(x, y)
    assert r < {"int8-block": 0.015, "nf4": 0.12, "fp4": 0.14}[name]


def test_nf4_rel_error_gaussian():
    torch.manual_seed(1)
    x = torch.randn(64, 1024)
    assert rel(x, rt("nf4", x)[1]) < 0.12


@pytest.mark.parametrize("name", ALL)
def test_zero_tensor_is_exact(name):
    for shape in [(0,), (3, 0), (4, 7), (2, 3, 64), (1001,)]:
        x = torch.zeros(shape)
        enc, y = rt(name, x)
        assert torch.equal(y, x), (name, shape)
        assert enc.nbytes == get_codec(name).nbytes(shape)


@pytest.mark.parametrize("name", QUANT)
def test_all_zero_block_among_nonzero(name):
    x = torch.randn(4, 256)
    x[1] = 0
    _, y = rt(name, x)
    assert torch.equal(y[1], torch.zeros(256))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n", [1, 2, 3, 63, 65, 255, 257, 1001, 64 * 7 + 5])
def test_odd_sizes(name, n):
    torch.manual_seed(n)
    x = torch.randn(n)
    enc, y = rt(name, x)
    assert y.shape == x.shape
    assert enc.nbytes == get_codec(name).nbytes((n,))
    if name in BOOKS:
        bs = enc.params["blocksize"]
        assert ((x - y).abs() <= block_bound(name, x, bs)).all()
    else:
        assert rel(x, y) < 0.01


def test_scalar_tensor():
    for name in ALL:
        x = torch.tensor(-2.5)
        enc, y = rt(name, x)
        assert y.shape == () and abs(float(y) + 2.5) < 0.02, name  # int8-block: -1 -> -0.993


@pytest.mark.parametrize("name", QUANT)
def test_non_finite_refused(name):
    for bad in (float("nan"), float("inf")):
        x = torch.randn(2, 64)
        x[1, 3] = bad
        with pytest.raises(CodecInputError):
            get_codec(name).encode(x)


# ------------------------------------------------------------------------------------------- byte counts


@pytest.mark.parametrize(
    "name,shape,expected",
    [
        ("fp32", (4, 128, 576), 4 * 128 * 576 * 4),
        ("fp16", (4, 128, 576), 4 * 128 * 576 * 2),
        ("bf16", (4, 128, 576), 4 * 128 * 576 * 2),
        ("int8", (4, 128, 576), 4 * 128 * 576 + 4 * 128 * 4),
        ("int8", (10,), 10 + 4),
        ("int8", (), 1 + 4),
        ("int8-block", (4, 128, 576), 4 * 128 * 576 + (4 * 128 * 576 // 256) * 4),
        ("int8-block", (257,), 257 + 2 * 4),
        ("nf4", (4, 128, 576), 4 * 128 * 576 // 2 + (4 * 128 * 576 // 64) * 4),
        ("nf4", (65,), 33 + 2 * 4),
        ("fp4", (3,), 2 + 4),
        ("fp4", (0,), 0),
    ],
)
def test_exact_bytes(name, shape, expected):
    c = get_codec(name)
    assert c.nbytes(shape) == expected
    x = torch.randn(shape)
    enc = c.encode(x)
    assert enc.nbytes == expected
    assert sum(p.numel() * p.element_size() for p in enc.parts) == expected
    spec = c.expected_parts(shape, enc.params)
    assert [(str(p.dtype).replace("torch.", ""), tuple(p.shape)) for p in enc.parts] == [(d, tuple(s)) for d, s in spec]


def test_bytes_per_element_match_reference_table():
    n = 4 * 512 * 4096  # batch 4 x 512 tokens x d 4096: the bytes/element column of docs/wire.md section 3
    shape = (4, 512, 4096)
    assert CODECS["int8-block"].nbytes(shape) / n == pytest.approx(1.016, abs=1e-3)
    assert CODECS["nf4"].nbytes(shape) / n == pytest.approx(0.5625)
    assert Int8BlockCodec(64).nbytes(shape) / n == pytest.approx(1.0625)
    assert Int8BlockCodec(4096).nbytes(shape) / n == pytest.approx(1.001, abs=1e-3)


# ------------------------------------------------------------------------------------------- stochastic rounding


@pytest.mark.parametrize("name", QUANT)
def test_stochastic_rounding_unbiased(name):
    torch.manual_seed(0)
    x = torch.randn(4, 64).clamp(-2.5, 2.5)
    x[:, 0] = 3.0  # keep the absmax off -1 (the dynamic code cannot represent -1 exactly)
    c = get_codec(name)
    g = torch.Generator().manual_seed(123)
    draws = 4000
    # one encode of 4000 stacked copies: each copy is exactly one 256-block / four 64-blocks / four rows
    xr = x.expand(draws, 4, 64).contiguous()
    enc = c.encode(xr, stochastic=True, generator=g)
    mean = c.decode(enc, tuple(xr.shape), torch.float32, "cpu").mean(0)
    det = rt(name, x)[1]
    step = {
        "int8": x.abs().amax(-1, keepdim=True) / 127,
        "int8-block": 0.015 * 3.0,
        "nf4": 0.28 * 3.0,
        "fp4": 0.34 * 3.0,
    }[name]
    # standard error of a Bernoulli mix between two neighbours: <= step/2/sqrt(draws); 6 sigma
    tol = step / 2 / math.sqrt(draws) * 6
    assert ((mean - x).abs() <= tol).all()
    # deterministic rounding is biased on this data, stochastic beats it on average
    assert float((mean - x).abs().mean()) < float((det - x).abs().mean())


def test_stochastic_respects_generator():
    x = torch.randn(8, 64)
    for name in QUANT:
        c = get_codec(name)
        a = c.encode(x, stochastic=True, generator=torch.Generator().manual_seed(5))
        b = c.encode(x, stochastic=True, generator=torch.Generator().manual_seed(5))
        assert all(torch.equal(p, q) for p, q in zip(a.parts, b.parts))


# ------------------------------------------------------------------------------------------- validation on decode


def _good(name="nf4", shape=(4, 100)):
    c = get_codec(name)
    return c, c.encode(torch.randn(shape)), shape


@pytest.mark.parametrize("name", ALL)
def test_decode_rejects_wrong_part_count(name):
    c, enc, shape = _good(name)
    with pytest.raises(MalformedEncoding):
        c.decode(Encoded(enc.parts + [enc.parts[0]], enc.params), shape, torch.float32, "cpu")
    with pytest.raises(MalformedEncoding):
        c.decode(Encoded([], enc.params), shape, torch.float32, "cpu")


@pytest.mark.parametrize("name", ALL)
def test_decode_rejects_wrong_dtype_and_size(name):
    c, enc, shape = _good(name)
    bad = [p.to(torch.int32) if i == 0 else p for i, p in enumerate(enc.parts)]
    with pytest.raises(MalformedEncoding, match="must be"):
        c.decode(Encoded(bad, enc.params), shape, torch.float32, "cpu")
    bad = [p.reshape(-1)[:-1] if i == 0 else p for i, p in enumerate(enc.parts)]
    with pytest.raises(MalformedEncoding, match="values"):
        c.decode(Encoded(bad, enc.params), shape, torch.float32, "cpu")
    with pytest.raises(MalformedEncoding):
        c.decode(enc, (4, 101), torch.float32, "cpu")


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"blocksize": 63},
        {"blocksize": 0},
        {"blocksize": -64},
        {"blocksize": 1 << 40},
        {"blocksize": 8192},
        {"blocksize": True},
        {"blocksize": 64.0},
        {"blocksize": "64"},
        {"blocksize": 64, "extra": 1},
    ],
)
def test_decode_rejects_bad_params(params):
    c, enc, shape = _good("nf4")
    with pytest.raises(MalformedEncoding):
        c.decode(Encoded(enc.parts, params), shape, torch.float32, "cpu")
    with pytest.raises(MalformedEncoding):
        c.expected_parts(shape, params)


@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16", "int8"])
def test_paramless_codecs_reject_params(name):
    c, enc, shape = _good(name)
    with pytest.raises(MalformedEncoding, match="unknown param"):
        c.decode(Encoded(enc.parts, {"blocksize": 64}), shape, torch.float32, "cpu")


def test_decoder_accepts_other_valid_blocksize():
    x = torch.randn(3, 300)
    enc = Int8BlockCodec(64).encode(x)
    y = CODECS["int8-block"].decode(enc, x.shape, torch.float32, "cpu")
    assert rel(x, y) < 0.015


@pytest.mark.parametrize("shape", [(-1, 4), (2.0, 3), (True, 2), "12", [1] * 17])
def test_decode_rejects_bad_shape(shape):
    c, enc, _ = _good("fp32")
    with pytest.raises(MalformedEncoding):
        c.decode(enc, shape, torch.float32, "cpu")


@pytest.mark.parametrize("name", ALL)
def test_huge_announced_shape_rejected_without_allocation(name):
    c, enc, _ = _good(name)
    t0 = time.perf_counter()
    with pytest.raises(MalformedEncoding):
        c.decode(enc, (1 << 40, 1 << 20), torch.float32, "cpu")
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("name", ["int8", "int8-block", "nf4", "fp4"])
def test_decode_rejects_non_finite_or_negative_scales(name):
    c, enc, shape = _good(name)
    for v in (float("nan"), float("inf"), -1.0):
        scales = enc.parts[1].clone()
        scales[0] = v
        with pytest.raises(MalformedEncoding):
            c.decode(Encoded([enc.parts[0], scales], enc.params), shape, torch.float32, "cpu")


def test_decode_rejects_non_float_target_and_non_encoded():
    c, enc, shape = _good("int8")
    with pytest.raises(MalformedEncoding):
        c.decode(enc, shape, torch.int64, "cpu")
    with pytest.raises(MalformedEncoding):
        c.decode({"parts": enc.parts}, shape, torch.float32, "cpu")  # type: ignore[arg-type]


def test_all_errors_are_wire_errors():
    for cls in (MalformedEncoding, UnknownCodec):
        assert issubclass(cls, WireError)


def test_constructor_validates_blocksize():
    with pytest.raises(MalformedEncoding):
        Int8BlockCodec(100)
    with pytest.raises(ValueError):
        FourBitCodec("int4")


# ------------------------------------------------------------------------------------------- packing layout


def test_nibble_order_high_first():
    # x / absmax exactly at code values: element 0 -> code 15 (1.0), element 1 -> code 7 (0.0), element 2 -> 0 (-1.0)
    x = torch.tensor([1.0, 0.0, -1.0])
    enc = CODECS["nf4"].encode(x)
    assert enc.parts[0].tolist() == [0xF7, 0x07]  # last low nibble = padding with the code of 0.0
    enc = CODECS["fp4"].encode(x)
    assert enc.parts[0].tolist() == [0x30, 0xB0]  # fp4: 1.0 = 0b0011, -1.0 = 0b1011


# ------------------------------------------------------------------------------------------- properties

finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(ALL),
    rows=st.integers(0, 5),
    cols=st.integers(1, 150),
    data=st.data(),
)
def test_property_round_trip(name, rows, cols, data):
    vals = data.draw(st.lists(finite, min_size=rows * cols, max_size=rows * cols))
    x = torch.tensor(vals, dtype=torch.float32).reshape(rows, cols)
    c = get_codec(name)
    enc, y = rt(name, x)
    assert y.shape == x.shape
    assert enc.nbytes == c.nbytes(tuple(x.shape))
    if name == "fp32":
        assert torch.equal(x, y)
    elif name == "fp16":
        assert ((x - y).abs() <= x.abs() * 2**-11 + 2**-24).all()
    elif name == "bf16":
        assert ((x - y).abs() <= x.abs() * 2**-8 + 1e-38).all()
    elif name == "int8":
        s = enc.parts[1].view(rows, 1)
        assert ((x - y).abs() <= s / 2 * (1 + 1e-5)).all()
    else:
        assert ((x - y).abs() <= block_bound(name, x, enc.params["blocksize"])).all()
    # decoding the same bytes twice is deterministic, and re-encoding is idempotent for codebook codecs
    assert torch.equal(c.decode(enc, tuple(x.shape), torch.float32, "cpu"), y)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(QUANT), n=st.integers(1, 700), seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-20, 1e20))
def test_property_scale_invariance(name, n, seed, scale):
    """Codes do not depend on the overall magnitude (absmax scaling), up to power-of-two exactness."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    p2 = 2.0 ** round(math.log2(scale))
    a = get_codec(name).encode(x)
    b = get_codec(name).encode(x * p2)
    assert torch.equal(a.parts[0], b.parts[0])


# ------------------------------------------------------------------------------------------- bitsandbytes


@pytest.fixture(scope="module")
def bnbF():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes.functional as F
    return F


@needs_bnb
def test_codebooks_equal_bitsandbytes(bnbF):
    assert torch.equal(bnbF.create_dynamic_map(signed=True), DYNAMIC8_CODE)
    assert torch.equal(bnbF.get_4bit_type("nf4", device="cpu"), NF4_CODE)
    assert torch.equal(bnbF.get_4bit_type("fp4", device="cpu"), FP4_CODE)


@needs_bnb
@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("n", [1, 2, 37, 64, 128, 1000, 1001, 4 * 128 * 576])
def test_4bit_bytes_equal_bitsandbytes_cpu(bnbF, kind, n):
    torch.manual_seed(n)
    x = torch.randn(n)
    if n > 200:
        x[:64] = 0  # an all-zero block
        x[100] = 1e-30
        x[130:140] = torch.tensor([1e-4, -1e-4, 0.0, -0.0, 1e-3, -1e-3, 1e-6, -1e-6, 0.0, 0.0])
    enc = CODECS[kind].encode(x)
    q, stt = bnbF.quantize_4bit(x, blocksize=64, quant_type=kind)
    assert torch.equal(enc.parts[0], q.reshape(-1))
    assert torch.equal(enc.parts[1], stt.absmax)
    # and bitsandbytes decodes our bytes to exactly what we decode
    ours = CODECS[kind].decode(enc, (n,), torch.float32, "cpu")
    assert torch.equal(bnbF.dequantize_4bit(q, stt).reshape(-1), ours)


@needs_bnb
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_4bit_bytes_equal_bitsandbytes_half_inputs(bnbF, dtype):
    x = torch.randn(4, 64, 96).to(dtype)
    for kind in ("nf4", "fp4"):
        enc = CODECS[kind].encode(x)
        q, stt = bnbF.quantize_4bit(x, blocksize=64, quant_type=kind)
        assert torch.equal(enc.parts[0], q.reshape(-1)) and torch.equal(enc.parts[1], stt.absmax)


@needs_bnb
def test_int8_block_format_interoperates_with_bitsandbytes(bnbF):
    """Same codebook, absmax and layout: each side decodes the other's bytes identically.

    The bytes themselves differ: bitsandbytes' native CPU kernel does not always pick the nearest code
    (e.g. it codes 0.0 as index 131). We pin that observation so a bitsandbytes change is noticed.
    """
    torch.manual_seed(0)
    x = torch.randn(4, 128, 576)
    c = CODECS["int8-block"]
    enc = c.encode(x)
    q, stt = bnbF.quantize_blockwise(x, blocksize=256)
    assert torch.equal(enc.parts[1], stt.absmax)
    # bnb decodes our bytes like we do
    ours_state = type(stt)(absmax=enc.parts[1], code=stt.code, blocksize=256, dtype=torch.float32)
    ours = c.decode(enc, tuple(x.shape), torch.float32, "cpu")
    assert torch.equal(bnbF.dequantize_blockwise(enc.parts[0].view(x.shape), ours_state), ours)
    # we decode bnb's bytes like bnb does
    theirs = c.decode(Encoded([q.reshape(-1), stt.absmax], {"blocksize": 256}), tuple(x.shape), torch.float32, "cpu")
    assert torch.equal(theirs, bnbF.dequantize_blockwise(q, stt))
    # ours is the nearest code (in scaled space), so never worse per element
    assert ((x - ours).abs() <= (x - theirs).abs() + 1e-6 * x.abs()).all()  # up to rounding at exact ties
    differ = float((enc.parts[0] != q.reshape(-1)).float().mean())
    assert differ < 0.01


# ------------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("name", ALL)
def test_cuda_cpu_bytes_equal(name):
    """A CPU peer and a GPU peer put the same bytes on the wire (deterministic rounding)."""
    torch.manual_seed(0)
    for shape in [(4, 128, 576), (1001,), (3, 7)]:
        x = torch.randn(shape) * 3
        a = get_codec(name).encode(x)
        b = get_codec(name).encode(x.cuda())
        assert a.params == b.params
        assert all(torch.equal(p, q) for p, q in zip(a.parts, b.parts)), (name, shape)
        y = get_codec(name).decode(b, shape, torch.float32, "cuda")
        assert y.device.type == "cuda"
        assert torch.equal(y.cpu(), get_codec(name).decode(a, shape, torch.float32, "cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and HAS_BNB), reason="needs CUDA and bitsandbytes")
@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_bnb_cuda_bytes_report(bnbF, kind):
    """Records how far bitsandbytes' CUDA kernels are from the wire format (informational, never fails on bytes)."""
    torch.manual_seed(0)
    x = torch.randn(4, 128, 576, device="cuda")
    q, stt = bnbF.quantize_4bit(x, blocksize=64, quant_type=kind)
    enc = CODECS[kind].encode(x)
    differ = int((q.reshape(-1).cpu() != enc.parts[0]).sum())
    print(f"bnb CUDA {kind}: {differ} of {enc.parts[0].numel()} bytes differ from the wire encoder")
    assert torch.equal(stt.absmax.cpu(), enc.parts[1])


# ------------------------------------------------------------------------------------------- fast path


@pytest.mark.parametrize("name", ["int8-block", "nf4", "fp4"])
def test_lookup_table_quantizer_equals_bucketize(name):
    """The cell-table quantizer is exact: same codes as a binary search over the midpoints, ties included."""
    c = get_codec(name)
    assert c._lut is not None
    b = c._bounds
    up = torch.nextafter(b, torch.full_like(b, 2.0))
    down = torch.nextafter(b, torch.full_like(b, -2.0))
    g = torch.Generator().manual_seed(0)
    y = (
        torch.cat(
            [
                b,
                up,
                down,
                c._sorted,
                torch.rand(200_000, generator=g) * 2 - 1,
                (torch.rand(200_000, generator=g) * 2 - 1) * torch.logspace(-40, 0, 200_000),
                torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-38, -1e-38, 1e-45, -1e-45]),
            ]
        )
        .clamp(-1, 1)
        .contiguous()
    )
    ref = torch.bucketize(y, b)
    if c.sort_order is not None:
        ref = c._order[ref]
    assert torch.equal(c._quantize(y, False, None), ref.to(torch.uint8))
