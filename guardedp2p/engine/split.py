"""Bottom / trunk / top partition of a causal LM (GuardedTuning, arXiv 2501.04323; docs/architecture.md "The split").

The client keeps the embedding step + blocks [0, a) (``ClientBottom``) and blocks [b, n) + final norm + LM head
(``ClientTop``); the provider runs blocks [a, b) (``ProviderTrunk``), with b = n - top_layers.

Every part keeps the Hugging Face attribute layout and *global* layer indices: it holds e.g. ``model.layers`` as
an ``nn.ModuleList`` of length n with ``nn.Identity`` placeholders at the indices it does not own. That is what
lets a stock PEFT adapter saved from a part load into the unsplit model and vice versa (measured with peft 0.21:
renumbered layers make ``PeftModel.from_pretrained`` silently load nothing; tests/engine/test_lora.py). Parts
built from the same model object share its modules (no copies), so attaching LoRA to a part also patches that
model's layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from guardedp2p.engine.arch import ArchSpec, config_of, get_arch, get_path, num_layers
from guardedp2p.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

IGNORE_INDEX = -100


class SplitConfigError(ConfigError):
    """The split points do not fit the model."""


@dataclass(frozen=True)
class SplitConfig:
    """Number of blocks the client keeps at each end of the model."""

    bottom_layers: int = 2
    top_layers: int = 2

    def validate(self, n_layers: int) -> None:
        """Raise ``SplitConfigError`` unless 1 <= bottom, 0 <= top and the trunk keeps at least one block."""
        for name in ("bottom_layers", "top_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise SplitConfigError(f"{name} must be an integer, got {v!r}")
        if self.bottom_layers < 1:
            raise SplitConfigError(
                f"bottom_layers must be >= 1 (got {self.bottom_layers}): the provider must never see raw embeddings"
            )
        if self.top_layers < 0:
            raise SplitConfigError(f"top_layers must be >= 0 (got {self.top_layers})")
        trunk = n_layers - self.bottom_layers - self.top_layers
        if trunk < 1:
            raise SplitConfigError(
                f"split {self.bottom_layers}/{trunk}/{self.top_layers} leaves no trunk: the model has {n_layers} "
                f"blocks, so bottom_layers + top_layers must be at most {n_layers - 1}"
            )

    def bounds(self, n_layers: int) -> tuple[int, int]:
        """Return (a, b): the bottom owns [0, a), the trunk [a, b), the top [b, n)."""
        self.validate(n_layers)
        return self.bottom_layers, n_layers - self.top_layers

    def bottom_range(self, n_layers: int) -> range:
        a, _ = self.bounds(n_layers)
        return range(0, a)

    def trunk_range(self, n_layers: int) -> range:
        a, b = self.bounds(n_layers)
        return range(a, b)

    def top_range(self, n_layers: int) -> range:
        _, b = self.bounds(n_layers)
        return range(b, n_layers)

    def client_layers(self, n_layers: int) -> list[int]:
        """Global indices of the blocks the client holds (where its LoRA goes)."""
        return list(self.bottom_range(n_layers)) + list(self.top_range(n_layers))


def base_model(model: nn.Module) -> nn.Module:
    """The HF model itself when ``model`` is a PeftModel wrapping it (``get_base_model``), else ``model``."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _child_container(parent: nn.Module, name: str) -> nn.Module:
    """``parent.<name>``, created as an empty ``nn.Module`` when the skeleton does not have it yet."""
    child = parent._modules.get(name)
    if child is None:
        child = nn.Module()
        parent.add_module(name, child)
    return child


def _graft(dst: nn.Module, src: nn.Module, path: str) -> None:
    """Make ``dst.<path>`` the very same module as ``src.<path>``, creating empty containers on the way."""
    *parents, leaf = path.split(".")
    s: Any = src
    d: nn.Module = dst
    for p in parents:
        s = getattr(s, p)
        d = _child_container(d, p)
    value = getattr(s, leaf)
    if value is None:
        setattr(d, leaf, None)  # e.g. OPT project_in when word_embed_proj_dim == hidden_size
    else:
        d.add_module(leaf, value)


def _graft_blocks(dst: nn.Module, src: nn.Module, path: str, owned: range, n: int) -> None:
    blocks = get_path(src, path)
    if len(blocks) != n:
        raise SplitConfigError(f"{path} has {len(blocks)} blocks but config.num_hidden_layers is {n}")
    keep = set(owned)
    *parents, leaf = path.split(".")
    d: nn.Module = dst
    for p in parents:
        d = _child_container(d, p)
    d.add_module(leaf, nn.ModuleList([blocks[i] if i in keep else nn.Identity() for i in range(n)]))


class _SplitPart(nn.Module):
    """Common machinery: HF-shaped skeleton plus running the owned blocks."""

    role = "part"

    def __init__(self, model: nn.Module, cfg: SplitConfig, owned: range, *, embed: bool, head: bool) -> None:
        super().__init__()
        model = base_model(model)
        arch = get_arch(model)
        n = num_layers(model)
        cfg.validate(n)
        self.config: PretrainedConfig = config_of(model)
        self.arch: ArchSpec = arch
        self.split_config = cfg
        self.n_layers = n
        self.layer_range = owned
        if embed:
            for p in arch.embed_paths:
                _graft(self, model, p)
        _graft_blocks(self, model, arch.blocks_path, owned, n)
        for p in arch.shared_paths:
            _graft(self, model, p)
        if head:
            for p in arch.head_paths:
                _graft(self, model, p)

    @property
    def blocks(self) -> nn.ModuleList:
        return get_path(self, self.arch.blocks_path)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the first owned weight (the first block's, when blocks are spread)."""
        return next(self.parameters()).device

    @property
    def compute_dtype(self) -> torch.dtype:
        """The floating dtype the part computes in.

        The first *floating* parameter decides: bitsandbytes stores quantized weights as int8/uint8, and the
        norms and biases next to them carry the compute precision (``--dtype``). fp32 when there is none.
        """
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def _run_blocks(self, h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if len(self.layer_range) == 0:
            return h
        ctx = self.arch.context(self, self.config, h, attention_mask, self.layer_range)
        contexts = {h.device: ctx}
        blocks = self.blocks
        for i in self.layer_range:
            dev = _block_device(blocks[i])
            if dev is not None and dev != h.device:
                # blocks spread over several devices (provider --device-map): follow the weights
                h = h.to(dev)
                if dev not in contexts:
                    contexts[dev] = ctx.to(dev)
            h = self.arch.call_block(blocks[i], h, contexts.get(h.device, ctx), i)
        return h

    def _inputs(self, h: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Move inputs to the part's first device; hidden states also take the part's compute dtype, so an fp32
        tensor from the wire can enter a bf16 or quantized part (the cast is part of the autograd graph)."""
        dev = self.device
        if attention_mask is not None:
            attention_mask = attention_mask.to(dev)
        if h.is_floating_point():
            return h.to(dev, self.compute_dtype), attention_mask
        return h.to(dev), attention_mask

    def extra_repr(self) -> str:
        r = self.layer_range
        return f"{self.role}: layers [{r.start}, {r.stop}) of {self.n_layers}, model_type={self.config.model_type}"


def _block_device(block: nn.Module) -> torch.device | None:
    """Device of a block's weights; None for a parameter-free block or weights offloaded to meta (accelerate
    hooks then place the inputs themselves)."""
    p = next(block.parameters(), None)
    if p is None or p.device.type == "meta":
        return None
    return p.device


class ClientBottom(_SplitPart):
    """Embedding step + blocks [0, a). Output h1 is what goes on the wire to the provider."""

    role = "client bottom"

    def __init__(self, model: nn.Module, cfg: SplitConfig) -> None:
        super().__init__(model, cfg, cfg.bottom_range(num_layers(base_model(model))), embed=True, head=False)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """E(x): the input of block 0 (token embedding, learned positions, projection, dropout as in HF)."""
        input_ids, attention_mask = self._inputs(input_ids, attention_mask)
        return self.arch.embed(self, input_ids, attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        return_embeddings: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Return h1, or (h1, E(x)) so a distance-correlation penalty does not recompute the embeddings."""
        input_ids, attention_mask = self._inputs(input_ids, attention_mask)
        e = self.arch.embed(self, input_ids, attention_mask)
        h = self._run_blocks(e, attention_mask)
        return (h, e) if return_embeddings else h


class ProviderTrunk(_SplitPart):
    """Blocks [a, b): the provider's part. It holds no embedding and no head."""

    role = "provider trunk"

    def __init__(self, model: nn.Module, cfg: SplitConfig) -> None:
        super().__init__(model, cfg, cfg.trunk_range(num_layers(base_model(model))), embed=False, head=False)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h, attention_mask = self._inputs(h, attention_mask)
        return self._run_blocks(h, attention_mask)


class ClientTop(_SplitPart):
    """Blocks [b, n) + final norm (+ OPT project_out) + LM head."""

    role = "client top"

    def __init__(self, model: nn.Module, cfg: SplitConfig) -> None:
        super().__init__(model, cfg, cfg.top_range(num_layers(base_model(model))), embed=False, head=True)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h, attention_mask = self._inputs(h, attention_mask)
        return self.arch.head(self, self._run_blocks(h, attention_mask))


@dataclass
class SplitParts:
    bottom: ClientBottom
    trunk: ProviderTrunk
    top: ClientTop

    def __iter__(self) -> Iterator[nn.Module]:
        return iter((self.bottom, self.trunk, self.top))


@dataclass
class ClientParts:
    bottom: ClientBottom
    top: ClientTop

    def __iter__(self) -> Iterator[nn.Module]:
        return iter((self.bottom, self.top))


def split_model(model: nn.Module, cfg: SplitConfig | None = None) -> SplitParts:
    """All three parts, sharing ``model``'s modules."""
    cfg = cfg or SplitConfig()
    return SplitParts(ClientBottom(model, cfg), ProviderTrunk(model, cfg), ClientTop(model, cfg))


def build_client_parts(model: nn.Module, cfg: SplitConfig | None = None) -> ClientParts:
    """Only the client's parts; drop every other reference to ``model`` afterwards to free the trunk."""
    cfg = cfg or SplitConfig()
    return ClientParts(ClientBottom(model, cfg), ClientTop(model, cfg))


def build_trunk(model: nn.Module, cfg: SplitConfig | None = None) -> ProviderTrunk:
    """Only the provider's trunk; drop every other reference to ``model`` afterwards to free the rest."""
    return ProviderTrunk(model, cfg or SplitConfig())


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Causal-LM loss exactly as transformers' ``ForCausalLMLoss``: shift by one, mean over labels != -100.

    Like HF, a batch whose labels are all ``ignore_index`` gives NaN; callers should not send such batches.
    Computed by :func:`guardedp2p.engine.loss.causal_lm_cross_entropy`, whose backward holds two logits-sized
    tensors instead of ``F.cross_entropy``'s three (the client's peak memory; docs/results/kit.md).
    """
    from guardedp2p.engine.loss import causal_lm_cross_entropy

    logits = logits.float()
    labels = F.pad(labels.to(logits.device), (0, 1), value=ignore_index)[..., 1:].contiguous()
    return causal_lm_cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index)
