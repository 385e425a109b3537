"""Split generation vs local unsplit ``generate``, time and bytes per new token, in one run (issue 18).

The provider runs as a separate process (``guardedp2p provider serve``) over CURVE on 127.0.0.1, the real
deployment path; the client generates in this process with its bottom, top and head (an adapter loaded) and a
KV cache on both sides. The reference is the unsplit model with the same adapter loaded by PEFT, running
``transformers``' ``generate`` with its KV cache, in this process. Both decode greedily with EOS off, so both
make exactly ``--new-tokens`` steps, and the bench checks that they produce the same tokens (fp32 codecs).

Time per decode step is measured the same way for both: ``(t(N new tokens) - t(1 new token)) / (N - 1)``, the
median over ``--reps`` interleaved repetitions (local and split alternate, so a shared machine's load drifts
over both alike); per new token = per step / prompts. Bytes per step are the ACT_UP / ACT_DOWN bytes of the
decode steps as the client's session counted them on the encoded frames.

CPU time per step (``cpu_ms_per_step``; split: this process plus the provider process, read from /proc) is
measured the same way. On a shared machine the wall time of the split path also pays the scheduler: each step
wakes the provider, then the client again (and both ZeroMQ I/O threads), and every wake-up waits for a core when
the machine is loaded; the CPU time does not, so ``split_over_local_cpu`` says what the split itself costs.
``provider_receive_thread_cpu_ms_per_step`` is the part of the provider's CPU spent by its receive loop (the
trunk runs on its worker thread), i.e. serving overhead rather than compute.

    python -m benchmarks.bench_generate [--prompts 1,8] [--new-tokens 32] [--reps 5] [--threads 1]
    python -m benchmarks.bench_generate --fast          # tiny random model: checks the bench itself, seconds

Prints one JSON object per line (``generate`` per mode and prompt count, ``generate_ratio`` per prompt count)
and writes them to ``--out`` (default docs/results/generate.jsonl, or nothing with ``--fast``) with the command.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash function is to a ten-year-old.",
    "List three tips for keeping houseplants alive.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Summarise the plot of a heist film in two sentences.",
    "Give me a recipe idea that uses lentils and spinach.",
    "How do I politely decline a meeting invitation?",
    "Describe the water cycle in simple terms.",
]
GOAL_RATIO = 1.5


def _adapter(model: torch.nn.Module, out: Path, seed: int = 0) -> Path:
    """A LoRA adapter on the client's blocks with random B matrices (so it changes the output), saved as PEFT."""
    from guardedp2p.engine.lora import LoraSettings, attach_lora, save_adapter
    from guardedp2p.engine.split import SplitConfig, build_client_parts

    parts = build_client_parts(copy.deepcopy(model), SplitConfig())
    torch.manual_seed(seed)
    attach_lora(parts.bottom, parts.top, LoraSettings(r=8, alpha=16))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in list(parts.bottom.named_parameters()) + list(parts.top.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return save_adapter(parts.bottom, parts.top, out)


def _padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    return ids, mask


def _cpu_s(pid: int | None = None, *, main_thread: bool = False) -> float:
    """CPU seconds (user + system) of this process or of process ``pid`` (from /proc): every thread, or with
    ``main_thread`` only its first thread (the provider's receive loop; computations run on its worker thread)."""
    if pid is None:
        return time.process_time()
    path = f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _local(
    model: Any, gen_cfg: Any, ids: torch.Tensor, mask: torch.Tensor, n: int
) -> tuple[float, float, list[list[int]]]:
    t0, c0 = time.perf_counter(), _cpu_s()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg, max_new_tokens=n)
    return time.perf_counter() - t0, _cpu_s() - c0, out[:, ids.shape[1] :].tolist()


def _split(
    gen: Any, cfg: Any, prompts: list[list[int]], provider_pid: int
) -> tuple[float, tuple[float, float, float], list[list[int]]]:
    """Wall seconds, (client, provider, provider's receive thread) CPU seconds and the tokens of one generation."""
    t0, c0, p0 = time.perf_counter(), _cpu_s(), _cpu_s(provider_pid)
    r0 = _cpu_s(provider_pid, main_thread=True)
    res = gen.generate(prompts, cfg)
    cpu = (_cpu_s() - c0, _cpu_s(provider_pid) - p0, _cpu_s(provider_pid, main_thread=True) - r0)
    return time.perf_counter() - t0, cpu, [g.tokens for g in res]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompts", default="1,8", help="comma-separated prompt counts (one batch each)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads, client and provider alike")
    ap.add_argument("--codec", default="fp32", help="codec of both directions")
    ap.add_argument(
        "--out", default=None, help="JSONL to write (default docs/results/generate.jsonl; none with --fast)"
    )
    ap.add_argument("--fast", action="store_true", help="tiny random model (checks the bench, numbers mean nothing)")
    args = ap.parse_args(argv)
    command = "python -m benchmarks.bench_generate" + "".join(" " + shlex.quote(a) for a in (argv or sys.argv[1:]))
    counts = [int(x) for x in args.prompts.split(",") if x.strip()]
    if max(counts) > len(PROMPTS) or min(counts) < 1 or args.new_tokens < 2:
        ap.error(f"--prompts must be between 1 and {len(PROMPTS)} and --new-tokens at least 2")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the provider process inherits it
    torch.set_num_threads(args.threads)

    from peft import PeftModel

    from guardedp2p.cli.client import client_channel_factory
    from guardedp2p.cli.demo import ProviderProcess, free_port
    from guardedp2p.crypto.keys import generate_keypair
    from guardedp2p.designs.online.generate import (
        GenerateConfig,
        SplitGenerator,
        encode_prompt,
        load_generation_client,
        open_generation_session,
    )
    from guardedp2p.engine.loading import load_causal_lm

    tmp = Path(tempfile.mkdtemp(prefix="gp2p-bench-generate-"))
    model_name = args.model
    if args.fast:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
        from _tiny import setup_fast

        model_name, _ = setup_fast(tmp)
    model, tok = load_causal_lm(model_name, device="cpu")
    adapter = _adapter(model, tmp / "adapter")
    client = load_generation_client(
        full_model=copy.deepcopy(model), tokenizer=tok, adapter=adapter, device="cpu", dtype=None
    )
    local = PeftModel.from_pretrained(model, str(adapter)).eval()
    gen_cfg = copy.deepcopy(model.generation_config)
    # exactly --new-tokens steps on both sides: generate() reads an unset (None) eos as "the model's", so name an
    # id the model can never produce
    gen_cfg.eos_token_id = int(model.config.vocab_size)
    gen_cfg.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    gen_cfg.do_sample = False
    chat = getattr(tok, "chat_template", None) is not None
    words = [" ".join(f"w{(7 * i + k) % 100}" for k in range(3 + i)) for i in range(len(PROMPTS))]
    prompt_ids = [encode_prompt(tok, p, chat=chat) for p in (words if args.fast else PROMPTS)]

    generate_keypair(tmp, "provider")
    generate_keypair(tmp, "client")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    serve = ["--model", model_name, "--bind", endpoint, "--keys", str(tmp), "--name", "provider"]
    serve += ["--allow", str(tmp / "client.key"), "--protocols", "online,gradfree", "--device", "cpu"]
    lines: list[dict[str, Any]] = []
    with ProviderProcess(serve, tmp, ready_timeout=600) as provider:
        assert provider.proc is not None
        pid = provider.proc.pid
        gs = open_generation_session(
            client_channel_factory(endpoint, tmp / "provider.key", tmp, "client", False),
            client,
            protocol="gradfree",  # forward-only: no gradient codec to negotiate
            codecs={"up": args.codec, "down": args.codec},
            timeout=300,
        )
        gen = SplitGenerator(client.bottom, client.top, tok, gs.trunk, max_tokens_per_step=gs.max_tokens_per_step)
        stats = gs.session.stats
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        equal: dict[int, bool] = {}
        for b in counts:  # warm-up: both paths once per shape (allocator, kernels, lazy imports)
            ids, mask = _padded(prompt_ids[:b], gen_cfg.pad_token_id)
            _local(local, gen_cfg, ids, mask, 2)
            _split(gen, GenerateConfig(max_new_tokens=2, eos_token_ids=(), batch_size=b), prompt_ids[:b], pid)
        t_start = time.time()
        load_before = os.getloadavg()
        for _ in range(args.reps):
            for b in counts:
                ids, mask = _padded(prompt_ids[:b], gen_cfg.pad_token_id)
                steps = args.new_tokens - 1
                t_n, c_n, local_tokens = _local(local, gen_cfg, ids, mask, args.new_tokens)
                t_1, c_1, _ = _local(local, gen_cfg, ids, mask, 1)
                runs.setdefault(("local", b), []).append({"step_s": (t_n - t_1) / steps, "cpu_s": (c_n - c_1) / steps})
                cfg_n = GenerateConfig(max_new_tokens=args.new_tokens, eos_token_ids=(), batch_size=b)
                cfg_1 = GenerateConfig(max_new_tokens=1, eos_token_ids=(), batch_size=b)
                up0, down0, prov0 = stats.bytes_up["ACT_UP"], stats.bytes_down["ACT_DOWN"], stats.provider_s
                t_n, c_n, split_tokens = _split(gen, cfg_n, prompt_ids[:b], pid)
                up1, down1, prov1 = stats.bytes_up["ACT_UP"], stats.bytes_down["ACT_DOWN"], stats.provider_s
                t_1, c_1, _ = _split(gen, cfg_1, prompt_ids[:b], pid)
                up2, down2, prov2 = stats.bytes_up["ACT_UP"], stats.bytes_down["ACT_DOWN"], stats.provider_s
                runs.setdefault(("split", b), []).append(
                    {
                        "step_s": (t_n - t_1) / steps,
                        "cpu_s": (c_n[0] + c_n[1] - c_1[0] - c_1[1]) / steps,
                        "client_cpu_s": (c_n[0] - c_1[0]) / steps,
                        "provider_cpu_s": (c_n[1] - c_1[1]) / steps,
                        "receive_cpu_s": (c_n[2] - c_1[2]) / steps,
                        "up": ((up1 - up0) - (up2 - up1)) / steps,
                        "down": ((down1 - down0) - (down2 - down1)) / steps,
                        "provider_s": ((prov1 - prov0) - (prov2 - prov1)) / steps,
                    }
                )
                equal[b] = equal.get(b, True) and split_tokens == local_tokens
        gs.close()
    hidden = int(model.config.hidden_size)
    common = {
        "model": args.model if not args.fast else "tiny (--fast)",
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "threads": args.threads,
        "codec": args.codec,
        "transport": "zmq CURVE, 127.0.0.1, provider in its own process",
        "command": command,
    }
    for b in counts:
        loc = statistics.median(r["step_s"] for r in runs[("local", b)])
        loc_cpu = statistics.median(r["cpu_s"] for r in runs[("local", b)])
        spl_cpu = statistics.median(r["cpu_s"] for r in runs[("split", b)])
        spl = runs[("split", b)]
        step = statistics.median(r["step_s"] for r in spl)
        up = statistics.median(r["up"] for r in spl)
        down = statistics.median(r["down"] for r in spl)
        position = b * hidden * (4 if args.codec == "fp32" else 2)
        lines.append(
            {
                "bench": "generate",
                "mode": "local",
                "prompts": b,
                **common,
                "ms_per_step": round(1000 * loc, 3),
                "ms_per_token": round(1000 * loc / b, 3),
                "cpu_ms_per_step": round(1000 * loc_cpu, 3),
            }
        )
        lines.append(
            {
                "bench": "generate",
                "mode": "split",
                "prompts": b,
                **common,
                "ms_per_step": round(1000 * step, 3),
                "ms_per_token": round(1000 * step / b, 3),
                "cpu_ms_per_step": round(1000 * spl_cpu, 3),
                "client_cpu_ms_per_step": round(1000 * statistics.median(r["client_cpu_s"] for r in spl), 3),
                "provider_cpu_ms_per_step": round(1000 * statistics.median(r["provider_cpu_s"] for r in spl), 3),
                "provider_receive_thread_cpu_ms_per_step": round(
                    1000 * statistics.median(r["receive_cpu_s"] for r in spl), 3
                ),
                "provider_ms_per_step": round(1000 * statistics.median(r["provider_s"] for r in spl), 3),
                "bytes_up_per_step": round(up),
                "bytes_down_per_step": round(down),
                "bytes_up_per_token": round(up / b, 1),
                "bytes_down_per_token": round(down / b, 1),
                "activation_bytes_per_step": position,
                "framing_bytes_per_step_up": round(up - position),
                "framing_bytes_per_step_down": round(down - position),
            }
        )
        ratio = step / loc
        lines.append(
            {
                "bench": "generate_ratio",
                "prompts": b,
                **common,
                "split_over_local": round(ratio, 3),
                "split_over_local_cpu": round(spl_cpu / loc_cpu, 3),
                "goal": GOAL_RATIO,
                "goal_met": ratio <= GOAL_RATIO,
                "tokens_equal": equal[b],
                "wall_s": round(time.time() - t_start, 1),
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "torch": torch.__version__,
            }
        )
    for line in lines:
        print(json.dumps(line))
    out = args.out if args.out is not None else (None if args.fast else "docs/results/generate.jsonl")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as fh:
            for line in lines:
                fh.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
