"""Bytes, error and speed of every tensor codec on one activation-sized tensor.

Run: ``python -m benchmarks.bench_codecs [--shape 4 128 576] [--reps 7] [--device cpu] [--outliers]``.
Prints one JSON object per codec: ``{"bench": "codecs", "codec": ..., "bytes": ..., "ratio_vs_fp32": ...,
"rel_err": ||x - x̂|| / ||x||, "max_abs_err": ..., "encode_ms": ..., "decode_ms": ...}`` (median over reps;
encode includes the copy of the parts to the CPU, decode starts from CPU parts). The default tensor is the
(B, L, d) = (4, 128, 576) activation of SmolLM2-135M at batch 4, filled with N(0, 1); ``--outliers`` multiplies
4 hidden channels by 50 (LLM.int8()-style outlier features). Runs in a few seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from guardedp2p.wire.codecs import CODECS


def _ms(fn, reps: int, sync) -> float:
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(shape: tuple[int, ...], reps: int, device: str, outliers: bool) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    if outliers:
        x[..., :4] *= 50
    x = x.to(device)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    fp32_bytes = CODECS["fp32"].nbytes(shape)
    rows = []
    for name, codec in CODECS.items():
        enc = codec.encode(x)  # warm-up
        dec = codec.decode(enc, shape, torch.float32, device)
        assert enc.nbytes == codec.nbytes(shape)
        err = (x - dec).float()
        rows.append(
            {
                "bench": "codecs",
                "codec": name,
                "shape": list(shape),
                "device": str(x.device),
                "outliers": outliers,
                "bytes": enc.nbytes,
                "ratio_vs_fp32": round(enc.nbytes / fp32_bytes, 5),
                "bytes_per_elem": round(enc.nbytes / x.numel(), 5),
                "rel_err": float(err.norm() / x.float().norm()),
                "max_abs_err": float(err.abs().max()),
                "encode_ms": round(_ms(lambda codec=codec: codec.encode(x), reps, sync), 3),
                "decode_ms": round(
                    _ms(lambda codec=codec, enc=enc: codec.decode(enc, shape, torch.float32, device), reps, sync), 3
                ),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs="+", default=[4, 128, 576])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--outliers", action="store_true")
    args = ap.parse_args(argv)
    for row in run(tuple(args.shape), args.reps, args.device, args.outliers):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
