"""Measure what an honest-but-curious provider can rebuild of your training text from what it saw.

1. A provider that *records* every tensor it receives (`provider serve --record DIR`; here
   ProviderOptions(record_dir=...)) serves a short Online run. Recording is announced to the client in the
   handshake (ACCEPT carries record: true).
2. The attack harness (guardedp2p.attacks.runner.run_attacks) reads the transcript back and runs the data
   reconstruction attacks with only what the attacker really has: the observations, the *pre-trained* model,
   the public split and tokenizer, and public auxiliary text. SIP learns an inverter h1 -> tokens on the
   auxiliary text; BiSR(f) optimises token embeddings until the pre-trained bottom reproduces the observed h1;
   TAG and BiSR(b) match the gradient dL/dh2 (Online only).
3. The client's true token ids (replayed here from the same data order) are handed over *only for scoring*:
   ROUGE-L F1 between reconstruction and truth. The best attack's score is the "DRA effectiveness"; lower is
   more private. Compare codecs, --dcor and noise by rerunning with other settings.

This is an empirical measurement, not a guarantee (see SECURITY.md). The --fast mode only proves the plumbing:
its tiny random model and toy vocabulary make the numbers meaningless.

    python examples/evaluate_privacy.py                          # SmolLM2 + demo records (minutes on a CPU)
    python examples/evaluate_privacy.py --codec nf4 --dcor 0.5
    python examples/evaluate_privacy.py --fast
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from _tiny import base_parser, setup_fast, write_text_jsonl

from guardedp2p.attacks.runner import AttackSuiteConfig, run_attacks
from guardedp2p.attacks.transcript import load_transcript
from guardedp2p.data.collate import BatchIterator
from guardedp2p.engine.loading import load_causal_lm
from guardedp2p.engine.split import SplitConfig
from guardedp2p.service.client import TuneOptions, prepare_data, tune
from guardedp2p.service.provider import ProviderOptions, build_provider_app
from guardedp2p.train.config import TrainConfig
from guardedp2p.transport.inproc import InProcClientChannel


def main() -> dict:
    ap = base_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--codec", default="fp32", help="codec of h1 on the uplink (the attacker sees h1 after it)")
    ap.add_argument("--dcor", type=float, default=0.0, help="distance-correlation penalty weight")
    ap.add_argument(
        "--attacks", default="sip,bisr_f,tag", help="comma-separated: sip, bisr_b, bisr_f, bisr_bf, tag, lamp, eia"
    )
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="guardedp2p-example-") as tmp:
        work = Path(tmp)
        model, data, device = args.model, None, "auto"
        train = TrainConfig(steps=args.steps or 4, batch_size=2, lr=2e-3, dcor_alpha=args.dcor, max_length=64)
        attack_cfg = AttackSuiteConfig.fast()
        if args.fast:
            model, data = setup_fast(work)
            device = "cpu"
            train = TrainConfig(
                steps=args.steps or 2,
                batch_size=2,
                lr=1e-2,
                warmup_steps=1,
                max_length=16,
                lora_r=4,
                lora_alpha=8,
                dcor_alpha=args.dcor,
            )
            attack_cfg.sip.epochs, attack_cfg.sip.hidden = 2, 32
            attack_cfg.bisr_f.steps = 20
            attack_cfg.tag.steps = 10
            attack_cfg.bisr_b.steps = 5
            attack_cfg.eia.steps = 20

        # ---- 1. a recording provider serves a short Online run
        record = work / "transcript"
        app = build_provider_app(
            ProviderOptions(model=model, protocols=("online",), record_dir=str(record), device=device)
        )
        codecs = {"up": args.codec, "down": "fp32", "grad_up": "fp32", "grad_down": "fp32"}
        opts = TuneOptions(
            protocol="online",
            model=model,
            data=data,
            out=str(work / "run"),
            train=train,
            codecs=codecs,
            device=device,
            skip_eval=True,
        )  # no evaluation forwards: the transcript holds training steps only
        tune(opts, lambda: InProcClientChannel(app))

        # ---- 2. the attacker's view: observations + pre-trained model + public auxiliary text
        observations = load_transcript(record, train_only=True)
        pretrained, tok = load_causal_lm(model, device="cpu")
        if args.fast:
            aux_file = write_text_jsonl(work / "aux.jsonl", n=120, seed=1)
        else:
            from guardedp2p.data.demo import demo_paths

            aux_file = demo_paths().aux  # a disjoint population of the same kind of records
        aux = [json.loads(line)["text"] for line in Path(aux_file).read_text().splitlines() if line.strip()]
        transform = None
        if args.codec != "fp32":  # a defence-aware attacker trains SIP on codec-round-tripped activations
            from guardedp2p.attacks.common import codec_transform

            transform = codec_transform(args.codec)

        # ---- 3. ground truth for scoring only: the client's batches, replayed in the same order as training
        prepared = prepare_data(opts, tok)
        it = BatchIterator(prepared.train_examples, train.batch_size, seed=train.seed, pad_id=tok.pad_token_id)
        truth = [next(it)["input_ids"] for _ in observations]

        report = run_attacks(
            observations,
            pretrained,
            SplitConfig(2, 2),
            tok,
            aux,
            [a.strip() for a in args.attacks.split(",") if a.strip()],
            attack_cfg,
            ground_truth=truth,
            transform=transform,
            progress=not args.fast,
        )
        print(
            f"design {report.design}: {report.n_observations} observed steps, {report.n_sequences} sequences attacked"
        )
        for label, value in report.table():
            print(f"  {label:10s} ROUGE-L F1 {value}")
        if report.best is not None:
            print(
                f"DRA effectiveness (best attack, {report.best}): ROUGE-L F1 {report.best_rougeL:.3f}  (0: nothing recovered, 1: verbatim)"
            )
        for note in report.notes:
            print("note:", note)
        return report.as_dict()


if __name__ == "__main__":
    main()
