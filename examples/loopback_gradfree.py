"""Gradfree GuardedTuning in one process, through the Python API.

Only the client's *top* adapter trains; its bottom blocks stay exactly the pre-trained ones. Per step the client
sends h1 up and gets h2 down, and that is all: no gradient ever crosses the wire, so gradient-matching attacks
(TAG, LAMP, BiSR(b)) have nothing to work on. Forward inversion of h1 remains (it is even easier, since the
provider holds the exact bottom), which is why this example lets you add noise to what is sent.

Because h2 is a deterministic function of the record, the client caches it: from the second epoch on, training
needs no traffic at all (turn off with --no-cache; noise turns it off too, as each epoch sends fresh noise).

    python examples/loopback_gradfree.py                          # embedded SmolLM2-135M-Instruct, demo records
    python examples/loopback_gradfree.py --codec int8 --noise 0.05
    python examples/loopback_gradfree.py --fast                   # tiny random model, seconds
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
        "--codec", default="fp32", help="wire codec up and down: fp32, fp16, bf16, int8, int8-block, nf4, fp4"
    )
    ap.add_argument(
        "--noise", type=float, default=0.0, help="Gaussian noise scale added to h1 before it is sent (0: none)"
    )
    ap.add_argument("--no-cache", action="store_true", help="do not cache trunk outputs")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="guardedp2p-example-") as tmp:
        work = Path(tmp)
        model, data, device = args.model, None, "auto"
        train = TrainConfig(steps=args.steps or 20, batch_size=4, lr=2e-3)
        if args.fast:
            model, data = setup_fast(work)
            device = "cpu"
            # 44 training records / batch 4 = 11 steps per epoch: 12 steps show one cached step
            train = TrainConfig(
                steps=args.steps or 12, batch_size=4, lr=1e-2, warmup_steps=1, max_length=16, lora_r=4, lora_alpha=8
            )

        # the provider may offer only gradfree: then no client can ever make it run a backward pass
        app = build_provider_app(ProviderOptions(model=model, protocols=("gradfree",), device=device))

        opts = TuneOptions(
            protocol="gradfree",
            model=model,
            data=data,
            out=args.out or str(work / "run"),
            train=train,
            device=device,
            codecs={"up": args.codec, "down": args.codec, "grad_up": "fp32", "grad_down": "fp32"},  # grad_* unused here
            noise={"kind": "gaussian", "scale": args.noise} if args.noise > 0 else {},
            cache=not args.no_cache,
        )
        summary = tune(opts, lambda: InProcClientChannel(app))

        print_summary(summary)
        assert summary["gradient_bytes"] == 0, "gradfree never sends a gradient"
        print(f"gradient bytes on the wire: {summary['gradient_bytes']}")
        if "cache_hits" in summary:
            print(
                f"trunk-output cache: {summary['cache_hits']} hits, {summary['cache_misses']} misses "
                "(per sequence: a hit is an h2 read from OUT/trunk_cache instead of the wire)"
            )
        return summary


if __name__ == "__main__":
    main()
