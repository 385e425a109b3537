"""The hidden-rules task (guardedp2p.data.hidden_rules): base model at chance, a local LoRA fine-tune far above it.

Measures, on the default generated task, the embedded SmolLM2's multiple-choice accuracy on all held-out items
and its mean token NLL on the code / PII fields of the held-out records, then trains LoRA (r=8, q/k/v/o) on the
client's blocks of the default split (first 2 + last 2) of the unsplit model locally on the training records,
within 10 CPU minutes, and measures again. Prints JSON lines (also appended to ``OUT/results.jsonl``).

The training budget is CPU time of the training steps (``time.process_time``, one torch thread by default), not
wall time: on a shared machine the wall time of the same steps varies several-fold with the other processes,
their CPU time hardly. A step that would cross ``--cpu-budget`` is not started.

Resumable: every finished stage (base accuracy, base NLL, training with its adapter, tuned accuracy, tuned NLL)
is kept in ``OUT`` and not redone when the command is run again with the same settings; a run cut off during
training restarts training from scratch (a training run's wall time is only meaningful in one piece).

Scoring the 4 x 1,024 choices the usual way (one forward per question + choice) costs ~25 CPU minutes per
evaluation, so the accuracy here runs each question once and the four choices on its KV cache (the same
numbers: the ``mc_check`` line compares it with :func:`guardedp2p.data.mc_eval.evaluate_mc` on the first items).

    nice -n 10 python -m benchmarks.bench_task --out runs/bench_task [--steps 120] [--cpu-budget 600]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def _emit(out: Path, rec: dict[str, Any]) -> None:
    line = json.dumps(rec, sort_keys=True)
    print(line, flush=True)
    with open(out / "results.jsonl", "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def _cached(out: Path, stage: str, key: str) -> dict[str, Any] | None:
    p = out / "results.jsonl"
    if not p.is_file():
        return None
    found = None
    for line in p.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("stage") == stage and rec.get("key") == key:
            found = rec
    return found


def _read_jsonl(path: str, n: int | None = None) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        recs = [json.loads(line) for line in fh if line.strip()]
    return recs[:n] if n is not None else recs


# ---------------------------------------------------------------------------------------------- MC, shared prefix
@torch.no_grad()
def mc_loglik_shared_prefix(
    model: Any, tok: Any, items: Sequence[dict[str, Any]], batch_size: int = 16
) -> list[list[float]]:
    """Summed log-likelihood of each choice, tokenized exactly as ``evaluate_mc`` does, running each question once.

    Questions of equal token length are batched without padding; their KV cache is repeated for the choices,
    which are right-padded (a pad only affects its own position).
    """
    from guardedp2p.data.mc_eval import _encode_pair

    model.train(False)
    enc = []
    for it in items:
        pairs = [_encode_pair(tok, it["question"], " " + c) for c in it["choices"]]
        ctx = pairs[0][0]
        if any(p[0] != ctx for p in pairs):
            raise RuntimeError("choices changed the question's tokens; use evaluate_mc for this item set")
        enc.append((ctx, [p[1] for p in pairs]))
    out: list[list[float]] = [[] for _ in items]
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, (ctx, _) in enumerate(enc):
        by_len[len(ctx)].append(i)
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
    for length, idx in sorted(by_len.items()):
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            q = torch.tensor([enc[i][0] for i in chunk], dtype=torch.long)
            res = model(input_ids=q, attention_mask=torch.ones_like(q), use_cache=True)
            first = torch.log_softmax(res.logits[:, -1, :].float(), dim=-1)  # [B, V]
            k = len(enc[chunk[0]][1])
            conts = [c for i in chunk for c in enc[i][1]]
            width = max(len(c) for c in conts) - 1
            scores = [float(first[j // k, c[0]]) for j, c in enumerate(conts)]
            if width > 0:
                cache = res.past_key_values
                cache.batch_repeat_interleave(k)
                ids = torch.full((len(conts), width), pad, dtype=torch.long)
                mask = torch.zeros((len(conts), length + width), dtype=torch.long)
                mask[:, :length] = 1
                for j, c in enumerate(conts):
                    ids[j, : len(c) - 1] = torch.tensor(c[:-1])
                    mask[j, length : length + len(c) - 1] = 1
                logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, cache=cache).logits.float(), dim=-1)
                for j, c in enumerate(conts):
                    for t in range(1, len(c)):
                        scores[j] += float(logp[j, t - 1, c[t]])
            for j, i in enumerate(chunk):
                out[i] = scores[j * k : (j + 1) * k]
    return out


def mc_accuracy(model: Any, tok: Any, items: Sequence[dict[str, Any]], batch_size: int = 16) -> dict[str, Any]:
    """Accuracy (lm-eval ``acc`` and ``acc_norm``), overall and per rule, from :func:`mc_loglik_shared_prefix`."""
    ll = mc_loglik_shared_prefix(model, tok, items, batch_size)
    per_rule: dict[str, list[int]] = defaultdict(list)
    correct = correct_norm = 0
    for it, s in zip(items, ll):
        p = max(range(len(s)), key=lambda j: s[j])
        pn = max(range(len(s)), key=lambda j: s[j] / max(len(it["choices"][j]), 1))
        correct += int(p == it["label"])
        correct_norm += int(pn == it["label"])
        per_rule[it.get("rule", "-")].append(int(p == it["label"]))
    n = len(items)
    acc = correct / n
    return {
        "acc": acc,
        "acc_norm": correct_norm / n,
        "n": n,
        "acc_se": math.sqrt(acc * (1 - acc) / n),
        "per_rule": {r: round(sum(v) / len(v), 4) for r, v in per_rule.items()},
    }


# ---------------------------------------------------------------------------------------------- model and training
def _lora_model(base: Any, r: int) -> Any:
    """The unsplit model with PEFT LoRA on q/k/v/o of the default split's client blocks (first 2 + last 2)."""
    from peft import LoraConfig, get_peft_model

    from guardedp2p.engine.arch import get_arch
    from guardedp2p.engine.split import SplitConfig

    n = base.config.num_hidden_layers
    layers = SplitConfig().client_layers(n)
    cfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.0,
        target_modules=list(get_arch(base).lora_targets),
        layers_to_transform=layers,
    )
    return get_peft_model(base, cfg)


def _logits_fn(model: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    @torch.no_grad()
    def fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        model.train(False)
        return model(input_ids=ids, attention_mask=mask).logits

    return fn


def train(
    args: argparse.Namespace, lmodel: Any, tok: Any, train_path: str, probe: Callable[[int], None] | None
) -> dict[str, Any]:
    from guardedp2p.data.collate import BatchIterator
    from guardedp2p.data.tokenize import DataConfig, encode_lm
    from guardedp2p.engine.split import loss_fn
    from guardedp2p.train.config import TrainConfig
    from guardedp2p.train.trainer import lr_lambda

    cfg = TrainConfig(
        seed=args.seed,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        max_length=args.max_length,
        warmup_steps=args.warmup,
        schedule="constant",
        checkpoint_every=0,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
    )
    examples = encode_lm(_read_jsonl(train_path), tok, DataConfig(max_length=cfg.max_length))
    torch.manual_seed(cfg.seed)
    params = [p for p in lmodel.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    it = BatchIterator(examples, cfg.batch_size, seed=cfg.seed, pad_id=tok.pad_token_id)
    times: list[float] = []
    cpu_times: list[float] = []
    cpu_used = 0.0
    losses: list[float] = []
    probe_s = 0.0
    stopped = "steps"
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for step in range(cfg.steps):
        if cpu_times and cpu_used + statistics.mean(cpu_times[-10:]) > args.cpu_budget:
            stopped = "cpu_budget"
            break
        wall_used = time.perf_counter() - wall0 - probe_s
        if args.time_budget and times and wall_used + statistics.mean(times[-10:]) > args.time_budget:
            stopped = "time_budget"
            break
        b = next(it)
        t0, c0 = time.perf_counter(), time.process_time()
        lmodel.train()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(lmodel(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        cpu_used += cpu_times[-1]
        losses.append(float(loss.detach()))
        if probe is not None and args.probe_every and (step + 1) % args.probe_every == 0:
            p0 = time.perf_counter()
            probe(step + 1)
            probe_s += time.perf_counter() - p0
    wall = time.perf_counter() - wall0 - probe_s
    return {
        "steps": len(times),
        "stopped": stopped,
        "train_wall_s": round(wall, 1),
        "train_cpu_s": round(cpu_used, 1),
        "process_cpu_s": round(time.process_time() - cpu0, 1),
        "mean_step_s": round(statistics.mean(times), 3),
        "mean_step_cpu_s": round(statistics.mean(cpu_times), 3),
        "loss_first": round(losses[0], 4),
        "loss_last10": round(statistics.mean(losses[-10:]), 4),
        "trainable_params": sum(p.numel() for p in params),
        "train_examples": len(examples),
        "probe_s": round(probe_s, 1),
        "config": {
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "max_length": cfg.max_length,
            "warmup_steps": cfg.warmup_steps,
            "schedule": cfg.schedule,
            "lora_r": cfg.lora_r,
            "lora_alpha": cfg.lora_alpha,
            "max_grad_norm": cfg.max_grad_norm,
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_task", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench_task", help="stage cache and results.jsonl")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument(
        "--cpu-budget",
        type=float,
        default=600.0,
        help="stop training before its steps use this many CPU seconds (process time, all threads): 600 = 10 CPU minutes",
    )
    ap.add_argument(
        "--time-budget", type=float, default=0.0, help="also stop before this many wall seconds (0: no wall limit)"
    )
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="training seed: LoRA init and batch order (the task is fixed)")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: CPU time = compute, unaffected by a busy machine)"
    )
    ap.add_argument("--eval-mc", type=int, default=None, help="first N multiple-choice items only (default: all)")
    ap.add_argument("--eval-nll", type=int, default=None, help="first N NLL records only (default: all)")
    ap.add_argument("--check-items", type=int, default=16, help="items compared against evaluate_mc (0: skip)")
    ap.add_argument(
        "--probe-every",
        type=int,
        default=0,
        help="exploration: accuracy on --probe-items every K steps (time excluded)",
    )
    ap.add_argument("--probe-items", type=int, default=128)
    ap.add_argument(
        "--base-only", action="store_true", help="stop after the base model's stages (they are cached for the next run)"
    )
    ap.add_argument("--task-dir", default=None, help="task folder (default: the cached default task)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from guardedp2p.data.field_nll import evaluate_record_nll
    from guardedp2p.data.hidden_rules import TaskConfig, default_task_paths
    from guardedp2p.data.mc_eval import evaluate_mc
    from guardedp2p.engine.loading import load_causal_lm

    paths = default_task_paths() if args.task_dir is None else default_task_paths(cache_dir=args.task_dir)
    items = _read_jsonl(paths.eval_mc, args.eval_mc)
    nll_recs = _read_jsonl(paths.eval_nll, args.eval_nll)
    digest = TaskConfig().digest()
    eval_key = f"{digest}|mc={len(items)}|nll={len(nll_recs)}|threads={args.threads}"
    train_key = (
        f"{digest}|steps={args.steps}|cpu={args.cpu_budget}|wall={args.time_budget}|bs={args.batch_size}|lr={args.lr}|warmup={args.warmup}"
        f"|len={args.max_length}|r={args.lora_r}|threads={args.threads}" + (f"|seed={args.seed}" if args.seed else "")
    )
    t_all = time.perf_counter()
    base, tok = load_causal_lm("default", device="cpu")
    for p in base.parameters():
        p.requires_grad_(False)
    if _cached(out, "task", digest) is None:
        _emit(
            out,
            {
                "stage": "task",
                "key": digest,
                "folder": paths.folder,
                "config": TaskConfig().__dict__,
                "mc_items": len(items),
                "nll_records": len(nll_recs),
                "torch_threads": torch.get_num_threads(),
                "nice": os.nice(0),
            },
        )

    def evaluate(model: Any, tag: str, key: str) -> None:
        if _cached(out, f"{tag}_mc", key) is None:
            t0 = time.perf_counter()
            res = mc_accuracy(model, tok, items)
            _emit(out, {"stage": f"{tag}_mc", "key": key, **res, "seconds": round(time.perf_counter() - t0, 1)})
        if _cached(out, f"{tag}_nll", key) is None:
            t0 = time.perf_counter()
            res = evaluate_record_nll(_logits_fn(model), tok, nll_recs, batch_size=8, max_length=args.max_length)
            _emit(
                out,
                {
                    "stage": f"{tag}_nll",
                    "key": key,
                    **res.to_dict(),
                    "n": len(nll_recs),
                    "seconds": round(time.perf_counter() - t0, 1),
                },
            )

    if args.check_items and _cached(out, "mc_check", eval_key) is None:
        sub = items[: args.check_items]
        fast = mc_loglik_shared_prefix(base, tok, sub)
        ref = evaluate_mc(_logits_fn(base), tok, sub, batch_size=8, return_predictions=True)
        diff = max(abs(a - b) for a, b in zip((x for s in fast for x in s), _ref_scores(base, tok, sub)))
        same = all(max(range(len(s)), key=lambda j: s[j]) == p for s, p in zip(fast, ref["pred"]))
        _emit(
            out,
            {
                "stage": "mc_check",
                "key": eval_key,
                "items": len(sub),
                "max_abs_loglik_diff": diff,
                "same_predictions": same,
            },
        )
    evaluate(base, "base", eval_key)
    if args.base_only:
        return 0

    torch.manual_seed(args.seed)  # LoRA A matrices are random: the same adapter init on every run of a seed
    lmodel = _lora_model(base, args.lora_r)
    adapter = out / f"adapter-{hashlib.sha256(train_key.encode()).hexdigest()[:12]}.pt"
    trained = _cached(out, "train", train_key)
    if trained is not None and adapter.is_file():
        state = torch.load(adapter, weights_only=True)
        named = {n: p for n, p in lmodel.named_parameters() if p.requires_grad}
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(state[n])
    else:
        probe_items = items[: args.probe_items]

        def probe(step: int) -> None:
            r = mc_accuracy(lmodel, tok, probe_items)
            print(
                json.dumps({"stage": "probe", "step": step, "acc": r["acc"], "n": r["n"], "per_rule": r["per_rule"]}),
                flush=True,
            )

        res = train(args, lmodel, tok, paths.train, probe)
        torch.save({n: p.detach().clone() for n, p in lmodel.named_parameters() if p.requires_grad}, adapter)
        _emit(out, {"stage": "train", "key": train_key, **res})
        trained = res
    tuned_key = f"{eval_key}|{train_key}"
    evaluate(lmodel, "tuned", tuned_key)

    b_mc, t_mc = _cached(out, "base_mc", eval_key), _cached(out, "tuned_mc", tuned_key)
    b_nll, t_nll = _cached(out, "base_nll", eval_key), _cached(out, "tuned_nll", tuned_key)
    assert b_mc and t_mc and b_nll and t_nll
    _emit(
        out,
        {
            "stage": "summary",
            "key": tuned_key,
            "acc_before": b_mc["acc"],
            "acc_after": t_mc["acc"],
            "gain_points": round(100 * (t_mc["acc"] - b_mc["acc"]), 2),
            "nll_before": b_nll["nll"],
            "nll_after": t_nll["nll"],
            "nll_groups_before": b_nll["groups"],
            "nll_groups_after": t_nll["groups"],
            "train_steps": trained["steps"],
            "train_wall_s": trained["train_wall_s"],
            "train_cpu_s": trained["train_cpu_s"],
            "seed": args.seed,
            "this_invocation_s": round(time.perf_counter() - t_all, 1),
        },
    )
    return 0


def _ref_scores(model: Any, tok: Any, items: Sequence[dict[str, Any]]) -> list[float]:
    from guardedp2p.data.mc_eval import score_continuations

    requests = [(it["question"], " " + c) for it in items for c in it["choices"]]
    return score_continuations(_logits_fn(model), tok, requests, batch_size=8)


if __name__ == "__main__":
    raise SystemExit(main())
