"""Offline GuardedTuning in one process, through the Python API.

The provider builds an *emulator* of its model (the client's edge blocks exactly, the middle compressed by
uniform layer drop) and signs it with its Ed25519 key. The client downloads it over the channel, verifies the
signature and every SHA-256 before loading anything, fine-tunes its adapters locally with no per-step traffic,
and uploads only the adapter weights as a signed bundle. The provider verifies the bundle and plugs the adapters
into its full model.

The run prints the five numbers of offsite-tuning: zero-shot of the full model, full fine-tuning (what Online
would compute), the emulator before and after tuning, and plug-in (the tuned adapters on the full model).
Here the client can compute all five because the example model is public; in a real deployment only the
provider holds the full model, so only it can measure plug-in.

    python examples/loopback_offline.py            # embedded SmolLM2-135M-Instruct, demo records
    python examples/loopback_offline.py --fast     # tiny random model, seconds
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from _tiny import base_parser, print_summary, setup_fast

from guardedp2p.crypto.keys import generate_keypair
from guardedp2p.designs.offline.build import EmulatorBuildOptions, build_emulator_folder
from guardedp2p.designs.offline.emulator import EmulatorConfig
from guardedp2p.designs.offline.run import OfflineOptions, tune_offline
from guardedp2p.service.client import TuneOptions
from guardedp2p.service.provider import ProviderOptions, build_provider_app
from guardedp2p.train.config import TrainConfig
from guardedp2p.transport.inproc import InProcClientChannel


def main() -> dict:
    ap = base_parser(__doc__.split("\n\n")[0])
    ap.add_argument(
        "--emulator-layers", type=int, default=None, help="middle blocks the emulator keeps (default: half)"
    )
    ap.add_argument("--quantize", default="none", help="weight codes of the kept middle blocks: none, int8, int4, nf4")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="guardedp2p-example-") as tmp:
        work = Path(tmp)
        model, data, device = args.model, None, "auto"
        train = TrainConfig(steps=args.steps or 20, batch_size=4, lr=2e-3)
        if args.fast:
            model, data = setup_fast(work)
            device = "cpu"
            train = TrainConfig(
                steps=args.steps or 6, batch_size=4, lr=1e-2, warmup_steps=1, max_length=16, lora_r=4, lora_alpha=8
            )

        # Both parties need a signing key: the provider signs the emulator, the client signs its adapter bundle.
        # (In real life each runs `guardedp2p keys generate` on its own machine and sends the other NAME.sign.pub.)
        keys = work / "keys"
        generate_keypair(keys, "provider")
        generate_keypair(keys, "client")

        # --- provider: build and sign the emulator once (CLI: guardedp2p provider emulator build)
        emu_dir = work / "emulator"
        build_emulator_folder(
            EmulatorBuildOptions(
                model=model,
                out=str(emu_dir),
                keys=str(keys),
                key_name="provider",
                device=device,
                progress=False,
                emulator=EmulatorConfig(
                    bottom_layers=2, top_layers=2, emulator_layers=args.emulator_layers, quantize=args.quantize
                ),
            )
        )
        app = build_provider_app(
            ProviderOptions(model=model, protocols=("offline",), emulator_dir=str(emu_dir), device=device)
        )
        # Where received bundles land and whose signatures are trusted. ProviderOptions has no field for these
        # yet, so they go straight into the app's resources (without them: a temporary folder, integrity only).
        app.resources.upload_dir = str(work / "uploads")
        app.resources.client_verify_keys = [keys / "client.sign.pub"]

        # --- client: download + verify the emulator, tune locally, upload the signed adapters
        opts = TuneOptions(
            protocol="offline", model=model, data=data, out=args.out or str(work / "run"), train=train, device=device
        )
        off = OfflineOptions(
            provider_verify_key=keys / "provider.sign.pub",  # pinned: any other signer is refused
            client_keys=str(keys),
            client_key_name="client",
        )
        summary = tune_offline(opts, lambda: InProcClientChannel(app), offline=off)

        print_summary(summary)
        better = "lower" if summary["eval_metric"] == "loss" else "higher"
        print(f"the five numbers (metric: {summary['eval_metric']}, {better} is better)")
        for k in ("zero_shot_full", "full_finetune", "emulator_zero_shot", "emulator_finetune", "plug_in"):
            v = summary[k]
            print(f"  {k:20s} {'n/a' if isinstance(v, float) and math.isnan(v) else f'{v:.4f}'}")
        print(
            f"emulator: {summary['emulator_bytes']} bytes down once; adapters: {summary['adapter_upload_bytes']} bytes up once; "
            f"per-step traffic: {summary['bytes_per_step']:.0f} bytes"
        )

        # --- provider: plug the received, verified adapters into its full model (CLI: provider emulator plug-in)
        from guardedp2p.designs.offline.plugin import plug_in
        from guardedp2p.engine.loading import load_causal_lm

        bundle = next((work / "uploads").glob("bundle-*"))
        full, _ = load_causal_lm(model, device=device)
        plugged = plug_in(full, bundle, keys / "client.sign.pub")
        print(
            f"provider: bundle {bundle.name} verified (signer {plugged.bundle.signer}, pinned={plugged.bundle.signer_pinned}); "
            f"{sum(plugged.loaded.values())} LoRA tensors plugged into the full model"
        )
        return summary


if __name__ == "__main__":
    main()
