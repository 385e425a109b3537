"""Client kit: the signed folder holding exactly the weights a split client runs, and never the trunk's.

The Online and Gradfree designs leave the trunk with the provider (GuardedTuning, arXiv 2501.04323; docs/
architecture.md "The split"), but a client that loads the whole checkpoint to cut its parts out of it would
still need the trunk's weights on disk. A provider whose weights are proprietary builds a kit instead: config,
tokenizer, embeddings, the bottom and top blocks, final norm and LM head, in one safetensors file, listed with
their SHA-256 in a manifest signed with the provider's Ed25519 key (``guardedp2p/crypto/manifest.py``, kind
``client-kit``, as the Offline emulator). The client verifies the signature and every digest before it reads a
byte of the kit, then builds a model skeleton whose trunk blocks are ``nn.Identity`` placeholders at their global
indices (as ``guardedp2p/engine/split.py`` lays parts out), so the model fingerprint, and hence the handshake,
is the same as with the full model (docs/user-guide.md "Client kit").

Layout::

    config.json          the full model's config (the trunk's depth included: block indices are global)
    client.safetensors   client-side tensors, HF names; tied aliases stored once
    generation_config.json  the model's generation defaults (EOS, sampling), when it has them
    tokenizer/...        the tokenizer, when given
    manifest.json        kind "client-kit", model, split, fingerprint, client/trunk block indices, file table
    manifest.sig         Ed25519 signature over manifest.json's exact bytes
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from torch import nn

from guardedp2p.crypto.manifest import Manifest, resolve_in, sign_folder, verify_artifact
from guardedp2p.engine.arch import config_of, get_arch, get_path, num_layers
from guardedp2p.engine.loading import shippable_config_json
from guardedp2p.engine.split import SplitConfig, base_model, build_client_parts
from guardedp2p.errors import ArtifactError, ConfigError

KIT_KIND = "client-kit"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "client.safetensors"
GENERATION_FILE = "generation_config.json"
TOKENIZER_DIR = "tokenizer"
_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


class KitError(ArtifactError):
    """The kit's content does not match its signed manifest (tensor set, block indices, fingerprint)."""


class KitMismatchError(ConfigError):
    """The kit is for another model or another split than the run asks for."""


@dataclass
class LoadedKit:
    """A verified kit in memory: a model holding only the client's weights (trunk blocks are placeholders)."""

    model: nn.Module
    tokenizer: Any
    manifest: Manifest
    split: SplitConfig

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])


def block_index(name: str, blocks_path: str) -> int | None:
    """Global block index of tensor ``name`` (``model.layers.3.mlp...`` -> 3), None outside the block list."""
    prefix = blocks_path + "."
    if not name.startswith(prefix):
        return None
    m = _BLOCK_INDEX.match("." + name[len(prefix) :])
    if m is None:
        raise KitError(f"tensor {name!r} is under {blocks_path} but names no block index")
    return int(m.group(1))


def client_state(model: nn.Module, split: SplitConfig) -> dict[str, torch.Tensor]:
    """The client parts' tensors (parameters and persistent buffers) under HF names, each stored once.

    Tied aliases (an LM head sharing the embedding matrix) keep the first name in sorted order; the skeleton
    re-ties them from its config. Every tensor is checked to lie outside the trunk's block indices.
    """
    model = base_model(model)
    arch = get_arch(model)
    n = num_layers(model)
    trunk = set(split.trunk_range(n))
    parts = build_client_parts(model, split)
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        merged.update(part.state_dict())
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name in sorted(merged):
        t = merged[name]
        idx = block_index(name, arch.blocks_path)
        if idx is not None and idx in trunk:
            raise KitError(f"refusing to write trunk tensor {name!r} into a client kit")
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().to("cpu").contiguous().clone()
    return out


def build_kit(
    model: nn.Module,
    tokenizer: Any,
    split: SplitConfig,
    signing_key: Ed25519PrivateKey,
    out: str | os.PathLike,
    *,
    model_name: str = "",
) -> Manifest:
    """Write the client kit of ``model`` for ``split`` into ``out`` and sign it; returns the manifest."""
    from safetensors.torch import save_file

    from guardedp2p.engine.fingerprint import model_fingerprint

    model = base_model(model)
    cfg = config_of(model)
    n = num_layers(cfg)
    split.validate(n)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in ("manifest.json", "manifest.sig"):
        (folder / stale).unlink(missing_ok=True)
    state = client_state(model, split)
    (folder / CONFIG_FILE).write_bytes(shippable_config_json(cfg))
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    files = [CONFIG_FILE, WEIGHTS_FILE]
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:  # EOS and sampling defaults `client generate` uses
        (folder / GENERATION_FILE).write_text(generation_config.to_json_string(use_diff=True))
        files.append(GENERATION_FILE)
    if tokenizer is not None:
        tdir = folder / TOKENIZER_DIR
        tokenizer.save_pretrained(str(tdir))
        files += sorted(f"{TOKENIZER_DIR}/{p.relative_to(tdir).as_posix()}" for p in tdir.rglob("*") if p.is_file())
    body: dict[str, Any] = {
        "kind": KIT_KIND,
        "model": {
            "name": model_name,
            "model_type": str(cfg.model_type),
            "num_hidden_layers": n,
            "hidden_size": int(cfg.hidden_size),
            "vocab_size": int(cfg.vocab_size),
        },
        "fingerprint": model_fingerprint(model, split),
        "split": {"bottom_layers": split.bottom_layers, "top_layers": split.top_layers},
        "client_layers": split.client_layers(n),
        "trunk_layers": list(split.trunk_range(n)),
        "params": {"client": sum(t.numel() for t in state.values()), "full_model": _unique_numel(model)},
        "files_role": {
            "config": CONFIG_FILE,
            "weights": WEIGHTS_FILE,
            "tokenizer": TOKENIZER_DIR if tokenizer is not None else None,
        },
    }
    return sign_folder(folder, body, files, signing_key)


def _unique_numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def kit_skeleton(config: Any, split: SplitConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A HF model with only the client's blocks, each at its global index, and ``nn.Identity`` elsewhere.

    Built from a copy of ``config`` with ``num_hidden_layers`` = the client's block count, per-layer settings
    (``layer_types``, ``layer_idx``) following the global index, and the full config put back, as the Offline
    emulator's skeleton does. Its parameters are on the meta device (no memory, no random initialisation):
    :func:`load_kit` gives each one the kit's tensor itself, so the client's memory is that of the kit's
    tensors, read once, and the trunk's blocks never exist (docs/results/kit.md). Buffers computed from the
    config (rotary tables) are real; tied parameters (an LM head sharing the embedding matrix) stay tied.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    arch = get_arch(config)
    n = num_layers(config)
    kept = split.client_layers(n)
    small = copy.deepcopy(config)
    small.num_hidden_layers = len(kept)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == n:
        small.layer_types = [layer_types[g] for g in kept]
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(small, dtype=dtype)
    model.tie_weights()  # init_empty_weights re-wraps every parameter it registers, tied ones included
    blocks = get_path(model, arch.blocks_path)
    slots = nn.ModuleList([nn.Identity() for _ in range(n)])
    for j, g in enumerate(kept):
        block = blocks[j]
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = g
        slots[g] = block
    *parents, leaf = arch.blocks_path.split(".")
    setattr(get_path(model, ".".join(parents)) if parents else model, leaf, slots)
    full = copy.deepcopy(config)
    full._attn_implementation = model.config._attn_implementation
    for m in model.modules():
        if getattr(m, "config", None) is small:
            m.config = full
    for p in model.parameters():
        p.requires_grad_(False)
    return model.train(False)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of the parameter or buffer ``name`` (no copy: the module now holds ``value``; the
    same ``nn.Parameter`` under several names keeps them tied)."""
    path, _, leaf = name.rpartition(".")
    module = model.get_submodule(path) if path else model
    if leaf in module._parameters:
        module._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, False)
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:  # state_dict() named it, so the module holds it as one or the other
        raise KitError(f"{name}: neither a parameter nor a buffer of the client model")


def _load_exact(model: nn.Module, path: Path, where: str) -> None:
    """Give every parameter and persistent buffer of ``model`` its tensor from the safetensors file, refusing
    extra, missing or misshapen ones.

    The skeleton's parameters are on the meta device; each is replaced by the tensor read from the file (cast to
    the skeleton's dtype), one at a time, so the file is never held whole next to the model and no tensor exists
    twice. Tied aliases (the same parameter under several names) get the one tensor the kit stores for them and
    stay tied."""
    from safetensors import safe_open

    own = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for k, v in own.items():
        groups.setdefault(id(v), []).append(k)
    with safe_open(str(path), framework="pt") as fh:
        names = set(fh.keys())
        extra = sorted(names - set(own))
        if extra:
            raise KitError(f"{where}: {len(extra)} tensors the client model does not have, e.g. {extra[0]!r}")
        sources: list[tuple[str, list[str]]] = []
        for group in groups.values():
            stored = [n for n in group if n in names]
            if not stored:
                raise KitError(f"{where}: tensor {group[0]!r} is missing")
            sources.append((stored[0], group))
        for k in sorted(names):
            shape = list(fh.get_slice(k).get_shape())
            if shape != list(own[k].shape):
                raise KitError(f"{where}: {k} has shape {shape}, the model expects {list(own[k].shape)}")
        for src, group in sorted(sources):
            t = fh.get_tensor(src)
            like = own[src]
            if t.is_floating_point() and like.is_floating_point():
                t = t.to(like.dtype)
            if isinstance(like, nn.Parameter):
                t = nn.Parameter(t, requires_grad=False)
            for n in group:
                _set_tensor(model, n, t)
    left = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    left += [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise KitError(f"{where}: {left[0]!r} was not given a tensor by the kit")


def load_kit(
    folder: str | os.PathLike,
    verify_key: Ed25519PublicKey | str | os.PathLike,
    *,
    split: SplitConfig | None = None,
    expect_fingerprint: str | None = None,
    dtype: torch.dtype = torch.float32,
    load_tokenizer: bool = True,
) -> LoadedKit:
    """Verify the kit (signature, then every SHA-256), then build the client model from it.

    ``split``: the split the run asks for; a kit cut for another one is refused. ``expect_fingerprint``: a
    model fingerprint the kit must match (e.g. the provider's). The fingerprint is recomputed over the loaded
    weights and compared with the signed one, so a manifest signed over the wrong tensors is refused too.
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    from guardedp2p.engine.fingerprint import model_fingerprint

    if verify_key is None:
        raise ConfigError("a client kit is only loaded with the provider's verify key (--provider-sign-key)")
    root = Path(folder)
    manifest = verify_artifact(root, verify_key, kind=KIT_KIND)  # nothing is read before this passes
    names = set(manifest.files)
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if required not in names:
            raise KitError(f"the signed manifest of {root} does not list {required}")
    try:
        sp = manifest["split"]
        kit_split = SplitConfig(bottom_layers=int(sp["bottom_layers"]), top_layers=int(sp["top_layers"]))
        signed_fp = str(manifest["fingerprint"])
    except (KeyError, TypeError, ValueError):
        raise KitError(f"the signed manifest of {root} has no usable split or fingerprint") from None
    if split is not None and split != kit_split:
        raise KitMismatchError(
            f"the kit in {root} is cut for split {kit_split.bottom_layers}/{kit_split.top_layers} (bottom/top "
            f"blocks), the run asks for {split.bottom_layers}/{split.top_layers}: pass --bottom-layers "
            f"{kit_split.bottom_layers} --top-layers {kit_split.top_layers}, or ask the provider for a kit of that split"
        )
    if expect_fingerprint is not None and expect_fingerprint != signed_fp:
        raise KitMismatchError(
            f"the kit in {root} is for another model (fingerprint {signed_fp[:16]}…, expected "
            f"{expect_fingerprint[:16]}…): ask the provider for the kit of the model it serves"
        )
    config = AutoConfig.from_pretrained(str(root), local_files_only=True)
    n = num_layers(config)
    kit_split.validate(n)
    arch = get_arch(config)
    trunk = set(kit_split.trunk_range(n))
    weights = resolve_in(root, WEIGHTS_FILE)
    with safe_open(str(weights), framework="pt") as fh:
        tensor_names = list(fh.keys())
    for name in tensor_names:
        idx = block_index(name, arch.blocks_path)
        if idx is not None and (idx in trunk or idx >= n):
            raise KitError(f"{root}: the kit holds {name!r}, a tensor of trunk block {idx}; refusing it")
    model = kit_skeleton(config, kit_split, dtype=dtype)
    _load_exact(model, weights, str(root))
    fp = model_fingerprint(model, kit_split)
    if fp != signed_fp:
        raise KitError(f"{root}: the kit's weights do not match the fingerprint in its signed manifest")
    if GENERATION_FILE in names:
        from transformers import GenerationConfig

        gen_cfg = GenerationConfig.from_pretrained(str(root), local_files_only=True)
        setattr(model, "generation_config", gen_cfg)  # noqa: B010  (nn.Module.__setattr__ is typed for tensors)
    tokenizer = None
    if load_tokenizer and any(n_.startswith(TOKENIZER_DIR + "/") for n_ in names):
        from transformers import AutoTokenizer

        from guardedp2p.engine.loading import prepare_tokenizer

        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(str(root / TOKENIZER_DIR), local_files_only=True))
    return LoadedKit(model, tokenizer, manifest, kit_split)
