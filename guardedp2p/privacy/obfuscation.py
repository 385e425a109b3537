"""Learned obfuscation: the client trains its bottom against an inverter it trains itself (adversarial min-max).

The game (adversarial representation learning for text, e.g. Li, Baldwin & Cohn, ACL'18; in split learning the
"adversarial" defences that BiSR, arXiv 2409.00960, and the GuardedTuning paper, arXiv 2501.04323, compare
against): an *inner* player, the client's own inverter, learns to read tokens back from what the client sends,
on public text (never the client's records: the client plays the attacker, who holds only public data); the
*outer* player, the client's bottom, keeps the task loss low while pushing that inverter's likelihood of the
true token down:

    loss = task + λ · mean_t max(log p_inv(x_t | sent_t), log(1 / K))

where K is the number of token ids the inverter knows (the ids of the public text). The floor at chance stops
the bottom once the inverter does no better than guessing: a *maximised* cross-entropy would reward mapping every
token to a confidently wrong one, a permutation that any fresh attacker inverts at once.

What it does not promise: the inverter here is the client's, small and position-wise; the provider's can be
bigger, contextual and trained longer, on the very activations the defended bottom produces. A learned defence
is only as good as its measurement against a *fresh adaptive attacker* that replays it (issue 15's instrument,
``guardedp2p/attacks/adaptive.py``); until then it is a heuristic, and it needs a trainable bottom (Online).

Hook: :class:`Obfuscator` is the trainer's ``obfuscation`` hook
(:class:`guardedp2p.train.trainer.SplitTrainer`): each call first runs ``inner_steps`` updates of the inverter
on a public batch through the *current* bottom (and the same noise as the wire), then returns the penalty on what
the client is about to send.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from guardedp2p.errors import ConfigError

__all__ = ["ObfuscationConfig", "Obfuscator", "TokenInverter", "inverter_token_accuracy"]

Bottom = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ObfuscationConfig:
    """The learned defence's knobs.

    ``weight``: λ of the adversarial term. ``hidden``: width of the inverter's hidden layer (0: a linear probe).
    ``inner_steps``: inverter updates per client step; ``warmup_steps``: inverter updates on the pre-trained
    bottom before the first client step (so the game starts against a competent adversary). ``public_text``:
    where the public records come from (a path, or ``demo-aux`` for the shipped auxiliary demo records); the
    run resolves it to token ids (this module takes ids). ``public_batch`` / ``max_length``: size of each public
    batch. ``lr``: the inverter's AdamW learning rate. ``seed``: batch order and inverter initialisation.
    """

    weight: float = 1.0
    hidden: int = 256
    inner_steps: int = 1
    warmup_steps: int = 50
    public_text: str = "demo-aux"
    public_batch: int = 8
    max_length: int = 128
    lr: float = 1e-3
    seed: int = 0

    def validate(self) -> None:
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight >= 0):
            raise ConfigError(f"obfuscation weight must be a finite number >= 0, got {self.weight!r}")
        if self.hidden < 0 or self.inner_steps < 0 or self.warmup_steps < 0:
            raise ConfigError("obfuscation hidden, inner_steps and warmup_steps must be >= 0")
        if self.public_batch < 1 or self.max_length < 2:
            raise ConfigError("obfuscation public_batch must be >= 1 and max_length >= 2")
        if not self.lr > 0:
            raise ConfigError("obfuscation lr must be > 0")

    def describe(self) -> dict[str, Any]:
        """For the handshake and the summary: every knob (all public; an attacker may know them)."""
        out = {"mechanism": "adversarial obfuscation (client-trained inverter on public text)", **asdict(self)}
        out["public_text"] = Path(self.public_text).name  # never the client's local path
        return out


class TokenInverter(nn.Module):
    """LayerNorm -> (Linear -> GELU)? -> Linear over the ``out_ids`` the public text holds; one token at a time."""

    out_ids: torch.Tensor

    def __init__(self, d_in: int, out_ids: Sequence[int], hidden: int = 256) -> None:
        super().__init__()
        self.register_buffer("out_ids", torch.tensor(sorted(set(int(i) for i in out_ids)), dtype=torch.long))
        n_out = int(self.out_ids.numel())
        layers: list[nn.Module] = [nn.LayerNorm(d_in)]
        layers += [nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, n_out)] if hidden else [nn.Linear(d_in, n_out)]
        self.net = nn.Sequential(*layers)

    @property
    def n_out(self) -> int:
        return int(self.out_ids.numel())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h.float())

    def targets(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class index per token, mask of the tokens the inverter can name at all)."""
        out_ids = self.out_ids.to(ids.device)
        pos = torch.searchsorted(out_ids, ids).clamp(max=out_ids.numel() - 1)
        return pos, out_ids[pos] == ids

    @torch.no_grad()
    def predict(self, h: torch.Tensor) -> torch.Tensor:
        return self.out_ids.to(h.device)[self(h).argmax(dim=-1)]


def _loss_terms(inv: TokenInverter, h: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
    target, known = inv.targets(ids)
    use = mask.bool() & known
    logp = F.log_softmax(inv(h), dim=-1)
    return logp.gather(-1, target.unsqueeze(-1)).squeeze(-1), use


def inverter_token_accuracy(inv: TokenInverter, h: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of the valid tokens the inverter reads back exactly."""
    pred = inv.predict(h)
    m = mask.bool()
    return float((pred[m] == ids[m]).float().mean()) if bool(m.any()) else math.nan


class Obfuscator:
    """The trainer's ``obfuscation`` hook: trains its inverter (inner player), returns the bottom's penalty."""

    def __init__(
        self,
        cfg: ObfuscationConfig,
        bottom: Bottom,
        public_ids: Sequence[Sequence[int]],
        d_model: int,
        *,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        pad_id: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        cfg.validate()
        seqs = [list(map(int, s[: cfg.max_length])) for s in public_ids if len(s) >= 2]
        if not seqs:
            raise ConfigError("the obfuscation defence needs public text: no public record has 2 tokens or more")
        self.cfg, self.bottom, self.transform = cfg, bottom, transform
        self.public, self.pad_id, self.device = seqs, pad_id, torch.device(device)
        torch.manual_seed(cfg.seed)
        self.inverter = TokenInverter(d_model, [t for s in seqs for t in s], cfg.hidden).to(self.device)
        self.optimizer = torch.optim.AdamW(self.inverter.parameters(), lr=cfg.lr)
        self._rng = random.Random(cfg.seed)
        self._order: list[int] = []
        self.inner_updates = 0
        self.last_inverter_loss = math.nan
        self.started = False

    # ------------------------------------------------------------------ the inner player
    def _public_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for _ in range(self.cfg.public_batch):
            if not self._order:
                self._order = list(range(len(self.public)))
                self._rng.shuffle(self._order)
            rows.append(self.public[self._order.pop()])
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids.to(self.device), mask.to(self.device)

    def inner_step(self) -> float:
        """One inverter update on a public batch through the current bottom and the wire's noise."""
        ids, mask = self._public_batch()
        was_training = getattr(self.bottom, "training", False)
        if isinstance(self.bottom, nn.Module):
            self.bottom.train(False)
        with torch.no_grad():
            h = self.bottom(ids, mask)
            if self.transform is not None:
                h = self.transform(h)
        if isinstance(self.bottom, nn.Module):
            self.bottom.train(was_training)
        self.inverter.train(True)
        logp, use = _loss_terms(self.inverter, h.detach(), ids, mask)
        loss = -(logp * use).sum() / use.sum().clamp_min(1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.inner_updates += 1
        self.last_inverter_loss = float(loss.detach())
        return self.last_inverter_loss

    def warm_up(self) -> None:
        for _ in range(self.cfg.warmup_steps):
            self.inner_step()
        self.started = True

    # ------------------------------------------------------------------ the outer player's penalty
    def penalty(self, sent: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """λ · mean over valid tokens of max(log p_inv(true token), log 1/K): differentiable w.r.t. ``sent``."""
        self.inverter.train(False)
        for p in self.inverter.parameters():
            p.requires_grad_(False)
        try:
            logp, use = _loss_terms(self.inverter, sent, input_ids.to(sent.device), attention_mask.to(sent.device))
        finally:
            for p in self.inverter.parameters():
                p.requires_grad_(True)
        floor = -math.log(max(2, self.inverter.n_out))
        val = (logp.clamp_min(floor) * use).sum() / use.sum().clamp_min(1)
        return self.cfg.weight * (val - floor)  # >= 0, 0 at chance

    def __call__(self, sent: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if not self.started:
            self.warm_up()
        for _ in range(self.cfg.inner_steps):
            self.inner_step()
        return self.penalty(sent, input_ids, attention_mask)

    def stats(self) -> dict[str, Any]:
        return {"inner_updates": self.inner_updates, "inverter_loss": round(self.last_inverter_loss, 4)}
