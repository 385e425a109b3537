"""Fuzz a live provider over real CURVE with mutated frames while a good client keeps training.

Prints JSON lines: frames sent, crashes (the serve thread died or the good client failed) and hangs (a request
with no reply within the timeout). Both must be 0. The good client also takes a training step after the last
mutated frame, so a provider that stopped serving counts as a crash even on a short run.

    python -m benchmarks.bench_fuzz [--frames 100000] [--seconds S] [--good-every 5000]

CI runs a short budget (tests/wire/test_fuzz_bench.py: a few hundred frames).

Chunked tensor frames (issue 19): two seeds carry tensors split into 1 KiB chunks (the ``frames`` counts of
docs/wire.md, section 2), and their mutations also rewrite the frame counts (wrong, zero, negative, not a list,
dropped, added to a tensor that is not chunked), split one chunk in two and merge two neighbours.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=100_000, help="mutated messages to send")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds before a request counts as a hang")
    ap.add_argument("--seconds", type=float, default=0.0, help="stop fuzzing after this many seconds (0: no limit)")
    ap.add_argument("--good-every", type=int, default=5000, help="frames between two steps of the good client")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import logging

    import msgpack

    from guardedp2p.crypto.keys import generate_keypair
    from guardedp2p.designs.online.client import RemoteTrunk
    from guardedp2p.engine.split import loss_fn
    from guardedp2p.errors import TransportError
    from guardedp2p.protocol.client import ClientSession
    from guardedp2p.service.serve import serve_forever
    from guardedp2p.transport.zmq_client import ClientConfig, ZmqClientChannel
    from guardedp2p.transport.zmq_server import ServerConfig, ZmqServerChannel
    from guardedp2p.wire.framing import Message, encode
    from guardedp2p.wire.handshake import Hello
    from guardedp2p.wire.messages import MsgType
    from tests.protocol_helpers import batch, client_parts, provider_app
    from tests.tiny_models import tiny_model

    logging.getLogger("guardedp2p").setLevel(logging.CRITICAL)  # one warning per refused frame otherwise
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="gp2p-fuzz-"))
    for name in ("provider", "good", "fuzzer"):
        generate_keypair(tmp, name)
    model = tiny_model("llama")
    app = provider_app(model)
    server = ZmqServerChannel(
        ServerConfig(
            bind="tcp://127.0.0.1:*",
            secret_key_file=tmp / "provider.key_secret",
            allow=[tmp / "good.key", tmp / "fuzzer.key"],
        )
    )
    stop = threading.Event()
    died: list[BaseException] = []

    def run() -> None:
        try:
            serve_forever(app, server, stop, poll_s=0.05)
        except BaseException as exc:  # noqa: BLE001 - this is what we count
            died.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def channel(who: str) -> ZmqClientChannel:
        return ZmqClientChannel.open(
            ClientConfig(
                connect=server.endpoint,
                provider_public_key=tmp / "provider.key",
                secret_key_file=tmp / f"{who}.key_secret",
            )
        )

    parts, fp = client_parts(model)
    fp32 = {d: "fp32" for d in ("up", "down", "grad_up", "grad_down")}
    good_channel = channel("good")
    good = ClientSession(good_channel, timeout=args.timeout)
    good.open(Hello("online", fp, (2, 2), fp32))
    remote = RemoteTrunk(good, fp32, gradients=True)
    b = batch(model.config.vocab_size)

    # seeds: valid messages of every type, including one for the good client's session (must not be hijackable)
    seeds = [
        encode(Message(MsgType.HELLO, meta=Hello("online", fp, (2, 2), fp32).to_meta())),
        encode(
            Message(
                MsgType.ACT_UP,
                session=good.sid,
                step=10**9,
                meta={"train": True},
                tensors={"h": torch.randn(2, 5, model.config.hidden_size), "mask": torch.ones(2, 5, dtype=torch.int8)},
                codecs={"h": "fp32"},
            )
        ),
        encode(
            Message(
                MsgType.GRAD_UP,
                session=good.sid,
                step=3,
                tensors={"g": torch.randn(2, 5, model.config.hidden_size)},
                codecs={"g": "int8"},
            )
        ),
        encode(Message(MsgType.PING, session="x" * 32, step=1)),
        encode(
            Message(MsgType.CHUNK_REQ, session="", step=2, meta={"file": "../../etc/passwd", "offset": 0, "length": 4})
        ),
    ]
    hidden = model.config.hidden_size
    chunked_seeds = [
        encode(
            Message(
                MsgType.ACT_UP,
                session=good.sid,
                step=10**9 + 1,
                meta={"train": True},
                tensors={"h": torch.randn(2, 16, hidden), "mask": torch.ones(2, 16, dtype=torch.int8)},
                codecs={"h": "fp32"},
            ),
            chunk_bytes=1024,
        ),
        encode(
            Message(
                MsgType.GRAD_UP,
                session=good.sid,
                step=4,
                tensors={"g": torch.randn(2, 16, hidden)},
                codecs={"g": "int8"},
            ),
            chunk_bytes=1024,
        ),
    ]
    seeds = [[bytes(f) for f in s] for s in seeds + chunked_seeds]
    n_plain_seeds = len(seeds) - len(chunked_seeds)

    def mutate_chunks(frames: list[bytes]) -> list[bytes]:
        """Mutations aimed at the chunked layout: frame counts in the header, chunk boundaries."""
        out = list(frames)
        op = rng.random()
        if op < 0.5:
            header = msgpack.unpackb(out[0], raw=False)
            spec = rng.choice(header["tensors"])
            choice = rng.random()
            if choice < 0.2:
                spec.pop("frames", None)
            elif choice < 0.3:
                spec["frames"] = rng.choice(["3", 3, None, True, 2.0, {}])
            else:
                counts = list(spec.get("frames", [1] * len(spec["parts"])))
                if rng.random() < 0.2:
                    counts.append(1)
                elif counts:
                    counts[rng.randrange(len(counts))] = rng.randint(-2, 12)
                spec["frames"] = counts
            out[0] = msgpack.packb(header, use_bin_type=True)
        elif op < 0.75 and len(out) > 1:
            i = rng.randrange(1, len(out))
            if len(out[i]) > 1:
                k = rng.randrange(1, len(out[i]))
                out[i : i + 1] = [out[i][:k], out[i][k:]]
        elif len(out) > 2:
            i = rng.randrange(1, len(out) - 1)
            out[i : i + 2] = [out[i] + out[i + 1]]
        return out

    def mutate(frames: list[bytes]) -> list[bytes]:
        out = [bytearray(f) for f in frames]
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(out))
            op = rng.random()
            f = out[i]
            if op < 0.45 and f:
                f[rng.randrange(len(f))] = rng.randrange(256)
            elif op < 0.6:
                out[i] = f[: rng.randint(0, len(f))]
            elif op < 0.7:
                out[i] = f + bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
            elif op < 0.8 and len(out) > 1:
                out.pop(i)
            elif op < 0.9:
                out.insert(i, bytearray(f))
            else:
                out[i] = bytearray(rng.randrange(256) for _ in range(rng.randint(0, 64)))
        return [bytes(f) for f in out]

    fuzzer = channel("fuzzer")
    hangs = crashes = errors_replied = other_replies = 0
    good_steps = sent = chunked_sent = 0

    def good_step() -> None:
        nonlocal good_steps, crashes
        try:
            h1 = parts.bottom(b["input_ids"], b["attention_mask"])
            loss_fn(parts.top(remote(h1, b["attention_mask"], train=True), b["attention_mask"]), b["labels"]).backward()
            good_steps += 1
        except Exception as exc:  # noqa: BLE001
            crashes += 1
            print(json.dumps({"bench": "fuzz", "good_client_error": str(exc)[:200]}), flush=True)

    t0 = time.perf_counter()
    for i in range(args.frames):
        if args.seconds and time.perf_counter() - t0 > args.seconds:
            break
        k = rng.randrange(len(seeds))
        frames = seeds[k]
        if k >= n_plain_seeds:
            chunked_sent += 1
            if rng.random() < 0.6:
                frames = mutate_chunks(frames)
        fuzzer.send(mutate(frames) if k < n_plain_seeds or rng.random() < 0.5 else frames)
        sent += 1
        try:
            reply = fuzzer.recv(timeout=args.timeout)
            if b"ERROR" in bytes(reply[0])[:64] or b"REJECT" in bytes(reply[0])[:64]:
                errors_replied += 1
            else:
                other_replies += 1
        except TransportError:
            hangs += 1
            fuzzer.close()
            fuzzer = channel("fuzzer")
        if args.good_every > 0 and i % args.good_every == 0:
            good_step()
        if died:
            crashes += 1
            break
    elapsed = time.perf_counter() - t0
    if not died:
        good_step()  # the provider still serves the good client after the last mutated frame
    serving = thread.is_alive() and not died
    good.close()  # BYE while the provider still serves
    stop.set()
    thread.join(timeout=5)
    fuzzer.close()
    good_channel.close()
    server.close()
    shutil.rmtree(tmp, ignore_errors=True)
    print(
        json.dumps(
            {
                "bench": "fuzz",
                "frames": sent,
                "chunked_seed_messages": chunked_sent,
                "crashes": crashes + len(died),
                "hangs": hangs,
                "error_replies": errors_replied,
                "other_replies": other_replies,
                "good_client_steps": good_steps,
                "provider_serving": serving,
                "provider_errors_counted": app.stats["errors"],
                "seconds": round(elapsed, 1),
                "msgs_per_s": round(sent / max(elapsed, 1e-9), 1),
            }
        ),
        flush=True,
    )
    return 0 if not (crashes or died or hangs) and serving else 1


if __name__ == "__main__":
    raise SystemExit(main())
