"""Zero-shot multiple-choice accuracy and held-out token loss, through any ``logits_fn``.

Scoring follows lm-evaluation-harness' ``multiple_choice`` output type: for each item, every choice is scored
by the summed log-probability of its tokens given the context (``question`` + ``" "``); ``acc`` takes the
arg-max of that sum, ``acc_norm`` the arg-max of the sum divided by the choice's length in characters (which
removes the bias toward short answers). Context and continuation are tokenized the harness' way: the pair is
tokenized whole and the continuation is what follows the context's tokens, so BPE merges at the boundary are
counted in the continuation.

Both functions only need ``logits_fn(input_ids, attention_mask) -> logits [B, T, V]`` (given CPU int64
tensors, right-padded; moving them to a device is the function's job), so the same code evaluates a full local model, a split client/provider model, or a toy function in tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from guardedp2p.data.collate import collate
from guardedp2p.data.tokenize import IGNORE_INDEX

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Harness-style split: trailing spaces of the context move to the continuation."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        continuation = context[-n_space:] + continuation
        context = context[:-n_space]
    whole = list(tokenizer(context + continuation, add_special_tokens=True)["input_ids"])
    ctx = list(tokenizer(context, add_special_tokens=True)["input_ids"])
    cont = whole[len(ctx) :]
    if not cont or whole[: len(ctx)] != ctx:
        # The boundary merged into one token: fall back to separate tokenization.
        cont = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
    return ctx, cont


def score_continuations(
    logits_fn: LogitsFn,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 8,
    max_length: int | None = None,
) -> list[float]:
    """Summed log-probability of each ``continuation`` given its ``context``, for ``(context, continuation)`` pairs.

    Inputs longer than ``max_length`` tokens lose tokens on the left of the context (as in the harness).
    """
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = int(pad_id) if pad_id is not None else 0
    encoded = []
    for context, continuation in requests:
        ctx, cont = _encode_pair(tokenizer, context, continuation)
        seq = (ctx + cont)[:-1]  # the last continuation token is predicted, never fed
        if max_length is not None and len(seq) > max_length:
            seq = seq[-max_length:]
        if not seq:  # empty context: nothing to condition the first token on
            raise ValueError(f"context {context!r} tokenizes to nothing; give a non-empty question")
        encoded.append((seq, cont))
    scores: list[float] = []
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            batch = collate([{"input_ids": s, "labels": s} for s, _ in chunk], pad_id)
            logits = logits_fn(batch["input_ids"], batch["attention_mask"]).float()
            logp = torch.log_softmax(logits, dim=-1)
            for row, (seq, cont) in enumerate(chunk):
                n = len(cont)
                pos = torch.arange(len(seq) - n, len(seq), device=logp.device)
                target = torch.as_tensor(cont, dtype=torch.long, device=logp.device)
                scores.append(float(logp[row, pos, target].sum()))
    return scores


def evaluate_mc(
    logits_fn: LogitsFn,
    tokenizer: Any,
    items: Sequence[dict[str, Any]],
    batch_size: int = 8,
    *,
    target_delimiter: str = " ",
    max_length: int | None = None,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Accuracy of ``items`` (``question``, ``choices``, ``label``) scored by log-likelihood.

    Returns ``{"acc", "acc_norm", "n"}`` (plus ``"pred"``/``"pred_norm"`` lists when ``return_predictions``).
    An empty item list gives ``acc = acc_norm = nan`` and ``n = 0``.
    """
    requests = [(it["question"], target_delimiter + c) for it in items for c in it["choices"]]
    scores = score_continuations(logits_fn, tokenizer, requests, batch_size, max_length)
    correct = correct_norm = 0
    pred: list[int] = []
    pred_norm: list[int] = []
    k = 0
    for it in items:
        choices = it["choices"]
        ll = scores[k : k + len(choices)]
        k += len(choices)
        p = max(range(len(choices)), key=lambda j: ll[j])
        pn = max(range(len(choices)), key=lambda j: ll[j] / max(len(choices[j]), 1))
        correct += int(p == int(it["label"]))
        correct_norm += int(pn == int(it["label"]))
        pred.append(p)
        pred_norm.append(pn)
    n = len(items)
    out: dict[str, Any] = {
        "acc": correct / n if n else math.nan,
        "acc_norm": correct_norm / n if n else math.nan,
        "n": n,
    }
    if return_predictions:
        out["pred"], out["pred_norm"] = pred, pred_norm
    return out


def evaluate_loss(logits_fn: LogitsFn, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Mean next-token negative log-likelihood over all labelled tokens of ``batches``.

    Batches are :func:`~guardedp2p.data.collate.collate` outputs; labels are aligned with ``input_ids`` and
    shifted here. The mean is over tokens, not over batches, so a short last batch weighs what it holds.
    Returns nan when no token carries a label.
    """
    total = 0.0
    count = 0
    with torch.no_grad():
        for batch in batches:
            logits = logits_fn(batch["input_ids"], batch["attention_mask"]).float()
            logits = logits[:, :-1, :]
            labels = batch["labels"][:, 1:].to(logits.device)
            valid = labels != IGNORE_INDEX
            if not bool(valid.any()):
                continue
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            total += float(nll)
            count += int(valid.sum())
    return total / count if count else math.nan
