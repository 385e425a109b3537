"""Keyed pseudonymisation of categorical fields (guardedp2p/privacy/pseudonym.py): consistent, keyed, reversible,
bounded to the declared fields, and broken by frequency analysis exactly when the values' frequencies differ."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from guardedp2p.data.hidden_rules import categorical_fields, make_records
from guardedp2p.privacy.pseudonym import (
    FieldPseudonymizer,
    PseudonymError,
    PseudonymSchema,
    apply_inverse,
    field_counts,
    frequency_inverse,
)

KEY = bytes(range(32))


@pytest.fixture(scope="module")
def coder() -> FieldPseudonymizer:
    return FieldPseudonymizer(PseudonymSchema.from_mapping(categorical_fields()), KEY)


def test_encode_is_a_consistent_keyed_bijection_inside_each_vocabulary(coder):
    for field, values in coder.schema.fields:
        m = coder.forward[field]
        assert sorted(m) == sorted(values) and sorted(m.values()) == sorted(values)
    other = FieldPseudonymizer(coder.schema, bytes(32))
    assert other.forward != coder.forward  # the key decides the substitution
    again = FieldPseudonymizer(coder.schema, KEY)
    assert again.forward == coder.forward  # and nothing else does (no fresh randomness per call)
    # over the 16 fields, a random permutation moves some value of almost every one
    assert sum(any(k != v for k, v in m.items()) for m in coder.forward.values()) >= 12


def test_records_round_trip_and_stay_consistent_with_their_text(coder):
    for rec in make_records(50, seed=3):
        enc = coder.encode_record(rec)
        assert coder.decode(enc["text"]) == rec["text"]
        assert f"diagnosis: {enc['pii']['diagnosis']};" in enc["text"]  # secrets point at what the text holds
        assert enc["pii"]["name"] == rec["pii"]["name"]  # free-text fields are not this mechanism's job
        for code_field, code in enc["codes"].items():
            assert f"{code_field}: {code};" in enc["text"]


def test_only_declared_fields_change_and_longer_values_win():
    coder = FieldPseudonymizer(PseudonymSchema.from_mapping({"blood type": ("A", "B", "AB", "O")}), KEY)
    text = "blood type: AB; note: A and B; other blood type: O."
    enc = coder.encode(text)
    assert enc.split(";")[1:] == text.split(";")[1:2] + [" other blood type: " + coder.forward["blood type"]["O"] + "."]
    assert enc.startswith("blood type: " + coder.forward["blood type"]["AB"] + ";")
    assert coder.decode(enc) == text


def test_schema_and_key_errors_say_what_is_wrong():
    with pytest.raises(PseudonymError, match="at least 2"):
        PseudonymSchema.from_mapping({"diagnosis": ("asthma",)})
    with pytest.raises(PseudonymError, match="distinct"):
        PseudonymSchema.from_mapping({"diagnosis": ("asthma", "asthma")})
    with pytest.raises(PseudonymError, match="without ':'"):
        PseudonymSchema.from_mapping({"a: b": ("x", "y")})
    with pytest.raises(PseudonymError, match="16 bytes"):
        FieldPseudonymizer(PseudonymSchema.from_mapping({"d": ("x", "y")}), b"short")


def test_frequency_analysis_breaks_a_skewed_field_and_not_a_flat_one():
    schema = PseudonymSchema.from_mapping({"diagnosis": ("asthma", "gout", "migraine", "eczema")})
    rng = random.Random(0)

    def texts(weights: list[float], n: int) -> list[str]:
        return [f"diagnosis: {v};" for v in rng.choices(["asthma", "gout", "migraine", "eczema"], weights, k=n)]

    hits = {"skewed": 0, "flat": 0}
    for trial in range(20):
        coder = FieldPseudonymizer(schema, bytes([trial]) * 32)
        for name, w in (("skewed", [0.55, 0.25, 0.15, 0.05]), ("flat", [1, 1, 1, 1])):
            prior = field_counts(schema, texts(w, 3000))
            seen = [coder.encode(t) for t in texts(w, 400)]
            guess = frequency_inverse(schema, field_counts(schema, seen), prior)
            assert set(guess["diagnosis"]) == set(guess["diagnosis"].values()) == set(schema.as_dict()["diagnosis"])
            hits[name] += guess["diagnosis"] == coder.inverse["diagnosis"]
            if name == "skewed":  # the attacker's decoding is then the client's own
                assert apply_inverse(schema, seen[0], guess) == coder.decode(seen[0])
    assert hits["skewed"] == 20
    assert hits["flat"] <= 4  # a flat field gives the key away no more than a guess does (1 in 24 per trial)


def test_field_counts_read_without_the_key(coder):
    recs = make_records(40, seed=1)
    plain = field_counts(coder.schema, (r["text"] for r in recs))
    enc = field_counts(coder.schema, (coder.encode(r["text"]) for r in recs))
    assert sum(plain["diagnosis"].values()) == sum(enc["diagnosis"].values()) == 40
    assert Counter({coder.forward["diagnosis"][v]: c for v, c in plain["diagnosis"].items()}) == enc["diagnosis"]
