"""``guardedp2p client generate`` and ``client chat``: use the adapters ``client tune`` wrote, with the provider's
trunk, over the same authenticated channel (issue 18; GuardedTuning, arXiv 2501.04323: the client's data stays
private at inference too).

The client runs embeddings, its bottom, its top and the LM head (with ``--adapter``, else the pre-trained
weights); the provider runs only the trunk and keeps its KV cache for the session
(:mod:`guardedp2p.designs.online.generate`). Registered on ``client_app`` by ``guardedp2p/cli/client.py``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from guardedp2p.cli.common import friendly_errors, print_json, setup_logging
from guardedp2p.cli.config import choice
from guardedp2p.errors import ConfigError, GuardedP2PError

if TYPE_CHECKING:
    from guardedp2p.designs.online.generate import (
        GenerateConfig,
        Generation,
        GenerationClient,
        GenerationSession,
        SplitGenerator,
    )
    from guardedp2p.privacy.session import SessionPrivacy

PROMPT_FIELDS = ("prompt", "text", "messages")


# ------------------------------------------------------------------------------------------------ shared options
@dataclass
class _Connection:
    """Everything needed to (re)open a generation session; ``open()`` gives a session and its generator."""

    connect: Callable[[], Any]
    client: GenerationClient
    protocol: str
    codecs: dict[str, str]
    noise: dict[str, Any]
    timeout: float
    refuse_recording: bool
    privacy: str = "off"
    public_text: str = "demo-aux"
    sessions: list[GenerationSession] = field(default_factory=list)
    protection: SessionPrivacy | None = None

    def session_privacy(self) -> SessionPrivacy:
        """The session's protection, resolved once (one noise generator for every session of this command) and
        installed on the bottom (dχ on the input embeddings), as in training (guardedp2p/privacy/session.py)."""
        if self.protection is None:
            from guardedp2p.privacy.presets import RunShape
            from guardedp2p.privacy.session import resolve_session_privacy

            self.protection = resolve_session_privacy(
                preset=self.privacy,
                noise=self.noise,
                dcor_alpha=0.0,
                obfuscation=None,
                design=self.protocol,
                # one forward pass, no gradient: a calibrated preset's epsilon holds per forward pass (each
                # generated token is another release of the prompt), which the HELLO says
                shape=RunShape("gradfree", steps=1, batch_size=1, n_records=1, max_length=512),
                tokenizer=self.client.tokenizer,
                bottom=None,
                d_model=1,
                public_text=self.public_text,
                device=self.client.device,
            )
            self.protection.install(self.client.bottom)
        return self.protection

    def privacy_terms(self) -> dict[str, Any]:
        """What the HELLO announces: the preset and the noise applied (never its seed)."""
        sp = self.session_privacy()
        out: dict[str, Any] = {}
        if sp.preset is not None:
            out["preset"] = sp.preset.describe()
        if sp.noise is not None:
            out["noise"] = sp.noise.cfg.describe()
            if sp.noise.cfg.calibrated:
                out["epsilon_scope"] = "per forward pass: every generated token sends another noised release"
        return out

    def open(self) -> tuple[GenerationSession, SplitGenerator]:
        from guardedp2p.designs.online.generate import SplitGenerator, open_generation_session

        gs = open_generation_session(
            self.connect,
            self.client,
            protocol=self.protocol,
            codecs=self.codecs,
            privacy=self.privacy_terms(),
            timeout=self.timeout,
            refuse_recording=self.refuse_recording,
        )
        self.sessions.append(gs)
        gen = SplitGenerator(
            self.client.bottom,
            self.client.top,
            self.client.tokenizer,
            gs.trunk,
            transform_sent=self.session_privacy().sent,
            max_tokens_per_step=gs.max_tokens_per_step,
            generation_config=self.client.generation_config,
        )
        return gs, gen

    def close(self) -> None:
        for gs in self.sessions:
            gs.close()
        self.sessions.clear()


def _prepare(
    *,
    protocol: str,
    connect: str,
    provider_key: Path | None,
    keys: Path | None,
    name: str,
    insecure: bool,
    connect_timeout: float,
    model: str,
    adapter: Path | None,
    bottom_layers: int,
    top_layers: int,
    codec_up: str,
    codec_down: str,
    noise: str | None,
    timeout: float,
    refuse_recording: bool,
    device: str,
    dtype: str,
    console: Console,
    kit: Path | None = None,
    provider_sign_key: Path | None = None,
    privacy: str = "off",
    public_text: str | None = None,
) -> _Connection:
    """Check every option that can be checked before loading anything, then load the client's parts."""
    from guardedp2p.cli.client import client_channel_factory, parse_noise
    from guardedp2p.designs import get_design
    from guardedp2p.designs.online.generate import load_generation_client
    from guardedp2p.engine.placement import parse_dtype
    from guardedp2p.engine.split import SplitConfig
    from guardedp2p.wire.handshake import FLOAT_CODECS

    design = get_design(protocol)
    if not design.per_step_traffic:
        raise ConfigError(
            f"--protocol {protocol}: split generation needs the provider's trunk (online or gradfree). With an "
            "offline adapter, run `client generate --adapter DIR` against a provider that serves online or gradfree"
        )
    for flag, codec in (("--codec-up", codec_up), ("--codec-down", codec_down)):
        if codec not in FLOAT_CODECS:
            raise ConfigError(f"{flag} {codec!r}: use one of {', '.join(FLOAT_CODECS)}")
    parse_dtype(dtype)
    noise_cfg = parse_noise(noise)
    if adapter is not None and not adapter.is_dir():
        raise ConfigError(f"--adapter {adapter}: not a folder (pass the adapter/ folder `client tune` wrote)")
    if kit is not None and provider_sign_key is None:
        raise ConfigError("--kit needs --provider-sign-key PROVIDER.sign.pub to verify the kit's signature")
    connect_fn = client_channel_factory(connect, provider_key, keys, name, insecure, handshake_timeout=connect_timeout)
    with console.status("loading the model's client parts…"):
        client = load_generation_client(
            model,
            SplitConfig(bottom_layers=bottom_layers, top_layers=top_layers),
            adapter=adapter,
            device=device,
            dtype=dtype,
            kit=kit,
            kit_verify_key=provider_sign_key,
        )
    codecs = {"up": codec_up, "down": codec_down, "grad_up": "fp32", "grad_down": "fp32"}
    return _Connection(
        connect_fn, client, protocol, codecs, noise_cfg, timeout, refuse_recording, privacy, public_text or "demo-aux"
    )


def adapter_pseudonymizer(adapter: Path | None, key: Path | None) -> Any:
    """The keyed pseudonymisation an adapter was tuned with (``OUT/pseudonym.json`` beside ``OUT/adapter``), or
    None; an adapter tuned on surrogates answers only to prompts encoded with the same key."""
    from guardedp2p.privacy.pseudonym import FieldPseudonymizer, load_schema, read_key
    from guardedp2p.service.client import PSEUDONYM_KEY_FILE, PSEUDONYM_SCHEMA_FILE

    schema = adapter.parent / PSEUDONYM_SCHEMA_FILE if adapter is not None else None
    if schema is None or not schema.is_file():
        if key is not None:
            raise ConfigError(
                "--pseudonym-key: this adapter was not tuned with --pseudonymize "
                f"(no {PSEUDONYM_SCHEMA_FILE} beside it)"
            )
        return None
    assert adapter is not None
    key_path = key or adapter.parent / PSEUDONYM_KEY_FILE
    if not key_path.is_file():
        raise ConfigError(
            f"the adapter was tuned on pseudonymised fields ({schema}) but its key {key_path} is missing: pass "
            "--pseudonym-key FILE (the one `client tune --pseudonym-key` used)"
        )
    return FieldPseudonymizer(load_schema(schema), read_key(key_path))


def read_prompts(path: Path) -> list[str | list[dict[str, str]]]:
    """Prompts from a JSONL file: each line an object with ``prompt`` (or ``text``) or ``messages`` (a chat), or a
    JSON string. Bad lines are refused with their line number."""
    if not path.is_file():
        raise ConfigError(f"--prompts {path}: no such file")
    out: list[str | list[dict[str, str]]] = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if isinstance(obj, str):
                out.append(obj)
                continue
            if not isinstance(obj, dict):
                raise ConfigError(f"{path}:{n}: expected an object with one of {', '.join(PROMPT_FIELDS)}")
            if isinstance(obj.get("messages"), list):
                msgs = obj["messages"]
                if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
                    raise ConfigError(f"{path}:{n}: 'messages' must be a list of {{role, content}} objects")
                out.append([{"role": str(m.get("role", "user")), "content": m["content"]} for m in msgs])
                continue
            text = obj.get("prompt", obj.get("text"))
            if not isinstance(text, str):
                raise ConfigError(f"{path}:{n}: expected a string field 'prompt' (or 'text', or a 'messages' list)")
            out.append(text)
    if not out:
        raise ConfigError(f"--prompts {path}: the file holds no prompt")
    return out


class TextStream:
    """Print the decoded text of a growing token list as it grows.

    A partial UTF-8 character waits for its next token, and the last ``len(longest stop string) - 1`` characters
    wait too, so a stop string is never shown (the generator cuts it from the text): :meth:`finish` then prints
    the rest of the final text.
    """

    def __init__(
        self, tokenizer: Any, write: Callable[[str], None], eos: tuple[int, ...] = (), stop: tuple[str, ...] = ()
    ) -> None:
        self.tokenizer, self.write, self.eos = tokenizer, write, eos
        self.hold = max((len(x) for x in stop), default=1) - 1
        self.tokens: list[int] = []
        self.shown = 0

    def __call__(self, index: int, token: int) -> None:
        if token in self.eos:
            return
        self.tokens.append(token)
        text = str(self.tokenizer.decode(self.tokens, skip_special_tokens=True))
        if text.endswith("\ufffd"):
            return
        upto = len(text) - self.hold
        if upto > self.shown:
            self.write(text[self.shown : upto])
            self.shown = upto

    def finish(self, final_text: str) -> None:
        """Print what was held back of the result's final text (cut before a stop string)."""
        if len(final_text) > self.shown:
            self.write(final_text[self.shown :])
        self.shown = max(self.shown, len(final_text))


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _cost_line(gs: GenerationSession, gen: SplitGenerator, wall: float) -> dict[str, Any]:
    stats = gen.stats.as_dict()
    wire = gs.session.stats.as_dict()
    steps = max(1, gen.stats.decode_steps)
    return {
        **stats,
        "wall_s": round(wall, 3),
        "bytes_up": wire["bytes_up"],
        "bytes_down": wire["bytes_down"],
        "ms_per_new_token": round(1000 * gen.stats.decode_s / steps, 3) if gen.stats.decode_steps else None,
    }


# ------------------------------------------------------------------------------------------------ options
_PROTOCOL = typer.Option("online", help="Session type the provider serves: online or gradfree (both can generate).")
_CONNECT = typer.Option("tcp://127.0.0.1:5555", help="The provider's ZeroMQ endpoint.")
_PROVIDER_KEY = typer.Option(None, help="The provider's public key file (pinned).")
_KEYS = typer.Option(None, help="Folder holding this client's key pair (from `guardedp2p keys generate`).")
_NAME = typer.Option("client", help="Key name inside --keys.")
_MODEL = typer.Option("default", help="The same base model as the provider's (folder or 'default').")
_KIT = typer.Option(
    None, help="The provider's signed client kit (`provider kit build`) instead of --model; needs --provider-sign-key."
)
_SIGN_KEY = typer.Option(None, help="With --kit: the provider's public signing key NAME.sign.pub.")
_ADAPTER = typer.Option(
    None, help="The adapter folder `client tune` wrote (OUT/adapter, PEFT format). Default: pre-trained weights."
)
_PSEUDONYM_KEY = typer.Option(
    None,
    "--pseudonym-key",
    help="For an adapter tuned with --pseudonymize: its key (default: OUT/pseudonym.key beside OUT/adapter). "
    "Prompts are encoded with it before anything is sent and answers decoded, so you read your own values.",
)
_BOTTOM = typer.Option(2, help="Blocks before the trunk (must match the provider).")
_TOP = typer.Option(2, help="Blocks after the trunk (must match the provider).")
_CODEC_UP = typer.Option("fp32", help="Codec of the activations sent up (fp32 is lossless).")
_CODEC_DOWN = typer.Option("fp32", help="Codec of the trunk output sent down.")
_NOISE = typer.Option(
    None, help="Noise on what is sent, as client tune --noise (gaussian:SCALE, dx:EPS, ...); overrides --privacy's."
)
_PRIVACY = typer.Option(
    "off",
    help="Privacy preset, as client tune --privacy: the same protection at inference as in training (off, "
    "balanced: dx on rare input tokens, fields: and on every digit, strong: clipped Gaussian calibrated to epsilon 8 for one release).",
    parser=choice("a privacy preset", ("off", "balanced", "fields", "strong")),
    metavar="off|balanced|fields|strong",
)
_PUBLIC_TEXT = typer.Option(
    None, help="Public records in your data's style for the balanced preset's keep list (default: the demo's)."
)
_MAX_NEW = typer.Option(64, "--max-new-tokens", help="Most new tokens per prompt.")
_TEMPERATURE = typer.Option(0.0, help="Sampling temperature; 0 (default) decodes greedily.")
_TOP_P = typer.Option(1.0, "--top-p", help="Nucleus sampling: keep the most likely tokens up to this mass.")
_TOP_K = typer.Option(0, "--top-k", help="Sample among the K most likely tokens (0: off).")
_SEED = typer.Option(None, help="Seed of the sampler (reproducible samples); default: OS entropy.")
_STOP = typer.Option(None, "--stop", help="Stop string (repeatable); the text is cut before it.")
_SYSTEM = typer.Option(None, help="System message for the chat template.")
_TIMEOUT = typer.Option(30.0, help="Seconds to wait for each reply.")
_CONNECT_TIMEOUT = typer.Option(2.0, help="Seconds to wait for the encrypted handshake when connecting.")
_REFUSE = typer.Option(
    False, "--refuse-recording", help="End the session if the provider announces that it records transcripts."
)
_DEVICE = typer.Option("auto", help="Where the client's parts run: auto, cpu, cuda or cuda:N.")
_DTYPE = typer.Option("fp32", help="Precision of the client's weights: fp32, bf16 or fp16.")
_INSECURE = typer.Option(False, "--insecure", help="Plaintext, unauthenticated ZeroMQ (debug only).")
_VERBOSE = typer.Option(0, "--verbose", "-v", count=True, help="More logging (-vv for debug).")


def _config(
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop: list[str] | None,
    batch_size: int = 8,
) -> GenerateConfig:
    from guardedp2p.designs.online.generate import GenerateConfig

    cfg = GenerateConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=tuple(stop or ()),
        batch_size=batch_size,
    )
    cfg.validate()
    return cfg


# ------------------------------------------------------------------------------------------------ client generate
@friendly_errors
def generate_cmd(
    prompt: str | None = typer.Option(None, "--prompt", help="One prompt (its text streams to stdout)."),
    prompts: Path | None = typer.Option(
        None,
        "--prompts",
        help="Batch mode: a JSONL file of prompts ('prompt' or 'text', or 'messages'); one JSON result per line.",
    ),
    chat: bool = typer.Option(False, "--chat", help="Wrap each prompt in the model's chat template."),
    system: str | None = _SYSTEM,
    adapter: Path | None = _ADAPTER,
    pseudonym_key: Path | None = _PSEUDONYM_KEY,
    max_new_tokens: int = _MAX_NEW,
    temperature: float = _TEMPERATURE,
    top_p: float = _TOP_P,
    top_k: int = _TOP_K,
    seed: int | None = _SEED,
    stop: list[str] | None = _STOP,
    batch_size: int = typer.Option(8, help="Prompts per batch: they share the trunk's passes and one cache."),
    protocol: str = _PROTOCOL,
    connect: str = _CONNECT,
    provider_key: Path | None = _PROVIDER_KEY,
    keys: Path | None = _KEYS,
    name: str = _NAME,
    model: str = _MODEL,
    kit: Path | None = _KIT,
    provider_sign_key: Path | None = _SIGN_KEY,
    bottom_layers: int = _BOTTOM,
    top_layers: int = _TOP,
    codec_up: str = _CODEC_UP,
    codec_down: str = _CODEC_DOWN,
    noise: str | None = _NOISE,
    privacy: str = _PRIVACY,
    public_text: str | None = _PUBLIC_TEXT,
    timeout: float = _TIMEOUT,
    connect_timeout: float = _CONNECT_TIMEOUT,
    refuse_recording: bool = _REFUSE,
    device: str = _DEVICE,
    dtype: str = _DTYPE,
    insecure: bool = _INSECURE,
    json_out: bool = typer.Option(False, "--json", help="One JSON object per result (and the cost) on stdout."),
    verbose: int = _VERBOSE,
) -> None:
    """Generate text with your tuned adapters and the provider's trunk; your prompts never leave as text."""
    setup_logging(verbose, quiet=(json_out or prompts is not None) and verbose == 0)
    if (prompt is None) == (prompts is None):
        raise ConfigError("pass exactly one of --prompt TEXT or --prompts FILE.jsonl")
    cfg = _config(max_new_tokens, temperature, top_p, top_k, seed, stop, batch_size)
    items: list[str | list[dict[str, str]]] = read_prompts(prompts) if prompts is not None else [str(prompt)]
    if not chat and any(not isinstance(p, str) for p in items):
        raise ConfigError("--prompts holds 'messages' chats: add --chat to use the model's chat template")
    err = Console(stderr=True)
    coder = adapter_pseudonymizer(adapter, pseudonym_key)
    conn = _prepare(
        protocol=protocol,
        connect=connect,
        provider_key=provider_key,
        keys=keys,
        name=name,
        insecure=insecure,
        connect_timeout=connect_timeout,
        model=model,
        adapter=adapter,
        bottom_layers=bottom_layers,
        top_layers=top_layers,
        codec_up=codec_up,
        codec_down=codec_down,
        noise=noise,
        privacy=privacy,
        public_text=public_text,
        timeout=timeout,
        refuse_recording=refuse_recording,
        device=device,
        dtype=dtype,
        console=err,
        kit=kit,
        provider_sign_key=provider_sign_key,
    )
    from guardedp2p.designs.online.generate import encode_prompt, eos_ids

    tok = conn.client.tokenizer
    sent = [coder.encode_strings(p) for p in items] if coder is not None else items
    ids = [encode_prompt(tok, p, chat=chat, system=system) for p in sent]

    def readable(g: Generation) -> Generation:
        if coder is not None:  # the answer in the client's own values (the trunk only ever saw surrogates)
            p, q = items[g.index], sent[g.index]
            both_text = isinstance(p, str) and isinstance(q, str)
            g.text = coder.decode_continuation(q, p, g.text) if both_text else coder.decode(g.text)
        return g

    try:
        gs, gen = conn.open()
        for i, p in enumerate(ids):
            gen.check_prompt(len(p), i)
        t0 = time.perf_counter()
        if prompts is not None or json_out:

            def emit(g: Generation) -> None:
                print_json(readable(g).as_dict())
                sys.stdout.flush()

            gen.generate(ids, cfg, on_result=emit)
        elif coder is not None:  # a surrogate must not be shown: print the decoded answer once it is complete
            _write(readable(gen.generate(ids, cfg)[0]).text)
            sys.stdout.write("\n")
        else:
            stream = TextStream(tok, _write, eos_ids(tok), cfg.stop)
            stream.finish(gen.generate(ids, cfg, on_token=stream)[0].text)
            sys.stdout.write("\n")
        cost = _cost_line(gs, gen, time.perf_counter() - t0)
    finally:
        conn.close()
    if json_out:
        print_json({"cost": cost})
    else:
        per = cost["ms_per_new_token"]
        err.print(
            f"[dim]{cost['new_tokens']} new token(s) for {len(ids)} prompt(s) in {cost['wall_s']} s"
            + (f", {per} ms per decode step" if per is not None else "")
            + f"; {cost['bytes_up']} B up, {cost['bytes_down']} B down[/]"
        )


# ------------------------------------------------------------------------------------------------ client chat
@friendly_errors
def chat_cmd(
    system: str | None = _SYSTEM,
    adapter: Path | None = _ADAPTER,
    pseudonym_key: Path | None = _PSEUDONYM_KEY,
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Most new tokens per answer."),
    temperature: float = _TEMPERATURE,
    top_p: float = _TOP_P,
    top_k: int = _TOP_K,
    seed: int | None = _SEED,
    stop: list[str] | None = _STOP,
    protocol: str = _PROTOCOL,
    connect: str = _CONNECT,
    provider_key: Path | None = _PROVIDER_KEY,
    keys: Path | None = _KEYS,
    name: str = _NAME,
    model: str = _MODEL,
    kit: Path | None = _KIT,
    provider_sign_key: Path | None = _SIGN_KEY,
    bottom_layers: int = _BOTTOM,
    top_layers: int = _TOP,
    codec_up: str = _CODEC_UP,
    codec_down: str = _CODEC_DOWN,
    noise: str | None = _NOISE,
    privacy: str = _PRIVACY,
    public_text: str | None = _PUBLIC_TEXT,
    timeout: float = _TIMEOUT,
    connect_timeout: float = _CONNECT_TIMEOUT,
    refuse_recording: bool = _REFUSE,
    device: str = _DEVICE,
    dtype: str = _DTYPE,
    insecure: bool = _INSECURE,
    verbose: int = _VERBOSE,
) -> None:
    """Chat with your tuned model: an interactive prompt whose answers stream token by token.

    Type a message and press Enter; /reset forgets the conversation, /exit (or Ctrl-D) ends the chat.
    """
    setup_logging(verbose)
    cfg = _config(max_new_tokens, temperature, top_p, top_k, seed, stop, batch_size=1)
    err = Console(stderr=True)
    coder = adapter_pseudonymizer(adapter, pseudonym_key)  # the conversation is kept as sent: in surrogates
    conn = _prepare(
        protocol=protocol,
        connect=connect,
        provider_key=provider_key,
        keys=keys,
        name=name,
        insecure=insecure,
        connect_timeout=connect_timeout,
        model=model,
        adapter=adapter,
        bottom_layers=bottom_layers,
        top_layers=top_layers,
        codec_up=codec_up,
        codec_down=codec_down,
        noise=noise,
        privacy=privacy,
        public_text=public_text,
        timeout=timeout,
        refuse_recording=refuse_recording,
        device=device,
        dtype=dtype,
        console=err,
        kit=kit,
        provider_sign_key=provider_sign_key,
    )
    from guardedp2p.designs.online.generate import GenerationInterrupted, encode_prompt, eos_ids

    tok = conn.client.tokenizer
    if getattr(tok, "chat_template", None) is None:
        raise ConfigError("this model's tokenizer has no chat template: use `client generate --prompt` instead")
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    err.print("[dim]chat: /reset forgets the conversation, /exit or Ctrl-D ends it[/]")
    try:
        _, gen = conn.open()
        while True:
            try:
                line = input("you> ")
            except EOFError:
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                history = history[:1] if system else []
                err.print("[dim](conversation forgotten)[/]")
                continue
            turn = history + [{"role": "user", "content": coder.encode(line) if coder is not None else line}]
            ids = encode_prompt(tok, turn, chat=True)
            sys.stdout.write("model> ")
            stream = TextStream(tok, _write, eos_ids(tok), cfg.stop)
            try:
                if coder is not None:  # a surrogate must not be shown: the decoded answer once it is complete
                    result = gen.generate([ids], cfg)[0]
                    _write(coder.decode(result.text))
                else:
                    result = gen.generate([ids], cfg, on_token=stream)[0]
                    stream.finish(result.text)
            except GenerationInterrupted as exc:
                sys.stdout.write("\n")
                err.print(f"[yellow]{exc}; reconnecting: send your message again[/]")
                conn.close()
                _, gen = conn.open()
                continue
            except GuardedP2PError as exc:  # e.g. a conversation that outgrew the context: say so, keep chatting
                sys.stdout.write("\n")
                err.print(f"[red]{type(exc).__name__}: {exc}[/] (try /reset)")
                continue
            sys.stdout.write("\n")
            sys.stdout.flush()
            history = turn + [{"role": "assistant", "content": result.text}]
    except KeyboardInterrupt:
        sys.stdout.write("\n")
    finally:
        conn.close()
