"""Baseline attacks of the BiSR suite (Chen et al., BiSR, CCS'24, arXiv 2409.00960, baselines): TAG*, LAMP and EIA*.

TAG*  gradient matching at the cut (the BiSR(b) objective) from a random start: no learned prior.
LAMP  TAG plus, every ``search_every`` steps, a discrete search over reorderings of the current argmax sequence,
      scored by gradient distance + ``lm_weight`` x the pre-trained LM's loss on the candidate.
EIA*  embedding inversion from h₁ alone: token logits Z, input gumbel-softmax(Z, τ) · W_E through A_in⁰,
      squared-error matching (Song & Raghunathan-style, no learned prior).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from guardedp2p.attacks.bisr import GradientMatcher, GradMatchConfig, StepCallback, gradient_match, math_attention
from guardedp2p.attacks.common import AttackConfigError, AttackerModel, Reconstruction


def tag_config() -> GradMatchConfig:
    """TAG* defaults (LLaMA2 column of Chen et al., BiSR, CCS'24, arXiv 2409.00960): 100 steps, lr 0.09, β 0.85, random start."""
    return GradMatchConfig(steps=100, lr=0.09)


def tag(
    attacker: AttackerModel,
    h2: torch.Tensor,
    g2: torch.Tensor,
    mask: torch.Tensor,
    config: GradMatchConfig | None = None,
    *,
    first_token: int | None = None,
    callback: StepCallback | None = None,
) -> Reconstruction:
    """TAG*: gradient matching from random soft labels."""
    return gradient_match(
        attacker, h2, g2, mask, None, config or tag_config(), first_token=first_token, callback=callback
    )


# ------------------------------------------------------------------------------------------------------- LAMP
@dataclass
class LAMPConfig:
    """LAMP = TAG + periodic discrete reordering search.

    normalise_distance [I]: divide each candidate's gradient distance by the current sequence's, so the
    ``lm_weight`` trade-off does not depend on the (arbitrary) scale of g₂.
    """

    grad: GradMatchConfig = field(default_factory=tag_config)
    search_every: int = 30
    candidates: int = 100
    lm_weight: float = 0.2
    normalise_distance: bool = True
    seed: int = 0


def _reorderings(n: int, k: int, rng: random.Random) -> list[list[int]]:
    """``k`` random permutations of range(n) from LAMP's four moves (swap, move one, move a span, rotate)."""
    out: list[list[int]] = []
    if n < 2:
        return out
    for _ in range(k):
        p = list(range(n))
        move = rng.randrange(4)
        if move == 0:
            i, j = rng.sample(range(n), 2)
            p[i], p[j] = p[j], p[i]
        elif move == 1:
            i = rng.randrange(n)
            t = p.pop(i)
            p.insert(rng.randrange(n), t)
        elif move == 2:
            i = rng.randrange(n)
            j = rng.randrange(i + 1, n + 1)
            span, rest = p[i:j], p[:i] + p[j:]
            at = rng.randrange(len(rest) + 1)
            p = rest[:at] + span + rest[at:]
        else:
            r = rng.randrange(1, n)
            p = p[r:] + p[:r]
        if p != list(range(n)):
            out.append(p)
    return out


def _lm_loss(attacker: AttackerModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean next-token NLL of the attacker's full pre-trained model."""
    with torch.no_grad():
        logits = attacker.model(
            input_ids=ids.to(attacker.device), attention_mask=mask.to(attacker.device)
        ).logits.float()
    lab = ids.to(attacker.device).clone()
    lab[mask.to(attacker.device) == 0] = -100
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), lab[:, 1:], ignore_index=-100, reduction="none")
    valid = (lab[:, 1:] != -100).float()
    return (nll * valid).sum(-1) / valid.sum(-1).clamp_min(1)


def lamp(
    attacker: AttackerModel,
    h2: torch.Tensor,
    g2: torch.Tensor,
    mask: torch.Tensor,
    config: LAMPConfig | None = None,
    *,
    first_token: int | None = None,
    callback: StepCallback | None = None,
) -> Reconstruction:
    """LAMP-style attack: TAG with a reordering search every ``search_every`` steps (position 0 stays put)."""
    cfg = config or LAMPConfig()
    rng = random.Random(cfg.seed)
    mask_cpu = mask.cpu().long()

    def hook(step: int, Y: torch.Tensor, m: GradientMatcher) -> torch.Tensor | None:
        if (step + 1) % cfg.search_every != 0:
            return None
        ids = Y.argmax(-1)
        newY = Y.clone()
        cur_d = m.distance_of_ids(ids)
        cur_lm = _lm_loss(attacker, ids, mask_cpu)
        changed = False
        for b in range(ids.shape[0]):
            n = int(mask_cpu[b].sum())
            perms = _reorderings(n - 1, cfg.candidates, rng)  # positions 1..n-1; token 0 is never a label
            if not perms:
                continue
            scale = float(cur_d[b]) if cfg.normalise_distance and float(cur_d[b]) > 0 else 1.0
            best_score = float(cur_d[b]) / scale + cfg.lm_weight * float(cur_lm[b])
            best_perm = None
            for p in perms:
                order = torch.tensor([0] + [1 + i for i in p], device=ids.device)
                cand = ids.clone()
                cand[b, :n] = ids[b, order]
                score = float(m.distance_of_ids(cand)[b]) / scale + cfg.lm_weight * float(
                    _lm_loss(attacker, cand[b : b + 1], mask_cpu[b : b + 1])[0]
                )
                if score < best_score:
                    best_score, best_perm = score, order
            if best_perm is not None:
                newY[b, :n] = Y[b, best_perm]
                changed = True
        return newY if changed else None

    if h2 is None or g2 is None:
        raise AttackConfigError("LAMP needs h2 and g2 (an Online training step)")
    with attacker.frozen(), math_attention():
        return gradient_match(
            attacker, h2, g2, mask, None, cfg.grad, first_token=first_token, callback=callback, hook=hook
        )


# ------------------------------------------------------------------------------------------------------- EIA
@dataclass
class EIAConfig:
    """EIA* hyper-parameters (Chen et al., BiSR, CCS'24, arXiv 2409.00960; the reference allows up to 72,000 steps)."""

    steps: int = 72000
    lr: float = 0.09
    weight_decay: float = 0.01
    temperature: float = 0.2
    tol: float = 1e-7
    seed: int = 0


def eia(
    attacker: AttackerModel,
    h1: torch.Tensor,
    mask: torch.Tensor,
    config: EIAConfig | None = None,
    *,
    callback: StepCallback | None = None,
    stop: Callable[[], bool] | None = None,
) -> Reconstruction:
    """Relaxed one-hot inversion of h₁ through A_in⁰ (squared error over real positions)."""
    cfg = config or EIAConfig()
    if h1 is None:
        raise AttackConfigError("EIA needs the observed h1")
    dev = attacker.device
    mask = mask.to(dev).long()
    target = h1.detach().to(dev).float()
    W = attacker.W_E.float()
    gen = torch.Generator().manual_seed(cfg.seed)
    Z = (torch.randn((*mask.shape, W.shape[0]), generator=gen) * 0.01).to(dev).requires_grad_(True)
    opt = torch.optim.AdamW([Z], lr=cfg.lr, weight_decay=cfg.weight_decay)
    m = mask.float().unsqueeze(-1)
    last = float("nan")
    torch.manual_seed(cfg.seed)
    with attacker.frozen():
        for step in range(cfg.steps):
            E = F.gumbel_softmax(Z, tau=cfg.temperature, hard=False, dim=-1) @ W
            pred = attacker.h1_from_embeddings(E, mask).float()
            loss = ((pred - target).pow(2) * m).sum() / m.sum().clamp_min(1) / target.shape[-1]
            last = float(loss.detach())
            if last < cfg.tol or (stop is not None and stop()):
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if callback is not None:
                callback(step, last)
    Zd = Z.detach().cpu()
    return Reconstruction(ids=Zd.argmax(-1), logits=Zd, info={"loss": last})
