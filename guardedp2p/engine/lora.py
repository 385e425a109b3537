"""LoRA on the client's blocks only, stored as a stock PEFT adapter.

Because the split parts keep HF naming and global layer indices, the state dict of a LoRA-patched part has the
same keys as a PEFT model built on the unsplit model (minus the ``base_model.model.`` prefix). ``save_adapter``
writes exactly what ``PeftModel.from_pretrained(full_model, out_dir)`` expects, and ``load_adapter_into_parts``
refuses an adapter that would leave any of the client's LoRA weights at their init values (the silent failure of
``PeftModel.from_pretrained`` on renumbered layers, see :mod:`guardedp2p.engine.split`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import nn

from guardedp2p.engine.split import ClientBottom, ClientTop, _SplitPart
from guardedp2p.errors import ConfigError

if TYPE_CHECKING:  # peft is imported lazily (it pulls transformers)
    from peft import LoraConfig
    from torch.nn.modules.module import _IncompatibleKeys

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LoraBias = Literal["none", "all", "lora_only"]
_BIAS_CHOICES: tuple[LoraBias, ...] = ("none", "all", "lora_only")


class AdapterError(ConfigError):
    """An adapter folder is unusable for these parts (missing files, wrong keys, wrong shapes)."""


@dataclass
class LoraSettings:
    """LoRA hyper-parameters. ``target_modules=None`` means the per-architecture default (attention projections)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Sequence[str] | None = None
    bias: LoraBias = "none"

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if self.alpha <= 0:
            raise ConfigError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in _BIAS_CHOICES:
            raise ConfigError(f"LoRA bias must be one of {_BIAS_CHOICES}, got {self.bias!r}")

    def resolved_targets(self, part: _SplitPart) -> list[str]:
        return list(self.target_modules) if self.target_modules else list(part.arch.lora_targets)


@dataclass
class AdapterLoadReport:
    """What ``load_adapter_into_parts`` did: tensors loaded per part and adapter keys no client part owns."""

    loaded: dict[str, int] = field(default_factory=dict)
    ignored_keys: list[str] = field(default_factory=list)


def _peft_config(
    part: _SplitPart, settings: LoraSettings, layers: Sequence[int], base: str | None = None
) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.resolved_targets(part),
        layers_to_transform=sorted(layers),
        layers_pattern=part.arch.layers_pattern,
        bias=settings.bias,
        fan_in_fan_out=part.arch.fan_in_fan_out,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base,
    )


def _client_parts(bottom: ClientBottom, top: ClientTop) -> list[_SplitPart]:
    if not isinstance(bottom, ClientBottom) or not isinstance(top, ClientTop):
        raise TypeError("attach/save/load LoRA expects (ClientBottom, ClientTop) from guardedp2p.engine.split")
    return [bottom, top]


def _adapter_configs(part: nn.Module) -> dict[str, LoraConfig]:
    """The ``peft_config`` table that ``inject_adapter_in_model`` sets on a module (empty before any LoRA)."""
    configs: dict[str, LoraConfig] = getattr(part, "peft_config", {})
    return configs


def _has_adapter(part: nn.Module, adapter_name: str) -> bool:
    return adapter_name in _adapter_configs(part)


def _inject(part: _SplitPart, peft_cfg: LoraConfig, layers: Iterable[int], adapter_name: str) -> bool:
    """Inject LoRA into the part's own layers among ``layers``; return False if it owns none of them."""
    from peft import inject_adapter_in_model

    own = sorted(set(layers) & set(part.layer_range))
    if not own:
        return False
    cfg = copy.deepcopy(peft_cfg)
    cfg.layers_to_transform = own
    cfg.modules_to_save = None  # modules saved in full are loaded by _load_saved_modules, never wrapped
    inject_adapter_in_model(cfg, part, adapter_name=adapter_name)
    return True


def _set_trainable(part: nn.Module, bias: str, trainable: bool) -> None:
    """Freeze the pre-trained weights; LoRA weights (and biases if ``bias`` says so) train."""
    lora_modules = {name for name, m in part.named_modules() if hasattr(m, "lora_A")}
    for name, p in part.named_parameters():
        is_lora = "lora_" in name
        is_bias = name.endswith(".bias") or name == "bias"
        if is_lora:
            p.requires_grad_(trainable)
        elif is_bias and bias == "all":
            p.requires_grad_(trainable)
        elif is_bias and bias == "lora_only":
            owner = name.rsplit(".", 1)[0].removesuffix(".base_layer")
            p.requires_grad_(trainable and owner in lora_modules)
        else:
            p.requires_grad_(False)


def attach_lora(
    bottom_part: ClientBottom,
    top_part: ClientTop,
    /,
    settings: LoraSettings | None = None,
    layers: Iterable[int] | None = None,
    *,
    bottom: bool = True,
    top: bool = True,
    adapter_name: str = "default",
) -> list[nn.Parameter]:
    """Add LoRA to the client's blocks and freeze every pre-trained weight; return the trainable parameters.

    ``layers`` are global block indices (default: every client block); ``bottom=False`` / ``top=False`` leave
    that part without LoRA (e.g. the gradfree design, whose bottom is frozen). The parts share modules with the
    model they were built from, so that model's layers are patched too (build the parts from a dedicated copy
    if you need a pristine model).
    """
    settings = settings or LoraSettings()
    settings.validate()
    parts = _client_parts(bottom_part, top_part)
    enabled = {id(bottom_part): bottom, id(top_part): top}
    client = set(bottom_part.layer_range) | set(top_part.layer_range)
    chosen = sorted(client if layers is None else set(int(i) for i in layers))
    outside = [i for i in chosen if i not in client]
    if outside:
        raise ConfigError(
            f"LoRA layers {outside} are not client layers (client owns {sorted(client)}); the trunk stays frozen"
        )
    chosen = [i for i in chosen if any(enabled[id(p)] and i in p.layer_range for p in parts)]
    if not chosen:
        raise ConfigError("no client layer selected for LoRA (check layers= and the bottom=/top= flags)")
    peft_cfg = _peft_config(bottom_part, settings, chosen)
    for part in parts:
        if _has_adapter(part, adapter_name):
            raise ConfigError(f"the {part.role} already has a LoRA adapter named {adapter_name!r}")
        injected = enabled[id(part)] and _inject(part, peft_cfg, chosen, adapter_name)
        _set_trainable(part, settings.bias, bool(injected))
    return trainable_parameters(bottom_part, top_part)


def lora_state_dict(bottom: ClientBottom, top: ClientTop, *, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """LoRA tensors of both parts under the PEFT file keys (``base_model.model.<HF path>.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    out: dict[str, torch.Tensor] = {}
    for part in _client_parts(bottom, top):
        if not _has_adapter(part, adapter_name):
            continue
        for k, v in get_peft_model_state_dict(part, adapter_name=adapter_name).items():
            key = PEFT_PREFIX + k
            if key in out and out[key] is not v:
                raise AdapterError(f"adapter key {key} appears in both client parts")
            out[key] = v
    if not out:
        raise AdapterError(f"no LoRA adapter {adapter_name!r} on the client parts; call attach_lora first")
    return out


def _layers_of(cfg: LoraConfig, default: Iterable[int]) -> Iterable[int]:
    """``layers_to_transform`` as indices: PEFT allows None (every layer: ``default``), one int or a list."""
    layers = cfg.layers_to_transform
    if layers is None:
        return default
    return [layers] if isinstance(layers, int) else layers


def _adapter_config_for_save(bottom: ClientBottom, top: ClientTop, adapter_name: str, base: str | None) -> LoraConfig:
    cfgs = [_adapter_configs(p)[adapter_name] for p in (bottom, top) if _has_adapter(p, adapter_name)]
    cfg = copy.deepcopy(cfgs[0])
    layers: set[int] = set()
    for c in cfgs:
        layers.update(_layers_of(c, default=()))
    cfg.layers_to_transform = sorted(layers)
    cfg.base_model_name_or_path = base
    cfg.inference_mode = True
    return cfg


def _block_index(name: str, blocks_path: str) -> int | None:
    """The layer index in a module or parameter name under ``blocks_path`` (``model.layers.4.mlp`` -> 4)."""
    prefix = blocks_path + "."
    if not name.startswith(prefix):
        return None
    head = name[len(prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def top_block_parameters(top: ClientTop, bottom: ClientBottom) -> dict[str, nn.Parameter]:
    """The top's own transformer-block weights and norms, the ones ``--top-train blocks`` trains in full.

    Never a parameter the bottom shares (a tied LM head is the bottom's input embedding), never LoRA, never the LM
    head or another matrix outside the blocks. One rule for the trainer that unfreezes them
    (:func:`guardedp2p.train.trainer.unfreeze_top_blocks`) and the adapter that saves them
    (:func:`merged_top_blocks`)."""
    shared = {id(p) for p in bottom.parameters()}
    blocks = top.arch.blocks_path + "."
    return {
        name: p
        for name, p in top.named_parameters()
        if "lora_" not in name
        and id(p) not in shared
        and p.is_floating_point()
        and (name.startswith(blocks) or (p.ndim == 1 and "norm" in name))
    }


def merged_top_blocks(
    bottom: ClientBottom, top: ClientTop, *, adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """The top's blocks and final norm as trained in full (``TrainConfig.top_train = "blocks"``), LoRA merged in,
    under their HF names (``model.layers.28.self_attn.q_proj.weight``): the weights the full model must take.

    Exactly :func:`top_block_parameters`, the ones the trainer unfreezes."""
    from peft.tuners.lora import LoraLayer

    blocks = top.arch.blocks_path + "."
    out = {
        name.replace(".base_layer.", "."): p.detach().to("cpu", torch.float32).clone()
        for name, p in top_block_parameters(top, bottom).items()
    }
    for name, mod in top.named_modules():
        if isinstance(mod, LoraLayer) and adapter_name in getattr(mod, "lora_A", {}) and f"{name}.weight" in out:
            delta = cast(Any, mod).get_delta_weight(adapter_name)
            out[f"{name}.weight"] += delta.detach().to("cpu", torch.float32)
    if not any(k.startswith(blocks) for k in out):
        raise AdapterError("the top owns no block to save in full (split with 0 top layers?)")
    return out


def _zero_lora(part: _SplitPart, cfg: LoraConfig) -> dict[str, torch.Tensor]:
    """An identity LoRA (A = B = 0) on ``part``'s blocks, under PEFT file keys.

    Why: PEFT stores fully trained modules as ``modules_to_save`` only beside at least one LoRA target, and may
    not target a module it saves in full; a Gradfree client's bottom is frozen and has no LoRA, so its adapter
    carries this exact no-op on the bottom to stay a stock PEFT folder (``AutoPeftModelForCausalLM`` loads it)."""
    targets = cfg.target_modules
    if not isinstance(targets, (set, list, tuple)):
        raise AdapterError(f"cannot save top blocks beside LoRA target_modules given as a pattern ({targets!r})")
    out: dict[str, torch.Tensor] = {}
    for name, mod in part.named_modules():
        if name.rsplit(".", 1)[-1] not in targets or _block_index(name, part.arch.blocks_path) is None:
            continue
        if not isinstance(mod, nn.Linear):
            raise AdapterError(
                f"saving top blocks with a frozen bottom needs Linear projections; {name} is {type(mod).__name__} "
                "(use --top-train lora on this architecture)"
            )
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = torch.zeros(cfg.r, mod.in_features)
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = torch.zeros(mod.out_features, cfg.r)
    return out


def _save_with_top_blocks(
    bottom: ClientBottom, top: ClientTop, adapter_name: str, base: str | None
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """PEFT config and tensors of an adapter whose top blocks trained in full: the bottom's LoRA (an identity one
    when the bottom is frozen) plus the merged top blocks and final norm as ``modules_to_save``."""
    full = merged_top_blocks(bottom, top, adapter_name=adapter_name)
    blocks_path = top.arch.blocks_path
    modules = sorted(
        {f"{blocks_path}.{i}" if (i := _block_index(k, blocks_path)) is not None else k.rsplit(".", 1)[0] for k in full}
    )
    if _has_adapter(bottom, adapter_name):
        cfg = copy.deepcopy(_adapter_configs(bottom)[adapter_name])
        tensors = {PEFT_PREFIX + k: v for k, v in _part_lora_state(bottom, adapter_name).items()}
    else:
        cfg = copy.deepcopy(_adapter_configs(top)[adapter_name])
        tensors = _zero_lora(bottom, cfg)
    cfg.layers_to_transform = list(bottom.layer_range)
    cfg.modules_to_save = modules
    cfg.base_model_name_or_path = base
    cfg.inference_mode = True
    tensors.update({PEFT_PREFIX + k: v for k, v in full.items()})
    return cfg, tensors


def _part_lora_state(part: _SplitPart, adapter_name: str) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return dict(get_peft_model_state_dict(part, adapter_name=adapter_name))


def save_adapter(
    bottom: ClientBottom,
    top: ClientTop,
    out_dir: str | Path,
    base_model_name_or_path: str | None = None,
    *,
    adapter_name: str = "default",
    top_blocks: bool = False,
) -> Path:
    """Write a standard PEFT folder (adapter_config.json + adapter_model.safetensors) loadable on the full model.

    ``top_blocks``: the top's blocks trained in full (``--top-train blocks``); they go in as PEFT
    ``modules_to_save`` with their LoRA merged in (:func:`_save_with_top_blocks`)."""
    from safetensors.torch import save_file

    if top_blocks:
        cfg, state = _save_with_top_blocks(bottom, top, adapter_name, base_model_name_or_path)
    else:
        state = lora_state_dict(bottom, top, adapter_name=adapter_name)
        cfg = _adapter_config_for_save(bottom, top, adapter_name, base_model_name_or_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(out))
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out


def read_adapter(adapter_dir: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Return (LoraConfig, tensors with the ``base_model.model.`` prefix stripped). Safetensors only, never pickle."""
    from peft import LoraConfig, PeftType
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    if not (d / ADAPTER_CONFIG).is_file():
        raise AdapterError(
            f"{d} has no {ADAPTER_CONFIG}; pass a folder written by save_adapter or PEFT save_pretrained"
        )
    if not (d / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(
            f"{d} has no {ADAPTER_WEIGHTS} (pickled adapter_model.bin files are refused); re-save with safetensors"
        )
    try:
        cfg = LoraConfig.from_pretrained(str(d))
    except (ValueError, TypeError, OSError) as exc:
        raise AdapterError(f"{d / ADAPTER_CONFIG} is not a LoRA adapter config: {exc}") from exc
    if cfg.peft_type != PeftType.LORA:
        raise AdapterError(f"adapter in {d} is {cfg.peft_type}, only LORA is supported")
    raw = load_file(str(d / ADAPTER_WEIGHTS))
    bad = [k for k in raw if not k.startswith(PEFT_PREFIX)]
    if bad:
        raise AdapterError(f"adapter keys must start with {PEFT_PREFIX!r}; got e.g. {bad[0]!r}")
    return cfg, {k[len(PEFT_PREFIX) :]: v for k, v in raw.items()}


def load_adapter_into_parts(
    bottom: ClientBottom,
    top: ClientTop,
    adapter_dir: str | Path,
    *,
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> AdapterLoadReport:
    """Load a PEFT LoRA adapter (saved from the parts or from the full model) into the client parts.

    Injects LoRA first if the parts have none. Raises ``AdapterError`` if any LoRA tensor of the parts is not
    in the file (it would silently stay at its init value). Keys for layers the client does not own (a
    full-model adapter that also touched the trunk) are reported in ``ignored_keys``.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    cfg, tensors = read_adapter(adapter_dir)
    parts = _client_parts(bottom, top)
    n = bottom.n_layers
    wanted = set(_layers_of(cfg, default=range(n)))
    report = AdapterLoadReport()
    claimed: set[str] = set()
    for part in parts:
        if not _has_adapter(part, adapter_name):
            if not _inject(part, cfg, wanted, adapter_name):
                _set_trainable(part, cfg.bias, False)
                continue
        expected = set(get_peft_model_state_dict(part, adapter_name=adapter_name))
        missing = sorted(expected - set(tensors))
        if missing:
            raise AdapterError(
                f"adapter {adapter_dir} lacks {len(missing)} LoRA tensors of the {part.role}, e.g. {missing[0]!r}; "
                "it was made for a different model, split or target_modules"
            )
        sub = {k: tensors[k] for k in expected}
        try:
            # peft annotates the result as a bare ``namedtuple``; it is torch's load_state_dict result.
            result = cast("_IncompatibleKeys", set_peft_model_state_dict(part, sub, adapter_name=adapter_name))
        except RuntimeError as exc:
            raise AdapterError(f"adapter {adapter_dir} does not fit the {part.role}: {exc}") from exc
        if result.unexpected_keys:
            raise AdapterError(f"adapter tensors not used by the {part.role}: {result.unexpected_keys[:3]}")
        claimed.update(sub)
        report.loaded[part.role] = len(sub)
        _set_trainable(part, cfg.bias, is_trainable)
    if cfg.modules_to_save:
        claimed.update(_load_saved_modules(bottom, top, cfg.modules_to_save, tensors, claimed, adapter_dir))
        report.loaded["top_blocks"] = sum(
            1 for k in claimed if k.startswith(tuple(m + "." for m in cfg.modules_to_save))
        )
    report.ignored_keys = sorted(set(tensors) - claimed)
    return report


def _load_saved_modules(
    bottom: ClientBottom,
    top: ClientTop,
    modules: Iterable[str],
    tensors: dict[str, torch.Tensor],
    claimed: set[str],
    where: str | Path,
) -> set[str]:
    """Copy an adapter's ``modules_to_save`` (the top blocks trained in full) into the top's weights.

    Every saved tensor must land on a parameter of the top (a LoRA-wrapped projection keeps its weight under
    ``base_layer``), and every parameter of a saved top module must be in the file: a half-loaded block would
    silently mix trained and pre-trained weights."""
    params = {**dict(bottom.named_parameters()), **dict(top.named_parameters())}  # e.g. a saved embedding or head
    prefixes = tuple(m + "." for m in modules)
    loaded: set[str] = set()
    with torch.no_grad():
        for key, value in tensors.items():
            if key in claimed or not key.startswith(prefixes):
                continue
            head, _, leaf = key.rpartition(".")
            name = key if key in params else f"{head}.base_layer.{leaf}"
            if name not in params:
                if top.arch.blocks_path + "." in key and _block_index(key, top.arch.blocks_path) not in set(
                    top.layer_range
                ):
                    raise AdapterError(
                        f"adapter {where} saves block {key.split('.')[2]} in full, which this client does not hold "
                        f"(its top blocks are {list(top.layer_range)}): it was made for another split"
                    )
                raise AdapterError(f"adapter {where}: saved tensor {key!r} matches no weight of the client's top")
            if params[name].shape != value.shape:
                raise AdapterError(
                    f"adapter {where}: {key} has shape {tuple(value.shape)}, the top's is {tuple(params[name].shape)}"
                )
            params[name].copy_(value.to(params[name].dtype))
            loaded.add(key)
    want = {
        n.replace(".base_layer.", ".")
        for n in params
        if n.replace(".base_layer.", ".").startswith(prefixes) and "lora_" not in n
    }
    missing = sorted(want - loaded)
    if missing:
        raise AdapterError(
            f"adapter {where} lacks {len(missing)} weights of its saved top modules, e.g. {missing[0]!r}"
        )
    return loaded


def trainable_parameters(*modules: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` across the given modules, each once (tied weights are shared)."""
    seen: set[int] = set()
    out: list[nn.Parameter] = []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def count_parameters(*modules: nn.Module) -> tuple[int, int]:
    """(trainable, total) element counts across the modules, tied weights counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for m in modules:
        for p in m.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
    return trainable, total
