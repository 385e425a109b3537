"""Noise defences applied by the client before anything leaves it.

Two families (the noise defences of the split-learning attacks literature, e.g. BiSR, Chen et al., CCS'24,
arXiv 2409.00960; what they buy is measured in SECURITY.md):

* **Activation noise** (:func:`add_activation_noise`): i.i.d. Gaussian or Laplace noise on the transmitted
  activation h (B, L, d). With only ``scale`` set it is a heuristic defence (no formal guarantee, like
  SplitLLM's "DP" mode, which in fact adds Laplace noise with a non-calibrated scale). With ``clip`` and
  ``epsilon`` (and ``delta`` for Gaussian) it is a *calibrated local mechanism*, per sample (index 0 of h) and
  per release:

  - Laplace: clip ``||h_b||_1 <= C``; sensitivity ``Δ₁ = 2C``; scale ``b = Δ₁ / ε`` -> ε-LDP.
  - Gaussian: clip ``||h_b||_2 <= C``; ``Δ₂ = 2C``; ``σ = Δ₂ sqrt(2 ln(1.25/δ)) / ε`` for ε < 1 (classical),
    else the analytic Gaussian mechanism (Balle & Wang 2018) -> (ε, δ)-LDP.

  Every release composes: E epochs over the same example cost E times the budget (Gradfree with caching sends
  each example once).

* **dχ-privacy on input embeddings** (:func:`dx_privacy_embeddings`, Feyisetan et al. 2020): each token's
  embedding is moved by ``η = r v`` (``r ~ Gamma(d, rate ε)``, ``v`` uniform on the unit sphere) and replaced by
  the embedding row of the *nearest* vocabulary token (Euclidean distance). Guarantee:
  ``Pr[M(w) = y] <= exp(ε ||φ(w) - φ(w')||) Pr[M(w') = y]``.

**Randomness.** Noise is only as private as its generator is secret. :meth:`NoiseConfig.make_generator` seeds
from the OS entropy pool unless a ``seed`` is set; a fixed seed is for reproducible experiments only, and
anybody who knows it can regenerate and subtract the noise. So :meth:`NoiseConfig.describe` (what goes into
the handshake and the run summary) never contains the seed, only whether one was set. Create the generator
once per run: re-seeding before every call would add the *same* noise to every batch, and the provider could
cancel it by differencing two activations.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

import torch

from guardedp2p.errors import ConfigError

__all__ = [
    "NOISE_KINDS",
    "NoiseConfig",
    "add_activation_noise",
    "clip_per_sample",
    "laplace_scale",
    "gaussian_scale",
    "classical_gaussian_sigma",
    "analytic_gaussian_sigma",
    "dx_privacy_token_ids",
    "dx_privacy_embeddings",
    "describe",
]

NOISE_KINDS = ("none", "gaussian", "laplace", "dx")


def _pos(name: str, v: float | None, *, allow_zero: bool = False) -> None:
    if v is None:
        return
    if (
        isinstance(v, bool)
        or not isinstance(v, (int, float))
        or not math.isfinite(v)
        or v < 0
        or (v == 0 and not allow_zero)
    ):
        raise ConfigError(
            f"noise {name} must be a {'non-negative' if allow_zero else 'positive'} finite number, got {v!r}"
        )


# ----------------------------------------------------------------------------------------------------- calibration


def laplace_scale(epsilon: float, clip: float) -> float:
    """Laplace scale ``b = 2C / ε`` for per-sample L1 clipping at ``C`` (replace-one sensitivity ``Δ₁ = 2C``)."""
    _pos("epsilon", epsilon)
    _pos("clip", clip)
    return 2.0 * clip / epsilon


def classical_gaussian_sigma(epsilon: float, delta: float, clip: float) -> float:
    """``σ = 2C sqrt(2 ln(1.25/δ)) / ε`` (Dwork & Roth, Thm A.1; valid only for ε < 1)."""
    _check_eps_delta(epsilon, delta, clip)
    if epsilon >= 1:
        raise ConfigError(f"the classical Gaussian mechanism needs epsilon < 1 (got {epsilon}); use the analytic one")
    return 2.0 * clip * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _log_phi(x: float) -> float:
    """log Φ(x), accurate in the far left tail (asymptotic series once erfc underflows)."""
    if x > -30:
        v = _phi(x)
        if v > 0:
            return math.log(v)
    # Φ(x) ~ φ(x)/|x| (1 - 1/x² + 3/x⁴) for x -> -inf
    return -0.5 * x * x - math.log(-x) - 0.5 * math.log(2 * math.pi) + math.log1p(-1 / x**2 + 3 / x**4)


def _analytic_delta(sigma: float, epsilon: float, sens: float) -> float:
    """δ achieved by Gaussian noise σ at (ε, Δ) (Balle & Wang 2018, Thm 8)."""
    a = sens / (2 * sigma)
    b = epsilon * sigma / sens
    second = math.exp(epsilon + _log_phi(-a - b))
    return _phi(a - b) - second


def analytic_gaussian_sigma(epsilon: float, delta: float, clip: float) -> float:
    """Smallest σ with (ε, δ)-DP for L2 sensitivity ``2C`` (analytic Gaussian mechanism, any ε > 0).

    Bisection on the exact privacy profile ``δ(σ) = Φ(Δ/2σ - εσ/Δ) - e^ε Φ(-Δ/2σ - εσ/Δ)``, which decreases in σ;
    the returned σ is the upper end of the final bracket, so the guarantee always holds.
    """
    _check_eps_delta(epsilon, delta, clip)
    sens = 2.0 * clip
    lo, hi = 1e-12 * sens, sens
    while _analytic_delta(hi, epsilon, sens) > delta:
        hi *= 2
        if hi > 1e12 * sens:  # pragma: no cover - unreachable for delta in (0, 1)
            raise ConfigError(f"could not calibrate Gaussian noise for epsilon={epsilon}, delta={delta}")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _analytic_delta(mid, epsilon, sens) > delta:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return hi


def gaussian_scale(epsilon: float, delta: float, clip: float, method: str = "auto") -> float:
    """Gaussian σ for per-sample L2 clipping at ``C``: classical for ε < 1, analytic otherwise (``method="auto"``)."""
    if method == "classical" or (method == "auto" and epsilon < 1):
        return classical_gaussian_sigma(epsilon, delta, clip)
    if method in ("analytic", "auto"):
        return analytic_gaussian_sigma(epsilon, delta, clip)
    raise ConfigError(f"unknown Gaussian calibration {method!r}: use auto, classical or analytic")


def _check_eps_delta(epsilon: float, delta: float | None, clip: float) -> None:
    _pos("epsilon", epsilon)
    _pos("clip", clip)
    if delta is None or isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ConfigError(f"noise delta must be in (0, 1), got {delta!r}")


# ----------------------------------------------------------------------------------------------------- config


@dataclass
class NoiseConfig:
    """What noise the client adds before sending.

    ``kind``: ``none`` | ``gaussian`` | ``laplace`` (activation noise) | ``dx`` (dχ-privacy on input embeddings).
    ``scale``: σ (Gaussian) or b (Laplace) of a fixed, uncalibrated noise. ``clip``: per-sample norm bound C
    (L2 for Gaussian, L1 for Laplace), applied whenever set. ``epsilon`` (+ ``delta`` for Gaussian): calibrate
    the scale from (ε, δ) and ``clip`` instead of giving ``scale``; for ``dx``, ε of the dχ mechanism.
    ``seed``: reproducible noise for experiments only (see the module docstring); never sent to the peer.
    """

    kind: str = "none"
    scale: float = 0.0
    clip: float | None = None
    epsilon: float | None = None
    delta: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in NOISE_KINDS:
            raise ConfigError(f"unknown noise kind {self.kind!r}: use one of {', '.join(NOISE_KINDS)}")
        _pos("scale", self.scale, allow_zero=True)
        _pos("clip", self.clip)
        _pos("epsilon", self.epsilon)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"noise seed must be an int, got {self.seed!r}")
        if self.kind in ("gaussian", "laplace") and self.epsilon is not None:
            if self.scale:
                raise ConfigError("give either a noise scale or epsilon (to calibrate it), not both")
            if self.clip is None:
                raise ConfigError(
                    f"calibrated {self.kind} noise needs a clip norm C (the per-sample sensitivity bound)"
                )
            if self.kind == "gaussian":
                _check_eps_delta(self.epsilon, self.delta, self.clip)
        if self.kind == "laplace" and self.delta is not None:
            raise ConfigError("Laplace noise is pure ε-DP: do not set delta")
        if self.kind == "dx" and self.epsilon is None:
            raise ConfigError("dx-privacy needs epsilon (noise density ∝ exp(-ε‖η‖))")

    @property
    def calibrated(self) -> bool:
        return self.kind in ("gaussian", "laplace") and self.epsilon is not None

    def _required(self, name: str, value: float | None) -> float:
        """A parameter ``__post_init__`` guarantees for this kind; re-checked because the dataclass is mutable."""
        if value is None:
            raise ConfigError(f"{self.kind} noise with epsilon={self.epsilon!r} needs {name}; set it")
        return value

    def effective_scale(self) -> float:
        """σ (Gaussian) or b (Laplace) actually used; 0 for none; for dx, E[‖η‖] = d/ε is dimension-dependent."""
        if self.kind not in ("gaussian", "laplace"):
            return 0.0
        if self.epsilon is None:
            return float(self.scale)
        clip = self._required("clip", self.clip)
        if self.kind == "gaussian":
            return gaussian_scale(self.epsilon, self._required("delta", self.delta), clip)
        return laplace_scale(self.epsilon, clip)

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator for this run: seeded with ``seed`` if set, else from the OS entropy pool."""
        g = torch.Generator(device=device)
        g.manual_seed(self.seed if self.seed is not None else secrets.randbits(63))
        return g

    def describe(self) -> dict[str, Any]:
        """Handshake / run-summary description. Contains no seed (knowing it would let anyone remove the noise)."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "none":
            out["guarantee"] = "none"
            return out
        out["seeded"] = self.seed is not None
        if self.kind == "dx":
            out.update(
                mechanism="dx-privacy (Feyisetan et al. 2020): eta = r*v, r ~ Gamma(d, rate eps), nearest token by L2",
                epsilon=float(self._required("epsilon", self.epsilon)),
                guarantee="metric dx-privacy: Pr[M(w)=y] <= exp(eps*||phi(w)-phi(w')||) Pr[M(w')=y], per token",
            )
            return out
        out["scale"] = self.effective_scale()
        out["clip"] = self.clip
        out["clip_norm"] = ("l2" if self.kind == "gaussian" else "l1") if self.clip is not None else None
        epsilon = self.epsilon if self.calibrated else None
        if epsilon is not None:
            out["epsilon"] = float(epsilon)
            if self.kind == "gaussian":
                out["delta"] = float(self._required("delta", self.delta))
                out["calibration"] = "classical" if epsilon < 1 else "analytic (Balle & Wang 2018)"
                out["guarantee"] = "(epsilon, delta)-LDP per sample per release; releases compose"
            else:
                out["calibration"] = "b = 2C/epsilon"
                out["guarantee"] = "epsilon-LDP per sample per release; releases compose"
        else:
            out["guarantee"] = "none (uncalibrated noise)"
        return out


def describe(cfg: NoiseConfig) -> dict[str, Any]:
    """Module-level alias of :meth:`NoiseConfig.describe`."""
    return cfg.describe()


# ----------------------------------------------------------------------------------------------------- mechanisms


def clip_per_sample(h: torch.Tensor, clip: float, norm: int = 2) -> torch.Tensor:
    """Scale each sample ``h[b]`` (all of its elements) so that its L``norm`` norm is at most ``clip``."""
    flat = h.reshape(h.shape[0], -1) if h.dim() > 0 else h.reshape(1, 1)
    n = torch.linalg.vector_norm(flat.float(), ord=norm, dim=1)
    factor = torch.clamp(clip / n.clamp_min(1e-30), max=1.0).to(h.dtype)
    return h * factor.view(-1, *([1] * (h.dim() - 1)))


def _gaussian(shape, generator, device) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


def _laplace(shape, generator, device) -> torch.Tensor:
    # difference of two Exp(1): 1 - U lies in (0, 1], so the logs are finite
    u1 = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    u2 = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return torch.log1p(-u2) - torch.log1p(-u1)


def add_activation_noise(h: torch.Tensor, cfg: NoiseConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Return ``h`` with the configured noise added (clipped first if ``cfg.clip`` is set).

    ``kind`` ``none`` and ``dx`` return ``h`` unchanged (dχ-privacy acts on the input embeddings, see
    :func:`dx_privacy_embeddings`). Differentiable w.r.t. ``h`` (the noise is an additive constant).
    ``generator`` must be on ``h``'s device; ``None`` uses torch's global RNG.
    """
    if cfg.kind in ("none", "dx"):
        return h
    if cfg.clip is not None:
        h = clip_per_sample(h, cfg.clip, norm=2 if cfg.kind == "gaussian" else 1)
    scale = cfg.effective_scale()
    if scale == 0:
        return h
    sample = _gaussian if cfg.kind == "gaussian" else _laplace
    noise = sample(h.shape, generator, h.device) * scale
    return (h.float() + noise).to(h.dtype)


# ----------------------------------------------------------------------------------------------------- dx-privacy


def _sphere(n: int, d: int, generator, device) -> torch.Tensor:
    v = torch.randn(n, d, generator=generator, device=device, dtype=torch.float32)
    return v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(1e-30)


def _gamma_int_shape(n: int, shape: int, rate: float, generator, device, chunk: int = 1 << 22) -> torch.Tensor:
    """Gamma(shape k integer, rate) as a sum of k Exp(rate) draws (exact; uses ``generator``)."""
    out = torch.empty(n, dtype=torch.float64, device=device)
    rows = max(1, chunk // max(shape, 1))
    for s in range(0, n, rows):
        e = min(n, s + rows)
        u = torch.rand(e - s, shape, generator=generator, device=device, dtype=torch.float64)
        out[s:e] = (-torch.log1p(-u)).sum(dim=1)
    return (out / rate).float()


@torch.no_grad()
def dx_privacy_token_ids(
    input_ids: torch.Tensor,
    embedding_weight: torch.Tensor,
    epsilon: float,
    generator: torch.Generator | None = None,
    *,
    chunk: int = 256,
) -> torch.Tensor:
    """Token ids after the dχ mechanism: ``argmin_w' ||φ(w) + η - φ(w')||₂`` per token (same shape as input_ids).

    Choices: Feyisetan et al.'s absolute ε (density ∝ exp(-ε‖η‖), so ``E[r] = d/ε``; SplitLLM's relative ε' is
    ``epsilon = ε' d``); a fresh ``r`` per token (SplitLLM shares one r per forward call); nearest token by
    **Euclidean** distance, which is what the dχ guarantee is stated for (SplitLLM's maximum dot product favours
    large-norm rows and voids the metric guarantee). The vocabulary search is chunked over tokens
    (``chunk`` x V distances at a time).
    """
    _pos("epsilon", epsilon)
    w = embedding_weight.detach()
    vsz, d = w.shape
    ids = input_ids.reshape(-1).to(device=w.device, dtype=torch.long)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vsz):
        raise ConfigError(f"token ids must be in [0, {vsz}) for this embedding table")
    wf = w.float()
    w_sq = (wf * wf).sum(dim=1)
    out = torch.empty_like(ids)
    n = ids.numel()
    if n == 0:
        return out.reshape(input_ids.shape)
    r = _gamma_int_shape(n, d, float(epsilon), generator, w.device)
    v = _sphere(n, d, generator, w.device)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        q = wf[ids[s:e]] + r[s:e, None] * v[s:e]
        # ||q - w'||² = ||q||² - 2 q·w' + ||w'||²; ||q||² is constant per row
        score = w_sq[None, :] - 2 * (q @ wf.T)
        out[s:e] = score.argmin(dim=1)
    return out.reshape(input_ids.shape).to(input_ids.device)


def dx_privacy_embeddings(
    input_ids: torch.Tensor,
    embedding_weight: torch.Tensor,
    epsilon: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Embedding rows of the dχ-perturbed tokens (``input_ids.shape + (d,)``).

    The output is a row lookup in ``embedding_weight``, so gradients reach only the substituted rows.
    """
    new_ids = dx_privacy_token_ids(input_ids, embedding_weight, epsilon, generator)
    return torch.nn.functional.embedding(new_ids.to(embedding_weight.device), embedding_weight)
