"""BiSR (Chen et al., CCS'24): gradient matching at the trunk/top cut and forward matching at the bottom/trunk cut.

BiSR(b), algorithms.md section 4.3
    The provider sees h₂ and the client's gradient g₂ = ∂L/∂h₂. With its pre-trained top mock A_out⁰ it looks for
    soft labels P = softmax(Y) whose next-token cross-entropy gradient ĝ(Y) = ∂ℓ/∂h₂ matches g₂ under the TAG
    distance β‖·‖² + (1-β)‖·‖₁. Because ∂ℓ/∂logits_t = (softmax(logits_t) - P_{t+1}) / N, ĝ is an affine map of P
    through the fixed Jacobian of A_out⁰, computed here as a vector-Jacobian product with ``create_graph=True``.
    The first token is never a label, so it keeps its initial value (SIP's guess, or ``first_token``).
BiSR(f), algorithms.md section 4.4
    The provider sees h₁. It optimises dummy token embeddings Ẽ so that A_in⁰(Ẽ) matches h₁ (per-position cosine),
    starting from W_E[previous guess], and decodes x̂_t = argmax_v ⟨Ẽ_t, W_E[v]⟩.

Both use only pre-trained weights: the client's LoRA deltas are unknown to the attacker (seed.md section 3).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from guardedp2p.attacks.common import AttackConfigError, AttackerModel, Reconstruction

StepCallback = Callable[[int, float], None]


# --------------------------------------------------------------------------------------------- BiSR(b) / TAG core
def math_attention() -> contextlib.AbstractContextManager[None]:
    """Force the composite ("math") SDPA kernel: the fused CPU/GPU kernels have no double backward, which
    gradient matching needs (ĝ is itself a gradient)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


@dataclass
class GradMatchConfig:
    """Gradient-matching hyper-parameters (BiSR(b) defaults: algorithms.md 4.3).

    beta: weight of the squared L2 term of the TAG distance (1 - beta on L1).
    init_temperature: Y₀ = z_init / τ.
    reference_double_softmax: start from Y₀ = softmax(z_init / τ) as the reference code does (flatter start).
    grad_scale: multiply ĝ by this (e.g. 1/k when the victim accumulates k micro-batches and divides its loss).
    fit_scale: instead, rescale ĝ at every step by the least-squares factor ⟨ĝ, g⟩/⟨ĝ, ĝ⟩ (unknown loss scaling).
    init_std: standard deviation of Y₀ when there is no initial guess (TAG's random start).
    """

    steps: int = 18
    lr: float = 0.09
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.01
    beta: float = 0.85
    init_temperature: float = 1.2
    reference_double_softmax: bool = False
    grad_scale: float = 1.0
    fit_scale: bool = False
    init_std: float = 1.0
    seed: int = 0


def label_positions(mask: torch.Tensor) -> torch.Tensor:
    """1 where position t has a next-token label (t+1 is a real token), as the victim's shifted loss counts them."""
    lab = torch.zeros_like(mask)
    lab[:, :-1] = mask[:, 1:]
    return lab * mask


class GradientMatcher:
    """ĝ(P) and the TAG distance for one observation (h₂, g₂), with A_out⁰'s graph built once."""

    def __init__(self, attacker: AttackerModel, h2: torch.Tensor, g2: torch.Tensor, mask: torch.Tensor, cfg: GradMatchConfig) -> None:
        dev = attacker.device
        self.cfg = cfg
        self.mask = mask.to(dev).long()
        self.h2 = h2.detach().to(dev).float().requires_grad_(True)
        self.g2 = g2.detach().to(dev).float()
        self.logits = attacker.logits_top(self.h2, self.mask)
        self.S = torch.softmax(self.logits.detach(), -1)
        lab = label_positions(self.mask).float()
        n = float(lab.sum())
        if n == 0:
            raise AttackConfigError("gradient matching needs a sequence of at least 2 real tokens")
        self.weight = (lab / n).unsqueeze(-1)  # the victim's mean over label positions

    def ghat(self, P: torch.Tensor) -> torch.Tensor:
        """∂ℓ/∂h₂ for soft next-token labels P (B x L x V; P[:, t] is the distribution of token t)."""
        target = torch.zeros_like(P)
        target[:, :-1] = P[:, 1:]
        cot = (self.S - target) * self.weight
        (g,) = torch.autograd.grad(self.logits, self.h2, grad_outputs=cot, retain_graph=True, create_graph=True)
        return g * self.cfg.grad_scale

    def distance(self, ghat: torch.Tensor) -> torch.Tensor:
        g = self.g2
        if self.cfg.fit_scale:
            a = (ghat * g).sum() / (ghat * ghat).sum().clamp_min(1e-30)
            ghat = ghat * a.detach()
        diff = (ghat - g).flatten(1)
        b = self.cfg.beta
        return (b * diff.pow(2).sum(-1) + (1 - b) * diff.abs().sum(-1)).sum()

    def distance_of_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """TAG distance of hard labels (one-hot P), per batch row, no graph (used by LAMP's discrete search)."""
        P = F.one_hot(ids.to(self.S.device), self.S.shape[-1]).float()
        with torch.no_grad():
            target = torch.zeros_like(P)
            target[:, :-1] = P[:, 1:]
            cot = (self.S - target) * self.weight
            (g,) = torch.autograd.grad(self.logits, self.h2, grad_outputs=cot, retain_graph=True)
            g = g * self.cfg.grad_scale
            diff = (g - self.g2).flatten(1)
            b = self.cfg.beta
            return b * diff.pow(2).sum(-1) + (1 - b) * diff.abs().sum(-1)


def init_label_logits(
    shape: tuple[int, int, int], init_logits: torch.Tensor | None, cfg: GradMatchConfig, device: torch.device
) -> torch.Tensor:
    if init_logits is None:
        g = torch.Generator().manual_seed(cfg.seed)
        return (torch.randn(shape, generator=g) * cfg.init_std).to(device)
    z = init_logits.detach().float().to(device) / cfg.init_temperature
    if cfg.reference_double_softmax:
        z = torch.softmax(z, -1)
    return z


def gradient_match(
    attacker: AttackerModel,
    h2: torch.Tensor,
    g2: torch.Tensor,
    mask: torch.Tensor,
    init_logits: torch.Tensor | None = None,
    config: GradMatchConfig | None = None,
    *,
    first_token: int | None = None,
    callback: StepCallback | None = None,
    hook: Callable[[int, torch.Tensor, GradientMatcher], torch.Tensor | None] | None = None,
) -> Reconstruction:
    """Optimise soft labels Y to reproduce g₂; return argmax Y (BiSR(b) with ``init_logits``, TAG without).

    ``hook(step, Y, matcher)`` may return a replacement for Y (LAMP's discrete reordering uses it).
    """
    cfg = config or GradMatchConfig()
    if h2 is None or g2 is None:
        raise AttackConfigError("gradient matching needs h2 and g2 (an Online training step)")
    with attacker.frozen(), math_attention():
        m = GradientMatcher(attacker, h2, g2, mask, cfg)
        V = m.S.shape[-1]
        Y = init_label_logits((*mask.shape, V), init_logits, cfg, attacker.device).requires_grad_(True)
        opt = torch.optim.AdamW([Y], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        best = (float("inf"), Y.detach().clone())
        for step in range(cfg.steps):
            d = m.distance(m.ghat(torch.softmax(Y, -1)))
            dv = float(d.detach())
            if dv < best[0]:
                best = (dv, Y.detach().clone())
            opt.zero_grad(set_to_none=True)
            (Y.grad,) = torch.autograd.grad(d, Y, retain_graph=True)  # keep A_out⁰'s graph for the next step
            opt.step()
            if callback is not None:
                callback(step, dv)
            if hook is not None:
                newY = hook(step, Y.detach(), m)
                if newY is not None:
                    with torch.no_grad():
                        Y.copy_(newY)
        d = float(m.distance(m.ghat(torch.softmax(Y, -1))).detach())
        if d < best[0]:
            best = (d, Y.detach().clone())
    Yb = best[1].cpu()
    ids = Yb.argmax(-1)
    if first_token is not None:
        ids[:, 0] = first_token
    return Reconstruction(ids=ids, logits=Yb, info={"distance": best[0]})


def bisr_b(
    attacker: AttackerModel,
    h2: torch.Tensor,
    g2: torch.Tensor,
    mask: torch.Tensor,
    init_logits: torch.Tensor,
    config: GradMatchConfig | None = None,
    **kw: object,
) -> Reconstruction:
    """BiSR(b): gradient matching initialised from SIP's logits (z_SIP / τ)."""
    if init_logits is None:
        raise AttackConfigError("BiSR(b) is initialised from SIP logits; use TAG for a random start")
    return gradient_match(attacker, h2, g2, mask, init_logits, config, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- BiSR(f)
@dataclass
class ForwardMatchConfig:
    """Forward (smashed-data) matching hyper-parameters (defaults: algorithms.md 4.4, LLaMA2 column).

    loss: "cos" (1 - mean cosine per row, the reference) or "mse".
    decode: "dot" (argmax ⟨Ẽ, W_E[v]⟩, the reference) or "cos".
    tol: stop early once the loss is below this.
    init_noise: std of Gaussian noise (relative to the embedding rows' RMS) added to a random start.
    """

    steps: int = 800
    lr: float = 0.005
    weight_decay: float = 0.02
    loss: Literal["cos", "mse"] = "cos"
    decode: Literal["dot", "cos"] = "dot"
    tol: float = 1e-7
    init_noise: float = 1.0
    seed: int = 0


def forward_distance(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    m = mask.float()
    if kind == "cos":
        cos = F.cosine_similarity(pred, target, dim=-1)
        per_row = ((1 - cos) * m).sum(-1) / m.sum(-1).clamp_min(1)
    elif kind == "mse":
        per_row = ((pred - target).pow(2).mean(-1) * m).sum(-1) / m.sum(-1).clamp_min(1)
    else:
        raise AttackConfigError(f"unknown forward-matching loss {kind!r}; use 'cos' or 'mse'")
    return per_row.sum()


def forward_match(
    attacker: AttackerModel,
    h1: torch.Tensor,
    mask: torch.Tensor,
    init_ids: torch.Tensor | None = None,
    config: ForwardMatchConfig | None = None,
    *,
    callback: StepCallback | None = None,
) -> Reconstruction:
    """BiSR(f) (``init_ids`` from SIP or BiSR(b)) or plain embedding inversion from a random start."""
    cfg = config or ForwardMatchConfig()
    if h1 is None:
        raise AttackConfigError("forward matching needs the observed h1")
    dev = attacker.device
    mask = mask.to(dev).long()
    target = h1.detach().to(dev).float()
    W = attacker.W_E.float()
    if init_ids is not None:
        E0 = W[init_ids.to(dev).long()].clone()
    else:
        g = torch.Generator().manual_seed(cfg.seed)
        rms = W.pow(2).mean().sqrt()
        E0 = W.mean(0) + torch.randn((*mask.shape, W.shape[-1]), generator=g).to(dev) * rms * cfg.init_noise
    E = E0.requires_grad_(True)
    opt = torch.optim.AdamW([E], lr=cfg.lr, weight_decay=cfg.weight_decay)
    last = float("nan")
    with attacker.frozen():
        for step in range(cfg.steps):
            pred = attacker.h1_from_embeddings(E, mask).float()
            loss = forward_distance(pred, target, mask, cfg.loss)
            last = float(loss.detach())
            if last < cfg.tol:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if callback is not None:
                callback(step, last)
    E = E.detach()
    ids = attacker.decode_embeddings(E, cfg.decode).cpu()
    scores = (E.float() @ W.T).cpu()
    return Reconstruction(ids=ids, logits=scores, info={"loss": last})


def bisr_f(
    attacker: AttackerModel,
    h1: torch.Tensor,
    mask: torch.Tensor,
    init_ids: torch.Tensor,
    config: ForwardMatchConfig | None = None,
    **kw: object,
) -> Reconstruction:
    """BiSR(f): forward matching initialised from a previous stage's tokens (SIP, or BiSR(b) for BiSR(b+f))."""
    return forward_match(attacker, h1, mask, init_ids, config, **kw)  # type: ignore[arg-type]
