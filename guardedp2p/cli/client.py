"""``guardedp2p client …``: fine-tune on private data with a provider, without sending the data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from guardedp2p.cli.common import friendly_errors, print_json, setup_logging
from guardedp2p.cli.generate import chat_cmd, generate_cmd
from guardedp2p.errors import ConfigError

client_app = typer.Typer(
    help="Client side: holds the private data, trains its adapters with the provider's help.", no_args_is_help=True
)

PROTOCOL_HELP = "online (adapters on both ends, activations and gradients cross), gradfree (top adapter only, no gradient crosses), offline (tune locally on a signed emulator)."


def parse_noise(spec: str | None) -> dict[str, Any]:
    """``gaussian:0.1`` / ``laplace:0.05`` (scale of the noise added to what is sent); empty: no noise."""
    if not spec or spec == "none":
        return {}
    kind, _, value = spec.partition(":")
    if kind not in ("gaussian", "laplace") or not value:
        raise ConfigError(f"--noise {spec!r}: use gaussian:SCALE or laplace:SCALE (e.g. gaussian:0.1)")
    try:
        scale = float(value)
    except ValueError:
        raise ConfigError(f"--noise {spec!r}: the scale must be a number") from None
    return {"kind": kind, "scale": scale}


def client_channel_factory(
    connect: str,
    provider_key: Path | None,
    keys: Path | None,
    name: str,
    insecure: bool,
    handshake_timeout: float = 2.0,
) -> Any:
    from guardedp2p.transport.zmq_client import ClientConfig, ZmqClientChannel

    if not insecure and (provider_key is None or keys is None):
        raise ConfigError(
            "pass --provider-key PROVIDER.key (the provider's public key) and --keys DIR (your key pair), or --insecure for a plaintext debug run"
        )
    cfg = ClientConfig(
        connect=connect,
        provider_public_key=str(provider_key) if provider_key else None,
        secret_key_file=str(keys) if keys else None,
        key_name=name,
        insecure=insecure,
        handshake_timeout=handshake_timeout,
    )
    return lambda: ZmqClientChannel.open(cfg)


@client_app.command("tune")
@friendly_errors
def tune_cmd(
    protocol: str = typer.Option("online", help=PROTOCOL_HELP),
    connect: str = typer.Option("tcp://127.0.0.1:5555", help="The provider's ZeroMQ endpoint."),
    provider_key: Path | None = typer.Option(
        None, help="The provider's public key file (pinned: a server without the matching secret is refused)."
    ),
    keys: Path | None = typer.Option(
        None, help="Folder holding this client's key pair (from `guardedp2p keys generate`)."
    ),
    name: str = typer.Option("client", help="Key name inside --keys."),
    model: str = typer.Option(
        "default", help="The same base model as the provider's (folder or 'default'); the fingerprints must match."
    ),
    data: Path | None = typer.Option(
        None,
        help="Training data: .jsonl/.csv/datasets folder with 'text', or 'prompt'+'response'. Default: the shipped synthetic demo records.",
    ),
    eval_data: Path | None = typer.Option(
        None,
        help="Evaluation data: multiple choice ('question','choices','label') or text. Default: held-out part of --data.",
    ),
    out: Path = typer.Option(
        Path("runs/tune"), help="Output folder: adapter/ (PEFT format), checkpoint/, summary.json."
    ),
    steps: int = typer.Option(60, help="Optimizer steps."),
    batch_size: int = typer.Option(4, help="Sequences per micro-batch."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step."),
    lr: float = typer.Option(2e-3, help="Peak learning rate (AdamW, after warm-up)."),
    warmup: int = typer.Option(5, help="Warm-up steps."),
    schedule: str = typer.Option(
        "constant", help="Learning-rate schedule after warm-up: constant, cosine or linear (decay to 0)."
    ),
    max_grad_norm: float = typer.Option(1.0, help="Clip the adapters' gradient norm to this (0: no clipping)."),
    max_length: int = typer.Option(128, help="Longest sequence in tokens."),
    seed: int = typer.Option(0, help="Seed for LoRA init and data order."),
    lora_r: int = typer.Option(8, help="LoRA rank."),
    lora_alpha: int = typer.Option(16, help="LoRA alpha."),
    bottom_layers: int = typer.Option(2, help="Blocks before the trunk (must match the provider)."),
    top_layers: int = typer.Option(2, help="Blocks after the trunk (must match the provider)."),
    codec_up: str = typer.Option(
        "fp32", help="Codec of the activations sent up: fp32, fp16, bf16, int8, int8-block, nf4, fp4."
    ),
    codec_down: str = typer.Option("fp32", help="Codec of the trunk output sent down."),
    codec_grad: str = typer.Option("fp32", help="Codec of the gradients (both ways, online only)."),
    dcor: float = typer.Option(
        0.0, help="Distance-correlation penalty weight (online): decorrelates what is sent from your tokens."
    ),
    noise: str | None = typer.Option(None, help="Noise on what is sent: gaussian:SCALE or laplace:SCALE."),
    checkpoint_every: int = typer.Option(10, help="Save a resumable checkpoint every N steps."),
    eval_every: int = typer.Option(0, help="Evaluate every N steps (0: before and after only)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from --out/checkpoint after an interruption."),
    timeout: float = typer.Option(30.0, help="Seconds to wait for each reply before the provider counts as silent."),
    connect_timeout: float = typer.Option(
        2.0, help="Seconds to wait for the encrypted handshake when connecting (raise it for slow links)."
    ),
    refuse_recording: bool = typer.Option(
        False, "--refuse-recording", help="End the session if the provider announces that it records transcripts."
    ),
    retries: int = typer.Option(3, help="Reconnect attempts (with back-off) before giving up with a checkpoint."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Gradfree: do not cache trunk outputs."),
    provider_sign_key: Path | None = typer.Option(
        None,
        help="Offline: the provider's public signing key (NAME.sign.pub); the emulator is refused unless its manifest verifies against it.",
    ),
    device: str = typer.Option(
        "auto", help="Where the client's parts run: auto (CUDA when present), cpu, cuda or cuda:N."
    ),
    dtype: str = typer.Option(
        "fp32",
        help="Precision of the client's frozen weights: fp32, bf16 or fp16 (LoRA weights stay fp32; the fingerprint is unaffected). bf16 halves the memory of big models, on CPU and GPU.",
    ),
    insecure: bool = typer.Option(False, "--insecure", help="Plaintext, unauthenticated ZeroMQ (debug only)."),
    json_out: bool = typer.Option(False, "--json", help="Print the run summary as one JSON line at the end."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More logging (-vv for debug)."),
) -> None:
    """Fine-tune your adapters with the provider over an authenticated, encrypted channel."""
    setup_logging(verbose, quiet=json_out and verbose == 0)
    from guardedp2p.designs import get_design
    from guardedp2p.engine.placement import parse_dtype
    from guardedp2p.service.client import TuneOptions
    from guardedp2p.train.config import TrainConfig

    run = get_design(protocol).load_run()  # an unknown --protocol fails here, naming the valid ones
    parse_dtype(dtype)  # a typo fails here, not after connecting and loading the model
    train = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        warmup_steps=warmup,
        max_length=max_length,
        seed=seed,
        schedule=schedule,
        max_grad_norm=max_grad_norm,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        dcor_alpha=dcor,
        checkpoint_every=checkpoint_every,
        eval_every=eval_every,
    )
    opts = TuneOptions(
        protocol=protocol,
        model=model,
        data=str(data) if data else None,
        eval_data=str(eval_data) if eval_data else None,
        out=str(out),
        train=train,
        bottom_layers=bottom_layers,
        top_layers=top_layers,
        codecs={"up": codec_up, "down": codec_down, "grad_up": codec_grad, "grad_down": codec_grad},
        noise=parse_noise(noise),
        resume=resume,
        timeout=timeout,
        retries=retries,
        cache=not no_cache,
        device=device,
        dtype=dtype,
        refuse_recording=refuse_recording,
    )
    connect_fn = client_channel_factory(connect, provider_key, keys, name, insecure, handshake_timeout=connect_timeout)
    design_options: dict[str, Any] = {}
    if protocol == "offline":
        from guardedp2p.designs.offline.run import OfflineOptions

        if provider_sign_key is None:
            raise ConfigError(
                "--protocol offline needs --provider-sign-key PROVIDER.sign.pub to verify the emulator's signature"
            )
        design_options["offline"] = OfflineOptions(
            provider_verify_key=str(provider_sign_key), client_keys=str(keys) if keys else None, client_key_name=name
        )
    summary = run(opts, connect_fn, console=Console(stderr=True), **design_options)
    if json_out:
        print_json({k: v for k, v in summary.items() if k != "history"})
    else:
        from guardedp2p.cli.report import print_summary

        print_summary(summary, Console())


client_app.command("generate")(generate_cmd)
client_app.command("chat")(chat_cmd)
