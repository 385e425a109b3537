"""The attacker's copy of the pre-trained model and helpers shared by the attacks.

Threat model (the GuardedTuning threat model (arXiv 2501.04323; SECURITY.md)): the provider knows the *pre-trained* weights of every layer, never the client's
fine-tuned LoRA. :class:`AttackerModel` wraps such a pre-trained model with the public split and exposes the
three operations the attacks need: the mock bottom ``A_in⁰`` (from token ids or from dummy token embeddings),
the mock top ``A_out⁰`` and the embedding table ``W_E``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from guardedp2p.engine.split import ClientBottom, ClientTop, SplitConfig
from guardedp2p.errors import ConfigError

Transform = Callable[[torch.Tensor], torch.Tensor]


class AttackConfigError(ConfigError):
    """An attack was configured or called in a way that cannot work."""


def identity(h: torch.Tensor) -> torch.Tensor:
    return h


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on every parameter (restored afterwards).

    The attacks differentiate w.r.t. their own variables only; freezing avoids building and accumulating
    parameter gradients on a model the caller may still use.
    """
    params = list(module.parameters())
    saved = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, s in zip(params, saved):
            p.requires_grad_(s)


class AttackerModel:
    """Pre-trained bottom/top mocks and embedding table of the split model."""

    def __init__(self, model: nn.Module, split: SplitConfig, device: str | torch.device | None = None) -> None:
        get_base = getattr(model, "get_base_model", None)
        if callable(get_base):
            model = get_base()
        self.model = model
        self.split = split
        self.bottom = ClientBottom(model, split)
        self.top = ClientTop(model, split)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        hf: Any = model  # a Hugging Face PreTrainedModel: its helpers are not visible through nn.Module's typing
        self.embedding: nn.Module = hf.get_input_embeddings()
        self.vocab_size = int(self.embedding.weight.shape[0])
        self.hidden_size = int(hf.config.hidden_size)

    @property
    def W_E(self) -> torch.Tensor:
        """The token embedding table (V x d_emb), detached."""
        weight = self.embedding.weight
        assert isinstance(weight, torch.Tensor)
        return weight.detach()

    def h1(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """A_in⁰(x), no gradient."""
        with torch.no_grad():
            return self.bottom(input_ids.to(self.device), attention_mask.to(self.device)).float()

    def h1_from_embeddings(self, token_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """A_in⁰ run on dummy *token* embeddings (differentiable).

        The dummy replaces the output of the embedding table only; whatever the architecture adds afterwards
        (learned positions, ``project_in``, dropout) stays inside A_in⁰ (Chen et al., BiSR, CCS'24, arXiv 2409.00960, §BiSR(f)). Implemented
        with a forward hook on the input-embedding module, so it works for every architecture in the table.
        """
        B, L = attention_mask.shape
        dummy_ids = torch.zeros(B, L, dtype=torch.long, device=self.device)

        def hook(_mod: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
            return token_embeds.to(out.dtype)

        handle = self.embedding.register_forward_hook(hook)
        try:
            return self.bottom(dummy_ids, attention_mask.to(self.device))
        finally:
            handle.remove()

    def logits_top(self, h2: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.top(h2.to(self.device), attention_mask.to(self.device)).float()

    def decode_embeddings(self, token_embeds: torch.Tensor, metric: str = "dot") -> torch.Tensor:
        """Nearest token per position: argmax_v <E_t, W_E[v]> ("dot", the reference) or cosine ("cos")."""
        W = self.W_E.float()
        E = token_embeds.detach().float()
        if metric == "cos":
            W = torch.nn.functional.normalize(W, dim=-1)
            E = torch.nn.functional.normalize(E, dim=-1)
        elif metric != "dot":
            raise AttackConfigError(f"unknown decoding metric {metric!r}; use 'dot' or 'cos'")
        return (E @ W.T).argmax(-1)

    def frozen(self) -> contextlib.AbstractContextManager[None]:
        return frozen(self.model)


@dataclass
class Reconstruction:
    """Token ids recovered for one observation (B x L, pads included; score only the masked positions)."""

    ids: torch.Tensor
    logits: torch.Tensor | None = None  # B x L x V scores used to initialise a later stage, if any
    info: dict[str, Any] | None = None


def valid_ids(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Per row, the ids at the positions where the attention mask is 1."""
    return [[int(t) for t, m in zip(r.tolist(), mr.tolist()) if m] for r, mr in zip(ids, mask)]


def logits_from_ids(ids: torch.Tensor, vocab_size: int, confidence: float = 10.0) -> torch.Tensor:
    """One-hot-like scores (``confidence`` on the given id, 0 elsewhere) to initialise a soft-label stage."""
    z = torch.zeros(*ids.shape, vocab_size)
    z.scatter_(-1, ids.unsqueeze(-1).cpu(), confidence)
    return z


def codec_transform(name: str) -> Transform:
    """The public uplink mechanism of a codec: h -> decode(encode(h)) (deterministic rounding, as on the wire).

    Used to train a defence-aware inverter and to simulate what the provider receives.
    """
    from guardedp2p.wire.codecs import get_codec

    codec = get_codec(name)

    def transform(h: torch.Tensor) -> torch.Tensor:
        return codec.decode(codec.encode(h), tuple(h.shape), h.dtype, h.device)

    transform.__name__ = f"codec_{name}"
    return transform
