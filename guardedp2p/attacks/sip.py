"""SIP: a learned inverter from cut activations back to tokens (Chen et al., BiSR, CCS'24, arXiv 2409.00960, SIP baseline).

The attacker runs public auxiliary text through its *pre-trained* bottom A_in⁰, and trains a small sequence
model to predict each position's token from the activation sequence (per-position cross-entropy, unshifted).
Applied to the client's h₁ it gives x̂ = argmax inverter(h₁), and its logits initialise BiSR.

Defence-aware variant: pass ``transform`` (e.g. ``codec decode∘encode`` or the client's noise mechanism); it is
applied afresh to every training batch, so the inverter learns on activations distributed like what actually
crosses the wire. docs/user-guide.md (privacy settings): report privacy for a lossy uplink only with such an attacker.

Efficiency note: by default the output layer covers only the token ids that occur in the auxiliary corpus
(plus the special tokens). A cross-entropy-trained inverter practically never predicts a token it never saw as
a target, so this changes little in accuracy and cuts the work by the vocabulary ratio (49k -> ~1k for the
demo data); set ``restrict_vocab=False`` for the full head.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from guardedp2p.attacks.common import AttackConfigError, AttackerModel, Transform, identity
from guardedp2p.attacks.metrics import score_many

FeatureFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SIPConfig:
    """Inverter and training hyper-parameters (defaults: Chen et al., BiSR, CCS'24, arXiv 2409.00960, except ``bidirectional``)."""

    arch: Literal["gru", "lstm", "transformer"] = "gru"
    hidden: int = 256
    layers: int = 1
    bidirectional: bool = True
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 1e-5
    epochs: int = 20
    batch_size: int = 6
    holdout: float = 0.1
    min_holdout_rougeL: float = 0.1
    restrict_vocab: bool = True
    max_length: int = 128
    seed: int = 0
    feature_batch: int = 16


class Inverter(nn.Module):
    """LayerNorm -> recurrent (or transformer) encoder -> dropout -> linear head over ``out_vocab`` ids.

    The input LayerNorm matters for LLM activations: a few positions (often the first token) carry "massive
    activations" orders of magnitude above the rest, which would otherwise saturate the recurrent cell.
    """

    def __init__(self, d_in: int, n_out: int, cfg: SIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm = nn.LayerNorm(d_in)
        if cfg.arch in ("gru", "lstm"):
            rnn = nn.GRU if cfg.arch == "gru" else nn.LSTM
            self.encoder: nn.Module = rnn(
                d_in,
                cfg.hidden,
                num_layers=cfg.layers,
                batch_first=True,
                bidirectional=cfg.bidirectional,
                dropout=cfg.dropout if cfg.layers > 1 else 0.0,
            )
            d_out = cfg.hidden * (2 if cfg.bidirectional else 1)
            self.proj_in: nn.Module = nn.Identity()
        elif cfg.arch == "transformer":
            self.proj_in = nn.Linear(d_in, cfg.hidden)
            self.pos = nn.Embedding(cfg.max_length, cfg.hidden)  # rotary models carry no absolute position in h
            layer = nn.TransformerEncoderLayer(
                cfg.hidden,
                nhead=max(1, cfg.hidden // 64),
                dim_feedforward=2 * cfg.hidden,
                dropout=cfg.dropout,
                batch_first=True,
            )
            self.encoder = nn.TransformerEncoder(layer, num_layers=cfg.layers, enable_nested_tensor=False)
            d_out = cfg.hidden
        else:
            raise AttackConfigError(f"unknown SIP arch {cfg.arch!r}; use 'gru', 'lstm' or 'transformer'")
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(d_out, n_out)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.proj_in(self.norm(h.float()))
        if self.cfg.arch == "transformer":
            L = x.shape[1]
            if L > self.pos.num_embeddings:
                raise AttackConfigError(
                    f"sequence of {L} tokens exceeds SIPConfig.max_length={self.pos.num_embeddings}"
                )
            x = x + self.pos(torch.arange(L, device=x.device))
            pad = None if mask is None else mask == 0
            x = self.encoder(x, src_key_padding_mask=pad)
        else:
            x, _ = self.encoder(x)
        return self.head(self.drop(x))


class SIPInverter:
    """A trained inverter plus the id map of its output layer."""

    def __init__(self, net: Inverter, out_ids: torch.Tensor, vocab_size: int, holdout_rougeL: float) -> None:
        self.net = net
        self.out_ids = out_ids  # output index -> global token id
        self.vocab_size = vocab_size
        self.holdout_rougeL = holdout_rougeL

    @property
    def usable(self) -> bool:
        return self.holdout_rougeL > self.net.cfg.min_holdout_rougeL

    @torch.no_grad()
    def local_logits(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.net.train(False)
        dev = next(self.net.parameters()).device
        return self.net(h.to(dev), mask.to(dev)).cpu()

    @torch.no_grad()
    def predict(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x̂ = argmax inverter(h), as global token ids (B x L)."""
        return self.out_ids[self.local_logits(h, mask).argmax(-1)]

    @torch.no_grad()
    def logits(self, h: torch.Tensor, mask: torch.Tensor, floor_margin: float = 20.0) -> torch.Tensor:
        """Full-vocabulary logits (B x L x V); ids outside the output layer get ``min - floor_margin``."""
        z = self.local_logits(h, mask)
        floor = float(z.min()) - floor_margin
        full = torch.full((*z.shape[:-1], self.vocab_size), floor)
        full[..., self.out_ids] = z
        return full


def _pad(seqs: Sequence[torch.Tensor], value: float = 0.0) -> torch.Tensor:
    return nn.utils.rnn.pad_sequence(list(seqs), batch_first=True, padding_value=value)


def compute_features(
    feature_fn: FeatureFn, ids: Sequence[Sequence[int]], batch: int = 16, pad_id: int = 0
) -> list[torch.Tensor]:
    """Run ``feature_fn`` (e.g. A_in⁰) over token sequences in right-padded batches; returns per-sequence L x d."""
    out: list[torch.Tensor] = []
    for i in range(0, len(ids), batch):
        chunk = [torch.as_tensor(list(s), dtype=torch.long) for s in ids[i : i + batch]]
        x = _pad(chunk, pad_id).long()
        m = _pad([torch.ones(len(s), dtype=torch.long) for s in chunk]).long()
        with torch.no_grad():
            h = feature_fn(x, m).detach().float().cpu()
        out.extend(h[j, : len(s)] for j, s in enumerate(chunk))
    return out


def train_sip(
    feature_fn: FeatureFn,
    aux_ids: Sequence[Sequence[int]],
    vocab_size: int,
    config: SIPConfig | None = None,
    *,
    transform: Transform | None = None,
    special_ids: Sequence[int] = (),
    device: str | torch.device = "cpu",
    progress: Callable[[int, int, float], None] | None = None,
) -> SIPInverter:
    """Train an inverter on (feature_fn(x), x) for x in the auxiliary token sequences.

    ``feature_fn(input_ids, mask)`` is the attacker's view of the cut, usually ``AttackerModel.h1``;
    ``transform`` maps a clean activation batch to what the wire delivers (defence-aware training).
    ``progress(epoch, epochs, loss)`` is called after each epoch.
    """
    cfg = config or SIPConfig()
    transform = transform or identity
    seqs = [list(map(int, s))[: cfg.max_length] for s in aux_ids if len(s) > 0]
    if len(seqs) < 2:
        raise AttackConfigError("SIP needs at least 2 non-empty auxiliary sequences")
    rng = random.Random(cfg.seed)
    order = list(range(len(seqs)))
    rng.shuffle(order)
    n_hold = max(1, int(round(cfg.holdout * len(seqs)))) if cfg.holdout > 0 else 0
    hold_idx, train_idx = order[:n_hold], order[n_hold:]
    if not train_idx:
        raise AttackConfigError("SIP holdout leaves no training sequences; lower SIPConfig.holdout")

    if cfg.restrict_vocab:
        used = {t for s in seqs for t in s} | {int(t) for t in special_ids if 0 <= int(t) < vocab_size}
        out_ids = torch.tensor(sorted(used), dtype=torch.long)
    else:
        out_ids = torch.arange(vocab_size)
    to_local = torch.full((vocab_size,), -100, dtype=torch.long)
    to_local[out_ids] = torch.arange(len(out_ids))

    feats = compute_features(feature_fn, seqs, cfg.feature_batch)
    d_in = feats[0].shape[-1]
    torch.manual_seed(cfg.seed)
    net = Inverter(d_in, len(out_ids), cfg).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    targets = [to_local[torch.as_tensor(s)] for s in seqs]

    for epoch in range(cfg.epochs):
        net.train()
        rng.shuffle(train_idx)
        tot, cnt = 0.0, 0
        for i in range(0, len(train_idx), cfg.batch_size):
            idx = train_idx[i : i + cfg.batch_size]
            h = _pad([feats[j] for j in idx])
            y = _pad([targets[j] for j in idx], -100).long()
            m = _pad([torch.ones(len(seqs[j]), dtype=torch.long) for j in idx]).long()
            with torch.no_grad():
                h = transform(h)
            logits = net(h.to(device), m.to(device))
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(device).reshape(-1), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(idx)
            cnt += len(idx)
        if progress is not None:
            progress(epoch + 1, cfg.epochs, tot / max(cnt, 1))

    inv = SIPInverter(net, out_ids, vocab_size, float("nan"))
    if hold_idx:
        hyps, refs = [], []
        for i in range(0, len(hold_idx), cfg.feature_batch):
            idx = hold_idx[i : i + cfg.feature_batch]
            h = _pad([feats[j] for j in idx])
            m = _pad([torch.ones(len(seqs[j]), dtype=torch.long) for j in idx]).long()
            with torch.no_grad():
                pred = inv.predict(transform(h), m)
            hyps += [pred[k, : len(seqs[j])].tolist() for k, j in enumerate(idx)]
            refs += [seqs[j] for j in idx]
        inv.holdout_rougeL = score_many(hyps, refs, None, "ids").rougeL
    return inv


def sip_attack(inverter: SIPInverter, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a trained inverter to an observed activation batch: (ids B x L, full logits B x L x V)."""
    logits = inverter.logits(h, mask)
    return logits.argmax(-1), logits


def train_sip_for(
    attacker: AttackerModel,
    aux_ids: Sequence[Sequence[int]],
    config: SIPConfig | None = None,
    *,
    transform: Transform | None = None,
    special_ids: Sequence[int] = (),
    progress: Callable[[int, int, float], None] | None = None,
) -> SIPInverter:
    """:func:`train_sip` on the attacker's pre-trained bottom output h₁ = A_in⁰(x)."""
    with attacker.frozen():
        return train_sip(
            attacker.h1,
            aux_ids,
            attacker.vocab_size,
            config,
            transform=transform,
            special_ids=special_ids,
            device=attacker.device,
            progress=progress,
        )


__all__ = ["Inverter", "SIPConfig", "SIPInverter", "compute_features", "sip_attack", "train_sip", "train_sip_for"]
