"""Attack benchmark on the shipped demo data, without running the protocol.

It simulates what the provider records at the *first* training step of an Online session (client LoRA at
initialisation, so the client's layers equal the pre-trained ones): h₁ = A_in⁰(x) passed through the uplink
codec, h₂ = T(h₁) and g₂ = ∂L/∂h₂ from the client's next-token loss. The private records are the demo "train"
population, the attacker's auxiliary text the disjoint "aux" population. For every codec the SIP inverter is
trained defence-aware (on codec-round-tripped activations).

    python -m guardedp2p.attacks.bench --records 16 --codecs fp32,int8,nf4 --attacks sip,bisr_f

Prints a table (ROUGE-L F1, detokenised, and per-token-joined for comparison with SplitLLM figures) and writes
JSON with ``--out``. This is a measurement of attack strength on an untrained client, the strongest case for
the attacker in this setting; the ``guardedp2p evaluate`` grid attacks real recorded transcripts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from guardedp2p.attacks.common import codec_transform
from guardedp2p.attacks.runner import ATTACKS, AttackSuiteConfig, run_attacks, score_report
from guardedp2p.attacks.transcript import Observation
from guardedp2p.engine.split import SplitConfig, loss_fn, split_model


def simulate_observations(
    model: Any,
    split: SplitConfig,
    batches: Sequence[dict[str, torch.Tensor]],
    transform: Any = None,
    *,
    gradients: bool = True,
) -> list[Observation]:
    """Provider-side observations of one Online step per batch, for a client whose layers are pre-trained."""
    parts = split_model(model, split)
    obs = []
    for step, b in enumerate(batches):
        ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
        with torch.no_grad():
            h1 = parts.bottom(ids, mask).float()
            if transform is not None:
                h1 = transform(h1)
            h2 = parts.trunk(h1, mask).float()
        g2 = None
        if gradients:
            h2v = h2.clone().requires_grad_(True)
            loss = loss_fn(parts.top(h2v, mask), labels)
            (g2,) = torch.autograd.grad(loss, h2v)
        obs.append(Observation("bench", step, mask.clone(), h1=h1, h2=h2, g2=g2, meta={"train": True}))
    return obs


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m guardedp2p.attacks.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--records", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--aux", type=int, default=300, help="auxiliary records used to train SIP")
    ap.add_argument("--bottom", type=int, default=2)
    ap.add_argument("--top", type=int, default=2)
    ap.add_argument("--codecs", default="fp32,int8,nf4")
    ap.add_argument("--attacks", default="sip,bisr_f")
    ap.add_argument("--fast", action="store_true", help="scaled-down budgets (AttackSuiteConfig.fast())")
    ap.add_argument("--sip-epochs", type=int, default=None)
    ap.add_argument("--f-steps", type=int, default=None, help="BiSR(f) steps")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from guardedp2p.data.collate import collate
    from guardedp2p.data.demo import demo_paths
    from guardedp2p.data.loaders import load_records
    from guardedp2p.data.tokenize import encode_lm
    from guardedp2p.engine.loading import load_causal_lm

    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    for a in attacks:
        if a not in ATTACKS:
            ap.error(f"unknown attack {a!r}; choose from {', '.join(ATTACKS)}")
    t0 = time.perf_counter()
    model, tok = load_causal_lm(args.model, device=args.device)
    load_s = time.perf_counter() - t0
    split = SplitConfig(args.bottom, args.top)
    paths = demo_paths()
    train = load_records(paths.train)[: args.records]
    aux = [r["text"] for r in load_records(paths.aux)[: args.aux]]
    ex = encode_lm(train, tok)
    batches = [collate(ex[i : i + args.batch], tok.pad_token_id) for i in range(0, len(ex), args.batch)]
    cfg = AttackSuiteConfig.fast() if args.fast else AttackSuiteConfig()
    if args.sip_epochs is not None:
        cfg.sip.epochs = args.sip_epochs
    if args.f_steps is not None:
        cfg.bisr_f.steps = args.f_steps
    needs_grad = any(a in ("bisr_b", "bisr_bf", "tag", "lamp") for a in attacks)

    rows: list[dict[str, Any]] = []
    for codec in [c.strip() for c in args.codecs.split(",") if c.strip()]:
        transform = None if codec == "fp32" else codec_transform(codec)
        obs = simulate_observations(model, split, batches, transform, gradients=needs_grad)
        gt = [b["input_ids"] for b in batches]
        t1 = time.perf_counter()
        rep = run_attacks(
            obs, model, split, tok, aux, attacks, cfg, ground_truth=gt, transform=transform, progress=not args.quiet
        )
        detok = {k: r.scores for k, r in rep.results.items() if r.scores is not None}
        score_report(rep, obs, gt, tok, "per_token")
        per_token = {k: r.scores for k, r in rep.results.items() if r.scores is not None}
        for k, s in detok.items():
            rows.append(
                {
                    "codec": codec,
                    "attack": rep.results[k].label,
                    "rougeL_detok": s.rougeL,
                    "rougeL_detok_std": s.rougeL_std,
                    "rougeL_per_token": per_token[k].rougeL,
                    "rouge1_detok": s.rouge1,
                    "rouge2_detok": s.rouge2,
                    "token_acc": s.token_acc,
                    "token_set_f1": s.token_set_f1,
                    "seconds": rep.results[k].seconds,
                    "sip_holdout_rougeL_ids": rep.sip_holdout_rougeL,
                    "example_hyp": s.samples[0].hyp_text if s.samples else "",
                    "example_ref": s.samples[0].ref_text if s.samples else "",
                }
            )
        if not args.quiet:
            print(f"[{codec}] attacked {rep.n_sequences} records in {time.perf_counter() - t1:.0f}s", file=sys.stderr)

    print(
        f"model {args.model} (load {load_s:.0f}s), split {args.bottom}/{args.top}, {len(train)} records, batch {args.batch}, "
        f"{len(aux)} aux records, {'fast' if args.fast else 'reference'} budgets, torch threads {torch.get_num_threads()}"
    )
    print(f"{'codec':8} {'attack':10} {'ROUGE-L detok':>15} {'ROUGE-L per-tok':>16} {'tok acc':>8} {'time s':>7}")
    for r in rows:
        print(
            f"{r['codec']:8} {r['attack']:10} {r['rougeL_detok']:9.3f}±{r['rougeL_detok_std']:.3f} {r['rougeL_per_token']:16.3f} "
            f"{r['token_acc']:8.3f} {r['seconds']:7.0f}"
        )
    if rows:
        print(
            "example (first record, last codec, last attack):\n  ref: "
            + rows[-1]["example_ref"]
            + "\n  hyp: "
            + rows[-1]["example_hyp"]
        )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"args": vars(args), "rows": rows, "config": cfg.as_dict()}, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
