"""Online step time vs a local unsplit LoRA step, on the embedded SmolLM2 (batch 4, seq 128), in one run.

The provider runs as a separate process over CURVE on 127.0.0.1 (the real deployment path); the client
trains in this process. Then the same number of local steps of the unsplit model with LoRA on the same
layers. Prints JSON lines: per-design mean step time, the ratio, and the time split (client compute, provider
compute, serialisation, wire), plus the client's resident memory against a full local fine-tune.

    python -m benchmarks.bench_online [--steps 20] [--model default] [--codec fp32]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_probe(kind: str, model_name: str, batch: int, seq: int) -> dict:
    """Run in a fresh process: resident memory of the client's parts vs the full model, after one training step."""
    from guardedp2p.engine.split import loss_fn

    if kind == "client":
        from guardedp2p.service.client import TuneOptions, prepare_client

        client = prepare_client(TuneOptions(model=model_name))
        b = make_batch(client.tokenizer, batch, seq)
        h1 = client.bottom(b["input_ids"], b["attention_mask"])
        loss_fn(client.top(h1, b["attention_mask"]), b["labels"]).backward()  # trunk output stands in: same shapes
    else:
        from peft import LoraConfig, get_peft_model

        from guardedp2p.engine.loading import load_causal_lm

        model, tok = load_causal_lm(model_name)
        b = make_batch(tok, batch, seq)
        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        )
        model(**b).loss.backward()
    gc.collect()
    return {"kind": kind, "rss_mib": round(_status("VmRSS"), 1), "peak_rss_mib": round(_status("VmHWM"), 1)}


def make_batch(tok, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, tok.vocab_size - 1, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--model", default="default")
    ap.add_argument("--codec", default="fp32", help="codec for every direction")
    ap.add_argument("--protocol", default="online", choices=["online", "gradfree"])
    ap.add_argument("--probe", choices=["client", "full"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        print(json.dumps(memory_probe(args.probe, args.model, args.batch, args.seq)))
        return 0

    from guardedp2p.cli.client import client_channel_factory
    from guardedp2p.cli.demo import ProviderProcess, free_port
    from guardedp2p.crypto.keys import generate_keypair
    from guardedp2p.designs.online.client import RemoteTrunk
    from guardedp2p.engine.loading import load_causal_lm
    from guardedp2p.engine.split import loss_fn
    from guardedp2p.protocol.client import ClientSession
    from guardedp2p.service.client import TuneOptions, prepare_client
    from guardedp2p.train.config import TrainConfig
    from guardedp2p.train.trainer import SplitTrainer
    from guardedp2p.wire.handshake import Hello

    tmp = Path(tempfile.mkdtemp(prefix="gp2p-bench-online-"))
    generate_keypair(tmp, "provider")
    generate_keypair(tmp, "client")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cfg = TrainConfig(
        steps=args.steps + args.warmup, batch_size=args.batch, lr=1e-4, warmup_steps=0, schedule="constant"
    )
    opts = TuneOptions(
        protocol=args.protocol,
        model=args.model,
        train=cfg,
        codecs={d: args.codec for d in ("up", "down", "grad_up", "grad_down")},
    )
    client = prepare_client(opts)
    gc.collect()
    batch = make_batch(client.tokenizer, args.batch, args.seq)
    results: list[dict] = []
    with ProviderProcess(
        [
            "--model",
            args.model,
            "--bind",
            endpoint,
            "--keys",
            str(tmp),
            "--name",
            "provider",
            "--allow",
            str(tmp / "client.key"),
        ],
        tmp,
    ):
        session = ClientSession(
            client_channel_factory(endpoint, tmp / "provider.key", tmp, "client", False)(), timeout=300
        )
        codecs = opts.codecs if args.protocol == "online" else {k: args.codec for k in ("up", "down")}
        session.open(Hello(args.protocol, client.fingerprint, (2, 2), codecs))
        remote = RemoteTrunk(session, codecs, gradients=args.protocol == "online")
        trainer = SplitTrainer(
            client.bottom,
            client.top,
            lambda h, m, *, train, input_ids: remote(h, m, train=train),
            cfg,
            loss_fn=loss_fn,
            train_bottom=args.protocol == "online",
        )
        times, splits = [], []
        for i in range(args.steps + args.warmup):
            s = session.stats
            w0, c0, p0, u0, d0 = s.wait_s, s.codec_s, s.provider_s, s.total_up, s.total_down
            t0 = time.perf_counter()
            trainer.train_step([batch])
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times.append(dt)
                splits.append(
                    {
                        "wait": s.wait_s - w0,
                        "codec": s.codec_s - c0,
                        "provider": s.provider_s - p0,
                        "bytes": s.total_up - u0 + s.total_down - d0,
                    }
                )
        session.close()
    split_mean = {k: statistics.mean(x[k] for x in splits) for k in splits[0]}
    step = statistics.mean(times)
    results.append(
        {
            "bench": "online_step",
            "protocol": args.protocol,
            "codec": args.codec,
            "model": args.model,
            "batch": args.batch,
            "seq": args.seq,
            "steps": args.steps,
            "mean_step_s": round(step, 4),
            "median_step_s": round(statistics.median(times), 4),
            "client_compute_s": round(step - split_mean["wait"] - split_mean["codec"], 4),
            "provider_compute_s": round(split_mean["provider"], 4),
            "serialisation_s": round(split_mean["codec"], 4),
            "wire_s": round(split_mean["wait"] - split_mean["provider"], 4),
            "bytes_per_step": int(split_mean["bytes"]),
        }
    )
    del trainer, client
    gc.collect()

    # local unsplit LoRA on the same layers, same batch
    model, tok = load_causal_lm(args.model)
    n = model.config.num_hidden_layers
    parts_layers = [0, 1, n - 2, n - 1]
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lmodel = get_peft_model(
        model,
        LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            layers_to_transform=parts_layers,
        ),
    )
    opt = torch.optim.AdamW([p for p in lmodel.parameters() if p.requires_grad], lr=1e-4)
    ltimes = []
    for i in range(args.steps + args.warmup):
        t0 = time.perf_counter()
        opt.zero_grad()
        out = lmodel(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        opt.step()
        if i >= args.warmup:
            ltimes.append(time.perf_counter() - t0)
    local = statistics.mean(ltimes)
    results.append(
        {
            "bench": "local_lora_step",
            "model": args.model,
            "batch": args.batch,
            "seq": args.seq,
            "steps": args.steps,
            "mean_step_s": round(local, 4),
            "median_step_s": round(statistics.median(ltimes), 4),
        }
    )
    results.append(
        {
            "bench": "online_vs_local",
            "protocol": args.protocol,
            "codec": args.codec,
            "ratio": round(step / local, 3),
            "target": "<= 1.15",
        }
    )
    import subprocess
    import sys

    probes = {}
    for kind in ("client", "full"):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.bench_online",
                "--probe",
                kind,
                "--model",
                args.model,
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        probes[kind] = json.loads(out.strip().splitlines()[-1])
    results.append(
        {
            "bench": "client_memory",
            "note": "fresh process each, after one training step; peak includes loading the full checkpoint before splitting",
            "client_rss_mib": probes["client"]["rss_mib"],
            "client_peak_mib": probes["client"]["peak_rss_mib"],
            "full_finetune_rss_mib": probes["full"]["rss_mib"],
            "full_finetune_peak_mib": probes["full"]["peak_rss_mib"],
        }
    )
    for r in results:
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
