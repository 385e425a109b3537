"""Aggregate provider throughput with 1, 2 and 4 concurrent clients over CURVE on 127.0.0.1.

One provider process (the real ``provider serve``) and N client threads in this process, each with its own
key-authenticated channel, session and copy of the client parts, running Online (or Gradfree) steps. Prints a
JSON line per N: total steps per second and tokens per second through the provider, per-client step time.

    python -m benchmarks.bench_multiclient [--clients 1,2,4] [--steps 10] [--model default]
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

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", default="1,2,4")
    ap.add_argument("--steps", type=int, default=10, help="steps per client")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--model", default="default")
    ap.add_argument("--protocol", default="online", choices=["online", "gradfree"])
    args = ap.parse_args(argv)

    from benchmarks.bench_online import make_batch
    from guardedp2p.cli.client import client_channel_factory
    from guardedp2p.cli.demo import ProviderProcess, free_port
    from guardedp2p.engine.split import loss_fn
    from guardedp2p.handshake import Hello
    from guardedp2p.keys import generate_keypair
    from guardedp2p.protocols.client_session import ClientSession
    from guardedp2p.protocols.online import RemoteTrunk
    from guardedp2p.service.client import TuneOptions, prepare_client
    from guardedp2p.train.config import TrainConfig
    from guardedp2p.train.trainer import SplitTrainer

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
    codecs = {d: "fp32" for d in ("up", "down", "grad_up", "grad_down")} if args.protocol == "online" else {"up": "fp32", "down": "fp32"}

    def one_client(i: int, out: list[float], errors: list[str]) -> None:
        try:
            mine = copy.deepcopy(base)
            connect = client_channel_factory(endpoint, tmp / "provider.key", allow, f"c{i}", False)
            session = ClientSession(connect(), timeout=600)
            session.open(Hello(args.protocol, mine.fingerprint, (2, 2), codecs))
            remote = RemoteTrunk(session, codecs, gradients=args.protocol == "online")
            trainer = SplitTrainer(mine.bottom, mine.top, lambda h, m, *, train, input_ids: remote(h, m, train=train), cfg, loss_fn=loss_fn,
                                   train_bottom=args.protocol == "online")
            for _ in range(args.steps):
                t0 = time.perf_counter()
                trainer.train_step([batch])
                out.append(time.perf_counter() - t0)
            session.close()
        except Exception as exc:  # noqa: BLE001 - reported in the JSON line
            errors.append(f"client {i}: {exc}")

    torch.set_num_threads(1)
    with ProviderProcess(["--model", args.model, "--bind", endpoint, "--keys", str(tmp), "--name", "provider", "--allow-dir", str(allow)], tmp):
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
            print(json.dumps({
                "bench": "multiclient", "protocol": args.protocol, "model": args.model, "clients": n, "steps_total": steps,
                "wall_s": round(wall, 2), "steps_per_s": round(steps / wall, 3), "tokens_per_s": round(steps * args.batch * args.seq / wall, 1),
                "mean_client_step_s": round(statistics.mean(x for t in times for x in t), 3) if steps else None, "errors": errors,
            }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
