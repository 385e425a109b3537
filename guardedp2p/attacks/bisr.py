"""BiSR (Chen et al., CCS'24): gradient matching at the trunk/top cut and forward matching at the bottom/trunk cut.

BiSR(b), Chen et al., BiSR, CCS'24, arXiv 2409.00960, §BiSR(b)
    The provider sees h₂ and the client's gradient g₂ = ∂L/∂h₂. With its pre-trained top mock A_out⁰ it looks for
    soft labels P = softmax(Y) whose next-token cross-entropy gradient ĝ(Y) = ∂ℓ/∂h₂ matches g₂ under the TAG
    distance β‖·‖² + (1-β)‖·‖₁. Because ∂ℓ/∂logits_t = (softmax(logits_t) - P_{t+1}) / N, ĝ is an affine map of P
    through the fixed Jacobian of A_out⁰, computed here as a vector-Jacobian product with ``create_graph=True``.
    The first token is never a label, so it keeps its initial value (SIP's guess, or ``first_token``).
BiSR(f), Chen et al., BiSR, CCS'24, arXiv 2409.00960, §BiSR(f)
    The provider sees h₁. It optimises dummy token embeddings Ẽ so that A_in⁰(Ẽ) matches h₁ (per-position cosine),
    starting from W_E[previous guess], and decodes x̂_t = argmax_v ⟨Ẽ_t, W_E[v]⟩.

Both use only pre-trained weights: the client's LoRA deltas are unknown to the attacker (the GuardedTuning threat model (arXiv 2501.04323; SECURITY.md)).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

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
    """Gradient-matching hyper-parameters (BiSR(b) defaults: Chen et al., BiSR, CCS'24, arXiv 2409.00960).

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

    def __init__(
        self, attacker: AttackerModel, h2: torch.Tensor, g2: torch.Tensor, mask: torch.Tensor, cfg: GradMatchConfig
    ) -> None:
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
        best: tuple[float, torch.Tensor] = (float("inf"), Y.detach().clone())
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
        final = float(m.distance(m.ghat(torch.softmax(Y, -1))).detach())
        if final < best[0]:
            best = (final, Y.detach().clone())
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
    """Forward (smashed-data) matching hyper-parameters (defaults: Chen et al., BiSR, CCS'24, arXiv 2409.00960, LLaMA2 column, except
    ``decode`` and the discrete ``refine`` pass, both marked [I] below).

    loss: "cos" (1 - mean cosine per row, the reference) or "mse".
    decode: "cos" (default) or "dot" (argmax ⟨Ẽ, W_E[v]⟩, the reference). [I] On SmolLM2 the dot product maps
        19 % of the *exact* embedding rows of a record to another (larger-norm) token, so it cannot be the default
        of a harness that must not under-estimate the attacker.
    tol: stop the continuous phase once the loss is below this.
    init_noise: std of Gaussian noise (relative to the embedding rows' RMS) added to a random start.
    refine [I]: after the continuous phase, a left-to-right discrete pass. At each position whose current token
        is in doubt it tries the candidates {initial token, decoded token, top ``refine_topk`` rows by cosine to
        Ẽ_t, top ``refine_topk`` of the initial stage's logits} and keeps the one whose A_in⁰ output at that
        position (prefix fixed; causal, so later tokens do not matter) best matches h₁. A position is in doubt
        when the decoded token differs from the initial one, or its own mismatch exceeds ``refine_factor`` x the
        median mismatch of the row (and ``refine_abs``). Continuous relaxations of LLM inputs land off the token
        manifold (many Ẽ give nearly the same h₁, dominated by a few massive activation dimensions), and Adam's
        normalised steps make correct tokens drift; this pass fixes both at the cost of a few forwards.
    """

    steps: int = 800
    lr: float = 0.005
    weight_decay: float = 0.02
    loss: Literal["cos", "mse"] = "cos"
    decode: Literal["dot", "cos"] = "cos"
    tol: float = 1e-7
    init_noise: float = 1.0
    refine: bool = True
    refine_topk: int = 8
    refine_factor: float = 3.0
    refine_abs: float = 1e-4
    seed: int = 0


def forward_distance(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    kind: str,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    m = mask.float()
    if stats is not None:
        mu, sd = stats
        pred, target = (pred - mu) / sd, (target - mu) / sd
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
    init_logits: torch.Tensor | None = None,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    callback: StepCallback | None = None,
) -> Reconstruction:
    """BiSR(f) (``init_ids`` from SIP or BiSR(b)) or plain embedding inversion from a random start.

    ``init_logits`` (B x L x V, e.g. SIP's) only widen the candidate sets of the discrete refinement.

    ``stats`` = (mean, std) per hidden dimension of A_in⁰ activations on auxiliary text: when given, both sides are
    standardised before the distance (see :func:`activation_stats`)."""
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
    st = None if stats is None else (stats[0].to(dev).float(), stats[1].to(dev).float())
    last = float("nan")
    with attacker.frozen():
        for step in range(cfg.steps):
            pred = attacker.h1_from_embeddings(E, mask).float()
            loss = forward_distance(pred, target, mask, cfg.loss, st)
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
    info: dict[str, float] = {"loss": last}
    if cfg.refine:
        W_n = F.normalize(W.float(), dim=-1)
        cands = [ids.unsqueeze(-1), (F.normalize(E.float(), dim=-1) @ W_n.T).topk(cfg.refine_topk, -1).indices.cpu()]
        if init_ids is not None:
            cands.insert(0, init_ids.cpu().long().unsqueeze(-1))
        if init_logits is not None and cfg.refine_topk > 0:
            cands.append(init_logits.float().topk(cfg.refine_topk, -1).indices.cpu())
        start = init_ids.cpu().long() if init_ids is not None else ids
        ids, changed = discrete_refine(
            attacker, target, mask, start, ids, torch.cat(cands, -1), cfg, st, check_all=init_ids is None
        )
        info["refined_positions"] = float(changed)
    scores = (E.float() @ W.T).cpu()
    return Reconstruction(ids=ids, logits=scores, info=info)


def position_mismatch(
    attacker: AttackerModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    target: torch.Tensor,
    kind: str,
    stats: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """Per-position distance between A_in⁰(ids) and the observed h₁ (B x L; 0 on pads)."""
    with torch.no_grad():
        pred = attacker.h1(ids, mask)
        tgt = target.to(pred.device).float()
        if stats is not None:
            pred, tgt = (pred - stats[0]) / stats[1], (tgt - stats[0]) / stats[1]
        if kind == "cos":
            d = 1 - F.cosine_similarity(pred, tgt, dim=-1)
        else:
            d = (pred - tgt).pow(2).mean(-1)
    return (d * mask.to(d.device).float()).cpu()


def discrete_refine(
    attacker: AttackerModel,
    target: torch.Tensor,
    mask: torch.Tensor,
    start: torch.Tensor,
    decoded: torch.Tensor,
    candidates: torch.Tensor,
    cfg: ForwardMatchConfig,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    check_all: bool = False,
) -> tuple[torch.Tensor, int]:
    """Left-to-right coordinate search over ``candidates`` (B x L x K ids); see ``ForwardMatchConfig.refine``.

    Starts from whichever of ``start`` / ``decoded`` matches h₁ better per row; ``check_all`` puts every position
    in doubt (no trustworthy initial guess). Returns (ids, number of positions whose token changed).
    """
    mask_c = mask.cpu().long()
    d_start = position_mismatch(attacker, start, mask_c, target, cfg.loss, stats)
    d_dec = position_mismatch(attacker, decoded, mask_c, target, cfg.loss, stats)
    use_dec = d_dec.sum(-1) < d_start.sum(-1)
    cur = torch.where(use_dec[:, None], decoded.cpu(), start.cpu()).clone()
    base = torch.where(use_dec[:, None], d_dec, d_start)
    origin = cur.clone()
    B, L = cur.shape
    for b in range(B):
        n = int(mask_c[b].sum())
        if n == 0:
            continue
        valid = base[b, :n]
        thr = max(cfg.refine_abs, cfg.refine_factor * float(valid.median()))
        for t in range(n):
            if not mask_c[b, t]:
                continue
            doubt = check_all or bool(base[b, t] > thr) or int(start[b, t]) != int(decoded[b, t])
            if not doubt:
                continue
            cand = torch.unique(torch.cat([cur[b, t : t + 1], candidates[b, t]]))
            if len(cand) < 2:
                continue
            seqs = cur[b : b + 1, : t + 1].repeat(len(cand), 1)
            seqs[:, t] = cand
            m = mask_c[b : b + 1, : t + 1].repeat(len(cand), 1)
            d = position_mismatch(
                attacker, seqs, m, target[b : b + 1, : t + 1].expand(len(cand), -1, -1), cfg.loss, stats
            )
            cur[b, t] = cand[int(d[:, t].argmin())]
    return cur, int((cur != origin)[mask_c == 1].sum())


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


def activation_stats(h: Sequence[torch.Tensor] | torch.Tensor, eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std + eps) per hidden dimension over token rows (e.g. A_in⁰ of auxiliary text), for ``stats``."""
    x = (
        torch.cat([t.reshape(-1, t.shape[-1]).float() for t in h])
        if not isinstance(h, torch.Tensor)
        else h.reshape(-1, h.shape[-1]).float()
    )
    return x.mean(0), x.std(0) + eps
