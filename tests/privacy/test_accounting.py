"""ε over a run (guardedp2p/privacy/accounting.py): release counts as the iterator really makes them, and the
accountant's ε against dp-accounting's own reference values and against the exact Gaussian composition."""

from __future__ import annotations

import json
import math

import pytest

from guardedp2p.data.collate import BatchIterator
from guardedp2p.errors import ConfigError
from guardedp2p.privacy.accounting import (
    PrivacyAccount,
    Release,
    ReleasePlan,
    account,
    epsilon,
    max_appearances,
    plan_eval,
    plan_run,
    privacy_block,
    release_multipliers,
)
from guardedp2p.privacy.noise import NoiseConfig


def test_library_reference_values():
    """dp-accounting's own test references: three Gaussian releases with multiplier sqrt(3) are (1, 0.126936)-DP
    (its PLD test_gaussian_basic); one release with multiplier 4.530877117 is (1, 1e-6)-DP (its RDP
    test_compute_epsilon_delta_gaussian)."""
    eps, used, _ = epsilon(ReleasePlan((Release("activation", 3, math.sqrt(3)),)), 0.126936)
    assert used == "pld" and eps == pytest.approx(1.0, abs=5e-3)
    eps, used, _ = epsilon(ReleasePlan((Release("activation", 1, 4.530877117),)), 1e-6, "rdp")
    assert used == "rdp" and eps == pytest.approx(1.0, abs=0.02)


def test_dp_sgd_poisson_sampled():
    """DP-SGD on MNIST (N = 60,000, batch 256, σ = 1.1, 60 epochs, δ = 1e-5): the TF Privacy tutorial's RDP
    moments accountant reports ε ≈ 2.92; the library's RDP conversion is never looser, PLD tighter still."""
    q = 256 / 60000
    steps = int(60 * 60000 / 256)
    plan = ReleasePlan((Release("activation", steps, 1.1, sample_rate=q),))
    eps_rdp, used, _ = epsilon(plan, 1e-5, "rdp")
    assert used == "rdp" and 2.0 < eps_rdp <= 2.93
    eps_pld, used, also_rdp = epsilon(plan, 1e-5, "pld")
    assert used == "pld" and also_rdp == pytest.approx(eps_rdp)
    assert 2.0 < eps_pld <= eps_rdp


@pytest.mark.parametrize("z,k", [(3.7306, 1), (7.4612, 4), (20.0, 30), (5.0, 3)])
def test_unsampled_composition_is_the_exact_gaussian(z, k):
    """k Gaussian releases with multiplier z are exactly one with z/sqrt(k) (Gaussian DP); the accountant must
    agree with the library's analytic single-Gaussian ε (Balle & Wang 2018)."""
    from dp_accounting import get_epsilon_gaussian

    exact = get_epsilon_gaussian(z / math.sqrt(k), 1e-5)
    eps, used, eps_rdp = epsilon(ReleasePlan((Release("activation", k, z),)), 1e-5)
    assert used == "pld"
    assert eps == pytest.approx(exact, rel=2e-3)
    assert eps_rdp is not None and eps_rdp >= eps  # RDP is an upper bound, never tighter
    if (z, k) == (3.7306, 1):
        assert eps == pytest.approx(1.0, abs=2e-3)  # σ = 3.7306 is the analytic ε = 1, δ = 1e-5 point


def test_mixed_releases_compose():
    from dp_accounting import get_epsilon_gaussian

    plan = ReleasePlan((Release("activation", 10, 8.0), Release("gradient", 10, 12.0)))
    mu_inv = (10 / 8.0**2 + 10 / 12.0**2) ** -0.5
    eps, _, _ = epsilon(plan, 1e-5)
    assert eps == pytest.approx(get_epsilon_gaussian(mu_inv, 1e-5), rel=2e-3)


def test_unprotected_release_is_infinite_and_empty_plan_is_zero():
    plan = ReleasePlan((Release("activation", 3, 5.0), Release("gradient", 3, None)))
    assert epsilon(plan, 1e-5)[0] == math.inf
    assert epsilon(ReleasePlan(()), 1e-5) == (0.0, "none", None)
    assert epsilon(ReleasePlan((Release("activation", 0, None),)), 1e-5)[0] == 0.0
    with pytest.raises(ConfigError):
        epsilon(plan, 1e-5, "moments")
    with pytest.raises(ConfigError):
        Release("x", -1, 1.0)


def test_huge_epsilon_falls_back_to_rdp_without_blowing_up():
    plan = ReleasePlan((Release("activation", 60, 0.002),))
    eps, used, _ = epsilon(plan, 1e-5)
    assert used == "rdp" and eps > 1e5


@pytest.mark.parametrize("n,b,batches", [(300, 4, 60), (300, 4, 75), (300, 4, 76), (10, 3, 9), (7, 7, 1), (5, 8, 3)])
def test_max_appearances_matches_the_real_iterator(n, b, batches):
    """Count the appearances of every record in the batches BatchIterator really draws."""
    it = BatchIterator([{"input_ids": [i + 1]} for i in range(n)], b, seed=3)
    counts = [0] * n
    for _ in range(batches):
        for i in it.next_indices():
            counts[i] += 1
    assert max(counts) == max_appearances(n, b, batches)


def test_release_multipliers():
    rec = NoiseConfig("gaussian", clip=2.0, noise_multiplier=3.0)
    assert release_multipliers(rec) == (pytest.approx(1.5), None)  # σ = 6, Δ = 2C = 4
    tok = NoiseConfig("gaussian", clip=1.0, noise_multiplier=4.0, clip_unit="token")
    assert release_multipliers(tok, max_tokens=16)[0] == pytest.approx(4.0 / (2 * 4))  # Δ = 2C sqrt(L)
    with pytest.raises(ConfigError):
        release_multipliers(tok)
    cal = NoiseConfig("gaussian", clip=1.0, epsilon=1.0, delta=1e-5)
    assert release_multipliers(cal)[0] == pytest.approx(3.7306, abs=1e-3)
    g = NoiseConfig("gaussian", clip=1.0, noise_multiplier=1.0, grad_clip=0.5, grad_noise_multiplier=6.0)
    assert release_multipliers(g)[1] == pytest.approx(3.0)
    assert release_multipliers(NoiseConfig("gaussian", scale=1.0)) == (None, None)  # no clip: no bound


def test_plan_counts_every_release_of_the_run():
    cfg = NoiseConfig("gaussian", clip=1.0, noise_multiplier=5.0, grad_clip=1.0, grad_noise_multiplier=5.0)
    # 120 steps x 4 over 300 records: 2 epochs touched (some records twice)
    online = plan_run(cfg, design="online", steps=120, batch_size=4, n_records=300)
    assert [(r.name, r.count) for r in online.releases] == [("activation", 2), ("gradient", 2)]
    gradfree = plan_run(cfg, design="gradfree", steps=120, batch_size=4, n_records=300)
    assert [(r.name, r.count) for r in gradfree.releases] == [("activation", 2)]
    cached = plan_run(cfg, design="gradfree", steps=120, batch_size=4, n_records=300, cached=True)
    assert [(r.name, r.count) for r in cached.releases] == [("activation", 1)]
    accum = plan_run(cfg, design="gradfree", steps=120, batch_size=4, n_records=300, grad_accum=3)
    assert accum.releases[0].count == 5  # 360 batches over 75 per epoch
    evals = plan_run(cfg, design="gradfree", steps=10, batch_size=4, n_records=300, eval_passes=2)
    assert evals.releases[0].count == 3
    assert plan_run(cfg, design="offline", steps=10, batch_size=4, n_records=300).releases == ()
    # more releases: more ε; Online with its gradients: more than Gradfree
    e = {k: account(cfg, p).epsilon for k, p in [("on", online), ("gf", gradfree), ("c", cached)]}
    assert e["c"] < e["gf"] < e["on"]
    mc = plan_eval(cfg, passes=2, copies=4)
    assert mc.releases[0].count == 8 and mc.population == "eval"


def test_online_without_gradient_noise_has_no_bound():
    cfg = NoiseConfig("gaussian", clip=1.0, noise_multiplier=5.0)
    acc = account(cfg, plan_run(cfg, design="online", steps=10, batch_size=4, n_records=300))
    assert acc.epsilon == math.inf and not acc.finite
    assert acc.to_dict()["epsilon"] == "inf"
    gf = account(cfg, plan_run(cfg, design="gradfree", steps=10, batch_size=4, n_records=300))
    assert gf.finite


def test_no_noise_and_uncalibrated_noise_have_no_bound():
    for cfg in (NoiseConfig(), NoiseConfig("gaussian", scale=2.0)):
        assert account(cfg, plan_run(cfg, design="gradfree", steps=5, batch_size=2, n_records=10)).epsilon == math.inf


def test_laplace_and_dx_compose_linearly():
    lap = NoiseConfig("laplace", clip=1.0, epsilon=0.5)
    acc = account(lap, plan_run(lap, design="gradfree", steps=30, batch_size=4, n_records=40))
    assert acc.epsilon == pytest.approx(0.5 * 3) and acc.accountant == "basic composition"
    dx = NoiseConfig("dx", epsilon=10.0)
    acc = account(dx, plan_run(dx, design="gradfree", steps=10, batch_size=4, n_records=40))
    assert acc.epsilon == pytest.approx(10.0)
    assert account(dx, plan_run(dx, design="online", steps=10, batch_size=4, n_records=40)).epsilon == math.inf


def test_describe_with_plan_is_json_and_names_the_run_epsilon():
    cfg = NoiseConfig("gaussian", clip=1.0, noise_multiplier=4.0, grad_clip=1.0, grad_noise_multiplier=4.0, seed=99)
    plan = plan_run(cfg, design="online", steps=60, batch_size=4, n_records=300)
    d = cfg.describe(plan)
    text = json.dumps(d)
    assert '"seed"' not in text
    run = d["run"]
    assert run["accountant"] == "pld" and run["library"] == "dp-accounting" and run["delta"] == 1e-5
    assert run["epsilon"] == pytest.approx(account(cfg, plan).epsilon, abs=1e-3)
    assert [r["name"] for r in run["releases"]] == ["activation", "gradient"]
    assert isinstance(account(cfg, plan), PrivacyAccount)


def test_privacy_block_for_the_handshake_and_summary():
    import msgpack  # the HELLO's header is msgpack (guardedp2p/wire/framing.py): the block must pack

    cfg = {
        "kind": "gaussian",
        "clip": 620.0,
        "noise_multiplier": 1.7,
        "grad_clip": 1.0,
        "grad_noise_multiplier": 1.7,
        "seed": 123456,
    }
    block = privacy_block(
        cfg,
        design="online",
        steps=60,
        batch_size=4,
        n_records=300,
        max_tokens=128,
        extra={"dcor_alpha": 0.0, "preset": "strong"},
    )
    assert block["preset"] == "strong" and block["dcor_alpha"] == 0.0
    assert block["noise"]["run"]["epsilon"] == pytest.approx(8.0, abs=0.05)
    assert "123456" not in json.dumps(block)
    assert msgpack.unpackb(msgpack.packb(block)) == block
    none = privacy_block(None, design="gradfree", steps=10, batch_size=4, n_records=40)
    assert none["noise"]["run"]["epsilon"] == "inf"
