"""Client assembly shared by every design: options, the client's model parts, the data, the evaluation.

:func:`tune` runs Online or Gradfree (the loop is :mod:`guardedp2p.designs.online.run`, the failure handling,
resumption and summary are :mod:`guardedp2p.service.runner`). It takes a *channel factory* rather than an
address: the in-process channel (tests, simulations) and the ZeroMQ channel (deployment) run exactly the same
code. Offline runs :func:`guardedp2p.designs.offline.run.tune_offline` with the same options.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from guardedp2p.errors import ConfigError
from guardedp2p.privacy.obfuscation import ObfuscationConfig
from guardedp2p.service.runner import ChannelFactory, TrainingInterrupted
from guardedp2p.train.config import TrainConfig
from guardedp2p.wire.handshake import CODEC_DIRECTIONS

if TYPE_CHECKING:
    from rich.console import Console

    from guardedp2p.data.fields import FieldMapping
    from guardedp2p.data.tokenize import DataConfig
    from guardedp2p.engine.split import ClientBottom, ClientTop, SplitConfig
    from guardedp2p.privacy.pseudonym import FieldPseudonymizer

__all__ = [
    "ChannelFactory",
    "ClientModel",
    "PreparedData",
    "TrainingInterrupted",
    "TuneOptions",
    "TunePlan",
    "check_codecs",
    "check_out_dir",
    "clear_outputs",
    "data_config",
    "describe_data",
    "effective_warmup",
    "evaluate_metrics",
    "finish_run",
    "model_depth",
    "plan_tune",
    "prepare_client",
    "client_pseudonymizer",
    "prepare_data",
    "run_tune",
    "tune",
]


@dataclass
class TuneOptions:
    protocol: str = "online"
    model: str = "default"
    data: str | None = None  # None: the shipped demo records
    eval_data: str | None = None  # None: the shipped demo multiple-choice task (when data is None)
    out: str = "runs/tune"
    train: TrainConfig = field(default_factory=TrainConfig)
    bottom_layers: int = 2
    top_layers: int = 2
    codecs: dict[str, str] = field(default_factory=lambda: {d: "fp32" for d in CODEC_DIRECTIONS})
    noise: dict[str, Any] = field(default_factory=dict)  # NoiseConfig fields; empty: none (or the preset's)
    privacy: str = "off"  # --privacy preset (guardedp2p/privacy/presets.py); --noise overrides its noise
    public_text: str = "demo-aux"  # public records in the client's style: the balanced preset's keep list
    obfuscation: ObfuscationConfig | None = None  # the learned defence (--obfuscate); None: off
    micro_batches: int = 1  # pipelined micro-batches per batch (1: the trainer's own step; the CLI defaults to 2)
    resume: bool = False
    timeout: float = 30.0
    retries: int = 3
    cache: bool = True  # gradfree: trunk-output cache
    device: str = "auto"
    dtype: str | None = None  # fp32|bf16|fp16 of the client's frozen weights (LoRA stays fp32); None: fp32 when loading
    eval_batch_size: int = 8
    eval_max_items: int | None = None
    skip_eval: bool = False
    progress: bool = True
    refuse_recording: bool = False  # end the session if the provider announces transcript recording
    # how --data is read (guardedp2p/data/fields.py, tokenize.py): None/defaults detect the kind from the fields
    data_mapping: FieldMapping | None = None
    loss_on: str = "assistant"  # assistant | all
    chat_template: bool = True
    allow_network: bool = False  # a --data that is no local path may name a Hub data set
    kit: str | None = None  # signed client kit folder (guardedp2p/designs/kit.py): used instead of ``model``
    kit_verify_key: str | None = None  # the provider's NAME.sign.pub that signed the kit
    # keyed pseudonymisation of categorical fields before tokenising (guardedp2p/privacy/pseudonym.py): a JSON
    # schema {field: [values]}, and the key file (None: OUT/pseudonym.key, created on first use; never sent)
    pseudonym: str | None = None
    pseudonym_key: str | None = None


@dataclass
class ClientModel:
    """The client's parts of the model, ready to train."""

    model: Any
    tokenizer: Any
    bottom: ClientBottom
    top: ClientTop
    fingerprint: str
    split: SplitConfig
    device: torch.device


def prepare_client(opts: TuneOptions, *, model: Any = None, tokenizer: Any = None) -> ClientModel:
    """Load the model (unless given), cut out the client parts, fingerprint them, attach LoRA.

    A model loaded here is read on the CPU in the checkpoint's own precision, fingerprinted, split, and only
    then are the client's parts cast to ``opts.dtype`` and moved to the device: the trunk's weights never reach
    the GPU, an fp16 checkpoint is not doubled in RAM on the way, and the fingerprint is the same whatever
    ``dtype`` each party runs in. A model passed in stays on its device and dtype unless ``opts.dtype`` is set.
    LoRA weights are kept in fp32 in every case (AdamW updates underflow in fp16/bf16).
    """
    from guardedp2p.engine.device import pick_device
    from guardedp2p.engine.fingerprint import model_fingerprint
    from guardedp2p.engine.loading import load_causal_lm
    from guardedp2p.engine.lora import LoraSettings, attach_lora
    from guardedp2p.engine.placement import cast_floating_parameters, parse_dtype
    from guardedp2p.engine.split import SplitConfig, build_client_parts

    device = pick_device(opts.device)
    dtype = parse_dtype(opts.dtype) if opts.dtype else None
    loaded_here = model is None
    if model is None and opts.kit is not None:  # only the client's weights: verified before anything is read
        from guardedp2p.designs.kit import load_kit

        split_asked = SplitConfig(bottom_layers=opts.bottom_layers, top_layers=opts.top_layers)
        if opts.kit_verify_key is None:
            raise ConfigError("--kit needs --provider-sign-key PROVIDER.sign.pub to verify the kit's signature")
        kit = load_kit(opts.kit, opts.kit_verify_key, split=split_asked)
        model, tokenizer = kit.model, kit.tokenizer
    if model is None:
        model, tokenizer = load_causal_lm(opts.model, device="cpu", dtype="auto")
        dtype = dtype or torch.float32
    split = SplitConfig(bottom_layers=opts.bottom_layers, top_layers=opts.top_layers)
    fingerprint = model_fingerprint(model, split)  # over pre-trained weights, before any adapter exists
    parts = build_client_parts(model, split)
    for p in model.parameters():
        p.requires_grad_(False)
    # keep no reference to the full model: the trunk's weights are then freed (the parts hold placeholders)
    del model
    import gc

    gc.collect()
    for part in parts:
        if dtype is not None:
            cast_floating_parameters(part, dtype)
        if loaded_here:
            part.to(device)
    cfg = opts.train
    settings = LoraSettings(
        r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.lora_targets
    )
    train_bottom = opts.protocol != "gradfree"
    torch.manual_seed(cfg.seed)
    for p in attach_lora(parts.bottom, parts.top, settings, bottom=train_bottom, top=True):
        if p.dtype != torch.float32:
            p.data = p.data.float()
    return ClientModel(None, tokenizer, parts.bottom, parts.top, fingerprint, split, device)


@dataclass
class PreparedData:
    train_examples: list[dict[str, list[int]]]
    eval_kind: str  # "mc" or "loss"
    eval_items: list[dict[str, Any]]
    eval_examples: list[dict[str, list[int]]]


def data_config(opts: TuneOptions) -> DataConfig:
    """How the run tokenizes its records (``--max-length``, ``--loss-on``, ``--chat-template``)."""
    from guardedp2p.data.tokenize import DataConfig

    return DataConfig(max_length=opts.train.max_length, loss_on=opts.loss_on, use_chat_template=opts.chat_template)  # type: ignore[arg-type]


def _eval_mapping(opts: TuneOptions) -> FieldMapping | None:
    """The training data's field names apply to the evaluation data too, but not its forced kind (it may be mc)."""
    if opts.data_mapping is None:
        return None
    from dataclasses import replace

    return replace(opts.data_mapping, kind="auto")


def _data_paths(opts: TuneOptions) -> tuple[str, str | None]:
    """(training data, evaluation data); without ``--data`` the shipped demo records and their MC task."""
    if opts.data is not None:
        return opts.data, opts.eval_data
    from guardedp2p.data.demo import demo_paths

    paths = demo_paths()
    return paths.train, opts.eval_data or paths.eval_mc


#: Files a pseudonymising run keeps beside its adapter, so `client generate --adapter OUT/adapter` applies them.
PSEUDONYM_SCHEMA_FILE = "pseudonym.json"
PSEUDONYM_KEY_FILE = "pseudonym.key"


def pseudonym_key_path(opts: TuneOptions) -> Path:
    return Path(opts.pseudonym_key) if opts.pseudonym_key else Path(opts.out) / PSEUDONYM_KEY_FILE


def client_pseudonymizer(opts: TuneOptions) -> FieldPseudonymizer | None:
    """The run's keyed pseudonymisation (``--pseudonymize SCHEMA``), or None. Its key is read from
    ``--pseudonym-key`` or ``OUT/pseudonym.key`` (created on first use, owner-only) and the schema is copied to
    ``OUT/pseudonym.json``: the adapter only answers correctly to queries encoded with the same key."""
    if not opts.pseudonym:
        return None
    from guardedp2p.privacy.pseudonym import FieldPseudonymizer, load_or_create_key, load_schema, save_schema

    schema = load_schema(opts.pseudonym)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    key_path = pseudonym_key_path(opts)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    coder = FieldPseudonymizer(schema, load_or_create_key(key_path))
    save_schema(schema, out / PSEUDONYM_SCHEMA_FILE)
    return coder


def prepare_data(opts: TuneOptions, tokenizer: Any) -> PreparedData:
    """Load and tokenize the training data and pick the evaluation (multiple choice if given, else held-out loss).
    With ``--pseudonymize``, every record and evaluation item is encoded with the client's key first."""
    from guardedp2p.data.loaders import load_data
    from guardedp2p.data.tokenize import encode_records

    train_path, eval_path = _data_paths(opts)
    config = data_config(opts)
    coder = client_pseudonymizer(opts)
    loaded = load_data(train_path, opts.data_mapping, allow_network=opts.allow_network)
    if coder is not None:
        loaded = dataclass_replace(loaded, records=[coder.encode_strings(r) for r in loaded.records])
    examples = encode_records(loaded.records, tokenizer, config, kind=loaded.kind)
    if not examples:
        raise ConfigError(f"{train_path} produced no training example (all records too long or empty?)")
    eval_examples: list[dict[str, list[int]]] = []
    eval_items: list[dict[str, Any]] = []
    eval_kind = "loss"
    if eval_path:
        ev = load_data(eval_path, _eval_mapping(opts), allow_network=opts.allow_network)
        if coder is not None:
            encode = coder.encode_mc_item if ev.kind == "mc" else coder.encode_strings
            ev = dataclass_replace(ev, records=[encode(r) for r in ev.records])
        if ev.kind == "mc":
            eval_kind, eval_items = "mc", ev.records[: opts.eval_max_items] if opts.eval_max_items else ev.records
        else:
            eval_examples = encode_records(ev.records, tokenizer, config, kind=ev.kind)
    if eval_kind == "loss" and not eval_examples:
        n_hold = max(1, min(32, len(examples) // 10))
        eval_examples, examples = examples[-n_hold:], examples[:-n_hold]
    return PreparedData(examples, eval_kind, eval_items, eval_examples)


LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def evaluate_metrics(
    logits_fn: LogitsFn, data: PreparedData, tokenizer: Any, opts: TuneOptions, device: torch.device
) -> dict[str, float]:
    """Score a model given as ``logits_fn(input_ids, attention_mask)`` on the run's evaluation data.

    Multiple choice gives ``acc`` and ``acc_norm``; held-out examples give ``loss`` (both when both exist).
    The same function scores every design and baseline, so their numbers are comparable.
    """
    from guardedp2p.data.collate import collate
    from guardedp2p.data.mc_eval import evaluate_loss, evaluate_mc
    from guardedp2p.service.runner import current_phase

    def on_device(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return logits_fn(ids.to(device), mask.to(device))

    bs = opts.eval_batch_size
    items = data.eval_items if data.eval_kind == "mc" else []
    # progress in chunks of one evaluation batch: items scored independently, so chunked accuracy is exact
    mc_chunks = [items[i : i + bs] for i in range(0, len(items), bs)]
    n_loss = -(-len(data.eval_examples) // bs)
    phase = current_phase()
    phase.set_total(len(mc_chunks) + n_loss)
    out: dict[str, float] = {}
    if data.eval_kind == "mc":
        n = correct = correct_norm = 0.0
        for chunk in mc_chunks:
            res = evaluate_mc(on_device, tokenizer, chunk, batch_size=bs, max_length=opts.train.max_length)
            n += len(chunk)
            correct += float(res["acc"]) * len(chunk)
            correct_norm += float(res["acc_norm"]) * len(chunk)
            phase.advance()
        out["acc"] = correct / n if n else math.nan
        out["acc_norm"] = correct_norm / n if n else math.nan
    if data.eval_examples:

        def batches() -> Iterator[dict[str, torch.Tensor]]:
            for i in range(0, len(data.eval_examples), bs):
                yield collate(data.eval_examples[i : i + bs], tokenizer.pad_token_id)
                phase.advance()

        out["loss"] = float(evaluate_loss(on_device, batches()))
    return out


def check_codecs(opts: TuneOptions) -> None:
    """Refuse unknown codec names before loading anything (the provider would refuse them only later)."""
    from guardedp2p.wire.handshake import FLOAT_CODECS

    for direction, codec in opts.codecs.items():
        if codec not in FLOAT_CODECS:
            raise ConfigError(f"unknown codec {codec!r} for {direction}: use one of {', '.join(FLOAT_CODECS)}")


# ------------------------------------------------------------------------------------------------ checks before a run
WARMUP_DEFAULT = 5
"""Warm-up steps when none are asked for, clipped to a tenth of the run by :func:`effective_warmup`."""


def effective_warmup(warmup: int | None, steps: int) -> int:
    """Warm-up steps for a run of ``steps``: the default 5 is clipped to a tenth of the run (a 20-step run warms
    up for 2 steps, a 5-step run not at all) and an explicit value to the run length, so that a short run is not
    all warm-up and its last steps train at the peak learning rate."""
    if warmup is None:
        return min(WARMUP_DEFAULT, steps // 10)
    if warmup < 0:
        raise ConfigError(f"--warmup must be 0 or more (got {warmup})")
    return min(warmup, steps)


def model_depth(model: str) -> int | None:
    """Transformer blocks of ``model`` from its config alone (no weights read); ``None`` when it cannot be told.

    The embedded default is SmolLM2-135M-Instruct (30 blocks); a folder's ``config.json`` names its depth under
    one of the usual keys; a bare ``.gguf`` file is only read when loaded.
    """
    from guardedp2p.engine.loading import DEFAULT_MODEL, _resolve

    folder, gguf = _resolve(model)  # a path that does not exist or is no model fails here, naming what to pass
    if model == DEFAULT_MODEL:
        return 30
    if gguf is not None:
        return None
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{folder / 'config.json'} is unreadable: {exc}") from None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(cfg.get(key), int):
            return int(cfg[key])
    return None


def check_split(model: str, bottom_layers: int, top_layers: int) -> int | None:
    """Refuse a split that leaves the provider no trunk block, before any weight is loaded; return the depth."""
    if bottom_layers < 1 or top_layers < 1:
        raise ConfigError(
            f"--bottom-layers {bottom_layers} / --top-layers {top_layers}: each side needs at least 1 block"
        )
    depth = model_depth(model)
    if depth is not None and bottom_layers + top_layers >= depth:
        raise ConfigError(
            f"--bottom-layers {bottom_layers} + --top-layers {top_layers} leave no block of the model's {depth} for "
            f"the provider's trunk; use at most {depth - 1} blocks in all"
        )
    return depth


def describe_data(opts: TuneOptions) -> dict[str, Any]:
    """Check the training (and evaluation) data as training will read it, without a model; what the summary says.

    ``{"source": "demo"|"file"|"hub", "path", "sha256", "records", "kind", "format"}`` plus ``"eval"`` when an
    evaluation file is given. A malformed file raises :class:`~guardedp2p.data.errors.DataFormatError` listing
    its bad records, in seconds and before any connection.
    """
    from guardedp2p.data.check import check_data

    train_path, eval_path = _data_paths(opts)
    config = data_config(opts)
    report = check_data(train_path, mapping=opts.data_mapping, config=config, allow_network=opts.allow_network)
    if report.kind == "mc":
        raise ConfigError(
            f"--data {train_path}: multiple-choice records are for evaluation (--eval-data), not for training; "
            "give a file of text, chat or instruction records"
        )
    source = "demo" if opts.data is None else ("hub" if report.source_format == "hub" else "file")
    out: dict[str, Any] = {
        "source": source,
        "path": train_path,
        "sha256": report.sha256,
        "records": report.records,
        "kind": report.kind,
        "format": report.source_format,
    }
    if eval_path is not None:
        ev = check_data(eval_path, mapping=_eval_mapping(opts), config=config, allow_network=opts.allow_network)
        out["eval"] = {"path": eval_path, "sha256": ev.sha256, "records": ev.records, "kind": ev.kind}
    return out


RUN_OUTPUTS = ("checkpoint", "checkpoint.old", "checkpoint.tmp", "adapter", "bundle", "summary.json", "tensorboard")
"""What a run writes into ``--out`` and ``--overwrite`` removes; caches (``trunk_cache``, ``emulator``) stay:
they are keyed by the model fingerprint or verified against the signed manifest, so reusing them is safe."""


def checkpoint_step(out: Path) -> int | None:
    """The step of the checkpoint in ``out`` (read from its state file, no tensor loaded), if there is one."""
    for d in (out / "checkpoint", out / "checkpoint.old"):
        try:
            return int(json.loads((d / "state.json").read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _checkpoint_protocol(out: Path) -> str | None:
    try:
        made_for = json.loads((out / "checkpoint" / "state.json").read_text()).get("protocol")
    except (OSError, ValueError, AttributeError):
        return None
    return made_for if isinstance(made_for, str) else None


def check_out_dir(out: Path, *, resume: bool, overwrite: bool, protocol: str | None = None) -> str:
    """Refuse to run into a non-empty ``--out`` unless ``--resume`` or ``--overwrite`` says what to do with it.

    Why: a run used to replace a step-6 checkpoint with a step-2 one when started again without ``--resume``.
    Returns what the run will do with the folder, in words (for the plan).
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: keep one")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    step = checkpoint_step(out)
    if not entries:
        return f"new folder {out}" + (" (nothing to resume yet: starting fresh)" if resume else "")
    if resume:
        made_for = _checkpoint_protocol(out)
        if protocol is not None and made_for is not None and made_for != protocol:
            raise ConfigError(
                f"the checkpoint in {out / 'checkpoint'} is for --protocol {made_for}, not {protocol}; use a new --out, "
                "or --overwrite instead of --resume to replace that run"
            )
        return f"resume from step {step} in {out}" if step is not None else f"no checkpoint in {out}: starting fresh"
    if overwrite:
        return f"replace the run in {out}" + (
            f" (its checkpoint at step {step} is deleted)" if step is not None else ""
        )
    held = f"a checkpoint at step {step}" if step is not None else f"{len(entries)} entries: {', '.join(entries[:4])}"
    raise ConfigError(
        f"--out {out} is not empty ({held}); pass --resume to continue that run, --overwrite to replace it, or "
        "another --out"
    )


def clear_outputs(out: Path) -> None:
    """Remove a previous run's outputs from ``out`` (``--overwrite``); see :data:`RUN_OUTPUTS`."""
    import shutil

    for name in RUN_OUTPUTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


@dataclass
class TunePlan:
    """What a run will do, checked without connecting and without loading weights (``--dry-run`` prints it)."""

    protocol: str
    model: str
    depth: int | None
    split: tuple[int, int]
    data: dict[str, Any]
    out: str
    out_action: str
    train: dict[str, Any]
    codecs: dict[str, str]
    privacy: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)  # what the caller checked too (endpoint, keys, trackers)
    micro_batches: int = 1  # pipelined pieces per batch (1: off)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    def format_text(self) -> str:
        d, t = self.data, self.train
        data = (
            "the shipped demo records (synthetic; pass --data FILE for yours)" if d["source"] == "demo" else d["path"]
        )
        lines = [
            f"design      {self.protocol}",
            f"model       {self.model}" + (f" ({self.depth} blocks)" if self.depth else ""),
            f"split       {self.split[0]} bottom + {self.split[1]} top blocks on this machine; the rest on the provider",
            f"data        {data}: {d['records']} {d['kind']} records ({d['format']}), sha256 {d['sha256'][:16]}…",
        ]
        if "eval" in d:
            lines.append(f"eval data   {d['eval']['path']}: {d['eval']['records']} {d['eval']['kind']} records")
        lines += [
            f"training    {t['steps']} steps x batch {t['batch_size']} x accum {t['grad_accum']}, lr {t['lr']:g} "
            f"({t['schedule']} after {t['warmup_steps']} warm-up steps), max length {t['max_length']}, "
            f"LoRA r={t['lora_r']} alpha={t['lora_alpha']}, seed {t['seed']}",
            "codecs      " + ", ".join(f"{k} {v}" for k, v in self.codecs.items()),
            "privacy     " + (", ".join(f"{k} {v}" for k, v in self.privacy.items()) or "none"),
        ]
        if self.protocol != "offline":
            lines.append(
                f"pipeline    {self.micro_batches} micro-batches per batch"
                if self.micro_batches > 1
                else "pipeline    off (one piece per batch)"
            )
        lines += [
            f"outputs     {self.out_action}",
        ]
        lines += [f"{k:<11} {v}" for k, v in self.extra.items()]
        return "\n".join(lines)


def plan_tune(opts: TuneOptions, *, out_action: str = "", extra: dict[str, Any] | None = None) -> TunePlan:
    """Every check of a run that needs neither the provider nor the model's weights, in the order a user would fix
    them: design, options, model path and depth against the split, the data."""
    from guardedp2p.designs import get_design
    from guardedp2p.engine.placement import parse_dtype

    get_design(opts.protocol)  # an unknown design names the valid ones
    opts.train.validate()
    check_codecs(opts)
    if opts.dtype:
        parse_dtype(opts.dtype)
    privacy: dict[str, Any] = {"dcor": opts.train.dcor_alpha} if opts.train.dcor_alpha else {}
    if opts.noise:
        from guardedp2p.privacy.noise import NoiseConfig

        privacy["noise"] = NoiseConfig(**opts.noise).describe()
    if opts.privacy != "off":
        from guardedp2p.privacy.presets import PRESETS

        if opts.privacy not in PRESETS:
            raise ConfigError(f"unknown privacy preset {opts.privacy!r}: use one of {', '.join(PRESETS)}")
        privacy["preset"] = opts.privacy
    for what, spec in (
        ("--public-text", opts.public_text),
        ("obfuscation public text", (opts.obfuscation or None) and opts.obfuscation.public_text),
    ):
        if spec and spec != "demo-aux" and not Path(str(spec)).exists():
            raise ConfigError(f"{what} {spec}: no such file (give a JSONL file of {{'text': ...}} public records)")
    if opts.obfuscation is not None:
        opts.obfuscation.validate()
        if opts.protocol != "online":
            raise ConfigError(
                f"--obfuscate trains the client's bottom, which the {opts.protocol} design freezes; "
                "use --noise or --privacy instead"
            )
        privacy["obfuscation"] = opts.obfuscation.describe()
    if opts.pseudonym:
        from guardedp2p.privacy.pseudonym import load_schema

        privacy["pseudonym"] = {
            "fields": [f for f, _ in load_schema(opts.pseudonym).fields],
            "key": str(pseudonym_key_path(opts)) + ("" if pseudonym_key_path(opts).exists() else " (created)"),
        }
    if opts.train.top_train == "blocks" and opts.protocol == "offline":
        raise ConfigError(
            "--top-train blocks is for the split designs; on an emulator train full blocks with the offline "
            "design's full-block adapters instead"
        )
    if opts.micro_batches < 1:
        raise ConfigError(f"--micro-batches must be 1 or more (1 turns pipelining off), got {opts.micro_batches}")
    # with --kit the kit's own config is the model (its split is checked again, signed, when it loads)
    depth = check_split(str(opts.kit) if opts.kit else opts.model, opts.bottom_layers, opts.top_layers)
    data = describe_data(opts)
    return TunePlan(
        protocol=opts.protocol,
        model=opts.model,
        depth=depth,
        split=(opts.bottom_layers, opts.top_layers),
        data=data,
        out=opts.out,
        out_action=out_action or f"{opts.out}",
        train=opts.train.to_dict(),
        codecs=dict(opts.codecs),
        privacy=privacy,
        extra=dict(extra or {}),
        micro_batches=opts.micro_batches,
    )


def finish_run(summary: dict[str, Any], opts: TuneOptions, data: dict[str, Any] | None) -> dict[str, Any]:
    """Make a finished run's outputs portable and traceable, and rewrite ``OUT/summary.json``.

    The adapter names a base model stock PEFT can load (:func:`guardedp2p.service.export.portable_base`), and the
    summary says which data trained it (``data``: the file, its SHA-256 and record count, or ``demo``).
    """
    from guardedp2p.service.export import point_adapter_at, portable_base
    from guardedp2p.service.runner import write_summary

    adapter = summary.get("adapter_dir")
    if adapter and (Path(adapter) / "adapter_config.json").is_file():
        base = portable_base(opts.model, kit=opts.kit)
        point_adapter_at(Path(adapter), base, kit=opts.kit)
        summary["base_model_name_or_path"] = base
    if data is not None:
        summary["data"] = data
    write_summary(Path(opts.out), summary)
    return summary


def run_tune(
    opts: TuneOptions,
    connect: ChannelFactory,
    *,
    data: dict[str, Any] | None = None,
    client: ClientModel | None = None,
    console: Console | None = None,
    **design_options: Any,
) -> dict[str, Any]:
    """Any design's whole run from the registry, then :func:`finish_run`; the data is checked first unless
    ``data`` (what :func:`describe_data` returned) says it was."""
    from guardedp2p.designs import get_design

    run = get_design(opts.protocol).load_run()
    if data is None:
        data = describe_data(opts)
    kwargs: dict[str, Any] = dict(design_options)
    if client is not None:
        kwargs["client"] = client
    summary: dict[str, Any] = run(opts, connect, console=console, **kwargs)
    return finish_run(summary, opts, data)


def tune(
    opts: TuneOptions,
    connect: ChannelFactory,
    *,
    client: ClientModel | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run a whole Online or Gradfree fine-tuning; return the run summary (also written to ``out/summary.json``).

    The design's run function comes from the registry (:mod:`guardedp2p.designs`): Online's split loop in
    :mod:`guardedp2p.designs.online.run`, which Gradfree runs with its cached forward-only trunk. The data is
    checked before connecting; the summary records it and the adapter names a loadable base model.
    """
    if opts.protocol not in ("online", "gradfree"):
        raise ConfigError(f"tune() runs online or gradfree; use the offline runner for {opts.protocol!r}")
    return run_tune(opts, connect, client=client, console=console)
