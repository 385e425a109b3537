"""Causal-LM cross-entropy that keeps one vocabulary-sized tensor alive, not three.

The client's top ends in the LM head, and on a small model its training step's peak memory is the logits and their
gradient over the vocabulary (49,152 entries for SmolLM2; docs/results/kit.md). ``F.cross_entropy`` saves the
log-softmax (a second logits-sized tensor) and its backward materialises the gradient of the log-softmax and then
the gradient of the logits next to it: three logits-sized tensors at the backward's peak. This function saves the
logits and one log-sum-exp per row, computes the log-sum-exp a few rows at a time, and builds the gradient in one
tensor in place (softmax minus the one-hot target, scaled): two at the peak. Its value and gradient are those of
``F.cross_entropy`` (mean over targets != ``ignore_index``) up to float rounding (tests/engine/test_loss.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

_CHUNK_ELEMENTS = 1 << 20  # rows per log-sum-exp chunk: a temporary of at most ~4 MiB in fp32


def _row_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    rows = max(1, _CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    return torch.cat([torch.logsumexp(c, dim=-1) for c in logits.split(rows)]) if len(logits) else logits.sum(-1)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        valid = targets != ignore_index
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        lse = _row_logsumexp(logits)
        picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
        count = valid.sum()
        loss = torch.where(valid, lse - picked, torch.zeros_like(lse)).sum() / count
        ctx.save_for_backward(logits, safe, valid, lse, count)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, safe, valid, lse, count = ctx.saved_tensors
        g = logits - lse.unsqueeze(1)  # the one logits-sized allocation of the backward
        g.exp_()
        rows = torch.arange(len(g), device=g.device)
        g[rows, safe] -= 1.0
        g.mul_((valid.to(g.dtype) * (grad / count)).unsqueeze(1))
        return g, None, None


def causal_lm_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (rows, vocab) against ``targets`` (rows,), skipping ``ignore_index``.

    NaN when every target is ignored, as ``F.cross_entropy`` (and transformers' causal-LM loss) give.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits (rows, vocab) and targets (rows,) expected, got {logits.shape}, {targets.shape}")
    out: torch.Tensor = _CrossEntropy.apply(logits, targets, ignore_index)
    return out
