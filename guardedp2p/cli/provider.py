"""``guardedp2p provider …``: serve the trunk (Online, Gradfree) and the emulator (Offline) to allowed clients."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

import typer

from guardedp2p.cli.common import friendly_errors, print_json, setup_logging
from guardedp2p.errors import ConfigError, GuardedP2PError

provider_app = typer.Typer(
    help="Provider side: holds the proprietary model, serves its frozen middle (trunk) or an emulator.",
    no_args_is_help=True,
)


def _mount_emulator() -> None:
    from guardedp2p.cli.emulator import emulator_app
    from guardedp2p.cli.kit import kit_app

    provider_app.add_typer(emulator_app, name="emulator")
    provider_app.add_typer(kit_app, name="kit")


_mount_emulator()
log = logging.getLogger("guardedp2p.provider")


def _mib(value: float) -> int:
    return max(1, int(value * (1 << 20)))


def _split_csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


@provider_app.command("serve")
@friendly_errors
def serve(
    model: str = typer.Option(
        "default", help="Hugging Face model folder, or 'default' for the embedded SmolLM2-135M-Instruct."
    ),
    bind: str = typer.Option("tcp://127.0.0.1:5555", help="ZeroMQ endpoint to listen on, e.g. tcp://0.0.0.0:5555."),
    keys: Path | None = typer.Option(
        None, help="Folder holding this provider's key pair (from `guardedp2p keys generate`)."
    ),
    name: str = typer.Option("provider", help="Key name inside --keys (NAME.key / NAME.key_secret)."),
    allow: list[Path] = typer.Option([], help="A client's public key file to accept (repeatable)."),
    allow_dir: list[Path] = typer.Option(
        [], help="Accept every client public key (*.key) in this folder (repeatable)."
    ),
    protocols: str = typer.Option("online,gradfree,offline", help="Comma-separated designs to offer."),
    bottom_layers: int = typer.Option(2, help="Blocks the client runs before the trunk (must match the client)."),
    top_layers: int = typer.Option(2, help="Blocks the client runs after the trunk (must match the client)."),
    emulator: Path | None = typer.Option(
        None, help="Emulator folder (from `provider emulator build`) to serve for the offline design."
    ),
    record: Path | None = typer.Option(
        None,
        help="Record what the provider observes per step into this folder (for the attack harness). Announced to clients in the handshake.",
    ),
    device: str = typer.Option(
        "auto", help="auto, cpu, cuda or cuda:N (one device; see --device-map for several GPUs)."
    ),
    device_map: str | None = typer.Option(
        None,
        help="Where the trunk's blocks go: auto (GPUs when present, as few as hold the trunk; else CPU), balanced (split evenly over all GPUs), cpu, cuda or cuda:N. Default: --device. See docs/big-models.md.",
    ),
    dtype: str | None = typer.Option(
        None,
        help="Trunk precision: fp32 (default), bf16, fp16, or auto (the checkpoint's own). Does not change the model fingerprint.",
    ),
    load_in: str | None = typer.Option(
        None,
        help="Quantize the trunk's weights with bitsandbytes: 8bit or 4bit (needs `pip install bitsandbytes`; the client-side modules stay unquantized).",
    ),
    idle_timeout: float = typer.Option(
        600.0, help="Seconds of silence after which a session and its state are dropped."
    ),
    max_batch: int = typer.Option(
        8,
        min=1,
        help="Forward-only requests (gradfree, evaluation) of up to N clients that arrive together share one trunk call. 1 disables batching.",
    ),
    batch_wait_ms: float = typer.Option(
        2.0,
        min=0.0,
        max=1000.0,
        help="How long to wait for other clients' requests to join a batch, in ms (only while more than one session is open). Higher: bigger batches, more latency.",
    ),
    max_mb_per_s: float | None = typer.Option(
        None,
        min=0.001,
        help="Per-client limit on the bytes it sends, in MB/s (10^6 bytes; bursts of one second's worth). Over it, a request is refused with 'rate-limited' and the client waits and sends it again. Default: no limit.",
    ),
    shutdown_grace: float = typer.Option(
        2.0,
        min=0.0,
        max=600.0,
        help="On Ctrl-C: seconds to keep answering clients 'provider-shutting-down' (so they checkpoint and say how to resume) before closing; ends early once every session is told. Ctrl-C again stops at once.",
    ),
    max_tokens_per_step: int = typer.Option(
        1024, min=1, help="Budget: batch x sequence of one activation or gradient message (over it: over-budget)."
    ),
    max_decoded_mib: float = typer.Option(
        128.0, min=0.001, help="Budget: one message's tensors once decoded, in MiB (a lossy codec expands up to 8x)."
    ),
    max_sessions_per_key: int = typer.Option(
        4, min=1, help="Budget: open sessions per client key (a new one closes the oldest)."
    ),
    max_graphs_per_key: int = typer.Option(
        4, min=1, help="Budget: Online training graphs one client key may keep waiting for GRAD_UP."
    ),
    max_graphs: int = typer.Option(16, min=1, help="Budget: kept training graphs of all clients together."),
    max_graph_mib_per_key: float = typer.Option(
        1024.0,
        min=1.0,
        help="Budget: MiB of kept training graphs per client key (measured; about 1 MiB per token for the default model).",
    ),
    max_graph_mib: float = typer.Option(
        4096.0, min=1.0, help="Budget: MiB of kept training graphs of all clients together."
    ),
    max_unanswered: int = typer.Option(
        8, min=1, help="Per client key: requests whose reply has not left yet; over it the client is cut off."
    ),
    max_queued_replies: int = typer.Option(
        8, min=1, help="Per client key: replies waiting because it does not read them; over it the client is cut off."
    ),
    max_queued_reply_mib: float = typer.Option(
        64.0, min=0.001, help="Per client key: MiB of replies waiting because it does not read them; over it: cut off."
    ),
    upload_dir: Path | None = typer.Option(
        None,
        help="Offline: folder for accepted adapter bundles (and uploads.jsonl, who uploaded what). Default: a temporary folder, logged.",
    ),
    client_sign_key: list[str] = typer.Option(
        [],
        help="Offline: a client's NAME.sign.pub that may sign the bundles of the client key beside it (NAME.key); SIGN.pub=CLIENT.key ties it to another key, SIGN.pub=* to every client (repeatable). The NAME.sign.pub beside each allowed NAME.key is pinned anyway.",
    ),
    accept_unpinned: bool = typer.Option(
        False,
        "--accept-unpinned",
        help="Offline: accept adapter bundles signed by a key pinned nowhere (integrity only; default: refuse them).",
    ),
    serve_plugged: list[str] = typer.Option(
        [],
        help="Offline: CLIENT.key=BUNDLE_DIR serves that client (and only that key) the trunk with its returned adapter bundle plugged in, for a bundle cut wider than the served split (its adapters reach trunk blocks). Verified as an upload is (signed by a key pinned for that client). Repeatable, one bundle per key. docs/architecture.md, 'Using the returned adapters'.",
    ),
    max_upload_mib: float = typer.Option(256.0, min=0.001, help="Offline: the largest adapter bundle, in MiB."),
    max_staged_upload_mib_per_key: float = typer.Option(
        512.0, min=0.001, help="Offline: MiB of unfinished uploads per client key (deleted when its session ends)."
    ),
    max_staged_upload_mib: float = typer.Option(2048.0, min=0.001, help="Offline: MiB of unfinished uploads in total."),
    max_uploads_per_key: int = typer.Option(16, min=1, help="Offline: accepted adapter bundles per client key."),
    max_upload_dir_mib: float = typer.Option(
        8192.0, min=0.001, help="Offline: MiB the upload folder may hold in all (accepted and unfinished bundles)."
    ),
    insecure: bool = typer.Option(
        False,
        "--insecure",
        help="Plaintext, unauthenticated ZeroMQ. For debugging only: anyone can connect and read the traffic.",
    ),
    ready_file: Path | None = typer.Option(
        None, hidden=True, help="Write this file once listening (used by the demo)."
    ),
    max_messages: int | None = typer.Option(None, hidden=True, help="Stop after this many messages (tests)."),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Check keys, allow-list, endpoint, model path and split without loading the model; print the plan and exit.",
    ),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More logging."),
) -> None:
    """Serve the model to allowed clients until Ctrl-C. Logs sessions, never data.

    The allow-list is re-read when its files change and on SIGHUP; a removed key's connections and sessions are
    closed at once. Budgets and per-client caps: SECURITY.md."""
    setup_logging(verbose)
    from guardedp2p.designs.offline.provider import SignerPins
    from guardedp2p.protocol.provider import ProviderConfig
    from guardedp2p.service.provider import ProviderOptions, UploadOptions, build_provider_app
    from guardedp2p.service.serve import ServeConfig, serve_forever
    from guardedp2p.transport.zmq_server import ServerConfig, ZmqServerChannel

    if not insecure and keys is None:
        raise ConfigError(
            "--keys DIR is required (make keys with `guardedp2p keys generate --out DIR --name provider`), or pass --insecure for a plaintext debug run"
        )
    if not insecure and not allow and not allow_dir:
        raise ConfigError(
            "no client is allowed: pass --allow CLIENT.key or --allow-dir DIR with the clients' public keys"
        )
    from guardedp2p.service.provider import parse_serve_plugged

    if serve_plugged and insecure:
        raise ConfigError(
            "--serve-plugged serves a trunk to one authenticated client key; --insecure has none: drop one of them"
        )
    plugged = parse_serve_plugged(serve_plugged)  # before the (slow) model load
    opts = ProviderOptions(
        model=model,
        bottom_layers=bottom_layers,
        top_layers=top_layers,
        protocols=_split_csv(protocols),
        device=device,
        record_dir=str(record) if record else None,
        emulator_dir=str(emulator) if emulator else None,
        device_map=device_map,
        dtype=dtype,
        load_in=load_in,
        config=ProviderConfig(
            session_idle_timeout=idle_timeout,
            max_batch=max_batch,
            batch_wait_s=batch_wait_ms / 1000.0,
            max_bytes_per_s=max_mb_per_s * 1e6 if max_mb_per_s else None,
            shutdown_grace_s=shutdown_grace,
            max_tokens_per_step=max_tokens_per_step,
            max_decoded_bytes=_mib(max_decoded_mib),
            max_sessions_per_peer=max_sessions_per_key,
            max_graphs_per_peer=max_graphs_per_key,
            max_graphs=max_graphs,
            max_graph_bytes_per_peer=_mib(max_graph_mib_per_key),
            max_graph_bytes=_mib(max_graph_mib),
        ),
        uploads=UploadOptions(
            upload_dir=str(upload_dir) if upload_dir else None,
            client_sign_keys=SignerPins([str(a) for a in allow], [str(d) for d in allow_dir], client_sign_key),
            accept_unpinned=accept_unpinned,
            max_upload_bytes=_mib(max_upload_mib),
            max_staged_bytes_per_peer=_mib(max_staged_upload_mib_per_key),
            max_staged_bytes=_mib(max_staged_upload_mib),
            max_uploads_per_peer=max_uploads_per_key,
            max_upload_dir_bytes=_mib(max_upload_dir_mib),
        ),
        plugged=plugged,
    )
    serve_config = ServeConfig(
        max_unanswered=max_unanswered,
        max_queued_replies=max_queued_replies,
        max_queued_reply_bytes=_mib(max_queued_reply_mib),
    )
    from guardedp2p.cli.provider_checks import check_provider, format_plan

    plan = check_provider(  # before the (slow) model load: keys, allow-list, port, model path and split
        model=model,
        bind=bind,
        keys=keys,
        name=name,
        allow=allow,
        allow_dir=allow_dir,
        insecure=insecure,
        protocols=opts.protocols,
        bottom_layers=bottom_layers,
        top_layers=top_layers,
        emulator=emulator,
        record=record,
        trunk_loading=opts.trunk_loading,
    )
    if dry_run:
        typer.echo(format_plan(plan))
        typer.echo("dry run: everything checks out; the model was not loaded and nothing listens")
        return
    if plugged:
        from guardedp2p.service.provider import check_plugged

        check_plugged(opts)  # signatures and digests, before the model is loaded
        _warn_unallowed(plugged, allow, allow_dir)
    app = build_provider_app(opts)
    cfg = ServerConfig(
        bind=bind,
        secret_key_file=str(keys) if keys else None,
        key_name=name,
        allow=[str(a) for a in allow],
        allow_dirs=[str(d) for d in allow_dir],
        insecure=insecure,
    )
    channel = ZmqServerChannel(cfg)
    stop = threading.Event()
    abort = threading.Event()
    reload = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if stop.is_set():
            log.info("stopping now (signal %d again)", signum)
            abort.set()
            return
        log.info(
            "stopping (signal %d): finishing the current message, then telling clients for up to %g s (again to stop at once)",
            signum,
            shutdown_grace,
        )
        stop.set()

    def on_hup(signum: int, frame: object) -> None:
        reload.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_hup)
    log.info("listening on %s (%s)", bind, "INSECURE plaintext" if insecure else "CURVE")
    if upload_dir and "offline" in app.policy.protocols:
        log.info("adapter bundles go to %s", upload_dir)
    if ready_file:
        ready_file.write_text(bind)
    try:
        handled = serve_forever(
            app, channel, stop, max_messages=max_messages, abort=abort, config=serve_config, reload=reload
        )
    finally:
        channel.close(linger_s=0.0 if abort.is_set() else 1.0)  # let the last "shutting down" replies leave
    log.info("served %d messages, %d sessions", handled, app.stats["sessions_opened"])
    if stop.is_set():
        # stopped by a signal: everything is closed and logged; skip the interpreter's teardown (seconds with torch
        # loaded, and a computation still running in the worker thread is not waited for), so the process ends
        # within its shutdown grace
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _warn_unallowed(plugged: dict[str, str], allow: list[Path], allow_dir: list[Path]) -> None:
    """A plugged trunk for a key that may not connect is served to no one: say so (it may be allowed later)."""
    from guardedp2p.crypto.keys import PUBLIC_SUFFIX, load_public_key

    files = [str(a) for a in allow] + [
        str(f) for d in allow_dir for f in sorted(d.expanduser().glob(f"*{PUBLIC_SUFFIX}"))
    ]
    allowed = set()
    for f in files:
        try:
            allowed.add(load_public_key(f))
        except (GuardedP2PError, OSError):
            continue  # the allow-list check reports unreadable files
    for key, folder in plugged.items():
        if key not in allowed:
            log.warning(
                "--serve-plugged %s…=%s: that key is not allowed to connect (--allow, --allow-dir)", key[:12], folder
            )


@provider_app.command("fingerprint")
@friendly_errors
def fingerprint_cmd(
    model: str = typer.Option("default", help="Model folder or 'default'."),
    bottom_layers: int = typer.Option(2),
    top_layers: int = typer.Option(2),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Print the model fingerprint a client must match (SHA-256 over config, split and shared weights)."""
    from guardedp2p.engine.fingerprint import model_fingerprint
    from guardedp2p.engine.loading import load_causal_lm
    from guardedp2p.engine.split import SplitConfig

    m, _ = load_causal_lm(model)
    fp = model_fingerprint(m, SplitConfig(bottom_layers, top_layers))
    if json_out:
        print_json({"model": model, "bottom_layers": bottom_layers, "top_layers": top_layers, "fingerprint": fp})
    else:
        typer.echo(fp)
