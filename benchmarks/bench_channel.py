"""Loopback throughput of the ZeroMQ channel: CURVE vs plaintext, one big frame vs 4 MiB chunks.

Run: ``python -m benchmarks.bench_channel [--reps-small 10] [--reps-large 4]``. Prints one JSON object per line:
``{"bench": "channel", ...}`` per measurement and ``{"bench": "channel_ratio", ...}`` per CURVE/plain pair.

Each rep: the client sends the payload (zero copy), a serving thread receives all of it and answers a 3-byte ack;
the time is from the first send to the ack. Throughput is payload MiB / median seconds. Layouts:
``1x``: one message with a single frame; ``frames``: one message of 4 MiB frames;
``msgs``: separate 4 MiB messages (ack after the last). Total runtime stays well under a minute.

``--wire`` (issue 19) measures the real wire path instead: ``wire.framing.encode`` of an ACT_UP carrying one
float32 activation tensor (default 256 MiB: batch 8 x 2,048 tokens x hidden 4,096, a 7B model's), sent through
``ZmqClientChannel``, received by ``ZmqServerChannel`` and ``wire.framing.decode``-d by the serving thread, which
then acks; the time is from the start of encoding to the ack. Chunk sizes (KiB, ``none`` = one frame per part)
and the two mechanisms alternate within each rep, so a shared machine's load drifts over all of them alike.

    python -m benchmarks.bench_channel --wire [--size-mib 256] [--chunks none,256,1024,4096] [--reps 5]

Prints ``{"bench": "channel_wire", ...}`` per (mechanism, chunk) with the median and best MiB/s, then
``channel_wire_ratio`` lines (CURVE / plaintext with the same framing) and the load average before and after.
``cpu_s`` is the CPU time of the whole process (client, serving thread and both ZeroMQ I/O threads) per transfer:
on a loaded machine it says more about the cost than the wall time does.
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
import torch

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


def _serve_wire(server: ZmqServerChannel, stop: threading.Event, decode_s: list[float]) -> None:
    """Decode every message with the real decoder (default limits) and ack it."""
    from guardedp2p.wire.framing import decode

    while not stop.is_set():
        inc = server.recv(0.05)
        if inc is None:
            continue
        t0 = time.perf_counter()
        msg = decode(inc.frames)
        decode_s.append(time.perf_counter() - t0)
        assert msg.tensors["h"].dtype == torch.float32
        del msg
        server.send(inc.route, [b"ack"])


def wire_main(args: argparse.Namespace) -> None:
    """The ``--wire`` mode: encode -> ZeroMQ (CURVE / plaintext) -> decode, per chunk size; see the docstring."""
    from guardedp2p.wire.framing import Message, encode
    from guardedp2p.wire.messages import MsgType

    torch.set_num_threads(1)
    hidden = 4096
    rows = max(1, args.size_mib * MiB // (4 * hidden * 8))
    h = torch.randn(8, rows, hidden, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(8, rows, dtype=torch.int8)
    size_mib = h.numel() * 4 / MiB
    chunks: list[int | None] = [None if c == "none" else int(c) * 1024 for c in args.chunks.split(",")]
    mechanisms = ("curve", "plain")
    times: dict[tuple[str, int | None], list[float]] = {}
    encode_s: dict[tuple[str, int | None], list[float]] = {}
    cpu_s: dict[tuple[str, int | None], list[float]] = {}  # CPU of every thread of the process (both ends)
    decodes: dict[str, list[float]] = {m: [] for m in mechanisms}
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as keydir:
        generate_keypair(keydir, "bench_server")
        generate_keypair(keydir, "bench_client")
        live = {}
        for mechanism in mechanisms:
            srv, cli = _channel(mechanism, keydir)
            stop = threading.Event()
            t = threading.Thread(target=_serve_wire, args=(srv, stop, decodes[mechanism]), daemon=True)
            t.start()
            live[mechanism] = (srv, cli, stop, t)
        try:
            for rep in range(args.reps + 1):  # rep 0 warms up
                for chunk in chunks:
                    for mechanism in mechanisms:
                        cli = live[mechanism][1]
                        msg = Message(MsgType.ACT_UP, session="b" * 32, step=rep + 1, tensors={"h": h, "mask": mask})
                        c0 = time.process_time()
                        t0 = time.perf_counter()
                        frames = encode(msg, chunk_bytes=chunk)
                        t1 = time.perf_counter()
                        cli.send(frames)
                        ack = cli.recv(timeout=120.0)
                        dt = time.perf_counter() - t0
                        cpu = time.process_time() - c0
                        assert bytes(ack[0]) == b"ack"
                        del frames
                        if rep:
                            cpu_s.setdefault((mechanism, chunk), []).append(cpu)
                            times.setdefault((mechanism, chunk), []).append(dt)
                            encode_s.setdefault((mechanism, chunk), []).append(t1 - t0)
        finally:
            for srv, cli, stop, t in live.values():
                stop.set()
                t.join(5)
                cli.close()
                srv.close()
    rates: dict[tuple[str, int | None], float] = {}
    for (mechanism, chunk), ts in times.items():
        med = statistics.median(ts)
        rates[(mechanism, chunk)] = size_mib / med
        print(
            json.dumps(
                {
                    "bench": "channel_wire",
                    "mechanism": mechanism,
                    "tensor_mib": round(size_mib, 1),
                    "chunk_kib": None if chunk is None else chunk // 1024,
                    "frames": 1 + (1 if chunk is None else -(-h.numel() * 4 // chunk)) + 1,
                    "reps": len(ts),
                    "median_s": round(med, 4),
                    "best_s": round(min(ts), 4),
                    "mib_per_s": round(size_mib / med, 1),
                    "best_mib_per_s": round(size_mib / min(ts), 1),
                    "encode_ms": round(1000 * statistics.median(encode_s[(mechanism, chunk)]), 2),
                    "cpu_s": round(statistics.median(cpu_s[(mechanism, chunk)]), 4),
                    "mib_per_cpu_s": round(size_mib / statistics.median(cpu_s[(mechanism, chunk)]), 1),
                    "cpus": os.cpu_count(),
                }
            ),
            flush=True,
        )
    for chunk in chunks:
        c, p = rates[("curve", chunk)], rates[("plain", chunk)]
        print(
            json.dumps(
                {
                    "bench": "channel_wire_ratio",
                    "tensor_mib": round(size_mib, 1),
                    "chunk_kib": None if chunk is None else chunk // 1024,
                    "curve_mib_per_s": round(c, 1),
                    "plain_mib_per_s": round(p, 1),
                    "curve_over_plain": round(c / p, 3),
                    "best_curve_over_best_plain": round(min(times[("plain", chunk)]) / min(times[("curve", chunk)]), 3),
                    "curve_over_plain_by_cpu": round(
                        statistics.median(cpu_s[("plain", chunk)]) / statistics.median(cpu_s[("curve", chunk)]), 3
                    ),
                }
            ),
            flush=True,
        )
    print(
        json.dumps(
            {
                "bench": "channel_wire_summary",
                "decode_ms_median": {m: round(1000 * statistics.median(v), 1) for m, v in decodes.items() if v},
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                "total_s": round(time.perf_counter() - t_start, 1),
            }
        ),
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps-small", type=int, default=10, help="reps for the 4 MiB payload")
    ap.add_argument("--reps-large", type=int, default=4, help="reps for the 64 MiB payload")
    ap.add_argument("--wire", action="store_true", help="measure encode -> channel -> decode per chunk size")
    ap.add_argument("--size-mib", type=int, default=256, help="--wire: activation tensor size in MiB")
    ap.add_argument("--chunks", default="none,256,1024,4096", help="--wire: chunk sizes in KiB ('none': one frame)")
    ap.add_argument("--reps", type=int, default=5, help="--wire: measured reps (after one warm-up)")
    args = ap.parse_args(argv)
    if args.wire:
        wire_main(args)
        return

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
