"""A Gradfree that learns: more capacity on the client's top, at the wall time of an Online run (issue 16).

Gradfree never sends a gradient: the client trains only its top, and the trunk output of a record never changes,
so after the first epoch the trunk-output cache answers every forward pass and a step costs only the top's own
compute (GuardedTuning, arXiv 2501.04323, Gradfree design). This bench spends that saving on capacity: a higher
LoRA rank, the top's blocks trained in full (``TrainConfig.top_train = "blocks"``), a deeper top
(``--top-layers``), a higher learning rate, all at the *same training wall time* as Online's 60 steps.

Setting: the shipped demo task (300 training records, 64 multiple-choice items; ``guardedp2p.data.demo``), the
embedded SmolLM2-135M, batch 4, max length 128. The trunk runs locally in the same process (no wire: the in-process
and ZeroMQ channels add well under 1% here, see docs/results/demo_online.txt), so each design's time is its client
compute plus the trunk compute it needs; Gradfree's cache keeps each record's trunk output, keyed by its tokens,
as :class:`guardedp2p.designs.gradfree.client.TrunkOutputCache` does. Online runs 60 steps; its training time T is
the budget every Gradfree variant trains for (checked between steps). Goal: Gradfree's accuracy gain over the
untuned model >= 90% of Online's.

Resumable: every finished variant is one JSON line in ``--out`` (default docs/results/gradfree_capacity.jsonl),
and a rerun skips the variants already there. Runs at ``nice 10`` with one torch thread (a shared machine).

    python -m benchmarks.bench_gradfree_capacity [--variants online,gf_base,...] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

COMMAND = "nice -n 10 .venv/bin/python -m benchmarks.bench_gradfree_capacity"


@dataclass(frozen=True)
class Variant:
    name: str
    design: str  # online | gradfree
    top_layers: int = 2
    bottom_layers: int = 2
    lora_r: int = 8
    lr: float = 2e-3
    top_train: str = "lora"
    top_lr: float | None = None
    steps: int = 60  # Online: fixed; Gradfree: a cap, the budget is Online's training time

    def key(self) -> str:
        return hashlib.sha256(json.dumps({"v": 2, **asdict(self)}, sort_keys=True).encode()).hexdigest()[:12]


VARIANTS = {
    v.name: v
    for v in (
        Variant("online", "online"),
        Variant("gf_base", "gradfree", steps=10_000),
        Variant("gf_blocks", "gradfree", top_train="blocks", top_lr=2e-4, steps=10_000),
        Variant("gf_r32_lr5e-3", "gradfree", lora_r=32, lr=5e-3, steps=10_000),
        Variant("gf_top4_blocks", "gradfree", top_layers=4, top_train="blocks", top_lr=2e-4, steps=10_000),
        Variant("gf_top8_lora", "gradfree", top_layers=8, lora_r=16, lr=3e-3, steps=10_000),
    )
}


def done(out: Path) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    if out.is_file():
        for line in out.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                rows[r["key"]] = r
    return rows


class CachedTrunk:
    """The local trunk, with Gradfree's per-record cache of its output (keyed by the record's valid tokens)."""

    def __init__(self, trunk: torch.nn.Module, cache: bool) -> None:
        self.trunk, self.cache = trunk, {} if cache else None
        self.hits = self.misses = 0

    def __call__(self, h1: torch.Tensor, mask: torch.Tensor, *, train: bool, input_ids: torch.Tensor) -> torch.Tensor:
        if self.cache is None or not train:
            return self.trunk(h1, mask)
        keys = [tuple(ids[m.bool()].tolist()) for ids, m in zip(input_ids, mask)]
        if all(k in self.cache for k in keys):
            self.hits += len(keys)
            out = torch.zeros(h1.shape, dtype=h1.dtype)
            for i, k in enumerate(keys):
                out[i, : len(k)] = self.cache[k]
            return out
        self.misses += len(keys)
        with torch.no_grad():
            h2 = self.trunk(h1, mask)
        for i, k in enumerate(keys):
            self.cache[k] = h2[i, : len(k)].clone()
        return h2


def evaluate(logits_fn: Any, tok: Any, items: list[dict[str, Any]]) -> dict[str, float]:
    """Multiple-choice accuracy, and the mean NLL of the right answer (continuous: it moves when 64 items' accuracy
    cannot resolve a difference)."""
    from guardedp2p.data.mc_eval import evaluate_mc, score_continuations

    acc = float(evaluate_mc(logits_fn, tok, items, batch_size=8, max_length=128)["acc"])
    right = [(it["question"], " " + it["choices"][int(it["label"])]) for it in items]
    ll = score_continuations(logits_fn, tok, right, 8, 128)
    return {"acc": acc, "answer_nll": round(-sum(ll) / len(ll), 4)}


def run_variant(
    v: Variant, base: Any, tok: Any, examples: list[Any], items: list[dict[str, Any]], budget_s: float | None
) -> dict[str, Any]:
    from guardedp2p.data.collate import BatchIterator
    from guardedp2p.engine.lora import LoraSettings, attach_lora
    from guardedp2p.engine.split import SplitConfig, loss_fn, split_model
    from guardedp2p.train.config import TrainConfig
    from guardedp2p.train.trainer import SplitTrainer

    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    parts = split_model(model, SplitConfig(v.bottom_layers, v.top_layers))
    online = v.design == "online"
    torch.manual_seed(0)
    attach_lora(parts.bottom, parts.top, LoraSettings(r=v.lora_r, alpha=2 * v.lora_r), bottom=online, top=True)
    cfg = TrainConfig(
        steps=v.steps,
        batch_size=4,
        lr=v.lr,
        max_length=128,
        warmup_steps=5,
        checkpoint_every=0,
        lora_r=v.lora_r,
        lora_alpha=2 * v.lora_r,
        top_train=v.top_train,
        top_lr=v.top_lr,
    )
    trunk = CachedTrunk(parts.trunk, cache=not online)
    trainer = SplitTrainer(parts.bottom, parts.top, trunk, cfg, loss_fn=loss_fn, train_bottom=online)
    it = BatchIterator(examples, 4, seed=0, pad_id=tok.pad_token_id)
    t0 = time.perf_counter()
    losses = []
    while trainer.step < v.steps:
        if budget_s is not None and time.perf_counter() - t0 >= budget_s:
            break
        losses.append(trainer.train_step([next(it)]).task_loss)
        if trainer.step % 20 == 0:
            print(
                f"  {v.name}: step {trainer.step} loss {losses[-1]:.3f} {time.perf_counter() - t0:.0f}s",
                file=sys.stderr,
                flush=True,
            )
    train_s = time.perf_counter() - t0
    metrics = evaluate(trainer.logits_fn, tok, items)
    cost = trainer.client_cost()
    del trainer, parts, model
    gc.collect()
    return {
        "steps": len(losses),
        "train_s": round(train_s, 1),
        **metrics,
        "loss_first": round(losses[0], 4),
        "loss_last": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "cache_hits": trunk.hits,
        "cache_misses": trunk.misses,
        **cost,
    }


def report(rows: dict[str, dict[str, Any]], path: Path) -> None:
    """docs/results/gradfree_capacity.md: one line per finished variant."""
    zero = next((r for r in rows.values() if r["variant"] == "zero_shot"), None)
    lines = [
        "# Gradfree capacity at Online's wall time (issue 16)",
        "",
        f"Command: `{COMMAND}` (resumable; rows in gradfree_capacity.jsonl). Demo task (300 records, 64 MC items),",
        "SmolLM2-135M, batch 4, max length 128, split 2/2 unless named, trunk run locally, 1 torch thread at nice 10 on a",
        "shared 2-core machine (absolute times are slow and noisy; the budget is Online's own measured time).",
        "Accuracy: 64 items (one item = 1.6 points; differences under ~10 points are noise). Answer NLL: mean",
        "summed NLL of the right choice (lower is better), the continuous companion.",
        "",
    ]
    if zero:
        lines.append(f"Untuned model: accuracy {zero['acc']:.3f}, answer NLL {zero['answer_nll']:.3f}.")
        lines.append("")
    lines += [
        "| variant | design | top | trains | steps | train s | acc | answer NLL | acc gain / Online's | NLL gain / Online's | trainable params | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        if r["variant"].startswith("zero_shot"):
            continue
        c = r["config"]
        trains = f"LoRA r{c['lora_r']} lr {c['lr']:g}" + (
            f" + blocks lr {c['top_lr']:g}" if c["top_train"] == "blocks" else ""
        )
        lines.append(
            f"| {r['variant']} | {c['design']} | {c['top_layers']} | {trains} | {r['steps']} | {r['train_s']:.0f} | "
            f"{r['acc']:.3f} | {r['answer_nll']:.3f} | {r.get('gain_vs_online', 1.0):.2f} | "
            f"{r.get('nll_gain_vs_online', 1.0):.2f} | {r['trainable_params']:,} | {r['peak_rss_mib']:.0f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default="docs/results/gradfree_capacity.jsonl")
    ap.add_argument("--report", action="store_true", help="only write the .md table from the finished rows")
    args = ap.parse_args(argv)
    if args.report:
        report(done(Path(args.out)), Path(args.out).with_suffix(".md"))
        return
    os.nice(10)
    torch.set_num_threads(1)
    from guardedp2p.data.demo import demo_paths
    from guardedp2p.data.loaders import load_records
    from guardedp2p.data.tokenize import DataConfig, encode_lm
    from guardedp2p.engine.loading import load_causal_lm

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = done(out)
    base, tok = load_causal_lm("default", device="cpu", dtype=torch.float32)
    paths = demo_paths()
    examples = encode_lm([{"text": r["text"]} for r in load_records(paths.train)], tok, DataConfig(max_length=128))
    items = [json.loads(line) for line in Path(paths.eval_mc).read_text().splitlines() if line.strip()]

    def emit(row: dict[str, Any]) -> None:
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        rows[row["key"]] = row
        print(json.dumps(row), flush=True)

    zs_key = "zero_shot_v2"
    if zs_key not in rows:
        from guardedp2p.engine.split import SplitConfig, split_model

        parts = split_model(base, SplitConfig(2, 2))

        def logits_fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return parts.top(parts.trunk(parts.bottom(ids, mask), mask), mask)

        emit({"key": zs_key, "variant": "zero_shot", **evaluate(logits_fn, tok, items), "command": COMMAND})
    zero, zero_nll = rows[zs_key]["acc"], rows[zs_key]["answer_nll"]
    ref = VARIANTS["online"]
    if ref.key() not in rows:
        emit(
            {
                "key": ref.key(),
                "variant": ref.name,
                "config": asdict(ref),
                "command": COMMAND,
                **run_variant(ref, base, tok, examples, items, None),
            }
        )
    online = rows[ref.key()]
    budget = float(online["train_s"])
    for name in args.variants.split(","):
        v = VARIANTS[name]
        if v.key() in rows:
            continue
        res = run_variant(v, base, tok, examples, items, None if v.design == "online" else budget)
        gain, nll_gain = res["acc"] - zero, zero_nll - res["answer_nll"]
        emit(
            {
                "key": v.key(),
                "variant": v.name,
                "config": asdict(v),
                "budget_s": budget,
                "command": COMMAND,
                **res,
                "gain": round(gain, 4),
                "gain_vs_online": round(gain / max(1e-9, online["acc"] - zero), 3),
                "nll_gain_vs_online": round(nll_gain / max(1e-9, zero_nll - online["answer_nll"]), 3),
            }
        )


if __name__ == "__main__":
    main()
