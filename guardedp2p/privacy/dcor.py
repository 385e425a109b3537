"""Distance correlation (Székely, Rizzo & Bakirov 2007): the NoPeek penalty and a leakage measurement.

``dCor(X, Z)`` is 0 iff X and Z are independent (population) and is invariant to translations, orthogonal maps
and global rescaling of either side, so a network cannot lower it by merely shrinking its activations.

Definitions (Székely, Rizzo & Bakirov 2007; the NoPeek penalty: Vepakomma et al., arXiv 2008.09161), for n paired rows:

* ``a_ij = ||x_i - x_j||_2`` -- Euclidean, **not squared**: squared distances turn the statistic into the RV
  coefficient / linear CKA, which sees only linear dependence.
* V-statistic (``bias_corrected=False``): double-centre ``a`` over its own rows and columns,
  ``dCov² = mean(A * B)``, ``dCor² = dCov²(X,Z) / sqrt(dVar²(X) dVar²(Z))`` (0 when the denominator is 0).
  It is biased upwards, strongly so when the dimension is large relative to n (independent Gaussian rows give
  ~0.97 at p = 4096, n = 512): fine as a *penalty*, wrong as a *measurement*.
* U-statistic (``bias_corrected=True``, Székely & Rizzo 2014, n >= 4): U-centring, unbiased ``dCov²_U``,
  ``dCor²_U = dCov²_U(X,Z) / sqrt(|dCov²_U(X,X) dCov²_U(Z,Z)|)``; about 0 for independent samples and may be
  negative. Use it to *report* leakage (:func:`dcor_leakage`).

**n = 2 is degenerate**: the V-centred matrix is ``[[-a/2, a/2], [a/2, -a/2]]`` for any data, so dCor² ≡ 1
with zero gradient (and n = 1 has no spread at all). The penalty therefore skips sequences (token mode) or
batches (batch mode) with fewer than 3 rows; with batch 2 use token mode.

Numerics: inputs are promoted to fp32 (fp64 stays fp64), never computed in fp16/bf16 even under autocast.
Distances use the Gram form on row-centred data (translation invariance; less cancellation), then
``sqrt(max(d², eps))`` so that duplicate rows (repeated tokens) have a finite gradient; the diagonal is set to
exactly 0.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["distance_correlation", "dcor_penalty", "dcor_leakage", "pairwise_distances"]

_TINY = 1e-30


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def pairwise_distances(x: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distance matrices of the rows of ``x`` (``(..., n, p)`` -> ``(..., n, n)``), zero diagonal.

    Rows where ``mask`` is 0 are excluded from the centring used for numerical stability and their distances are
    zeroed (callers must also exclude them from any mean).
    """
    if mask is None:
        xc = x - x.mean(dim=-2, keepdim=True)
    else:
        m = mask.to(x.dtype).unsqueeze(-1)
        cnt = m.sum(dim=-2, keepdim=True).clamp_min(1)
        xc = (x - (x * m).sum(dim=-2, keepdim=True) / cnt) * m
    sq = (xc * xc).sum(dim=-1)
    d2 = sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2 * (xc @ xc.transpose(-1, -2))
    d = torch.sqrt(torch.clamp(d2, min=eps))
    n = x.shape[-2]
    off = 1 - torch.eye(n, dtype=x.dtype, device=x.device)
    if mask is not None:
        mm = mask.to(x.dtype)
        off = off * mm.unsqueeze(-1) * mm.unsqueeze(-2)
    return d * off


def _v_center(a: torch.Tensor, mm: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Double-centre (V): ``A_ij = a_ij - mean_i. - mean_.j + mean_..`` over valid rows; masked entries -> 0."""
    nn_ = n.unsqueeze(-1)
    row = a.sum(dim=-1) / nn_  # a is symmetric: row means = column means
    grand = row.sum(dim=-1, keepdim=True) / nn_
    return (a - row.unsqueeze(-1) - row.unsqueeze(-2) + grand.unsqueeze(-1)) * mm


def _u_center(a: torch.Tensor, mm: torch.Tensor, n: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """U-centre (Székely & Rizzo 2014); diagonal and masked entries -> 0."""
    nn_ = n.unsqueeze(-1)
    row = a.sum(dim=-1)
    total = row.sum(dim=-1, keepdim=True)
    c = (
        a
        - row.unsqueeze(-1) / (nn_ - 2).unsqueeze(-1)
        - row.unsqueeze(-2) / (nn_ - 2).unsqueeze(-1)
        + (total / ((nn_ - 1) * (nn_ - 2))).unsqueeze(-1)
    )
    return c * mm * off


def _dcor_sqr(
    x: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None, bias_corrected: bool, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched dCor² over ``(..., n, p)`` / ``(..., n, q)``; returns (value, number of valid rows)."""
    wd = torch.promote_types(_work_dtype(x), _work_dtype(z))
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.to(wd)
        z = z.to(wd)
        n_rows = x.shape[-2]
        if mask is None:
            m = torch.ones(x.shape[:-1], dtype=wd, device=x.device)
        else:
            m = mask.to(device=x.device, dtype=wd)
        n = m.sum(dim=-1)
        mm = m.unsqueeze(-1) * m.unsqueeze(-2)
        a = pairwise_distances(x, m, eps)
        b = pairwise_distances(z, m, eps)
        if bias_corrected:
            off = 1 - torch.eye(n_rows, dtype=wd, device=x.device)
            ok = n >= 4
            nsafe = torch.where(ok, n, torch.full_like(n, 4.0))
            A = _u_center(a, mm, nsafe, off)
            B = _u_center(b, mm, nsafe, off)
            norm = (nsafe * (nsafe - 3)).unsqueeze(-1)
            cov = (A * B).sum(dim=(-1, -2)) / norm.squeeze(-1)
            vx = (A * A).sum(dim=(-1, -2)) / norm.squeeze(-1)
            vz = (B * B).sum(dim=(-1, -2)) / norm.squeeze(-1)
            den2 = (vx * vz).abs()
        else:
            ok = n >= 1
            nsafe = n.clamp_min(1)
            A = _v_center(a, mm, nsafe)
            B = _v_center(b, mm, nsafe)
            n2 = nsafe * nsafe
            cov = (A * B).sum(dim=(-1, -2)) / n2
            vx = (A * A).sum(dim=(-1, -2)) / n2
            vz = (B * B).sum(dim=(-1, -2)) / n2
            den2 = vx * vz
        pos = den2 > _TINY
        den = torch.sqrt(torch.where(pos, den2, torch.ones_like(den2)))
        val = torch.where(pos & ok, cov / den, torch.zeros_like(cov))
    return val, n


def distance_correlation(
    x: torch.Tensor,
    z: torch.Tensor,
    *,
    squared: bool = True,
    bias_corrected: bool = False,
    eps: float = 1e-12,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample distance correlation of paired rows ``x`` (n x p) and ``z`` (n x q); differentiable.

    ``squared=True`` returns dCor² (the usual penalty), else dCor = sqrt(max(dCor², 0)).
    ``bias_corrected=True`` returns the U-statistic dCor²_U (needs n >= 4; returns 0 below), for reporting.
    Leading batch dimensions are allowed (``(..., n, p)`` -> ``(...)``), with an optional 0/1 ``mask``
    ``(..., n)`` selecting the rows that take part (pad tokens are not rows).
    """
    if x.dim() < 2 or z.dim() < 2:
        raise ValueError(
            f"distance_correlation needs (n, p) and (n, q) inputs, got {tuple(x.shape)} and {tuple(z.shape)}"
        )
    if x.shape[:-1] != z.shape[:-1]:
        raise ValueError(f"x and z must have the same rows, got {tuple(x.shape)} and {tuple(z.shape)}")
    val, _ = _dcor_sqr(x, z, mask, bias_corrected, eps)
    if squared:
        return val
    return torch.sqrt(torch.clamp(val, min=eps))


def _valid_mask(attention_mask: torch.Tensor | None, shape: torch.Size, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(shape[:2], device=device)
    if attention_mask.shape != shape[:2]:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match activations {tuple(shape)}")
    return (attention_mask != 0).to(device)


def _pooled(t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    w = m.to(t.dtype).unsqueeze(-1)
    return (t * w).sum(dim=1) / w.sum(dim=1).clamp_min(1)


_warned_small_batch = False


def dcor_penalty(
    embeds: torch.Tensor,
    h1: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    mode: str = "token",
    *,
    eps: float = 1e-12,
) -> torch.Tensor:
    """NoPeek penalty R = dCor²(X, Z) with X = stop-gradient(embeds) (B, L, d) and Z = h1 (B, L, d').

    ``mode="token"`` (default): per sequence, rows = its valid (non-pad) tokens; R = mean over the sequences
    that have >= 3 valid tokens of their dCor² (V-statistic). Valid at batch size 1.
    ``mode="batch"``: rows = sequences, each represented by the mean of its valid tokens; needs B >= 3
    (returns a zero penalty with a warning otherwise, since n = 2 gives dCor² ≡ 1 with zero gradient).

    ``embeds`` is detached here: the optimiser must move h1, not the (frozen) embedding output.
    The result is a scalar tensor connected to ``h1``'s graph (0 if no sequence qualifies).
    """
    global _warned_small_batch
    if embeds.dim() != 3 or h1.dim() != 3 or embeds.shape[:2] != h1.shape[:2]:
        raise ValueError(
            f"embeds and h1 must be (B, L, d) with equal B, L; got {tuple(embeds.shape)} and {tuple(h1.shape)}"
        )
    x = embeds.detach()
    m = _valid_mask(attention_mask, h1.shape, h1.device)
    zero = h1.sum() * 0.0
    if mode == "token":
        val, n = _dcor_sqr(x, h1, m, False, eps)
        use = n >= 3
        if not bool(use.any()):
            return zero.float()
        return (val * use.to(val.dtype)).sum() / use.sum().to(val.dtype)
    if mode == "batch":
        if h1.shape[0] < 3:
            if not _warned_small_batch:
                warnings.warn(
                    "dcor_penalty(mode='batch') needs at least 3 sequences (n = 2 gives dCor² = 1 with zero "
                    "gradient); returning 0. Use mode='token' for small batches.",
                    stacklevel=2,
                )
                _warned_small_batch = True
            return zero.float()
        val, _ = _dcor_sqr(_pooled(x, m), _pooled(h1, m), None, False, eps)
        return val
    raise ValueError(f"unknown dcor mode {mode!r}: use 'token' or 'batch'")


@torch.no_grad()
def dcor_leakage(
    embeds: torch.Tensor, h1: torch.Tensor, attention_mask: torch.Tensor | None = None, mode: str = "token"
) -> float:
    """Bias-corrected leakage estimate: mean dCor²_U between embeddings and h1 (about 0 when independent).

    Token mode averages over sequences with >= 4 valid tokens; batch mode pools each sequence (needs B >= 4).
    Returns NaN when no sequence (or batch) is large enough.
    """
    x = embeds.detach()
    m = _valid_mask(attention_mask, h1.shape, h1.device)
    if mode == "token":
        val, n = _dcor_sqr(x, h1.detach(), m, True, 1e-12)
        use = n >= 4
        if not bool(use.any()):
            return float("nan")
        return float(val[use].mean())
    if mode == "batch":
        if h1.shape[0] < 4:
            return float("nan")
        val, _ = _dcor_sqr(_pooled(x, m), _pooled(h1.detach(), m), None, True, 1e-12)
        return float(val)
    raise ValueError(f"unknown dcor mode {mode!r}: use 'token' or 'batch'")
