"""Bring your own model and data: a local Hugging Face model folder and a JSONL file.

guardedp2p never downloads anything: --model is a folder on disk holding config.json, the weights and the
tokenizer files (what `save_pretrained` writes, or a `huggingface-cli download` you did yourself), or 'default'
for the embedded SmolLM2-135M-Instruct. Provider and client must load the *same* base model: the handshake
compares a fingerprint over the layers both hold and refuses the session otherwise.

Training data is one JSON object per line, every line with the same fields, one of:

    {"text": "Patient Zara Novak, born 1987-10-12, ..."}                    language modelling: loss on every token
    {"prompt": "Summarise: ...", "response": "The patient ..."}            instruction tuning: loss on the response only

(.csv with the same column names, or a `datasets.save_to_disk` folder, work too.) Evaluation data (--eval-data)
is either the same kind (held-out loss) or multiple choice:

    {"question": "... ward code:", "choices": ["LM-7", "QX-4", "RB-2"], "label": 2}

Without --eval-data a slice of the training file is held out for the loss.

    python examples/byo_model_and_data.py --model ~/models/my-llama --data my_records.jsonl --out runs/mine
    python examples/byo_model_and_data.py --fast       # writes a tiny model folder and a small prompt/response JSONL
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from _tiny import base_parser, print_summary, setup_fast, write_instruction_jsonl

from guardedp2p.data.loaders import load_data
from guardedp2p.service.client import TuneOptions, tune
from guardedp2p.service.provider import ProviderOptions, build_provider_app
from guardedp2p.train.config import TrainConfig
from guardedp2p.transport.inproc import InProcClientChannel


def main() -> dict:
    ap = base_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="training JSONL/CSV ('text', or 'prompt'+'response')")
    ap.add_argument("--eval-data", default=None, help="evaluation file (same kind, or multiple choice)")
    ap.add_argument("--protocol", default="online", choices=["online", "gradfree"])
    ap.add_argument("--max-length", type=int, default=128, help="longest sequence in tokens (longer records are cut)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="guardedp2p-example-") as tmp:
        work = Path(tmp)
        model, data, device = args.model, args.data, "auto"
        train = TrainConfig(steps=args.steps or 20, batch_size=4, lr=2e-3, max_length=args.max_length)
        if args.fast:
            model, _ = setup_fast(work)
            data = str(write_instruction_jsonl(work / "my_records.jsonl"))
            device = "cpu"
            train = TrainConfig(
                steps=args.steps or 6, batch_size=4, lr=1e-2, warmup_steps=1, max_length=16, lora_r=4, lora_alpha=8
            )
        if data is None:
            ap.error("pass --data FILE.jsonl (or --fast to generate one)")

        # 1. Check the file before anything else: this is where format mistakes surface, with file and line.
        loaded = load_data(data)
        print(
            f"{data}: {len(loaded.records)} records of kind '{loaded.kind}' "
            "(lm: 'text'; instruction: 'prompt'+'response'; mc: 'question'+'choices'+'label')"
        )
        print("first record:", json.dumps(loaded.records[0])[:200])

        # 2. Tune, exactly as in loopback_online.py: provider app + client over the in-process channel.
        app = build_provider_app(ProviderOptions(model=model, protocols=(args.protocol,), device=device))
        out = Path(args.out or work / "run")
        opts = TuneOptions(
            protocol=args.protocol,
            model=model,
            data=data,
            eval_data=args.eval_data,
            out=str(out),
            train=train,
            device=device,
        )
        summary = tune(opts, lambda: InProcClientChannel(app))
        print_summary(summary)

        # 3. The result is a stock PEFT adapter of the *whole* model (LoRA on the client's edge blocks only):
        #    load it on top of the base model with plain transformers + peft and use it like any other.
        from peft import PeftModel

        from guardedp2p.engine.loading import load_causal_lm

        base, tok = load_causal_lm(model, device=device)
        tuned = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
        prompt = loaded.records[0].get("prompt") or loaded.records[0]["text"][:40]
        ids = tok(prompt, return_tensors="pt").to(base.device)
        gen = tuned.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        print(
            f"prompt: {prompt!r}\ncontinuation by the tuned model: {tok.decode(gen[0, ids['input_ids'].shape[1] :], skip_special_tokens=True)!r}"
        )
        print(
            f"outputs in {out}: adapter/ (PEFT), checkpoint/ (for --resume), summary.json"
            + ("" if args.out else "  [temporary: pass --out DIR to keep them]")
        )
        return summary


if __name__ == "__main__":
    main()
