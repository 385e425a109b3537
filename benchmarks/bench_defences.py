"""Online on the demo task: bytes per step and eval accuracy for each codec, with and without dCor, in one run.

Every setting is a real ``tune`` run (in-process channel, so the byte counts are those of the ZeroMQ wire
without socket noise) from the same pre-trained model, data order and seed; only the codec of every direction
and the dCor weight change. Prints one JSON line per setting, then the int8 summary (bytes as % of fp32 and
accuracy delta vs fp32, per dCor weight), and writes ``defences.json``, ``defences.md`` and
``accuracy_vs_bytes.png`` into ``--out``.

    python -m benchmarks.bench_defences                                  # 4 codecs x {0, 0.5, 4}, 60 steps (the demo budget)
    python -m benchmarks.bench_defences --codecs fp32,int8 --dcor 0 --steps 10 --eval-items 32
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def run_setting(base: Any, tok: Any, args: argparse.Namespace, codec: str, alpha: float, out: Path) -> dict[str, Any]:
    """One Online run with ``codec`` in every direction and dCor weight ``alpha``; its numbers."""
    from guardedp2p.service.client import TuneOptions, prepare_client, tune
    from guardedp2p.service.provider import ProviderOptions, build_provider_app
    from guardedp2p.train.config import TrainConfig
    from guardedp2p.transport.inproc import InProcClientChannel
    from guardedp2p.wire.handshake import CODEC_DIRECTIONS

    train = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        max_length=args.max_length,
        warmup_steps=min(5, args.steps // 5),
        checkpoint_every=0,
        dcor_alpha=alpha,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
    )
    opts = TuneOptions(
        protocol="online",
        model=args.model,
        data=args.data,
        eval_data=args.eval_data,
        out=str(out / f"{codec}-dcor{alpha:g}"),
        train=train,
        codecs={d: codec for d in CODEC_DIRECTIONS},
        device="cpu",
        eval_max_items=args.eval_items,
        progress=False,
        retries=0,
    )
    app = build_provider_app(
        ProviderOptions(model=args.model, protocols=("online",), device="cpu"), model=copy.deepcopy(base)
    )
    client = prepare_client(opts, model=copy.deepcopy(base), tokenizer=tok)
    t0 = time.perf_counter()
    s = tune(opts, lambda: InProcClientChannel(app), client=client)
    return {
        "bench": "defence",
        "codec": codec,
        "dcor": alpha,
        "label": f"{codec}" + (f" + dCor {alpha:g}" if alpha else ""),
        "steps": s["steps"],
        "bytes_per_step": round(s["bytes_per_step"], 1),
        "bytes_up_per_step": round(s["train_bytes_up"] / max(1, s["steps"]), 1),
        "bytes_down_per_step": round(s["train_bytes_down"] / max(1, s["steps"]), 1),
        "eval_metric": s["eval_metric"],
        "eval_before": s["eval_before"],
        "eval_after": s["eval_after"],
        "loss_first": s["loss_first"],
        "loss_last": s["loss_last"],
        "train_s": s["train_s"],
        "wall_s": round(time.perf_counter() - t0, 1),
        "final_dcor": s["history"][-1]["dcor"] if s["history"] else None,
    }


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per dCor weight and codec: bytes as % of fp32 and accuracy delta vs fp32 (same dCor weight)."""
    out = []
    for alpha in sorted({r["dcor"] for r in rows}):
        ref = next((r for r in rows if r["dcor"] == alpha and r["codec"] == "fp32"), None)
        if ref is None:
            continue
        for r in rows:
            if r["dcor"] != alpha or r["codec"] == "fp32":
                continue
            out.append(
                {
                    "bench": "vs_fp32",
                    "codec": r["codec"],
                    "dcor": alpha,
                    "bytes_pct_of_fp32": round(100 * r["bytes_per_step"] / ref["bytes_per_step"], 2)
                    if ref["bytes_per_step"]
                    else None,
                    "acc_delta_vs_fp32": round(r["eval_after"] - ref["eval_after"], 4),
                }
            )
    return out


def _table(rows: list[dict[str, Any]], summary: list[dict[str, Any]], header: str) -> str:
    lines = [
        header,
        "",
        "| codec | dCor | bytes/step | up/step | down/step | acc before | acc after | train s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['codec']} | {r['dcor']:g} | {r['bytes_per_step']:,.0f} | {r['bytes_up_per_step']:,.0f} | {r['bytes_down_per_step']:,.0f} | "
            f"{r['eval_before']:.3f} | {r['eval_after']:.3f} | {r['train_s']:.1f} |"
        )
    if summary:
        lines += ["", "| codec | dCor | bytes % of fp32 | acc delta vs fp32 |", "|---|---|---:|---:|"]
        for s in summary:
            lines.append(
                f"| {s['codec']} | {s['dcor']:g} | {s['bytes_pct_of_fp32']:.1f}% | {s['acc_delta_vs_fp32']:+.3f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_defences", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--codecs", default="fp32,fp16,int8,nf4", help="comma-separated codecs (every direction)")
    ap.add_argument("--dcor", default="0,0.5,4", help="comma-separated dCor weights (0: none)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--eval-items", type=int, default=None, help="first N multiple-choice items only (default: all 64)")
    ap.add_argument("--data", default=None, help="training records (default: the shipped demo records)")
    ap.add_argument("--eval-data", default=None, help="evaluation items (default: the shipped demo task)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="runs/bench_defences")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from guardedp2p.engine.loading import load_causal_lm
    from guardedp2p.evaluate.plot import plot_accuracy_vs_bytes

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base, tok = load_causal_lm(args.model, device="cpu")
    for p in base.parameters():
        p.requires_grad_(False)
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    rows = []
    for alpha in _floats(args.dcor):
        for codec in codecs:
            r = run_setting(base, tok, args, codec, alpha, out / "runs")
            rows.append(r)
            print(json.dumps(r), flush=True)
    summary = summarise(rows)
    for s in summary:
        print(json.dumps(s), flush=True)
    header = (
        f"Online, {args.model}, {args.steps} steps, batch {args.batch_size}, eval items {args.eval_items or 'all'}, "
        f"torch threads {torch.get_num_threads()} (python -m benchmarks.bench_defences {' '.join(sys.argv[1:] if argv is None else argv)})"
    )
    (out / "defences.md").write_text(_table(rows, summary, header))
    (out / "defences.json").write_text(json.dumps({"args": vars(args), "rows": rows, "vs_fp32": summary}, indent=2))
    metric = rows[0]["eval_metric"] if rows else "acc"
    png = plot_accuracy_vs_bytes(rows, out / "accuracy_vs_bytes.png", metric=metric)
    print(
        json.dumps(
            {
                "bench": "files",
                "table": str(out / "defences.md"),
                "json": str(out / "defences.json"),
                "plot": str(png),
                "wall_s": round(time.perf_counter() - t0, 1),
            }
        ),
        flush=True,
    )
    return 0 if all(not math.isnan(r["bytes_per_step"]) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
