"""Memory per party and bytes per step for OPT-1.3B, OPT-6.7B and Llama-2-7B (docs/big-models.md).

Run: ``python -m benchmarks.bench_big_models [--models opt-1.3b,opt-6.7b,llama-2-7b] [--split 2 2] [--batch 4]
[--seq 256] [--lora-r 8] [--measure opt-1.3b] [--measure-dtypes fp32,bf16] [--threads 2] [--timeout 600]``.

Prints JSON lines, one per (model, what):

* ``"what": "params"``: parameters per part, counted on a meta-device model built from the real Hugging Face
  config values (hard-coded below; no download, no memory): embedding step, bottom blocks, trunk, top blocks,
  final norm + LM head (a tied head counts with the embeddings), and the LoRA parameters the client trains.
* ``"what": "memory"``: bytes per party. Client: its frozen weights at fp32 / bf16 + LoRA weights, gradients and
  AdamW's two moments (all fp32), and the transient peak while loading (the whole checkpoint at its fp16
  precision, before the trunk is dropped). Provider: trunk weights at fp32 / bf16 / 8-bit / 4-bit
  (bitsandbytes: int8, or 4 bits + one fp32 absmax per 64 weights, on the linear layers; norms and biases at
  bf16), and the transient client-side modules while loading. Activations are not in these numbers (see the
  measured row).
* ``"what": "wire"``: bytes per training step, measured by serialising real messages with guardedp2p's wire
  format (``wire.encode``: headers, codec scales and the int8 attention mask included) for batch x seq tokens,
  per codec (fp32 / int8 / nf4 in every direction), for the Online design (ACT_UP + ACT_DOWN + GRAD_UP +
  GRAD_DOWN) and Gradfree (ACT_UP + ACT_DOWN); next to the plain formula hidden x tokens x bytes per element.
  ZeroMQ/CURVE framing adds a few dozen bytes per message on top.
* ``"what": "measured"`` (``--measure MODEL``, CPU): the client's parts built for real with random weights (a
  model with only bottom + 1 + top blocks is instantiated, so RAM never holds the full model), LoRA attached,
  then two Online training steps of the client side (bottom forward, top forward + loss + backward, bottom
  backward from a stand-in trunk gradient, AdamW step), each timed; peak RSS during the steps (VmHWM after
  resetting it), RSS of the parts alone, both above the process's baseline after imports. Each dtype runs in a
  fresh subprocess, stopped after ``--timeout`` seconds. OPT-1.3B fp32 takes about two minutes on 2 cores; bf16
  on a CPU without native bf16 matmuls (no AVX512-BF16/AMX) did not finish two steps in 17 minutes.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import time
from typing import Any

import torch

from guardedp2p.engine.arch import get_arch, get_path, num_layers
from guardedp2p.engine.placement import QUANTIZED_WEIGHT_BYTES, count_parts, meta_model, weight_bytes
from guardedp2p.engine.split import SplitConfig

MIB = 1 << 20
CKPT_BYTES = 2  # all three checkpoints are published in fp16 ("torch_dtype": "float16")


def configs() -> dict[str, Any]:
    """The published config.json values that matter for sizes (facebook/opt-1.3b, facebook/opt-6.7b,
    meta-llama/Llama-2-7b-hf)."""
    from transformers import LlamaConfig, OPTConfig

    opt = dict(
        vocab_size=50272,
        max_position_embeddings=2048,
        do_layer_norm_before=True,
        enable_bias=True,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        dropout=0.0,
        attention_dropout=0.0,
    )
    return {
        "opt-1.3b": OPTConfig(
            hidden_size=2048,
            word_embed_proj_dim=2048,
            num_hidden_layers=24,
            num_attention_heads=32,
            ffn_dim=8192,
            **opt,
        ),
        "opt-6.7b": OPTConfig(
            hidden_size=4096,
            word_embed_proj_dim=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            ffn_dim=16384,
            **opt,
        ),
        "llama-2-7b": LlamaConfig(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
    }


def lora_params(model: torch.nn.Module, split: SplitConfig, r: int, *, bottom: bool = True) -> int:
    """LoRA parameters on the client's blocks: r x (in + out) per targeted linear layer (default targets)."""
    arch = get_arch(model)
    n = num_layers(model)
    blocks = get_path(model, arch.blocks_path)
    layers = list(split.top_range(n)) + (list(split.bottom_range(n)) if bottom else [])
    total = 0
    for i in layers:
        for name, mod in blocks[i].named_modules():
            if name.split(".")[-1] in arch.lora_targets and isinstance(mod, torch.nn.Linear):
                total += r * (mod.in_features + mod.out_features)
    return total


def _mib(n: float) -> float:
    return round(n / MIB, 1)


def static_rows(name: str, cfg: Any, split: SplitConfig, r: int) -> list[dict[str, Any]]:
    meta = meta_model(cfg)
    c = count_parts(meta, split)
    lora_online = lora_params(meta, split, r)
    lora_gradfree = lora_params(meta, split, r, bottom=False)
    base = {"bench": "big_models", "model": name, "split": [split.bottom_layers, split.top_layers]}
    rows = [
        {
            **base,
            "what": "params",
            "total": c.total,
            "embed": c.embed,
            "bottom": c.bottom,
            "trunk": c.trunk,
            "top": c.top,
            "head": c.head,
            "client": c.client,
            "trunk_linear": c.trunk_quantizable,
            "lora_online": lora_online,
            "lora_gradfree": lora_gradfree,
            "lora_r": r,
            "hidden": int(cfg.hidden_size),
            "layers": num_layers(cfg),
        }
    ]
    client = {}
    for dt, b in (("fp32", 4), ("bf16", 2)):
        weights = c.client * b
        lora = lora_online * 4 * 4  # weights + gradients + AdamW exp_avg + exp_avg_sq, fp32
        client[dt] = {"weights_mib": _mib(weights), "lora_train_mib": _mib(lora), "total_mib": _mib(weights + lora)}
    provider = {
        "fp32": _mib(weight_bytes(c.trunk, c.trunk_quantizable, 4, None)),
        "bf16": _mib(weight_bytes(c.trunk, c.trunk_quantizable, 2, None)),
        "8bit": _mib(weight_bytes(c.trunk, c.trunk_quantizable, 2, "8bit")),
        "4bit": _mib(weight_bytes(c.trunk, c.trunk_quantizable, 2, "4bit")),
    }
    rows.append(
        {
            **base,
            "what": "memory",
            "client": client,
            "client_load_peak_mib": _mib(c.total * CKPT_BYTES),
            "provider_trunk_mib": provider,
            "provider_load_extra_mib": _mib(c.client * CKPT_BYTES),
            "quantized_bytes_per_weight": QUANTIZED_WEIGHT_BYTES,
        }
    )
    return rows


def wire_rows(name: str, hidden: int, batch: int, seq: int, codecs: list[str]) -> list[dict[str, Any]]:
    from guardedp2p.wire.framing import Message, encode, frames_nbytes
    from guardedp2p.wire.messages import MsgType

    g = torch.Generator().manual_seed(0)
    h = torch.randn(batch, seq, hidden, generator=g)
    mask = torch.ones(batch, seq, dtype=torch.int8)
    sid = "0" * 32
    out = []
    for codec in codecs:
        sizes = {
            "act_up": frames_nbytes(
                encode(Message(MsgType.ACT_UP, sid, 1, {"train": True}, {"h": h, "mask": mask}, {"h": codec}))
            ),
            "act_down": frames_nbytes(
                encode(Message(MsgType.ACT_DOWN, sid, 1, {"compute_s": 0.123456}, {"h": h}, {"h": codec}))
            ),
            "grad_up": frames_nbytes(
                encode(
                    Message(
                        MsgType.GRAD_UP,
                        sid,
                        1,
                        {},
                        {"g": h},
                        {"g": codec},
                        stochastic=("g",) if codec != "fp32" else (),
                    )
                )
            ),
            "grad_down": frames_nbytes(
                encode(
                    Message(
                        MsgType.GRAD_DOWN,
                        sid,
                        1,
                        {"compute_s": 0.123456},
                        {"g": h},
                        {"g": codec},
                        stochastic=("g",) if codec != "fp32" else (),
                    )
                )
            ),
        }
        elem = {"fp32": 4.0, "int8": 1.0, "nf4": 0.5}.get(codec)
        formula = hidden * batch * seq * elem if elem else None
        out.append(
            {
                "bench": "big_models",
                "model": name,
                "what": "wire",
                "codec": codec,
                "batch": batch,
                "seq": seq,
                "hidden": hidden,
                "messages": sizes,
                "online_step_bytes": sum(sizes.values()),
                "gradfree_step_bytes": sizes["act_up"] + sizes["act_down"],
                "formula_tensor_bytes": formula,
                "online_step_mib": _mib(sum(sizes.values())),
                "gradfree_step_mib": _mib(sizes["act_up"] + sizes["act_down"]),
            }
        )
    return out


# ------------------------------------------------------------------------------------- measured (child process)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def measure_child(
    name: str, dtype: str, split: SplitConfig, batch: int, seq: int, r: int, steps: int
) -> dict[str, Any]:
    """Client side of Online steps with random weights; runs in a fresh process (see module doc)."""
    from transformers import AutoModelForCausalLM

    from guardedp2p.engine.lora import LoraSettings, attach_lora
    from guardedp2p.engine.placement import cast_floating_parameters, parse_dtype
    from guardedp2p.engine.split import build_client_parts, loss_fn

    torch.manual_seed(0)
    base_kib = _status_kib("VmRSS")
    cfg = copy.deepcopy(configs()[name])
    full_layers = cfg.num_hidden_layers
    # bottom + 1 + top blocks: the client's modules at their real size, without ever holding the trunk
    cfg.num_hidden_layers = split.bottom_layers + 1 + split.top_layers
    cfg._attn_implementation = "sdpa"
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    parts = build_client_parts(model, split)
    for p in model.parameters():
        p.requires_grad_(False)
    del model
    gc.collect()
    want = parse_dtype(dtype)
    for part in parts:
        cast_floating_parameters(part, want)
    trainable = attach_lora(parts.bottom, parts.top, LoraSettings(r=r))
    for p in trainable:
        p.data = p.data.float()
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    build_s = time.perf_counter() - t0
    gc.collect()
    parts_kib = _status_kib("VmRSS")
    reset = _reset_peak()
    ids = torch.randint(3, cfg.vocab_size, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        h1 = parts.bottom(ids, mask)
        h2 = h1.detach().float().requires_grad_(True)  # stand-in for the trunk output received in ACT_DOWN
        loss = loss_fn(parts.top(h2, mask), ids)
        loss.backward()  # h2.grad is what GRAD_UP would carry
        h1.backward(torch.randn_like(h1) * 1e-3)  # stand-in for the GRAD_DOWN gradient
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(round(time.perf_counter() - t, 2))
    peak_kib = _status_kib("VmHWM")
    return {
        "bench": "big_models",
        "model": name,
        "what": "measured",
        "device": "cpu",
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "batch": batch,
        "seq": seq,
        "lora_r": r,
        "layers_full": full_layers,
        "build_s": round(build_s, 1),
        "step_s": times,
        "client_parts_rss_mib": round((parts_kib - base_kib) / 1024, 1),
        "peak_rss_during_step_mib": round((peak_kib - base_kib) / 1024, 1) if reset else None,
        "baseline_rss_mib": round(base_kib / 1024, 1),
        "loss": round(float(loss), 4),
        "trainable": sum(p.numel() for p in trainable),
    }


def measure(name: str, dtypes: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for dt in dtypes:
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.bench_big_models",
            "--_child",
            name,
            dt,
            "--split",
            *map(str, args.split),
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--lora-r",
            str(args.lora_r),
            "--steps",
            str(args.steps),
            "--threads",
            str(args.threads),
        ]
        fail = {"bench": "big_models", "model": name, "what": "measured", "dtype": dt, "threads": args.threads}
        try:
            res = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=args.timeout,
                env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
            )
        except subprocess.TimeoutExpired:
            # e.g. bf16 on a CPU without native bf16 matmuls (AVX512-BF16/AMX): tens of times slower than fp32
            rows.append({**fail, "error": f"did not finish {args.steps} steps within --timeout {args.timeout:g} s"})
            continue
        if res.returncode != 0:
            rows.append({**fail, "error": res.stderr[-2000:] or f"exit code {res.returncode}"})
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="opt-1.3b,opt-6.7b,llama-2-7b")
    ap.add_argument("--split", nargs=2, type=int, default=[2, 2], metavar=("BOTTOM", "TOP"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--codecs", default="fp32,int8,nf4")
    ap.add_argument(
        "--measure", default="", help="Comma-separated models to build and step for real on the CPU (e.g. opt-1.3b)."
    )
    ap.add_argument("--measure-dtypes", default="fp32,bf16")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600.0, help="Seconds allowed per measured dtype (build + steps).")
    ap.add_argument("--_child", nargs=2, metavar=("MODEL", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    split = SplitConfig(*args.split)
    if args._child:
        torch.set_num_threads(args.threads)
        print(
            json.dumps(
                measure_child(args._child[0], args._child[1], split, args.batch, args.seq, args.lora_r, args.steps)
            ),
            flush=True,
        )
        return 0
    cfgs = configs()
    wire_cache: dict[int, list[dict[str, Any]]] = {}
    for name in [m for m in args.models.split(",") if m]:
        cfg = cfgs[name]
        for row in static_rows(name, cfg, split, args.lora_r):
            print(json.dumps(row), flush=True)
        hidden = int(cfg.hidden_size)
        if hidden not in wire_cache:
            wire_cache[hidden] = wire_rows(name, hidden, args.batch, args.seq, args.codecs.split(","))
        for row in wire_cache[hidden]:
            print(json.dumps({**row, "model": name}), flush=True)
    for name in [m for m in args.measure.split(",") if m]:
        for row in measure(name, args.measure_dtypes.split(","), args):
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
