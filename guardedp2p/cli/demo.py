"""``guardedp2p demo``: provider and client as two processes on 127.0.0.1 with CURVE, on the embedded model.

The keys are throwaway (a temporary folder) and nothing external is needed, so a new user sees the whole system
run (real keys, real encryption, a real model being tuned) with one command; the run's outputs stay in
``runs/demo/PROTOCOL`` so the adapter it reports can be looked at and loaded afterwards.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from guardedp2p.cli.common import friendly_errors, print_json, setup_logging
from guardedp2p.cli.config import choice, config_option, metavar, print_config_option, print_merged_config
from guardedp2p.designs import DESIGN_NAMES
from guardedp2p.errors import TransportError
from guardedp2p.wire.handshake import FLOAT_CODECS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ProviderProcess:
    """A provider subprocess for the demo, tests and examples; stops cleanly on exit."""

    def __init__(self, args: list[str], workdir: Path, *, ready_timeout: float = 300.0) -> None:
        self.ready = workdir / f"provider-ready-{os.getpid()}-{time.monotonic_ns()}"
        self.log_path = workdir / "provider.log"
        self.args = [
            sys.executable,
            "-m",
            "guardedp2p.cli.main",
            "provider",
            "serve",
            *args,
            "--ready-file",
            str(self.ready),
        ]
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ProviderProcess:
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout
        while not self.ready.exists():
            if self.proc.poll() is not None:
                raise TransportError(f"the provider process exited with code {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TransportError(f"the provider did not start within {self.ready_timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.1)
        return self

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        self.log.close()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


DEMO_ROOT = Path("runs/demo")
"""Where the demo keeps its runs (one folder per design) unless --out says otherwise."""


def demo_eval_items(steps: int, available: int) -> int:
    """Multiple-choice items the demo scores before and after: as many as steps, at least 16, at most all.

    Why: evaluation is forward passes through the provider on every item's four choices; scored on all 64 items
    it took 150 s of a 152 s ``demo --steps 2``. Scaled to the step budget, a short demo stays short and the
    default 60-step demo still scores (nearly) all items.
    """
    return max(1, min(available, max(16, steps)))


def demo(
    ctx: typer.Context,
    protocol: str = typer.Option(
        "online",
        help="online, gradfree or offline.",
        parser=choice("a design", DESIGN_NAMES),
        metavar=metavar(DESIGN_NAMES),
    ),
    steps: int = typer.Option(60, help="Optimizer steps (the evaluation scales with them: max(16, steps) items)."),
    model: str = typer.Option("default", help="Model folder or 'default' (embedded SmolLM2-135M-Instruct)."),
    batch_size: int = typer.Option(4),
    lr: float = typer.Option(2e-3),
    codec_up: str = typer.Option(
        "fp32",
        help="Codec for activations sent up.",
        parser=choice("a codec", FLOAT_CODECS),
        metavar=metavar(FLOAT_CODECS),
    ),
    codec_down: str = typer.Option(
        "fp32",
        help="Codec for trunk outputs sent down.",
        parser=choice("a codec", FLOAT_CODECS),
        metavar=metavar(FLOAT_CODECS),
    ),
    codec_grad: str = typer.Option(
        "fp32",
        help="Codec for gradients (online).",
        parser=choice("a codec", FLOAT_CODECS),
        metavar=metavar(FLOAT_CODECS),
    ),
    dcor: float = typer.Option(0.0, help="Distance-correlation penalty weight (online)."),
    noise: str | None = typer.Option(
        None, help="Noise on what is sent, as client tune --noise (e.g. gaussian:0.5, dx:30)."
    ),
    privacy: str = typer.Option(
        "off",
        help="Privacy preset, as client tune --privacy: off, balanced (dx on rare input tokens), fields (and on every digit), strong (formal DP).",
        parser=choice("a privacy preset", ("off", "balanced", "fields", "strong")),
        metavar="off|balanced|fields|strong",
    ),
    out: Path | None = typer.Option(
        None,
        help="Keep the run's outputs here. Default: runs/demo/PROTOCOL, replaced by each new demo of that design.",
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted demo from its checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run in a non-empty --out."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on the last line."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True),
    config: Path | None = config_option(),
    print_config: bool = print_config_option(),
) -> None:
    """Run a provider and a client on this machine over CURVE-encrypted ZeroMQ and tune on synthetic private records.

    The outputs (adapter, checkpoint, summary.json) stay in runs/demo/PROTOCOL (or --out). Ctrl-C stops at a step
    boundary and prints the command that resumes.
    """
    if print_config:
        print_merged_config(ctx)
        return
    run_demo(
        protocol=protocol,
        steps=steps,
        model=model,
        batch_size=batch_size,
        lr=lr,
        codecs={"up": codec_up, "down": codec_down, "grad_up": codec_grad, "grad_down": codec_grad},
        dcor=dcor,
        noise=noise,
        privacy=privacy,
        out=out,
        json_out=json_out,
        verbose=verbose,
        resume=resume,
        overwrite=overwrite,
    )


def _demo_out(protocol: str, out: Path | None, *, resume: bool, overwrite: bool, console: Console) -> Path:
    """The demo's output folder: --out under the same rules as ``client tune``; the default one is replaced."""
    from guardedp2p.service.client import check_out_dir, clear_outputs

    if out is not None:
        check_out_dir(out, resume=resume, overwrite=overwrite, protocol=protocol)
        if overwrite:
            clear_outputs(out)
        return out
    run_dir = DEMO_ROOT / protocol
    if not resume and run_dir.is_dir() and any(run_dir.iterdir()):
        console.print(f"replacing the previous {protocol} demo in {run_dir} (--resume continues it instead)")
        clear_outputs(run_dir)
    return run_dir


@friendly_errors
def run_demo(
    *,
    protocol: str,
    steps: int,
    model: str,
    batch_size: int,
    lr: float,
    codecs: dict[str, str],
    dcor: float,
    noise: str | None,
    out: Path | None,
    json_out: bool,
    verbose: int,
    resume: bool = False,
    overwrite: bool = False,
    privacy: str = "off",
) -> dict[str, Any]:
    setup_logging(verbose, quiet=verbose == 0)
    # a SIGTERM must unwind like Ctrl-C so the provider subprocess is stopped, not orphaned (during the run itself
    # the client's handlers stop at a step boundary instead: guardedp2p.service.runner.stop_on_signals)
    signal.signal(signal.SIGTERM, _interrupt)
    from guardedp2p.cli.client import client_channel_factory, execute_run, parse_noise
    from guardedp2p.cli.report import print_summary
    from guardedp2p.crypto.keys import generate_keypair
    from guardedp2p.data.demo import demo_paths
    from guardedp2p.designs import get_design
    from guardedp2p.designs.online.pipeline import default_micro_batches
    from guardedp2p.service.client import TuneOptions, effective_warmup, plan_tune
    from guardedp2p.train.config import TrainConfig

    get_design(protocol)  # an unknown design fails before keys, emulator and provider
    console = Console(stderr=True)
    train = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        dcor_alpha=dcor,
        checkpoint_every=max(10, steps // 6),
        warmup_steps=effective_warmup(None, steps),
    )
    n_items = sum(1 for _ in open(demo_paths().eval_mc, encoding="utf-8"))
    run_dir = _demo_out(protocol, out, resume=resume, overwrite=overwrite, console=console)
    # both parties share this machine's cores: a generous reply timeout avoids retrying a merely busy provider
    opts = TuneOptions(
        protocol=protocol,
        model=model,
        out=str(run_dir),
        train=train,
        codecs=codecs,
        noise=parse_noise(noise),
        privacy=privacy,
        timeout=600.0,
        resume=resume,
        eval_max_items=demo_eval_items(steps, n_items),
        micro_batches=default_micro_batches(protocol),  # as `client tune` defaults it (docs/results/perf.md)
    )
    plan = plan_tune(opts)  # data, options, model path and split: before keys, emulator and provider
    with tempfile.TemporaryDirectory(prefix="guardedp2p-demo-") as tmp_s:
        tmp = Path(tmp_s)
        keys = tmp / "keys"
        generate_keypair(keys, "provider")
        generate_keypair(keys, "client")
        port = free_port()
        endpoint = f"tcp://127.0.0.1:{port}"
        provider_args = [
            "--model",
            model,
            "--bind",
            endpoint,
            "--keys",
            str(keys),
            "--name",
            "provider",
            "--allow",
            str(keys / "client.key"),
        ]
        if protocol == "offline":
            from guardedp2p.designs.offline.build import build_demo_emulator

            emu_dir = build_demo_emulator(model, tmp / "emulator", keys, console=console)
            provider_args += ["--emulator", str(emu_dir)]
        console.print(f"[bold]guardedp2p demo[/]: {protocol} design, provider on {endpoint} (CURVE), model {model}")
        console.print(
            f"outputs in {run_dir}/; evaluation on {opts.eval_max_items} of the {n_items} multiple-choice items "
            "before and after training"
        )
        console.print("starting the provider process (loading the model)…")
        t0 = time.perf_counter()
        with ProviderProcess(provider_args, tmp):
            console.print(f"provider ready in {time.perf_counter() - t0:.1f} s; the client loads its parts and trains")
            connect = client_channel_factory(endpoint, keys / "provider.key", keys, "client", False)
            design_options: dict[str, Any] = {}
            if protocol == "offline":
                from guardedp2p.designs.offline.run import OfflineOptions

                design_options["offline"] = OfflineOptions(
                    provider_verify_key=str(keys / "provider.sign.pub"), client_keys=str(keys), client_key_name="client"
                )
            summary = execute_run(
                opts, connect, plan.data, [], plan.to_dict(), console=console, json_out=json_out, **design_options
            )
        summary["wall_s"] = round(time.perf_counter() - t0, 3)
        print_summary(summary, Console(stderr=json_out))
        console.print(f"outputs kept in {run_dir}/ (adapter/, checkpoint/, summary.json)")
        if json_out:
            print_json({k: v for k, v in summary.items() if k != "history"})
        return summary
