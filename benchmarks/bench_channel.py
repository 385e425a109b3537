"""Loopback throughput of the ZeroMQ channel: CURVE vs plaintext, one big frame vs 4 MiB chunks.

Run: ``python -m benchmarks.bench_channel [--reps-small 10] [--reps-large 4]``. Prints one JSON object per line:
``{"bench": "channel", ...}`` per measurement and ``{"bench": "channel_ratio", ...}`` per CURVE/plain pair.

Each rep: the client sends the payload (zero copy), a serving thread receives all of it and answers a 3-byte ack;
the time is from the first send to the ack. Throughput is payload MiB / median seconds. Layouts:
``1x``: one message with a single frame; ``frames``: one message of 4 MiB frames;
``msgs``: separate 4 MiB messages (ack after the last). Total runtime stays well under a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
import warnings

import numpy as np

from guardedp2p.crypto.keys import generate_keypair
from guardedp2p.transport.zmq_client import ClientConfig, ZmqClientChannel
from guardedp2p.transport.zmq_server import InsecureTransportWarning, ServerConfig, ZmqServerChannel

MiB = 1 << 20
CHUNK = 4 * MiB


def _serve(server: ZmqServerChannel, stop: threading.Event) -> None:
    """Ack every message whose header says 'last'."""
    while not stop.is_set():
        inc = server.recv(0.05)
        if inc is not None and bytes(inc.frames[0]) == b"last":
            server.send(inc.route, [b"ack"])


def _messages(payload: memoryview, layout: str) -> list[list]:
    if layout == "1x":
        return [[b"last", payload]]
    chunks = [payload[i : i + CHUNK] for i in range(0, payload.nbytes, CHUNK)]
    if layout == "frames":
        return [[b"last", *chunks]]
    return [[b"more", c] for c in chunks[:-1]] + [[b"last", chunks[-1]]]


def _measure(client: ZmqClientChannel, payload: memoryview, layout: str, reps: int) -> list[float]:
    msgs = _messages(payload, layout)
    times = []
    for i in range(reps + 1):  # first rep warms up
        t0 = time.perf_counter()
        for m in msgs:
            client.send(m)
        ack = client.recv(timeout=60.0)
        dt = time.perf_counter() - t0
        assert bytes(ack[0]) == b"ack"
        if i:
            times.append(dt)
    return times


def _channel(mechanism: str, keydir: str) -> tuple[ZmqServerChannel, ZmqClientChannel]:
    if mechanism == "plain":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InsecureTransportWarning)
            srv = ZmqServerChannel(ServerConfig(bind="tcp://127.0.0.1:*", insecure=True))
            cli = ZmqClientChannel.open(ClientConfig(connect=srv.endpoint, insecure=True))
        return srv, cli
    srv = ZmqServerChannel(
        ServerConfig(
            bind="tcp://127.0.0.1:*",
            secret_key_file=f"{keydir}/bench_server.key_secret",
            allow=[f"{keydir}/bench_client.key"],
        )
    )
    cli = ZmqClientChannel.open(
        ClientConfig(
            connect=srv.endpoint,
            provider_public_key=f"{keydir}/bench_server.key",
            secret_key_file=f"{keydir}/bench_client.key_secret",
        )
    )
    return srv, cli


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps-small", type=int, default=10, help="reps for the 4 MiB payload")
    ap.add_argument("--reps-large", type=int, default=4, help="reps for the 64 MiB payload")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    payloads = {4: rng.integers(0, 256, 4 * MiB, dtype=np.uint8), 64: rng.integers(0, 256, 64 * MiB, dtype=np.uint8)}
    cases = [(4, "1x"), (64, "1x"), (64, "frames"), (64, "msgs")]
    results: dict[tuple, float] = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as keydir:
        generate_keypair(keydir, "bench_server")
        generate_keypair(keydir, "bench_client")
        for mechanism in ("curve", "plain"):
            srv, cli = _channel(mechanism, keydir)
            stop = threading.Event()
            t = threading.Thread(target=_serve, args=(srv, stop), daemon=True)
            t.start()
            try:
                for size, layout in cases:
                    reps = args.reps_small if size == 4 else args.reps_large
                    times = _measure(cli, memoryview(payloads[size]), layout, reps)
                    med = statistics.median(times)
                    results[(mechanism, size, layout)] = size / med
                    print(
                        json.dumps(
                            {
                                "bench": "channel",
                                "mechanism": mechanism,
                                "payload_mib": size,
                                "layout": layout if layout == "1x" else f"{layout}:{size // 4}x4MiB",
                                "reps": reps,
                                "median_s": round(med, 4),
                                "min_s": round(min(times), 4),
                                "mib_per_s": round(size / med, 1),
                                "cpus": os.cpu_count(),
                            }
                        ),
                        flush=True,
                    )
            finally:
                stop.set()
                t.join(5)
                cli.close()
                srv.close()
    for size, layout in cases:
        c, p = results[("curve", size, layout)], results[("plain", size, layout)]
        print(
            json.dumps(
                {
                    "bench": "channel_ratio",
                    "payload_mib": size,
                    "layout": layout,
                    "curve_mib_per_s": round(c, 1),
                    "plain_mib_per_s": round(p, 1),
                    "plain_over_curve": round(p / c, 2),
                }
            ),
            flush=True,
        )
    chunk_gain = results[("curve", 64, "msgs")] / results[("curve", 64, "1x")]
    print(
        json.dumps(
            {
                "bench": "channel_summary",
                "curve_64mib_chunked_msgs_over_single": round(chunk_gain, 2),
                "curve_64mib_chunked_frames_over_single": round(
                    results[("curve", 64, "frames")] / results[("curve", 64, "1x")], 2
                ),
                "total_s": round(time.perf_counter() - t_start, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
