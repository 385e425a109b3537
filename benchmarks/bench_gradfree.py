"""Gradfree vs Online fp32 vs a local unsplit LoRA step, in one run: step time, bytes per step, eval accuracy.

The provider runs as a separate process over CURVE on 127.0.0.1 (the deployment path, as in
``bench_online``); the client runs ``tune`` for Gradfree (fp32, then nf4 up/down) and Online (fp32) against
it, each for the same number of steps from the same pre-trained model, data order and seed. Then the unsplit
model with LoRA on the same four client blocks (PEFT, ``layers_to_transform``) trains locally on the same
batches with the same optimiser and schedule. Every run is evaluated on the demo multiple-choice task before
and after. Prints JSON lines, the last ones comparing the designs:

* Gradfree step time / Online step time and / local step time;
* Gradfree bytes per step (fp32 and nf4) as % of Online fp32;
* eval accuracy after the same number of steps, for each.

    python -m benchmarks.bench_gradfree [--steps 60] [--eval-items 32] [--transport zmq|inproc]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _train_config(args: argparse.Namespace) -> Any:
    from guardedp2p.train.config import TrainConfig

    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        max_length=args.max_length,
        warmup_steps=min(5, args.steps // 5),
        checkpoint_every=0,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
    )


def run_remote(
    args: argparse.Namespace, base: Any, tok: Any, protocol: str, codec: str, connect: Any, out: Path
) -> dict[str, Any]:
    from guardedp2p.service.client import TuneOptions, prepare_client, tune
    from guardedp2p.wire.handshake import CODEC_DIRECTIONS

    opts = TuneOptions(
        protocol=protocol,
        model=args.model,
        data=args.data,
        eval_data=args.eval_data,
        out=str(out / f"{protocol}-{codec}"),
        train=_train_config(args),
        codecs={d: codec for d in CODEC_DIRECTIONS},
        device="cpu",
        eval_max_items=args.eval_items,
        progress=False,
        retries=0,
        timeout=300.0,
    )
    client = prepare_client(opts, model=copy.deepcopy(base), tokenizer=tok)
    s = tune(opts, connect, client=client)
    steps = max(1, s["steps"])
    return {
        "bench": "design",
        "design": protocol,
        "codec": codec,
        "steps": s["steps"],
        "mean_step_s": round(s["train_s"] / steps, 4),
        "bytes_per_step": round(s["bytes_per_step"], 1),
        "gradient_bytes": s["gradient_bytes"],
        "eval_metric": s["eval_metric"],
        "eval_before": s["eval_before"],
        "eval_after": s["eval_after"],
        "loss_first": s["loss_first"],
        "loss_last": s["loss_last"],
        "time_split": s["time_split"],
        "trainable_params": sum(
            p.numel() for part in (client.bottom, client.top) for p in part.parameters() if p.requires_grad
        ),
        **({k: s[k] for k in ("cache_hits", "cache_misses") if k in s}),
    }


def run_local(args: argparse.Namespace, base: Any, tok: Any) -> dict[str, Any]:
    """Unsplit model + PEFT LoRA on the client's four blocks; the same batches, optimiser, schedule and clipping."""
    from peft import LoraConfig, get_peft_model

    from guardedp2p.data.collate import BatchIterator
    from guardedp2p.designs.offline.plugin import logits_fn_of
    from guardedp2p.engine.arch import get_arch
    from guardedp2p.engine.split import loss_fn
    from guardedp2p.evaluate.grid import primary_metric
    from guardedp2p.service.client import TuneOptions, prepare_data
    from guardedp2p.train.trainer import lr_lambda

    cfg = _train_config(args)
    opts = TuneOptions(
        model=args.model, data=args.data, eval_data=args.eval_data, train=cfg, eval_max_items=args.eval_items
    )
    data = prepare_data(opts, tok)
    model = copy.deepcopy(base)
    n = model.config.num_hidden_layers
    layers = [0, 1, n - 2, n - 1]
    torch.manual_seed(cfg.seed)
    lmodel = get_peft_model(
        model,
        LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(get_arch(model).lora_targets),
            layers_to_transform=layers,
        ),
    )
    params = [p for p in lmodel.parameters() if p.requires_grad]
    before = primary_metric(logits_fn_of(lmodel), data, tok, opts.eval_batch_size, cfg.max_length)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    it = BatchIterator(data.train_examples, cfg.batch_size, seed=cfg.seed, pad_id=tok.pad_token_id)
    times, losses = [], []
    for _ in range(cfg.steps):
        b = next(it)
        t0 = time.perf_counter()
        lmodel.train()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(lmodel(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    after = primary_metric(logits_fn_of(lmodel), data, tok, opts.eval_batch_size, cfg.max_length)
    return {
        "bench": "design",
        "design": "local_lora",
        "codec": "-",
        "steps": cfg.steps,
        "mean_step_s": round(statistics.mean(times), 4),
        "median_step_s": round(statistics.median(times), 4),
        "bytes_per_step": 0,
        "gradient_bytes": 0,
        "eval_metric": "acc" if data.eval_kind == "mc" else "loss",
        "eval_before": before,
        "eval_after": after,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "trainable_params": sum(p.numel() for p in params),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_gradfree", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--eval-items", type=int, default=None, help="first N multiple-choice items only (default: all 64)")
    ap.add_argument("--data", default=None)
    ap.add_argument("--eval-data", default=None)
    ap.add_argument(
        "--transport",
        choices=["zmq", "inproc"],
        default="zmq",
        help="zmq: provider subprocess over CURVE; inproc: same process",
    )
    ap.add_argument("--no-nf4", action="store_true", help="skip the Gradfree nf4 run")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="keep run outputs here (default: a temporary folder)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from guardedp2p.engine.loading import load_causal_lm

    t_all = time.perf_counter()
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gp2p-bench-gradfree-"))
    work.mkdir(parents=True, exist_ok=True)
    base, tok = load_causal_lm(args.model, device="cpu")
    for p in base.parameters():
        p.requires_grad_(False)
    settings = [("gradfree", "fp32")] + ([] if args.no_nf4 else [("gradfree", "nf4")]) + [("online", "fp32")]
    results: list[dict[str, Any]] = []

    def run_all(connect: Any) -> None:
        for protocol, codec in settings:
            r = run_remote(args, base, tok, protocol, codec, connect, work)
            r["transport"] = args.transport
            results.append(r)
            print(json.dumps(r), flush=True)
            gc.collect()

    if args.transport == "inproc":
        from guardedp2p.service.provider import ProviderOptions, build_provider_app
        from guardedp2p.transport.inproc import InProcClientChannel

        app = build_provider_app(
            ProviderOptions(model=args.model, protocols=("online", "gradfree"), device="cpu"), model=copy.deepcopy(base)
        )
        run_all(lambda: InProcClientChannel(app))
        del app
    else:
        from guardedp2p.cli.client import client_channel_factory
        from guardedp2p.cli.demo import ProviderProcess, free_port
        from guardedp2p.crypto.keys import generate_keypair

        keys = work / "keys"
        generate_keypair(keys, "provider", force=True)
        generate_keypair(keys, "client", force=True)
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        with ProviderProcess(
            [
                "--model",
                args.model,
                "--bind",
                endpoint,
                "--keys",
                str(keys),
                "--name",
                "provider",
                "--allow",
                str(keys / "client.key"),
            ],
            work,
        ):
            run_all(client_channel_factory(endpoint, keys / "provider.key", keys, "client", False))
    local = run_local(args, base, tok)
    results.append(local)
    print(json.dumps(local), flush=True)

    by = {(r["design"], r["codec"]): r for r in results}
    gf, on = by[("gradfree", "fp32")], by[("online", "fp32")]
    cmp: dict[str, Any] = {
        "bench": "gradfree_vs",
        "steps": args.steps,
        "transport": args.transport,
        "torch_threads": torch.get_num_threads(),
        "gradfree_step_over_online": round(gf["mean_step_s"] / on["mean_step_s"], 3),
        "gradfree_step_over_local": round(gf["mean_step_s"] / local["mean_step_s"], 3),
        "online_step_over_local": round(on["mean_step_s"] / local["mean_step_s"], 3),
        "gradfree_fp32_bytes_pct_of_online_fp32": round(100 * gf["bytes_per_step"] / on["bytes_per_step"], 2),
        "acc_after": {
            "gradfree_fp32": gf["eval_after"],
            "online_fp32": on["eval_after"],
            "local_lora": local["eval_after"],
        },
        "acc_before": on["eval_before"],
        "wall_s": round(time.perf_counter() - t_all, 1),
    }
    if ("gradfree", "nf4") in by:
        nf = by[("gradfree", "nf4")]
        cmp["gradfree_nf4_bytes_pct_of_online_fp32"] = round(100 * nf["bytes_per_step"] / on["bytes_per_step"], 2)
        cmp["acc_after"]["gradfree_nf4"] = nf["eval_after"]
    print(json.dumps(cmp), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
