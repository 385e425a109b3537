"""The frontier's confidence intervals against hand-computed cases (guardedp2p/evaluate/stats.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from guardedp2p.evaluate.stats import (
    StatsError,
    bootstrap_max_of_means_ci,
    bootstrap_mean_ci,
    hierarchical_bootstrap_ci,
    paired_bootstrap_diff_ci,
    seed_t_ci,
    t_quantile,
)


def test_paired_bootstrap_matches_the_binomial_hand_computation():
    """8 items, config B wrong on exactly one item where A is right: d = (1,0,...,0), mean 1/8.

    A bootstrap replicate's mean is K/8 with K ~ Binomial(8, 1/8): P(K=0) = (7/8)^8 = 0.344 > 0.025, so the lower
    bound is 0; P(K<=2) = 0.933 < 0.975 <= P(K<=3) = 0.998, so the upper bound is 3/8.
    """
    a = np.array([1, 1, 0, 1, 0, 1, 1, 0], float)
    b = a.copy()
    b[0] = 0
    iv = paired_bootstrap_diff_ci(a, b, n_boot=20_000, seed=1)
    assert iv.estimate == pytest.approx(1 / 8)
    assert (iv.lo, iv.hi) == (pytest.approx(0.0), pytest.approx(3 / 8))
    assert iv.method == "paired-bootstrap-items" and iv.n == 8
    # pairing matters: the same data treated as two independent accuracies spans far more than [0, 3/8]
    wide = bootstrap_mean_ci(a, n_boot=20_000, seed=1)
    assert wide.hi - wide.lo > 0.6


def test_identical_configurations_have_a_zero_width_paired_interval():
    a = np.random.default_rng(0).integers(0, 2, 64).astype(float)
    iv = paired_bootstrap_diff_ci(a, a.copy())
    assert iv.estimate == iv.lo == iv.hi == 0.0


def test_bootstrap_is_seeded_and_reproducible():
    x = np.random.default_rng(3).random(50)
    assert bootstrap_mean_ci(x, seed=7) == bootstrap_mean_ci(x, seed=7)
    assert bootstrap_mean_ci(x, seed=7) != bootstrap_mean_ci(x, seed=8)


def test_seed_t_interval_hand_computed():
    # mean 0.6, s = 0.1, se = 0.1/sqrt(3), t_{0.975,2} = 4.303 -> half width 0.24843
    iv = seed_t_ci([0.5, 0.6, 0.7])
    assert iv.estimate == pytest.approx(0.6)
    half = 4.303 * 0.1 / math.sqrt(3)
    assert (iv.lo, iv.hi) == (pytest.approx(0.6 - half), pytest.approx(0.6 + half))
    assert iv.method == "t-seeds" and t_quantile(2) == 4.303 and t_quantile(200) == 1.960
    assert seed_t_ci([0.4]).method == "degenerate"


def test_hierarchical_bootstrap_reduces_to_items_with_one_seed_and_widens_with_seed_spread():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, (1, 40)).astype(float)
    one = hierarchical_bootstrap_ci(a, seed=2)
    assert (one.lo, one.hi) == (bootstrap_mean_ci(a[0], seed=2).lo, bootstrap_mean_ci(a[0], seed=2).hi)
    # three seeds that disagree a lot: the two-level interval must be wider than the items-only one of the pooled mean
    m = np.stack([np.full(40, 0.2), np.full(40, 0.5), np.full(40, 0.8)]) + rng.normal(0, 0.01, (3, 40))
    h = hierarchical_bootstrap_ci(m, seed=0)
    items_only = bootstrap_mean_ci(m.mean(axis=0), seed=0)
    assert h.method == "hierarchical-bootstrap" and h.estimate == pytest.approx(0.5, abs=0.01)
    assert h.hi - h.lo > 10 * (items_only.hi - items_only.lo)
    # paired: a constant per-item offset between configurations gives a (near) zero-width interval
    p = hierarchical_bootstrap_ci(m + 0.1, m, seed=0)
    assert p.estimate == pytest.approx(0.1) and p.hi - p.lo < 1e-9


def test_best_attack_interval_resamples_the_choice():
    scores = np.array([[0.9, 0.8, 1.0, 0.7], [0.1, 0.2, 0.0, 0.1]])
    best, iv = bootstrap_max_of_means_ci(scores, seed=0)
    assert best == 0 and iv.estimate == pytest.approx(0.85) and iv.lo >= 0.7 and iv.hi <= 1.0


def test_bad_inputs_are_errors_with_a_reason():
    with pytest.raises(StatsError, match="non-empty"):
        bootstrap_mean_ci([])
    with pytest.raises(StatsError, match="same items"):
        paired_bootstrap_diff_ci([1, 0], [1, 0, 1])
    with pytest.raises(StatsError, match="finite"):
        bootstrap_mean_ci([1.0, float("nan")])
