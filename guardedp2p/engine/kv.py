"""Incremental (KV-cached) forward of one split part, for generation (issue 18).

Generation with the split model (GuardedTuning, arXiv 2501.04323: the client's data stays private at inference
too) runs the same three parts as training, but token by token: after the prompt, each party feeds only the new
positions through its blocks and keeps the keys and values of every earlier position in its own cache. The
client caches its bottom and top blocks, the provider its trunk; only one position's activation crosses the wire
each way per new token.

Each party rebuilds what its blocks need from the 2-D attention mask of every position seen so far (the
:class:`KvCache` keeps it), exactly as the Hugging Face model does inside ``generate``: position ids are the
running count of real tokens (``cumsum(mask) - 1``, padding at 0, so left-padded batches work), the 4-D masks come
from ``transformers.masking_utils`` sized against the cache, and the cache is a stock ``DynamicCache`` built from
the model config (sliding-window layers keep only their window). Because a part's cache is indexed by *global*
block index and holds entries only for the part's own blocks, every mask is sized against the first owned block
of its kind (``layer_idx``), never against block 0. Split greedy decoding with lossless codecs therefore produces
the tokens of the unsplit ``generate`` (tests/designs/online/test_generate.py).

Supported: the llama family of :mod:`guardedp2p.engine.arch` (llama, mistral, qwen2). OPT and GPT-2 keep their
training support but are refused here with :class:`UnsupportedArchitectureError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from guardedp2p.engine.arch import LayerContext, UnsupportedArchitectureError, config_of, module_at

if TYPE_CHECKING:
    from transformers import PretrainedConfig
    from transformers.cache_utils import DynamicCache

    from guardedp2p.engine.split import _SplitPart

GENERATION_MODEL_TYPES = ("llama", "mistral", "qwen2")
FULL = "full_attention"
SLIDING = "sliding_attention"


def check_generation_support(config: PretrainedConfig) -> None:
    """Raise :class:`UnsupportedArchitectureError` unless split generation supports ``config.model_type``."""
    model_type = getattr(config, "model_type", None)
    if model_type not in GENERATION_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"split generation with a KV cache supports model types {', '.join(GENERATION_MODEL_TYPES)}; this model "
            f"is {model_type!r} (it can still be tuned, but not used for split generation)"
        )


@dataclass
class KvCache:
    """One party's cache for one generation: the keys/values of its own blocks and the mask of every position.

    ``mask`` is the ``[batch, positions]`` 0/1 mask of everything fed so far (the prompt's padding included); it is
    what the position ids and attention masks of the next positions are derived from.
    """

    cache: DynamicCache
    mask: torch.Tensor | None = None
    layers: tuple[int, ...] = field(default=())
    plan: _Plan | None = None  # what every call needs about the part, found once (a decode step is short)

    @property
    def length(self) -> int:
        """Positions fed so far (0 before the first call)."""
        return 0 if self.mask is None else int(self.mask.shape[1])

    @property
    def batch(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[0])

    def nbytes(self) -> int:
        """Bytes of the cached keys and values (what a provider's per-session budget counts)."""
        total = 0
        for layer in self.cache.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total

    def clear(self) -> None:
        """Drop every cached tensor now (session end, timeout, refusal) rather than when the object is collected."""
        self.cache.reset()
        self.mask = None


@dataclass(frozen=True)
class _Plan:
    device: torch.device
    dtype: torch.dtype
    block_devices: tuple[torch.device | None, ...]  # per owned block, in order
    kinds: tuple[str, ...]  # per global block index: full or sliding attention
    cache_kwarg: str


def _plan(part: _SplitPart, kv: KvCache) -> _Plan:
    from guardedp2p.engine.split import _block_device

    blocks = part.blocks
    layers = part.layer_range
    return _Plan(
        part.device,
        part.compute_dtype,
        tuple(_block_device(blocks[i]) for i in layers),
        _layer_kinds(kv, layers),
        _cache_kwarg(type(blocks[layers.start])) if len(layers) else "cache",
    )


def new_cache(part: _SplitPart) -> KvCache:
    """An empty cache for ``part`` (a ``DynamicCache`` from the model config: sliding layers keep their window)."""
    from transformers.cache_utils import DynamicCache

    check_generation_support(part.config)
    return KvCache(DynamicCache(config=part.config), None, tuple(part.layer_range))


def kv_bytes_per_position(config: PretrainedConfig, n_layers: int, dtype: torch.dtype) -> int:
    """Upper bound of the cache bytes one position of one sequence costs over ``n_layers`` blocks (keys + values;
    sliding-window blocks cost less once their window is full). Used to refuse a request *before* computing it."""
    cfg = config_of(config)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * n_layers * kv_heads * head_dim * itemsize


def positions_of(full_mask: torch.Tensor, new: int) -> torch.Tensor:
    """Position ids of the last ``new`` positions: the count of real tokens before each (``generate``'s rule)."""
    pos = full_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(full_mask == 0, 0)
    return pos[:, -new:]


def _layer_kinds(kv: KvCache, layers: range) -> tuple[str, ...]:
    sliding = kv.cache.is_sliding
    n = len(sliding)
    return tuple(SLIDING if (i < n and sliding[i]) else FULL for i in range(max(n, layers.stop)))


def _context(
    part: _SplitPart,
    h: torch.Tensor,
    kv: KvCache,
    full_mask: torch.Tensor,
    position_ids: torch.Tensor,
    kinds: tuple[str, ...],
) -> LayerContext:
    """Masks (sized against the cache *before* this call updates it), position ids and rotary tables."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    layers = part.layer_range
    # generate() drops an all-ones mask (no padding): the mask functions may then use the fast causal path
    mask2d = None if bool((full_mask == 1).all()) else full_mask
    masks: dict[str, Any] = {}
    for kind in (FULL, SLIDING):
        owned = [i for i in layers if kinds[i] == kind]
        if not owned:
            continue
        make = create_causal_mask if kind == FULL else create_sliding_window_causal_mask
        masks[kind] = make(
            config=part.config,
            inputs_embeds=h,
            attention_mask=mask2d,
            cache=kv.cache,
            position_ids=position_ids,
            layer_idx=owned[0],
        )
    rotary = module_at(part, "model.rotary_emb")(h, position_ids=position_ids)
    return LayerContext(masks, position_ids, rotary, kinds)


_CACHE_KWARG: dict[type, str] = {}


def _cache_kwarg(block_type: type[torch.nn.Module]) -> str:
    """The decoder layer's name for the cache argument (``cache`` in recent transformers, ``past_key_values``
    before), looked up once per layer class."""
    name = _CACHE_KWARG.get(block_type)
    if name is None:
        import inspect

        params = inspect.signature(block_type.forward).parameters
        name = _CACHE_KWARG[block_type] = "cache" if "cache" in params else "past_key_values"
    return name


def cached_blocks(part: _SplitPart, h: torch.Tensor, kv: KvCache, new_mask: torch.Tensor) -> torch.Tensor:
    """Run ``part``'s own blocks on the new positions ``h`` [B, L, d] with mask ``new_mask`` [B, L]; update ``kv``.

    The first call (empty cache) is the prompt; later calls append. Returns the part's output for the new
    positions only. Blocks spread over several devices (a provider's ``--device-map``) are followed as in
    :meth:`guardedp2p.engine.split._SplitPart._run_blocks`.
    """
    if h.dim() != 3 or new_mask.shape != h.shape[:2]:
        raise ValueError(
            f"cached_blocks expects h [B, L, d] and mask [B, L]; got {list(h.shape)}, {list(new_mask.shape)}"
        )
    if kv.plan is None:
        check_generation_support(part.config)
        kv.plan = _plan(part, kv)
    plan = kv.plan
    dev = plan.device
    h = h.to(dev, plan.dtype) if h.is_floating_point() else h.to(dev)
    new_mask = new_mask.to(dev, torch.long)
    if kv.mask is not None and kv.mask.shape[0] != h.shape[0]:
        raise ValueError(f"the cache holds {kv.mask.shape[0]} sequences, the new positions {h.shape[0]}")
    full = new_mask if kv.mask is None else torch.cat([kv.mask.to(dev), new_mask], dim=1)
    position_ids = positions_of(full, h.shape[1])
    if len(part.layer_range) == 0:
        kv.mask = full
        return h
    ctx = _context(part, h, kv, full, position_ids, plan.kinds)
    contexts = {h.device: ctx}
    blocks = part.blocks
    name = plan.cache_kwarg
    for i, bdev in zip(part.layer_range, plan.block_devices):
        if bdev is not None and bdev != h.device:
            h = h.to(bdev)
            if bdev not in contexts:
                contexts[bdev] = ctx.to(bdev)
        c = contexts.get(h.device, ctx)
        out = blocks[i](
            h,
            attention_mask=c.mask_for(i),
            position_ids=c.position_ids,
            position_embeddings=c.position_embeddings,
            use_cache=True,
            **{name: kv.cache},
        )
        h = out[0] if isinstance(out, tuple) else out
    kv.mask = full
    return h


def cached_embed(part: _SplitPart, input_ids: torch.Tensor) -> torch.Tensor:
    """The embedding step of the llama family (token embeddings only; positions enter through the rotary tables)."""
    check_generation_support(part.config)
    return module_at(part, "model.embed_tokens")(input_ids.to(part.device))


def last_logits(part: _SplitPart, h: torch.Tensor) -> torch.Tensor:
    """fp32 logits of the last position of each row: final norm over every new position, then the LM head on the
    last one only (``generate``'s ``logits_to_keep=1``)."""
    normed = module_at(part, "model.norm")(h)
    return module_at(part, "lm_head")(normed[:, -1:, :])[:, -1, :].float()


__all__ = [
    "GENERATION_MODEL_TYPES",
    "KvCache",
    "cached_blocks",
    "cached_embed",
    "check_generation_support",
    "kv_bytes_per_position",
    "last_logits",
    "new_cache",
    "positions_of",
]
