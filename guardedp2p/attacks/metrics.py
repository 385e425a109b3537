"""Reconstruction metrics of the DRA harness (Chen et al., BiSR, CCS'24, arXiv 2409.00960, metrics).

All scores compare a reconstruction ``hyp`` (token ids) with the client's real tokens ``ref`` (token ids of the
same attention-masked positions). Two text constructions are offered, and every result says which was used:

``"detok"`` (default, the honest one)
    ``tokenizer.decode(ids, skip_special_tokens=True)`` for both strings, then the ``rouge-score`` package's own
    word tokenisation (lower-cased, split on non-alphanumerics, no stemming). Sub-word pieces are re-joined, so
    a half-recovered surname counts as a wrong word.
``"per_token"`` (for comparison with SplitLLM / BiSR numbers)
    every token id decoded *separately*, stripped, joined with spaces, split on whitespace (case kept). Each
    sub-word piece counts as a word, which inflates scores (Chen et al., BiSR, CCS'24, arXiv 2409.00960, metrics).
``"ids"``
    no tokenizer at all: ROUGE over the raw token-id sequences (used with tiny random models in tests).

Special tokens (BOS/EOS/pad) are dropped in all text modes. Token accuracy (positional, over the reference's
positions) and token-set F1 ("TOKACC" in SplitLLM) are computed on ids and do not depend on the mode.

METEOR needs NLTK *and* its WordNet data; it is never downloaded. When the data is not installed the field is
``None`` and :data:`METEOR_NOTE` explains why.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

TextMode = Literal["detok", "per_token", "ids"]
TEXT_MODES: tuple[str, ...] = ("detok", "per_token", "ids")
METEOR_NOTE = (
    "METEOR omitted: it needs nltk with the WordNet corpus installed locally (python -m nltk.downloader wordnet "
    "omw-1.4 on a machine with network access); guardedp2p never downloads it at run time"
)


class _WhitespaceTokenizer:
    """rouge-score tokenizer for the per-token and ids modes: split on whitespace, keep case."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return text.split()


@functools.lru_cache(maxsize=4)
def _scorer(mode: str) -> Any:
    from rouge_score import rouge_scorer

    tok = None if mode == "detok" else _WhitespaceTokenizer()
    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False, tokenizer=tok)


def _special_ids(tokenizer: Any) -> set[int]:
    if tokenizer is None:
        return set()
    ids = getattr(tokenizer, "all_special_ids", None) or []
    return {int(i) for i in ids}


def ids_to_text(ids: Sequence[int], tokenizer: Any, mode: TextMode) -> str:
    """Render token ids as the string that ``mode`` scores."""
    ids = [int(i) for i in ids]
    if mode == "ids" or tokenizer is None:
        return " ".join(str(i) for i in ids)
    special = _special_ids(tokenizer)
    ids = [i for i in ids if i not in special]
    if mode == "detok":
        return str(tokenizer.decode(ids, skip_special_tokens=True))
    if mode == "per_token":
        pieces = []
        for i in ids:
            p = str(tokenizer.decode([i], skip_special_tokens=True)).strip()
            pieces.append(p if p else f"<{i}>")  # a whitespace-only token still counts as one word
        return " ".join(pieces)
    raise ValueError(f"unknown text mode {mode!r}; use one of {TEXT_MODES}")


def rouge_f1(hyp: str, ref: str, mode: TextMode = "detok") -> dict[str, float]:
    """ROUGE-1/2/L F1 of two strings, tokenised as ``mode`` says (see the module docstring)."""
    s = _scorer("detok" if mode == "detok" else "ws").score(ref, hyp)  # rouge-score takes (target, prediction)
    return {
        "rouge1": float(s["rouge1"].fmeasure),
        "rouge2": float(s["rouge2"].fmeasure),
        "rougeL": float(s["rougeL"].fmeasure),
    }


def token_accuracy(hyp: Sequence[int], ref: Sequence[int]) -> float:
    """Fraction of reference positions where the reconstruction has the same id (missing positions are wrong)."""
    if len(ref) == 0:
        return float("nan")
    hits = sum(1 for t, r in enumerate(ref) if t < len(hyp) and int(hyp[t]) == int(r))
    return hits / len(ref)


def token_set_f1(hyp: Sequence[int], ref: Sequence[int]) -> float:
    """F1 of the *sets* of token ids (ignores order and multiplicity; SplitLLM's "TOKACC")."""
    sh, sr = {int(i) for i in hyp}, {int(i) for i in ref}
    if not sh or not sr:
        return 0.0
    inter = len(sh & sr)
    if inter == 0:
        return 0.0
    p, r = inter / len(sh), inter / len(sr)
    return 2 * p * r / (p + r)


@functools.lru_cache(maxsize=1)
def meteor_available() -> bool:
    """True when NLTK and its WordNet data are installed locally (checked once, never downloads)."""
    try:
        import nltk
        from nltk.translate.meteor_score import meteor_score

        nltk.data.find("corpora/wordnet")  # raises LookupError when absent; nothing is downloaded
        meteor_score([["a", "test"]], ["one", "tests"])  # unmatched words exercise the WordNet stage too
        return True
    except (ImportError, LookupError, OSError):
        return False


def meteor(hyp: str, ref: str) -> float | None:
    """NLTK METEOR on whitespace tokens (alpha 0.9, beta 3, gamma 0.5), or None without WordNet data."""
    if not meteor_available():
        return None
    from nltk.translate.meteor_score import meteor_score

    return float(meteor_score([ref.split()], hyp.split(), alpha=0.9, beta=3.0, gamma=0.5))


def pii_recall(hyp_text: str, pii: dict[str, str] | Sequence[str]) -> float:
    """Fraction of private values (e.g. the demo records' ``pii``) found verbatim, case-insensitively, in ``hyp_text``."""
    values = list(pii.values()) if isinstance(pii, dict) else list(pii)
    values = [str(v) for v in values if str(v)]
    if not values:
        return float("nan")
    low = hyp_text.lower()
    return sum(1 for v in values if v.lower() in low) / len(values)


#: The secret fields of a record, in the order reports list them (the demo's ``pii`` keys; other data sets may
#: use other keys: every key of a record's secret mapping is scored, these only fix the display order).
SECRET_FIELDS: tuple[str, ...] = ("name", "address", "born", "account", "diagnosis")


def _norm_ws(s: str) -> str:
    return " ".join(str(s).split())


def secret_found(hyp_text: str, value: str) -> bool:
    """True when ``value`` is reproduced *exactly* in ``hyp_text``.

    Exact means: the same characters, case included, as one contiguous span that is not part of a longer word
    or number (the characters just before and after it are not letters or digits), after collapsing runs of
    whitespace on both sides. "GB12-3456" inside "GB12-34567" does not count; "Maria Kovacs," does. Unlike
    :func:`pii_recall` (case-insensitive substring, a lenient upper bound), this is what "the attacker now holds
    the secret" means for a date, an account number or a name.
    """
    v, h = _norm_ws(value), _norm_ws(hyp_text)
    if not v:
        return False
    start = h.find(v)
    while start >= 0:
        end = start + len(v)
        before = h[start - 1] if start > 0 else " "
        after = h[end] if end < len(h) else " "
        if not before.isalnum() and not after.isalnum():
            return True
        start = h.find(v, start + 1)
    return False


def secrets_recovered(hyp_text: str, secrets: Mapping[str, str]) -> dict[str, bool]:
    """Per secret field, whether the reconstruction reproduces its value exactly (see :func:`secret_found`)."""
    return {str(k): secret_found(hyp_text, str(v)) for k, v in secrets.items() if str(v).strip()}


@dataclass
class SecretsSummary:
    """Secrets recovered over many sequences: ``fraction`` = recovered (sequence, field) pairs / all pairs."""

    fraction: float
    n_sequences: int
    n_fields: int
    per_field: dict[str, float]
    all_recovered: float  # share of sequences with every field recovered

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize_secrets(per_sequence: Sequence[Mapping[str, bool]]) -> SecretsSummary:
    """Aggregate :func:`secrets_recovered` outputs (sequences without secrets are skipped)."""
    rows = [r for r in per_sequence if r]
    pairs = [bool(v) for r in rows for v in r.values()]
    keys = [k for k in SECRET_FIELDS if any(k in r for r in rows)] + sorted(
        {k for r in rows for k in r} - set(SECRET_FIELDS)
    )
    per_field = {}
    for k in keys:
        vals = [bool(r[k]) for r in rows if k in r]
        per_field[k] = sum(vals) / len(vals)
    return SecretsSummary(
        fraction=sum(pairs) / len(pairs) if pairs else float("nan"),
        n_sequences=len(rows),
        n_fields=len(pairs),
        per_field=per_field,
        all_recovered=sum(1 for r in rows if all(r.values())) / len(rows) if rows else float("nan"),
    )


@dataclass
class SampleScores:
    """Scores of one reconstructed sequence."""

    rouge1: float
    rouge2: float
    rougeL: float
    token_acc: float
    token_set_f1: float
    meteor: float | None = None
    hyp_text: str = ""
    ref_text: str = ""


def score_sample(
    hyp: Sequence[int], ref: Sequence[int], tokenizer: Any = None, mode: TextMode = "detok"
) -> SampleScores:
    """All metrics of one sequence (``mode="ids"`` is forced when there is no tokenizer)."""
    if tokenizer is None:
        mode = "ids"
    ht, rt = ids_to_text(hyp, tokenizer, mode), ids_to_text(ref, tokenizer, mode)
    r = rouge_f1(ht, rt, mode)
    return SampleScores(
        rouge1=r["rouge1"],
        rouge2=r["rouge2"],
        rougeL=r["rougeL"],
        token_acc=token_accuracy(hyp, ref),
        token_set_f1=token_set_f1(hyp, ref),
        meteor=meteor(ht, rt) if mode != "ids" else None,
        hyp_text=ht,
        ref_text=rt,
    )


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _std(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if len(xs) < 2:
        return 0.0 if xs else float("nan")
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


@dataclass
class ScoreSummary:
    """Means over sequences (batch elements of all attacked steps), plus the per-sequence scores."""

    mode: str
    n: int
    rouge1: float
    rouge2: float
    rougeL: float
    rougeL_std: float
    token_acc: float
    token_set_f1: float
    meteor: float | None
    notes: list[str] = field(default_factory=list)
    samples: list[SampleScores] = field(default_factory=list)

    def as_dict(self, with_samples: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_samples:
            d.pop("samples")
        return d


def score_many(
    hyps: Sequence[Sequence[int]],
    refs: Sequence[Sequence[int]],
    tokenizer: Any = None,
    mode: TextMode = "detok",
) -> ScoreSummary:
    """Score paired reconstructions; ``mode`` is recorded in the result (``"ids"`` without a tokenizer)."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} reconstructions but {len(refs)} references")
    if tokenizer is None:
        mode = "ids"
    samples = [score_sample(h, r, tokenizer, mode) for h, r in zip(hyps, refs)]
    met = [s.meteor for s in samples if s.meteor is not None]
    notes = []
    if mode != "ids" and not meteor_available():
        notes.append(METEOR_NOTE)
    return ScoreSummary(
        mode=mode,
        n=len(samples),
        rouge1=_mean([s.rouge1 for s in samples]),
        rouge2=_mean([s.rouge2 for s in samples]),
        rougeL=_mean([s.rougeL for s in samples]),
        rougeL_std=_std([s.rougeL for s in samples]),
        token_acc=_mean([s.token_acc for s in samples]),
        token_set_f1=_mean([s.token_set_f1 for s in samples]),
        meteor=_mean(met) if met else None,
        notes=notes,
        samples=samples,
    )
