"""Aggregate throughput of 1, 2 and 4 concurrent clients on one provider, over CURVE on 127.0.0.1, on the real model.

One provider process (the real ``provider serve``, one torch thread unless ``--provider-threads``) and N client
threads in this process (one torch thread in all), each with its own key, channel, session and copy of the client
parts, training Online and Gradfree (issue 19) on the default model. Settings alternate (protocol x N, repeated
``--repeat`` times) so the load of a shared machine drifts over all of them; medians are reported. Per setting:
aggregate samples/s (steps x batch / wall), per-client step time, what the provider reported computing
(``provider_busy``: its compute-seconds per wall second; a batched call counts once per request in it, so it can
exceed 1), and the CPU the two processes used (``cpu_util``: CPU-seconds per wall second, out of ``os.cpu_count()``), which says
whether the machine, not the protocol, is the limit. Gradfree runs without the trunk-output cache.

    python -m benchmarks.bench_multiclient [--clients 1,2,4] [--protocols online,gradfree] [--steps 4]
        [--repeat 2] [--micro-batches 1] [--model default]

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
import os
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
    ap.add_argument("--steps", type=int, default=4, help="steps per client and setting (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (default 128, --batching 64)")
    ap.add_argument("--protocols", default="online,gradfree", help="designs to measure (clients mode)")
    ap.add_argument("--micro-batches", type=int, default=1, help="clients mode: pipelined steps with N micro-batches")
    ap.add_argument("--provider-threads", type=int, default=1, help="clients mode: torch threads of the provider")
    ap.add_argument(
        "--model",
        default=None,
        help="model folder or 'default' (the default, except with --batching: 'tiny' or 'small', random llamas)",
    )
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
        "--repeat",
        type=int,
        default=None,
        help="runs per setting, alternating settings; medians (default 2, --batching 3)",
    )
    args = ap.parse_args(argv)
    if args.batching:
        args.repeat = args.repeat or 3
        args.seq = args.seq or 64
        return batching_main(args)
    args.repeat = args.repeat or 2
    args.seq = args.seq or 128
    args.model = args.model or "default"
    return clients_main(args)


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc), all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def clients_main(args: argparse.Namespace) -> int:
    """N concurrent training clients per protocol against one provider process; see the module docstring."""
    from benchmarks.bench_online import make_batch
    from guardedp2p.cli.client import client_channel_factory
    from guardedp2p.cli.demo import ProviderProcess, free_port
    from guardedp2p.crypto.keys import generate_keypair
    from guardedp2p.designs.online.client import RemoteTrunk
    from guardedp2p.designs.online.pipeline import PipelineConfig, PipelinedStep
    from guardedp2p.engine.loading import load_causal_lm
    from guardedp2p.engine.split import loss_fn
    from guardedp2p.protocol.client import ClientSession
    from guardedp2p.service.client import TuneOptions, prepare_client
    from guardedp2p.train.config import TrainConfig
    from guardedp2p.train.trainer import SplitTrainer
    from guardedp2p.wire.handshake import Hello

    torch.set_num_threads(1)
    started = time.perf_counter()
    load_before = os.getloadavg()
    counts = [int(c) for c in args.clients.split(",")]
    protocols = [p for p in args.protocols.split(",") if p]
    tmp = Path(tempfile.mkdtemp(prefix="gp2p-bench-mc-"))
    generate_keypair(tmp, "provider")
    allow = tmp / "clients"
    for i in range(max(counts)):
        generate_keypair(allow, f"c{i}")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cfg = TrainConfig(steps=10**6, batch_size=args.batch, lr=1e-4, warmup_steps=0, schedule="constant")
    model, tok = load_causal_lm(args.model)
    bases = {
        p: prepare_client(
            TuneOptions(protocol=p, model=args.model, train=cfg), model=copy.deepcopy(model), tokenizer=tok
        )
        for p in protocols
    }
    del model
    batches = [make_batch(tok, args.batch, args.seq, seed=i) for i in range(4)]
    # every client's parts and session, made once: a setting's wall time is its steps only
    workers: dict[tuple[str, int], Any] = {}

    def worker(p: str, i: int) -> Any:
        key = (p, i)
        if key not in workers:
            mine = copy.deepcopy(bases[p])
            connect = client_channel_factory(endpoint, tmp / "provider.key", allow, f"c{i}", False)
            gradients = p == "online"
            codecs = {d: "fp32" for d in (("up", "down", "grad_up", "grad_down") if gradients else ("up", "down"))}
            session = ClientSession(connect(), timeout=600)
            session.open(Hello(p, mine.fingerprint, (2, 2), codecs))
            remote = RemoteTrunk(session, codecs, gradients=gradients)
            trainer = SplitTrainer(
                mine.bottom,
                mine.top,
                lambda h, m, *, train, input_ids, r=remote: r(h, m, train=train),
                copy.deepcopy(cfg),
                loss_fn=loss_fn,
                train_bottom=gradients,
            )
            if args.micro_batches > 1:
                step = PipelinedStep(remote, PipelineConfig(micro_batches=args.micro_batches))
                workers[key] = (session, lambda b, s=step, t=trainer: s(t, b))
            else:
                workers[key] = (session, trainer.train_step)
        return workers[key]

    def one_client(p: str, i: int, out: list[float], errors: list[str], go: threading.Barrier) -> None:
        try:
            _, step = worker(p, i)
            step([batches[i % 4]])  # warm-up, before the clock starts
        except Exception as exc:  # noqa: BLE001 - reported in the JSON line
            errors.append(f"client {i}: {exc}")
        go.wait()
        try:
            if not errors:
                for k in range(args.steps):
                    t0 = time.perf_counter()
                    step([batches[(i + k) % 4]])
                    out.append(time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"client {i}: {exc}")

    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(args.provider_threads)
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    provider_args = ["--model", args.model, "--bind", endpoint, "--keys", str(tmp), "--name", "provider"]
    provider_args += ["--allow-dir", str(allow)]
    try:
        with ProviderProcess(provider_args, tmp) as provider:
            if env_threads is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = env_threads
            assert provider.proc is not None
            pid = provider.proc.pid
            for rep in range(args.repeat):
                for p in protocols:
                    for n in counts:
                        for session, _ in workers.values():
                            session.ping()  # idle sessions of other settings stay open (provider idle timeout)
                        times: list[list[float]] = [[] for _ in range(n)]
                        errors: list[str] = []
                        go = threading.Barrier(n + 1)
                        threads = [
                            threading.Thread(target=one_client, args=(p, i, times[i], errors, go)) for i in range(n)
                        ]
                        for t in threads:
                            t.start()
                        go.wait()
                        sessions = [worker(p, i)[0] for i in range(n)]
                        prov0 = sum(s.stats.provider_s for s in sessions)
                        cpu0 = time.process_time() + _proc_cpu_s(pid)
                        t0 = time.perf_counter()
                        for t in threads:
                            t.join()
                        wall = time.perf_counter() - t0
                        cpu = time.process_time() + _proc_cpu_s(pid) - cpu0
                        provider_s = sum(s.stats.provider_s for s in sessions) - prov0
                        steps = sum(len(x) for x in times)
                        row = {
                            "bench": "multiclient",
                            "protocol": p,
                            "model": args.model,
                            "clients": n,
                            "micro_batches": args.micro_batches,
                            "repeat": rep,
                            "steps_total": steps,
                            "wall_s": round(wall, 2),
                            "samples_per_s": round(steps * args.batch / wall, 3),
                            "tokens_per_s": round(steps * args.batch * args.seq / wall, 1),
                            "mean_client_step_s": round(statistics.mean(x for t in times for x in t), 3)
                            if steps
                            else None,
                            "provider_compute_s": round(provider_s, 2),
                            "provider_busy": round(provider_s / wall, 3),
                            "cpu_util": round(cpu / wall, 3),
                            "cpus": os.cpu_count(),
                            "loadavg_1min": round(os.getloadavg()[0], 2),
                            "errors": errors,
                        }
                        results.setdefault((p, n), []).append(row)
                        print(json.dumps(row), flush=True)
            for session, _ in workers.values():
                session.close()
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    summary: dict[str, Any] = {
        "bench": "multiclient_summary",
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
    }
    for p in protocols:
        ok = {n: [r for r in results[(p, n)] if not r["errors"]] or results[(p, n)] for n in counts}
        med = {n: statistics.median(r["samples_per_s"] for r in ok[n]) for n in counts}
        summary[p] = {
            "samples_per_s": {str(n): round(v, 3) for n, v in med.items()},
            "speedup_vs_one": {str(n): round(v / med[counts[0]], 3) for n, v in med.items()},
            "provider_busy": {str(n): round(statistics.median(r["provider_busy"] for r in ok[n]), 3) for n in counts},
            "cpu_util": {str(n): round(statistics.median(r["cpu_util"] for r in ok[n]), 3) for n in counts},
            "runs_with_errors": {str(n): sum(1 for r in results[(p, n)] if r["errors"]) for n in counts},
        }
    summary["target"] = "4 clients >= 1.5 x one"
    summary["loadavg_before"] = [round(x, 2) for x in load_before]
    summary["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary), flush=True)
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
