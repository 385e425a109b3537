"""Noise mechanisms: correct distributions, calibration, clipping, dχ-privacy, config validation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from guardedp2p.errors import ConfigError
from guardedp2p.privacy.noise import (
    NoiseConfig,
    add_activation_noise,
    analytic_gaussian_sigma,
    classical_gaussian_sigma,
    clip_per_sample,
    describe,
    dx_privacy_embeddings,
    dx_privacy_token_ids,
    gaussian_scale,
    laplace_scale,
)


def excess_kurtosis(x: torch.Tensor) -> float:
    x = x.double().reshape(-1)
    c = x - x.mean()
    return float((c**4).mean() / (c**2).mean() ** 2 - 3)


def added(cfg: NoiseConfig, shape=(8, 128, 576), seed=0) -> torch.Tensor:
    h = torch.zeros(shape)
    return add_activation_noise(h, cfg, torch.Generator().manual_seed(seed)) - h


# --------------------------------------------------------------------------------------------- distributions


def test_gaussian_is_gaussian():
    n = added(NoiseConfig("gaussian", scale=0.5))
    assert abs(excess_kurtosis(n)) < 0.05
    assert float(n.std()) == pytest.approx(0.5, rel=0.01)
    assert abs(float(n.mean())) < 0.005


def test_laplace_is_laplace():
    n = added(NoiseConfig("laplace", scale=0.2))
    assert excess_kurtosis(n) == pytest.approx(3.0, abs=0.15)
    # Laplace(0, b): std = b sqrt(2), E|X| = b
    assert float(n.abs().mean()) == pytest.approx(0.2, rel=0.01)
    assert float(n.std()) == pytest.approx(0.2 * math.sqrt(2), rel=0.01)
    assert torch.isfinite(n).all()


def test_none_and_dx_leave_activation_alone():
    h = torch.randn(2, 3, 4)
    assert add_activation_noise(h, NoiseConfig()) is h
    assert add_activation_noise(h, NoiseConfig("dx", epsilon=10.0)) is h
    assert torch.equal(add_activation_noise(h, NoiseConfig("gaussian", scale=0.0)), h)


def test_generator_reproducible_and_fresh_per_call():
    cfg = NoiseConfig("gaussian", scale=1.0)
    a = added(cfg, (4, 8), seed=3)
    b = added(cfg, (4, 8), seed=3)
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(3)
    h = torch.zeros(4, 8)
    first = add_activation_noise(h, cfg, g)
    second = add_activation_noise(h, cfg, g)
    assert not torch.equal(first, second)  # one generator per run: fresh noise every call


def test_make_generator_seeded_or_random():
    assert torch.equal(
        torch.randn(5, generator=NoiseConfig("gaussian", scale=1, seed=7).make_generator()),
        torch.randn(5, generator=NoiseConfig("gaussian", scale=1, seed=7).make_generator()),
    )
    cfg = NoiseConfig("gaussian", scale=1)
    assert not torch.equal(
        torch.randn(5, generator=cfg.make_generator()), torch.randn(5, generator=cfg.make_generator())
    )


def test_dtype_device_and_gradient_preserved():
    h = torch.randn(2, 5, 8, dtype=torch.bfloat16, requires_grad=True)
    out = add_activation_noise(h, NoiseConfig("laplace", scale=0.1, clip=3.0), torch.Generator().manual_seed(0))
    assert out.dtype == torch.bfloat16 and out.shape == h.shape
    out.float().sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


# --------------------------------------------------------------------------------------------- clipping / calibration


def test_clip_per_sample_norms():
    h = torch.randn(6, 10, 32) * torch.tensor([0.01, 0.1, 1, 10, 100, 1000]).view(6, 1, 1)
    c2 = clip_per_sample(h, 5.0, norm=2)
    n2 = torch.linalg.vector_norm(c2.reshape(6, -1), dim=1)
    assert (n2 <= 5.0 * (1 + 1e-5)).all()
    small = torch.linalg.vector_norm(h.reshape(6, -1), dim=1) <= 5.0
    assert torch.equal(c2[small], h[small])  # within the bound: untouched
    c1 = clip_per_sample(h, 5.0, norm=1)
    assert (torch.linalg.vector_norm(c1.reshape(6, -1), ord=1, dim=1) <= 5.0 * (1 + 1e-5)).all()
    # direction preserved
    cos = torch.nn.functional.cosine_similarity(c2.reshape(6, -1), h.reshape(6, -1), dim=1)
    assert torch.allclose(cos, torch.ones(6), atol=1e-5)


def test_laplace_calibration():
    assert laplace_scale(2.0, 3.0) == pytest.approx(3.0)  # 2C / eps
    cfg = NoiseConfig("laplace", clip=3.0, epsilon=0.5)
    assert cfg.effective_scale() == pytest.approx(12.0)
    n = added(cfg, (4, 64, 64))
    assert float(n.abs().mean()) == pytest.approx(12.0, rel=0.02)


def test_gaussian_calibration_classical_and_analytic():
    from dp_accounting import get_epsilon_gaussian

    # classical: 2C sqrt(2 ln(1.25/δ)) / ε (reference only)
    assert classical_gaussian_sigma(0.5, 1e-5, 1.0) == pytest.approx(2 * math.sqrt(2 * math.log(1.25e5)) / 0.5)
    assert gaussian_scale(0.5, 1e-5, 1.0, method="classical") == classical_gaussian_sigma(0.5, 1e-5, 1.0)
    # analytic (Balle & Wang 2018, via dp-accounting): ε = 1, δ = 1e-5, Δ = 1 -> σ ≈ 3.73; auto is analytic
    assert analytic_gaussian_sigma(1.0, 1e-5, 0.5) == pytest.approx(3.7306, abs=1e-3)
    assert gaussian_scale(1.0, 1e-5, 0.5) == analytic_gaussian_sigma(1.0, 1e-5, 0.5)
    assert gaussian_scale(0.5, 1e-5, 1.0) == analytic_gaussian_sigma(0.5, 1e-5, 1.0)
    # analytic is tighter than classical where both apply, and meets exactly the asked ε at sensitivity 2C
    for eps in (0.1, 0.5, 0.9):
        s = analytic_gaussian_sigma(eps, 1e-6, 2.0)
        assert s < classical_gaussian_sigma(eps, 1e-6, 2.0)
        assert get_epsilon_gaussian(s / 4.0, 1e-6) == pytest.approx(eps, rel=1e-6)
    # large ε does not overflow
    assert 0 < analytic_gaussian_sigma(50.0, 1e-9, 1.0) < 1.0
    with pytest.raises(ConfigError):
        classical_gaussian_sigma(2.0, 1e-5, 1.0)
    with pytest.raises(ConfigError):
        gaussian_scale(1.0, 1e-5, 1.0, method="magic")


def test_calibrated_gaussian_noise_applied():
    cfg = NoiseConfig("gaussian", clip=1.0, epsilon=2.0, delta=1e-5)
    sigma = cfg.effective_scale()
    assert sigma == pytest.approx(analytic_gaussian_sigma(2.0, 1e-5, 1.0))
    h = torch.randn(4, 32, 64) * 10
    out = add_activation_noise(h, cfg, torch.Generator().manual_seed(1))
    resid = out - clip_per_sample(h, 1.0, 2)
    assert float(resid.std()) == pytest.approx(sigma, rel=0.02)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "uniform"},
        {"kind": "gaussian", "scale": -1.0},
        {"kind": "gaussian", "scale": float("nan")},
        {"kind": "gaussian", "epsilon": 1.0, "delta": 1e-5},  # no clip
        {"kind": "gaussian", "epsilon": 1.0, "clip": 1.0},  # no delta
        {"kind": "gaussian", "epsilon": 1.0, "clip": 1.0, "delta": 1.5},
        {"kind": "gaussian", "epsilon": 1.0, "clip": 1.0, "delta": 1e-5, "scale": 0.3},  # both
        {"kind": "laplace", "epsilon": 0.0, "clip": 1.0},
        {"kind": "laplace", "epsilon": 1.0, "clip": 1.0, "delta": 1e-5},
        {"kind": "laplace", "clip": -2.0, "scale": 1.0},
        {"kind": "dx"},
        {"kind": "gaussian", "scale": 1.0, "seed": "abc"},
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(ConfigError):
        NoiseConfig(**kwargs)


def test_describe_is_json_and_never_contains_seed():
    cfgs = [
        NoiseConfig(),
        NoiseConfig("gaussian", scale=0.1, seed=1234567),
        NoiseConfig("gaussian", clip=1.0, epsilon=0.5, delta=1e-5, seed=1234567),
        NoiseConfig("laplace", clip=2.0, epsilon=1.0, seed=1234567),
        NoiseConfig("dx", epsilon=20.0, seed=1234567),
    ]
    for cfg in cfgs:
        d = describe(cfg)
        assert d == cfg.describe()
        text = json.dumps(d)
        assert "1234567" not in text and 'seed"' not in text
        assert d["kind"] == cfg.kind and "guarantee" in d
    assert cfgs[1].describe()["guarantee"].startswith("none")
    assert "LDP" in cfgs[2].describe()["guarantee"] and "analytic" in cfgs[2].describe()["calibration"]
    assert cfgs[3].describe()["scale"] == pytest.approx(4.0)
    assert cfgs[4].describe()["seeded"] is True


# --------------------------------------------------------------------------------------------- dχ-privacy


def _table(v=50, d=8, seed=0):
    return torch.randn(v, d, generator=torch.Generator().manual_seed(seed))


def test_dx_large_epsilon_is_identity_small_epsilon_mixes():
    w = _table()
    ids = torch.arange(50).view(5, 10)
    same = dx_privacy_token_ids(ids, w, 1e6, torch.Generator().manual_seed(0))
    assert torch.equal(same, ids)
    mixed = dx_privacy_token_ids(ids.repeat(20, 1), w, 0.5, torch.Generator().manual_seed(0))
    assert float((mixed != ids.repeat(20, 1)).float().mean()) > 0.8


def test_dx_substitution_rate_decreases_with_epsilon():
    w = _table(200, 16)
    ids = torch.randint(0, 200, (4000,), generator=torch.Generator().manual_seed(1))
    rates = []
    for eps in (1.0, 2.0, 4.0, 8.0):
        out = dx_privacy_token_ids(ids, w, eps, torch.Generator().manual_seed(2))
        rates.append(float((out != ids).float().mean()))
    assert rates[0] > rates[1] > rates[2] > rates[3]


def test_dx_noise_radius_is_gamma_d_over_eps():
    """With a tiny vocabulary spread, the chosen token is the nearest to φ(w)+η; check r ~ Gamma(d, ε) directly."""
    from guardedp2p.privacy.noise import _gamma_int_shape, _sphere

    g = torch.Generator().manual_seed(3)
    r = _gamma_int_shape(20000, 16, 4.0, g, torch.device("cpu"))
    assert float(r.mean()) == pytest.approx(16 / 4.0, rel=0.02)  # shape/rate
    assert float(r.var()) == pytest.approx(16 / 16.0, rel=0.05)  # shape/rate²
    v = _sphere(20000, 16, g, torch.device("cpu"))
    assert torch.allclose(v.norm(dim=1), torch.ones(20000), atol=1e-5)
    assert float(v.mean(0).abs().max()) < 0.02


def test_dx_nearest_is_euclidean_not_dot_product():
    # token 1 has a huge norm: max dot product would always pick it; Euclidean keeps token 0
    w = torch.tensor([[1.0, 0.0], [100.0, 0.0], [-1.0, 0.0]])
    ids = torch.zeros(200, dtype=torch.long)
    out = dx_privacy_token_ids(ids, w, 1e4, torch.Generator().manual_seed(0))
    assert torch.equal(out, ids)


def test_dx_embeddings_rows_and_gradient():
    w = _table(30, 6).requires_grad_(True)
    ids = torch.randint(0, 30, (2, 7))
    e = dx_privacy_embeddings(ids, w, 3.0, torch.Generator().manual_seed(0))
    new = dx_privacy_token_ids(ids, w, 3.0, torch.Generator().manual_seed(0))
    assert e.shape == (2, 7, 6)
    assert torch.equal(e.detach(), w.detach()[new])
    e.sum().backward()
    touched = torch.zeros(30, dtype=torch.bool)
    touched[new.reshape(-1)] = True
    assert (w.grad[~touched] == 0).all() and (w.grad[touched] != 0).any()


def test_dx_rejects_bad_ids_and_epsilon():
    w = _table(10, 4)
    with pytest.raises(ConfigError):
        dx_privacy_token_ids(torch.tensor([10]), w, 1.0)
    with pytest.raises(ConfigError):
        dx_privacy_token_ids(torch.tensor([1]), w, 0.0)
    assert dx_privacy_token_ids(torch.zeros(0, dtype=torch.long), w, 1.0).numel() == 0
