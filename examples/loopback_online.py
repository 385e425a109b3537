"""Online GuardedTuning in one process, through the Python API.

The provider application (it holds only the frozen middle blocks, the *trunk*) and the client (bottom and top
blocks with LoRA, and the private data) talk over the in-process channel: the same protocol code, message
encoding and byte counts as over ZeroMQ, without sockets or keys. Use it to try settings quickly, in notebooks
and in tests. For two processes or two machines, see examples/README.md ("Two terminals").

Per training step the client sends h1 (bottom output) up, gets h2 (trunk output) down, sends dL/dh2 up and gets
dL/dh1 down, so both the bottom and the top adapters train.

    python examples/loopback_online.py                       # embedded SmolLM2-135M-Instruct, demo records
    python examples/loopback_online.py --codec int8 --dcor 0.5
    python examples/loopback_online.py --fast                # tiny random model, seconds (what the tests run)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from _tiny import base_parser, print_summary, setup_fast

from guardedp2p.service.client import TuneOptions, tune
from guardedp2p.service.provider import ProviderOptions, build_provider_app
from guardedp2p.train.config import TrainConfig
from guardedp2p.transport.inproc import InProcClientChannel


def main() -> dict:
    ap = base_parser(__doc__.split("\n\n")[0])
    ap.add_argument(
        "--codec", default="fp32", help="wire codec for all four tensors: fp32, fp16, bf16, int8, int8-block, nf4, fp4"
    )
    ap.add_argument("--dcor", type=float, default=0.0, help="distance-correlation penalty weight (0: off)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="guardedp2p-example-") as tmp:
        work = Path(tmp)
        model, data, device = args.model, None, "auto"  # data None: the shipped synthetic private records
        train = TrainConfig(steps=args.steps or 20, batch_size=4, lr=2e-3, dcor_alpha=args.dcor)
        if args.fast:
            model, data = setup_fast(work)
            device = "cpu"
            train = TrainConfig(
                steps=args.steps or 6,
                batch_size=4,
                lr=1e-2,
                warmup_steps=1,
                max_length=16,
                lora_r=4,
                lora_alpha=8,
                dcor_alpha=args.dcor,
            )

        # --- provider side: load the model, keep only the frozen trunk, answer messages (no sockets here)
        app = build_provider_app(
            ProviderOptions(model=model, bottom_layers=2, top_layers=2, protocols=("online",), device=device)
        )

        # --- client side: same base model (the fingerprints of the shared layers must match), own data
        opts = TuneOptions(
            protocol="online",
            model=model,
            data=data,
            out=args.out or str(work / "run"),
            train=train,
            bottom_layers=2,
            top_layers=2,
            device=device,
            codecs={"up": args.codec, "down": args.codec, "grad_up": args.codec, "grad_down": args.codec},
        )
        summary = tune(opts, lambda: InProcClientChannel(app))  # the factory is called again on each reconnect

        print_summary(summary)
        print(f"gradient bytes on the wire: {summary['gradient_bytes']} (online sends gradients both ways)")
        print(
            f"adapter (PEFT folder): {summary['adapter_dir']}"
            + ("" if args.out else "  [temporary: pass --out DIR to keep it]")
        )
        return summary


if __name__ == "__main__":
    main()
