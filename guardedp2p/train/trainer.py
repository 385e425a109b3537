"""The client's training loop around any trunk.

``trunk(h1, mask, train=..., input_ids=...) -> h2`` is the only thing that differs between designs: a
:class:`~guardedp2p.designs.online.client.RemoteTrunk` (Online: gradients flow through it over the wire), a
cached forward-only remote trunk (Gradfree) or a local emulator module (Offline). The loss, the optional
distance-correlation penalty, noise on what is sent, AdamW, the schedule, clipping and accumulation are the
same code in all three, which is what makes their numbers comparable.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from guardedp2p.engine.split import ClientBottom, ClientTop
from guardedp2p.train.config import TrainConfig


class TrunkFn(Protocol):
    def __call__(
        self, h1: torch.Tensor, mask: torch.Tensor, *, train: bool, input_ids: torch.Tensor
    ) -> torch.Tensor: ...


class DcorFn(Protocol):
    """A privacy penalty on (embeddings, sent activations), e.g. :func:`guardedp2p.privacy.dcor.dcor_penalty`."""

    def __call__(
        self, embeds: torch.Tensor, h1: torch.Tensor, attention_mask: torch.Tensor | None, *, mode: str
    ) -> torch.Tensor: ...


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up then cosine / linear decay to 0 over ``cfg.steps`` (the HF ``get_*_schedule`` shapes)."""

    def fn(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant" or cfg.steps <= cfg.warmup_steps:
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


@dataclass
class StepResult:
    step: int
    loss: float
    task_loss: float
    dcor: float
    lr: float
    seconds: float


@dataclass
class TrainerTimes:
    compute_s: float = 0.0
    steps: int = 0
    history: list[StepResult] = field(default_factory=list)


class SplitTrainer:
    """Owns the client's trainable parameters, optimizer and schedule; runs steps and evaluations."""

    def __init__(
        self,
        bottom: ClientBottom,
        top: ClientTop,
        trunk: TrunkFn,
        cfg: TrainConfig,
        *,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        train_bottom: bool = True,
        transform_sent: Callable[[torch.Tensor], torch.Tensor] | None = None,
        dcor_fn: DcorFn | None = None,
    ) -> None:
        cfg.validate()
        self.bottom, self.top, self.trunk, self.cfg = bottom, top, trunk, cfg
        self.loss_fn = loss_fn
        self.train_bottom = train_bottom
        self.transform_sent = transform_sent
        self.dcor_fn = dcor_fn
        if not train_bottom:
            for p in bottom.parameters():
                p.requires_grad_(False)
        self.named_params = {f"bottom.{n}": p for n, p in bottom.named_parameters() if p.requires_grad}
        self.named_params.update({f"top.{n}": p for n, p in top.named_parameters() if p.requires_grad})
        if not self.named_params:
            from guardedp2p.errors import ConfigError

            raise ConfigError("nothing to train: no client parameter requires a gradient (attach LoRA first)")
        decay = [p for n, p in self.named_params.items() if p.ndim >= 2]
        no_decay = [p for n, p in self.named_params.items() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.step = 0
        self.times = TrainerTimes()

    # ------------------------------------------------------------------ forward
    def _forward(self, batch: dict[str, torch.Tensor], *, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if train and self.train_bottom:
            h1 = self.bottom(ids, mask)
        else:
            with torch.no_grad():
                h1 = self.bottom(ids, mask)
        sent = self.transform_sent(h1) if self.transform_sent is not None else h1
        h2 = self.trunk(sent, mask, train=train, input_ids=ids)
        logits = self.top(h2, mask)
        return logits, h1

    def train_step(self, micro_batches: Iterable[dict[str, torch.Tensor]]) -> StepResult:
        """One optimizer step over ``grad_accum`` micro-batches (the loss is averaged over them)."""
        t0 = time.perf_counter()
        self.bottom.train(self.train_bottom)
        self.top.train(True)
        self.optimizer.zero_grad(set_to_none=True)
        micro = list(micro_batches)
        tot, task_tot, dcor_tot = 0.0, 0.0, 0.0
        for batch in micro:
            logits, h1 = self._forward(batch, train=True)
            task = self.loss_fn(logits, batch["labels"])
            loss = task
            dcor_val = torch.zeros(())
            if self.cfg.dcor_alpha > 0 and self.dcor_fn is not None and self.train_bottom:
                embeds = self.bottom.embed(batch["input_ids"], batch["attention_mask"]).detach()
                dcor_val = self.dcor_fn(embeds, h1, batch["attention_mask"], mode=self.cfg.dcor_mode)
                loss = loss + self.cfg.dcor_alpha * dcor_val
            (loss / len(micro)).backward()
            tot += float(loss.detach()) / len(micro)
            task_tot += float(task.detach()) / len(micro)
            dcor_tot += float(dcor_val.detach()) / len(micro)
        params = list(self.named_params.values())
        if self.cfg.max_grad_norm and self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        lr = float(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        res = StepResult(self.step, tot, task_tot, dcor_tot, lr, time.perf_counter() - t0)
        self.times.history.append(res)
        self.times.steps += 1
        return res

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def logits_fn(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Forward-only pass of the whole split model (used by loss and multiple-choice evaluation)."""
        self.bottom.train(False)
        self.top.train(False)
        logits, _ = self._forward({"input_ids": input_ids, "attention_mask": attention_mask}, train=False)
        return logits

    # ------------------------------------------------------------------ state (checkpoints)
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.named_params.items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.named_params) - set(state)
        if missing:
            from guardedp2p.errors import ConfigError

            raise ConfigError(
                f"checkpoint lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]}); was it made with other LoRA settings?"
            )
        with torch.no_grad():
            for n, p in self.named_params.items():
                p.copy_(state[n].to(p.device, p.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
