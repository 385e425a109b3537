"""Client peak RSS with the client kit (issue 18) against the full-checkpoint client and a full local fine-tune.

Each probe runs in a fresh process (peak RSS is ``VmHWM``, one training step, one torch thread): ``kit`` is
``prepare_client`` from a signed kit (only the client's weights are ever read), ``client`` is ``prepare_client``
from the whole checkpoint, both then one ``SplitTrainer.train_step`` (the client's own step: LoRA, AdamW, its loss;
the trunk's reply stood in by h1), ``full-ft`` a full local fine-tune (every weight trained with AdamW,
transformers' own loss), ``baseline`` the same imports with nothing loaded. The kit is built once into
``--kit-dir``. ``--loss torch`` runs the client step with ``F.cross_entropy`` instead of the project's loss
(guardedp2p/engine/loss.py), to show what the loss saves.

    python -m benchmarks.bench_kit [--model default] [--batch 4] [--seq 128] [--kit-dir runs/bench_kit]

Prints JSON lines; the last, ``kit_summary``, has the ratios (docs/results/kit.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch


def _status(key: str) -> float:
    """A /proc/self/status field in MiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    """Reset this process's peak RSS counter (Linux: ``5`` to ``/proc/self/clear_refs``); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def make_batch(tok: Any, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The same random batch as bench_online's probes."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, tok.vocab_size - 1, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _torch_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The causal-LM loss with ``F.cross_entropy`` (what ``loss_fn`` computed before guardedp2p/engine/loss.py)."""
    import torch.nn.functional as F

    logits = logits.float()
    labels = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def kit_probe(model_name: str, kit_dir: str | None, batch: int, seq: int, loss: str = "project") -> dict[str, Any]:
    """One training step of a client built from the kit, or from the checkpoint when ``kit_dir`` is None (the
    trunk's reply stood in by h1, as bench_online); ``load_peak_mib`` is the peak before the step."""
    from guardedp2p.engine.split import loss_fn
    from guardedp2p.service.client import TuneOptions, prepare_client
    from guardedp2p.train.config import TrainConfig
    from guardedp2p.train.trainer import SplitTrainer

    torch.set_num_threads(1)
    if kit_dir is None:
        client = prepare_client(TuneOptions(model=model_name))
    else:
        key = str(Path(kit_dir) / "keys" / "provider.sign.pub")
        client = prepare_client(TuneOptions(model=model_name, kit=str(Path(kit_dir) / "kit"), kit_verify_key=key))
    gc.collect()
    loaded = _status("VmRSS")
    load_peak = _status("VmHWM")
    reset = _reset_peak()
    b = make_batch(client.tokenizer, batch, seq)
    cfg = TrainConfig(steps=10, batch_size=batch, lr=1e-4, warmup_steps=0, max_length=seq)
    trainer = SplitTrainer(
        client.bottom,
        client.top,
        lambda h, mask, *, train, input_ids: h,  # the trunk's reply stood in by h1 (same shape)
        cfg,
        loss_fn=loss_fn if loss == "project" else _torch_loss,
    )
    trainer.train_step([b])
    params = {id(p): p for part in (client.bottom, client.top) for p in part.parameters()}
    held = sum(p.numel() * p.element_size() for p in params.values()) / 2**20
    gc.collect()
    train_peak = _status("VmHWM")  # since the reset: the training step's
    return {
        "kind": "kit" if kit_dir is not None else "checkpoint-client",
        "split": [2, 2],
        "loss": loss,
        "rss_mib": round(_status("VmRSS"), 1),
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork + exec
        "peak_rss_mib": round(max(load_peak, train_peak), 1),
        "loaded_rss_mib": round(loaded, 1),
        "load_peak_mib": round(load_peak, 1),
        "train_peak_mib": round(train_peak, 1) if reset else None,
        "weights_held_mib": round(held, 1),
    }


def build(model_name: str, kit_dir: Path) -> float:
    from guardedp2p.crypto.keys import generate_keypair, load_signing_key
    from guardedp2p.designs.kit import build_kit
    from guardedp2p.engine.loading import load_causal_lm
    from guardedp2p.engine.split import SplitConfig

    t0 = time.perf_counter()
    if not (kit_dir / "keys" / "provider.sign.key").exists():
        generate_keypair(kit_dir / "keys", "provider")
    model, tok = load_causal_lm(model_name, device="cpu", dtype="auto")
    build_kit(model, tok, SplitConfig(), load_signing_key(kit_dir / "keys", "provider"), kit_dir / "kit")
    return time.perf_counter() - t0


def _run(cmd: list[str]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--kit-dir", default="runs/bench_kit")
    ap.add_argument("--loss", choices=["project", "torch"], default="project", help="the client step's loss")
    ap.add_argument("--probe-kit", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--probe-checkpoint", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe_kit or args.probe_checkpoint:
        kit = args.kit_dir if args.probe_kit else None
        print(json.dumps(kit_probe(args.model, kit, args.batch, args.seq, args.loss)))
        return 0
    kit_dir = Path(args.kit_dir)
    build_s = build(args.model, kit_dir) if not (kit_dir / "kit" / "manifest.sig").exists() else 0.0
    kit_bytes = sum(p.stat().st_size for p in (kit_dir / "kit").rglob("*") if p.is_file())
    print(json.dumps({"bench": "kit_build", "seconds": round(build_s, 1), "kit_bytes": kit_bytes}), flush=True)
    common = ["--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq)]
    rows: dict[str, dict[str, Any]] = {}
    for kind in ("baseline", "full-ft"):
        rows[kind] = _run([sys.executable, "-m", "benchmarks.bench_online", "--probe", kind, *common])
        print(json.dumps({"bench": "memory_probe", **rows[kind]}), flush=True)
    common += ["--loss", args.loss]
    rows["client"] = _run([sys.executable, "-m", "benchmarks.bench_kit", "--probe-checkpoint", *common])
    print(json.dumps({"bench": "memory_probe", **rows["client"]}), flush=True)
    rows["kit"] = _run(
        [sys.executable, "-m", "benchmarks.bench_kit", "--probe-kit", "--kit-dir", str(kit_dir), *common]
    )
    print(json.dumps({"bench": "memory_probe", **rows["kit"]}), flush=True)
    full, kit, client, b0 = rows["full-ft"], rows["kit"], rows["client"], rows["baseline"]["peak_rss_mib"]
    summary = {
        "bench": "kit_summary",
        "model": args.model,
        "loss": args.loss,
        "batch": args.batch,
        "seq": args.seq,
        "kit_peak_mib": kit["peak_rss_mib"],
        "checkpoint_client_peak_mib": client["peak_rss_mib"],
        "full_finetune_peak_mib": full["peak_rss_mib"],
        "baseline_peak_mib": b0,
        "kit_over_full_finetune": round(kit["peak_rss_mib"] / full["peak_rss_mib"], 3),
        "kit_over_checkpoint_client": round(kit["peak_rss_mib"] / client["peak_rss_mib"], 3),
        "kit_load_peak_mib": kit["load_peak_mib"],
        "checkpoint_client_load_peak_mib": client["load_peak_mib"],
        "kit_over_full_finetune_above_baseline": round((kit["peak_rss_mib"] - b0) / (full["peak_rss_mib"] - b0), 3),
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
