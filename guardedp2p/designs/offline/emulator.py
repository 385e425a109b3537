"""The Offline design's emulator: the provider's model with its middle compressed (offsite-tuning, arXiv 2302.04870).

The client receives the *adapters* (embedding step, the first ``l`` and last ``r`` blocks, final norm, LM head)
exactly, and in place of the ``M = N - l - r`` middle blocks only ``k`` of them, chosen by uniform layer drop
(optionally distilled to imitate the full middle, optionally weight-quantized). It fine-tunes its adapters
locally on this emulator and sends back only the adapter weights; the provider plugs them into the real model.

In memory an emulator is an ordinary Hugging Face model whose dropped blocks are :class:`SkippedBlock`
placeholders, so every kept block sits at its *global* index (``model.layers.17`` is block 17 of the full
model). That is what makes a LoRA adapter trained on the emulator's client parts a stock PEFT adapter of the
full model (same keys, ``layers_to_transform`` = the client's global indices), with no renumbering step that
could silently load nothing. On disk (``save_emulator``) it is a signed folder::

    config.json               the full model's HF config (architecture only; local paths removed)
    adapters.safetensors      embedding, client blocks, final norm, head; full precision
    emulator.safetensors      the k kept middle blocks; float, or int8/int4/nf4 codes + scales
    tokenizer/...             the tokenizer (so a client needs nothing else)
    manifest.json + .sig      fingerprint, layer map, compression settings, SHA-256 of every file (Ed25519)

``load_emulator`` verifies the signature and every digest before it reads a single tensor.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import nn

from guardedp2p.crypto.manifest import Manifest, resolve_in, sign_folder, verify_artifact
from guardedp2p.designs.offline.quantize import (
    LEGACY_NIBBLE_ORDER,
    NIBBLE_ORDER,
    PACKED_SCHEMES,
    check_scheme,
    dequantize_state,
    quantize_state,
    stored_nbytes,
)
from guardedp2p.engine.arch import config_of, get_arch, get_path, num_layers
from guardedp2p.engine.loading import shippable_config_json
from guardedp2p.engine.split import ClientBottom, ClientTop, ProviderTrunk, SplitConfig, base_model, loss_fn
from guardedp2p.errors import ArtifactError, ConfigError

log = logging.getLogger("guardedp2p.designs.offline")

EMULATOR_KIND = "emulator"
CONFIG_FILE = "config.json"
ADAPTERS_FILE = "adapters.safetensors"
MIDDLE_FILE = "emulator.safetensors"
TOKENIZER_DIR = "tokenizer"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FILLS = ("drop", "share")  # what stands in a dropped middle slot (LayerMap.fill)


class EmulatorError(ArtifactError):
    """A verified emulator folder does not fit together (layer map, config, tensors or fingerprint)."""


# ============================================================================================ layer selection
def uniform_drop_indices(n_middle: int, k: int) -> list[int]:
    """Middle-relative indices of the ``k`` kept blocks out of ``n_middle``: ``round(i (M-1)/(k-1))``.

    Exact rational arithmetic with Python's half-to-even rounding (the reference uses float ``round``; no
    tie arises in the published settings, and exact fractions keep it platform independent). ``k = 1`` keeps
    block 0 (the formula's ``i = 0`` term; the reference code would divide by zero).
    """
    if not isinstance(n_middle, int) or not isinstance(k, int) or isinstance(k, bool):
        raise ConfigError("n_middle and k must be integers")
    if n_middle < 1:
        raise ConfigError(f"the model has no middle block to emulate (M = {n_middle})")
    if not 1 <= k <= n_middle:
        raise ConfigError(f"emulator layers k must be in [1, {n_middle}] (the number of middle blocks), got {k}")
    if k == 1:
        return [0]
    return [round(Fraction(i * (n_middle - 1), k - 1)) for i in range(k)]


@dataclass(frozen=True)
class LayerMap:
    """Which global blocks the emulator keeps: client adapters (bottom, top) and kept middle blocks."""

    n_layers: int
    bottom: tuple[int, ...]
    top: tuple[int, ...]
    middle_kept: tuple[int, ...]
    fill: str = "drop"  # what stands in a dropped slot: "drop" (nothing) or "share" (the kept block before it)

    @property
    def middle(self) -> range:
        return range(len(self.bottom), self.n_layers - len(self.top))

    @property
    def kept(self) -> list[int]:
        return sorted(set(self.bottom) | set(self.middle_kept) | set(self.top))

    @property
    def depth(self) -> int:
        return len(self.kept)

    def shared_from(self) -> dict[int, int]:
        """Each dropped middle slot and the kept block that runs in it (``fill="share"``; empty for ``"drop"``).

        CRaSh (Zhang et al., EMNLP 2023, arXiv 2310.15477) found that offsite-tuning's transfer suffers most on
        small models, and that repeating a kept block in the slots of the dropped ones it stands for (sharing,
        instead of removing) lets adapters tuned on the emulator transfer much better: the emulator keeps the
        full model's depth, so the hidden states the top adapters learn on pass through as many residual
        updates as in the real model. The uniform drop keeps the first middle block, so every dropped slot has
        a kept block before it; the emulator ships no more parameters, but computes as many blocks as the full
        model. Measured on SmolLM2-135M (docs/results/offline.md, ``share2-k50-d0``) it did not help: half the
        middle shared is a far worse language model than half dropped, and its plug-in did not transfer."""
        if self.fill != "share":
            return {}
        kept = sorted(self.middle_kept)
        out: dict[int, int] = {}
        for g in self.middle:
            if g not in kept:
                out[g] = max(k for k in kept if k < g)
        return out

    @property
    def split(self) -> SplitConfig:
        return SplitConfig(bottom_layers=len(self.bottom), top_layers=len(self.top))

    def to_dict(self) -> dict[str, Any]:
        m = self.middle
        return {
            "n_layers": self.n_layers,
            "adapter_bottom": list(self.bottom),
            "adapter_top": list(self.top),
            "middle_kept": list(self.middle_kept),
            "middle_relative": [i - m.start for i in self.middle_kept],
            "emulator_depth": self.depth,
            **({"fill": self.fill} if self.fill != "drop" else {}),  # absent: drop, as in every older manifest
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerMap:
        try:
            n = int(d["n_layers"])
            lm = cls(
                n,
                tuple(int(i) for i in d["adapter_bottom"]),
                tuple(int(i) for i in d["adapter_top"]),
                tuple(int(i) for i in d["middle_kept"]),
                str(d.get("fill", "drop")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EmulatorError(f"the manifest's layer map is incomplete: {exc}") from None
        lm.validate()
        return lm

    def validate(self) -> None:
        n, k, r = self.n_layers, len(self.bottom), len(self.top)
        if self.bottom != tuple(range(k)) or self.top != tuple(range(n - r, n)) or k < 1:
            raise EmulatorError(
                f"adapters must be blocks [0, l) and [N - r, N) with l >= 1, got {self.bottom} / {self.top}"
            )
        mk = self.middle_kept
        if not mk or list(mk) != sorted(set(mk)) or mk[0] < k or mk[-1] >= n - r:
            raise EmulatorError(f"kept middle blocks {mk} are not increasing indices inside [{k}, {n - r})")
        if self.fill not in FILLS:
            raise EmulatorError(f"the layer map's fill must be one of {', '.join(FILLS)}, got {self.fill!r}")
        if self.fill == "share" and mk[0] != k:
            raise EmulatorError(f"a shared-block emulator must keep the first middle block {k}, got {mk}")


def layer_map(
    n_layers: int,
    bottom_layers: int = 2,
    top_layers: int = 2,
    emulator_layers: int | None = None,
    keep_fraction: float | None = None,
    fill: str = "drop",
) -> LayerMap:
    """Uniform layer drop: adapters ``[0, l)`` and ``[N - r, N)`` and ``k`` middle blocks.

    ``k = emulator_layers`` if given, else ``round(keep_fraction * M)`` (at least 1), else ``ceil(M / 2)``.
    ``fill``: ``drop`` leaves a dropped slot empty, ``share`` runs the kept block before it there
    (:meth:`LayerMap.shared_from`).
    """
    if fill not in FILLS:
        raise ConfigError(f"fill must be one of {', '.join(FILLS)}, got {fill!r}")
    split = SplitConfig(bottom_layers=bottom_layers, top_layers=top_layers)
    a, b = split.bounds(n_layers)
    m = b - a
    if emulator_layers is not None:
        k = emulator_layers
    elif keep_fraction is not None:
        if not 0 < keep_fraction <= 1:
            raise ConfigError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
        k = max(1, round(keep_fraction * m))
    else:
        k = math.ceil(m / 2)
    rel = uniform_drop_indices(m, k)
    return LayerMap(n_layers, tuple(range(a)), tuple(range(b, n_layers)), tuple(a + i for i in rel), fill)


# ============================================================================================ the model
class SkippedBlock(nn.Module):
    """Placeholder of a dropped block: passes the hidden states through, whatever else it is given."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states

    def extra_repr(self) -> str:
        return "dropped by the emulator"


class SharedBlock(nn.Module):
    """A dropped slot that runs a kept block again (``fill="share"``, :meth:`LayerMap.shared_from`).

    The kept block is held outside the module tree (in a tuple), so its weights appear once in the state dict,
    under the kept block's own global index: the emulator ships, loads, fingerprints and distils exactly what a
    dropping emulator does. While it runs here, the block's attention answers to this slot's index, so a KV cache
    keeps this slot's keys in this slot's layer (cached decoding and the cached multiple-choice scorer work) instead
    of appending them to the kept block's."""

    def __init__(self, block: nn.Module, source: int, slot: int) -> None:
        super().__init__()
        self._block = (block,)
        self.source = source
        self.slot = slot
        self._indexed: tuple[Any, ...] = tuple(
            m for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)
        )

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        before = [m.layer_idx for m in self._indexed]
        try:
            for m in self._indexed:
                m.layer_idx = self.slot
            return self._block[0](hidden_states, *args, **kwargs)
        finally:
            for m, idx in zip(self._indexed, before):
                m.layer_idx = idx

    def extra_repr(self) -> str:
        return f"runs kept block {self.source} again"


def _set_block_list(model: nn.Module, path: str, blocks: nn.ModuleList) -> None:
    *parents, leaf = path.split(".")
    parent = get_path(model, ".".join(parents)) if parents else model
    setattr(parent, leaf, blocks)


def emulator_skeleton(config: Any, lmap: LayerMap, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A randomly initialised HF model holding only the kept blocks, each at its global index.

    It is built from a copy of ``config`` with ``num_hidden_layers = depth`` (so memory is that of the
    emulator, not of the full model); the blocks are then moved to their global slots, per-layer settings
    (``layer_types``, ``layer_idx``) follow the global index, and the full config is put back.
    """
    from transformers import AutoModelForCausalLM

    arch = get_arch(config)
    n = num_layers(config)
    if n != lmap.n_layers:
        raise EmulatorError(f"the config has {n} blocks, the layer map {lmap.n_layers}")
    kept = lmap.kept
    small = copy.deepcopy(config)
    small.num_hidden_layers = len(kept)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == n:
        small.layer_types = [layer_types[g] for g in kept]
    model = AutoModelForCausalLM.from_config(small, dtype=dtype)
    blocks = get_path(model, arch.blocks_path)
    slots = nn.ModuleList([SkippedBlock() for _ in range(n)])
    for j, g in enumerate(kept):
        block = blocks[j]
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = g
        slots[g] = block
    for g, src in lmap.shared_from().items():
        slots[g] = SharedBlock(slots[src], src, g)
    _set_block_list(model, arch.blocks_path, slots)
    full = copy.deepcopy(config)
    # from_config resolved the attention implementation on ``small``; a config read from JSON has none.
    full._attn_implementation = model.config._attn_implementation
    for m in model.modules():
        if getattr(m, "config", None) is small:
            m.config = full
    for p in model.parameters():
        p.requires_grad_(False)
    return model.train(False)


def _load_exact(model: nn.Module, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Load every tensor the model holds, refusing extra or missing ones (tied aliases count as loaded)."""
    own = model.state_dict()
    extra = sorted(set(tensors) - set(own))
    if extra:
        raise EmulatorError(f"{where}: {len(extra)} tensors the emulator does not have, e.g. {extra[0]!r}")
    groups: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for k, v in own.items():
        groups.setdefault((v.data_ptr(), tuple(v.shape)), []).append(k)
    for names in groups.values():
        if not any(n in tensors for n in names):
            raise EmulatorError(f"{where}: tensor {names[0]!r} is missing")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise EmulatorError(f"{where}: {k} has shape {list(v.shape)}, the model expects {list(own[k].shape)}")
    model.load_state_dict(dict(tensors), strict=False)


def _unique_numel(tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> int:
    seen: set[tuple[int, tuple[int, ...]]] = set()
    total = 0
    vals = tensors.values() if isinstance(tensors, Mapping) else tensors
    for t in vals:
        key = (t.data_ptr(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel()
    return total


@dataclass
class Emulator:
    """An emulator in memory, with its client parts and its middle as a trunk (all sharing ``model``)."""

    model: nn.Module
    layer_map: LayerMap
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.split = self.layer_map.split
        self.bottom = ClientBottom(self.model, self.split)
        self.trunk = ProviderTrunk(self.model, self.split)
        self.top = ClientTop(self.model, self.split)

    @property
    def arch(self) -> Any:
        return get_arch(self.model)

    def _is_middle(self, name: str) -> bool:
        prefix = self.arch.blocks_path + "."
        if not name.startswith(prefix):
            return False
        idx = int(name[len(prefix) :].split(".", 1)[0])
        return idx in set(self.layer_map.middle_kept)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Embedding, client blocks, norm and head, each shared tensor once (tied head = embedding)."""
        out: dict[str, torch.Tensor] = {}
        seen: set[tuple[int, tuple[int, ...]]] = set()
        for k, v in self.model.state_dict().items():
            if self._is_middle(k):
                continue
            key = (v.data_ptr(), tuple(v.shape))
            if key in seen:
                continue
            seen.add(key)
            out[k] = v.detach().cpu().contiguous()
        return out

    def middle_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items() if self._is_middle(k)}

    def middle_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if self._is_middle(n)]

    def trunk_fn(self) -> Callable[..., torch.Tensor]:
        """The ``trunk(h1, mask, *, train, input_ids)`` callable :class:`~guardedp2p.train.trainer.SplitTrainer` takes."""
        trunk = self.trunk

        def fn(h1: torch.Tensor, mask: torch.Tensor, *, train: bool = False, input_ids: Any = None) -> torch.Tensor:
            return trunk(h1, mask)

        return fn

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bottom(input_ids, attention_mask)
        return self.top(self.trunk(h, attention_mask), attention_mask)


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    lora = [k for k in sd if "lora_" in k or ".base_layer." in k]
    if lora:
        raise ConfigError(f"build the emulator from the pre-trained model, not one with adapters (found {lora[0]!r})")
    return sd


def count_model_parameters(model: nn.Module) -> int:
    return _unique_numel(list(model.parameters()))


@dataclass
class EmulatorConfig:
    """How to compress the middle: ``emulator_layers`` = k kept middle blocks, or ``keep_fraction`` of them
    (neither: half, rounded up)."""

    bottom_layers: int = 2
    top_layers: int = 2
    emulator_layers: int | None = None
    keep_fraction: float | None = None
    quantize: str = "none"  # none | int8 | int4 | nf4 (middle blocks only; adapters always ship exact)
    middle_dtype: str = "float32"  # float storage of unquantized middle tensors: float32 | float16 | bfloat16
    fill: str = "drop"  # drop | share: a dropped slot is empty, or runs the kept block before it (CRaSh)
    #: Instead of the uniform drop: the global indices of the dropped middle blocks (a provider that measured which
    #: blocks matter, e.g. the sweep's contiguous central drops in docs/results/offline.md).
    drop_blocks: tuple[int, ...] | None = None

    def validate(self) -> None:
        check_scheme(self.quantize)
        if self.drop_blocks is not None and (self.emulator_layers is not None or self.keep_fraction is not None):
            raise ConfigError("give drop_blocks or emulator_layers / keep_fraction, not both")
        if self.fill not in FILLS:
            raise ConfigError(f"fill must be one of {', '.join(FILLS)}, got {self.fill!r}")
        if self.middle_dtype not in _DTYPES:
            raise ConfigError(f"middle_dtype must be one of {', '.join(_DTYPES)}, got {self.middle_dtype!r}")


def build_emulator(full_model: nn.Module, cfg: EmulatorConfig | None = None) -> Emulator:
    """Uniform layer drop: copy the adapters and the kept middle blocks out of ``full_model`` (left untouched)."""
    cfg = cfg or EmulatorConfig()
    cfg.validate()
    base = base_model(full_model)
    n = num_layers(base)
    lmap = layer_map(n, cfg.bottom_layers, cfg.top_layers, cfg.emulator_layers, cfg.keep_fraction, cfg.fill)
    if cfg.drop_blocks is not None:
        dropped = set(cfg.drop_blocks)
        if not dropped <= set(lmap.middle):
            raise ConfigError(
                f"drop_blocks {sorted(dropped)} must be middle blocks, inside [{lmap.middle.start}, {lmap.middle.stop})"
            )
        lmap = LayerMap(n, lmap.bottom, lmap.top, tuple(i for i in lmap.middle if i not in dropped), cfg.fill)
        lmap.validate()
    first = next(base.parameters())
    skel = emulator_skeleton(config_of(base), lmap, dtype=first.dtype)
    full_sd = _plain_state(base)
    wanted = skel.state_dict()
    missing = [k for k in wanted if k not in full_sd]
    if missing:
        raise EmulatorError(f"the model lacks {missing[0]!r}, which the emulator skeleton needs")
    _load_exact(skel, {k: full_sd[k] for k in wanted}, "building the emulator")
    skel.to(first.device)
    full_params = count_model_parameters(base)
    emu = Emulator(skel, lmap)
    middle_all = sum(
        p.numel() for name, p in base.named_parameters() if _is_block(name, get_arch(base).blocks_path, lmap.middle)
    )
    emu.info = {
        "full_parameters": full_params,
        "middle_parameters_full": middle_all,
        "compression": {
            "method": "uniform-layer-drop",
            "k": len(lmap.middle_kept),
            "quantize": cfg.quantize,
            "middle_dtype": cfg.middle_dtype,
            **({"fill": cfg.fill} if cfg.fill != "drop" else {}),
        },
    }
    return emu


def _is_block(name: str, blocks_path: str, indices: range | Sequence[int]) -> bool:
    prefix = blocks_path + "."
    if not name.startswith(prefix):
        return False
    return int(name[len(prefix) :].split(".", 1)[0]) in set(indices)


# ============================================================================================ distillation
@dataclass
class DistillConfig:
    """NeuralEmu distillation (offsite-tuning, arXiv 2302.04870): student = kept blocks, teacher = the full middle."""

    steps: int = 0
    lr: float = 1e-4
    batch_size: int = 4
    max_length: int = 128
    warmup_steps: int = 0
    weight_decay: float = 0.0
    w_lm: float = 1.0
    w_kd: float = 30.0
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 0  # 0: only at the end (when a checkpoint folder is given)
    # constant (after warm-up): a run of N steps is the first N steps of any longer run with the same settings,
    # so a cached distillation can be continued to a longer one (:func:`distill_cached`); cosine decays to 0.
    schedule: str = "constant"

    def validate(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.max_length < 2 or self.lr <= 0:
            raise ConfigError("distillation needs steps >= 0, batch size >= 1, max length >= 2 and a positive lr")
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"distillation schedule must be constant or cosine, got {self.schedule!r}")


def kd_loss(h_teacher: torch.Tensor, h_student: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mean(((h_T - h_S) / rms(h_T))^2)``, rms over the whole teacher tensor; padded positions are left out."""
    ht = h_teacher.float()
    diff = (ht - h_student.float()) ** 2
    if mask is None:
        return diff.mean() / ht.pow(2).mean().clamp_min(1e-12)
    w = mask.to(diff.dtype).unsqueeze(-1)
    denom = w.sum().clamp_min(1.0) * ht.shape[-1]
    ms_t = (ht.pow(2) * w).sum() / denom
    return ((diff * w).sum() / denom) / ms_t.clamp_min(1e-12)


def distill_emulator(
    emu: Emulator,
    teacher_model: nn.Module,
    examples: Sequence[dict[str, list[int]]],
    cfg: DistillConfig,
    *,
    pad_id: int = 0,
    checkpoint_dir: str | Path | None = None,
    console: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the kept middle blocks so that ``bottom -> student -> head`` imitates the full model.

    Both stacks receive the frozen bottom adapter's output; only the student trains (AdamW, warm-up then
    constant or cosine, clipping). With ``checkpoint_dir`` the run saves the student, optimizer, schedule and
    data position every ``checkpoint_every`` steps and resumes from there: an interrupted run that is resumed
    ends in the same state as an uninterrupted one (same seed; tests/designs/offline/test_distill.py).
    """
    from guardedp2p.data.collate import BatchIterator
    from guardedp2p.train.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
    from guardedp2p.train.config import TrainConfig
    from guardedp2p.train.trainer import lr_lambda

    cfg.validate()
    if cfg.steps == 0:
        return {"steps": 0}
    if not examples:
        raise ConfigError("distillation needs at least one text example")
    teacher = ProviderTrunk(teacher_model, emu.split)
    for p in teacher_model.parameters():
        p.requires_grad_(False)
    teacher.train(False)
    for p in emu.model.parameters():
        p.requires_grad_(False)
    student = {n: p for n, p in emu.model.named_parameters() if emu._is_middle(n)}
    for p in student.values():
        p.requires_grad_(True)
    decay = [p for p in student.values() if p.ndim >= 2]
    no_decay = [p for p in student.values() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(TrainConfig(steps=cfg.steps, warmup_steps=cfg.warmup_steps, schedule=cfg.schedule, lr=cfg.lr))
    )
    torch.manual_seed(cfg.seed)
    it = BatchIterator(list(examples), cfg.batch_size, seed=cfg.seed, pad_id=pad_id)
    step, history = 0, []
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    if ckpt is not None and has_checkpoint(ckpt):
        tensors, state, meta = load_checkpoint(ckpt)
        if meta.get("kind") != "distill" or meta.get("layers") != emu.layer_map.to_dict():
            raise ConfigError(f"{ckpt} holds a checkpoint of another emulator; use another folder")
        with torch.no_grad():
            for n, p in student.items():
                p.copy_(tensors[n].to(p.device, p.dtype))
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        it.load_state_dict(meta["data"])
        step, history = int(state["step"]), list(meta.get("history", []))
        log.info("distillation resumed at step %d", step)

    def save() -> None:
        if ckpt is None:
            return
        save_checkpoint(
            ckpt,
            {n: p.detach().cpu() for n, p in student.items()},
            {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step},
            {
                "kind": "distill",
                "layers": emu.layer_map.to_dict(),
                "data": it.state_dict(),
                "history": history,
                "config": asdict(cfg),
            },
        )

    device = next(emu.model.parameters()).device
    ctx: Any = nullcontext()
    if progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        ctx = Progress(
            TextColumn("[bold]distilling the emulator"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("lm {task.fields[lm]} kd {task.fields[kd]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
    t0 = time.perf_counter()
    emu.model.train(False)
    with ctx as bar:
        task = bar.add_task("distill", total=cfg.steps, completed=step, lm="-", kd="-") if bar is not None else None
        while step < cfg.steps:
            b = {k: v.to(device) for k, v in next(it).items()}
            ids, mask = b["input_ids"], b["attention_mask"]
            with torch.no_grad():
                h1 = emu.bottom(ids, mask)
                h_t = teacher(h1, mask)
            h_s = emu.trunk(h1, mask)
            # with w_lm = 0 (pure hidden-state distillation) the head is not run at all
            lm = loss_fn(emu.top(h_s, mask), b["labels"]) if cfg.w_lm > 0 else h_s.new_zeros(())
            kd = kd_loss(h_t, h_s, mask)
            loss = cfg.w_lm * lm + cfg.w_kd * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(student.values()), cfg.max_grad_norm)
            opt.step()
            sched.step()
            step += 1
            lm_v, kd_v, loss_v = float(lm.detach()), float(kd.detach()), float(loss.detach())
            history.append({"step": step, "lm": round(lm_v, 5), "kd": round(kd_v, 6), "loss": round(loss_v, 5)})
            if bar is not None:
                bar.update(task, completed=step, lm=f"{lm_v:.3f}", kd=f"{kd_v:.4f}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save()
    save()
    for p in student.values():
        p.requires_grad_(False)
        p.grad = None
    summary = {
        "steps": step,
        "lr": cfg.lr,
        "w_lm": cfg.w_lm,
        "w_kd": cfg.w_kd,
        "batch_size": cfg.batch_size,
        "max_length": cfg.max_length,
        "lm_first": history[0]["lm"] if history else None,
        "lm_last": history[-1]["lm"] if history else None,
        "kd_first": history[0]["kd"] if history else None,
        "kd_last": history[-1]["kd"] if history else None,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    emu.info["distillation"] = summary
    return summary


@torch.no_grad()
def emulator_fidelity(
    emu: Emulator,
    teacher_model: nn.Module,
    examples: Sequence[dict[str, list[int]]],
    *,
    batch_size: int = 8,
    pad_id: int = 0,
) -> dict[str, float]:
    """How closely the emulator imitates the full model on held-out text (both share the emulator's adapters).

    ``kd``: the normalised hidden-state MSE at the top cut point (the distillation's target, :func:`kd_loss`,
    averaged over batches); ``loss_emulator`` / ``loss_full``: token losses through the emulator's middle and
    through the full middle; ``ppl_ratio`` = exp(loss_emulator - loss_full), the emulator's perplexity as a
    multiple of the full model's. On public text that ratio is the provider's IP measure: the closer to 1,
    the more of the full model's ability the shipped emulator gives away (offsite-tuning, arXiv 2302.04870).
    """
    from guardedp2p.data.collate import collate

    if not examples:
        raise ConfigError("fidelity needs at least one held-out example")
    teacher = ProviderTrunk(teacher_model, emu.split)
    device = next(emu.model.parameters()).device
    emu.model.train(False)
    teacher.train(False)
    kd_sum = lm_e = lm_f = 0.0
    n_batches = n_tok = 0
    for start in range(0, len(examples), batch_size):
        b = collate(list(examples[start : start + batch_size]), pad_id)
        ids, mask, labels = (b[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        h1 = emu.bottom(ids, mask)
        h_t = teacher(h1, mask)
        h_s = emu.trunk(h1, mask)
        kd_sum += float(kd_loss(h_t, h_s, mask))
        n_batches += 1
        ntok = int((labels[:, 1:] != -100).sum())
        lm_e += float(loss_fn(emu.top(h_s, mask), labels)) * ntok
        lm_f += float(loss_fn(emu.top(h_t, mask), labels)) * ntok
        n_tok += ntok
    le, lf = lm_e / max(n_tok, 1), lm_f / max(n_tok, 1)
    return {
        "kd": kd_sum / n_batches,
        "loss_emulator": le,
        "loss_full": lf,
        "ppl_emulator": math.exp(min(le, 50.0)),
        "ppl_full": math.exp(min(lf, 50.0)),
        "ppl_ratio": math.exp(min(le - lf, 50.0)),
        "tokens": n_tok,
    }


def model_digest(model: nn.Module) -> str:
    """SHA-256 over every weight of ``model`` (sorted names, float32 bytes): the identity of a full model.

    The handshake fingerprint covers only the client parts; a distilled middle depends on the middle blocks too,
    so the distillation cache is keyed by this digest instead.
    """
    import hashlib

    h = hashlib.sha256()
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, t in sorted(model.state_dict().items()):
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        t = t.detach().to("cpu")
        t = t.float() if t.is_floating_point() else t
        h.update(f"{name}|{list(t.shape)}\n".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


DISTILL_CACHE_VERSION = 1


def distill_cache_key(full_model_digest: str, lmap: LayerMap, cfg: DistillConfig, data_digest: str) -> str:
    """Cache folder name of a distillation: model, layer map, settings and data (steps left out when the schedule is
    constant, since then a shorter run is a prefix of a longer one and both live in one folder)."""
    import hashlib

    settings = asdict(cfg)
    settings.pop("checkpoint_every")
    if cfg.schedule == "constant":
        settings.pop("steps")
    blob = json.dumps(
        {
            "version": DISTILL_CACHE_VERSION,
            "model": full_model_digest,
            "layers": lmap.to_dict(),
            "distill": settings,
            "data": data_digest,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def default_cache_dir() -> Path:
    """``$GUARDEDP2P_CACHE/emulators`` (default ``~/.cache/guardedp2p/emulators``)."""
    import os

    return Path(os.environ.get("GUARDEDP2P_CACHE", Path.home() / ".cache" / "guardedp2p")) / "emulators"


def distill_cached(
    emu: Emulator,
    teacher_model: nn.Module,
    examples: Sequence[dict[str, list[int]]],
    cfg: DistillConfig,
    *,
    cache_dir: str | Path | None = None,
    pad_id: int = 0,
    console: Any = None,
    progress: bool = True,
    full_model_digest: str | None = None,
) -> dict[str, Any]:
    """:func:`distill_emulator` behind a cache, so a provider distils once and serves many clients.

    The folder ``cache_dir/<key>`` (:func:`distill_cache_key`) holds the resumable checkpoint (``ckpt/``,
    written every ``cfg.checkpoint_every`` steps) and one snapshot of the distilled middle per finished length
    (``middle-<steps>.safetensors`` + ``summary-<steps>.json``). A finished length is loaded, not recomputed;
    an interrupted run resumes from its checkpoint; with the constant schedule a longer run continues from the
    checkpoint of a shorter one. Returns the summary, with ``cached`` (loaded as is) and ``cache`` (the folder).
    """
    from safetensors.torch import load_file, save_file

    from guardedp2p.data.collate import examples_digest
    from guardedp2p.train.checkpoint import has_checkpoint, load_checkpoint

    cfg.validate()
    if cfg.steps == 0:
        return {"steps": 0}
    digest = full_model_digest or model_digest(teacher_model)
    key = distill_cache_key(digest, emu.layer_map, cfg, examples_digest(list(examples)))
    folder = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / key
    folder.mkdir(parents=True, exist_ok=True)
    snap, summ = folder / f"middle-{cfg.steps}.safetensors", folder / f"summary-{cfg.steps}.json"
    if snap.is_file() and summ.is_file():
        tensors = load_file(str(snap))
        own = dict(emu.model.named_parameters())
        if set(tensors) != {n for n in own if emu._is_middle(n)}:
            raise EmulatorError(f"the cached distillation in {folder} does not fit this emulator; delete the folder")
        with torch.no_grad():
            for n, t in tensors.items():
                own[n].copy_(t.to(own[n].device, own[n].dtype))
        summary = json.loads(summ.read_text())
        emu.info["distillation"] = summary
        log.info("distilled middle loaded from the cache %s (%d steps)", folder, cfg.steps)
        return {**summary, "cached": True, "cache": str(folder)}
    ckpt = folder / "ckpt"
    if has_checkpoint(ckpt) and int(load_checkpoint(ckpt)[1]["step"]) > cfg.steps:
        # that checkpoint is past this length: run this one from the start without touching the longer run's state
        ckpt = folder / f"ckpt-{cfg.steps}"
    summary = distill_emulator(
        emu, teacher_model, examples, cfg, pad_id=pad_id, checkpoint_dir=ckpt, console=console, progress=progress
    )
    middle = {n: p.detach().cpu().contiguous() for n, p in emu.model.named_parameters() if emu._is_middle(n)}
    save_file(middle, str(snap))
    summ.write_text(json.dumps(summary, indent=2, sort_keys=True))
    return {**summary, "cached": False, "cache": str(folder)}


# ============================================================================================ provider text
#: The provider-owned public text the distillation uses by default (see :func:`public_text_passages`).
PUBLIC_CORPUS = "builtin:python-docs"


def public_text_passages(split: str = "train", *, max_chars: int = 600) -> list[str]:
    """English passages of the Python language reference bundled with every CPython (``pydoc_data.topics``).

    Why this text: distillation needs text the provider may use and that is *not* the client's (the shipped
    demo_aux.jsonl is records of other people in the client's own house style, which would teach the emulator
    the client's task). The reference ships inside the interpreter under the PSF licence, so it is on every
    machine that runs this project, is the same bytes for a given Python version, and costs nothing to
    produce (text sampled from the model would be closer to its distribution but takes CPU minutes per build).
    It is technical prose with code; the emulator only has to imitate the full middle on generic text, and
    offsite-tuning distils on a generic public corpus likewise (arXiv 2302.04870). ``split``: ``train`` (9 of
    every 10 passages), ``heldout`` (the 10th), so public perplexity is measured on text the distillation never
    saw, or ``all``. Passages are whole paragraphs packed up to ``max_chars`` characters.
    """
    import pydoc_data.topics as topics

    if split not in ("train", "heldout", "all"):
        raise ConfigError(f"split must be train, heldout or all, got {split!r}")
    passages: list[str] = []
    for name in sorted(topics.topics):
        cur = ""
        for para in topics.topics[name].split("\n\n"):
            # drop the reST underlines of titles ("*****"), keep the words
            para = " ".join(
                w for line in para.splitlines() if not set(line.strip()) <= set("*=-~^") for w in line.split()
            )
            if not para:
                continue
            if cur and len(cur) + len(para) + 1 > max_chars:
                passages.append(cur)
                cur = ""
            cur = f"{cur} {para}".strip()
        if cur:
            passages.append(cur)
    if split == "all":
        return passages
    train = [p for i, p in enumerate(passages) if i % 10 != 9]
    if split == "train":
        return train
    # some topics repeat paragraphs of others: a held-out passage must share no sentence with the train split
    seen = {s.strip() for p in train for s in p.split(". ") if len(s.strip()) > 30}
    return [p for i, p in enumerate(passages) if i % 10 == 9 and not any(s.strip() in seen for s in p.split(". "))]


def load_text_examples(path: str | Path, tokenizer: Any, max_length: int = 128) -> list[dict[str, list[int]]]:
    """Token ids of a provider corpus: ``.txt`` (one passage per non-empty line), any format the data loaders read,
    or :data:`PUBLIC_CORPUS` (``builtin:python-docs``, its ``train`` split; ``builtin:python-docs:heldout`` for the
    held-out passages)."""
    from guardedp2p.data.loaders import TaskKind
    from guardedp2p.data.tokenize import DataConfig, encode_lm, encode_records

    if str(path).startswith(PUBLIC_CORPUS):
        split = str(path)[len(PUBLIC_CORPUS) :].lstrip(":") or "train"
        texts = [{"text": t} for t in public_text_passages(split)]
        return encode_lm(texts, tokenizer, DataConfig(max_length=max_length))
    p = Path(path)
    if not p.is_file() and not p.is_dir():
        raise ConfigError(f"distillation data {p} does not exist")
    kind: TaskKind
    if p.suffix.lower() == ".txt":
        records = [
            {"text": line.strip()}
            for line in p.read_text(encoding="utf-8", errors="replace").splitlines()
            if line.strip()
        ]
        kind = "lm"
    else:
        from guardedp2p.data.loaders import load_data

        loaded = load_data(str(p))
        records, kind = loaded.records, loaded.kind
    examples = encode_records(records, tokenizer, DataConfig(max_length=max_length), kind=kind)
    if not examples:
        raise ConfigError(f"{p} gave no text to distil on")
    return examples


# ============================================================================================ files
def save_emulator(
    emu: Emulator,
    folder: str | Path,
    signing_key: Any,
    *,
    tokenizer: Any = None,
    quantize: str | None = None,
    middle_dtype: str | None = None,
    model_name: str = "",
    extra: Mapping[str, Any] | None = None,
) -> Manifest:
    """Write the emulator folder and sign it; returns the manifest (see the module docstring for the layout)."""
    from safetensors.torch import save_file

    from guardedp2p.engine.fingerprint import model_fingerprint

    comp = dict(emu.info.get("compression", {}))
    quantize = check_scheme(quantize or comp.get("quantize", "none"))
    middle_dtype = middle_dtype or comp.get("middle_dtype", "float32")
    if middle_dtype not in _DTYPES:
        raise ConfigError(f"middle_dtype must be one of {', '.join(_DTYPES)}")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("manifest.json", "manifest.sig"):
        (out / stale).unlink(missing_ok=True)
    files = [CONFIG_FILE, ADAPTERS_FILE, MIDDLE_FILE]
    (out / CONFIG_FILE).write_bytes(shippable_config_json(emu.model.config))
    adapters = emu.adapter_state()
    save_file(adapters, str(out / ADAPTERS_FILE), metadata={"format": "pt"})
    middle = emu.middle_state()
    stored = quantize_state(middle, quantize, _DTYPES[middle_dtype])
    save_file(stored, str(out / MIDDLE_FILE), metadata={"format": "pt", "quantize": quantize})
    if tokenizer is not None:
        tdir = out / TOKENIZER_DIR
        tokenizer.save_pretrained(str(tdir))
        files += sorted(f"{TOKENIZER_DIR}/{p.relative_to(tdir).as_posix()}" for p in tdir.rglob("*") if p.is_file())
    cfg = config_of(emu.model)
    fp = model_fingerprint(emu.model, emu.split)
    full = int(emu.info.get("full_parameters") or 0)
    n_adapt = _unique_numel(adapters)
    n_mid = sum(t.numel() for t in middle.values())
    body: dict[str, Any] = {
        "kind": EMULATOR_KIND,
        "model": {
            "name": model_name,
            "model_type": cfg.model_type,
            "num_hidden_layers": num_layers(cfg),
            "hidden_size": int(cfg.hidden_size),
            "vocab_size": int(cfg.vocab_size),
        },
        "fingerprint": fp,
        "split": {"bottom_layers": emu.split.bottom_layers, "top_layers": emu.split.top_layers},
        "layers": emu.layer_map.to_dict(),
        "compression": {
            "method": "uniform-layer-drop",
            "k": len(emu.layer_map.middle_kept),
            "quantize": quantize,
            "middle_dtype": middle_dtype,
            "distillation": emu.info.get("distillation") or None,
            **({"fill": emu.layer_map.fill} if emu.layer_map.fill != "drop" else {}),
        },
        "params": {
            "full_model": full,
            "adapters": n_adapt,
            "middle_kept": n_mid,
            "middle_full": int(emu.info.get("middle_parameters_full") or 0),
            "shipped": n_adapt + n_mid,
            "fraction_of_full": round((n_adapt + n_mid) / full, 6) if full else None,
            "middle_bytes_stored": stored_nbytes(stored),
        },
        "files_role": {
            "config": CONFIG_FILE,
            "adapters": ADAPTERS_FILE,
            "middle": MIDDLE_FILE,
            "tokenizer": TOKENIZER_DIR if tokenizer is not None else None,
        },
    }
    if quantize in PACKED_SCHEMES:  # absent in emulators written before the packing was shared: low nibble first
        body["compression"]["nibble_order"] = NIBBLE_ORDER
    if extra:
        body["extra"] = dict(extra)
    return sign_folder(out, body, files, signing_key)


# Every tensor / config read of a received emulator goes through these two functions, so tests can check
# that nothing is read before verification.
def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _read_config(folder: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder), local_files_only=True)


@dataclass
class LoadedEmulator:
    emulator: Emulator
    manifest: Manifest
    tokenizer: Any


def load_emulator(
    folder: str | Path,
    verify_key: Any,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    load_tokenizer: bool = True,
) -> LoadedEmulator:
    """Verify the signed folder (signature, then every SHA-256), then build the emulator from it.

    Also recomputes the model fingerprint over the received adapters and compares it with the signed one,
    so a manifest that was signed over the wrong tensors is refused too.
    """
    from guardedp2p.engine.fingerprint import model_fingerprint

    folder = Path(folder)
    manifest = verify_artifact(folder, verify_key, kind=EMULATOR_KIND)  # nothing is read before this passes
    lmap = LayerMap.from_dict(manifest["layers"])
    names = set(manifest.files)
    for required in (CONFIG_FILE, ADAPTERS_FILE, MIDDLE_FILE):
        if required not in names:
            raise EmulatorError(f"the signed manifest does not list {required}")
    scheme = check_scheme(str(manifest["compression"].get("quantize", "none")))
    nibble_order = str(manifest["compression"].get("nibble_order", LEGACY_NIBBLE_ORDER))
    config = _read_config(folder)
    if num_layers(config) != lmap.n_layers:
        raise EmulatorError(f"config.json has {num_layers(config)} blocks, the layer map {lmap.n_layers}")
    model = emulator_skeleton(config, lmap, dtype=dtype)
    tensors = dict(_read_tensors(resolve_in(folder, ADAPTERS_FILE)))
    middle = dequantize_state(_read_tensors(resolve_in(folder, MIDDLE_FILE)), scheme, dtype, nibble_order)
    overlap = set(tensors) & set(middle)
    if overlap:
        raise EmulatorError(f"{sorted(overlap)[0]} is in both tensor files")
    tensors.update(middle)
    _load_exact(model, {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}, str(folder))
    model.to(device)
    emu = Emulator(
        model, lmap, info={"compression": dict(manifest["compression"]), "params": dict(manifest.get("params") or {})}
    )
    fp = model_fingerprint(model, emu.split)
    if fp != manifest["fingerprint"]:
        raise EmulatorError("the received adapters do not match the fingerprint in the signed manifest")
    tokenizer = None
    if load_tokenizer and any(n.startswith(TOKENIZER_DIR + "/") for n in names):
        from transformers import AutoTokenizer

        from guardedp2p.engine.loading import prepare_tokenizer

        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(str(folder / TOKENIZER_DIR), local_files_only=True))
    return LoadedEmulator(emu, manifest, tokenizer)
