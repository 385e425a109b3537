"""``--privacy off|balanced|fields|strong``: named bundles of the client's defences, resolved to documented parameters.

Where the parameters come from (the user guide's "Privacy settings" section has the table; the frontier of
``guardedp2p evaluate``, docs/results/frontier.md, measures them against the adaptive attacker):

* ``off``: no defence. Measured (docs/results/frontier.md): the adaptive attacker reads the undefended Online run
  back with ROUGE-L 0.985 and reproduces 87% of the secrets exactly.
* ``balanced`` (measured, docs/results/frontier.md, hidden-rules task, Online, seed 0): accuracy 0.695 against local
  LoRA's 0.688 (utility loss -0.8 points, CI [-7.0, 5.5]); the adaptive attacker's ROUGE-L falls from 0.985 to
  0.937 (the format prior alone scores 0.52) and the secrets it reproduces from 0.87 to 0.62: names 0.33 -> 0.02,
  addresses 1.00 -> 0.08, but dates of birth, account numbers and diagnoses stay fully readable, because their
  tokens (digits, the diagnosis words) are frequent in public records and so on the keep list (the task's codes
  need the digits too). Token-selective dχ-privacy on the input embeddings (the family the split-learning literature
  finds most promising empirically: SAP, Shen et al. 2023; PrivTune). Token ids found in at least 10% of the
  public records of the task's style (the template, the task's keywords) keep ``epsilon_keep`` =
  :data:`BALANCED_EPSILON_KEEP` (few substitutions), every other token (names, dates, numbers: spread thin) gets
  ``epsilon`` = :data:`BALANCED_EPSILON`. Chosen from the substitution rates measured on SmolLM2-135M's
  embedding (``docs/results/privacy_presets.json``): on the demo records the keep list is 38 token ids covering
  88% of the tokens; at ε = 30, 86% of the other tokens (names, streets, cities) are replaced by another token,
  at ε = 200 none of the kept ones. No useful formal bound (embedding distances are ~4, so ε·distance ≈ 120 per
  token): its protection is empirical, as measured above.
* ``strong``: the formal mechanism: every record's activation clipped to L2 norm :data:`STRONG_CLIP` (about the
  median record norm of SmolLM2's h1 after block 2 on the demo records) with Gaussian noise whose multiplier the
  accountant picks so that the *whole run* is (:data:`STRONG_EPSILON`, :data:`STRONG_DELTA`)-DP per record, the
  gradient Online sends up clipped and noised alike (per record, :data:`STRONG_GRAD_CLIP`). The anchors say what
  that costs: plain noise at 2x the token RMS already takes the demo's accuracy after 60 steps from 0.578 to
  0.219 (chance is 0.25), and ε = 8 needs far more noise than that. Use it when a bound matters more than the
  fine-tuning gain, or with the Offline design, which sends nothing data-derived while training.

The handshake carries :meth:`PrivacyPreset.describe` (name, every parameter, where they come from), so the
provider's record says what protection was on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from guardedp2p.errors import ConfigError
from guardedp2p.privacy.noise import DEFAULT_DELTA, NoiseConfig, digit_token_ids, frequent_token_ids

__all__ = [
    "PRESETS",
    "BALANCED_EPSILON",
    "BALANCED_EPSILON_KEEP",
    "BALANCED_KEEP_SHARE",
    "STRONG_CLIP",
    "STRONG_DELTA",
    "STRONG_EPSILON",
    "STRONG_GRAD_CLIP",
    "formal_gaussian_noise",
    "preset_digit_ids",
    "PrivacyPreset",
    "RunShape",
    "resolve_preset",
]

PRESETS = ("off", "balanced", "fields", "strong")

BALANCED_EPSILON = 30.0
BALANCED_EPSILON_KEEP = 200.0
BALANCED_KEEP_SHARE = 0.1

STRONG_EPSILON = 8.0
STRONG_DELTA = DEFAULT_DELTA
STRONG_CLIP = 620.0
STRONG_GRAD_CLIP = 1.0


@dataclass(frozen=True)
class RunShape:
    """What the accountant needs to know about the run (the defaults are the demo's)."""

    design: str = "online"
    steps: int = 60
    batch_size: int = 4
    n_records: int = 300
    grad_accum: int = 1
    max_length: int = 128
    cached: bool = False  # Gradfree with its trunk-output cache on (each record sent once)


@dataclass(frozen=True)
class PrivacyPreset:
    """A resolved preset: the ``TuneOptions.noise`` dict and the training overrides it stands for."""

    name: str
    noise: dict[str, Any] = field(default_factory=dict)
    dcor_alpha: float = 0.0
    target_epsilon: float | None = None
    evidence: str = ""

    def noise_config(self) -> NoiseConfig:
        return NoiseConfig.from_dict(self.noise)

    def describe(self) -> dict[str, Any]:
        """For ``Hello.privacy["preset"]`` and the summary: the name, the parameters, their provenance."""
        out: dict[str, Any] = {"name": self.name, "dcor_alpha": self.dcor_alpha, "evidence": self.evidence}
        out["noise"] = self.noise_config().describe() if self.noise else {"kind": "none"}
        if self.target_epsilon is not None:
            out["target_epsilon"] = self.target_epsilon
            out["target_delta"] = STRONG_DELTA
        return out


def selective_dx(
    epsilon: float, public_ids: Sequence[Sequence[int]] | None = None, *, exclude: Sequence[int] = ()
) -> dict[str, Any]:
    """Token-selective dχ (the ``balanced`` / ``fields`` mechanism at any ``epsilon``): tokens in at least
    ``BALANCED_KEEP_SHARE`` of the public records, minus ``exclude``, get ``BALANCED_EPSILON_KEEP``; the rest
    ``epsilon``. Without ``public_ids`` every token gets ``epsilon``."""
    noise: dict[str, Any] = {"kind": "dx", "epsilon": epsilon, "dx_project": True}
    if public_ids:
        noise["keep_ids"] = frequent_token_ids(public_ids, min_share=BALANCED_KEEP_SHARE, exclude=exclude)
        noise["epsilon_keep"] = BALANCED_EPSILON_KEEP
    return noise


def preset_digit_ids(name: str, tokenizer: Any) -> list[int]:
    """The ``digit_ids`` :func:`resolve_preset` takes for preset ``name``: every digit token of ``tokenizer`` for
    ``fields`` (dates and account numbers are spelled with them), none for the others."""
    return digit_token_ids(tokenizer) if name == "fields" else []


def resolve_preset(
    name: str,
    *,
    shape: RunShape | None = None,
    public_ids: Sequence[Sequence[int]] | None = None,
    digit_ids: Sequence[int] = (),
) -> PrivacyPreset:
    """The parameters of preset ``name``.

    ``balanced`` needs ``public_ids`` (token ids of public text in the task's style, e.g. the shipped
    ``demo_aux.jsonl``) for its keep list; without them every token gets ``BALANCED_EPSILON``. ``fields`` is
    ``balanced`` whose keep list leaves out ``digit_ids`` (:func:`guardedp2p.privacy.noise.digit_token_ids` of the
    tokenizer): dates and account numbers get the full noise. ``strong`` calibrates its noise multiplier to
    ``STRONG_EPSILON`` over ``shape`` (default: the demo run).
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown privacy preset {name!r}: use one of {', '.join(PRESETS)}")
    if name == "off":
        return PrivacyPreset(
            "off",
            evidence="frontier (docs/results/frontier.md, 3 seeds): adaptive-attack ROUGE-L 0.995, secrets 0.96 on Online",
        )
    if name == "balanced":
        return PrivacyPreset(
            "balanced",
            selective_dx(BALANCED_EPSILON, public_ids),
            evidence="frontier (docs/results/frontier.md, hidden-rules task, Online, 3 seeds): utility loss -1.8 "
            "points [-7.2, 3.4], adaptive-attack ROUGE-L 0.943 (format prior 0.52), secrets 0.62 (names and "
            "addresses protected; dates, account numbers, diagnoses not)",
        )
    if name == "fields":
        return PrivacyPreset(
            "fields",
            selective_dx(BALANCED_EPSILON, public_ids, exclude=digit_ids),
            evidence="frontier (docs/results/frontier.md, hidden-rules task, seed 0, rows dxfield:30*): names, birth "
            "dates, addresses and account numbers rebuilt 0.4-1.2 %, diagnoses 100 % (a task input), ROUGE-L 0.83; "
            "with --top-train blocks Online accuracy 1.000 (1.000 undefended) and Gradfree 0.891; with the top LoRA "
            "only Online loses 11.7 points [4.7, 18.8]",
        )
    s = shape or RunShape()
    if s.design == "offline":
        return PrivacyPreset("strong", evidence="offline: nothing data-derived leaves the client while training")
    noise, releases = formal_gaussian_noise(STRONG_EPSILON, s)
    return PrivacyPreset(
        "strong",
        noise,
        target_epsilon=STRONG_EPSILON,
        evidence=f"noise multiplier from the dp-accounting PLD accountant for epsilon {STRONG_EPSILON:g} at delta "
        f"{STRONG_DELTA:g} over {releases} releases per record; utility cost from the noise anchors "
        "(2x token RMS: demo accuracy 0.578 -> 0.219)",
    )


def formal_gaussian_noise(
    epsilon: float,
    shape: RunShape,
    *,
    delta: float = STRONG_DELTA,
    clip: float = STRONG_CLIP,
    grad_clip: float = STRONG_GRAD_CLIP,
) -> tuple[dict[str, Any], int]:
    """The ``TuneOptions.noise`` of a per-record clipped Gaussian whose multiplier makes the whole run
    (``epsilon``, ``delta``)-DP per record, and the number of releases of a record it was calibrated over.

    Every release of a record counts: its activation at each appearance (once in Gradfree with the trunk-output
    cache), and in Online the gradient it sends up as well (same clip logic, same multiplier). The multiplier comes
    from dp-accounting (:func:`guardedp2p.privacy.accounting.calibrate_noise_multiplier`), rounded up so the run's
    ε stays at or below the target.
    """
    from guardedp2p.privacy.accounting import calibrate_noise_multiplier, max_appearances

    appear = max_appearances(shape.n_records, shape.batch_size, shape.steps * shape.grad_accum)
    act = 1 if (shape.design == "gradfree" and shape.cached) else appear
    counts = (act, appear) if shape.design == "online" else (act,)
    z = calibrate_noise_multiplier(epsilon, delta, counts)
    z = math.ceil(z * 1e4) / 1e4
    noise: dict[str, Any] = {"kind": "gaussian", "clip": clip, "clip_unit": "record", "noise_multiplier": z}
    noise["delta"] = delta
    if shape.design == "online":
        noise.update(grad_clip=grad_clip, grad_noise_multiplier=z)
    return noise, int(sum(counts))
