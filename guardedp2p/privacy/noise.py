"""Noise defences applied by the client before anything leaves it.

Three families (the noise defences of the split-learning attacks literature, e.g. BiSR, Chen et al., CCS'24,
arXiv 2409.00960; what they buy against an attacker who knows them is in the user guide, "Privacy settings"):

* **Activation noise** (:func:`add_activation_noise`): i.i.d. Gaussian or Laplace noise on the transmitted
  activation h (B, L, d). With only ``scale`` set it is a heuristic defence (no formal guarantee, like
  SplitLLM's "DP" mode, which in fact adds Laplace noise with a non-calibrated scale). With ``clip`` it becomes
  a *local mechanism with a bound*: each record's activation (``clip_unit="record"``: all of ``h[b]``, as in
  DP-Forward, Du et al., CCS'23) or each token's (``clip_unit="token"``: every ``h[b, t]``) is scaled to norm at
  most C, then noise is added, and two records' released tensors differ by at most the sensitivity Δ:

  - record unit: Δ₂ = 2C (replace one record by any other); token unit: Δ₂ = 2C·sqrt(L) for L positions,
    because after the first block every position depends on every earlier token of the record;
  - Gaussian: ``noise_multiplier`` z gives σ = z·C (the DP-SGD parametrisation), and the ε over the *whole run*
    (every release of a record: each epoch, each evaluation pass, and in Online each gradient sent up) is
    composed by an established accountant (:mod:`guardedp2p.privacy.accounting`, Google's ``dp-accounting``).
    ``epsilon`` (+ ``delta``) instead calibrates σ for *one* release (the analytic Gaussian mechanism of
    Balle & Wang 2018, via ``dp_accounting.get_sigma_gaussian``);
  - Laplace: L1 clipping, Δ₁ = 2C, ``b = Δ₁ / ε`` -> ε-LDP per release.

* **Gradient noise** (:func:`add_gradient_noise`, Online only): the same clipped Gaussian on the one other
  tensor the client sends up, dL/dh2, per record (``grad_clip``, ``grad_noise_multiplier``). Without it an
  Online run has no formal bound at all, whatever the activation noise: the gradient leaves in the clear.

* **dχ-privacy on input embeddings** (:func:`dx_privacy_embeddings`, :func:`install_input_noise`; Feyisetan et
  al. 2020; the token-selective variant follows SAP, Shen et al. 2023, and PrivTune): each token's embedding is
  moved by ``η = r v`` (``r ~ Gamma(d, rate ε)``, ``v`` uniform on the unit sphere) and, with ``dx_project``,
  replaced by the embedding row of the *nearest* vocabulary token (Euclidean distance). Guarantee, per token and
  release: ``Pr[M(w) = y] <= exp(ε ||φ(w) - φ(w')||) Pr[M(w') = y]``. With ``keep_ids`` (tokens that are
  frequent in public text of the task's style: the template and the task's keywords) those tokens get
  ``epsilon_keep`` (less noise) and every other token ``epsilon`` (names, numbers, addresses: rare tokens).

**Randomness.** Noise is only as private as its generator is secret. :meth:`NoiseConfig.make_generator` seeds
from the OS entropy pool unless a ``seed`` is set; a fixed seed is for reproducible experiments only, and
anybody who knows it can regenerate and subtract the noise. So :meth:`NoiseConfig.describe` (what goes into
the handshake and the run summary) never contains the seed, only whether one was set. Create the generator
once per run (:func:`client_noise` does): re-seeding before every call would add the *same* noise to every
batch, and the provider could cancel it by differencing two activations.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch

from guardedp2p.errors import ConfigError

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from guardedp2p.privacy.accounting import ReleasePlan

__all__ = [
    "NOISE_KINDS",
    "CLIP_UNITS",
    "DEFAULT_DELTA",
    "NoiseConfig",
    "ClientNoise",
    "client_noise",
    "add_activation_noise",
    "add_gradient_noise",
    "clip_per_sample",
    "clip_per_token",
    "laplace_scale",
    "gaussian_scale",
    "classical_gaussian_sigma",
    "analytic_gaussian_sigma",
    "dx_privacy_token_ids",
    "dx_privacy_embeddings",
    "frequent_token_ids",
    "install_embedding_noise",
    "install_input_noise",
    "token_embedding",
    "describe",
    "parse_noise_spec",
]

NOISE_KINDS = ("none", "gaussian", "laplace", "dx")
CLIP_UNITS = ("record", "token")
#: The δ the accountant states ε at when the configuration names none (well below 1 / number of records).
DEFAULT_DELTA = 1e-5


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
    """``σ = 2C sqrt(2 ln(1.25/δ)) / ε`` (Dwork & Roth, Thm A.1; valid only for ε < 1). For reference only:
    :func:`analytic_gaussian_sigma` is smaller for every (ε, δ), and is what the client uses."""
    _check_eps_delta(epsilon, delta, clip)
    if epsilon >= 1:
        raise ConfigError(f"the classical Gaussian mechanism needs epsilon < 1 (got {epsilon}); use the analytic one")
    return 2.0 * clip * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def analytic_gaussian_sigma(epsilon: float, delta: float, clip: float) -> float:
    """Smallest σ with (ε, δ)-DP for one release at L2 sensitivity ``2C`` (analytic Gaussian mechanism, Balle &
    Wang 2018, any ε > 0), computed by ``dp_accounting.get_sigma_gaussian`` (which returns σ at sensitivity 1)."""
    _check_eps_delta(epsilon, delta, clip)
    from dp_accounting import get_sigma_gaussian

    return 2.0 * clip * float(get_sigma_gaussian(float(epsilon), float(delta)))


def gaussian_scale(epsilon: float, delta: float, clip: float, method: str = "auto") -> float:
    """Gaussian σ for per-sample L2 clipping at ``C``: the analytic mechanism (``auto``/``analytic``), or the
    classical formula when asked for explicitly (it is never smaller)."""
    if method == "classical":
        return classical_gaussian_sigma(epsilon, delta, clip)
    if method in ("analytic", "auto"):
        return analytic_gaussian_sigma(epsilon, delta, clip)
    raise ConfigError(f"unknown Gaussian calibration {method!r}: use auto, classical or analytic")


def _check_eps_delta(epsilon: float, delta: float | None, clip: float) -> None:
    _pos("epsilon", epsilon)
    _pos("clip", clip)
    _check_delta(delta)


def _check_delta(delta: float | None) -> None:
    if delta is None or isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ConfigError(f"noise delta must be in (0, 1), got {delta!r}")


# ----------------------------------------------------------------------------------------------------- config


@dataclass
class NoiseConfig:
    """What noise the client adds before sending.

    ``kind``: ``none`` | ``gaussian`` | ``laplace`` (activation noise) | ``dx`` (dχ-privacy on input embeddings).

    Activation noise: ``scale``: σ (Gaussian) or b (Laplace) of a fixed, uncalibrated noise. ``clip``: norm bound
    C (L2 for Gaussian, L1 for Laplace), applied whenever set, per ``clip_unit`` (``record``: all of ``h[b]``;
    ``token``: each ``h[b, t]``). ``noise_multiplier`` z (Gaussian, needs ``clip``): σ = z·C, with ε over the
    whole run from the accountant at ``delta`` (default :data:`DEFAULT_DELTA`). ``epsilon`` (+ ``delta`` for
    Gaussian): calibrate σ for one release from (ε, δ) and ``clip`` instead. Give at most one of ``scale``,
    ``noise_multiplier``, ``epsilon``.

    Gradient noise (Online's GRAD_UP, Gaussian only): ``grad_clip`` C_g per record and ``grad_noise_multiplier``
    z_g (σ_g = z_g·C_g), on the gradient of the per-record loss (see :func:`add_gradient_noise`).

    dχ: ``epsilon`` (noise density ∝ exp(-ε‖η‖)); ``dx_project``: replace the noisy embedding by the nearest
    vocabulary row (a token substitution) instead of sending the noisy vector on; ``keep_ids`` with
    ``epsilon_keep``: a larger ε (less noise) for those token ids (:func:`frequent_token_ids`).

    ``seed``: reproducible noise for experiments only (see the module docstring); never sent to the peer.
    """

    kind: str = "none"
    scale: float = 0.0
    clip: float | None = None
    epsilon: float | None = None
    delta: float | None = None
    seed: int | None = None
    clip_unit: str = "record"
    noise_multiplier: float | None = None
    grad_clip: float | None = None
    grad_noise_multiplier: float | None = None
    dx_project: bool = True
    keep_ids: tuple[int, ...] = ()
    epsilon_keep: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in NOISE_KINDS:
            raise ConfigError(f"unknown noise kind {self.kind!r}: use one of {', '.join(NOISE_KINDS)}")
        if self.clip_unit not in CLIP_UNITS:
            raise ConfigError(f"unknown clip unit {self.clip_unit!r}: use one of {', '.join(CLIP_UNITS)}")
        _pos("scale", self.scale, allow_zero=True)
        for name in ("clip", "epsilon", "noise_multiplier", "grad_clip", "grad_noise_multiplier", "epsilon_keep"):
            _pos(name, getattr(self, name))
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"noise seed must be an int, got {self.seed!r}")
        self.keep_ids = tuple(int(i) for i in self.keep_ids)
        if self.kind in ("gaussian", "laplace"):
            given = [n for n in ("scale", "noise_multiplier", "epsilon") if getattr(self, n)]
            if len(given) > 1:
                raise ConfigError(f"give one of noise scale, noise_multiplier or epsilon, not {' and '.join(given)}")
            if (self.epsilon is not None or self.noise_multiplier is not None) and self.clip is None:
                raise ConfigError(
                    f"calibrated {self.kind} noise needs a clip norm C (the per-record sensitivity bound)"
                )
            if self.kind == "gaussian" and self.epsilon is not None:
                _check_eps_delta(self.epsilon, self.delta, self._required("clip", self.clip))
            if self.kind == "gaussian" and self.delta is not None:
                _check_delta(self.delta)
        if self.kind == "laplace" and self.delta is not None:
            raise ConfigError("Laplace noise is pure ε-DP: do not set delta")
        if self.kind == "laplace" and self.noise_multiplier is not None:
            raise ConfigError("noise_multiplier is for Gaussian noise; calibrate Laplace noise with epsilon")
        if (self.grad_clip is None) != (self.grad_noise_multiplier is None):
            raise ConfigError("gradient noise needs both grad_clip and grad_noise_multiplier")
        if self.grad_clip is not None and self.kind != "gaussian":
            raise ConfigError("gradient noise is clipped Gaussian noise: use it with kind gaussian")
        if self.kind == "dx":
            if self.epsilon is None:
                raise ConfigError("dx-privacy needs epsilon (noise density ∝ exp(-ε‖η‖))")
            if self.keep_ids and self.epsilon_keep is None:
                raise ConfigError("dx keep_ids need epsilon_keep (the ε of the kept tokens, larger than epsilon)")
        elif self.keep_ids or self.epsilon_keep is not None:
            raise ConfigError("keep_ids / epsilon_keep belong to dx noise")

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any] | NoiseConfig | None) -> NoiseConfig:
        """From a ``TuneOptions.noise`` dict (unknown keys refused with the accepted ones named)."""
        if isinstance(spec, NoiseConfig):
            return spec
        spec = dict(spec or {})
        known = {f.name for f in fields(cls)}
        bad = sorted(set(spec) - known)
        if bad:
            raise ConfigError(f"unknown noise setting(s) {', '.join(bad)}; accepted: {', '.join(sorted(known))}")
        if "keep_ids" in spec:
            spec["keep_ids"] = tuple(spec["keep_ids"])
        return cls(**spec)

    def to_dict(self) -> dict[str, Any]:
        """The fields that differ from the defaults (what ``TuneOptions.noise`` holds); includes the seed."""
        default = NoiseConfig()
        out = {k: v for k, v in asdict(self).items() if v != getattr(default, k)}
        if "keep_ids" in out:
            out["keep_ids"] = list(out["keep_ids"])
        return out

    @property
    def calibrated(self) -> bool:
        """Has a bound: clipped and calibrated from ε, or clipped Gaussian with a noise multiplier."""
        if self.kind == "gaussian":
            return self.clip is not None and (self.epsilon is not None or self.noise_multiplier is not None)
        return self.kind == "laplace" and self.epsilon is not None

    @property
    def acts_on_input(self) -> bool:
        """dχ acts on the input embeddings (:func:`install_input_noise`), not on the sent activation."""
        return self.kind == "dx"

    @property
    def noises_gradient(self) -> bool:
        return self.grad_clip is not None and self.grad_noise_multiplier is not None

    @property
    def accounting_delta(self) -> float:
        return float(self.delta) if self.delta is not None else DEFAULT_DELTA

    def _required(self, name: str, value: float | None) -> float:
        """A parameter ``__post_init__`` guarantees for this kind; re-checked because the dataclass is mutable."""
        if value is None:
            raise ConfigError(f"{self.kind} noise with these settings needs {name}; set it")
        return value

    def effective_scale(self) -> float:
        """σ (Gaussian) or b (Laplace) actually used; 0 for none; for dx, E[‖η‖] = d/ε is dimension-dependent."""
        if self.kind not in ("gaussian", "laplace"):
            return 0.0
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier) * self._required("clip", self.clip)
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

    def describe(self, plan: ReleasePlan | None = None) -> dict[str, Any]:
        """Handshake / run-summary description. Contains no seed (knowing it would let anyone remove the noise).

        With ``plan`` (how often a record is released in this run, :func:`guardedp2p.privacy.accounting.plan_run`)
        it adds ``run``: the ε at δ over every release of a record, from the accountant.
        """
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "none":
            out["guarantee"] = "none"
            if plan is not None:
                from guardedp2p.privacy.accounting import account

                out["run"] = account(self, plan).to_dict()
            return out
        out["seeded"] = self.seed is not None
        if self.kind == "dx":
            out.update(
                mechanism="dx-privacy (Feyisetan et al. 2020): eta = r*v, r ~ Gamma(d, rate eps)"
                + (", nearest token by L2" if self.dx_project else ", noisy embedding sent on"),
                epsilon=float(self._required("epsilon", self.epsilon)),
                guarantee="metric dx-privacy: Pr[M(w)=y] <= exp(eps*||phi(w)-phi(w')||) Pr[M(w')=y], per token",
            )
            if self.keep_ids:
                digest = hashlib.sha256(",".join(map(str, sorted(self.keep_ids))).encode()).hexdigest()[:16]
                out.update(
                    epsilon_keep=float(self._required("epsilon_keep", self.epsilon_keep)),
                    keep_ids=len(self.keep_ids),
                    keep_ids_sha256=digest,
                    guarantee=out["guarantee"] + "; among tokens off the keep list only (kept tokens: epsilon_keep)",
                )
        else:
            out["scale"] = self.effective_scale()
            out["clip"] = self.clip
            out["clip_norm"] = ("l2" if self.kind == "gaussian" else "l1") if self.clip is not None else None
            out["clip_unit"] = self.clip_unit
            if self.noise_multiplier is not None:
                out["noise_multiplier"] = float(self.noise_multiplier)
                out["delta"] = self.accounting_delta
                out["calibration"] = "sigma = noise_multiplier * clip; epsilon over the run from the accountant"
                out["guarantee"] = "(epsilon, delta)-LDP per record, composed over every release of the run"
            elif self.calibrated and self.epsilon is not None:
                out["epsilon"] = float(self.epsilon)
                if self.kind == "gaussian":
                    out["delta"] = float(self._required("delta", self.delta))
                    out["calibration"] = "analytic Gaussian (Balle & Wang 2018, dp-accounting)"
                    out["guarantee"] = "(epsilon, delta)-LDP per record per release; releases compose"
                else:
                    out["calibration"] = "b = 2C/epsilon"
                    out["guarantee"] = "epsilon-LDP per record per release; releases compose"
            else:
                out["guarantee"] = "none (uncalibrated noise)"
            if self.noises_gradient:
                out["grad_clip"] = self.grad_clip
                out["grad_noise_multiplier"] = self.grad_noise_multiplier
        if plan is not None:
            from guardedp2p.privacy.accounting import account

            out["run"] = account(self, plan).to_dict()
        return out


def describe(cfg: NoiseConfig, plan: ReleasePlan | None = None) -> dict[str, Any]:
    """Module-level alias of :meth:`NoiseConfig.describe`."""
    return cfg.describe(plan)


# ----------------------------------------------------------------------------------------------------- mechanisms


def clip_per_sample(h: torch.Tensor, clip: float, norm: int = 2) -> torch.Tensor:
    """Scale each sample ``h[b]`` (all of its elements) so that its L``norm`` norm is at most ``clip``."""
    flat = h.reshape(h.shape[0], -1) if h.dim() > 0 else h.reshape(1, 1)
    n = torch.linalg.vector_norm(flat.float(), ord=norm, dim=1)
    factor = torch.clamp(clip / n.clamp_min(1e-30), max=1.0).to(h.dtype)
    return h * factor.view(-1, *([1] * (h.dim() - 1)))


def clip_per_token(h: torch.Tensor, clip: float, norm: int = 2) -> torch.Tensor:
    """Scale each position ``h[..., t, :]`` (the last dimension) to L``norm`` norm at most ``clip``."""
    n = torch.linalg.vector_norm(h.float(), ord=norm, dim=-1, keepdim=True)
    return h * torch.clamp(clip / n.clamp_min(1e-30), max=1.0).to(h.dtype)


def _gaussian(shape, generator, device) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


def _laplace(shape, generator, device) -> torch.Tensor:
    # difference of two Exp(1): 1 - U lies in (0, 1], so the logs are finite
    u1 = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    u2 = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return torch.log1p(-u2) - torch.log1p(-u1)


def add_activation_noise(h: torch.Tensor, cfg: NoiseConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Return ``h`` with the configured noise added (clipped first, per ``cfg.clip_unit``, if ``cfg.clip`` is set).

    ``kind`` ``none`` and ``dx`` return ``h`` unchanged (dχ-privacy acts on the input embeddings, see
    :func:`install_input_noise`). Differentiable w.r.t. ``h`` (the noise is an additive constant).
    ``generator`` must be on ``h``'s device; ``None`` uses torch's global RNG.
    """
    if cfg.kind in ("none", "dx"):
        return h
    norm = 2 if cfg.kind == "gaussian" else 1
    if cfg.clip is not None:
        h = clip_per_token(h, cfg.clip, norm) if cfg.clip_unit == "token" else clip_per_sample(h, cfg.clip, norm)
    scale = cfg.effective_scale()
    if scale == 0:
        return h
    sample = _gaussian if cfg.kind == "gaussian" else _laplace
    noise = sample(h.shape, generator, h.device) * scale
    return (h.float() + noise).to(h.dtype)


def add_gradient_noise(g: torch.Tensor, cfg: NoiseConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Clipped Gaussian noise on the gradient the client sends up (dL/dh2, shape (B, L, d)), per record.

    The training loss is a mean over the batch, so record b's share of dL/dh2 scales like 1/B; the rows are first
    multiplied by B (a public number) so that ``grad_clip`` is in units of *one record's* loss gradient and does not
    depend on the batch size, then each ``g[b]`` is clipped to L2 norm C_g, N(0, (z_g C_g)²) is added and the
    factor B is divided out again. Each record's row depends only on that record (the top runs every sequence on
    its own), so the sensitivity is 2 C_g as for the activations. Without gradient settings ``g`` is returned.
    """
    if not cfg.noises_gradient or g.dim() == 0:
        return g
    b = float(g.shape[0])
    clip = float(cfg._required("grad_clip", cfg.grad_clip))
    sigma = float(cfg._required("grad_noise_multiplier", cfg.grad_noise_multiplier)) * clip
    scaled = clip_per_sample(g.float() * b, clip, 2)
    noisy = scaled + _gaussian(g.shape, generator, g.device) * sigma
    return (noisy / b).to(g.dtype)


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


def _token_epsilons(ids: torch.Tensor, epsilon: float, keep: torch.Tensor | None, epsilon_keep: float | None):
    eps = torch.full(ids.shape, float(epsilon), dtype=torch.float32, device=ids.device)
    if keep is not None and epsilon_keep is not None and keep.numel():
        eps[torch.isin(ids, keep.to(ids.device))] = float(epsilon_keep)
    return eps


def _keep_tensor(keep_ids: Sequence[int] | torch.Tensor | None) -> torch.Tensor | None:
    if keep_ids is None:
        return None
    if isinstance(keep_ids, torch.Tensor):
        return keep_ids.to(torch.long)
    return torch.tensor(list(keep_ids), dtype=torch.long)


def _dx_noise(ids: torch.Tensor, d: int, eps: torch.Tensor, generator, device) -> torch.Tensor:
    """η = r v per token, r ~ Gamma(d, rate ε_t) (the ε of that token), v uniform on the sphere."""
    n = ids.numel()
    r = _gamma_int_shape(n, d, 1.0, generator, device) / eps.reshape(-1).to(device)
    return r[:, None] * _sphere(n, d, generator, device)


@torch.no_grad()
def dx_privacy_token_ids(
    input_ids: torch.Tensor,
    embedding_weight: torch.Tensor,
    epsilon: float,
    generator: torch.Generator | None = None,
    *,
    chunk: int = 256,
    keep_ids: Sequence[int] | torch.Tensor | None = None,
    epsilon_keep: float | None = None,
) -> torch.Tensor:
    """Token ids after the dχ mechanism: ``argmin_w' ||φ(w) + η - φ(w')||₂`` per token (same shape as input_ids).

    Choices: Feyisetan et al.'s absolute ε (density ∝ exp(-ε‖η‖), so ``E[r] = d/ε``; SplitLLM's relative ε' is
    ``epsilon = ε' d``); a fresh ``r`` per token (SplitLLM shares one r per forward call); nearest token by
    **Euclidean** distance, which is what the dχ guarantee is stated for (SplitLLM's maximum dot product favours
    large-norm rows and voids the metric guarantee). Tokens in ``keep_ids`` use ``epsilon_keep``. The vocabulary
    search is chunked over tokens (``chunk`` x V distances at a time).
    """
    _pos("epsilon", epsilon)
    _pos("epsilon_keep", epsilon_keep)
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
    eta = _dx_noise(ids, d, _token_epsilons(ids, epsilon, _keep_tensor(keep_ids), epsilon_keep), generator, w.device)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        q = wf[ids[s:e]] + eta[s:e]
        # ||q - w'||² = ||q||² - 2 q·w' + ||w'||²; ||q||² is constant per row
        score = w_sq[None, :] - 2 * (q @ wf.T)
        out[s:e] = score.argmin(dim=1)
    return out.reshape(input_ids.shape).to(input_ids.device)


def dx_privacy_embeddings(
    input_ids: torch.Tensor,
    embedding_weight: torch.Tensor,
    epsilon: float,
    generator: torch.Generator | None = None,
    *,
    project: bool = True,
    keep_ids: Sequence[int] | torch.Tensor | None = None,
    epsilon_keep: float | None = None,
) -> torch.Tensor:
    """Embeddings of ``input_ids`` after the dχ mechanism (``input_ids.shape + (d,)``).

    ``project=True``: the embedding rows of the substituted tokens (:func:`dx_privacy_token_ids`; gradients reach
    only those rows). ``project=False``: ``φ(w) + η`` itself, the continuous mechanism (same guarantee; the
    projection is post-processing).
    """
    if project:
        new_ids = dx_privacy_token_ids(
            input_ids, embedding_weight, epsilon, generator, keep_ids=keep_ids, epsilon_keep=epsilon_keep
        )
        return torch.nn.functional.embedding(new_ids.to(embedding_weight.device), embedding_weight)
    _pos("epsilon", epsilon)
    ids = input_ids.to(embedding_weight.device)
    e = torch.nn.functional.embedding(ids, embedding_weight)
    eps = _token_epsilons(ids.reshape(-1), epsilon, _keep_tensor(keep_ids), epsilon_keep)
    eta = _dx_noise(ids.reshape(-1), e.shape[-1], eps, generator, e.device).reshape(e.shape)
    return (e.float() + eta).to(e.dtype)


def digit_token_ids(tokenizer: Any) -> list[int]:
    """Every token id whose text holds a digit (``0``-``9``).

    Why: a keep list learned from public records of one template keeps the digits (every record has a date and
    an account number, so each digit recurs everywhere), yet the digits are what spell a date of birth or an
    account. Excluding them from the keep list (``frequent_token_ids(..., exclude=digit_token_ids(tok))``) gives
    those fields the full dχ noise while the template and the rule vocabulary keep the light one: measured in
    docs/results/frontier.md, the balanced preset's keep list left dates and account numbers recovered at 1.00.
    """
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    out: list[int] = []
    for _, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        text = tokenizer.decode([int(i)])
        if any(c.isdigit() for c in text):
            out.append(int(i))
    return out


def frequent_token_ids(
    sequences: Iterable[Sequence[int]],
    top_k: int | None = None,
    *,
    min_share: float = 0.0,
    exclude: Iterable[int] = (),
) -> list[int]:
    """Token ids that recur across public records of the task's style, most widespread first (ties: smaller id).

    A token's *share* is the fraction of records it appears in (document frequency). Kept: the ids with share >=
    ``min_share``, at most ``top_k`` of them (``None``: no cap). Why: in records of one template, what recurs
    across records is the template and the task's own vocabulary (field names, the few values a rule keys on),
    while what identifies a person (names, dates, addresses, account numbers) is spread thin, even when each
    first name or digit is common on its own. The kept tokens get less dχ noise; everything else more.
    """
    if top_k is not None and top_k < 0:
        raise ConfigError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 <= min_share <= 1.0:
        raise ConfigError(f"min_share must be in [0, 1], got {min_share}")
    counts: dict[int, int] = {}
    skip = set(int(i) for i in exclude)
    n = 0
    for seq in sequences:
        n += 1
        for t in set(int(t) for t in seq):
            if t not in skip:
                counts[t] = counts.get(t, 0) + 1
    ranked = [t for t, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n and c / n >= min_share]
    return ranked if top_k is None else ranked[:top_k]


def token_embedding(bottom: torch.nn.Module) -> torch.nn.Module:
    """The token-embedding module of a client bottom (its architecture's first embed path)."""
    arch = getattr(bottom, "arch", None)
    paths = getattr(arch, "embed_paths", None)
    if not paths:
        raise ConfigError("this bottom does not name its token embedding (no arch.embed_paths)")
    module = bottom.get_submodule(paths[0])
    if not isinstance(module, torch.nn.Embedding):
        raise ConfigError(f"{paths[0]} is a {type(module).__name__}, not a token embedding")
    return module


def install_input_noise(
    bottom: torch.nn.Module, cfg: NoiseConfig, generator: torch.Generator | None = None
) -> RemovableHandle | None:
    """Put dχ noise on every input embedding ``bottom`` computes (training and evaluation alike): a forward hook
    on its token embedding that replaces the output. ``None`` when ``cfg`` has no input noise.

    Install it once per run, with the run's one generator (:func:`client_noise`). Remove it with ``.remove()``.
    """
    if not cfg.acts_on_input:
        return None
    return install_embedding_noise(token_embedding(bottom), cfg, generator)


def install_embedding_noise(
    emb: torch.nn.Module, cfg: NoiseConfig, generator: torch.Generator | None = None
) -> RemovableHandle | None:
    """:func:`install_input_noise` on a token-embedding module itself (e.g. a whole model's
    ``get_input_embeddings()``, to score a model the way its split run computes)."""
    if not cfg.acts_on_input:
        return None
    eps = float(cfg._required("epsilon", cfg.epsilon))
    keep = torch.tensor(cfg.keep_ids, dtype=torch.long) if cfg.keep_ids else None

    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return dx_privacy_embeddings(
            args[0],
            module.weight,  # type: ignore[arg-type]
            eps,
            generator,
            project=cfg.dx_project,
            keep_ids=keep,
            epsilon_keep=cfg.epsilon_keep,
        ).to(output.dtype)

    return emb.register_forward_hook(hook)


# ----------------------------------------------------------------------------------------------------- CLI spec

_SPEC_ALIASES = {
    "z": "noise_multiplier",
    "unit": "clip_unit",
    "grad_z": "grad_noise_multiplier",
    "eps": "epsilon",
    "eps_keep": "epsilon_keep",
    "project": "dx_project",
}


def parse_noise_spec(spec: str | None) -> dict[str, Any]:
    """A ``--noise`` value as ``TuneOptions.noise`` fields, checked by :class:`NoiseConfig`.

    ``KIND:SCALE`` (``gaussian:0.1``, ``laplace:0.05``: uncalibrated noise of that scale), or ``KIND:key=value,...``
    with any :class:`NoiseConfig` field (short names: ``z`` noise_multiplier, ``unit`` clip_unit, ``grad_z``
    grad_noise_multiplier, ``eps`` epsilon, ``eps_keep`` epsilon_keep, ``project`` dx_project), e.g.
    ``gaussian:clip=620,z=1.7,grad_clip=1,grad_z=1.7`` or ``dx:eps=30,project=false``. Empty or ``none``: ``{}``.
    The seed cannot be given here (a seed on a command line ends up in shell history). Keep lists come from a preset.
    """
    if not spec or spec.strip() == "none":
        return {}
    kind, _, rest = spec.strip().partition(":")
    if kind not in NOISE_KINDS or kind == "none":
        raise ConfigError(f"--noise {spec!r}: the kind must be one of gaussian, laplace, dx (e.g. gaussian:0.1)")
    out: dict[str, Any] = {"kind": kind}
    if rest and "=" not in rest:
        try:
            out["epsilon" if kind == "dx" else "scale"] = float(rest)  # dx:EPS, gaussian:SCALE
        except ValueError:
            raise ConfigError(
                f"--noise {spec!r}: the {'epsilon' if kind == 'dx' else 'scale'} must be a number"
            ) from None
    elif rest:
        known = {f.name for f in fields(NoiseConfig)} - {"kind", "seed", "keep_ids"}
        for item in rest.split(","):
            key, eq, value = (x.strip() for x in item.partition("="))
            key = _SPEC_ALIASES.get(key, key)
            if not eq or key not in known:
                raise ConfigError(
                    f"--noise {spec!r}: {item!r} is not KEY=VALUE with a known key "
                    f"({', '.join(sorted(known | set(_SPEC_ALIASES)))})"
                )
            if key == "clip_unit":
                out[key] = value
            elif key == "dx_project":
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ConfigError(f"--noise {spec!r}: project must be true or false")
                out[key] = value.lower() in ("true", "1", "yes")
            else:
                try:
                    out[key] = float(value)
                except ValueError:
                    raise ConfigError(f"--noise {spec!r}: {key} must be a number, got {value!r}") from None
    NoiseConfig.from_dict(out)  # every check, with a message the user can act on
    return out


# ----------------------------------------------------------------------------------------------------- per run


@dataclass
class ClientNoise:
    """One :class:`NoiseConfig` ready for a run, with ONE generator for the whole run.

    ``sent`` is the trainer's ``transform_sent`` (activation noise), ``grad`` its ``grad_transform`` (Online's
    gradient noise; ``None`` when not configured), :meth:`install` puts the dχ hook on the bottom.
    """

    cfg: NoiseConfig
    generator: torch.Generator
    handles: list[Any] = field(default_factory=list)

    @property
    def sent(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if self.cfg.kind in ("none", "dx"):
            return None
        return lambda h: add_activation_noise(h, self.cfg, self.generator)

    @property
    def grad(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if not self.cfg.noises_gradient:
            return None
        return lambda g: add_gradient_noise(g, self.cfg, self.generator)

    def install(self, bottom: torch.nn.Module) -> None:
        handle = install_input_noise(bottom, self.cfg, self.generator)
        if handle is not None:
            self.handles.append(handle)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def client_noise(spec: Mapping[str, Any] | NoiseConfig | None, device: torch.device | str = "cpu") -> ClientNoise:
    """A :class:`ClientNoise` for ``spec`` (a ``TuneOptions.noise`` dict or a config), its generator made here."""
    cfg = NoiseConfig.from_dict(spec)
    return ClientNoise(cfg, cfg.make_generator(device))
