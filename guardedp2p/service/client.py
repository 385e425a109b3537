"""Client assembly shared by every design: options, the client's model parts, the data, the evaluation.

:func:`tune` runs Online or Gradfree (the loop is :mod:`guardedp2p.designs.online.run`, the failure handling,
resumption and summary are :mod:`guardedp2p.service.runner`). It takes a *channel factory* rather than an
address: the in-process channel (tests, simulations) and the ZeroMQ channel (deployment) run exactly the same
code. Offline runs :func:`guardedp2p.designs.offline.run.tune_offline` with the same options.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from guardedp2p.errors import ConfigError
from guardedp2p.service.runner import ChannelFactory, TrainingInterrupted
from guardedp2p.train.config import TrainConfig
from guardedp2p.wire.handshake import CODEC_DIRECTIONS

if TYPE_CHECKING:
    from rich.console import Console

    from guardedp2p.engine.split import ClientBottom, ClientTop, SplitConfig

__all__ = [
    "ChannelFactory",
    "ClientModel",
    "PreparedData",
    "TrainingInterrupted",
    "TuneOptions",
    "check_codecs",
    "evaluate_metrics",
    "prepare_client",
    "prepare_data",
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
    noise: dict[str, Any] = field(default_factory=dict)  # NoiseConfig fields; empty: none
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


def prepare_data(opts: TuneOptions, tokenizer: Any) -> PreparedData:
    """Load and tokenize the training data and pick the evaluation (multiple choice if given, else held-out loss)."""
    from guardedp2p.data.demo import demo_paths
    from guardedp2p.data.loaders import load_data
    from guardedp2p.data.tokenize import DataConfig, encode_records

    eval_path: str | None = opts.eval_data
    if opts.data is None:
        paths = demo_paths()
        train_path, eval_path = paths.train, eval_path or paths.eval_mc
    else:
        train_path = opts.data
    loaded = load_data(train_path)
    examples = encode_records(loaded.records, tokenizer, DataConfig(max_length=opts.train.max_length), kind=loaded.kind)
    if not examples:
        raise ConfigError(f"{train_path} produced no training example (all records too long or empty?)")
    eval_examples: list[dict[str, list[int]]] = []
    eval_items: list[dict[str, Any]] = []
    eval_kind = "loss"
    if eval_path:
        ev = load_data(eval_path)
        if ev.kind == "mc":
            eval_kind, eval_items = "mc", ev.records[: opts.eval_max_items] if opts.eval_max_items else ev.records
        else:
            eval_examples = encode_records(
                ev.records, tokenizer, DataConfig(max_length=opts.train.max_length), kind=ev.kind
            )
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

    def on_device(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return logits_fn(ids.to(device), mask.to(device))

    out: dict[str, float] = {}
    if data.eval_kind == "mc":
        res = evaluate_mc(
            on_device, tokenizer, data.eval_items, batch_size=opts.eval_batch_size, max_length=opts.train.max_length
        )
        out["acc"] = float(res["acc"])
        out["acc_norm"] = float(res["acc_norm"])
    if data.eval_examples:
        bs = opts.eval_batch_size
        batches = [
            collate(data.eval_examples[i : i + bs], tokenizer.pad_token_id)
            for i in range(0, len(data.eval_examples), bs)
        ]
        out["loss"] = float(evaluate_loss(on_device, batches))
    return out


def check_codecs(opts: TuneOptions) -> None:
    """Refuse unknown codec names before loading anything (the provider would refuse them only later)."""
    from guardedp2p.wire.handshake import FLOAT_CODECS

    for direction, codec in opts.codecs.items():
        if codec not in FLOAT_CODECS:
            raise ConfigError(f"unknown codec {codec!r} for {direction}: use one of {', '.join(FLOAT_CODECS)}")


def tune(
    opts: TuneOptions,
    connect: ChannelFactory,
    *,
    client: ClientModel | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run a whole Online or Gradfree fine-tuning; return the run summary (also written to ``out/summary.json``).

    The design's run function comes from the registry (:mod:`guardedp2p.designs`): Online's split loop in
    :mod:`guardedp2p.designs.online.run`, which Gradfree runs with its cached forward-only trunk.
    """
    if opts.protocol not in ("online", "gradfree"):
        raise ConfigError(f"tune() runs online or gradfree; use the offline runner for {opts.protocol!r}")
    from guardedp2p.designs import get_design

    run = get_design(opts.protocol).load_run()
    summary: dict[str, Any] = run(opts, connect, client=client, console=console)
    return summary
