"""Split generation with your tuned adapters, through the Python API (issue 18).

After `client tune`, the client holds only its bottom and top blocks and its adapter; the provider keeps the
trunk. Generation uses the same split: the client runs embeddings, bottom, top and head with its adapter, the
provider runs the trunk with a KV cache for the session, and after the prompt each new token sends one position's
activation up and one down. Here both parties share one process over the in-process channel (the same protocol
code and byte counts as over ZeroMQ); the example tunes an Online adapter briefly (or takes `--adapter DIR`), then
generates through the split and with the unsplit model and the same adapter, and checks the tokens are identical.

    python examples/generate.py                            # embedded SmolLM2-135M-Instruct, a short Online tune
    python examples/generate.py --adapter runs/mine/adapter --prompt "Tell me a joke"
    python examples/generate.py --fast                     # tiny random model, seconds (what the tests run)
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from _tiny import base_parser, setup_fast

from guardedp2p.designs.online.generate import (
    GenerateConfig,
    SplitGenerator,
    encode_prompt,
    load_generation_client,
    open_generation_session,
)
from guardedp2p.engine.loading import load_causal_lm
from guardedp2p.service.client import TuneOptions, tune
from guardedp2p.service.provider import ProviderOptions, build_provider_app
from guardedp2p.train.config import TrainConfig
from guardedp2p.transport.inproc import InProcClientChannel


def main() -> None:
    ap = base_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", default=None, help="an adapter folder from `client tune` (skips the short tune)")
    ap.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="guardedp2p-example-") as tmp:
        work = Path(tmp)
        model, data, device = args.model, None, "auto"
        train = TrainConfig(steps=args.steps or 10, batch_size=4, lr=2e-3)
        prompts = args.prompt or ["Write one sentence about the sea.", "What is a good name for a cat?"]
        if args.fast:
            model, data = setup_fast(work)
            device = "cpu"
            train = TrainConfig(steps=args.steps or 4, batch_size=4, lr=1e-2, warmup_steps=1, max_length=16, lora_r=4)
            prompts = args.prompt or ["w1 w2 w3", "w10 w11"]

        # --- provider: the frozen trunk only; Online sessions serve both tuning and generation
        app = build_provider_app(ProviderOptions(model=model, protocols=("online", "gradfree"), device=device))

        # --- client: an adapter, from a short Online tune unless one was given
        adapter = args.adapter
        if adapter is None:
            out = args.out or str(work / "run")
            opts = TuneOptions(protocol="online", model=model, data=data, out=out, train=train, device=device)
            opts.skip_eval, opts.progress = True, False
            adapter = tune(opts, lambda: InProcClientChannel(app))["adapter_dir"]
            print(f"tuned an Online adapter: {adapter}")

        full, tok = load_causal_lm(model, device="cpu")
        client = load_generation_client(
            full_model=copy.deepcopy(full), tokenizer=tok, adapter=adapter, device="cpu", dtype=None
        )
        chat = getattr(tok, "chat_template", None) is not None
        ids = [encode_prompt(tok, p, chat=chat) for p in prompts]
        cfg = GenerateConfig(max_new_tokens=args.max_new_tokens, batch_size=1)  # as the local reference below

        # --- split generation over a session (greedy, the model's EOS)
        session = open_generation_session(lambda: InProcClientChannel(app), client)
        gen = SplitGenerator(client.bottom, client.top, tok, session.trunk, generation_config=client.generation_config)
        results = gen.generate(ids, cfg)
        wire = session.session.stats
        session.close()

        # --- the same adapter on the unsplit model, locally: transformers' generate, one prompt at a time
        from peft import PeftModel

        local = PeftModel.from_pretrained(full, str(adapter)).eval()
        same = True
        for prompt, p, r in zip(prompts, ids, results):
            with torch.inference_mode():
                out = local.generate(input_ids=torch.tensor([p]), max_new_tokens=args.max_new_tokens, do_sample=False)
            local_tokens = out[0, len(p) :].tolist()
            same = same and local_tokens == r.tokens
            print(f"prompt: {prompt!r}\n  split ({r.finish_reason}, {len(r.tokens)} tokens): {r.text!r}")
        steps = max(1, gen.stats.decode_steps)
        print(f"split tokens == local tokens: {same}")
        print(
            f"decode steps: {gen.stats.decode_steps}, bytes on the wire: {wire.total_up} up / {wire.total_down} down "
            f"(~{wire.bytes_up['ACT_UP'] // (steps + gen.stats.batches)} B per ACT_UP)"
        )


if __name__ == "__main__":
    main()
