"""An adaptive SIP attacker: it knows the defence and its parameters and trains its inverter through it.

Threat model (issue 15, part 3; GuardedTuning, arXiv 2501.04323, section 3 gives the honest-but-curious
provider the pre-trained weights): the provider watches the whole run and knows

* the pre-trained weights of the whole model,
* thousands of other people's records in the client's format (auxiliary data, never the client's own),
* the defence and every public parameter of it: the design, the uplink codec, the noise mechanism and scale,
  the dCor weight, and the fine-tuning recipe (LoRA rank, learning rate, steps, batch size) the client runs.

So instead of inverting the *pre-trained* bottom (a defence that changes the bottom, like dCor, would then look
stronger than it is), the attacker **replays the client's training on its auxiliary data**
(:func:`simulate_client_run`): its own copy of the client's parts, LoRA attached the same way, the same recipe,
the same dCor penalty and the client's own noise code (:func:`guardedp2p.privacy.noise.client_noise`: activation
noise on h1, Online's gradient noise, dχ on the input embeddings), the pre-trained trunk run locally. It keeps
the bottom's LoRA weights at several points of that replay (start, middle, end: the client's bottom moves during
the run, and the attacker sees every step) and trains one inverter on activations of all of them (each auxiliary
record through one of those bottoms, round robin; :func:`train_adaptive_inverter`), each batch passed through
the *same mechanism* the wire applies (activation noise at the same scale with fresh randomness, the codec's
round trip; dχ noise is drawn once per auxiliary record, when its features are computed). The replay omits the
codec rounding in its own forward passes (it changes the LoRA trajectory only through rounding errors); the
inverter's inputs get it.

The inverter is the SIP bi-GRU of :mod:`guardedp2p.attacks.sip` (LayerNorm -> bidirectional GRU -> linear head
over the token ids seen in the auxiliary data). Its score on held-out auxiliary records is recorded every
``eval_every`` optimiser steps (the convergence curve) and training stops once that score has plateaued.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from guardedp2p.attacks.common import AttackConfigError, Transform, codec_transform
from guardedp2p.attacks.sip import Inverter, SIPConfig, SIPInverter, _pad, compute_features

ProgressFn = Callable[[str, int, int, str], None]  # (phase, done, total, note)


@dataclass(frozen=True)
class Mechanism:
    """Everything public about how the client produced what crossed the wire (the attacker knows all of it).

    ``noise`` holds :class:`guardedp2p.privacy.noise.NoiseConfig` fields (empty: none). The recipe fields mirror
    :class:`guardedp2p.train.config.TrainConfig`.
    """

    design: str = "online"  # online (bottom trained) | gradfree (bottom frozen)
    up_codec: str = "fp32"
    noise: tuple[tuple[str, Any], ...] = ()
    dcor_alpha: float = 0.0
    dcor_mode: str = "token"
    # ObfuscationConfig fields but public_text (the replay uses the attacker's own aux records as the public text)
    obfuscation: tuple[tuple[str, Any], ...] = ()
    bottom_layers: int = 2
    top_layers: int = 2
    steps: int = 60
    batch_size: int = 4
    lr: float = 2e-3
    max_length: int = 128
    lora_r: int = 8
    lora_alpha: int = 16
    warmup_steps: int = 5
    schedule: str = "constant"
    max_grad_norm: float = 1.0

    @property
    def noise_dict(self) -> dict[str, Any]:
        return dict(self.noise)

    @property
    def trains_bottom(self) -> bool:
        return self.design == "online"

    def transform(self) -> Transform | None:
        """What the wire does to a clean h1: noise (fresh OS-entropy randomness) then the uplink codec."""
        return mechanism_transform(self.up_codec, self.noise_dict)

    def _identity(self) -> dict[str, Any]:
        d = asdict(self)
        if not d["obfuscation"]:
            d.pop("obfuscation")  # keys of mechanisms without it stay what they were before the field existed
        return d

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self._identity(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    def simulation_key(self) -> str:
        """What decides the replayed bottoms (the codec does not: see the module docstring)."""
        d = self._identity()
        d.pop("up_codec")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def describe(self) -> str:
        bits = [self.design]
        if self.up_codec != "fp32":
            bits.append(f"{self.up_codec} uplink")
        if self.dcor_alpha:
            bits.append(f"dCor alpha {self.dcor_alpha:g}")
        if self.obfuscation:
            bits.append(f"learned obfuscation weight {dict(self.obfuscation).get('weight', 0):g}")
        nd = self.noise_dict
        if nd.get("kind", "none") != "none":
            bits.append(f"{nd['kind']} noise scale {nd.get('scale', 0):g}")
        return ", ".join(bits)


def _client_noise(noise: Mapping[str, Any] | None) -> Any:
    """The client's own noise machinery for ``noise`` (a ``TuneOptions.noise`` dict), with a fresh generator:
    ``.sent`` (activation noise on h1), ``.grad`` (Online's gradient noise), ``.install(bottom)`` (dχ on the input
    embeddings). None when there is no noise."""
    if not noise or noise.get("kind", "none") == "none":
        return None
    from guardedp2p.privacy.noise import client_noise

    return client_noise(dict(noise))


def mechanism_transform(up_codec: str = "fp32", noise: Mapping[str, Any] | None = None) -> Transform | None:
    """What the wire does to h1 after the bottom: activation noise (if any) then the uplink codec's round trip;
    None when the wire delivers h1 unchanged. dχ noise acts earlier, on the input embeddings (see
    :func:`install_input_mechanism`)."""
    steps: list[Transform] = []
    cn = _client_noise(noise)
    if cn is not None and cn.sent is not None:
        steps.append(cn.sent)
    if up_codec != "fp32":
        steps.append(codec_transform(up_codec))
    if not steps:
        return None

    def transform(h: torch.Tensor) -> torch.Tensor:
        for s in steps:
            h = s(h)
        return h

    return transform


def install_input_mechanism(bottom: torch.nn.Module, noise: Mapping[str, Any] | None) -> Any:
    """Put the client's input-side noise (dχ on the token embeddings) on ``bottom``; returns the ClientNoise (call
    ``.remove()``) or None when the mechanism has none."""
    cn = _client_noise(noise)
    if cn is None or not cn.cfg.acts_on_input:
        return None
    cn.install(bottom)
    return cn


@dataclass
class AdaptiveConfig:
    """The attacker's own budget.

    snapshots: fractions of the replayed run whose bottoms the inverter trains on (0 = pre-trained).
    holdout_every/eval_every: convergence points, in inverter optimiser steps.
    patience: stop after this many convergence points without a gain above ``min_gain`` (plateau).
    max_epochs: hard cap on passes over the auxiliary data.
    seed: the attacker's own randomness (it does not know the client's seed).
    """

    sip: SIPConfig = field(default_factory=lambda: SIPConfig(batch_size=32, lr=2e-3, hidden=256, holdout=0.0))
    snapshots: tuple[float, ...] = (0.0, 0.5, 1.0)
    max_epochs: int = 6
    eval_every: int = 25
    patience: int = 3
    min_gain: float = 0.005
    seed: int = 1234
    feature_dtype: torch.dtype = torch.float16


@dataclass
class ConvergencePoint:
    step: int
    epoch: float
    rougeL: float
    token_acc: float
    loss: float
    seconds: float


@dataclass
class AdaptiveInverter:
    """A trained adaptive inverter and how it got there."""

    inverter: SIPInverter
    mechanism: Mechanism
    curve: list[ConvergencePoint]
    plateaued: bool
    aux_train: int
    aux_holdout: int
    snapshot_steps: list[int]
    simulate_s: float
    features_s: float
    train_s: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        last = self.curve[-1] if self.curve else None
        return {
            "mechanism": self.mechanism.describe(),
            "mechanism_key": self.mechanism.key(),
            "aux_train": self.aux_train,
            "aux_holdout": self.aux_holdout,
            "snapshot_steps": self.snapshot_steps,
            "holdout_rougeL": last.rougeL if last else None,
            "holdout_token_acc": last.token_acc if last else None,
            "plateaued": self.plateaued,
            "convergence": [asdict(p) for p in self.curve],
            "simulate_s": round(self.simulate_s, 1),
            "features_s": round(self.features_s, 1),
            "train_s": round(self.train_s, 1),
            "notes": self.notes,
        }


def encode_records_for_attack(records: Sequence[Mapping[str, Any]], tokenizer: Any, max_length: int) -> list[list[int]]:
    """Token ids of ``{"text": ...}`` records, encoded the way the client encodes its LM records."""
    from guardedp2p.data.tokenize import DataConfig, encode_lm

    texts = [{"text": str(r["text"])} for r in records]
    return [ex["input_ids"] for ex in encode_lm(texts, tokenizer, DataConfig(max_length=max_length))]


def simulate_client_run(
    model: torch.nn.Module,
    tokenizer: Any,
    aux_ids: Sequence[Sequence[int]],
    mech: Mechanism,
    at_steps: Sequence[int],
    *,
    seed: int = 1234,
    progress: ProgressFn | None = None,
) -> dict[int, dict[str, torch.Tensor]]:
    """Replay the client's fine-tuning recipe on auxiliary data; return the bottom's LoRA state at ``at_steps``.

    Step 0 is the pre-trained bottom (an empty state). A design that never trains the bottom (Gradfree) returns
    empty states for every step without running anything.
    """
    from guardedp2p.data.collate import BatchIterator
    from guardedp2p.engine.lora import LoraSettings, attach_lora
    from guardedp2p.engine.split import SplitConfig, loss_fn, split_model
    from guardedp2p.train.config import TrainConfig
    from guardedp2p.train.trainer import SplitTrainer

    wanted = sorted({int(s) for s in at_steps})
    states: dict[int, dict[str, torch.Tensor]] = {s: {} for s in wanted if s == 0}
    last = max(wanted) if wanted else 0
    if not mech.trains_bottom or last == 0:
        return {s: {} for s in wanted}
    m = copy.deepcopy(model)
    for p in m.parameters():
        p.requires_grad_(False)
    parts = split_model(m, SplitConfig(mech.bottom_layers, mech.top_layers))
    cfg = TrainConfig(
        steps=last,
        batch_size=mech.batch_size,
        lr=mech.lr,
        max_length=mech.max_length,
        seed=seed,
        warmup_steps=mech.warmup_steps,
        schedule=mech.schedule,
        max_grad_norm=mech.max_grad_norm,
        checkpoint_every=0,
        dcor_alpha=mech.dcor_alpha,
        dcor_mode=mech.dcor_mode,
        lora_r=mech.lora_r,
        lora_alpha=mech.lora_alpha,
    )
    torch.manual_seed(seed)
    attach_lora(parts.bottom, parts.top, LoraSettings(r=mech.lora_r, alpha=mech.lora_alpha), bottom=True, top=True)
    trunk = parts.trunk

    def trunk_fn(h1: torch.Tensor, mask: torch.Tensor, *, train: bool, input_ids: torch.Tensor) -> torch.Tensor:
        return trunk(h1, mask)

    dcor_fn = None
    if mech.dcor_alpha > 0:
        from guardedp2p.privacy.dcor import dcor_penalty

        dcor_fn = dcor_penalty
    cn = _client_noise(mech.noise_dict)  # the client's own noise code: activations, gradients, input embeddings
    if cn is not None:
        cn.install(parts.bottom)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    obfuscator = None
    if mech.obfuscation:  # the client's learned defence, replayed with the attacker's aux records as public text
        from guardedp2p.privacy.obfuscation import ObfuscationConfig, Obfuscator

        ocfg = ObfuscationConfig(**dict(mech.obfuscation))
        d_model = int(model.get_input_embeddings().weight.shape[1])  # type: ignore[operator]
        obfuscator = Obfuscator(
            ocfg,
            parts.bottom,
            aux_ids,
            d_model,
            transform=cn.sent if cn is not None else None,
            pad_id=pad,
        )
    trainer = SplitTrainer(
        parts.bottom,
        parts.top,
        trunk_fn,
        cfg,
        loss_fn=loss_fn,
        train_bottom=True,
        transform_sent=cn.sent if cn is not None else None,
        grad_transform=cn.grad if cn is not None else None,
        dcor_fn=dcor_fn,
        obfuscation=obfuscator,
    )
    it = BatchIterator(
        [{"input_ids": list(s), "labels": list(s)} for s in aux_ids], mech.batch_size, seed=seed, pad_id=pad
    )
    while trainer.step < last:
        trainer.train_step([next(it)])
        if trainer.step in wanted:
            states[trainer.step] = {k: v for k, v in trainer.trainable_state().items() if k.startswith("bottom.")}
        if progress is not None:
            progress("replay the client's training on aux data", trainer.step, last, "")
    return states


def _bottom_with_state(model: torch.nn.Module, mech: Mechanism, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    from guardedp2p.engine.lora import LoraSettings, attach_lora
    from guardedp2p.engine.split import SplitConfig, split_model

    m = copy.deepcopy(model)
    parts = split_model(m, SplitConfig(mech.bottom_layers, mech.top_layers))
    if state:
        attach_lora(parts.bottom, parts.top, LoraSettings(r=mech.lora_r, alpha=mech.lora_alpha), bottom=True, top=False)
        own = dict(parts.bottom.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                name = k.removeprefix("bottom.")
                if name not in own:
                    raise AttackConfigError(f"replayed state has {name!r}, which the attacker's bottom lacks")
                own[name].copy_(v)
    for p in parts.bottom.parameters():
        p.requires_grad_(False)
    parts.bottom.train(False)
    install_input_mechanism(parts.bottom, mech.noise_dict)  # dχ: the features see noisy input embeddings, as sent
    return parts.bottom


def _features_of(bottom: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def fn(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return bottom(x, m)

    return fn


def _score_holdout(
    inv: SIPInverter,
    feats: Sequence[torch.Tensor],
    seqs: Sequence[Sequence[int]],
    transform: Transform | None,
    tokenizer: Any,
    batch: int = 32,
) -> tuple[float, float]:
    from guardedp2p.attacks.metrics import score_many

    hyps: list[list[int]] = []
    for i in range(0, len(seqs), batch):
        h = _pad([f.float() for f in feats[i : i + batch]])
        m = _pad([torch.ones(len(s), dtype=torch.long) for s in seqs[i : i + batch]]).long()
        with torch.no_grad():
            if transform is not None:
                h = transform(h)
            pred = inv.predict(h, m)
        hyps += [pred[k, : len(s)].tolist() for k, s in enumerate(seqs[i : i + batch])]
    s = score_many(hyps, [list(x) for x in seqs], tokenizer, "detok" if tokenizer is not None else "ids")
    return float(s.rougeL), float(s.token_acc)


def train_adaptive_inverter(
    model: torch.nn.Module,
    tokenizer: Any,
    aux_records: Sequence[Mapping[str, Any]],
    holdout_records: Sequence[Mapping[str, Any]],
    mech: Mechanism,
    cfg: AdaptiveConfig | None = None,
    *,
    progress: ProgressFn | None = None,
    blind: bool = False,
) -> AdaptiveInverter:
    """Replay the run on ``aux_records``, then train and return the inverter with its convergence curve.

    ``blind=True`` zeroes every activation the inverter sees (training and attack alike): a deliberately broken
    attacker, used to check that the sanity gate trips (tests only).
    """
    cfg = cfg or AdaptiveConfig()
    if len(aux_records) < 2 or not holdout_records:
        raise AttackConfigError("the adaptive attacker needs >= 2 auxiliary records and a non-empty held-out set")
    t0 = time.perf_counter()
    aux_ids = encode_records_for_attack(aux_records, tokenizer, mech.max_length)
    hold_ids = encode_records_for_attack(holdout_records, tokenizer, mech.max_length)
    steps = sorted({int(round(f * mech.steps)) for f in cfg.snapshots}) if mech.trains_bottom else [0]
    states = simulate_client_run(model, tokenizer, aux_ids, mech, steps, seed=cfg.seed, progress=progress)
    simulate_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    hold_by_index: dict[int, torch.Tensor] = {}
    # each auxiliary sequence is seen through one bottom (round robin over the snapshots): the features cost one
    # pass over the auxiliary data whatever the number of snapshots, and every snapshot gets len(aux)/k sequences
    feats: list[torch.Tensor | None] = [None] * len(aux_ids)
    for j, s in enumerate(steps):
        bottom = _bottom_with_state(model, mech, states[s])
        mine_aux = [i for i in range(len(aux_ids)) if i % len(steps) == j]
        f = compute_features(_features_of(bottom), [aux_ids[i] for i in mine_aux], cfg.sip.feature_batch, pad_id=0)
        for i, t in zip(mine_aux, f):
            feats[i] = t.to(cfg.feature_dtype)
        mine = [i for i in range(len(hold_ids)) if i % len(steps) == j]  # held-out records spread over the snapshots
        held = compute_features(_features_of(bottom), [hold_ids[i] for i in mine], cfg.sip.feature_batch, pad_id=0)
        hold_by_index.update(zip(mine, held))
        del bottom
        if progress is not None:
            progress("attacker features", j + 1, len(steps), f"bottom at step {s}")
    hold_feats_sorted = [hold_by_index[i] for i in range(len(hold_ids))]
    features_s = time.perf_counter() - t1

    # output layer over the ids seen in the auxiliary data (plus specials), as in train_sip
    hf: Any = model  # a Hugging Face model: get_input_embeddings is not visible through nn.Module's typing
    vocab = int(hf.get_input_embeddings().weight.shape[0])
    special = [int(t) for t in (getattr(tokenizer, "all_special_ids", None) or []) if 0 <= int(t) < vocab]
    out_ids = torch.tensor(sorted({t for s in aux_ids for t in s} | set(special)), dtype=torch.long)
    to_local = torch.full((vocab,), -100, dtype=torch.long)
    to_local[out_ids] = torch.arange(len(out_ids))
    targets = [to_local[torch.as_tensor(s)] for s in aux_ids]
    transform = mech.transform()
    if blind:
        transform = torch.zeros_like
    sip = cfg.sip
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    d_in = feats[0].shape[-1]  # type: ignore[union-attr]
    net = Inverter(d_in, len(out_ids), sip)
    opt = torch.optim.Adam(net.parameters(), lr=sip.lr, weight_decay=sip.weight_decay)
    inv = SIPInverter(net, out_ids, vocab, float("nan"))
    curve: list[ConvergencePoint] = []
    t2 = time.perf_counter()
    order = list(range(len(aux_ids)))
    per_epoch = math.ceil(len(order) / sip.batch_size)
    total = per_epoch * cfg.max_epochs
    step, run_loss, run_n, best, stale, plateaued = 0, 0.0, 0, -1.0, 0, False

    def checkpoint() -> None:
        nonlocal best, stale, plateaued, run_loss, run_n
        r, acc = _score_holdout(inv, hold_feats_sorted, hold_ids, transform, tokenizer)
        curve.append(
            ConvergencePoint(
                step,
                round(step / per_epoch, 3),
                round(r, 4),
                round(acc, 4),
                round(run_loss / max(run_n, 1), 4),
                round(time.perf_counter() - t2, 1),
            )
        )
        run_loss, run_n = 0.0, 0
        if r > best + cfg.min_gain:
            best, stale = r, 0
        else:
            stale += 1
        plateaued = stale >= cfg.patience
        if progress is not None:
            progress("train the inverter", step, total, f"held-out ROUGE-L {r:.3f}")

    for _epoch in range(cfg.max_epochs):
        rng.shuffle(order)
        for i in range(0, len(order), sip.batch_size):
            idx = order[i : i + sip.batch_size]
            net.train()
            h = _pad([feats[j].float() for j in idx])  # type: ignore[union-attr]
            y = _pad([targets[j] for j in idx], -100).long()
            m = _pad([torch.ones(len(aux_ids[j]), dtype=torch.long) for j in idx]).long()
            with torch.no_grad():
                if transform is not None:
                    h = transform(h)
            logits = net(h, m)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            run_loss += float(loss.detach())
            run_n += 1
            if step % cfg.eval_every == 0:
                checkpoint()
                if plateaued:
                    break
        if plateaued:
            break
    if not curve or curve[-1].step != step:
        checkpoint()
    inv.holdout_rougeL = curve[-1].rougeL
    notes = []
    if not plateaued:
        notes.append(
            f"held-out score still rising after {cfg.max_epochs} epochs (no plateau): privacy numbers are a lower bound"
        )
    return AdaptiveInverter(
        inv,
        mech,
        curve,
        plateaued,
        len(aux_ids),
        len(hold_ids),
        steps,
        simulate_s,
        features_s,
        time.perf_counter() - t2,
        notes,
    )


def invert(adaptive: AdaptiveInverter, h1: torch.Tensor, mask: torch.Tensor, *, blind: bool = False) -> torch.Tensor:
    """The attack itself: token ids (B x L) guessed from one observed h1 (as received, after the wire)."""
    h = torch.zeros_like(h1.float()) if blind else h1.float()
    return adaptive.inverter.predict(h, mask)


__all__ = [
    "install_input_mechanism",
    "AdaptiveConfig",
    "AdaptiveInverter",
    "ConvergencePoint",
    "Mechanism",
    "encode_records_for_attack",
    "invert",
    "mechanism_transform",
    "simulate_client_run",
    "train_adaptive_inverter",
]
