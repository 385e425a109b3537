"""Confidence intervals for the frontier's numbers: every utility and privacy figure comes with a 95% CI.

Why these methods (docs/results/frontier.md, "How the numbers are made"):

* **Items are the unit of sampling for one run.** An accuracy over 64 multiple-choice items moves by several
  points when the items change; the percentile bootstrap over items (:func:`bootstrap_mean_ci`) says by how
  much, with no normality assumption on a 0/1 variable.
* **Comparisons are paired.** Two configurations evaluated on the *same* items are compared item by item
  (:func:`paired_bootstrap_diff_ci`): each replicate resamples item indices once and uses them for both, so the
  item difficulty that both share cancels. An unpaired interval on the same data is several times wider.
* **Training seeds are a second source of variance.** With several seeds, :func:`hierarchical_bootstrap_ci`
  resamples seeds *and* items in every replicate (the same item indices for all seeds and both configurations),
  which covers both sources at once; :func:`seed_t_ci` is the classical Student-t interval over the per-seed
  means, reported beside it (wide with 3 seeds: t(2) = 4.30).
* **"Best attack" is a maximum over attacks.** Its interval (:func:`bootstrap_max_of_means_ci`) resamples the
  attacked sequences and takes the maximum of the attacks' means inside every replicate, so the selection of
  the best attack is part of what is resampled (the plain CI of the winner's mean would be optimistic).

Every bootstrap draws from ``numpy.random.Generator(PCG64(seed))``: the same inputs and seed give the same
interval on every machine. The percentile interval is ``[q_{(1-level)/2}, q_{(1+level)/2}]`` of the replicate
statistics (numpy's default linear interpolation between order statistics).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from guardedp2p.errors import ConfigError

__all__ = [
    "Interval",
    "StatsError",
    "bootstrap_max_of_means_ci",
    "bootstrap_mean_ci",
    "hierarchical_bootstrap_ci",
    "paired_bootstrap_diff_ci",
    "seed_t_ci",
    "t_quantile",
]

DEFAULT_BOOT = 10_000
LEVEL = 0.95

# two-sided 95% Student-t quantiles t_{0.975, df} (standard tables, 3 decimals); beyond 30 df the normal 1.960
# is within 2% of the exact value, and the table avoids a scipy dependency for one number
_T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    11: 2.201,
    12: 2.179,
    13: 2.160,
    14: 2.145,
    15: 2.131,
    16: 2.120,
    17: 2.110,
    18: 2.101,
    19: 2.093,
    20: 2.086,
    21: 2.080,
    22: 2.074,
    23: 2.069,
    24: 2.064,
    25: 2.060,
    26: 2.056,
    27: 2.052,
    28: 2.048,
    29: 2.045,
    30: 2.042,
}


class StatsError(ConfigError):
    """An interval was asked of data that cannot give one (empty, mismatched shapes, unsupported level)."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval and how it was made.

    ``method``: "bootstrap-items", "paired-bootstrap-items", "hierarchical-bootstrap", "t-seeds",
    "bootstrap-max" or "degenerate" (a single observation: the interval is the point itself).
    ``n``: items (or seeds, for "t-seeds") behind the estimate.
    """

    estimate: float
    lo: float
    hi: float
    method: str
    n: int
    level: float = LEVEL

    def as_list(self, nd: int = 4) -> list[float]:
        return [round(self.lo, nd), round(self.hi, nd)]

    def as_dict(self, nd: int = 4) -> dict[str, object]:
        return {"estimate": round(self.estimate, nd), "ci95": self.as_list(nd), "method": self.method, "n": self.n}


def t_quantile(df: int, level: float = LEVEL) -> float:
    """Two-sided Student-t quantile for ``level`` (only 0.95 is tabulated)."""
    if abs(level - 0.95) > 1e-12:
        raise StatsError(f"only 95% t intervals are tabulated (asked for {level})")
    if df < 1:
        raise StatsError("a t interval needs at least 2 values (1 degree of freedom)")
    return _T975.get(int(df), 1.960)


def _vec(x: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise StatsError(f"{what}: need a non-empty 1-D vector of per-item values, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise StatsError(f"{what}: per-item values must be finite (drop or score the NaN items first)")
    return a


def _percentile(stats: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_mean_ci(
    values: Sequence[float] | np.ndarray, *, n_boot: int = DEFAULT_BOOT, level: float = LEVEL, seed: int = 0
) -> Interval:
    """Mean of per-item values with a percentile-bootstrap CI over items (resampled with replacement)."""
    a = _vec(values, "bootstrap_mean_ci")
    if a.size == 1:
        return Interval(float(a[0]), float(a[0]), float(a[0]), "degenerate", 1, level)
    rng = np.random.Generator(np.random.PCG64(seed))
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    lo, hi = _percentile(a[idx].mean(axis=1), level)
    return Interval(float(a.mean()), lo, hi, "bootstrap-items", int(a.size), level)


def paired_bootstrap_diff_ci(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    n_boot: int = DEFAULT_BOOT,
    level: float = LEVEL,
    seed: int = 0,
) -> Interval:
    """mean(a) - mean(b) for two configurations scored on the *same* items, with a paired bootstrap CI.

    Each replicate draws one set of item indices and applies it to both vectors (equivalently, bootstraps the
    per-item differences ``a_i - b_i``).
    """
    x, y = _vec(a, "paired_bootstrap_diff_ci(a)"), _vec(b, "paired_bootstrap_diff_ci(b)")
    if x.shape != y.shape:
        raise StatsError(f"paired comparison needs the same items on both sides ({x.size} vs {y.size} items)")
    iv = bootstrap_mean_ci(x - y, n_boot=n_boot, level=level, seed=seed)
    return Interval(
        iv.estimate, iv.lo, iv.hi, "paired-bootstrap-items" if iv.method != "degenerate" else "degenerate", iv.n, level
    )


def seed_t_ci(values: Sequence[float] | np.ndarray, level: float = LEVEL) -> Interval:
    """Mean over training seeds with a Student-t CI (``mean ± t_{df} s / sqrt(n)``, df = n - 1).

    One seed gives a degenerate interval (the value itself) and says so in ``method``.
    """
    a = _vec(values, "seed_t_ci")
    m = float(a.mean())
    if a.size == 1:
        return Interval(m, m, m, "degenerate", 1, level)
    half = t_quantile(a.size - 1, level) * float(a.std(ddof=1)) / math.sqrt(a.size)
    return Interval(m, m - half, m + half, "t-seeds", int(a.size), level)


def hierarchical_bootstrap_ci(
    a: Sequence[Sequence[float]] | np.ndarray,
    b: Sequence[Sequence[float]] | np.ndarray | None = None,
    *,
    n_boot: int = DEFAULT_BOOT,
    level: float = LEVEL,
    seed: int = 0,
) -> Interval:
    """Mean of a seeds x items matrix (or of the paired difference ``a - b``) with a two-level bootstrap CI.

    Every replicate draws seeds with replacement and item indices with replacement; the same item indices
    serve every drawn seed and both configurations (``b[s]`` is the reference run with the same training seed
    as ``a[s]``, e.g. local LoRA with that seed). With one seed this is :func:`bootstrap_mean_ci` (or the paired
    version) over items.
    """
    x = np.asarray(a, dtype=np.float64)
    if x.ndim != 2 or x.size == 0:
        raise StatsError(f"hierarchical_bootstrap_ci: need a seeds x items matrix, got shape {x.shape}")
    paired = b is not None
    if paired:
        y = np.asarray(b, dtype=np.float64)
        if y.shape != x.shape:
            raise StatsError(f"paired comparison needs the same seeds and items on both sides ({x.shape} vs {y.shape})")
        x = x - y
    if not np.all(np.isfinite(x)):
        raise StatsError("hierarchical_bootstrap_ci: per-item values must be finite")
    S, N = x.shape
    if S == 1:
        iv = bootstrap_mean_ci(x[0], n_boot=n_boot, level=level, seed=seed)
        method = iv.method if iv.method == "degenerate" else ("paired-bootstrap-items" if paired else "bootstrap-items")
        return Interval(iv.estimate, iv.lo, iv.hi, method, iv.n, level)
    rng = np.random.Generator(np.random.PCG64(seed))
    stats = np.empty(n_boot)
    chunk = max(1, 2_000_000 // max(1, S * N))
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        items = rng.integers(0, N, size=(k, N))
        seeds = rng.integers(0, S, size=(k, S))
        per_seed = x[:, items].mean(axis=2)  # S x k: each seed's item mean under replicate r's item draw
        stats[start : start + k] = np.take_along_axis(per_seed.T, seeds, axis=1).mean(axis=1)
    lo, hi = _percentile(stats, level)
    return Interval(float(x.mean()), lo, hi, "hierarchical-bootstrap", int(S * N), level)


def bootstrap_max_of_means_ci(
    scores: Sequence[Sequence[float]] | np.ndarray, *, n_boot: int = DEFAULT_BOOT, level: float = LEVEL, seed: int = 0
) -> tuple[int, Interval]:
    """The best of several attacks scored on the same sequences: (index of the best, max of means with its CI).

    ``scores`` is attacks x sequences. Every replicate resamples sequence indices once (paired across attacks)
    and takes the maximum over attacks of their means, so choosing the best attack is inside the bootstrap.
    """
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 2 or x.size == 0:
        raise StatsError(f"bootstrap_max_of_means_ci: need an attacks x sequences matrix, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise StatsError("bootstrap_max_of_means_ci: per-sequence scores must be finite")
    means = x.mean(axis=1)
    best = int(np.argmax(means))
    n = x.shape[1]
    if n == 1:
        v = float(means[best])
        return best, Interval(v, v, v, "degenerate", 1, level)
    rng = np.random.Generator(np.random.PCG64(seed))
    idx = rng.integers(0, n, size=(n_boot, n))
    stats = x[:, idx].mean(axis=2).max(axis=0)
    lo, hi = _percentile(stats, level)
    return best, Interval(float(means[best]), lo, hi, "bootstrap-max", int(n), level)
