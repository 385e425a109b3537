"""Online and Gradfree step time vs a local LoRA step of the same model, pipelined or not, and the client's memory.

One run, one machine (issue 19). The provider is the real ``provider serve`` in a separate process over CURVE on
127.0.0.1, with one torch thread; the clients (an Online one and a Gradfree one, each its own session) train in
this process with one torch thread, so the split uses two cores as two parties would. The local baseline is the
unsplit model with LoRA on the same four blocks (PEFT ``layers_to_transform``), same batch, same optimiser, at one
torch thread and, honestly, at two (the machine's both cores for one party). Settings alternate round by round
(``--rounds`` x ``--steps-per-round`` steps each, the first round a warm-up), so the load of a shared machine drifts
over all of them alike; medians are reported. Gradfree runs without its trunk-output cache (every step asks the
provider: its worst case).

``--micro-batches 1,2,4``: 1 is the unpipelined step (``SplitTrainer.train_step``), N > 1 the pipelined one
(:mod:`guardedp2p.designs.online.pipeline`). The step's time split: ``wait_s`` is the time the client was blocked
on the provider, ``provider_s`` what the provider reported computing; with pipelining the provider computes while
the client does too, so ``provider_s`` can exceed ``wait_s``.

Client memory (``--memory``, default on): fresh processes, peak RSS (``VmHWM``; ``ru_maxrss`` would carry the bench
process's own peak over into its children through fork + exec) of the client after one
training step with the default split and with ``--bottom-layers 1 --top-layers 1``, against a full local
fine-tune of the same model (every weight trained with AdamW) and a local LoRA fine-tune, and a baseline process
with the same imports and nothing loaded. The client loads the whole checkpoint before cutting its parts out
(``prepare_client``); ``train_peak_mib`` is the peak of the training step alone (the peak counter is reset after
loading), and ``loaded_rss_mib`` what stays resident after the cut (the allocator keeps part of the freed trunk),
which a client that loads only its own blocks (issue 18's client kit) would not pay.

    python -m benchmarks.bench_online [--micro-batches 1,2,4] [--rounds 5] [--steps-per-round 2] [--batch 4]
        [--seq 128] [--no-memory] [--quick]

``--quick`` (``make bench-quick``): micro-batches 1, 2 and 4 (each protocol's default among them), two rounds of one step, the local baseline at one
thread, the default split's memory against the full fine-tune only; a few minutes. Prints JSON lines; the last,
``online_summary``, has the headline ratios.

``--provider-overhead``: the provider's CPU per Online training step (ACT_UP + GRAD_UP, batch x seq of the run),
the trunk computed bare in this process vs through the real serve loop (``serve_forever`` in a thread, CURVE on
127.0.0.1), and through the serve loop with its receive thread waking every 50 ms instead of every 2 ms while a
computation runs (``Server.tick`` patched: an experiment, not a setting), alternating, one torch thread.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc), all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _reset_peak() -> bool:
    """Reset this process's peak RSS counter (Linux: ``5`` to ``/proc/self/clear_refs``); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_probe(kind: str, model_name: str, batch: int, seq: int, bottom: int, top: int) -> dict[str, Any]:
    """Run in a fresh process: the memory of one party after one training step (see the module docstring)."""
    from guardedp2p.engine.split import loss_fn

    torch.set_num_threads(1)
    if kind == "baseline":  # the same imports, nothing loaded: what any party pays before its model
        import peft  # noqa: F401

        from guardedp2p.engine.loading import load_causal_lm  # noqa: F401
        from guardedp2p.service.client import TuneOptions, prepare_client  # noqa: F401

        loaded, load_peak, reset, held = _status("VmRSS"), _status("VmHWM"), False, 0.0
    elif kind == "client":
        from guardedp2p.service.client import TuneOptions, prepare_client

        client = prepare_client(TuneOptions(model=model_name, bottom_layers=bottom, top_layers=top))
        gc.collect()
        loaded, load_peak = _status("VmRSS"), _status("VmHWM")
        reset = _reset_peak()
        b = make_batch(client.tokenizer, batch, seq)
        h1 = client.bottom(b["input_ids"], b["attention_mask"])
        # the trunk's output stands in as the provider's reply (same shape); dL/dh2 flows back through the top
        loss_fn(client.top(h1, b["attention_mask"]), b["labels"]).backward()
        params = {id(p): p for part in (client.bottom, client.top) for p in part.parameters()}
        held = sum(p.numel() * p.element_size() for p in params.values()) / 2**20
    else:
        from guardedp2p.engine.loading import load_causal_lm

        model, tok = load_causal_lm(model_name)
        gc.collect()
        loaded, load_peak = _status("VmRSS"), _status("VmHWM")
        reset = _reset_peak()
        b = make_batch(tok, batch, seq)
        if kind == "full-lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
            )
        else:  # full fine-tune: every weight, AdamW state included
            for p in model.parameters():
                p.requires_grad_(True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        model(**b).loss.backward()
        opt.step()
        held = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    gc.collect()
    train_peak = _status("VmHWM")  # since the reset: the training step's peak
    return {
        "kind": kind,
        "split": [bottom, top] if kind == "client" else None,
        "rss_mib": round(_status("VmRSS"), 1),
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork + exec, so a probe
        # started by a big process would report the parent's peak
        "peak_rss_mib": round(max(load_peak, train_peak), 1),
        "load_peak_mib": round(load_peak, 1),
        "loaded_rss_mib": round(loaded, 1),
        "train_peak_mib": round(train_peak, 1) if reset else None,
        "weights_held_mib": round(held, 1),
    }


def provider_overhead(args: argparse.Namespace) -> list[dict[str, Any]]:
    """CPU-s and wall-s per Online training step on the provider side: bare trunk vs the serve loop (docstring)."""
    import logging
    import threading

    from guardedp2p.crypto.keys import generate_keypair
    from guardedp2p.designs.online.client import RemoteTrunk
    from guardedp2p.engine.fingerprint import model_fingerprint
    from guardedp2p.engine.loading import load_causal_lm
    from guardedp2p.engine.split import SplitConfig, build_trunk
    from guardedp2p.protocol.client import ClientSession
    from guardedp2p.service import serve as serve_mod
    from guardedp2p.service.provider import ProviderOptions, build_provider_app
    from guardedp2p.transport.zmq_client import ClientConfig, ZmqClientChannel
    from guardedp2p.transport.zmq_server import ServerConfig, ZmqServerChannel
    from guardedp2p.wire.handshake import Hello

    logging.getLogger("guardedp2p").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    model, _ = load_causal_lm(args.model)
    fp = model_fingerprint(model, SplitConfig(2, 2))
    trunk = build_trunk(copy.deepcopy(model), SplitConfig(2, 2))
    for p in trunk.parameters():
        p.requires_grad_(False)
    hidden = int(model.config.hidden_size)
    h = torch.randn(args.batch, args.seq, hidden, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(args.batch, args.seq, dtype=torch.long)
    tmp = Path(tempfile.mkdtemp(prefix="gp2p-bench-overhead-"))
    generate_keypair(tmp, "p")
    generate_keypair(tmp, "c")
    codecs = {d: "fp32" for d in ("up", "down", "grad_up", "grad_down")}
    app = build_provider_app(
        ProviderOptions(model=args.model, protocols=("online",), device="cpu"), model=copy.deepcopy(model)
    )
    srv = ZmqServerChannel(
        ServerConfig(bind="tcp://127.0.0.1:*", secret_key_file=tmp / "p.key_secret", allow=[tmp / "c.key"])
    )
    stop = threading.Event()
    serving = threading.Thread(target=serve_mod.serve_forever, args=(app, srv, stop), daemon=True)
    serving.start()
    channel = ZmqClientChannel.open(
        ClientConfig(connect=srv.endpoint, provider_public_key=tmp / "p.key", secret_key_file=tmp / "c.key_secret")
    )
    session = ClientSession(channel, timeout=600)
    session.open(Hello("online", fp, (2, 2), codecs))
    remote = RemoteTrunk(session, codecs, gradients=True)
    real_tick = serve_mod.Server.tick

    def bare() -> None:
        x = h.clone().requires_grad_(True)
        out = trunk(x, mask)
        out.backward(torch.ones_like(out))

    def served() -> None:
        step = remote.next_step()
        out = remote.forward(h, mask, train=True, step=step)
        remote.backward(torch.ones_like(out), step, h)

    def slow_tick() -> None:
        serve_mod.Server.tick = lambda self: 0.05  # type: ignore[method-assign]
        try:
            served()
        finally:
            serve_mod.Server.tick = real_tick  # type: ignore[method-assign]

    variants: list[tuple[str, Callable[[], None]]] = [
        ("bare_trunk", bare),
        ("serve_loop", served),
        ("serve_loop_tick_50ms", slow_tick),
    ]
    got: dict[str, list[tuple[float, float]]] = {}
    try:
        for rnd in range(args.rounds):
            for name, fn in variants:
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                if rnd:
                    got.setdefault(name, []).append((time.process_time() - c0, time.perf_counter() - t0))
    finally:
        session.close()
        stop.set()
        serving.join(10)
        channel.close()
        srv.close()
    bare_cpu = statistics.median(c for c, _ in got["bare_trunk"])
    rows = []
    for name, vals in got.items():
        cpu = statistics.median(c for c, _ in vals)
        rows.append(
            {
                "bench": "provider_overhead",
                "variant": name,
                "batch": args.batch,
                "seq": args.seq,
                "steps": len(vals),
                "cpu_s": round(cpu, 4),
                "wall_s": round(statistics.median(w for _, w in vals), 4),
                "cpu_over_bare": round(cpu / bare_cpu, 3),
                "loadavg_1min": round(os.getloadavg()[0], 2),
            }
        )
    return rows


def make_batch(tok: Any, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, tok.vocab_size - 1, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _probe(kind: str, args: argparse.Namespace, bottom: int = 2, top: int = 2) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.bench_online", "--probe", kind, "--model", args.model]
    cmd += ["--batch", str(args.batch), "--seq", str(args.seq), "--bottom-layers", str(bottom)]
    cmd += ["--top-layers", str(top)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def memory_results(args: argparse.Namespace, quick: bool) -> list[dict[str, Any]]:
    """Client peak RSS against local fine-tunes, each in a fresh process."""
    splits = [(2, 2)] if quick else [(2, 2), (1, 1)]
    base = _probe("baseline", args)
    full = _probe("full-ft", args)
    lora = None if quick else _probe("full-lora", args)
    rows = [base, full] if lora is None else [base, full, lora]
    b0 = base["peak_rss_mib"]
    for bottom, top in splits:
        client = _probe("client", args, bottom, top)
        rows.append(client)
        rows.append(
            {
                "bench": "client_memory",
                "split": [bottom, top],
                "client_peak_mib": client["peak_rss_mib"],
                "client_train_peak_mib": client["train_peak_mib"],
                "client_weights_mib": client["weights_held_mib"],
                "full_finetune_peak_mib": full["peak_rss_mib"],
                "local_lora_peak_mib": lora["peak_rss_mib"] if lora else None,
                "peak_over_full_finetune": round(client["peak_rss_mib"] / full["peak_rss_mib"], 3),
                "train_peak_over_full_finetune": (
                    round(client["train_peak_mib"] / full["peak_rss_mib"], 3) if client["train_peak_mib"] else None
                ),
                "peak_over_local_lora": round(client["peak_rss_mib"] / lora["peak_rss_mib"], 3) if lora else None,
                "baseline_mib": b0,
                "above_baseline_over_full_finetune": round(
                    (client["peak_rss_mib"] - b0) / (full["peak_rss_mib"] - b0), 3
                ),
                "target": "<= 0.35 x full fine-tune",
                "note": "the client loads the whole checkpoint before cutting its parts out (prepare_client); "
                "train_peak is the training step alone (peak counter reset after loading); baseline: the same "
                "imports with nothing loaded",
            }
        )
    return rows


class _Remote:
    """One client design (Online or Gradfree) on its own session, with its step functions."""

    def __init__(self, protocol: str, client: Any, channel: Any, codec: str, batch: int) -> None:
        from guardedp2p.designs.online.client import RemoteTrunk
        from guardedp2p.engine.split import loss_fn
        from guardedp2p.protocol.client import ClientSession
        from guardedp2p.train.config import TrainConfig
        from guardedp2p.train.trainer import SplitTrainer
        from guardedp2p.wire.handshake import Hello

        self.protocol = protocol
        gradients = protocol == "online"
        dirs = ("up", "down", "grad_up", "grad_down") if gradients else ("up", "down")
        codecs = {d: codec for d in dirs}
        self.session = ClientSession(channel, timeout=600)
        self.session.open(
            Hello(protocol, client.fingerprint, (client.split.bottom_layers, client.split.top_layers), codecs)
        )
        self.remote = RemoteTrunk(self.session, codecs, gradients=gradients)
        remote = self.remote
        cfg = TrainConfig(steps=10**6, batch_size=batch, lr=1e-4, warmup_steps=0, schedule="constant")
        self.trainer = SplitTrainer(
            client.bottom,
            client.top,
            lambda h, m, *, train, input_ids: remote(h, m, train=train),
            cfg,
            loss_fn=loss_fn,
            train_bottom=gradients,
        )

    def step_fn(self, micro_batches: int) -> Callable[[list[dict[str, torch.Tensor]]], Any]:
        from guardedp2p.designs.online.pipeline import PipelineConfig, PipelinedStep

        if micro_batches == 1:
            return self.trainer.train_step
        step = PipelinedStep(self.remote, PipelineConfig(micro_batches=micro_batches))
        return lambda batches: step(self.trainer, batches)


def _local(model: Any, batch: dict[str, torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], None]:
    """The unsplit model with LoRA on the client's four blocks: one step."""
    from peft import LoraConfig, get_peft_model

    n = model.config.num_hidden_layers
    torch.manual_seed(0)
    lmodel = get_peft_model(
        model,
        LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            layers_to_transform=[0, 1, n - 2, n - 1],
        ),
    )
    opt = torch.optim.AdamW([p for p in lmodel.parameters() if p.requires_grad], lr=1e-4)

    def step(b: dict[str, torch.Tensor]) -> None:
        opt.zero_grad()
        out = lmodel(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        out.loss.backward()
        opt.step()

    return step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro-batches", default="1,2,4", help="comma-separated; 1 is the unpipelined step")
    ap.add_argument("--rounds", type=int, default=5, help="rounds over all settings; the first is a warm-up")
    ap.add_argument("--steps-per-round", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--model", default="default")
    ap.add_argument("--codec", default="fp32", help="codec for every direction")
    ap.add_argument("--protocols", default="online,gradfree")
    ap.add_argument("--local-threads", default="1,2", help="torch threads of the local baseline (1 is the reference)")
    ap.add_argument("--no-memory", action="store_true", help="skip the client memory probes")
    ap.add_argument("--quick", action="store_true", help="micro-batches 1,2,4; 2 rounds of 1 step; one memory split")
    ap.add_argument(
        "--provider-overhead", action="store_true", help="provider CPU per step: bare trunk vs the serve loop"
    )
    ap.add_argument("--probe", choices=["baseline", "client", "full-lora", "full-ft"], help=argparse.SUPPRESS)
    ap.add_argument("--bottom-layers", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--top-layers", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        probe = memory_probe(args.probe, args.model, args.batch, args.seq, args.bottom_layers, args.top_layers)
        print(json.dumps(probe))
        return 0
    if args.provider_overhead:
        for row in provider_overhead(args):
            print(json.dumps(row), flush=True)
        return 0
    if args.quick:
        args.micro_batches, args.rounds, args.steps_per_round, args.local_threads = "1,2,4", 2, 1, "1"

    from guardedp2p.cli.client import client_channel_factory
    from guardedp2p.cli.demo import ProviderProcess, free_port
    from guardedp2p.crypto.keys import generate_keypair
    from guardedp2p.engine.loading import load_causal_lm
    from guardedp2p.service.client import TuneOptions, prepare_client

    torch.set_num_threads(1)
    started = time.perf_counter()
    load_before = os.getloadavg()
    micro = [int(x) for x in args.micro_batches.split(",")]
    protocols = [p for p in args.protocols.split(",") if p]
    tmp = Path(tempfile.mkdtemp(prefix="gp2p-bench-online-"))
    generate_keypair(tmp, "provider")
    generate_keypair(tmp, "client")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    base, tok = load_causal_lm(args.model)
    batches = [make_batch(tok, args.batch, args.seq, seed=i) for i in range(4)]
    clients = {
        p: prepare_client(TuneOptions(protocol=p, model=args.model), model=copy.deepcopy(base), tokenizer=tok)
        for p in protocols
    }
    local_step = _local(base, batches[0])
    gc.collect()
    provider_args = ["--model", args.model, "--bind", endpoint, "--keys", str(tmp), "--name", "provider"]
    provider_args += ["--allow", str(tmp / "client.key")]
    threads_env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})  # the provider process: one thread
    times: dict[str, list[float]] = {}
    splits: dict[str, list[dict[str, float]]] = {}
    cpus: dict[str, list[tuple[float, float]]] = {}  # (this process, the provider process) CPU-s per step
    try:
        with ProviderProcess(provider_args, tmp) as provider:
            assert provider.proc is not None
            pid = provider.proc.pid
            for k, v in threads_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            connect = client_channel_factory(endpoint, tmp / "provider.key", tmp, "client", False)
            remotes = {p: _Remote(p, clients[p], connect(), args.codec, args.batch) for p in protocols}
            settings: list[tuple[str, Callable[[int], None]]] = []
            for p in protocols:
                for n in micro:
                    fn = remotes[p].step_fn(n)
                    settings.append((f"{p}:{n}", lambda i, fn=fn: fn([batches[i % len(batches)]])))
            for threads in sorted({1, *(int(t) for t in args.local_threads.split(","))}):
                settings.append(
                    (f"local:t{threads}", lambda i, t=threads, s=local_step: _with_threads(t, s, batches[i % 4]))
                )
            counter = 0
            for rnd in range(args.rounds):
                print(
                    f"bench_online: round {rnd + 1}/{args.rounds} at {time.perf_counter() - started:.0f} s",
                    file=sys.stderr,
                )
                for name, run in settings:
                    p = name.split(":")[0]
                    stats = remotes[p].session.stats if p in remotes else None
                    for _ in range(args.steps_per_round):
                        before = (stats.wait_s, stats.provider_s, stats.codec_s) if stats else (0.0, 0.0, 0.0)
                        c0, p0 = time.process_time(), _proc_cpu_s(pid)
                        t0 = time.perf_counter()
                        run(counter)
                        dt = time.perf_counter() - t0
                        cpu = (time.process_time() - c0, _proc_cpu_s(pid) - p0)
                        counter += 1
                        if rnd == 0:
                            continue  # warm-up
                        times.setdefault(name, []).append(dt)
                        cpus.setdefault(name, []).append(cpu)
                        if stats is not None:
                            splits.setdefault(name, []).append(
                                {
                                    "wait_s": stats.wait_s - before[0],
                                    "provider_s": stats.provider_s - before[1],
                                    "codec_s": stats.codec_s - before[2],
                                }
                            )
            for r in remotes.values():
                r.session.close()
    finally:
        for k, v in threads_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    local1 = medians["local:t1"]
    local2 = medians.get("local:t2", float("nan"))
    for name, ts in times.items():
        row: dict[str, Any] = {
            "bench": "step_time",
            "setting": name,
            "batch": args.batch,
            "seq": args.seq,
            "codec": args.codec if not name.startswith("local") else None,
            "steps": len(ts),
            "median_step_s": round(medians[name], 4),
            "mean_step_s": round(statistics.mean(ts), 4),
            "over_local_t1": round(medians[name] / local1, 3),
            "over_local_t2": round(medians[name] / local2, 3) if local2 == local2 else None,
        }
        if name in splits:
            sp = {k: statistics.median(s[k] for s in splits[name]) for k in splits[name][0]}
            row.update({k: round(v, 4) for k, v in sp.items()})
            row["client_busy_s"] = round(medians[name] - sp["wait_s"], 4)
        row["cpu_s_this_process"] = round(statistics.median(c for c, _ in cpus[name]), 4)
        row["cpu_s_provider"] = round(statistics.median(p for _, p in cpus[name]), 4)
        print(json.dumps(row), flush=True)
    summary: dict[str, Any] = {"bench": "online_summary", "batch": args.batch, "seq": args.seq, "model": args.model}
    local_cpu = statistics.median(c for c, _ in cpus["local:t1"])
    for p in protocols:
        unpiped = medians[f"{p}:1"] if 1 in micro else None
        best_n = min((n for n in micro), key=lambda n: medians[f"{p}:{n}"])
        summary[f"{p}_over_local_t1"] = round(medians[f"{p}:{best_n}"] / local1, 3)
        summary[f"{p}_best_micro_batches"] = best_n
        summary[f"{p}_unpipelined_over_local_t1"] = round(unpiped / local1, 3) if unpiped else None
        summary[f"{p}_over_local_t2"] = round(medians[f"{p}:{best_n}"] / local2, 3) if local2 == local2 else None
        # CPU per step (less sensitive to a loaded machine than wall time): each party's, against the local step's;
        # with a free core for each party, a pipelined step cannot be shorter than the larger of the two
        for n in micro:
            c = statistics.median(x for x, _ in cpus[f"{p}:{n}"])
            pc = statistics.median(y for _, y in cpus[f"{p}:{n}"])
            summary[f"{p}:{n}_cpu_client_over_local"] = round(c / local_cpu, 3)
            summary[f"{p}:{n}_cpu_provider_over_local"] = round(pc / local_cpu, 3)
    summary["targets"] = {"online_over_local_t1": "<= 0.70", "gradfree_over_local_t1": "<= 0.45"}
    summary["local_t2_over_t1"] = round(local2 / local1, 3) if local2 == local2 else None
    del remotes, clients, base, local_step
    gc.collect()
    if not args.no_memory:
        for row in memory_results(args, args.quick):
            if "bench" not in row:
                row = {"bench": "memory_probe", **row}
            print(json.dumps(row), flush=True)
            if row["bench"] == "client_memory" and row["split"] == [2, 2]:
                summary["client_peak_over_full_finetune"] = row["peak_over_full_finetune"]
                summary["client_train_peak_over_full_finetune"] = row["train_peak_over_full_finetune"]
    summary["loadavg_before"] = [round(x, 2) for x in load_before]
    summary["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary), flush=True)
    return 0


def _with_threads(
    threads: int, step: Callable[[dict[str, torch.Tensor]], None], batch: dict[str, torch.Tensor]
) -> None:
    torch.set_num_threads(threads)
    try:
        step(batch)
    finally:
        torch.set_num_threads(1)


if __name__ == "__main__":
    raise SystemExit(main())
