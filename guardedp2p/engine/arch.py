"""Per-architecture knowledge needed to run a causal LM block by block.

A split part must reproduce exactly what the Hugging Face ``forward`` does between two block boundaries, so
each entry below mirrors ``modeling_<arch>.py`` of the installed transformers (5.x): the embedding step, the
per-layer context (4-D mask in the format of the configured attention implementation, position ids, rotary
embeddings), how one block is called, and the head. All functions take a *root* module that has the same
attribute layout as the HF model (``model.layers``, ``transformer.h`` ...): either the full model or one of the
split parts, which keep HF naming on purpose (see ``split.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from guardedp2p.errors import ConfigError

if TYPE_CHECKING:  # transformers is imported lazily: the wire and protocol layers import this module
    from transformers import PretrainedConfig


class UnsupportedArchitectureError(ConfigError):
    """The model's ``model_type`` has no entry in the architecture table."""


@dataclass
class LayerContext:
    """What every block of one forward pass needs besides the hidden states.

    It is rebuilt by each party from the (right-padded) 2-D attention mask, which is cheap and keeps the wire
    format to ``(h, attention_mask)``.
    """

    masks: dict[str, Any]
    position_ids: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    layer_types: tuple[str, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def mask_for(self, layer_idx: int) -> Any:
        kind = self.layer_types[layer_idx] if self.layer_types else "full_attention"
        return self.masks[kind]

    def to(self, device: torch.device) -> LayerContext:
        """A copy with every tensor on ``device``: a trunk spread over several GPUs (``--device-map``) runs each
        block where its weights are, so the masks and rotary tables must follow the hidden states."""
        return LayerContext(
            {k: _move(v, device) for k, v in self.masks.items()},
            self.position_ids.to(device),
            _move(self.position_embeddings, device),
            self.layer_types,
            {k: _move(v, device) for k, v in self.extra.items()},
        )


def _move(value: Any, device: torch.device) -> Any:
    """Move a tensor, a tuple/list of tensors or any object with ``.to`` (flex-attention BlockMask); keep None."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device) for v in value)
    to = getattr(value, "to", None)
    return to(device) if callable(to) else value


@dataclass(frozen=True)
class ArchSpec:
    """How to run one architecture piecewise. Paths are attribute paths from the root of the HF model."""

    family: str
    blocks_path: str
    embed_paths: tuple[str, ...]  # modules of the embedding step (owned by the client bottom)
    head_paths: tuple[str, ...]  # final norm / projection / LM head (owned by the client top)
    shared_paths: tuple[str, ...]  # parameter-free helpers every part with blocks needs (rotary embedding)
    layers_pattern: str  # name of the block list, for peft's layers_to_transform
    lora_targets: tuple[str, ...]
    fan_in_fan_out: bool  # GPT-2 uses Conv1D (weights stored transposed)
    embed: Callable[[nn.Module, torch.Tensor, torch.Tensor | None], torch.Tensor]
    context: Callable[[nn.Module, PretrainedConfig, torch.Tensor, torch.Tensor | None, Iterable[int]], LayerContext]
    call_block: Callable[[nn.Module, torch.Tensor, LayerContext, int], torch.Tensor]
    head: Callable[[nn.Module, torch.Tensor], torch.Tensor]


def get_path(root: nn.Module, path: str) -> Any:
    """Resolve a dotted attribute path from the fixed table below (never from user or wire input)."""
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def module_at(root: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path`` (see ``get_path``), typed; a model without that layout gets a clear error."""
    obj = get_path(root, path)
    if not isinstance(obj, nn.Module):
        raise UnsupportedArchitectureError(
            f"{path} is a {type(obj).__name__}, not a module: the model does not have the layout of its model_type"
        )
    return obj


def optional_module_at(root: nn.Module, path: str) -> nn.Module | None:
    """Like ``module_at`` for slots HF sets to None when unused (OPT ``project_in`` / ``project_out``)."""
    return None if get_path(root, path) is None else module_at(root, path)


def _unwrap(out: Any) -> torch.Tensor:
    # transformers 5 decoder layers return a tensor; older versions returned a tuple (hidden, attn, ...).
    return out[0] if isinstance(out, tuple) else out


def _ones_mask(h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(h.shape[0], h.shape[1], dtype=torch.long, device=h.device)
    return attention_mask


def _arange_positions(h: torch.Tensor) -> torch.Tensor:
    # Same as the HF models without cache: arange(L) broadcast over the batch (right padding assumed).
    return torch.arange(h.shape[1], device=h.device).unsqueeze(0)


# ---------------------------------------------------------------- llama family (llama, mistral, qwen2)


def _llama_embed(root: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    return module_at(root, "model.embed_tokens")(input_ids)


def _llama_context(
    root: nn.Module,
    config: PretrainedConfig,
    h: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layers: Iterable[int],
) -> LayerContext:
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    position_ids = _arange_positions(h)
    kw = dict(config=config, inputs_embeds=h, attention_mask=attention_mask, cache=None, position_ids=position_ids)
    layer_types = None
    masks: dict[str, Any] = {}
    if config.model_type == "qwen2" and getattr(config, "layer_types", None):
        # Qwen2Model: a mask per layer type, sliding only for "sliding_attention" layers.
        layer_types = tuple(config.layer_types)
        needed = {layer_types[i] for i in layers}
        if "full_attention" in needed:
            masks["full_attention"] = create_causal_mask(**kw)
        if "sliding_attention" in needed:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kw)
    elif config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
        masks["full_attention"] = create_sliding_window_causal_mask(**kw)  # MistralModel: one mask, sliding
    else:
        masks["full_attention"] = create_causal_mask(**kw)
    position_embeddings = module_at(root, "model.rotary_emb")(h, position_ids=position_ids)
    return LayerContext(masks, position_ids, position_embeddings, layer_types)


def _llama_block(block: nn.Module, h: torch.Tensor, ctx: LayerContext, idx: int) -> torch.Tensor:
    return _unwrap(
        block(
            h,
            attention_mask=ctx.mask_for(idx),
            position_embeddings=ctx.position_embeddings,
            position_ids=ctx.position_ids,
        )
    )


def _llama_head(root: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return module_at(root, "lm_head")(module_at(root, "model.norm")(h))


# ---------------------------------------------------------------- OPT


def _opt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    # OPTDecoder.forward: positions come from the mask (cumsum), pads get -1 (-> row 1 after the offset of 2).
    pos = torch.cumsum(attention_mask, dim=1)
    return (pos * attention_mask - 1).long()


def _opt_embed(root: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    inputs_embeds = module_at(root, "model.decoder.embed_tokens")(input_ids)
    mask = _ones_mask(input_ids.unsqueeze(-1), attention_mask)
    pos_embeds = module_at(root, "model.decoder.embed_positions")(mask, 0, position_ids=_opt_positions(mask))
    project_in = optional_module_at(root, "model.decoder.project_in")
    if project_in is not None:
        inputs_embeds = project_in(inputs_embeds)
    return inputs_embeds + pos_embeds.to(inputs_embeds.device)


def _opt_context(
    root: nn.Module,
    config: PretrainedConfig,
    h: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layers: Iterable[int],
) -> LayerContext:
    from transformers.masking_utils import create_causal_mask

    # OPTDecoder calls create_causal_mask *without* position_ids (its cumsum positions would look "packed").
    mask = create_causal_mask(config=config, inputs_embeds=h, attention_mask=attention_mask, cache=None)
    return LayerContext({"full_attention": mask}, _opt_positions(_ones_mask(h, attention_mask)))


def _opt_block(block: nn.Module, h: torch.Tensor, ctx: LayerContext, idx: int) -> torch.Tensor:
    return _unwrap(block(h, attention_mask=ctx.mask_for(idx), position_ids=ctx.position_ids))


def _opt_head(root: nn.Module, h: torch.Tensor) -> torch.Tensor:
    final_layer_norm = optional_module_at(root, "model.decoder.final_layer_norm")
    if final_layer_norm is not None:
        h = final_layer_norm(h)
    project_out = optional_module_at(root, "model.decoder.project_out")
    if project_out is not None:
        h = project_out(h)
    return module_at(root, "lm_head")(h).contiguous()


# ---------------------------------------------------------------- GPT-2


def _gpt2_embed(root: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    inputs_embeds = module_at(root, "transformer.wte")(input_ids)
    position_embeds = module_at(root, "transformer.wpe")(_arange_positions(inputs_embeds))
    return module_at(root, "transformer.drop")(inputs_embeds + position_embeds.to(inputs_embeds.device))


def _gpt2_context(
    root: nn.Module,
    config: PretrainedConfig,
    h: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layers: Iterable[int],
) -> LayerContext:
    from transformers.masking_utils import create_causal_mask

    position_ids = _arange_positions(h)
    if attention_mask is not None and attention_mask.ndim < 4:
        attention_mask = attention_mask.view(h.shape[0], -1)
    mask = create_causal_mask(
        config=config, inputs_embeds=h, attention_mask=attention_mask, cache=None, position_ids=position_ids
    )
    return LayerContext({"full_attention": mask}, position_ids)


def _gpt2_block(block: nn.Module, h: torch.Tensor, ctx: LayerContext, idx: int) -> torch.Tensor:
    return _unwrap(block(h, attention_mask=ctx.mask_for(idx), position_ids=ctx.position_ids))


def _gpt2_head(root: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return module_at(root, "lm_head")(module_at(root, "transformer.ln_f")(h))


# ---------------------------------------------------------------- registry

_LLAMA = ArchSpec(
    family="llama",
    blocks_path="model.layers",
    embed_paths=("model.embed_tokens",),
    head_paths=("model.norm", "lm_head"),
    shared_paths=("model.rotary_emb",),
    layers_pattern="layers",
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    fan_in_fan_out=False,
    embed=_llama_embed,
    context=_llama_context,
    call_block=_llama_block,
    head=_llama_head,
)

_OPT = ArchSpec(
    family="opt",
    blocks_path="model.decoder.layers",
    embed_paths=("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
    head_paths=("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"),
    shared_paths=(),
    layers_pattern="layers",
    lora_targets=("q_proj", "k_proj", "v_proj", "out_proj"),
    fan_in_fan_out=False,
    embed=_opt_embed,
    context=_opt_context,
    call_block=_opt_block,
    head=_opt_head,
)

_GPT2 = ArchSpec(
    family="gpt2",
    blocks_path="transformer.h",
    embed_paths=("transformer.wte", "transformer.wpe", "transformer.drop"),
    head_paths=("transformer.ln_f", "lm_head"),
    shared_paths=(),
    layers_pattern="h",
    lora_targets=("c_attn", "c_proj"),
    fan_in_fan_out=True,
    embed=_gpt2_embed,
    context=_gpt2_context,
    call_block=_gpt2_block,
    head=_gpt2_head,
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "opt": _OPT,
    "gpt2": _GPT2,
}


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def config_of(model_or_config: nn.Module | PretrainedConfig) -> PretrainedConfig:
    """The HF config of a model or split part (``.config``), or the config itself."""
    if not isinstance(model_or_config, nn.Module):
        return model_or_config
    config = getattr(model_or_config, "config", None)
    if config is None:
        raise UnsupportedArchitectureError(
            f"{type(model_or_config).__name__} has no .config; pass a Hugging Face causal LM or a split part"
        )
    return config


def get_arch(model_or_config: nn.Module | PretrainedConfig) -> ArchSpec:
    """Look up the spec by ``config.model_type``; unknown types get an error naming the supported ones."""
    config = config_of(model_or_config)
    model_type = getattr(config, "model_type", None)
    spec = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if spec is None:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported by the split engine; supported: "
            f"{', '.join(supported_model_types())}"
        )
    return spec


def num_layers(model_or_config: nn.Module | PretrainedConfig) -> int:
    return int(config_of(model_or_config).num_hidden_layers)
