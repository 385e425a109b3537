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

from guardedp2p.engine.lora import top_block_parameters
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


class ObfuscationFn(Protocol):
    """A learned-obfuscation penalty on what is sent (:class:`guardedp2p.privacy.obfuscation.Obfuscator`): the
    inverter it trains itself must fail on ``sent``; returns a scalar connected to ``sent``'s graph."""

    def __call__(self, sent: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...


class _GradLeaving(torch.autograd.Function):
    """Identity forward; backward applies ``fn`` to the gradient before it flows into the trunk (and out)."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ctx.fn = fn
        return h.view_as(h)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.fn(grad), None


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
    obfuscation: float = 0.0


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
        grad_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        obfuscation: ObfuscationFn | None = None,
    ) -> None:
        """``transform_sent`` acts on h1 before it is sent (noise); ``grad_transform`` on dL/dh2 before the trunk's
        backward sends it (Online's gradient noise); ``obfuscation`` adds its penalty on what is sent to the loss
        when the bottom trains (the learned defence of :mod:`guardedp2p.privacy.obfuscation`)."""
        cfg.validate()
        self.bottom, self.top, self.trunk, self.cfg = bottom, top, trunk, cfg
        self.loss_fn = loss_fn
        self.train_bottom = train_bottom
        self.transform_sent = transform_sent
        self.dcor_fn = dcor_fn
        self.grad_transform = grad_transform
        self.obfuscation = obfuscation
        if not train_bottom:
            for p in bottom.parameters():
                p.requires_grad_(False)
        if cfg.top_train == "blocks":
            unfreeze_top_blocks(top, bottom)
        self.named_params = {f"bottom.{n}": p for n, p in bottom.named_parameters() if p.requires_grad}
        self.named_params.update({f"top.{n}": p for n, p in top.named_parameters() if p.requires_grad})
        if not self.named_params:
            from guardedp2p.errors import ConfigError

            raise ConfigError("nothing to train: no client parameter requires a gradient (attach LoRA first)")
        # one group pair for all, as before, unless the top has its own learning rate (checkpoints stay loadable)
        split_lr = (("bottom.", cfg.lr), ("top.", cfg.top_lr)) if cfg.top_lr is not None else (("", cfg.lr),)
        groups: list[dict[str, Any]] = []
        for prefix, lr in split_lr:
            own = {n: p for n, p in self.named_params.items() if n.startswith(prefix)}
            decay = [p for p in own.values() if p.ndim >= 2]
            no_decay = [p for p in own.values() if p.ndim < 2]
            groups += [
                {"params": decay, "weight_decay": cfg.weight_decay, "lr": lr},
                {"params": no_decay, "weight_decay": 0.0, "lr": lr},
            ]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)
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
        self._sent = sent
        h2 = self.trunk(sent, mask, train=train, input_ids=ids)
        if train and self.grad_transform is not None and h2.requires_grad:
            h2 = _GradLeaving.apply(h2, self.grad_transform)
        logits = self.top(h2, mask)
        return logits, h1

    def train_step(self, micro_batches: Iterable[dict[str, torch.Tensor]]) -> StepResult:
        """One optimizer step over ``grad_accum`` micro-batches (the loss is averaged over them)."""
        t0 = time.perf_counter()
        self.bottom.train(self.train_bottom)
        self.top.train(True)
        self.optimizer.zero_grad(set_to_none=True)
        micro = list(micro_batches)
        tot, task_tot, dcor_tot, obf_tot = 0.0, 0.0, 0.0, 0.0
        for batch in micro:
            logits, h1 = self._forward(batch, train=True)
            task = self.loss_fn(logits, batch["labels"])
            loss = task
            dcor_val = torch.zeros(())
            if self.cfg.dcor_alpha > 0 and self.dcor_fn is not None and self.train_bottom:
                embeds = self.bottom.embed(batch["input_ids"], batch["attention_mask"]).detach()
                dcor_val = self.dcor_fn(embeds, h1, batch["attention_mask"], mode=self.cfg.dcor_mode)
                loss = loss + self.cfg.dcor_alpha * dcor_val
            obf_val = torch.zeros(())
            if self.obfuscation is not None and self.train_bottom:
                obf_val = self.obfuscation(self._sent, batch["input_ids"], batch["attention_mask"])
                loss = loss + obf_val
            (loss / len(micro)).backward()
            tot += float(loss.detach()) / len(micro)
            task_tot += float(task.detach()) / len(micro)
            dcor_tot += float(dcor_val.detach()) / len(micro)
            obf_tot += float(obf_val.detach()) / len(micro)
        params = list(self.named_params.values())
        if self.cfg.max_grad_norm and self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        lr = float(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        res = StepResult(self.step, tot, task_tot, dcor_tot, lr, time.perf_counter() - t0, obf_tot)
        self.times.history.append(res)
        self.times.steps += 1
        return res

    def client_cost(self) -> dict[str, Any]:
        """What the client's side costs: its parameters, what trains, compute time and peak memory so far."""
        import resource

        params = {id(p): p for part in (self.bottom, self.top) for p in part.parameters()}
        out: dict[str, Any] = {
            "client_params": sum(p.numel() for p in params.values()),
            "trainable_params": sum(p.numel() for p in self.named_params.values()),
            "client_param_bytes": sum(p.numel() * p.element_size() for p in params.values()),
            # wall time of a step as the client lives it (its compute plus waiting for the trunk)
            "step_s": round(sum(r.seconds for r in self.times.history) / max(1, len(self.times.history)), 4),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # Linux: KiB
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out

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


def unfreeze_top_blocks(top: ClientTop, bottom: ClientBottom) -> list[str]:
    """Train the top's own transformer blocks and final norm in full (``TrainConfig.top_train = "blocks"``).

    More capacity where Gradfree can use it without a gradient on the wire: the top is the client's and nothing it
    computes is sent. Which parameters: :func:`guardedp2p.engine.lora.top_block_parameters` (never one the bottom
    shares, never the LM head: ~28M parameters on SmolLM2). Returns the names unfrozen.
    """
    names = []
    for name, p in top_block_parameters(top, bottom).items():
        if not p.requires_grad:
            p.requires_grad_(True)
            names.append(name)
    return names
