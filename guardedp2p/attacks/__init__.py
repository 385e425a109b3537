"""Data-reconstruction attack (DRA) harness: what an honest-but-curious provider can rebuild of the client's text.

- :mod:`~guardedp2p.attacks.transcript`: the provider-side recorder and the transcript reader.
- :mod:`~guardedp2p.attacks.sip`: learned inverter (SIP), defence-aware via a ``transform``.
- :mod:`~guardedp2p.attacks.bisr`: BiSR(b) gradient matching and BiSR(f) forward matching.
- :mod:`~guardedp2p.attacks.baselines`: TAG*, LAMP, EIA*.
- :mod:`~guardedp2p.attacks.metrics`: ROUGE, token accuracy, token-set F1 (METEOR when WordNet is installed).
- :mod:`~guardedp2p.attacks.runner`: :func:`run_attacks`, the whole suite with scoring.

Submodules are imported lazily so the provider can record transcripts without loading the attack code.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "TranscriptRecorder": "transcript",
    "Observation": "transcript",
    "load_transcript": "transcript",
    "AttackerModel": "common",
    "codec_transform": "common",
    "SIPConfig": "sip",
    "train_sip": "sip",
    "train_sip_for": "sip",
    "GradMatchConfig": "bisr",
    "ForwardMatchConfig": "bisr",
    "gradient_match": "bisr",
    "forward_match": "bisr",
    "activation_stats": "bisr",
    "LAMPConfig": "baselines",
    "EIAConfig": "baselines",
    "score_many": "metrics",
    "score_sample": "metrics",
    "ATTACKS": "runner",
    "AttackReport": "runner",
    "AttackSuiteConfig": "runner",
    "run_attacks": "runner",
    "score_report": "runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'guardedp2p.attacks' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"guardedp2p.attacks.{mod}"), name)
