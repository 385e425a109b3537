"""Distance correlation: agreement with the `dcor` package and the pitfalls listed in guardedp2p/privacy/dcor.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guardedp2p.privacy.dcor import dcor_leakage, dcor_penalty, distance_correlation, pairwise_distances

dcor = pytest.importorskip("dcor")


def _f(t) -> float:
    return float(t.detach()) if isinstance(t, torch.Tensor) else float(t)


def naive_dcor_sqr(x: np.ndarray, z: np.ndarray) -> float:
    """O(n²) double loop straight from the definition (V-statistic)."""
    n = len(x)
    a = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(n)] for i in range(n)])
    b = np.array([[np.linalg.norm(z[i] - z[j]) for j in range(n)] for i in range(n)])
    A = a - a.mean(0, keepdims=True) - a.mean(1, keepdims=True) + a.mean()
    B = b - b.mean(0, keepdims=True) - b.mean(1, keepdims=True) + b.mean()
    den = np.sqrt((A * A).mean() * (B * B).mean())
    return float((A * B).mean() / den) if den > 0 else 0.0


@pytest.mark.parametrize("n,p,q", [(5, 1, 1), (10, 3, 2), (50, 20, 5), (128, 64, 96)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_dcor_package(n, p, q, dtype):
    g = torch.Generator().manual_seed(n * 1000 + p)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    z = torch.randn(n, q, generator=g, dtype=torch.float64) + torch.tanh(x[:, :1]) * 0.7
    xn, zn = x.numpy(), z.numpy()
    v = distance_correlation(x.to(dtype), z.to(dtype))
    u = distance_correlation(x.to(dtype), z.to(dtype), bias_corrected=True)
    assert abs(float(v) - dcor.distance_correlation_sqr(xn, zn)) < 1e-6
    assert abs(float(u) - dcor.u_distance_correlation_sqr(xn, zn)) < 1e-6
    d = distance_correlation(x.to(dtype), z.to(dtype), squared=False)
    assert abs(float(d) - dcor.distance_correlation(xn, zn)) < 1e-6


def test_matches_naive_double_loop():
    rng = np.random.default_rng(0)
    x, z = rng.normal(size=(17, 4)), rng.normal(size=(17, 3))
    z[:, 0] += x[:, 0] ** 2
    assert abs(float(distance_correlation(torch.tensor(x), torch.tensor(z))) - naive_dcor_sqr(x, z)) < 1e-10


def test_invariant_to_similarity_transform():
    """Z = c X Q + t with Q orthogonal -> dCor = 1 (V and U)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 8, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    z = 0.37 * x @ q + torch.randn(1, 8, generator=g, dtype=torch.float64)
    assert float(distance_correlation(x, z)) == pytest.approx(1.0, abs=1e-9)
    assert float(distance_correlation(x, z, bias_corrected=True)) == pytest.approx(1.0, abs=1e-9)
    # fp32 too
    assert float(distance_correlation(x.float(), z.float())) == pytest.approx(1.0, abs=1e-5)
    # and scaling h1 down does not lower it
    assert float(distance_correlation(x, 1e-3 * z)) == pytest.approx(1.0, abs=1e-9)


def test_independent_u_near_zero_v_biased():
    """Pitfall 4: the V-statistic is biased upwards in high dimension; the U-statistic is about 0."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 1024, generator=g)
    z = torch.randn(256, 1024, generator=g)
    u = float(distance_correlation(x, z, bias_corrected=True))
    v = float(distance_correlation(x, z))
    assert abs(u) < 0.02
    assert v > 0.8


def test_euclidean_not_squared_sees_nonlinear_dependence():
    """Pitfall 2: x ~ N(0,1), z = x², n = 500: dCor² ≈ 0.30 with Euclidean distances (≈ 0.01 with squared)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 1, generator=g, dtype=torch.float64)
    v = float(distance_correlation(x, x**2))
    assert 0.2 < v < 0.4


def test_n2_is_degenerate():
    """Pitfall 3: n = 2 gives dCor² = 1 for any data, with zero gradient."""
    g = torch.Generator().manual_seed(4)
    for _ in range(5):
        x = torch.randn(2, 6, generator=g, dtype=torch.float64)
        z = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
        v = distance_correlation(x, z)
        assert float(v.detach()) == pytest.approx(1.0, abs=1e-12)
        (gz,) = torch.autograd.grad(v, z)
        assert float(gz.abs().max()) < 1e-9


def test_duplicate_rows_finite_gradient():
    """Pitfall 5: repeated rows (repeated tokens) must not give NaN/inf gradients."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(6, 16, generator=g)
    x = torch.cat([base, base[:3], base[:1]])  # duplicate rows in X
    z = torch.cat([base @ torch.randn(16, 8, generator=g)] * 1)
    z = torch.cat([z, z[:3], z[:1]]).clone().requires_grad_(True)  # and in Z
    for bc in (False, True):
        v = distance_correlation(x, z, bias_corrected=bc)
        (gz,) = torch.autograd.grad(v, z)
        assert torch.isfinite(v) and torch.isfinite(gz).all()
    # all rows identical: value 0 (no spread), gradient finite
    zc = torch.ones(5, 4, requires_grad=True)
    v = distance_correlation(torch.randn(5, 3), zc)
    (gz,) = torch.autograd.grad(v, zc)
    assert torch.isfinite(gz).all()


def test_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(9, 4, generator=g, dtype=torch.float64)
    z = (x[:, :3] ** 2 + 0.3 * torch.randn(9, 3, generator=g, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda zz: distance_correlation(x, zz), (z,))
    assert torch.autograd.gradcheck(lambda zz: distance_correlation(x, zz, bias_corrected=True), (z,))


def test_half_precision_inputs_computed_in_fp32():
    """Pitfall 6: bf16/fp16 inputs are promoted, the result equals the fp32 computation on the same values."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 16, generator=g).bfloat16()
    z = torch.randn(40, 16, generator=g).bfloat16()
    v = distance_correlation(x, z)
    assert v.dtype == torch.float32
    assert float(v) == pytest.approx(float(distance_correlation(x.float(), z.float())), abs=1e-7)


def test_pairwise_distances_zero_diagonal():
    x = torch.randn(7, 5)
    d = pairwise_distances(x)
    assert torch.equal(torch.diagonal(d), torch.zeros(7))
    assert torch.allclose(d, torch.cdist(x, x), atol=1e-4)


# --------------------------------------------------------------------------------------------- penalty modes


def _batch(b=3, length=12, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(b, length, d, generator=g)
    h1 = torch.tanh(embeds @ torch.randn(d, d, generator=g)) + 0.1 * torch.randn(b, length, d, generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, 9:] = 0
    if b > 1:
        mask[1, 5:] = 0
    return embeds, h1.requires_grad_(True), mask


def test_token_mode_is_mean_of_per_sequence_dcor_over_valid_tokens():
    embeds, h1, mask = _batch()
    pen = dcor_penalty(embeds, h1, mask, mode="token")
    ref = []
    for b in range(3):
        keep = mask[b].bool()
        ref.append(_f(distance_correlation(embeds[b][keep], h1[b][keep]).detach()))
    assert _f(pen) == pytest.approx(sum(ref) / 3, abs=1e-6)
    # pads do not matter, whatever their values
    h1b = h1.detach().clone()
    h1b[0, 9:] = 1e3
    embeds2 = embeds.clone()
    embeds2[1, 5:] = -7
    assert _f(dcor_penalty(embeds2, h1b, mask)) == pytest.approx(_f(pen), abs=1e-6)


def test_token_mode_batch_of_one_and_short_sequences():
    embeds, h1, mask = _batch(b=1)
    assert 0 < _f(dcor_penalty(embeds, h1, mask)) <= 1
    # sequences with < 3 valid tokens are skipped (n = 2 is degenerate), not counted as 1
    embeds, h1, mask = _batch(b=2)
    mask[1, 2:] = 0
    pen = dcor_penalty(embeds, h1, mask)
    keep = mask[0].bool()
    assert _f(pen) == pytest.approx(_f(distance_correlation(embeds[0][keep], h1[0][keep])), abs=1e-6)
    mask[0, 2:] = 0
    zero = dcor_penalty(embeds, h1, mask)
    assert _f(zero) == 0.0 and zero.requires_grad


def test_penalty_detaches_embeds_and_reaches_h1():
    embeds, h1, mask = _batch()
    embeds = embeds.clone().requires_grad_(True)
    pen = dcor_penalty(embeds, h1, mask)
    pen.backward()
    assert embeds.grad is None
    assert h1.grad is not None and torch.isfinite(h1.grad).all() and h1.grad.abs().sum() > 0
    assert h1.grad[0, 9:].abs().sum() == 0  # pads get no gradient


def test_batch_mode_pools_sequences():
    embeds, h1, mask = _batch(b=6)
    pen = dcor_penalty(embeds, h1, mask, mode="batch")
    m = mask.unsqueeze(-1).float()
    px = (embeds * m).sum(1) / m.sum(1)
    pz = (h1 * m).sum(1) / m.sum(1)
    assert _f(pen) == pytest.approx(_f(distance_correlation(px, pz)), abs=1e-6)
    pen.backward()
    assert torch.isfinite(h1.grad).all()


def test_batch_mode_small_batch_warns_and_returns_zero():
    embeds, h1, mask = _batch(b=2)
    with pytest.warns(UserWarning, match="at least 3"):
        import guardedp2p.privacy.dcor as mod

        mod._warned_small_batch = False
        pen = dcor_penalty(embeds, h1, mask, mode="batch")
    assert _f(pen) == 0.0


def test_penalty_rejects_bad_inputs():
    embeds, h1, mask = _batch()
    with pytest.raises(ValueError, match="mode"):
        dcor_penalty(embeds, h1, mask, mode="sample")
    with pytest.raises(ValueError):
        dcor_penalty(embeds[:, :5], h1, mask)
    with pytest.raises(ValueError):
        dcor_penalty(embeds, h1, mask[:, :5])


def test_leakage_uses_u_statistic():
    g = torch.Generator().manual_seed(8)
    embeds = torch.randn(4, 200, 256, generator=g)
    indep = torch.randn(4, 200, 256, generator=g)
    assert abs(dcor_leakage(embeds, indep)) < 0.03
    assert dcor_penalty(embeds, indep) > 0.5  # the V-statistic penalty is far from 0 here
    assert dcor_leakage(embeds, 2 * embeds + 1) == pytest.approx(1.0, abs=1e-4)
    assert np.isnan(dcor_leakage(embeds[:, :3], indep[:, :3]))
    assert np.isnan(dcor_leakage(embeds[:3], indep[:3], mode="batch"))
    assert abs(dcor_leakage(embeds.repeat(3, 1, 1), indep.repeat(3, 1, 1), mode="batch")) < 1.0


def test_batched_api_equals_loop():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 20, 5, generator=g, dtype=torch.float64)
    z = torch.randn(3, 20, 4, generator=g, dtype=torch.float64) + x[..., :1]
    for bc in (False, True):
        batched = distance_correlation(x, z, bias_corrected=bc)
        loop = torch.stack([distance_correlation(x[i], z[i], bias_corrected=bc) for i in range(3)])
        assert torch.allclose(batched, loop, atol=1e-12)
