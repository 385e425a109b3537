"""Mean token NLL on chosen fields of a text (the private and answer fields of a record), through any ``logits_fn``.

Why: multiple-choice accuracy moves in steps of one item and saturates; the negative log-likelihood of held-out
records is continuous, but over the whole text it is dominated by tokens nothing can predict (names, dates,
account numbers of new people) and by boilerplate every model already predicts. Restricting the mean to the
tokens of named fields (a record's hidden-rule codes, or its PII) measures what fine-tuning learnt, or what a
model memorised, without that dilution. Fields are given as character spans of the text; a token counts when its
characters overlap a span (so a BPE token carrying the field's leading space counts), special tokens never do.

Like :mod:`guardedp2p.data.mc_eval`, it only needs ``logits_fn(input_ids, attention_mask) -> logits [B, T, V]``
(CPU int64 inputs, right-padded), so it evaluates a local model, a split client/provider model or a toy function
alike. Token ``t`` is scored by the logits at position ``t - 1``; the first token of a sequence has no context and
is never scored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from guardedp2p.data.collate import collate
from guardedp2p.errors import ConfigError

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Span = tuple[int, int]
#: Fields of one text: a list of spans (one group called ``"fields"``) or named groups of spans.
FieldSpans = Sequence[Span] | Mapping[str, Sequence[Span]]


class FieldNotFoundError(ConfigError):
    """A field value to score does not occur in its record's text."""


@dataclass
class FieldNLL:
    """Mean NLL (nats per token) over the field tokens, overall and per group, with the token counts."""

    nll: float
    tokens: int
    groups: dict[str, float] = field(default_factory=dict)
    group_tokens: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"nll": self.nll, "tokens": self.tokens, "groups": self.groups, "group_tokens": self.group_tokens}


def find_spans(text: str, values: Sequence[str]) -> list[Span]:
    """Character spans of ``values`` in ``text``, each at its first occurrence; raises when one is missing."""
    spans = []
    for v in values:
        if not v:
            continue
        i = text.find(v)
        if i < 0:
            raise FieldNotFoundError(f"field value {v!r} does not occur in the text {text[:80]!r}...")
        spans.append((i, i + len(v)))
    return spans


def record_field_spans(record: Mapping[str, Any], groups: Sequence[str] = ("pii", "codes")) -> dict[str, list[Span]]:
    """Spans of a record's field values, per group: ``record[group]`` is a ``{field: value}`` dict.

    For the generated tasks (:mod:`guardedp2p.data.hidden_rules`) ``pii`` holds the private fields and ``codes``
    the hidden-rule answers; the demo records have ``pii`` only.
    """
    out: dict[str, list[Span]] = {}
    for g in groups:
        values = record.get(g)
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"record field {g!r} must be an object of field -> value, got {type(values).__name__}")
        out[g] = find_spans(str(record["text"]), [str(v) for v in values.values()])
    return out


def _normalise(spans: FieldSpans) -> dict[str, list[Span]]:
    if isinstance(spans, Mapping):
        return {str(k): [(int(a), int(b)) for a, b in v] for k, v in spans.items()}
    return {"fields": [(int(a), int(b)) for a, b in spans]}


def _token_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[Span]]:
    """Token ids and their character offsets; slow tokenizers (no offset mapping) are not supported."""
    try:
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    except NotImplementedError:
        raise ConfigError("field NLL needs a fast tokenizer (one that returns offset mappings)") from None
    return list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]


def token_group_masks(tokenizer: Any, text: str, spans: FieldSpans) -> tuple[list[int], dict[str, list[bool]]]:
    """Token ids of ``text`` and, per group, which tokens overlap one of the group's spans."""
    ids, offsets = _token_offsets(tokenizer, text)
    groups = _normalise(spans)
    masks = {g: [b > a and any(a < e and b > s for s, e in sp) for a, b in offsets] for g, sp in groups.items()}
    return ids, masks


def evaluate_field_nll(
    logits_fn: LogitsFn,
    tokenizer: Any,
    texts: Sequence[str],
    spans: Sequence[FieldSpans],
    batch_size: int = 8,
    *,
    max_length: int | None = None,
) -> FieldNLL:
    """Mean next-token NLL over the tokens of ``spans[i]`` in ``texts[i]``, overall and per group.

    The mean is over tokens, not texts. Texts longer than ``max_length`` tokens are cut on the right (the
    fields beyond the cut are not scored). Returns nan for a mean with no token.
    """
    if len(texts) != len(spans):
        raise ConfigError(f"got {len(texts)} texts but {len(spans)} span lists")
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = int(pad_id) if pad_id is not None else 0
    encoded: list[tuple[list[int], dict[str, list[bool]]]] = []
    for text, sp in zip(texts, spans):
        ids, masks = token_group_masks(tokenizer, text, sp)
        if max_length is not None:
            ids = ids[:max_length]
            masks = {g: m[:max_length] for g, m in masks.items()}
        encoded.append((ids, masks))
    group_names = sorted({g for _, m in encoded for g in m})
    total, count = 0.0, 0
    g_total = dict.fromkeys(group_names, 0.0)
    g_count = dict.fromkeys(group_names, 0)
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            batch = collate([{"input_ids": ids} for ids, _ in chunk], pad_id)
            logits = logits_fn(batch["input_ids"], batch["attention_mask"]).float()
            logp = torch.log_softmax(logits[:, :-1, :], dim=-1)
            target = batch["input_ids"][:, 1:].to(logp.device)
            nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).cpu()  # [B, T-1], nll[t-1] scores token t
            for row, (ids, masks) in enumerate(chunk):
                any_mask = [False] * len(ids)
                for g, m in masks.items():
                    sel = [t for t in range(1, len(ids)) if m[t]]
                    if sel:
                        g_total[g] += float(nll[row, [t - 1 for t in sel]].sum())
                        g_count[g] += len(sel)
                    any_mask = [x or y for x, y in zip(any_mask, m)]
                sel = [t for t in range(1, len(ids)) if any_mask[t]]
                if sel:
                    total += float(nll[row, [t - 1 for t in sel]].sum())
                    count += len(sel)
    return FieldNLL(
        nll=total / count if count else math.nan,
        tokens=count,
        groups={g: (g_total[g] / g_count[g] if g_count[g] else math.nan) for g in group_names},
        group_tokens=g_count,
    )


def evaluate_record_nll(
    logits_fn: LogitsFn,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    batch_size: int = 8,
    *,
    groups: Sequence[str] = ("pii", "codes"),
    max_length: int | None = None,
) -> FieldNLL:
    """:func:`evaluate_field_nll` on ``{"text", "pii", "codes"}`` records, one group per record field."""
    texts = [str(r["text"]) for r in records]
    spans = [record_field_spans(r, groups) for r in records]
    return evaluate_field_nll(logits_fn, tokenizer, texts, spans, batch_size, max_length=max_length)


__all__ = [
    "FieldNLL",
    "FieldNotFoundError",
    "evaluate_field_nll",
    "evaluate_record_nll",
    "find_spans",
    "record_field_spans",
    "token_group_masks",
]
