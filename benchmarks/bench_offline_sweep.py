"""Offline design sweep: does an adapter tuned on the emulator keep its gain when plugged into the full model?

Each point fixes the emulator (kept fraction of the middle blocks, distillation length) and the adapter (LoRA
rank or full blocks, adapter depth) and reports the five numbers of offsite-tuning (arXiv 2302.04870):
zero-shot of the full model, full fine-tune (same adapter, seed, data order and steps on the full model),
emulator zero-shot, emulator fine-tune and plug-in (the emulator-tuned adapter, signed as the client's bundle,
verified and plugged into the full model by the provider's code), each with a 95 % bootstrap CI over the
multiple-choice items (:mod:`guardedp2p.evaluate.stats`). Derived numbers: the gain recovered by plug-in
``(plug_in - zero_shot) / (full_ft - zero_shot)`` (CI: the same items resampled for all three), the gap
emulator fine-tune - plug-in (paired CI), the share of parameters shipped, the emulator's perplexity on public
held-out text as a multiple of the full model's, and the emulator tuning step time over a full-model LoRA step
(interleaved timing on the same inputs, medians).

Resumable: every point, baseline, distillation and timing is cached under ``--cache`` (one JSON per point,
distillation checkpoints every 25 steps), so a killed run continues where it stopped and a finished one
re-prints its JSON lines in seconds. Run it niced on a shared machine; ``--threads 1`` is the default.

    nice -n 10 .venv/bin/python -m benchmarks.bench_offline_sweep --out docs/results/offline.jsonl
    .venv/bin/python -m benchmarks.bench_offline_sweep --only full2-k50-d150 --quick   # a few steps, smoke test
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# ------------------------------------------------------------------------------------------------ the grid
DISTILL_LR = 1e-4
DISTILL_BATCH = 4
DISTILL_LEN = 64
DISTILL_WARMUP = 10
STEPS = 60
BATCH = 4
LORA_LR = 2e-3
BLOCK_LR = 1e-4
HELDOUT_PASSAGES = 16


@dataclass(frozen=True)
class Point:
    name: str
    keep: float  # fraction of the middle blocks kept by uniform layer drop
    adapter: str  # lora | full
    distill: int  # distillation steps on the provider's public text (0: layer drop only)
    depth: int = 2  # client blocks at each end
    lora_r: int = 8
    fill: str = "drop"  # a dropped middle slot: empty ("drop") or running the kept block before it ("share", CRaSh)
    drop_blocks: tuple[int, ...] | None = None  # instead of the uniform drop: these global middle blocks

    def cache_fields(self) -> dict[str, Any]:
        """The point's fields for cache keys; ``fill`` only when it is not the default, so the keys of points
        measured before sharing existed stay the same."""
        d = asdict(self)
        if self.fill == "drop":
            d.pop("fill")
        if self.drop_blocks is None:
            d.pop("drop_blocks")
        return d

    def fill_key(self) -> tuple[Any, ...]:
        return (() if self.fill == "drop" else (self.fill,)) + (() if self.drop_blocks is None else (self.drop_blocks,))

    def emulator_config(self) -> Any:
        from guardedp2p.designs.offline.emulator import EmulatorConfig

        if self.drop_blocks is not None:
            return EmulatorConfig(self.depth, self.depth, fill=self.fill, drop_blocks=self.drop_blocks)
        return EmulatorConfig(bottom_layers=self.depth, top_layers=self.depth, keep_fraction=self.keep, fill=self.fill)

    @property
    def lr(self) -> float:
        return BLOCK_LR if self.adapter == "full" else LORA_LR


# Ordered so that partial results answer the main question first; the LoRA points can run in a second process
# (--only) and the distillations in a third (--distill-only), each niced, sharing the cache.
POINTS: tuple[Point, ...] = (
    Point("full2-k50-d0", 0.5, "full", 0),
    Point("full2-k50-d40", 0.5, "full", 40),
    Point("full2-k75-d40", 0.75, "full", 40),
    Point("full2-k25-d40", 0.25, "full", 40),
    Point("full2-k50-d120", 0.5, "full", 120),
    Point("lora8-k50-d0", 0.5, "lora", 0),
    Point("lora8-k50-d40", 0.5, "lora", 40),
    Point("full2-k75-d0", 0.75, "full", 0),
    Point("full1-k50-d0", 0.5, "full", 0, depth=1),
    # the fixed point: nothing dropped, so the emulator is the full model and plug-in must score what the
    # emulator fine-tune scores; a gap here would be the pipeline's, not the compression's
    Point("full2-k100-d0", 1.0, "full", 0),
    # how fast transfer falls as blocks go: one dropped block (25 of 26 kept), two, three
    Point("full2-k96-d0", 25 / 26, "full", 0),
    Point("full2-k92-d0", 24 / 26, "full", 0),
    # which blocks, not only how many: the two central blocks, and four (k92 drops blocks 8 and 21 and fails)
    Point("full2-mid2-d0", 24 / 26, "full", 0, drop_blocks=(14, 15)),
    Point("full2-mid4-d0", 22 / 26, "full", 0, drop_blocks=(13, 14, 15, 16)),
    Point("full2-k88-d0", 23 / 26, "full", 0),
    # CRaSh's sharing (arXiv 2310.15477): the same kept blocks, each also run in the dropped slots after it
    Point("share2-k50-d0", 0.5, "full", 0, fill="share"),
    Point("share2-k25-d0", 0.25, "full", 0, fill="share"),
    Point("share2-k50-d40", 0.5, "full", 40, fill="share"),
)


# ------------------------------------------------------------------------------------------------ helpers
def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _cached(path: Path, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    out = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1, sort_keys=True))
    tmp.replace(path)
    return out


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Task:
    name: str
    train_examples: list[dict[str, list[int]]]
    items: list[dict[str, Any]]
    digest: str


def load_task(name: str, tok: Any, eval_items: int | None, max_length: int) -> Task:
    from guardedp2p.data.tokenize import DataConfig, encode_lm

    if name == "demo":
        from guardedp2p.data.demo import demo_paths

        p = demo_paths()
        train_path, mc_path = p.train, p.eval_mc
    elif name == "hidden_rules":
        from guardedp2p.data.hidden_rules import default_task_paths

        hp = default_task_paths()
        train_path, mc_path = hp.train, hp.eval_mc
    else:
        raise SystemExit(f"unknown task {name!r}: demo or hidden_rules")
    records = [json.loads(line) for line in Path(train_path).read_text().splitlines() if line.strip()]
    items = [json.loads(line) for line in Path(mc_path).read_text().splitlines() if line.strip()]
    if eval_items:
        items = items[:eval_items]
    train = encode_lm([{"text": r["text"]} for r in records], tok, DataConfig(max_length=max_length))
    return Task(name, train, items, _key(name, len(records), len(items), max_length))


def mc_correct_reference(
    logits_fn: Callable[..., torch.Tensor], tok: Any, items: Sequence[dict[str, Any]]
) -> list[int]:
    """Per-item correctness (``acc``) from the project's scorer, :func:`guardedp2p.data.mc_eval.evaluate_mc`."""
    from guardedp2p.data.mc_eval import evaluate_mc

    r = evaluate_mc(logits_fn, tok, items, batch_size=8, return_predictions=True)
    return [int(p == int(it["label"])) for p, it in zip(r["pred"], items)]


@torch.no_grad()
def mc_correct(model: Any, tok: Any, items: Sequence[dict[str, Any]]) -> list[int]:
    """The same ``acc`` as :func:`mc_correct_reference`, scoring the shared question once (KV cache) and then each
    choice's few tokens: ~4x less compute on a 4-choice task. Tokenization is the harness split of
    :mod:`guardedp2p.data.mc_eval`; ``model`` is a whole HF causal LM (the full model, the plugged-in model or the
    emulator's model, whose dropped blocks are pass-through placeholders). The sweep checks it against the
    reference scorer on the full model (``scorer_check`` in the zero-shot cache)."""
    import warnings

    from transformers import DynamicCache

    from guardedp2p.data.mc_eval import _encode_pair

    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
    model.train(False)
    dev = next(model.parameters()).device
    out = []
    for it in items:
        pairs = [_encode_pair(tok, it["question"], " " + c) for c in it["choices"]]
        ctx = pairs[0][0]
        if any(c != ctx for c, _ in pairs):  # boundary merge changed the context: score whole sequences
            out.append(mc_correct_reference(_logits_fn_of(model), tok, [it])[0])
            continue
        cache = DynamicCache(config=model.config)
        ids = torch.tensor([ctx], device=dev)
        last = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        last = last.float().log_softmax(-1)
        n_ctx = len(ctx)
        scores = [float(last[cont[0]]) for _, cont in pairs]
        rest = [cont[1:] for _, cont in pairs]  # tokens scored given the question and the choice's earlier tokens
        width = max(len(r) for r in rest)
        if width:
            # all choices in one batch over a copy of the question's cache; right padding never reaches a scored
            # position (causal attention), so padded rows score exactly as unpadded ones
            cache.batch_repeat_interleave(len(pairs))
            feed = torch.tensor([cont[:-1] + [cont[-1]] * (width - len(cont) + 1) for _, cont in pairs], device=dev)
            pos = torch.arange(n_ctx, n_ctx + width, device=dev)
            lg = (
                model(
                    input_ids=feed,
                    past_key_values=cache,
                    use_cache=True,
                    position_ids=pos[None].expand(len(pairs), -1),
                    cache_position=pos,
                )
                .logits.float()
                .log_softmax(-1)
            )
            for j, r in enumerate(rest):
                if r:
                    scores[j] += float(lg[j, torch.arange(len(r)), torch.tensor(r)].sum())
        pred = max(range(len(scores)), key=lambda j: scores[j])
        out.append(int(pred == int(it["label"])))
    return out


def scorer_check(logits_fn: Callable[..., torch.Tensor], fast: Sequence[int], tok: Any, items: Any, n: int = 4) -> dict:
    """Does the fast scorer agree with the project's on the first ``n`` items (the split path's logits)?"""
    ref = mc_correct_reference(logits_fn, tok, items[:n])
    return {"items": len(ref), "agree": list(fast[: len(ref)]) == ref}


def _logits_fn_of(model: Any) -> Callable[..., torch.Tensor]:
    from guardedp2p.designs.offline.plugin import logits_fn_of

    return logits_fn_of(model)


def interval(values: Sequence[int]) -> dict[str, Any]:
    from guardedp2p.evaluate.stats import bootstrap_mean_ci

    return bootstrap_mean_ci(values).as_dict()


def gain_recovered(zs: Sequence[int], ft: Sequence[int], pi: Sequence[int], n_boot: int = 2000) -> dict[str, Any]:
    """(plug_in - zero_shot) / (full_ft - zero_shot), with a percentile CI resampling the same items for all three."""
    z, f, p = (np.asarray(v, dtype=np.float64) for v in (zs, ft, pi))
    den = f.mean() - z.mean()
    est = float((p.mean() - z.mean()) / den) if den > 0 else float("nan")
    rng = np.random.Generator(np.random.PCG64(0))
    idx = rng.integers(0, z.size, size=(n_boot, z.size))
    d = f[idx].mean(1) - z[idx].mean(1)
    ok = d > 1e-9
    r = (p[idx].mean(1) - z[idx].mean(1))[ok] / d[ok]
    lo, hi = (float(x) for x in np.quantile(r, [0.025, 0.975])) if r.size else (float("nan"), float("nan"))
    return {
        "estimate": round(est, 4),
        "ci95": [round(lo, 4), round(hi, 4)],
        "method": "bootstrap-items (joint)",
        "valid_resamples": round(float(ok.mean()), 4),
    }


def paired(a: Sequence[int], b: Sequence[int]) -> dict[str, Any]:
    from guardedp2p.evaluate.stats import paired_bootstrap_diff_ci

    return paired_bootstrap_diff_ci(np.asarray(a, float), np.asarray(b, float)).as_dict()


# ------------------------------------------------------------------------------------------------ the runs
class Sweep:
    def __init__(self, args: argparse.Namespace) -> None:
        from guardedp2p.crypto.keys import generate_keypair, load_signing_key
        from guardedp2p.designs.offline.emulator import (
            PUBLIC_CORPUS,
            load_text_examples,
            model_digest,
        )
        from guardedp2p.engine.loading import load_causal_lm

        self.args = args
        self.cache = Path(args.cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        self.model, self.tok = load_causal_lm(args.model, device="cpu")
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.train(False)
        self.digest = model_digest(self.model)
        self.pad = int(self.tok.pad_token_id or 0)
        self.task = load_task(args.task, self.tok, args.eval_items, args.max_length)
        self.public_train = load_text_examples(PUBLIC_CORPUS, self.tok, DISTILL_LEN)
        self.public_heldout = load_text_examples(PUBLIC_CORPUS + ":heldout", self.tok, 128)[:HELDOUT_PASSAGES]
        keys = self.cache / "keys"
        for name in ("provider", "client"):
            if not (keys / f"{name}.sign.key").exists():
                generate_keypair(keys, name)
        self.provider_key = load_signing_key(keys, "provider")
        self.client_key = load_signing_key(keys, "client")
        self.steps = args.steps
        self.base = {"model": self.digest[:16], "task": self.task.digest, "steps": self.steps, "batch": BATCH}
        _log(
            f"model and data ready in {time.perf_counter() - t0:.1f}s (task {args.task}, {len(self.task.items)} items)"
        )

    # -------------------------------------------------------------- pieces
    def train_cfg(self, p: Point) -> Any:
        from guardedp2p.train.config import TrainConfig

        return TrainConfig(
            steps=self.steps,
            batch_size=BATCH,
            lr=p.lr,
            warmup_steps=5,
            seed=0,
            max_length=self.args.max_length,
            lora_r=p.lora_r,
            lora_alpha=2 * p.lora_r,
            checkpoint_every=0,
        )

    def attach(self, bottom: Any, top: Any, p: Point) -> None:
        from guardedp2p.designs.offline.plugin import enable_full_blocks
        from guardedp2p.engine.lora import LoraSettings, attach_lora

        if p.adapter == "full":
            enable_full_blocks(bottom, top)
            return
        torch.manual_seed(0)  # same LoRA init on the emulator and on the full model
        attach_lora(bottom, top, LoraSettings(r=p.lora_r, alpha=2 * p.lora_r), bottom=True, top=True)

    def train(
        self, bottom: Any, top: Any, trunk: Callable[..., torch.Tensor], p: Point, label: str
    ) -> tuple[Any, dict]:
        from guardedp2p.data.collate import BatchIterator
        from guardedp2p.engine.split import loss_fn
        from guardedp2p.train.trainer import SplitTrainer

        self.attach(bottom, top, p)
        trainer = SplitTrainer(bottom, top, trunk, self.train_cfg(p), loss_fn=loss_fn, train_bottom=True)
        it = BatchIterator(self.task.train_examples, BATCH, seed=0, pad_id=self.pad)
        losses, times = [], []
        t0 = time.perf_counter()
        while trainer.step < self.steps:
            res = trainer.train_step([next(it)])
            losses.append(round(res.task_loss, 4))
            times.append(res.seconds)
            if trainer.step % 10 == 0:
                _log(f"  {label}: step {trainer.step}/{self.steps} loss {res.task_loss:.3f}")
        info = {
            "train_s": round(time.perf_counter() - t0, 1),
            "step_s_median": round(statistics.median(times), 3),
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "loss_curve": losses[:: max(1, len(losses) // 12)],
        }
        return trainer, info

    def zero_shot(self) -> dict[str, Any]:
        from guardedp2p.designs.offline.plugin import logits_fn_of

        def make() -> dict[str, Any]:
            t0 = time.perf_counter()
            c = mc_correct(self.model, self.tok, self.task.items)
            _log(f"zero-shot full model: {np.mean(c):.3f} ({time.perf_counter() - t0:.0f}s)")
            check = scorer_check(logits_fn_of(self.model), c, self.tok, self.task.items)
            return {"correct": c, "eval_s": round(time.perf_counter() - t0, 1), "scorer_check": check}

        return _cached(self.cache / f"zs-{_key(self.base)}.json", make)

    def full_ft(self, p: Point) -> dict[str, Any]:
        from guardedp2p.engine.split import SplitConfig, build_client_parts, build_trunk

        spec = {**self.base, "adapter": p.adapter, "r": p.lora_r, "depth": p.depth, "lr": p.lr}

        def make() -> dict[str, Any]:
            _log(f"full fine-tune baseline {spec}")
            m = copy.deepcopy(self.model)
            split = SplitConfig(p.depth, p.depth)
            parts = build_client_parts(m, split)
            trunk = build_trunk(m, split)
            trainer, info = self.train(
                parts.bottom, parts.top, lambda h, mask, *, train, input_ids: trunk(h, mask), p, "full FT"
            )
            t0 = time.perf_counter()
            c = mc_correct(m, self.tok, self.task.items)
            check = scorer_check(trainer.logits_fn, c, self.tok, self.task.items)
            _log(f"full fine-tune: {np.mean(c):.3f}")
            return {
                "correct": c,
                **info,
                "eval_s": round(time.perf_counter() - t0, 1),
                "spec": spec,
                "scorer_check": check,
            }

        return _cached(self.cache / f"ft-{_key(spec)}.json", make)

    def emulator(self, p: Point) -> tuple[Any, dict[str, Any]]:
        from guardedp2p.designs.offline.emulator import (
            DistillConfig,
            build_emulator,
        )

        emu = build_emulator(self.model, p.emulator_config())
        info: dict[str, Any] = {"layers": emu.layer_map.to_dict()}
        if p.distill:
            cfg = DistillConfig(
                steps=p.distill,
                lr=DISTILL_LR,
                batch_size=DISTILL_BATCH,
                max_length=DISTILL_LEN,
                warmup_steps=DISTILL_WARMUP,
                w_lm=1.0,
                w_kd=30.0,
                schedule="constant",
                checkpoint_every=25,
                seed=0,
            )
            s = self.distill_locked(emu, cfg)
            info["distillation"] = {
                k: s.get(k) for k in ("steps", "lm_first", "lm_last", "kd_first", "kd_last", "seconds", "cached")
            }
            info["distillation"]["config"] = asdict(cfg)
        return emu, info

    def distill_locked(self, emu: Any, cfg: Any) -> dict[str, Any]:
        """distill_cached, one process at a time per emulator (the --distill-only process may be on it)."""
        import os

        from guardedp2p.designs.offline.emulator import distill_cached

        lock = self.cache / "emulators" / f"lock-{_key(emu.layer_map.to_dict())}"
        lock.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                break
            except FileExistsError:
                try:
                    os.kill(int(lock.read_text() or 0), 0)
                except (ValueError, ProcessLookupError, FileNotFoundError):
                    lock.unlink(missing_ok=True)  # its holder died
                    continue
                time.sleep(10)
        try:
            return distill_cached(
                emu,
                self.model,
                self.public_train,
                cfg,
                cache_dir=self.cache / "emulators",
                pad_id=self.pad,
                progress=False,
                full_model_digest=self.digest,
            )
        finally:
            lock.unlink(missing_ok=True)

    def timing(self, p: Point) -> dict[str, Any]:
        """Emulator tuning step vs full-model LoRA step (rank 8, same depth), interleaved on the same batches."""
        from guardedp2p.data.collate import BatchIterator
        from guardedp2p.designs.offline.emulator import build_emulator
        from guardedp2p.engine.split import SplitConfig, build_client_parts, build_trunk, loss_fn
        from guardedp2p.train.trainer import SplitTrainer

        spec = {**self.base, "keep": p.keep, "adapter": p.adapter, "r": p.lora_r, "depth": p.depth, "v": 1}
        if p.fill != "drop":
            spec["fill"] = p.fill
        if p.drop_blocks is not None:
            spec["drop_blocks"] = list(p.drop_blocks)

        def make() -> dict[str, Any]:
            emu = build_emulator(self.model, p.emulator_config())
            self.attach(emu.bottom, emu.top, p)
            te = SplitTrainer(emu.bottom, emu.top, emu.trunk_fn(), self.train_cfg(p), loss_fn=loss_fn)
            m = copy.deepcopy(self.model)
            split = SplitConfig(p.depth, p.depth)
            parts = build_client_parts(m, split)
            trunk = build_trunk(m, split)
            self.attach(parts.bottom, parts.top, Point("ref", 1.0, "lora", 0, p.depth, 8))
            tf = SplitTrainer(
                parts.bottom,
                parts.top,
                lambda h, mask, *, train, input_ids: trunk(h, mask),
                self.train_cfg(Point("ref", 1.0, "lora", 0, p.depth, 8)),
                loss_fn=loss_fn,
            )
            it = BatchIterator(self.task.train_examples, BATCH, seed=1, pad_id=self.pad)
            e_t, f_t = [], []
            for r in range(self.args.timing_rounds + 1):
                b = next(it)
                e = te.train_step([b]).seconds
                f = tf.train_step([b]).seconds
                if r:  # the first round warms up allocators and kernels
                    e_t.append(e)
                    f_t.append(f)
            em, fm = statistics.median(e_t), statistics.median(f_t)
            return {
                "emulator_step_s": round(em, 3),
                "full_lora_step_s": round(fm, 3),
                "ratio": round(em / fm, 3),
                "rounds": len(e_t),
            }

        return _cached(self.cache / f"timing-{_key(spec)}.json", make)

    # -------------------------------------------------------------- one point
    def point(self, p: Point) -> dict[str, Any]:
        spec = {
            **self.base,
            **p.cache_fields(),
            "lr": p.lr,
            "distill_cfg": [DISTILL_LR, DISTILL_BATCH, DISTILL_LEN, DISTILL_WARMUP],
        }
        path = self.cache / "points" / f"{p.name}-{_key(spec)}.json"
        if path.is_file():
            return json.loads(path.read_text())
        if self.args.baseline_first:
            ft, zs = self.full_ft(p), self.zero_shot()
        else:
            zs, ft = self.zero_shot(), self.full_ft(p)
        t0 = time.perf_counter()
        _log(f"point {p.name}: building the emulator")
        emu, einfo = self.emulator(p)
        _log(f"point {p.name}: emulator ready ({einfo.get('distillation')})")
        espec = _key(
            self.base, p.keep, p.depth, p.distill, DISTILL_LR, DISTILL_BATCH, DISTILL_LEN, DISTILL_WARMUP, *p.fill_key()
        )
        fid = _cached(
            self.cache / "emulators" / f"fidelity-{espec}.json",
            lambda: emulator_fidelity_dict(emu, self.model, self.public_heldout, self.pad),
        )
        manifest = self.sign_emulator(emu)  # before tuning: the signed adapters are the pre-trained ones
        ez = _cached(
            self.cache / "emulators" / f"ezs-{espec}.json",
            lambda: {"correct": mc_correct(emu.model, self.tok, self.task.items)},
        )
        _log(
            f"point {p.name}: emulator zero-shot {np.mean(ez['correct']):.3f}, public ppl ratio {fid['ppl_ratio']:.2f}"
        )
        trainer, tinfo = self.train(emu.bottom, emu.top, emu.trunk_fn(), p, f"emulator FT {p.name}")
        ef = mc_correct(emu.model, self.tok, self.task.items)
        ef_check = scorer_check(trainer.logits_fn, ef, self.tok, self.task.items)
        _log(f"point {p.name}: emulator fine-tune {np.mean(ef):.3f}")
        pi = self.plug_in(emu, p, manifest)
        _log(f"point {p.name}: plug-in {np.mean(pi):.3f}")
        timing = self.timing(p)
        params = dict(manifest["params"])
        out = {
            "point": p.name,
            "task": self.task.name,
            "n_items": len(self.task.items),
            "keep_fraction": p.keep,
            "fill": p.fill,
            "adapter": p.adapter if p.adapter == "full" else f"lora-r{p.lora_r}",
            "adapter_depth": p.depth,
            "distill_steps": p.distill,
            "lr": p.lr,
            "steps": self.steps,
            "layers": einfo["layers"],
            "zero_shot_full": interval(zs["correct"]),
            "full_finetune": interval(ft["correct"]),
            "emulator_zero_shot": interval(ez["correct"]),
            "emulator_finetune": interval(ef),
            "plug_in": interval(pi),
            "gain_recovered": gain_recovered(zs["correct"], ft["correct"], pi),
            "plug_in_minus_emulator_ft": paired(pi, ef),
            "plug_in_minus_full_ft": paired(pi, ft["correct"]),
            "param_fraction_shipped": params.get("fraction_of_full"),
            "params": params,
            "public_heldout": {k: round(v, 4) if isinstance(v, float) else v for k, v in fid.items()},
            "step_time": timing,
            "distillation": einfo.get("distillation"),
            "emulator_train": tinfo,
            "full_ft_train": {k: ft[k] for k in ("train_s", "step_s_median", "loss_first", "loss_last")},
            "point_s": round(time.perf_counter() - t0, 1),
            "scorer_check": {
                "zero_shot": zs.get("scorer_check"),
                "full_ft": ft.get("scorer_check"),
                "emulator_ft": ef_check,
            },
            "correct": {"emulator_zero_shot": ez["correct"], "emulator_finetune": ef, "plug_in": pi},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1, sort_keys=True))
        return out

    def sign_emulator(self, emu: Any) -> Any:
        """The provider's signed emulator manifest (the folder itself is not kept: the client side is in memory)."""
        from guardedp2p.designs.offline.emulator import save_emulator

        with tempfile.TemporaryDirectory(prefix="offline-sweep-") as tmp_s:
            return save_emulator(emu, Path(tmp_s) / "emulator", self.provider_key, model_name=self.args.model)

    def plug_in(self, emu: Any, p: Point, manifest: Any) -> list[int]:
        """The real path: the client signs its bundle against the emulator manifest; the provider verifies it
        (signature, digests, fingerprint) and plugs it into a copy of the full model."""
        from guardedp2p.designs.offline.plugin import make_full_block_bundle, plug_in, save_full_blocks
        from guardedp2p.designs.offline.transfer import make_adapter_bundle
        from guardedp2p.engine.lora import save_adapter

        with tempfile.TemporaryDirectory(prefix="offline-sweep-") as tmp_s:
            tmp = Path(tmp_s)
            if p.adapter == "full":
                save_full_blocks(emu.bottom, emu.top, tmp / "adapter")
                make_full_block_bundle(tmp / "adapter", tmp / "bundle", self.client_key, emulator_manifest=manifest)
            else:
                save_adapter(emu.bottom, emu.top, tmp / "adapter")
                make_adapter_bundle(tmp / "adapter", tmp / "bundle", self.client_key, emulator_manifest=manifest)
            plugged = plug_in(copy.deepcopy(self.model), tmp / "bundle", self.client_key.public_key())
            correct = mc_correct(plugged.model, self.tok, self.task.items)
        return correct


def emulator_fidelity_dict(emu: Any, model: Any, examples: Any, pad: int) -> dict[str, Any]:
    from guardedp2p.designs.offline.emulator import emulator_fidelity

    t0 = time.perf_counter()
    out = emulator_fidelity(emu, model, examples, pad_id=pad)
    out["eval_s"] = round(time.perf_counter() - t0, 1)
    return out


def summary_line(r: dict[str, Any]) -> dict[str, Any]:
    """The JSON line printed per point: everything but the per-item vectors."""
    return {k: v for k, v in r.items() if k != "correct"}


# ------------------------------------------------------------------------------------------------ report
def _fmt(iv: dict[str, Any] | None) -> str:
    if not iv:
        return "-"
    lo, hi = iv["ci95"]
    return f"{iv['estimate']:.3f} [{lo:.2f}, {hi:.2f}]"


def load_points(cache: Path, task: str | None = None) -> list[dict[str, Any]]:
    """The newest cached result of each point, in the grid's order (points not yet measured are left out), of
    ``task`` only when given (points cached before they recorded a task were all the demo's)."""
    found: dict[str, tuple[float, dict[str, Any]]] = {}
    for f in (cache / "points").glob("*.json"):
        r = json.loads(f.read_text())
        if "point" not in r or (task is not None and r.get("task", "demo") != task):
            continue
        t = f.stat().st_mtime
        if r["point"] not in found or t > found[r["point"]][0]:
            found[r["point"]] = (t, r)
    order = {p.name: i for i, p in enumerate(POINTS)}
    return [found[n][1] for n in sorted(found, key=lambda n: order.get(n, 99))]


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    head = (
        "| point | kept middle | adapter | distil steps | zero-shot | full FT | emulator ZS | emulator FT | plug-in "
        "| gain recovered | plug-in - emu FT | shipped | public ppl x | step ratio |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        k = len(r["layers"]["middle_kept"])
        m = r["layers"]["n_layers"] - len(r["layers"]["adapter_bottom"]) - len(r["layers"]["adapter_top"])
        g = r["gain_recovered"]
        gain = (
            f"{g['estimate']:.2f} [{g['ci95'][0]:.2f}, {g['ci95'][1]:.2f}]"
            if g.get("resolved", True)
            else "n/a (full-FT gain not resolved)"
        )
        lines.append(
            f"| {r['point']} | {k}/{m} | {r['adapter']} x{r['adapter_depth']}+{r['adapter_depth']} "
            f"| {r['distill_steps']} | {_fmt(r['zero_shot_full'])} | {_fmt(r['full_finetune'])} "
            f"| {_fmt(r['emulator_zero_shot'])} | {_fmt(r['emulator_finetune'])} | {_fmt(r['plug_in'])} "
            f"| {gain} "
            f"| {_fmt(r['plug_in_minus_emulator_ft'])} | {r['param_fraction_shipped']:.3f} "
            f"| {r['public_heldout']['ppl_ratio']:.2f} | {r['step_time']['ratio']:.2f} |"
        )
    return head + "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], out: Path) -> None:
    """Left: the five numbers per point (95 % CIs); right: gain recovered vs public perplexity ratio (IP)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    keys = [
        ("zero_shot_full", "zero-shot (full)"),
        ("full_finetune", "full fine-tune"),
        ("emulator_zero_shot", "emulator zero-shot"),
        ("emulator_finetune", "emulator fine-tune"),
        ("plug_in", "plug-in"),
    ]
    w = 0.16
    for j, (k, label) in enumerate(keys):
        xs = [i + (j - 2) * w for i in range(len(rows))]
        ys = [r[k]["estimate"] for r in rows]
        err = [[r[k]["estimate"] - r[k]["ci95"][0] for r in rows], [r[k]["ci95"][1] - r[k]["estimate"] for r in rows]]
        ax.bar(xs, ys, w, yerr=err, capsize=2, label=label)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["point"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"MC accuracy ({rows[0]['task']} task, {rows[0]['n_items']} items)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("the five numbers per point (95% bootstrap CI)", fontsize=9)
    for r in rows:
        g = r["gain_recovered"]
        if not g.get("resolved", True):
            continue
        x = r["public_heldout"]["ppl_ratio"]
        bx.errorbar(
            [x],
            [g["estimate"]],
            yerr=[[g["estimate"] - g["ci95"][0]], [g["ci95"][1] - g["estimate"]]],
            fmt="o",
            capsize=3,
        )
        bx.annotate(r["point"], (x, g["estimate"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    bx.axhline(0.8, ls="--", lw=0.8, color="gray")
    bx.axvline(1.5, ls=":", lw=0.8, color="gray")
    bx.set_xscale("log")
    bx.set_xlabel("emulator perplexity / full model perplexity on public held-out text (log)")
    bx.set_ylabel("gain recovered by plug-in")
    bx.set_title("transfer vs what the emulator gives away (goal: above 0.8, right of 1.5)", fontsize=9)
    fig.tight_layout()
    fig.savefig(str(out))


def _ft_gain(cache: Path, r: dict[str, Any]) -> dict[str, Any] | None:
    """Full fine-tune minus zero-shot (paired over items) from the cached baselines of this point's adapter."""
    zs = [json.loads(f.read_text()) for f in cache.glob("zs-*.json")]
    for f in cache.glob("ft-*.json"):
        ft = json.loads(f.read_text())
        sp = ft.get("spec", {})
        kind = "full" if r["adapter"] == "full" else "lora"
        if (sp.get("adapter"), sp.get("depth"), sp.get("steps")) == (kind, r["adapter_depth"], r["steps"]) and (
            kind == "full" or f"lora-r{sp.get('r')}" == r["adapter"]
        ):
            z = next((x for x in zs if len(x["correct"]) == len(ft["correct"])), None)
            if z is not None:
                return paired(ft["correct"], z["correct"])
    return None


def report(cache: Path, out_dir: Path, command: str, task: str | None = None) -> list[dict[str, Any]]:
    rows = [summary_line(r) for r in load_points(cache, task)]
    for r in rows:
        g = _ft_gain(cache, r)
        r["full_ft_minus_zero_shot"] = g
        # a ratio over a gain whose CI reaches 0 says nothing: flag it rather than print a huge interval
        r["gain_recovered"]["resolved"] = bool(g and g["ci95"][0] > 0)
    if not rows:
        raise SystemExit(f"no measured point in {cache}/points yet" + (f" for --task {task}" if task else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "command": command,
        "grid": [asdict(p) for p in POINTS],
        "settings": {
            "steps": rows[0]["steps"],
            "batch_size": BATCH,
            "lora_lr": LORA_LR,
            "block_lr": BLOCK_LR,
            "distill": {
                "lr": DISTILL_LR,
                "batch_size": DISTILL_BATCH,
                "max_length": DISTILL_LEN,
                "warmup_steps": DISTILL_WARMUP,
                "w_lm": 1.0,
                "w_kd": 30.0,
                "data": "builtin:python-docs",
            },
            "public_heldout_passages": HELDOUT_PASSAGES,
        },
        "points": rows,
    }
    tf = cache / "task_fidelity.json"
    if tf.is_file():  # written by --task-fidelity
        doc["task_text_fidelity"] = json.loads(tf.read_text())
    (out_dir / "offline.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    plot(rows, out_dir / "offline.png")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--task", default="demo", choices=["demo", "hidden_rules"])
    ap.add_argument("--eval-items", type=int, default=None, help="use the first N multiple-choice items")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--timing-rounds", type=int, default=2)
    ap.add_argument("--baseline-first", action="store_true", help="train the full fine-tune before the zero-shot eval")
    ap.add_argument("--cache", default=".cache/offline_sweep")
    ap.add_argument("--only", action="append", default=[], help="point name (repeatable); default: all")
    ap.add_argument("--out", default=None, help="also write the JSON lines here")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--report",
        default=None,
        help="write offline.json and offline.png of the cached points here (prints the markdown table)",
    )
    ap.add_argument(
        "--task-fidelity",
        action="store_true",
        help="emulator vs full model on 16 of the client's training records (hidden MSE, perplexity ratio)",
    )
    ap.add_argument("--distill-only", action="store_true", help="only build the distilled emulators (a 2nd process)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.report:
        rows = report(
            Path(args.cache), Path(args.report), "python -m benchmarks.bench_offline_sweep (see points)", args.task
        )
        print(markdown_table(rows))
        return 0
    points = [p for p in POINTS if not args.only or p.name in args.only]
    if not points:
        raise SystemExit(f"no point named {args.only}; known: {', '.join(p.name for p in POINTS)}")
    sweep = Sweep(args)
    cmd = "python -m benchmarks.bench_offline_sweep " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.task_fidelity:
        from guardedp2p.designs.offline.emulator import emulator_fidelity

        out = {}
        for p in points:
            if p.adapter == "full" and p.depth == 2:
                emu, _ = sweep.emulator(p)
                f = emulator_fidelity(emu, sweep.model, sweep.task.train_examples[:16], pad_id=sweep.pad)
                out[p.name] = {k: round(v, 4) for k, v in f.items()}
                _log(f"task-text fidelity {p.name}: {out[p.name]}")
        (Path(args.cache) / "task_fidelity.json").write_text(json.dumps(out, indent=1, sort_keys=True))
        return 0
    if args.distill_only:
        for p in sorted((p for p in points if p.distill), key=lambda p: (p.distill, p.keep != 0.5, -p.keep)):
            t0 = time.perf_counter()
            _, info = sweep.emulator(p)
            _log(f"distilled {p.name}: {info.get('distillation')} in {time.perf_counter() - t0:.0f}s")
        return 0
    lines = []
    for p in points:
        t0 = time.perf_counter()
        r = summary_line(sweep.point(p))
        r["command"] = cmd.strip()
        _log(f"point {p.name} done in {time.perf_counter() - t0:.0f}s")
        print(json.dumps(r, sort_keys=True), flush=True)
        lines.append(r)
        if args.out:
            Path(args.out).write_text("".join(json.dumps(x, sort_keys=True) + "\n" for x in lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
