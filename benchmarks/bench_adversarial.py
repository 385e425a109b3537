"""One honest client trains while one hostile client attacks the provider (issue 20; SECURITY.md "Budgets").

For each attack a fresh ``provider serve`` process (CURVE on 127.0.0.1, every design served) is started; the
honest client (this process, Online, ``--batch`` x ``--seq`` tokens per step, the client defaults 4 x 128) trains ``--steps`` steps while the
hostile client (another process, a raw ZeroMQ DEALER with its own allowed key) runs the attack the whole time, and
a third allowed key PINGs every 100 ms. Then the provider gets SIGTERM *while the attack still runs*. Per attack it
prints one JSON line and writes ``--out``:

* ``honest_p50_s`` / ``honest_p99_s`` and ``honest_p99_ratio`` (p99 over the solo run's p99: goal <= 2), and the
  same for ``honest_wait_*``, the part of each step spent waiting for the provider's replies (on a shared machine
  the client's own compute also slows while the provider is busy, which is not the provider's doing);
* ``ping_p99_ms``: another client's control message during the attack (goal: <= 100 ms);
* ``provider_peak_rss_mib`` (VmHWM of the provider process) against ``rss_budget_mib``: the solo run's peak plus
  what the provider's budgets let one client key hold (kept graphs per key, queued replies, twice the decoded
  bytes of one message, and 64 MiB of slack for the hostile's connections);
* ``hostile_cut_off``: the provider cut the hostile client off (its log says so);
* ``sigterm_exit_s`` against ``shutdown_grace_s`` + 1 s of socket linger; ``crashed``, ``hung``.

Attacks (``--attacks``, comma-separated, default all):

``slow_reader``           shrinks its receive buffer, pipelines 60 KB-privacy HELLOs and forwards of the longest
                          sequence the provider takes (1024 tokens by default: 1 MiB replies), never reads;
                          reconnects when cut off.
``reply_amplification``   pipelines 60-byte CHUNK_REQs for 4 MiB of the emulator, never reads.
``graph_hoarding``        4 Online sessions, training ACT_UPs of the longest sequence, never a GRAD_UP (reads
                          replies).
``long_sequence``         back-to-back forward passes of the longest sequence the provider takes (reads replies).
``decode_amplification``  nf4 ACT_UPs that decode to 8x their size: unknown session ids, and over the decoded limit.
``disconnect_without_bye`` HELLO, a training ACT_UP (graph kept), then the socket is closed; again and again.

The model is a small random llama by default (hidden 256, 8 blocks; fast, so the CPU is not monopolised);
``--model default`` uses the embedded SmolLM2-135M. Run it with ``nice``: it uses every core it gets.

    nice -n 10 python -m benchmarks.bench_adversarial [--model small|tiny|default] [--steps 30] [--attacks ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import re
import shlex
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ATTACKS = (
    "slow_reader",
    "reply_amplification",
    "graph_hoarding",
    "long_sequence",
    "decode_amplification",
    "disconnect_without_bye",
)
LONG_TOKENS = 4096
FP32 = {d: "fp32" for d in ("up", "down", "grad_up", "grad_down")}


# ============================================================================================ the hostile client
class Hostile:
    """A raw CURVE DEALER that reconnects after being cut off; counts the disconnects it sees."""

    def __init__(self, endpoint: str, keydir: Path, *, rcvbuf: int | None = None, rcvhwm: int = 1000) -> None:
        import zmq

        from guardedp2p.crypto.keys import load_keypair, load_public_key

        self.zmq = zmq
        self.endpoint = endpoint
        self.public, self.secret = load_keypair(keydir / "hostile.key_secret")
        self.server = load_public_key(keydir / "provider.key")
        self.rcvbuf, self.rcvhwm = rcvbuf, rcvhwm
        self.ctx = zmq.Context()
        self.sock: Any = None
        self.mon: Any = None
        self.cut = 0
        self.max_tokens = LONG_TOKENS  # the provider's limit, from ACCEPT
        self.sent = 0
        self.replies = 0
        self.codes: dict[str, int] = {}
        self.connect()

    def connect(self) -> None:
        zmq = self.zmq
        self.close()
        s = self.ctx.socket(zmq.DEALER)
        s.linger = 0
        s.rcvhwm = self.rcvhwm
        s.sndhwm = 100000
        s.reconnect_ivl = -1  # a cut-off connection stays down: we count it and open a new socket
        if self.rcvbuf is not None:
            s.setsockopt(zmq.RCVBUF, self.rcvbuf)
        s.curve_publickey = self.public.encode()
        s.curve_secretkey = self.secret.encode()
        s.curve_serverkey = self.server.encode()
        self.mon = s.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        s.connect(self.endpoint)
        self.sock = s

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.disable_monitor()
            except Exception:  # noqa: BLE001
                pass
            self.mon.close(linger=0)
            self.sock.close(linger=0)
            self.sock = None

    def disconnected(self) -> bool:
        if self.mon is not None and self.mon.poll(0):
            self.mon.recv_multipart()
            self.cut += 1
            return True
        return False

    def send(self, frames: list[Any]) -> bool:
        try:
            self.sock.send_multipart(frames, flags=self.zmq.NOBLOCK, copy=False)
            self.sent += 1
            return True
        except self.zmq.Again:
            return False

    def recv(self, timeout: float) -> Any:
        from guardedp2p.wire.framing import decode

        if not self.sock.poll(int(timeout * 1000)):
            return None
        msg = decode(self.sock.recv_multipart())
        self.replies += 1
        if msg.type.value == "ERROR":
            code = str(msg.meta.get("code"))
            self.codes[code] = self.codes.get(code, 0) + 1
        return msg

    def request(self, frames: list[Any], timeout: float = 30.0) -> Any:
        return self.recv(timeout) if self.send(frames) else None

    def hello(self, protocol: str, fp: str, codecs: dict[str, str], privacy: dict[str, str] | None = None) -> str:
        from guardedp2p.wire.framing import Message, encode
        from guardedp2p.wire.handshake import Hello

        hello = Hello(protocol, fp, (2, 2), codecs)
        hello.privacy = privacy or {}
        reply = self.request(encode(Message(_type("HELLO"), meta=hello.to_meta())), timeout=10)
        if reply is None or reply.type.value != "ACCEPT":
            return ""
        limits = reply.meta.get("limits", {})
        self.max_tokens = int(limits.get("max_tokens_per_step", self.max_tokens))
        return str(reply.session)


def _type(name: str) -> Any:
    from guardedp2p.wire.messages import MsgType

    return MsgType[name]


def _act_up(sid: str, step: int, b: int, n: int, hidden: int, *, train: bool, codec: str = "fp32") -> list[Any]:
    import torch

    from guardedp2p.wire.framing import Message, encode

    g = torch.Generator().manual_seed(step)
    h = torch.randn(b, n, hidden, generator=g)
    return encode(
        Message(
            _type("ACT_UP"),
            session=sid,
            step=step,
            meta={"train": train},
            tensors={"h": h, "mask": torch.ones(b, n, dtype=torch.int8)},
            codecs={"h": codec},
        )
    )


def hostile_main(
    attack: str, endpoint: str, keydir: str, fp: str, hidden: int, stop: Any, ready: Any, out: Any
) -> None:
    """The hostile process: run ``attack`` until ``stop`` is set, then report what it saw."""
    os.nice(10)
    import torch

    torch.set_num_threads(1)
    ready.set()  # imports done: the attack starts now
    kd = Path(keydir)
    h = Hostile(endpoint, kd, rcvbuf=4096 if attack in ("slow_reader", "reply_amplification") else None, rcvhwm=1)
    if attack not in ("slow_reader", "reply_amplification"):
        h.rcvhwm = 1000
        h.connect()
    try:
        ATTACK_FUNCS[attack](h, fp, hidden, stop)
    except Exception as exc:  # noqa: BLE001 - reported
        h.codes["hostile_exception"] = h.codes.get("hostile_exception", 0) + 1
        print(f"hostile {attack}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    out.put({"cut_seen": h.cut, "sent": h.sent, "replies": h.replies, "codes": h.codes})
    h.close()


def _reconnect_after_cut(h: Hostile) -> bool:
    if h.disconnected():
        time.sleep(0.5)
        h.connect()
        return True
    return False


def attack_slow_reader(h: Hostile, fp: str, hidden: int, stop: Any) -> None:
    from guardedp2p.wire.framing import Message, encode
    from guardedp2p.wire.handshake import Hello

    privacy = {f"k{i}": "p" * 480 for i in range(120)}  # ~60 KB, under the 64 KiB header limit
    hello = Hello("gradfree", fp, (2, 2), {"up": "fp32", "down": "fp32"})
    hello.privacy = privacy
    hello_frames = encode(Message(_type("HELLO"), meta=hello.to_meta()))
    while not stop.is_set():
        sid = h.hello("gradfree", fp, {"up": "fp32", "down": "fp32"}, privacy)
        step = 0
        while not stop.is_set() and not _reconnect_after_cut(h):
            step += 1
            frames = hello_frames if step % 2 else _act_up(sid, step, 1, h.max_tokens, hidden, train=False)
            if not h.send(frames):
                time.sleep(0.05)
            time.sleep(0.01)
        if not sid:
            time.sleep(0.5)


def attack_reply_amplification(h: Hostile, fp: str, hidden: int, stop: Any) -> None:
    from guardedp2p.wire.framing import Message, encode

    while not stop.is_set():
        sid = h.hello("offline", "", {})
        man = h.request(encode(Message(_type("MANIFEST_REQ"), session=sid, step=1)), timeout=10) if sid else None
        if man is None or man.type.value != "MANIFEST":
            time.sleep(0.5)
            _reconnect_after_cut(h) or h.connect()
            continue
        files = json.loads(man.meta["manifest"])["files"]
        big = max(files, key=lambda n: files[n]["size"])
        step = 1
        while not stop.is_set() and not _reconnect_after_cut(h):
            step += 1
            req = Message(
                _type("CHUNK_REQ"), session=sid, step=step, meta={"file": big, "offset": 0, "length": 4 << 20}
            )
            if not h.send(encode(req)):
                time.sleep(0.05)
            time.sleep(0.005)


def attack_graph_hoarding(h: Hostile, fp: str, hidden: int, stop: Any) -> None:
    while not stop.is_set():
        sids = [s for s in (h.hello("online", fp, FP32) for _ in range(4)) if s]
        if not sids:
            time.sleep(0.5)
            _reconnect_after_cut(h) or h.connect()
            continue
        step = 0
        while not stop.is_set() and not _reconnect_after_cut(h):
            step += 1
            for sid in sids:
                if stop.is_set():
                    break
                h.request(_act_up(sid, step, 1, h.max_tokens, hidden, train=True), timeout=20)


def attack_long_sequence(h: Hostile, fp: str, hidden: int, stop: Any) -> None:
    while not stop.is_set():
        sid = h.hello("gradfree", fp, {"up": "fp32", "down": "fp32"})
        if not sid:
            time.sleep(0.5)
            _reconnect_after_cut(h) or h.connect()
            continue
        step = 0
        while not stop.is_set() and not _reconnect_after_cut(h):
            step += 1
            h.request(_act_up(sid, step, 1, h.max_tokens, hidden, train=False), timeout=20)


def _nf4_act_up(sid: str, step: int, n: int, hidden: int) -> list[Any]:
    """An ACT_UP whose activations [1, n, hidden] travel as nf4 (about 0.56 bytes a value, 4 once decoded), built
    by hand from zero bytes: the hostile spends no time quantizing."""
    import msgpack

    from guardedp2p.wire.codecs import get_codec
    from guardedp2p.wire.messages import WIRE_VERSION

    params = {"blocksize": 64}
    parts = get_codec("nf4").expected_parts((1, n, hidden), params)
    header = {
        "v": WIRE_VERSION,
        "t": "ACT_UP",
        "sid": sid,
        "step": step,
        "meta": {"train": False},
        "tensors": [
            {
                "name": "h",
                "codec": "nf4",
                "dtype": "float32",
                "shape": [1, n, hidden],
                "params": params,
                "parts": [[d, list(shape)] for d, shape in parts],
            },
            {
                "name": "mask",
                "codec": "raw",
                "dtype": "int8",
                "shape": [1, n],
                "params": {},
                "parts": [["int8", [1, n]]],
            },
        ],
    }
    frames: list[Any] = [msgpack.packb(header, use_bin_type=True)]
    for d, shape in parts:
        size = 1
        for x in shape:
            size *= x
        frames.append(bytes(size * (1 if d == "uint8" else 4)))
    frames.append(b"\x01" * n)
    return frames


def attack_decode_amplification(h: Hostile, fp: str, hidden: int, stop: Any) -> None:
    # 36 MiB of nf4 that decodes to 256 MiB: unknown session ids, and (in a real session) over the decoded limit
    n = (256 << 20) // (4 * hidden)
    unknown = _nf4_act_up("f" * 32, 1, n, hidden)
    codecs = {"up": "nf4", "down": "fp32"}
    while not stop.is_set():
        sid = h.hello("gradfree", fp, codecs)
        step = 0
        while not stop.is_set() and not _reconnect_after_cut(h):
            step += 1
            frames = unknown if step % 2 or not sid else _nf4_act_up(sid, step, n, hidden)
            h.request(frames, timeout=20)


def attack_disconnect_without_bye(h: Hostile, fp: str, hidden: int, stop: Any) -> None:
    step = 0
    while not stop.is_set():
        sid = h.hello("online", fp, FP32)
        if sid:
            step += 1
            h.request(_act_up(sid, step, 1, h.max_tokens, hidden, train=True), timeout=20)
        h.connect()  # the old socket is closed without BYE


ATTACK_FUNCS = {
    "slow_reader": attack_slow_reader,
    "reply_amplification": attack_reply_amplification,
    "graph_hoarding": attack_graph_hoarding,
    "long_sequence": attack_long_sequence,
    "decode_amplification": attack_decode_amplification,
    "disconnect_without_bye": attack_disconnect_without_bye,
}


# ============================================================================================ setup
def _small_model(kind: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    if kind == "tiny":
        sys.path.insert(0, str(ROOT))
        from tests.tiny_models import tiny_model

        return tiny_model("llama")
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=LONG_TOKENS * 2,
    )
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Keys, the model folder and a signed emulator (the Offline design's files, for reply amplification)."""
    sys.path.insert(0, str(ROOT))
    from guardedp2p.crypto.keys import generate_keypair, load_signing_key
    from guardedp2p.designs.offline.emulator import EmulatorConfig, build_emulator, save_emulator
    from guardedp2p.engine.loading import load_causal_lm

    keys = work / "keys"
    generate_keypair(keys, "provider")
    for name in ("honest", "pinger", "hostile"):
        generate_keypair(keys, name)
    if args.model in ("small", "tiny"):
        from tests.tiny_tokenizer import tiny_tokenizer

        model = _small_model(args.model)
        model_dir = work / "model"
        model.save_pretrained(model_dir)
        tok = tiny_tokenizer()
        tok.save_pretrained(model_dir)
        model_name = str(model_dir)
    else:
        model, tok = load_causal_lm(args.model)
        model_name = args.model
    emu = build_emulator(model, EmulatorConfig(emulator_layers=1))
    save_emulator(emu, work / "emulator", load_signing_key(keys, "provider"), tokenizer=tok)
    return {"keys": keys, "model_name": model_name, "hidden": int(model.config.hidden_size)}


def provider_flags(args: argparse.Namespace) -> list[str]:
    return shlex.split(args.provider_args)


def _flag(flags: list[str], name: str, default: float) -> float:
    if name in flags:
        return float(flags[flags.index(name) + 1])
    return default


def rss_budget_mib(solo_peak: float, flags: list[str]) -> float:
    """The solo run's peak plus what one client key may make the provider hold (see the module docstring)."""
    graphs = _flag(flags, "--max-graph-mib-per-key", 1024.0)
    queued = _flag(flags, "--max-queued-reply-mib", 64.0)
    decoded = _flag(flags, "--max-decoded-mib", 128.0)
    return round(solo_peak + graphs + queued + 2 * decoded + 64.0, 1)


def _pinning(args: argparse.Namespace) -> dict[str, set[int]] | None:
    """With ``--pin``: the provider on the last CPU, both clients on the others, as if on separate machines (so the
    honest client's own compute does not compete with the provider's, which would blur what the provider does)."""
    if not args.pin or not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return {"provider": {cpus[-1]}, "clients": set(cpus[:-1])}


def _peak_rss_mib(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return float("nan")
    m = re.search(r"VmHWM:\s+(\d+) kB", text)
    return round(int(m.group(1)) / 1024, 1) if m else float("nan")


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


# ============================================================================================ one scenario
def run_scenario(args: argparse.Namespace, env: dict[str, Any], work: Path, attack: str | None) -> dict[str, Any]:

    from benchmarks.bench_online import make_batch
    from guardedp2p.cli.demo import ProviderProcess, free_port
    from guardedp2p.designs.online.client import RemoteTrunk
    from guardedp2p.engine.split import loss_fn
    from guardedp2p.protocol.client import ClientSession
    from guardedp2p.train.config import TrainConfig
    from guardedp2p.train.trainer import SplitTrainer
    from guardedp2p.transport.zmq_client import ClientConfig, ZmqClientChannel
    from guardedp2p.wire.framing import Message
    from guardedp2p.wire.handshake import Hello

    keys = env["keys"]
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    allow = work / f"allowed-{attack or 'solo'}"
    allow.mkdir()
    for name in ("honest", "pinger", "hostile"):
        (allow / f"{name}.key").write_bytes((keys / f"{name}.key").read_bytes())
    flags = provider_flags(args)
    grace = _flag(flags, "--shutdown-grace", 2.0)
    pargs = ["--model", env["model_name"], "--bind", endpoint, "--keys", str(keys), "--name", "provider"]
    pargs += ["--allow-dir", str(allow), "--emulator", str(work / "emulator"), "--upload-dir", str(work / "uploads")]
    pargs += flags
    logdir = work / f"log-{attack or 'solo'}"
    logdir.mkdir()
    client = env["client"]
    mine = copy.deepcopy(client)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=1e-4, warmup_steps=0, schedule="constant")
    batch = make_batch(mine.tokenizer, args.batch, args.seq)
    result: dict[str, Any] = {"name": attack or "solo"}
    errors: list[str] = []

    def channel(name: str) -> ZmqClientChannel:
        return ZmqClientChannel.open(
            ClientConfig(
                connect=endpoint, provider_public_key=keys / "provider.key", secret_key_file=keys / f"{name}.key_secret"
            )
        )

    pin = env["pin"]
    ctx = mp.get_context("spawn")
    stop_hostile, hostile_ready, hostile_out = ctx.Event(), ctx.Event(), ctx.Queue()
    hostile = None
    if pin:
        os.sched_setaffinity(0, pin["provider"])  # the provider process inherits it; this process goes back below
    with ProviderProcess(pargs, logdir, ready_timeout=600) as provider:
        if pin:
            os.sched_setaffinity(0, pin["clients"])
        assert provider.proc is not None
        pid = provider.proc.pid
        session = ClientSession(channel("honest"), timeout=args.timeout)
        session.open(Hello("online", mine.fingerprint, (2, 2), FP32))
        remote = RemoteTrunk(session, FP32, gradients=True)
        trainer = SplitTrainer(
            mine.bottom,
            mine.top,
            lambda h, m, *, train, input_ids: remote(h, m, train=train),
            cfg,
            loss_fn=loss_fn,
        )
        for _ in range(2):  # warm-up
            trainer.train_step([batch])
        pinger = ClientSession(channel("pinger"), timeout=args.timeout)
        pinger.open(Hello("gradfree", mine.fingerprint, (2, 2), {"up": "fp32", "down": "fp32"}))
        pings: list[float] = []
        stop_ping = threading.Event()

        def ping_loop() -> None:
            step = 0
            while not stop_ping.is_set():
                step += 1
                t0 = time.perf_counter()
                try:
                    pinger.request(Message(_type("PING"), step=step), expect=_type("PONG"))
                    pings.append(time.perf_counter() - t0)
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"ping: {exc}")
                    return
                stop_ping.wait(0.1)

        if attack is not None:
            hostile = ctx.Process(
                target=hostile_main,
                args=(
                    attack,
                    endpoint,
                    str(keys),
                    mine.fingerprint,
                    env["hidden"],
                    stop_hostile,
                    hostile_ready,
                    hostile_out,
                ),
                daemon=True,
            )
            hostile.start()
            if not hostile_ready.wait(timeout=300):
                errors.append("the hostile process did not start")
            time.sleep(args.ramp_s)
        pinging = threading.Thread(target=ping_loop, daemon=True)
        pinging.start()
        steps: list[float] = []
        waits: list[float] = []  # per step: time blocked on the provider's replies (wire + queueing + compute)
        wait0, prov0 = session.stats.wait_s, session.stats.provider_s
        try:
            for _ in range(args.steps):
                t0, w0 = time.perf_counter(), session.stats.wait_s
                trainer.train_step([batch])
                steps.append(time.perf_counter() - t0)
                waits.append(session.stats.wait_s - w0)
        except Exception as exc:  # noqa: BLE001 - a hang or an error of the honest client is a result
            errors.append(f"honest: {type(exc).__name__}: {exc}")
        n_steps = max(1, len(steps))
        result["honest_wait_s_per_step"] = round((session.stats.wait_s - wait0) / n_steps, 4)
        result["honest_provider_s_per_step"] = round((session.stats.provider_s - prov0) / n_steps, 4)
        stop_ping.set()
        pinging.join(timeout=args.timeout)
        peak = _peak_rss_mib(pid)
        alive = provider.proc.poll() is None
        # SIGTERM while the attack still runs
        t0 = time.perf_counter()
        provider.proc.send_signal(signal.SIGTERM)
        try:
            provider.proc.wait(timeout=grace + 30)
            exit_s: float | None = time.perf_counter() - t0
        except Exception:  # noqa: BLE001 - it hung: kill it
            provider.proc.kill()
            provider.proc.wait()
            exit_s = None
        rc = provider.proc.returncode
    for s in (session, pinger):
        try:
            s.channel.close()
        except Exception:  # noqa: BLE001
            pass
    hostile_report: dict[str, Any] = {}
    if hostile is not None:
        stop_hostile.set()
        try:
            hostile_report = hostile_out.get(timeout=90)
        except Exception:  # noqa: BLE001
            hostile_report = {"error": "no report"}
        hostile.join(timeout=10)
        if hostile.is_alive():
            hostile.kill()
    log_text = (logdir / "provider.log").read_text(errors="replace")
    cut_lines = len(re.findall(r"cut off client", log_text))
    result.update(
        {
            "honest_steps": len(steps),
            "honest_p50_s": round(statistics.median(steps), 4) if steps else None,
            "honest_p99_s": round(_pct(steps, 0.99), 4) if steps else None,
            "honest_wait_p50_s": round(statistics.median(waits), 4) if waits else None,
            "honest_wait_p99_s": round(_pct(waits, 0.99), 4) if waits else None,
            "ping_p50_ms": round(1000 * statistics.median(pings), 2) if pings else None,
            "ping_p99_ms": round(1000 * _pct(pings, 0.99), 2) if pings else None,
            "pings": len(pings),
            "provider_peak_rss_mib": peak,
            "provider_alive": alive,
            "hostile_cut_off": cut_lines > 0,  # the hostile also sees the SIGTERM as a disconnect
            "provider_cut_off_lines": cut_lines,
            "hostile": hostile_report,
            "sigterm_exit_s": round(exit_s, 2) if exit_s is not None else None,
            "shutdown_grace_s": grace,
            "exit_code": rc,
            "crashed": not alive or "Traceback" in log_text,
            "hung": exit_s is None or any("Timeout" in e for e in errors),
            "errors": errors,
        }
    )
    return result


# ============================================================================================ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="small | tiny (random llamas) | default | a model folder")
    ap.add_argument("--steps", type=int, default=30, help="honest training steps per attack")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--ramp-s", type=float, default=2.0, help="attack time before the honest steps are timed")
    ap.add_argument("--timeout", type=float, default=120.0, help="honest request timeout (a hang is reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the honest client")
    ap.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="provider on the last CPU, clients on the others (default; needs 2 CPUs)",
    )
    ap.add_argument(
        "--provider-args", default="", help="extra provider serve flags, e.g. '--max-graph-mib-per-key 256'"
    )
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "adversarial.json"))
    args = ap.parse_args(argv)
    attacks = [a for a in args.attacks.split(",") if a]
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        ap.error(f"unknown attack(s) {unknown}; choose from {', '.join(ATTACKS)}")

    import torch

    sys.path.insert(0, str(ROOT))
    from guardedp2p.service.client import TuneOptions, prepare_client
    from guardedp2p.train.config import TrainConfig

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gp2p-bench-adv-"))
    env = prepare(args, work)
    env["pin"] = _pinning(args)  # decided once: the runs change this process's own affinity
    env["client"] = prepare_client(
        TuneOptions(protocol="online", model=env["model_name"], train=TrainConfig(batch_size=args.batch))
    )
    solo = run_scenario(args, env, work, None)
    print(json.dumps(solo), flush=True)
    flags = provider_flags(args)
    budget = rss_budget_mib(solo["provider_peak_rss_mib"], flags)
    rows = []
    for attack in attacks:
        row = run_scenario(args, env, work, attack)
        row["honest_p99_ratio"] = (
            round(row["honest_p99_s"] / solo["honest_p99_s"], 2)
            if row["honest_p99_s"] and solo["honest_p99_s"]
            else None
        )
        row["honest_wait_p99_ratio"] = (
            round(row["honest_wait_p99_s"] / solo["honest_wait_p99_s"], 2)
            if row["honest_wait_p99_s"] and solo["honest_wait_p99_s"]
            else None
        )
        row["rss_budget_mib"] = budget
        row["goals"] = {
            "p99_within_2x_solo": row["honest_p99_ratio"] is not None and row["honest_p99_ratio"] <= 2.0,
            "ping_p99_within_100ms": row["ping_p99_ms"] is not None and row["ping_p99_ms"] <= 100.0,
            "rss_within_budget": row["provider_peak_rss_mib"] <= budget,
            "no_crash": not row["crashed"],
            "no_hang": not row["hung"] and not row["errors"],
            "stops_within_grace": row["sigterm_exit_s"] is not None
            and row["sigterm_exit_s"] <= row["shutdown_grace_s"] + 1.5,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    report = {
        "bench": "adversarial",
        "command": " ".join(
            ["python -m benchmarks.bench_adversarial", *(shlex.quote(a) for a in (argv or sys.argv[1:]))]
        ),
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "provider_args": args.provider_args,
        "cpus": os.cpu_count(),
        "pinned": env["pin"] is not None,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "solo": solo,
        "attacks": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
