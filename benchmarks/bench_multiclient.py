"""Aggregate provider throughput with 1, 2 and 4 concurrent clients over CURVE on 127.0.0.1.

One provider process (the real ``provider serve``) and N client threads in this process, each with its own
key-authenticated channel, session and copy of the client parts, running Online (or Gradfree) steps. Prints a
JSON line per N: total steps per second and tokens per second through the provider, per-client step time.

    python -m benchmarks.bench_multiclient [--clients 1,2,4] [--steps 10] [--model default]

``--batching`` measures provider-side batching (issue #6) instead: aggregate Gradfree forward throughput for
1, 2 and 4 concurrent clients with ``max_batch`` 1 (off) and 8. The provider runs in this process (serve loop in
a thread, CURVE on 127.0.0.1) on a tiny random llama by default, so it takes seconds; ``--model default`` uses
the real model. Clients send a fixed activation (no client compute), so the numbers are the provider's.

    python -m benchmarks.bench_multiclient --batching [--clients 1,2,4] [--max-batch 1,8] [--requests 100] [--model tiny|small|default]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", default="1,2,4")
    ap.add_argument("--steps", type=int, default=10, help="steps per client")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument(
        "--model",
        default=None,
        help="model folder or 'default' (the default, except with --batching: 'tiny' or 'small', random llamas)",
    )
    ap.add_argument("--protocol", default="online", choices=["online", "gradfree"])
    ap.add_argument(
        "--batching",
        action="store_true",
        help="measure provider batching of gradfree forwards (tiny model unless --model is given)",
    )
    ap.add_argument("--max-batch", default="1,8", help="--batching: provider max_batch values to compare")
    ap.add_argument("--batch-wait-ms", type=float, default=2.0, help="--batching: provider batch_wait")
    ap.add_argument("--requests", type=int, default=100, help="--batching: forward requests per client")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (shared by provider and clients)")
    ap.add_argument(
        "--repeat", type=int, default=3, help="--batching: runs per setting, alternating settings; medians are reported"
    )
    args = ap.parse_args(argv)
    if args.batching:
        return batching_main(args)
    args.model = args.model or "default"

    from benchmarks.bench_online import make_batch
    from guardedp2p.cli.client import client_channel_factory
    from guardedp2p.cli.demo import ProviderProcess, free_port
    from guardedp2p.crypto.keys import generate_keypair
    from guardedp2p.designs.online.client import RemoteTrunk
    from guardedp2p.engine.split import loss_fn
    from guardedp2p.protocol.client import ClientSession
    from guardedp2p.service.client import TuneOptions, prepare_client
    from guardedp2p.train.config import TrainConfig
    from guardedp2p.train.trainer import SplitTrainer
    from guardedp2p.wire.handshake import Hello

    counts = [int(c) for c in args.clients.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="gp2p-bench-mc-"))
    generate_keypair(tmp, "provider")
    allow = tmp / "clients"
    for i in range(max(counts)):
        generate_keypair(allow, f"c{i}")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=1e-4, warmup_steps=0, schedule="constant")
    base = prepare_client(TuneOptions(protocol=args.protocol, model=args.model, train=cfg))
    batch = make_batch(base.tokenizer, args.batch, args.seq)
    codecs = (
        {d: "fp32" for d in ("up", "down", "grad_up", "grad_down")}
        if args.protocol == "online"
        else {"up": "fp32", "down": "fp32"}
    )

    def one_client(i: int, out: list[float], errors: list[str]) -> None:
        try:
            mine = copy.deepcopy(base)
            connect = client_channel_factory(endpoint, tmp / "provider.key", allow, f"c{i}", False)
            session = ClientSession(connect(), timeout=600)
            session.open(Hello(args.protocol, mine.fingerprint, (2, 2), codecs))
            remote = RemoteTrunk(session, codecs, gradients=args.protocol == "online")
            trainer = SplitTrainer(
                mine.bottom,
                mine.top,
                lambda h, m, *, train, input_ids: remote(h, m, train=train),
                cfg,
                loss_fn=loss_fn,
                train_bottom=args.protocol == "online",
            )
            for _ in range(args.steps):
                t0 = time.perf_counter()
                trainer.train_step([batch])
                out.append(time.perf_counter() - t0)
            session.close()
        except Exception as exc:  # noqa: BLE001 - reported in the JSON line
            errors.append(f"client {i}: {exc}")

    torch.set_num_threads(1)
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
            "--allow-dir",
            str(allow),
        ],
        tmp,
    ):
        for n in counts:
            times: list[list[float]] = [[] for _ in range(n)]
            errors: list[str] = []
            threads = [threading.Thread(target=one_client, args=(i, times[i], errors)) for i in range(n)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            steps = sum(len(t) for t in times)
            print(
                json.dumps(
                    {
                        "bench": "multiclient",
                        "protocol": args.protocol,
                        "model": args.model,
                        "clients": n,
                        "steps_total": steps,
                        "wall_s": round(wall, 2),
                        "steps_per_s": round(steps / wall, 3),
                        "tokens_per_s": round(steps * args.batch * args.seq / wall, 1),
                        "mean_client_step_s": round(statistics.mean(x for t in times for x in t), 3) if steps else None,
                        "errors": errors,
                    }
                ),
                flush=True,
            )
    return 0


def batching_main(args: argparse.Namespace) -> int:
    """Aggregate gradfree forward throughput through one provider, with and without provider-side batching."""
    import logging
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from guardedp2p.crypto.keys import generate_keypair
    from guardedp2p.designs.online.client import RemoteTrunk
    from guardedp2p.engine.fingerprint import model_fingerprint
    from guardedp2p.engine.split import SplitConfig
    from guardedp2p.protocol.client import ClientSession
    from guardedp2p.protocol.provider import ProviderConfig
    from guardedp2p.service.provider import ProviderOptions, build_provider_app
    from guardedp2p.service.serve import serve_forever
    from guardedp2p.transport.zmq_client import ClientConfig, ZmqClientChannel
    from guardedp2p.transport.zmq_server import ServerConfig, ZmqServerChannel
    from guardedp2p.wire.handshake import Hello

    logging.getLogger("guardedp2p").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    model_name = args.model or "tiny"
    if model_name == "tiny":
        from tests.tiny_models import tiny_model

        model = tiny_model("llama")
    elif model_name == "small":  # random llama whose trunk costs more than the messaging around it
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=256,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=512,
        )
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    else:
        from guardedp2p.engine.loading import load_causal_lm

        model, _ = load_causal_lm(model_name, device="cpu")
    split = SplitConfig(bottom_layers=2, top_layers=2)
    fp = model_fingerprint(model, split)
    hidden = int(model.config.hidden_size)
    counts = [int(c) for c in args.clients.split(",")]
    max_batches = [int(b) for b in args.max_batch.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="gp2p-bench-batching-"))
    generate_keypair(tmp, "provider")
    for i in range(max(counts)):
        generate_keypair(tmp / "clients", f"c{i}")
    codecs = {"up": "fp32", "down": "fp32"}
    g = torch.Generator().manual_seed(0)
    h1 = torch.randn(args.batch, args.seq, hidden, generator=g)
    mask = torch.ones(args.batch, args.seq, dtype=torch.long)
    results: dict[tuple[int, int], list[float]] = {}

    def run_once(app: Any, server: Any, mb: int, n: int, rep: int) -> None:
        """``n`` client threads, each ``args.requests`` forwards once all are connected; one JSON line."""
        latencies: list[list[float]] = [[] for _ in range(n)]
        errors: list[str] = []
        ready = threading.Barrier(n + 1)
        done = threading.Barrier(n + 1)

        def one_client(i: int) -> None:
            session = None
            try:
                channel = ZmqClientChannel.open(
                    ClientConfig(
                        connect=server.endpoint,
                        provider_public_key=tmp / "provider.key",
                        secret_key_file=tmp / "clients" / f"c{i}.key_secret",
                    )
                )
                session = ClientSession(channel, timeout=600)
                session.open(Hello("gradfree", fp, (2, 2), codecs))
                remote = RemoteTrunk(session, codecs, gradients=False)
                remote(h1, mask, train=False)  # warm-up
            except Exception as exc:  # noqa: BLE001 - reported in the JSON line
                errors.append(f"client {i}: {exc}")
            ready.wait()
            try:
                if session is not None and not errors:
                    for _ in range(args.requests):
                        t0 = time.perf_counter()
                        remote(h1, mask, train=False)
                        latencies[i].append(time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"client {i}: {exc}")
            done.wait()
            if session is not None:
                session.close()
                session.channel.close()

        threads = [threading.Thread(target=one_client, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        calls0, batched0 = app.stats["batched_calls"], app.stats["batched_requests"]
        ready.wait()
        t0 = time.perf_counter()
        done.wait()
        wall = time.perf_counter() - t0
        for t in threads:
            t.join()
        reqs = sum(len(x) for x in latencies)
        results.setdefault((mb, n), []).append(reqs / wall)
        print(
            json.dumps(
                {
                    "bench": "batching",
                    "model": model_name,
                    "max_batch": mb,
                    "batch_wait_ms": args.batch_wait_ms,
                    "clients": n,
                    "repeat": rep,
                    "requests_total": reqs,
                    "wall_s": round(wall, 3),
                    "requests_per_s": round(reqs / wall, 2),
                    "tokens_per_s": round(reqs * args.batch * args.seq / wall, 1),
                    "mean_latency_ms": round(1000 * statistics.mean(x for t in latencies for x in t), 2)
                    if reqs
                    else None,
                    "batched_calls": app.stats["batched_calls"] - calls0,
                    "batched_requests": app.stats["batched_requests"] - batched0,
                    "batch": args.batch,
                    "seq": args.seq,
                    "torch_threads": torch.get_num_threads(),
                    "errors": errors,
                }
            ),
            flush=True,
        )

    # one provider per max_batch, all serving at once; the runs alternate between them, so the slow drift of a
    # shared machine's load hits every setting alike (only one provider is busy at a time)
    providers: list[tuple[int, Any, Any, threading.Event, threading.Thread]] = []
    try:
        for mb in max_batches:
            config = ProviderConfig(max_batch=mb, batch_wait_s=args.batch_wait_ms / 1000.0)
            app = build_provider_app(
                ProviderOptions(model=model_name, protocols=("gradfree",), device="cpu", config=config),
                model=copy.deepcopy(model),
            )
            server = ZmqServerChannel(
                ServerConfig(
                    bind="tcp://127.0.0.1:*", secret_key_file=tmp / "provider.key_secret", allow_dirs=[tmp / "clients"]
                )
            )
            stop = threading.Event()
            serving = threading.Thread(
                target=serve_forever, args=(app, server, stop), kwargs={"poll_s": 0.05}, daemon=True
            )
            serving.start()
            providers.append((mb, app, server, stop, serving))
        for n in counts:
            for rep in range(args.repeat):
                for mb, app, server, _, _ in providers:
                    run_once(app, server, mb, n, rep)
    finally:
        for _, _, server, stop, serving in providers:
            stop.set()
            serving.join(timeout=10)
            server.close()
    medians = {k: statistics.median(v) for k, v in results.items()}
    for (mb, n), v in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(
            json.dumps(
                {
                    "bench": "batching_median",
                    "model": model_name,
                    "max_batch": mb,
                    "clients": n,
                    "repeats": len(v),
                    "requests_per_s": round(medians[(mb, n)], 2),
                    "tokens_per_s": round(medians[(mb, n)] * args.batch * args.seq, 1),
                }
            ),
            flush=True,
        )
    if 1 in max_batches and len(max_batches) > 1:
        best = max(max_batches)
        print(
            json.dumps(
                {
                    "bench": "batching_summary",
                    "model": model_name,
                    "max_batch": best,
                    "throughput_ratio_vs_unbatched": {
                        str(n): round(medians[(best, n)] / medians[(1, n)], 3)
                        for n in counts
                        if (1, n) in medians and (best, n) in medians
                    },
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
