"""Keyed pseudonymisation of a record's categorical fields, done by the client before anything is tokenised.

Why: every split defence that keeps the task leaves the task's own inputs readable. The frontier's table of
recovered fields (docs/results/frontier.md) shows the diagnosis recovered in 100 % of sequences under every dχ
row, because the provider's trunk has to compute on the field, so its activations carry it. Noise cannot remove
what the task needs. A substitution can: inside each field's closed vocabulary, the client replaces every value
by another one chosen by a secret key, the same one in every record (``diagnosis: asthma`` becomes
``diagnosis: gout`` everywhere, ``ward code: KD-3`` becomes ``ward code: PJ-5``). The task stays learnable,
because the rules are learnt over the surrogates. At inference the client encodes its query and decodes the
answer with the same key (:meth:`FieldPseudonymizer.decode`). What crosses the wire then names the wrong value.
This is pseudonymisation (tokenisation) as a hospital already applies it before data leaves its walls. It is not
a new cryptographic primitive.

Limits, which the frontier measures rather than assumes:

* **Frequency analysis.** The key hides which surrogate stands for which value only as far as the values'
  frequencies do not give it away. An attacker who knows the field's distribution (it holds records of the same
  format) ranks the surrogates it reads by frequency and maps them to the values ranked the same way
  (:func:`frequency_inverse`, the attack ``sip_freq`` of the frontier). On a flat distribution that guess is no
  better than chance. On a skewed one (in most real clinics one diagnosis dominates) the frequent values leak.
  Co-occurrence with other fields can leak the key in the same way.
* **Semantics.** A surrogate means something else to the pre-trained model: a task that needs what "asthma"
  means, rather than an arbitrary rule about it, loses that knowledge.
* **Scope.** Only declared fields with a closed vocabulary are substituted. Free text (names, addresses, numbers)
  needs the other defences (``--privacy fields``: dχ on rare tokens and digits).

The permutation of a field's values is the order of their HMAC-SHA256 under the key (``cryptography``'s HMAC):
without the key every permutation is equally likely.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes, hmac

from guardedp2p.errors import ConfigError

#: Bytes of a generated key (HMAC-SHA256 takes any length; 32 is its block-size-safe strength).
KEY_BYTES = 32


class PseudonymError(ConfigError):
    """A pseudonym schema or key that cannot work: say which field and why."""


@dataclass(frozen=True)
class PseudonymSchema:
    """The fields to substitute: each field name and its closed vocabulary of values.

    A field is written ``<name>: <value>`` in a record's text (the house style of
    :mod:`guardedp2p.data.hidden_rules`), and a value is replaced only there, so the same word elsewhere in the
    text is left alone.
    """

    fields: tuple[tuple[str, tuple[str, ...]], ...]

    @classmethod
    def from_mapping(cls, fields: Mapping[str, Sequence[str]]) -> PseudonymSchema:
        schema = cls(tuple((str(k), tuple(str(v) for v in vs)) for k, vs in fields.items()))
        schema.validate()
        return schema

    def validate(self) -> None:
        if not self.fields:
            raise PseudonymError("a pseudonym schema needs at least one field")
        names = [n for n, _ in self.fields]
        if len(set(names)) != len(names):
            raise PseudonymError(f"a field is named twice in the pseudonym schema: {names}")
        for name, values in self.fields:
            if not name.strip() or ":" in name:
                raise PseudonymError(f"field name {name!r}: give a non-empty name without ':'")
            if len(values) < 2:
                raise PseudonymError(f"field {name!r} has {len(values)} value(s): a substitution needs at least 2")
            if len(set(values)) != len(values) or any(not v.strip() for v in values):
                raise PseudonymError(f"field {name!r}: values must be distinct and non-empty, got {list(values)}")

    def as_dict(self) -> dict[str, tuple[str, ...]]:
        return dict(self.fields)


def keyed_permutation(key: bytes, field: str, values: Sequence[str]) -> dict[str, str]:
    """``values[i]`` -> its surrogate: the values reordered by their HMAC-SHA256 tag under ``key``."""

    def tag(value: str) -> bytes:
        h = hmac.HMAC(key, hashes.SHA256())
        h.update(field.encode() + b"\x00" + value.encode())
        return h.finalize()

    shuffled = sorted(values, key=tag)
    return dict(zip(values, shuffled))


def _pattern(field: str, values: Iterable[str]) -> re.Pattern[str]:
    # longest values first, and no word character or hyphen may follow: "AB" is never read as "A" + "B"
    alts = "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))
    return re.compile(rf"(?<![\w-])({re.escape(field)}: )({alts})(?![\w-])")


class FieldPseudonymizer:
    """Substitutes the schema's fields in texts and records with a keyed permutation, and back.

    ``encode`` is what the client applies to every text it tunes or queries on; ``decode`` maps the model's output
    (or an encoded text) back. Both are pure functions of the text: the same record always gets the same
    surrogates, which is what lets the task be learnt over them.
    """

    def __init__(self, schema: PseudonymSchema, key: bytes) -> None:
        schema.validate()
        if len(key) < 16:
            raise PseudonymError(f"a pseudonym key needs at least 16 bytes, got {len(key)}")
        self.schema = schema
        self.forward = {f: keyed_permutation(key, f, vs) for f, vs in schema.fields}
        self.inverse = {f: {s: v for v, s in m.items()} for f, m in self.forward.items()}
        self._patterns = {f: _pattern(f, vs) for f, vs in schema.fields}

    def _apply(self, text: str, maps: Mapping[str, Mapping[str, str]]) -> str:
        for field, pat in self._patterns.items():
            m = maps[field]
            text = pat.sub(lambda g, m=m: g.group(1) + m[g.group(2)], text)  # type: ignore[misc]
        return text

    def encode(self, text: str) -> str:
        return self._apply(text, self.forward)

    def decode(self, text: str) -> str:
        return self._apply(text, self.inverse)

    def encode_value(self, field: str, value: str) -> str:
        """One value of ``field`` (a multiple-choice option, a dict entry); values outside the schema pass."""
        return self.forward.get(field, {}).get(value, value)

    def encode_record(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """A record with its ``text`` encoded and every nested ``{field: value}`` dict (``pii``, ``fields``,
        ``codes``) mapped the same way, so field spans and secrets still point at what the text holds."""
        out: dict[str, Any] = {}
        for k, v in record.items():
            if k == "text" and isinstance(v, str):
                out[k] = self.encode(v)
            elif isinstance(v, Mapping):
                out[k] = {f: self.encode_value(f, x) if isinstance(x, str) else x for f, x in v.items()}
            else:
                out[k] = v
        return out

    def encode_strings(self, obj: Any) -> Any:
        """Every string inside ``obj`` (a record of any data format: text, chat messages, instruction columns)
        encoded; only ``<field>: <value>`` occurrences change, so the record's structure and other text stay."""
        if isinstance(obj, str):
            return self.encode(obj)
        if isinstance(obj, Mapping):
            return {k: self.encode_strings(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return type(obj)(self.encode_strings(v) for v in obj)
        return obj

    def encode_mc_item(self, item: Mapping[str, Any]) -> dict[str, Any]:
        """A multiple-choice item as the client asks it: its question encoded, and its choices too when they are
        values of one field (named by the item's ``field`` or ``rule``, else the one field whose vocabulary holds
        every choice). The label's index is unchanged: the choices are substituted in place."""
        out = dict(item)
        out["question"] = self.encode(str(item.get("question", "")))
        choices = [str(c) for c in item.get("choices", [])]
        named = item.get("field", item.get("rule"))
        field = named if isinstance(named, str) and named in self.forward else None
        if field is None:
            holders = [f for f, m in self.forward.items() if choices and all(c in m for c in choices)]
            field = holders[0] if len(holders) == 1 else None
        if field is not None:
            out["choices"] = [self.encode_value(field, c) for c in choices]
        return out

    def decode_continuation(self, sent_prompt: str, prompt: str, text: str) -> str:
        """The model's continuation ``text`` of ``sent_prompt`` (the encoded ``prompt``) as the client reads it: a
        value whose field name ends the prompt (``ward code:`` -> `` WF-8``) is decoded with its field."""
        full = self.decode(sent_prompt + text)
        return full[len(prompt) :] if full.startswith(prompt) else self.decode(text)

    def describe(self) -> dict[str, Any]:
        """What the client announces: the substituted fields' names, never their values' mapping or the key."""
        return {"fields": [f for f, _ in self.schema.fields]}

    def read(self, text: str) -> dict[str, list[str]]:
        """The values of each field written in ``text`` (what an attacker counts)."""
        return {f: [g.group(2) for g in pat.finditer(text)] for f, pat in self._patterns.items()}


def load_schema(path: str | os.PathLike[str]) -> PseudonymSchema:
    """A schema file: a JSON object ``{"field name": ["value", ...], ...}``."""
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except FileNotFoundError:
        raise PseudonymError(f"pseudonym schema {path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise PseudonymError(f"pseudonym schema {path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
        raise PseudonymError(
            f'pseudonym schema {path}: expected an object of field -> list of values, e.g. {{"diagnosis": ["asthma", "gout"]}}'
        )
    return PseudonymSchema.from_mapping(raw)


def save_schema(schema: PseudonymSchema, path: str | os.PathLike[str]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({f: list(vs) for f, vs in schema.fields}, fh, indent=1)
        fh.write("\n")


def read_key(path: str | os.PathLike[str]) -> bytes:
    """A pseudonym key file written by :func:`load_or_create_key`."""
    try:
        with open(path, encoding="ascii") as fh:
            key = bytes.fromhex(fh.read().strip())
    except FileNotFoundError:
        raise PseudonymError(f"pseudonym key {path}: no such file") from None
    except (UnicodeDecodeError, ValueError):
        raise PseudonymError(f"pseudonym key {path}: expected hex digits") from None
    if len(key) < 16:
        raise PseudonymError(f"pseudonym key {path}: {len(key)} bytes, need at least 16")
    return key


def load_or_create_key(path: str | os.PathLike[str]) -> bytes:
    """The client's pseudonym key (hex in a file only its owner may read), created on first use. The same key must
    tune and query a model: keep this file with the adapter, and never send it."""
    if os.path.exists(path):
        return read_key(path)
    key = secrets.token_bytes(KEY_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(key.hex() + "\n")
    return key


def field_counts(schema: PseudonymSchema, texts: Iterable[str]) -> dict[str, Counter[str]]:
    """How often each value of each field is written in ``texts`` (no key needed: reading is public)."""
    pats = {f: _pattern(f, vs) for f, vs in schema.fields}
    out: dict[str, Counter[str]] = {f: Counter() for f in pats}
    for t in texts:
        for f, pat in pats.items():
            out[f].update(g.group(2) for g in pat.finditer(t))
    return out


def frequency_inverse(
    schema: PseudonymSchema, observed: Mapping[str, Counter[str]], prior: Mapping[str, Counter[str]]
) -> dict[str, dict[str, str]]:
    """The frequency-analysis attacker's guess of each field's inverse map: the surrogate read most often stands
    for the value most frequent in the attacker's own records of the same format, and so on down both rankings.
    Ties break by the schema's order on both sides, so a flat distribution gives a fixed guess, not the key."""
    out: dict[str, dict[str, str]] = {}
    for field, values in schema.fields:
        order = {v: i for i, v in enumerate(values)}
        seen = sorted(values, key=lambda v: (-observed.get(field, Counter())[v], order[v]))
        known = sorted(values, key=lambda v: (-prior.get(field, Counter())[v], order[v]))
        out[field] = dict(zip(seen, known))
    return out


#: A candidate field: a short name, ": ", a short value, ended by ; , . or the end of a line (the house style).
_CANDIDATE = re.compile(r"(?:^|(?<=[;,.\n])\s*)([A-Za-z][\w ]{0,30}?): ([^;,.:\n]{1,40}?)(?=\s*(?:[;,.\n]|$))")


def suggest_schema(texts: Iterable[str], *, max_values: int = 12, min_share: float = 0.5) -> dict[str, Counter[str]]:
    """Candidate categorical fields of ``texts`` and their value counts: names written ``<name>: <value>`` in at
    least ``min_share`` of the texts with at most ``max_values`` distinct values (a closed vocabulary). A
    suggestion to review, not a decision: a field with many values is free text for this mechanism."""
    counts: dict[str, Counter[str]] = {}
    seen_in: Counter[str] = Counter()
    n = 0
    for t in texts:
        n += 1
        names = set()
        for m in _CANDIDATE.finditer(t):
            name, value = m.group(1).strip(), m.group(2).strip()
            counts.setdefault(name, Counter())[value] += 1
            names.add(name)
        seen_in.update(names)
    return {
        f: c
        for f, c in counts.items()
        if 2 <= len(c) <= max_values and n and seen_in[f] >= min_share * n and all(v for v in c)
    }


def frequency_exposure(
    counts: Mapping[str, int], *, observed: int | None = None, trials: int = 200, seed: int = 0
) -> float:
    """The share of a field's values that the frequency-analysis attacker (:func:`frequency_inverse`) decodes,
    estimated by simulation: the field's distribution is taken to be ``counts``; the attacker holds an
    independent sample of the same size to rank values, and ranks the surrogates of ``observed`` records (default:
    as many as ``counts`` holds). Compare with the top value's share, what a guess without any reading gets."""
    import numpy as np

    values = list(counts)
    p = np.array([counts[v] for v in values], float)
    p /= p.sum()
    n = int(observed or sum(counts.values()))
    rng = np.random.default_rng(seed)
    hit = 0.0
    for _ in range(trials):
        prior = rng.multinomial(n, p)
        seen = rng.multinomial(n, p)
        # rank matching with random tie breaks; with an identity key, decoding value i as value j is right iff i == j
        order_seen = np.lexsort((rng.random(len(values)), -seen))
        order_prior = np.lexsort((rng.random(len(values)), -prior))
        guess = np.empty(len(values), int)
        guess[order_seen] = order_prior
        hit += float(seen[guess == np.arange(len(values))].sum()) / max(1, n)
    return hit / trials


def apply_inverse(schema: PseudonymSchema, text: str, inverse: Mapping[str, Mapping[str, str]]) -> str:
    """``text`` with each field's value replaced by ``inverse[field]`` (an attacker's guessed decoding)."""
    for field, values in schema.fields:
        m = inverse.get(field, {})
        text = _pattern(field, values).sub(lambda g, m=m: g.group(1) + m.get(g.group(2), g.group(2)), text)  # type: ignore[misc]
    return text


__all__ = [
    "KEY_BYTES",
    "FieldPseudonymizer",
    "PseudonymError",
    "PseudonymSchema",
    "apply_inverse",
    "field_counts",
    "frequency_exposure",
    "frequency_inverse",
    "keyed_permutation",
    "load_or_create_key",
    "load_schema",
    "read_key",
    "save_schema",
    "suggest_schema",
]
