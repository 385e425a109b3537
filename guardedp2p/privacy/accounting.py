"""ε over a whole run: every release of a record, composed by an established accountant (``dp-accounting``).

A record leaves the client more than once. In a run of S optimizer steps over N records with batch B and
``grad_accum`` micro-batches, the data iterator (:class:`guardedp2p.data.collate.BatchIterator`) shuffles the
records once per epoch and visits each exactly once per epoch, so a record is sent up at most
``ceil(S · grad_accum / ceil(N / B))`` times (the epochs the run touches); in Online each of those steps also sends
its gradient up; every evaluation pass sends each evaluation record again; and Gradfree with its trunk-output
cache on sends each record once whatever the number of epochs. :func:`plan_run` turns a run's settings into
that count (a :class:`ReleasePlan`), :func:`account` composes it.

Why no amplification by subsampling: the iterator shuffles (it does not Poisson-sample), and the provider sees
each record's row and can link a record's releases, so the honest bound is plain composition of every release
(local DP, as DP-Forward, Du et al., CCS'23, states its sequence-level guarantee). ``Release.sample_rate`` is
there for an iterator that does Poisson sampling; the shipped one never sets it.

Each release is a Gaussian mechanism with noise multiplier ``σ / Δ`` (Δ: the L2 sensitivity of one record's
release, see :mod:`guardedp2p.privacy.noise`); ``dp_accounting.GaussianDpEvent`` takes exactly that ratio. The
accountant is the privacy-loss-distribution one (tight; ``pld``) where it is practical and the Rényi one
(``rdp``) otherwise: PLD's discretisation does not fit in memory once ε runs into the hundreds, where any bound is
vacuous anyway. A release with no noise (or noise with no clipping) has ε = ∞, and so does the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from guardedp2p.errors import ConfigError
from guardedp2p.privacy.noise import NoiseConfig

__all__ = [
    "ACCOUNTANTS",
    "PLD_LIMIT",
    "PrivacyAccount",
    "Release",
    "ReleasePlan",
    "account",
    "calibrate_noise_multiplier",
    "epsilon",
    "max_appearances",
    "plan_eval",
    "privacy_block",
    "plan_run",
    "release_multipliers",
]

ACCOUNTANTS = ("pld", "rdp")
#: Above this RDP ε the PLD accountant is skipped (its grid would need gigabytes; the bound is vacuous anyway).
PLD_LIMIT = 64.0


@dataclass(frozen=True)
class Release:
    """One kind of release of a record: ``count`` Gaussian mechanisms with ``noise_multiplier`` = σ / Δ.

    ``noise_multiplier`` ``None``: released with no formal noise (ε = ∞). ``sample_rate``: Poisson sampling
    probability per step (``count`` then counts steps, not releases); ``None``: every count is a release.
    """

    name: str
    count: int
    noise_multiplier: float | None
    sample_rate: float | None = None

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ConfigError(f"release count must be >= 0, got {self.count}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ConfigError(f"noise multiplier must be > 0 or None, got {self.noise_multiplier}")
        if self.sample_rate is not None and not 0 < self.sample_rate <= 1:
            raise ConfigError(f"sample rate must be in (0, 1], got {self.sample_rate}")


@dataclass(frozen=True)
class ReleasePlan:
    """Every release of one record over a run (the worst-case record: the one that appears most often)."""

    releases: tuple[Release, ...]
    population: str = "train"  # whose records: the training records, or the evaluation records
    sampling: str = "shuffle: every record once per epoch (no amplification claimed)"
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "population": self.population,
            "sampling": self.sampling,
            "releases": [
                {"name": r.name, "count": r.count, "noise_multiplier": r.noise_multiplier, "sample_rate": r.sample_rate}
                for r in self.releases
            ],
            **({"notes": list(self.notes)} if self.notes else {}),
        }


@dataclass(frozen=True)
class PrivacyAccount:
    """ε at δ for one record over the run, and how it was obtained."""

    epsilon: float  # math.inf when something leaves un-noised
    delta: float
    accountant: str  # "pld", "rdp" or "none" (ε = ∞ or nothing released)
    plan: ReleasePlan
    epsilon_rdp: float | None = None

    @property
    def finite(self) -> bool:
        return math.isfinite(self.epsilon)

    def to_dict(self) -> dict[str, Any]:
        """JSON- and msgpack-safe (ε = ∞ is the string ``"inf"``)."""
        return {
            "epsilon": round(self.epsilon, 4) if self.finite else "inf",
            "delta": self.delta,
            "accountant": self.accountant,
            "library": "dp-accounting",
            **({"epsilon_rdp": round(self.epsilon_rdp, 4)} if self.epsilon_rdp is not None else {}),
            **self.plan.to_dict(),
        }


def max_appearances(n_records: int, batch_size: int, batches: int, *, drop_last: bool = False) -> int:
    """How often the most-visited record appears in ``batches`` batches of the shuffling iterator.

    Each epoch visits every record once in ``ceil(N / B)`` batches (``floor`` with ``drop_last``, where a record
    may also be left out of an epoch), so a record appears at most once per epoch touched.
    """
    if n_records < 1 or batch_size < 1 or batches < 0:
        raise ConfigError("need at least one record, batch size >= 1 and batches >= 0")
    per_epoch = n_records // batch_size if drop_last else -(-n_records // batch_size)
    if per_epoch < 1:
        raise ConfigError(f"{n_records} records < batch size {batch_size} with drop_last: no batch")
    return -(-batches // per_epoch)


def release_multipliers(cfg: NoiseConfig, *, max_tokens: int | None = None) -> tuple[float | None, float | None]:
    """(activation, gradient) noise multipliers σ / Δ of one release under ``cfg``; ``None``: no formal noise.

    Activation: Gaussian with a clip, σ = ``effective_scale()``, Δ = 2C (record unit) or 2C·sqrt(L) (token
    unit, L = ``max_tokens``, the longest sequence the run sends). Gradient: σ_g / (2 C_g).
    Laplace and dχ are not Gaussian mechanisms: :func:`account` treats them separately.
    """
    act: float | None = None
    if cfg.kind == "gaussian" and cfg.clip is not None and cfg.calibrated:
        sens = 2.0 * cfg.clip
        if cfg.clip_unit == "token":
            if not max_tokens or max_tokens < 1:
                raise ConfigError("token-unit clipping needs the longest sequence length (max_tokens) to account")
            sens *= math.sqrt(max_tokens)
        act = cfg.effective_scale() / sens
    grad: float | None = None
    if cfg.noises_gradient:
        grad = float(cfg._required("grad_noise_multiplier", cfg.grad_noise_multiplier)) / 2.0
    return act, grad


def plan_run(
    cfg: NoiseConfig | dict[str, Any],
    *,
    design: str,
    steps: int,
    batch_size: int,
    n_records: int,
    grad_accum: int = 1,
    max_tokens: int | None = None,
    cached: bool = False,
    eval_passes: int = 0,
) -> ReleasePlan:
    """The releases of a training record in one run of ``design`` (``online``, ``gradfree``, ``offline``).

    ``eval_passes``: evaluation passes that run over the *training* records too (0 when evaluation uses held-out
    records, as the shipped evaluation does; plan those with ``population="eval"`` via :func:`plan_eval`).
    ``cached``: Gradfree's trunk-output cache keeps every record's (noised) trunk output, so it is sent once.
    """
    cfg = NoiseConfig.from_dict(cfg)
    if design == "offline":
        return ReleasePlan((), sampling="offline: nothing data-derived leaves the client during training")
    appearances = max_appearances(n_records, batch_size, steps * grad_accum)
    act, grad = release_multipliers(cfg, max_tokens=max_tokens)
    act_count = min(appearances, 1) if (design == "gradfree" and cached) else appearances
    rel = [Release("activation", act_count + eval_passes, act)]
    notes = ["the attention mask (each record's length) is sent in the clear"]
    if design == "online":
        rel.append(Release("gradient", appearances, grad))
    if cfg.kind == "laplace" or cfg.kind == "dx":
        notes.append(f"{cfg.kind} releases compose linearly (pure/metric DP): see the mechanism's epsilon")
    return ReleasePlan(tuple(rel), notes=tuple(notes))


def plan_eval(
    cfg: NoiseConfig | dict[str, Any], *, passes: int, copies: int = 1, max_tokens: int | None = None
) -> ReleasePlan:
    """The releases of an evaluation record: ``passes`` evaluations, each sending it ``copies`` times (a
    multiple-choice item is sent once per choice, the question each time)."""
    cfg = NoiseConfig.from_dict(cfg)
    act, _ = release_multipliers(cfg, max_tokens=max_tokens)
    return ReleasePlan((Release("activation", passes * copies, act),), population="eval", sampling="every pass")


def _event(rel: Release) -> Any:
    import dp_accounting as dpa

    gauss = dpa.GaussianDpEvent(float(rel.noise_multiplier or 0.0))
    one = gauss if rel.sample_rate is None else dpa.PoissonSampledDpEvent(rel.sample_rate, gauss)
    return dpa.SelfComposedDpEvent(one, int(rel.count))


def epsilon(plan: ReleasePlan, delta: float, accountant: str = "pld") -> tuple[float, str, float | None]:
    """(ε, accountant used, RDP ε) of ``plan`` at ``delta``; ε = ∞ when a release has no noise."""
    import dp_accounting as dpa
    from dp_accounting import pld, rdp

    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"unknown accountant {accountant!r}: use one of {', '.join(ACCOUNTANTS)}")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    live = [r for r in plan.releases if r.count > 0]
    if not live:
        return 0.0, "none", None
    if any(r.noise_multiplier is None for r in live):
        return math.inf, "none", None
    event = dpa.ComposedDpEvent([_event(r) for r in live])
    r_acc = rdp.RdpAccountant()
    r_acc.compose(event)
    eps_rdp = float(r_acc.get_epsilon(delta))
    if accountant == "rdp" or eps_rdp > PLD_LIMIT:
        return eps_rdp, "rdp", eps_rdp
    p_acc = pld.PLDAccountant()
    p_acc.compose(event)
    return min(float(p_acc.get_epsilon(delta)), eps_rdp), "pld", eps_rdp


def account(cfg: NoiseConfig | dict[str, Any], plan: ReleasePlan, accountant: str = "pld") -> PrivacyAccount:
    """ε of one record over ``plan`` under ``cfg`` at the configuration's δ (:data:`noise.DEFAULT_DELTA` if none).

    Laplace releases compose to ``count · ε`` (pure DP); dχ to ``count · ε`` per unit of embedding distance
    (metric DP, not (ε, δ)); both are reported under ``epsilon`` with the accountant ``"basic composition"``.
    """
    cfg = NoiseConfig.from_dict(cfg)
    delta = cfg.accounting_delta
    if cfg.epsilon is not None and (cfg.kind == "dx" or (cfg.kind == "laplace" and cfg.calibrated)):
        count = sum(r.count for r in plan.releases if r.name == "activation")
        grads = [r for r in plan.releases if r.name == "gradient" and r.count > 0]
        eps = math.inf if grads else count * float(cfg.epsilon)
        return PrivacyAccount(eps, 0.0, "basic composition" if math.isfinite(eps) else "none", plan)
    eps, used, eps_rdp = epsilon(plan, delta, accountant)
    return PrivacyAccount(eps, delta, used, plan, eps_rdp if used == "pld" else None)


def calibrate_noise_multiplier(
    target_epsilon: float, delta: float, counts: tuple[int, ...], *, sensitivity: float = 2.0
) -> float:
    """The smallest noise multiplier z (σ = z·C) whose run ε at ``delta`` is at most ``target_epsilon``, when a
    record is released ``k = sum(counts)`` times, each a Gaussian with multiplier z / ``sensitivity`` (2 for
    per-record clipping under replace-one).

    Unsampled Gaussian releases compose *exactly* into one Gaussian with multiplier (z / sensitivity) / sqrt(k)
    (Gaussian DP; the PLD accountant agrees, see tests/privacy/test_accounting.py), so the calibration is the
    library's analytic one for a single Gaussian, ``dp_accounting.get_sigma_gaussian``, scaled by sqrt(k).
    """
    from dp_accounting import get_sigma_gaussian

    if not target_epsilon > 0 or not 0 < delta < 1:
        raise ConfigError(f"need a target epsilon > 0 and delta in (0, 1), got {target_epsilon}, {delta}")
    total = int(sum(counts))
    if total < 1:
        raise ConfigError("nothing is released: there is no noise to calibrate")
    return float(sensitivity * math.sqrt(total) * get_sigma_gaussian(float(target_epsilon), float(delta)))


def privacy_block(
    noise: NoiseConfig | dict[str, Any] | None,
    *,
    design: str,
    steps: int,
    batch_size: int,
    n_records: int,
    grad_accum: int = 1,
    max_tokens: int | None = None,
    cached: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``privacy`` map of the HELLO and of ``summary.json`` / ``--json`` for one run: the noise's description
    with ``run`` (ε at δ over every release of a training record, :func:`account`), plus ``extra`` (dCor weight,
    preset, obfuscation settings). Msgpack- and JSON-safe; never the seed."""
    cfg = NoiseConfig.from_dict(noise)
    plan = plan_run(
        cfg,
        design=design,
        steps=steps,
        batch_size=batch_size,
        n_records=n_records,
        grad_accum=grad_accum,
        max_tokens=max_tokens,
        cached=cached,
    )
    return {**(extra or {}), "noise": cfg.describe(plan)}
