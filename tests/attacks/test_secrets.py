"""The secrets-recovered metric on hand-made strings (guardedp2p/attacks/metrics.py)."""

from __future__ import annotations

import math

import pytest

from guardedp2p.attacks.metrics import secret_found, secrets_recovered, summarize_secrets

PII = {
    "name": "Zara Novak",
    "born": "1987-10-12",
    "address": "108 Park Terrace, Belfast",
    "diagnosis": "asthma",
    "account": "GB99-3951-8049-5823",
}
REF = (
    "Patient Zara Novak, born 1987-10-12, lives at 108 Park Terrace, Belfast; diagnosis: asthma; "
    "ward code: LM-7; account GB99-3951-8049-5823."
)


def test_perfect_reconstruction_recovers_every_field():
    assert secrets_recovered(REF, PII) == {k: True for k in PII}


def test_near_misses_do_not_count():
    hyp = (
        "Patient Zara Nowak, born 1987-10-13, lives at 108  Park Terrace, Belfast; diagnosis: Asthma; "
        "account GB99-3951-8049-58234."
    )
    got = secrets_recovered(hyp, PII)
    assert got == {"name": False, "born": False, "address": True, "diagnosis": False, "account": False}
    # a value embedded in a longer number or word is not a recovery, a value followed by punctuation is
    assert not secret_found("id 11987-10-12", "1987-10-12")
    assert secret_found("(1987-10-12)", "1987-10-12")
    assert not secret_found("Zara Novakova", "Zara Novak")
    assert not secret_found("anything", "")


def test_summary_counts_fields_and_sequences():
    rows = [secrets_recovered(REF, PII), secrets_recovered("Patient Zara Novak, born 1900-01-01", PII), {}]
    s = summarize_secrets(rows)
    assert s.n_sequences == 2 and s.n_fields == 10
    assert s.fraction == pytest.approx(6 / 10)
    assert s.per_field["name"] == 1.0 and s.per_field["born"] == 0.5
    assert list(s.per_field)[:3] == ["name", "address", "born"]  # the display order of SECRET_FIELDS
    assert s.all_recovered == 0.5
    assert math.isnan(summarize_secrets([]).fraction)
