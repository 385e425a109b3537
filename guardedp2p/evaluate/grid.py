"""The four-axis evaluation: design x defence on one task, every number of a row taken from the same run.

For each row the grid runs a real fine-tuning through the real protocol code (in-process channel, a provider
that *records* what it observes), then attacks that recording:

* **utility**: the task metric (accuracy on the demo multiple-choice task) before and after tuning. For the
  Offline design "after" is the provider's plug-in (the uploaded adapters in the full model), the deliverable
  of that design; the emulator's own numbers are kept alongside.
* **privacy**: the best attack's ROUGE-L F1 (the DRA effectiveness) over the attacks that apply to what the
  provider saw, with a defence-aware SIP inverter trained on the same uplink codec. Offline has no per-step
  exchange to attack, which is reported as such rather than as a number.
* **IP exposure**: the fraction of the provider's parameters the client holds (embeddings, client blocks and
  head; plus the emulator's middle blocks in Offline).
* **cost**: wire bytes per training step (up + down) and training time.

Ground truth for scoring is captured on the *client* side (a hook on the client's bottom plus a tap on the
client's own outgoing ACT_UP messages, keyed by session and step) and never read from the transcript, which
holds only what the provider saw. The tap also tells training forwards from evaluation forwards: Gradfree
sends every forward with ``train: false``, so the transcript alone cannot separate them.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from guardedp2p.errors import ConfigError, GuardedP2PError

log = logging.getLogger("guardedp2p.evaluate")

SANITY_MIN_ROUGEL = 0.8  # what the literature reports for SIP / BiSR on an undefended shallow split


class EvaluationError(GuardedP2PError):
    """The evaluation harness could not produce a trustworthy number (e.g. ground truth misaligned)."""


@dataclass(frozen=True)
class RowSpec:
    """One row of the grid: a design, the codec of every direction it uses, and an optional dCor strength."""

    key: str
    label: str
    design: str  # online | gradfree | offline
    codec: str = "fp32"
    dcor: str | None = None  # "weak" | "strong" | None


ROWS: dict[str, RowSpec] = {
    r.key: r
    for r in (
        RowSpec("online", "Online, no defence", "online"),
        RowSpec("dcor_weak", "Online + dCor (weak)", "online", dcor="weak"),
        RowSpec("dcor_strong", "Online + dCor (strong)", "online", dcor="strong"),
        RowSpec("int8", "Online, int8", "online", codec="int8"),
        RowSpec("nf4", "Online, nf4", "online", codec="nf4"),
        RowSpec("gradfree", "Gradfree, fp32", "gradfree"),
        RowSpec("gradfree_nf4", "Gradfree, nf4", "gradfree", codec="nf4"),
        RowSpec("offline", "Offline (emulator)", "offline"),
    )
}
DEFAULT_ROWS: tuple[str, ...] = ("online", "dcor_weak", "dcor_strong", "int8", "nf4", "gradfree", "offline")
NA_OFFLINE = "n/a (no online exchange)"


@dataclass
class GridConfig:
    """Everything the grid needs; the defaults are affordable on a 2-core CPU with the embedded model.

    attack_budget: "fast" (``AttackSuiteConfig.fast()``), "full" (the reference budgets) or "tiny" (plumbing only).
    records: sequences attacked per row (rounded up to whole training batches), from the *last* training steps.
    """

    model: str = "default"
    rows: tuple[str, ...] = DEFAULT_ROWS
    steps: int = 30
    batch_size: int = 4
    lr: float = 2e-3
    max_length: int = 128
    records: int = 8
    dcor_weak: float = 0.5
    dcor_strong: float = 4.0
    attacks: tuple[str, ...] = (
        "sip",
        "bisr_b",
        "bisr_f",
        "bisr_bf",
    )  # TAG*: add it explicitly (slow, a weak baseline here)
    attack_budget: str = "fast"
    eval_items: int | None = None
    aux_records: int = 300
    data: str | None = None  # None: the shipped demo records
    eval_data: str | None = None  # None: the shipped demo multiple-choice task
    aux: str | None = None  # None: the shipped demo auxiliary (public) records
    bottom_layers: int = 2
    top_layers: int = 2
    lora_r: int = 8
    lora_alpha: int = 16
    seed: int = 0
    out: str = "runs/evaluate"
    device: str = "cpu"
    progress: bool = False

    def validate(self) -> None:
        unknown = [r for r in self.rows if r not in ROWS]
        if unknown:
            raise ConfigError(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
        if not self.rows:
            raise ConfigError("no row to run: pass at least one of " + ", ".join(ROWS))
        if self.steps < 1 or self.batch_size < 1 or self.records < 1:
            raise ConfigError("--steps, the batch size and --records must be >= 1")
        if self.dcor_weak < 0 or self.dcor_strong < 0:
            raise ConfigError("dCor weights must be >= 0")
        if self.attack_budget not in ("tiny", "fast", "full"):
            raise ConfigError(f"attack budget {self.attack_budget!r}: use tiny, fast or full")
        from guardedp2p.attacks.runner import ATTACKS

        bad = [a for a in self.attacks if a not in ATTACKS]
        if bad:
            raise ConfigError(f"unknown attack(s) {', '.join(bad)}; choose from {', '.join(ATTACKS)}")

    def train_config(self, dcor_alpha: float = 0.0) -> Any:
        from guardedp2p.train.config import TrainConfig

        warmup = min(5, max(0, self.steps // 5))
        return TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            max_length=self.max_length,
            seed=self.seed,
            warmup_steps=warmup,
            checkpoint_every=0,
            dcor_alpha=dcor_alpha,
            lora_r=self.lora_r,
            lora_alpha=self.lora_alpha,
        )

    def attack_config(self) -> Any:
        from guardedp2p.attacks.runner import AttackSuiteConfig

        if self.attack_budget == "full":
            cfg = AttackSuiteConfig()
        else:
            cfg = AttackSuiteConfig.fast()
        if self.attack_budget == "tiny":
            cfg.sip.epochs, cfg.sip.hidden = 2, 32
            cfg.bisr_f.steps, cfg.bisr_b.steps, cfg.tag.steps, cfg.eia.steps = 20, 5, 10, 20
        cfg.max_observations = math.ceil(self.records / self.batch_size)
        cfg.aux_max_length = self.max_length
        return cfg


# ============================================================================ client-side ground truth
class ClientTruth:
    """The client's own record of which token ids went into every ACT_UP it sent, keyed by (session, step).

    ``on_bottom`` is a forward hook on the client's bottom: it keeps the last batch (ids, mask, h1) and whether
    the client was training (its top is in train mode during a training step, eval mode during evaluation).
    ``on_act_up`` is called with each outgoing ACT_UP: the rows sent are matched to the batch (all rows in
    order, or, when the Gradfree cache sent only some, each sent row to its nearest h1 row).
    """

    def __init__(self, top: torch.nn.Module) -> None:
        self.top = top
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool] | None = None
        self.ids: dict[tuple[str, int], torch.Tensor] = {}
        self.masks: dict[tuple[str, int], torch.Tensor] = {}
        self.train_keys: list[tuple[str, int]] = []
        self.on_train_step: Callable[[int], None] | None = None  # told the step of every training ACT_UP (progress)

    def on_bottom(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        ids = args[0] if args else kwargs["input_ids"]
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        h = output[0] if isinstance(output, tuple) else output
        self._last = (
            ids.detach().cpu().clone(),
            mask.detach().cpu().to(torch.long).clone(),
            h.detach().float().cpu(),
            bool(self.top.training),
        )

    def on_act_up(self, session: str, step: int, h_sent: torch.Tensor, mask_sent: torch.Tensor) -> None:
        if self._last is None:
            raise EvaluationError("an activation was sent before the client's bottom ran: cannot attribute its tokens")
        ids, mask, h, train = self._last
        mask_sent = mask_sent.to(torch.long)
        if tuple(mask_sent.shape) == tuple(mask.shape) and torch.equal(mask_sent, mask):
            rows = list(range(ids.shape[0]))
        else:
            rows = []
            hs = h_sent.float()
            for j in range(hs.shape[0]):
                cand = [i for i in range(ids.shape[0]) if torch.equal(mask[i], mask_sent[j])]
                if not cand:
                    raise EvaluationError(f"sent row {j} of step {step} matches no row of the client's batch")
                m = mask_sent[j].bool()
                d = [float((h[i][m] - hs[j][m]).pow(2).sum()) for i in cand]
                rows.append(cand[min(range(len(cand)), key=d.__getitem__)])
        key = (str(session), int(step))
        self.ids[key] = ids[rows]
        self.masks[key] = mask[rows]
        if train:
            self.train_keys.append(key)
            if self.on_train_step is not None:
                self.on_train_step(int(step))


class TappedChannel:
    """A client channel that shows the client's own outgoing ACT_UP messages to a :class:`ClientTruth`."""

    def __init__(self, inner: Any, truth: ClientTruth) -> None:
        self.inner = inner
        self.truth = truth

    def send(self, frames: Sequence[Any]) -> None:
        from guardedp2p.wire.framing import decode
        from guardedp2p.wire.messages import MsgType

        frames = list(frames)
        msg = decode(frames)
        if msg.type == MsgType.ACT_UP:
            self.truth.on_act_up(msg.session, msg.step, msg.tensors["h"], msg.tensors["mask"])
        self.inner.send(frames)

    def recv(self, timeout: float) -> Any:
        return self.inner.recv(timeout)

    def close(self) -> None:
        self.inner.close()


# ============================================================================ helpers
def client_param_fraction(model: torch.nn.Module, bottom_layers: int, top_layers: int) -> dict[str, Any]:
    """Parameters of the client's parts (embeddings + bottom blocks + top blocks + final norm + head) over the model's."""
    from guardedp2p.designs.offline.emulator import _unique_numel
    from guardedp2p.engine.split import ClientBottom, ClientTop, SplitConfig

    split = SplitConfig(bottom_layers=bottom_layers, top_layers=top_layers)
    parts = [ClientBottom(model, split), ClientTop(model, split)]
    client = _unique_numel([p for part in parts for p in part.parameters()])
    total = _unique_numel(list(model.parameters()))
    return {
        "client_params": int(client),
        "total_params": int(total),
        "fraction": client / total if total else math.nan,
        "what": f"embeddings + {bottom_layers} bottom blocks + {top_layers} top blocks + final norm + head",
    }


def primary_metric(
    logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data: Any,
    tok: Any,
    eval_batch_size: int,
    max_length: int,
) -> float:
    """The primary metric (accuracy for a multiple-choice task, else held-out loss) of any ``logits_fn``."""
    from guardedp2p.data.collate import collate
    from guardedp2p.data.mc_eval import evaluate_loss, evaluate_mc

    if data.eval_kind == "mc":
        return float(
            evaluate_mc(logits_fn, tok, data.eval_items, batch_size=eval_batch_size, max_length=max_length)["acc"]
        )
    batches = [
        collate(data.eval_examples[i : i + eval_batch_size], tok.pad_token_id)
        for i in range(0, len(data.eval_examples), eval_batch_size)
    ]
    return float(evaluate_loss(logits_fn, batches))


def _aux_texts(cfg: GridConfig) -> list[str]:
    from guardedp2p.data.loaders import load_records

    if cfg.aux:
        path = cfg.aux
    else:
        from guardedp2p.data.demo import demo_paths

        path = demo_paths().aux
    recs = load_records(path)[: cfg.aux_records]
    texts = [str(r["text"]) for r in recs if isinstance(r, dict) and "text" in r]
    if not texts:
        raise ConfigError(f"{path} holds no {{'text': ...}} record to train the SIP inverter on")
    return texts


def _nan_to_none(o: Any) -> Any:
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if isinstance(o, dict):
        return {str(k): _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_nan_to_none(v) for v in o]
    return o


def _round(x: Any, n: int = 4) -> Any:
    return round(float(x), n) if isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x)) else x


# ============================================================================ the grid
@dataclass
class _Context:
    cfg: GridConfig
    base: Any
    tok: Any
    aux: list[str]
    out: Path
    console: Any
    inverters: dict[str, Any] = field(default_factory=dict)
    ip_split: dict[str, Any] = field(default_factory=dict)


def _tune_options(ctx: _Context, spec: RowSpec, row_dir: Path, dcor_alpha: float) -> Any:
    from guardedp2p.service.client import TuneOptions
    from guardedp2p.wire.handshake import CODEC_DIRECTIONS

    cfg = ctx.cfg
    return TuneOptions(
        protocol=spec.design,
        model=cfg.model,
        data=cfg.data,
        eval_data=cfg.eval_data,
        out=str(row_dir / "run"),
        train=cfg.train_config(dcor_alpha),
        bottom_layers=cfg.bottom_layers,
        top_layers=cfg.top_layers,
        codecs={d: spec.codec for d in CODEC_DIRECTIONS},
        device=cfg.device,
        eval_max_items=cfg.eval_items,
        progress=cfg.progress,
        retries=0,
    )


def _say(ctx: _Context, text: str) -> None:
    if ctx.console is not None:
        ctx.console.print(text, highlight=False)
    log.info(text)


def _tapped(app: Any, truth: ClientTruth) -> TappedChannel:
    """A fresh in-process channel to ``app`` whose outgoing ACT_UP messages ``truth`` sees (one per connect)."""
    from guardedp2p.transport.inproc import InProcClientChannel

    return TappedChannel(InProcClientChannel(app), truth)


def _run_split_row(ctx: _Context, spec: RowSpec, row_dir: Path) -> dict[str, Any]:
    """Online or Gradfree: tune against a recording provider, then attack what it recorded."""
    from guardedp2p.attacks.common import codec_transform
    from guardedp2p.attacks.runner import run_attacks
    from guardedp2p.attacks.transcript import load_transcript
    from guardedp2p.engine.split import SplitConfig
    from guardedp2p.service.client import prepare_client, tune
    from guardedp2p.service.provider import ProviderOptions, build_provider_app

    cfg = ctx.cfg
    alpha = {"weak": cfg.dcor_weak, "strong": cfg.dcor_strong}.get(spec.dcor or "", 0.0)
    record_dir = row_dir / "transcript"
    app = build_provider_app(
        ProviderOptions(
            model=cfg.model,
            bottom_layers=cfg.bottom_layers,
            top_layers=cfg.top_layers,
            protocols=(spec.design,),
            record_dir=str(record_dir),
            device=cfg.device,
        ),
        model=copy.deepcopy(ctx.base),
    )
    opts = _tune_options(ctx, spec, row_dir, alpha)
    client = prepare_client(opts, model=copy.deepcopy(ctx.base), tokenizer=ctx.tok)
    truth = ClientTruth(client.top)
    handle = client.bottom.register_forward_hook(truth.on_bottom, with_kwargs=True)
    try:
        summary = tune(opts, partial(_tapped, app, truth), client=client, console=ctx.console)
    finally:
        handle.remove()
    del client, app

    # ---- privacy: the provider's recording, attacked with the pre-trained model only
    observed = {o.key: o for o in load_transcript(record_dir)}
    train_obs = [observed[k] for k in truth.train_keys if k in observed]
    acfg = cfg.attack_config()
    # the LAST training steps: by then the client's adapters (and a dCor penalty) have changed what it sends;
    # at step 1 the LoRA is at its init and h1 equals the pre-trained bottom's output whatever the defence
    chosen = train_obs[-acfg.max_observations :] if acfg.max_observations else train_obs
    acfg.max_observations = None  # already selected
    for o in chosen:
        if not torch.equal(truth.masks[o.key], o.mask.to(torch.long)):
            raise EvaluationError(
                f"client-side ground truth of {o.key} does not line up with the provider's observation"
            )
    gt = {o.key: truth.ids[o.key] for o in chosen}
    up = spec.codec
    transform = None if up == "fp32" else codec_transform(up)
    privacy: dict[str, Any] = {"observations_recorded": len(observed), "train_observations": len(train_obs)}
    if not chosen:
        privacy.update({"best_rougeL": None, "display": "no training observation recorded", "observations": 0})
    else:
        _say(ctx, f"  attacking {len(chosen)} observed steps ({', '.join(cfg.attacks)}; SIP aware of the {up} uplink)")
        t0 = time.perf_counter()
        report = run_attacks(
            chosen,
            ctx.base,
            SplitConfig(cfg.bottom_layers, cfg.top_layers),
            ctx.tok,
            ctx.aux,
            list(cfg.attacks),
            acfg,
            ground_truth=gt,
            transform=transform,
            inverter=ctx.inverters.get(up),
            progress=cfg.progress,
        )
        if report.inverter is not None:
            ctx.inverters.setdefault(up, report.inverter)
        attacks: dict[str, Any] = {}
        for name, r in report.results.items():
            if r.skipped:
                attacks[name] = {"label": r.label, "skipped": r.skipped}
            elif r.scores is not None:
                attacks[name] = {
                    "label": r.label,
                    "rougeL": _round(r.scores.rougeL),
                    "rougeL_std": _round(r.scores.rougeL_std),
                    "seconds": round(r.seconds, 2),
                }
                if r.scores.samples:
                    attacks[name]["example"] = {
                        "ref": r.scores.samples[0].ref_text,
                        "hyp": r.scores.samples[0].hyp_text,
                    }
        best = report.best_rougeL
        privacy.update(
            {
                "best_rougeL": _round(best) if best is not None else None,
                "best_attack": report.results[report.best].label if report.best else None,
                "display": f"{best:.3f}" if best is not None else "no attack scored",
                "observations": report.n_observations,
                "sequences": report.n_sequences,
                "attacked_steps": [o.step for o in chosen],
                "sip_holdout_rougeL_ids": _round(report.sip_holdout_rougeL)
                if report.sip_holdout_rougeL is not None
                else None,
                "attacks": attacks,
                "notes": report.notes,
                "attack_s": round(time.perf_counter() - t0, 2),
                "sip_trained_on": up,
            }
        )
    steps = max(1, summary["steps"])
    return {
        "utility": {
            "metric": summary["eval_metric"],
            "before": _round(summary["eval_before"]),
            "after": _round(summary["eval_after"]),
        },
        "privacy": privacy,
        "ip": dict(ctx.ip_split),
        "cost": {
            "bytes_per_step": _round(summary["bytes_per_step"], 1),
            "bytes_up_per_step": _round(summary["train_bytes_up"] / steps, 1),
            "bytes_down_per_step": _round(summary["train_bytes_down"] / steps, 1),
            "gradient_bytes": int(summary["gradient_bytes"]),
            "one_off_bytes": 0,
            "train_s": summary["train_s"],
            "step_s": _round(summary["train_s"] / steps, 3),
            "time_split": summary.get("time_split"),
        },
        "run": {
            "steps": summary["steps"],
            "loss_first": summary["loss_first"],
            "loss_last": summary["loss_last"],
            "dcor_alpha": alpha,
            "codecs": summary["codecs"],
            "wall_s": summary["wall_s"],
            "out": str(row_dir / "run"),
        },
    }


def _run_offline_row(ctx: _Context, spec: RowSpec, row_dir: Path) -> dict[str, Any]:
    """Offline: build + sign an emulator, download it, tune on it, upload the bundle, plug it into the full model."""
    from guardedp2p.crypto.keys import generate_keypair
    from guardedp2p.designs.offline.build import EmulatorBuildOptions, build_emulator_folder
    from guardedp2p.designs.offline.emulator import EmulatorConfig
    from guardedp2p.designs.offline.plugin import logits_fn_of, plug_in
    from guardedp2p.designs.offline.run import OfflineOptions, tune_offline
    from guardedp2p.service.client import prepare_data
    from guardedp2p.service.provider import ProviderOptions, build_provider_app
    from guardedp2p.transport.inproc import InProcClientChannel

    cfg = ctx.cfg
    keys = row_dir / "keys"
    for name in ("provider", "client"):
        if not (keys / f"{name}.sign.key").exists():
            generate_keypair(keys, name)
    emu_dir = row_dir / "provider-emulator"
    build_emulator_folder(
        EmulatorBuildOptions(
            model=cfg.model,
            out=str(emu_dir),
            keys=str(keys),
            key_name="provider",
            device=cfg.device,
            progress=False,
            emulator=EmulatorConfig(bottom_layers=cfg.bottom_layers, top_layers=cfg.top_layers),
        ),
        model=ctx.base,
        tokenizer=ctx.tok,
    )
    app = build_provider_app(
        ProviderOptions(
            model=cfg.model,
            bottom_layers=cfg.bottom_layers,
            top_layers=cfg.top_layers,
            protocols=("offline",),
            emulator_dir=str(emu_dir),
            device=cfg.device,
        ),
        model=copy.deepcopy(ctx.base),
    )
    app.resources.upload_dir = str(row_dir / "uploads")
    app.resources.client_verify_keys = [keys / "client.sign.pub"]
    opts = _tune_options(ctx, spec, row_dir, 0.0)
    off = OfflineOptions(
        provider_verify_key=keys / "provider.sign.pub", client_keys=str(keys), client_key_name="client", baselines=False
    )
    summary = tune_offline(
        opts, partial(InProcClientChannel, app), console=ctx.console, offline=off, base_tokenizer=ctx.tok
    )
    del app
    # the provider's side of the deliverable: the uploaded adapters in its full model
    data = prepare_data(opts, ctx.tok)
    zero_shot = primary_metric(logits_fn_of(ctx.base), data, ctx.tok, opts.eval_batch_size, cfg.max_length)
    plugged = plug_in(copy.deepcopy(ctx.base), summary["bundle_dir"], keys / "client.sign.pub")
    after = primary_metric(logits_fn_of(plugged.model), data, ctx.tok, opts.eval_batch_size, cfg.max_length)
    del plugged
    params = summary.get("params") or {}
    total = int(params.get("full_model") or ctx.ip_split.get("total_params") or 0)
    shipped = int(params.get("shipped") or 0)
    steps = max(1, summary["steps"])
    return {
        "utility": {
            "metric": summary["eval_metric"],
            "before": _round(zero_shot),
            "after": _round(after),
            "emulator_zero_shot": _round(summary["eval_before"]),
            "emulator_finetune": _round(summary["eval_after"]),
            "note": "before: zero-shot of the full model; after: the provider's plug-in of the uploaded adapters",
        },
        "privacy": {
            "best_rougeL": None,
            "display": NA_OFFLINE,
            "observations": 0,
            "sequences": 0,
            "notes": [
                "no per-step exchange: the provider sees only the chunk requests and, once, the signed adapter weights "
                "(not attacked here)"
            ],
        },
        "ip": {
            "client_params": shipped,
            "total_params": total,
            "fraction": summary.get("param_fraction"),
            "what": "embeddings + client blocks + head + the emulator's kept middle blocks (exact weights)",
        },
        "cost": {
            "bytes_per_step": 0.0,
            "bytes_up_per_step": 0.0,
            "bytes_down_per_step": 0.0,
            "gradient_bytes": 0,
            "one_off_bytes": int(summary["bytes_up"] + summary["bytes_down"]),
            "emulator_download_bytes": int(summary.get("emulator_download_wire_bytes", 0)),
            "adapter_upload_bytes": int(summary.get("adapter_upload_wire_bytes", 0)),
            "train_s": summary["train_s"],
            "step_s": _round(summary["train_s"] / steps, 3),
        },
        "run": {
            "steps": summary["steps"],
            "loss_first": summary["loss_first"],
            "loss_last": summary["loss_last"],
            "dcor_alpha": 0.0,
            "emulator": summary.get("emulator"),
            "wall_s": summary["wall_s"],
            "out": str(row_dir / "run"),
        },
    }


def sanity_line(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Is the attack strong enough to trust the privacy column? The undefended Online row should reach ~0.8."""
    base = next((r for r in rows if r["row"] == "online"), None)
    if base is None or base["privacy"].get("best_rougeL") is None:
        return {
            "no_defence_best_rougeL": None,
            "expected_min": SANITY_MIN_ROUGEL,
            "ok": None,
            "message": "sanity check not run: the grid has no scored 'online' (no defence) row",
        }
    v = float(base["privacy"]["best_rougeL"])
    ok = v >= SANITY_MIN_ROUGEL
    if ok:
        msg = f"no-defence best ROUGE-L {v:.3f} >= {SANITY_MIN_ROUGEL}: the attacks are as strong as the literature expects"
    else:
        msg = (
            f"no-defence best ROUGE-L {v:.3f} < {SANITY_MIN_ROUGEL}: the attack is likely broken or under-budgeted "
            "(the literature reports >= 0.8 on an undefended shallow split); treat the privacy column as a lower bound"
        )
    return {"no_defence_best_rougeL": v, "expected_min": SANITY_MIN_ROUGEL, "ok": ok, "message": msg}


def run_grid(cfg: GridConfig, *, model: Any = None, tokenizer: Any = None, console: Any = None) -> dict[str, Any]:
    """Run every row of ``cfg``; write ``results.json`` and ``privacy_utility.png`` into ``cfg.out``; return the results.

    ``model``/``tokenizer``: the pre-trained model (loaded from ``cfg.model`` when not given). It stays pristine:
    every party gets its own copy, and the attacks use it as the attacker's pre-trained model.
    """
    from guardedp2p.engine.loading import load_causal_lm

    cfg.validate()
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        if console is not None:
            console.print(f"loading {cfg.model}…")
        model, tokenizer = load_causal_lm(cfg.model, device=cfg.device)
    if tokenizer is None:
        raise ConfigError("run_grid(model=...) needs the model's tokenizer too")
    for p in model.parameters():
        p.requires_grad_(False)
    model.train(False)  # inference mode for dropout etc. (nn.Module.eval)
    ctx = _Context(cfg, model, tokenizer, _aux_texts(cfg), out, console)
    ctx.ip_split = client_param_fraction(model, cfg.bottom_layers, cfg.top_layers)
    rows: list[dict[str, Any]] = []
    for i, key in enumerate(cfg.rows, 1):
        spec = ROWS[key]
        row_dir = out / key
        _say(ctx, f"[bold][{i}/{len(cfg.rows)}] {spec.label}[/]: tuning {cfg.steps} steps")
        t_row = time.perf_counter()
        res = _run_offline_row(ctx, spec, row_dir) if spec.design == "offline" else _run_split_row(ctx, spec, row_dir)
        row = {
            "row": key,
            "label": spec.label,
            "design": spec.design,
            "codec": spec.codec,
            "defence": _defence_name(spec, cfg),
            **res,
            "row_s": round(time.perf_counter() - t_row, 1),
        }
        rows.append(row)
        _say(
            ctx,
            f"  acc {_fmt(row['utility']['before'])} -> {_fmt(row['utility']['after'])}, privacy {row['privacy']['display']}, "
            f"{row['cost']['bytes_per_step']:.0f} B/step ({row['row_s']:.0f} s)",
        )
    results = {
        "config": asdict(cfg),
        "model": cfg.model,
        "split": [cfg.bottom_layers, cfg.top_layers],
        "metric": rows[0]["utility"]["metric"] if rows else None,
        "rows": rows,
        "sanity": sanity_line(rows),
        "wall_s": round(time.perf_counter() - t0, 1),
        "torch_threads": torch.get_num_threads(),
    }
    results = _nan_to_none(results)
    from guardedp2p.evaluate.plot import plot_privacy_utility

    png = plot_privacy_utility(results["rows"], out / "privacy_utility.png", metric=results["metric"] or "acc")
    results["files"] = {"results": str(out / "results.json"), "plot": str(png)}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results


def _defence_name(spec: RowSpec, cfg: GridConfig) -> str:
    if spec.dcor:
        return f"dCor {spec.dcor} (alpha {cfg.dcor_weak if spec.dcor == 'weak' else cfg.dcor_strong:g})"
    if spec.design == "offline":
        return "emulator (no exchange)"
    if spec.codec != "fp32":
        return f"{spec.codec} codec (all directions)" if spec.design == "online" else f"{spec.codec} codec (up + down)"
    return "none" if spec.design == "online" else "frozen bottom, no gradients"


def _fmt(x: Any, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{float(x):.{nd}f}"


def summary_table(results: dict[str, Any]) -> Any:
    """The rich table the CLI prints: one line per row, the four axes."""
    from rich.table import Table

    metric = results.get("metric") or "acc"
    t = Table(title=f"guardedp2p evaluate — {results['model']}, split {results['split'][0]}/{results['split'][1]}")
    t.add_column("row")
    t.add_column("defence")
    t.add_column(f"{metric} before→after", justify="right")
    t.add_column("best ROUGE-L (attack)", justify="right")
    t.add_column("IP exposure", justify="right")
    t.add_column("bytes/step", justify="right")
    t.add_column("train s", justify="right")
    for r in results["rows"]:
        p = r["privacy"]
        priv = (
            p["display"]
            if p.get("best_rougeL") is None
            else f"{p['best_rougeL']:.3f} ({p.get('best_attack')}, {p.get('observations')} obs)"
        )
        frac = r["ip"].get("fraction")
        cost = r["cost"]
        bps = (
            f"{cost['bytes_per_step'] / 1e6:.2f} MB"
            if cost["bytes_per_step"]
            else f"0 ({cost.get('one_off_bytes', 0) / 1e6:.1f} MB once)"
        )
        t.add_row(
            r["label"],
            r["defence"],
            f"{_fmt(r['utility']['before'])}→{_fmt(r['utility']['after'])}",
            priv,
            "n/a" if frac is None else f"{100 * frac:.1f}%",
            bps,
            f"{cost['train_s']:.1f}",
        )
    return t


__all__ = [
    "ROWS",
    "DEFAULT_ROWS",
    "GridConfig",
    "RowSpec",
    "ClientTruth",
    "TappedChannel",
    "EvaluationError",
    "run_grid",
    "primary_metric",
    "sanity_line",
    "summary_table",
    "client_param_fraction",
]
