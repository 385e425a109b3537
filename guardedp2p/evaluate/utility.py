"""Per-item utility of a tuned model: multiple-choice correctness and answer NLL, and per-record field NLL.

The frontier compares configurations item by item (paired bootstrap, :mod:`guardedp2p.evaluate.stats`), so it
needs one number per item, not the aggregate that :func:`guardedp2p.data.mc_eval.evaluate_mc` returns.

What is evaluated is the model the client ends up with: its tuned bottom and top (the LoRA-patched blocks of the
client's copy of the model) around the pre-trained trunk, with the wire's mechanisms at the two cuts exactly as
the protocol applies them in an evaluation forward: noise and the uplink codec on h1, the downlink codec on h2
(:func:`cut_transforms`). The client's copy of the full model *is* that composition: ``prepare_client`` builds the
parts from the model it is given and LoRA patches those blocks in place, while its trunk blocks keep the
pre-trained weights the provider serves. Forward hooks on the last bottom block and the last trunk block apply
the mechanisms. The int8 codec scales per row (one token) and nf4 blocks of 64 values tile a token exactly when
the hidden size is a multiple of 64 (576 for SmolLM2), so a token's round trip does not depend on the other
tokens of the batch and the result equals the protocol's evaluation.

Speed (why not ``evaluate_mc``): the four choices of an item share the question, so the question runs once
with the key/value cache and only the short continuations run four times; logits are computed only where a
token is scored (``logits_to_keep``). Same scores as ``evaluate_mc`` (tests/evaluate/test_utility.py), about
4x less compute, which is what makes 1,000-item evaluations affordable on a 2-core CPU.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from guardedp2p.errors import ConfigError

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ItemScores:
    """Per-item multiple-choice results: ``correct`` (0/1), ``answer_nll`` (mean NLL per token of the right
    choice's continuation, nats) and the predicted choice index."""

    correct: np.ndarray
    answer_nll: np.ndarray
    pred: list[int]

    @property
    def acc(self) -> float:
        return float(self.correct.mean()) if self.correct.size else math.nan


def _blocks(model: torch.nn.Module) -> Any:
    from guardedp2p.engine.arch import get_arch, get_path

    return get_path(model, get_arch(model).blocks_path)


def cut_transforms(
    up_codec: str = "fp32",
    down_codec: str = "fp32",
    noise: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Transform | None, Transform | None]:
    """(transform at the bottom cut, transform at the top cut) of a split run's evaluation forward.

    Bottom: the client's noise (fresh OS-entropy generator, as in a run), then the uplink codec's round trip.
    Top: the downlink codec's round trip. ``None`` where nothing happens (fp32, no noise).
    """
    from guardedp2p.attacks.common import codec_transform

    steps: list[Transform] = []
    if noise and noise.get("kind", "none") != "none":
        from guardedp2p.privacy.noise import NoiseConfig, add_activation_noise

        cfg = NoiseConfig.from_dict(dict(noise))
        if not cfg.acts_on_input:  # dχ acts on the input embeddings instead (:func:`input_noise`)
            gen = cfg.make_generator(torch.device(device))  # on the device of the activations it noises
            steps.append(lambda h: add_activation_noise(h, cfg, gen))
    if up_codec != "fp32":
        steps.append(codec_transform(up_codec))
    up: Transform | None = None
    if steps:

        def up(h: torch.Tensor) -> torch.Tensor:
            for s in steps:
                h = s(h)
            return h

    down = codec_transform(down_codec) if down_codec != "fp32" else None
    return up, down


@contextlib.contextmanager
def input_noise(model: torch.nn.Module, noise: Mapping[str, Any] | None) -> Iterator[None]:
    """dχ noise on ``model``'s input embeddings while scoring, as the client's split run applies it to every forward
    (training and inference alike; :func:`guardedp2p.privacy.noise.install_input_noise`). Nothing for other noise."""
    handle = None
    if noise and noise.get("kind", "none") != "none":
        from guardedp2p.privacy.noise import NoiseConfig, install_embedding_noise

        cfg = NoiseConfig.from_dict(dict(noise))
        if cfg.acts_on_input:
            emb = model.get_input_embeddings()  # type: ignore[operator]
            device = next(model.parameters()).device  # a CUDA model needs a CUDA generator
            handle = install_embedding_noise(emb, cfg, cfg.make_generator(device))
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


@contextlib.contextmanager
def cut_hooks(
    model: torch.nn.Module, bottom_layers: int, top_layers: int, up: Transform | None, down: Transform | None
) -> Iterator[None]:
    """Apply ``up`` to the output of the last bottom block and ``down`` to the output of the last trunk block."""
    blocks = _blocks(model)
    n = len(blocks)
    handles = []

    def hook_for(fn: Transform) -> Callable[..., Any]:
        def hook(_m: torch.nn.Module, _args: Any, out: Any) -> Any:
            if isinstance(out, tuple):
                return (fn(out[0]).to(out[0].dtype),) + tuple(out[1:])
            return fn(out).to(out.dtype)

        return hook

    try:
        if up is not None:
            handles.append(blocks[bottom_layers - 1].register_forward_hook(hook_for(up)))
        if down is not None:
            handles.append(blocks[n - top_layers - 1].register_forward_hook(hook_for(down)))
        yield
    finally:
        for h in handles:
            h.remove()


def _cache_kw(model: torch.nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(out: Any) -> Any:
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)


@torch.no_grad()
def mc_item_scores(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[Mapping[str, Any]],
    *,
    max_length: int | None = None,
    target_delimiter: str = " ",
    progress: Callable[[int], None] | None = None,
) -> ItemScores:
    """Score every choice of every item by summed log-probability (lm-evaluation-harness' rule, as
    :func:`~guardedp2p.data.mc_eval.evaluate_mc`), running each question once with the KV cache.

    A question too long for ``max_length`` loses tokens on its left, as in ``evaluate_mc`` (cut for the
    longest choice, so all choices of the item share one prefix).
    """
    from guardedp2p.data.mc_eval import _encode_pair

    model.train(False)
    dev = next(model.parameters()).device
    kw = _cache_kw(model)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = int(pad) if pad is not None else 0
    correct, nll, preds = [], [], []
    for k, it in enumerate(items):
        pairs = [_encode_pair(tokenizer, it["question"], target_delimiter + c) for c in it["choices"]]
        ctxs = {tuple(c) for c, _ in pairs}
        conts = [cont for _, cont in pairs]
        if len(ctxs) != 1:  # a boundary merge changed the context's tokens for some choice: score choices one by one
            scores = [_score_one(model, ctx, cont, max_length, dev) for ctx, cont in pairs]
        else:
            ctx = list(next(iter(ctxs)))
            longest = max(len(c) for c in conts)
            if max_length is not None and len(ctx) + longest - 1 > max_length:
                ctx = ctx[len(ctx) + longest - 1 - max_length :]
            out = model(input_ids=torch.tensor([ctx], device=dev), use_cache=True, logits_to_keep=1)
            first = torch.log_softmax(out.logits[0, -1].float(), -1)
            cache = _out_cache(out)
            scores = [float(first[c[0]]) for c in conts]
            if longest > 1:
                B = len(conts)
                cache.batch_repeat_interleave(B)
                L = longest - 1
                x = torch.full((B, L), pad, dtype=torch.long)
                m = torch.zeros(B, len(ctx) + L, dtype=torch.long)
                m[:, : len(ctx)] = 1
                for b, c in enumerate(conts):
                    x[b, : len(c) - 1] = torch.tensor(c[:-1])
                    m[b, len(ctx) : len(ctx) + len(c) - 1] = 1
                out2 = model(input_ids=x.to(dev), attention_mask=m.to(dev), use_cache=True, **{kw: cache})
                lp = torch.log_softmax(out2.logits.float(), -1)
                for b, c in enumerate(conts):
                    for t in range(1, len(c)):
                        scores[b] += float(lp[b, t - 1, c[t]])
        label = int(it["label"])
        p = max(range(len(scores)), key=lambda j: scores[j])
        preds.append(p)
        correct.append(float(p == label))
        nll.append(-scores[label] / max(1, len(conts[label])))
        if progress is not None:
            progress(k + 1)
    return ItemScores(np.asarray(correct), np.asarray(nll), preds)


def _score_one(
    model: torch.nn.Module, ctx: list[int], cont: list[int], max_length: int | None, dev: torch.device
) -> float:
    seq = (ctx + cont)[:-1]
    if max_length is not None and len(seq) > max_length:
        seq = seq[-max_length:]
    logits = model(input_ids=torch.tensor([seq], device=dev)).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    n = len(cont)
    return float(sum(lp[len(seq) - n + t, cont[t]] for t in range(n)))


@torch.no_grad()
def record_field_nll(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    group: str = "codes",
    max_length: int | None = None,
    batch_size: int = 8,
) -> np.ndarray:
    """Per record, the mean next-token NLL over the tokens of ``record[group]``'s values (nats per token).

    The per-record version of :func:`guardedp2p.data.field_nll.evaluate_record_nll` (which returns the pooled
    mean): the frontier pairs records across configurations. ``group="codes"`` scores the hidden-rule answers of
    new people (what fine-tuning should teach); records without that group get NaN.
    """
    from guardedp2p.data.collate import collate
    from guardedp2p.data.field_nll import record_field_spans, token_group_masks

    model.train(False)
    dev = next(model.parameters()).device
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = int(pad) if pad is not None else 0
    enc: list[tuple[list[int], list[int]] | None] = []
    for r in records:
        if r.get(group) is None:
            enc.append(None)
            continue
        spans = record_field_spans(r, (group,))
        ids, masks = token_group_masks(tokenizer, str(r["text"]), spans)
        m = masks.get(group, [False] * len(ids))
        if max_length is not None:
            ids, m = ids[:max_length], m[:max_length]
        enc.append((ids, [t for t in range(1, len(ids)) if m[t]]))
    out = np.full(len(records), np.nan)
    todo = {i: e for i, e in enumerate(enc) if e is not None and e[1]}
    order = list(todo)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        batch = collate([{"input_ids": todo[i][0]} for i in idx], pad)
        need = sorted({t - 1 for i in idx for t in todo[i][1]})
        keep = torch.tensor(need, dtype=torch.long)
        logits = model(
            input_ids=batch["input_ids"].to(dev),
            attention_mask=batch["attention_mask"].to(dev),
            logits_to_keep=keep.to(dev),
        ).logits
        lp = torch.log_softmax(logits.float(), -1).cpu()
        col = {p: j for j, p in enumerate(need)}
        for row, i in enumerate(idx):
            ids, pos = todo[i]
            out[i] = -float(np.mean([float(lp[row, col[t - 1], ids[t]]) for t in pos]))
    return out


def check_items(items: Sequence[Mapping[str, Any]]) -> None:
    if not items:
        raise ConfigError("no multiple-choice item to evaluate on")


__all__ = ["ItemScores", "check_items", "cut_hooks", "cut_transforms", "mc_item_scores", "record_field_nll"]
