"""``guardedp2p client …``: fine-tune on private data with a provider, without sending the data.

``client tune`` checks everything it can before it connects or loads a model (options, keys, endpoint, model path
and depth against the split, the data as training will read it, the output folder), so a mistake costs seconds;
``--dry-run`` stops there and prints the plan. During the run SIGINT/SIGTERM stop at a step boundary with a
checkpoint (:func:`guardedp2p.service.runner.stop_on_signals`) and the exact command that resumes it is printed.
"""

from __future__ import annotations

import shlex
import signal
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from guardedp2p.cli.common import err_console, friendly_errors, print_json, setup_logging
from guardedp2p.cli.config import (
    CONFIG,
    CONNECTION,
    DATA,
    DESIGN,
    ENV_PREFIX,
    MODEL,
    OUTPUTS,
    PRIVACY,
    TRAINING,
    ConfigCommand,
    choice,
    config_option,
    in_panel,
    metavar,
    print_config_option,
    print_merged_config,
)
from guardedp2p.cli.data_options import (
    allow_network_option,
    chat_template_option,
    data_kind_option,
    field_mapping,
    input_field_option,
    instruction_field_option,
    loss_on_option,
    messages_field_option,
    output_field_option,
    text_field_option,
)
from guardedp2p.cli.generate import chat_cmd, generate_cmd
from guardedp2p.designs import DESIGN_NAMES
from guardedp2p.designs.online.pipeline import default_micro_batches
from guardedp2p.errors import ConfigError
from guardedp2p.wire.handshake import FLOAT_CODECS

client_app = typer.Typer(
    help="Client side: holds the private data, trains its adapters with the provider's help.", no_args_is_help=True
)

PROTOCOL_HELP = "online (adapters on both ends, activations and gradients cross), gradfree (top adapter only, no gradient crosses), offline (tune locally on a signed emulator)."
SCHEDULES = ("constant", "cosine", "linear")
TOP_TRAIN = ("lora", "blocks")
TOP_BLOCKS_LR = 5e-4  # the frontier's gf:topblocks:5e-4 (docs/results/frontier.md)
DTYPES = ("fp32", "bf16", "fp16")
REPORT_TO_HELP = (
    "Experiment tracking, as transformers' report_to: tensorboard (offline, OUT/tensorboard), mlflow, wandb, "
    "several comma-separated, all (the installed ones) or none. Logs loss, learning rate, bytes, step times, "
    "evaluation and the privacy settings."
)


NOISE_HELP = (
    "Noise on what is sent (overrides the --privacy preset's): gaussian:SCALE, laplace:SCALE, "
    "gaussian:clip=C,z=Z,grad_clip=G,grad_z=Z (per-record clipped Gaussian on the activations and, online, the "
    "gradient sent up; epsilon over the whole run from dp-accounting in the summary), dx:EPS or "
    "dx:eps=EPS (dx-privacy on the input embeddings)."
)
PRIVACY_PRESET_HELP = (
    "Named protection (docs/user-guide.md, 'Privacy settings'; measured in docs/results/frontier.md): off; "
    "balanced (dx-privacy on rare input tokens: names, addresses); fields (balanced plus every digit: dates and "
    "account numbers too; the best measured trade-off with Gradfree --top-train blocks); strong (per-record clipped Gaussian "
    "calibrated to epsilon 8 over the run; costs most of the fine-tuning gain)."
)


def parse_noise(spec: str | None) -> dict[str, Any]:
    """``--noise``: ``gaussian:0.1``, ``laplace:0.05``, ``dx:30`` or ``KIND:key=value,...`` (every field of
    :class:`guardedp2p.privacy.noise.NoiseConfig` but the seed); empty or ``none``: no noise."""
    if not spec or spec == "none":
        return {}
    from guardedp2p.privacy.noise import parse_noise_spec

    return parse_noise_spec(spec)


def obfuscation_options(weight: float, public: str | None) -> Any:
    """``--obfuscate W [--public-text FILE]``: the learned defence's config, or None when W is 0."""
    if not weight:
        return None
    from guardedp2p.privacy.obfuscation import ObfuscationConfig

    cfg = ObfuscationConfig(weight=weight, public_text=public or "demo-aux")
    cfg.validate()
    return cfg


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


def check_client_keys(
    connect: str, provider_key: Path | None, keys: Path | None, name: str, insecure: bool
) -> dict[str, str]:
    """The endpoint and key files, read before anything slow happens; what the plan says about them."""
    from guardedp2p.crypto.keys import fingerprint, load_keypair, load_public_key
    from guardedp2p.transport.endpoints import check_endpoint

    check_endpoint(connect, "connect", resolve=True)
    if insecure:
        return {"endpoint": f"{connect} (INSECURE: plaintext, unauthenticated)"}
    if provider_key is None or keys is None:
        raise ConfigError(
            "pass --provider-key PROVIDER.key (the provider's public key) and --keys DIR (your key pair), or "
            "--insecure for a plaintext debug run"
        )
    provider = load_public_key(provider_key)
    public, _ = load_keypair(keys, name)
    return {
        "endpoint": f"{connect} (CURVE, provider key {fingerprint(provider)} pinned)",
        "identity": f"{keys}/{name}.key ({fingerprint(public)})",
    }


def resume_command(argv: list[str]) -> str:
    """The command line that resumes this run: the same arguments, ``--overwrite`` dropped, ``--resume`` added."""
    args = [a for a in argv[1:] if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(["guardedp2p", *args])


def report_stop(signum: int, step: int | None, out: Path, *, aborted: bool, total: int, as_json: bool) -> int:
    """Say where the stopped run's checkpoint is and how to resume it; return the exit code (128 + signal)."""
    from guardedp2p.service.client import checkpoint_step
    from guardedp2p.service.runner import SIGNAL_NAMES

    saved = checkpoint_step(out)
    how = SIGNAL_NAMES.get(signum, f"signal {signum}")
    cmd = resume_command(sys.argv)
    ckpt = out / "checkpoint"
    if saved is not None:
        what = "abandoned the step in flight" if aborted else "stopped between steps"
        lines = [
            f"[yellow]{how}[/]: {what}; checkpoint at step {saved} of {total} in {ckpt}",
            "resume with:",
            f"  {cmd}",
        ]
    else:
        lines = [f"[yellow]{how}[/]: stopped before any step was trained; nothing to resume, run the command again"]
    for line in lines:
        err_console.print(line, highlight=False, soft_wrap=True)
    code = 128 + int(signum)
    if as_json:
        print_json(
            {
                "ok": False,
                "error": "RunStopped",
                "signal": how,
                "step": step if step is not None else saved,
                "checkpoint": str(ckpt) if saved is not None else None,
                "checkpoint_step": saved,
                "resume": cmd if saved is not None else None,
                "exit_code": code,
            }
        )
    return code


@client_app.command(
    "tune",
    cls=ConfigCommand,
    context_settings={"auto_envvar_prefix": ENV_PREFIX, "help_option_names": ["-h", "--help"]},
)
@friendly_errors
def tune_cmd(
    ctx: typer.Context,
    # ---------------------------------------------------------------- connection
    protocol: str = typer.Option(
        "online",
        help=PROTOCOL_HELP,
        parser=choice("a design", DESIGN_NAMES),
        metavar=metavar(DESIGN_NAMES),
        rich_help_panel=CONNECTION,
    ),
    connect: str = typer.Option(
        "tcp://127.0.0.1:5555", help="The provider's ZeroMQ endpoint.", rich_help_panel=CONNECTION
    ),
    provider_key: Path | None = typer.Option(
        None,
        help="The provider's public key file (pinned: a server without the matching secret is refused).",
        rich_help_panel=CONNECTION,
    ),
    keys: Path | None = typer.Option(
        None,
        help="Folder holding this client's key pair (from `guardedp2p keys generate`).",
        rich_help_panel=CONNECTION,
    ),
    name: str = typer.Option("client", help="Key name inside --keys.", rich_help_panel=CONNECTION),
    timeout: float = typer.Option(
        30.0, help="Seconds to wait for each reply before the provider counts as silent.", rich_help_panel=CONNECTION
    ),
    connect_timeout: float = typer.Option(
        2.0,
        help="Seconds to wait for the encrypted handshake when connecting (raise it for slow links).",
        rich_help_panel=CONNECTION,
    ),
    retries: int = typer.Option(
        3,
        help="Reconnect attempts (with back-off) before giving up with a checkpoint.",
        rich_help_panel=CONNECTION,
    ),
    refuse_recording: bool = typer.Option(
        False,
        "--refuse-recording",
        help="End the session if the provider announces that it records transcripts.",
        rich_help_panel=CONNECTION,
    ),
    insecure: bool = typer.Option(
        False,
        "--insecure",
        help="Plaintext, unauthenticated ZeroMQ (debug only; never read from the environment).",
        rich_help_panel=CONNECTION,
        allow_from_autoenv=False,
    ),
    # ---------------------------------------------------------------- model and split
    model: str = typer.Option(
        "default",
        help="The same base model as the provider's (folder or 'default'); the fingerprints must match.",
        rich_help_panel=MODEL,
    ),
    bottom_layers: int = typer.Option(
        2, help="Blocks before the trunk (must match the provider).", rich_help_panel=MODEL
    ),
    top_layers: int = typer.Option(2, help="Blocks after the trunk (must match the provider).", rich_help_panel=MODEL),
    device: str = typer.Option(
        "auto",
        help="Where the client's parts run: auto (CUDA when present), cpu, cuda or cuda:N.",
        rich_help_panel=MODEL,
    ),
    dtype: str = typer.Option(
        "fp32",
        help="Precision of the client's frozen weights (LoRA weights stay fp32; the fingerprint is unaffected). bf16 halves the memory of big models, on CPU and GPU.",
        parser=choice("a precision", DTYPES),
        metavar=metavar(DTYPES),
        rich_help_panel=MODEL,
    ),
    # ---------------------------------------------------------------- data
    data: Path | None = typer.Option(
        None,
        help="Training data: .jsonl/.json/.csv/.parquet or a datasets folder of text, chat or instruction records (see `guardedp2p data check`). Default: the shipped synthetic demo records.",
        rich_help_panel=DATA,
    ),
    eval_data: Path | None = typer.Option(
        None,
        help="Evaluation data: multiple choice ('question','choices','label') or text. Default: held-out part of --data.",
        rich_help_panel=DATA,
    ),
    data_kind: str = in_panel(DATA, data_kind_option()),
    text_field: str | None = in_panel(DATA, text_field_option()),
    messages_field: str | None = in_panel(DATA, messages_field_option()),
    instruction_field: str | None = in_panel(DATA, instruction_field_option()),
    input_field: str | None = in_panel(DATA, input_field_option()),
    output_field: str | None = in_panel(DATA, output_field_option()),
    loss_on: str = in_panel(DATA, loss_on_option()),
    chat_template: bool = in_panel(DATA, chat_template_option()),
    allow_network: bool = in_panel(DATA, allow_network_option()),
    max_length: int = typer.Option(128, help="Longest sequence in tokens.", rich_help_panel=DATA),
    # ---------------------------------------------------------------- training
    steps: int = typer.Option(60, help="Optimizer steps.", rich_help_panel=TRAINING),
    batch_size: int = typer.Option(4, help="Sequences per micro-batch.", rich_help_panel=TRAINING),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step.", rich_help_panel=TRAINING),
    lr: float = typer.Option(2e-3, help="Peak learning rate (AdamW, after warm-up).", rich_help_panel=TRAINING),
    warmup: int | None = typer.Option(
        None,
        help="Linear warm-up steps. Default: 5, clipped to a tenth of --steps; a given value is clipped to --steps.",
        show_default=False,
        rich_help_panel=TRAINING,
    ),
    schedule: str = typer.Option(
        "constant",
        help="Learning rate after warm-up: constant (the default: best on short runs), cosine or linear (decay to 0 at --steps).",
        parser=choice("a schedule", SCHEDULES),
        metavar=metavar(SCHEDULES),
        rich_help_panel=TRAINING,
    ),
    max_grad_norm: float = typer.Option(
        1.0, help="Clip the adapters' gradient norm to this (0: no clipping).", rich_help_panel=TRAINING
    ),
    seed: int = typer.Option(0, help="Seed for LoRA init and data order.", rich_help_panel=TRAINING),
    lora_r: int = typer.Option(8, help="LoRA rank.", rich_help_panel=TRAINING),
    lora_alpha: int = typer.Option(16, help="LoRA alpha.", rich_help_panel=TRAINING),
    top_train: str = typer.Option(
        "lora",
        help="What trains in your top: lora (adapters only) or blocks (the top's transformer blocks and final norm "
        "in full, beside LoRA: capacity where no gradient crosses the wire; measured on the hidden-rules task, "
        "Gradfree 0.48 -> 0.92 accuracy, docs/results/frontier.md). The adapter then saves those blocks as PEFT "
        "modules_to_save.",
        parser=choice("a top training", TOP_TRAIN),
        metavar=metavar(TOP_TRAIN),
        rich_help_panel=TRAINING,
    ),
    top_lr: float | None = typer.Option(
        None,
        help="Learning rate of the top (default: --lr with --top-train lora; 5e-4 with blocks, the measured setting).",
        rich_help_panel=TRAINING,
    ),
    # ---------------------------------------------------------------- wire and privacy
    codec_up: str = typer.Option(
        "fp32",
        help="Codec of the activations sent up.",
        parser=choice("a codec", FLOAT_CODECS),
        metavar=metavar(FLOAT_CODECS),
        rich_help_panel=PRIVACY,
    ),
    codec_down: str = typer.Option(
        "fp32",
        help="Codec of the trunk output sent down.",
        parser=choice("a codec", FLOAT_CODECS),
        metavar=metavar(FLOAT_CODECS),
        rich_help_panel=PRIVACY,
    ),
    codec_grad: str = typer.Option(
        "fp32",
        help="Codec of the gradients (both ways, online only).",
        parser=choice("a codec", FLOAT_CODECS),
        metavar=metavar(FLOAT_CODECS),
        rich_help_panel=PRIVACY,
    ),
    dcor: float = typer.Option(
        0.0,
        help="Distance-correlation penalty weight (online): decorrelates what is sent from your tokens.",
        rich_help_panel=PRIVACY,
    ),
    noise: str | None = typer.Option(None, help=NOISE_HELP, rich_help_panel=PRIVACY),
    privacy: str = typer.Option(
        "off",
        help=PRIVACY_PRESET_HELP,
        parser=choice("a privacy preset", ("off", "balanced", "fields", "strong")),
        metavar="off|balanced|fields|strong",
        rich_help_panel=PRIVACY,
    ),
    obfuscate: float = typer.Option(
        0.0,
        help="Online: weight of the learned obfuscation (the bottom trains against an inverter the client trains "
        "on --public-text, so what is sent is hard to read back); 0: off.",
        rich_help_panel=PRIVACY,
    ),
    public_text: str | None = typer.Option(
        None,
        help="Public records in your data's style (JSONL of {'text': ...}; never private data): the balanced "
        "preset's keep list and the obfuscation's inverter. Default: the shipped demo records of other people.",
        rich_help_panel=PRIVACY,
    ),
    pseudonymize: Path | None = typer.Option(
        None,
        "--pseudonymize",
        help='JSON schema {"field": ["value", ...]} of categorical fields written \'field: value\' in your '
        "records: each value is replaced, before anything is sent, by another value of the same field chosen by "
        "your secret key (the same in every record), so the provider reads the wrong one. The key stays in "
        "--pseudonym-key; `client generate --adapter OUT/adapter` applies it to prompts and answers. Protects a "
        "field only as far as its values are about equally frequent (docs/results/frontier.md).",
        rich_help_panel=PRIVACY,
    ),
    pseudonym_key: Path | None = typer.Option(
        None,
        help="File of the --pseudonymize key (hex, owner-only; created if missing). Default: OUT/pseudonym.key. "
        "Never sent; lose it and the adapter no longer understands your data.",
        rich_help_panel=PRIVACY,
    ),
    micro_batches: int | None = typer.Option(
        None,
        min=1,
        help="Pipeline each batch as this many micro-batches (the provider computes one while you compute "
        "another; the same task gradient; ignored with --dcor or --obfuscate, which are defined per batch); 1: off. "
        "Default: 2 for Online, 4 for Gradfree (the fastest of each on a 2-core CPU, docs/results/perf.md).",
        rich_help_panel=TRAINING,
    ),
    # ---------------------------------------------------------------- design-specific
    no_cache: bool = typer.Option(
        False, "--no-cache", help="Gradfree: do not cache trunk outputs.", rich_help_panel=DESIGN
    ),
    provider_sign_key: Path | None = typer.Option(
        None,
        help="Offline: the provider's public signing key (NAME.sign.pub); the emulator is refused unless its manifest verifies against it.",
        rich_help_panel=DESIGN,
    ),
    kit: Path | None = typer.Option(
        None,
        help="Online/Gradfree: the provider's signed client kit (`provider kit build`) instead of --model; verified with --provider-sign-key.",
        rich_help_panel=DESIGN,
    ),
    # ---------------------------------------------------------------- outputs and reporting
    out: Path = typer.Option(
        Path("runs/tune"),
        help="Output folder: adapter/ (PEFT format), checkpoint/, summary.json. Must be empty unless --resume or --overwrite.",
        rich_help_panel=OUTPUTS,
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the run in --out from its checkpoint.",
        rich_help_panel=OUTPUTS,
        allow_from_autoenv=False,
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace the run in a non-empty --out (its checkpoint, adapter and summary are deleted).",
        rich_help_panel=OUTPUTS,
        allow_from_autoenv=False,
    ),
    checkpoint_every: int = typer.Option(
        10, help="Save a resumable checkpoint every N steps.", rich_help_panel=OUTPUTS
    ),
    eval_every: int = typer.Option(
        0, help="Evaluate every N steps (0: before and after only).", rich_help_panel=OUTPUTS
    ),
    report_to: str = typer.Option("none", help=REPORT_TO_HELP, rich_help_panel=OUTPUTS),
    json_out: bool = typer.Option(
        False, "--json", help="Print the run summary as one JSON line at the end.", rich_help_panel=OUTPUTS
    ),
    verbose: int = typer.Option(
        0, "--verbose", "-v", count=True, help="More logging (-vv for debug).", rich_help_panel=OUTPUTS
    ),
    # ---------------------------------------------------------------- configuration
    config: Path | None = config_option(),
    print_config: bool = print_config_option(),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Check everything (options, keys, endpoint, model path and split, data, --out) without connecting or loading the model, print the plan and exit.",
        rich_help_panel=CONFIG,
        allow_from_autoenv=False,
    ),
) -> None:
    """Fine-tune your adapters with the provider over an authenticated, encrypted channel.

    Options come from the command line, then GUARDEDP2P_<OPTION> environment variables (e.g. GUARDEDP2P_MODEL),
    then --config FILE, then the defaults shown.
    """
    if print_config:
        print_merged_config(ctx)
        return
    setup_logging(verbose, quiet=json_out and verbose == 0)
    from guardedp2p.service.client import TuneOptions, check_out_dir, effective_warmup, plan_tune
    from guardedp2p.train.config import TrainConfig
    from guardedp2p.train.reporting import check_available, parse_report_to

    train = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        warmup_steps=effective_warmup(warmup, steps),
        max_length=max_length,
        seed=seed,
        schedule=schedule,
        max_grad_norm=max_grad_norm,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        top_train=top_train,
        top_lr=top_lr if top_lr is not None else (TOP_BLOCKS_LR if top_train == "blocks" else None),
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
        privacy=privacy,
        public_text=public_text or "demo-aux",
        obfuscation=obfuscation_options(obfuscate, public_text),
        micro_batches=micro_batches or default_micro_batches(protocol),
        resume=resume,
        timeout=timeout,
        retries=retries,
        cache=not no_cache,
        device=device,
        dtype=dtype,
        refuse_recording=refuse_recording,
        data_mapping=field_mapping(data_kind, text_field, messages_field, instruction_field, input_field, output_field),
        loss_on=loss_on,
        chat_template=chat_template,
        allow_network=allow_network,
        kit=str(kit) if kit else None,
        kit_verify_key=str(provider_sign_key) if kit and provider_sign_key else None,
        pseudonym=str(pseudonymize) if pseudonymize else None,
        pseudonym_key=str(pseudonym_key) if pseudonym_key else None,
    )
    if kit is not None and provider_sign_key is None:
        raise ConfigError("--kit needs --provider-sign-key PROVIDER.sign.pub to verify the kit's signature")
    # ---- every check that needs no provider and no weights, before connecting or loading anything
    out_action = check_out_dir(out, resume=resume, overwrite=overwrite, protocol=protocol)
    trackers = parse_report_to(report_to)
    check_available(trackers)
    extra = check_client_keys(connect, provider_key, keys, name, insecure)
    design_options: dict[str, Any] = {}
    if protocol == "offline":
        from guardedp2p.crypto.keys import load_signing_key, load_verify_key
        from guardedp2p.designs.offline.run import OfflineOptions

        if provider_sign_key is None:
            raise ConfigError(
                "--protocol offline needs --provider-sign-key PROVIDER.sign.pub to verify the emulator's signature"
            )
        load_verify_key(provider_sign_key)
        if keys is not None:
            load_signing_key(keys, name)
        design_options["offline"] = OfflineOptions(
            provider_verify_key=str(provider_sign_key), client_keys=str(keys) if keys else None, client_key_name=name
        )
    if trackers:
        extra["reporting"] = ", ".join(trackers)
    plan = plan_tune(opts, out_action=out_action, extra=extra)
    if dry_run:
        if json_out:
            print_json({"ok": True, "dry_run": True, **plan.to_dict()})
        else:
            typer.echo(plan.format_text())
            typer.echo("dry run: everything checks out; nothing was connected, loaded or written")
        return
    from guardedp2p.service.client import clear_outputs

    if overwrite:
        clear_outputs(out)
    if opts.data is None:
        err_console.print(
            'no --data given: training on the shipped synthetic demo records (summary.json says "demo")',
            highlight=False,
        )
    connect_fn = client_channel_factory(connect, provider_key, keys, name, insecure, handshake_timeout=connect_timeout)
    summary = execute_run(
        opts,
        connect_fn,
        plan.data,
        trackers,
        plan.to_dict(),
        console=Console(stderr=True),
        json_out=json_out,
        **design_options,
    )
    if json_out:
        print_json({k: v for k, v in summary.items() if k != "history"})
    else:
        from guardedp2p.cli.report import print_summary

        print_summary(summary, Console())


def execute_run(
    opts: Any,
    connect: Any,
    data: dict[str, Any],
    trackers: list[str],
    params: dict[str, Any],
    *,
    console: Console,
    json_out: bool,
    **design_options: Any,
) -> dict[str, Any]:
    """Run a checked :class:`~guardedp2p.service.client.TuneOptions` under the signal handlers and trackers.

    A signal ends it with the checkpoint's place and the resume command on stderr and exit code 128 + signal
    (130 for Ctrl-C, 143 for SIGTERM); the provider is told BYE on the way out.
    """
    from guardedp2p.service.client import run_tune
    from guardedp2p.service.runner import RunStopped, StepAborted, reporting, stop_on_signals
    from guardedp2p.train.reporting import make_reporters

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    reporters = make_reporters(trackers, out, run_name=out.name)
    for r in reporters:
        r.start(params)
    summary: dict[str, Any] = {}
    try:
        with stop_on_signals(), reporting(*reporters):
            summary = run_tune(opts, connect, data=data, console=console, **design_options)
    except (RunStopped, StepAborted) as stop:
        step = stop.step if isinstance(stop, RunStopped) else None
        aborted = stop.aborted if isinstance(stop, RunStopped) else True
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # one more Ctrl-C must not cut the resume hint
        try:
            code = report_stop(stop.signum, step, out, aborted=aborted, total=opts.train.steps, as_json=json_out)
        finally:
            signal.signal(signal.SIGINT, previous)
        raise typer.Exit(code) from None
    finally:
        for r in reporters:
            r.finish(summary)
    return summary


client_app.command("generate")(generate_cmd)
client_app.command("chat")(chat_cmd)
