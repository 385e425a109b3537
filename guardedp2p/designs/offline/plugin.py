"""Provider side of the Offline design's last step: verify the client's adapter bundle and plug it in.

Plug-in = the full model with the trained adapter loaded into blocks ``[0, l)`` and ``[N - r, N)``
(offsite-tuning, Xiao, Lin, Han, arXiv 2302.04870). Two adapter types share the bundle's file names (so the wire and the provider's upload
path are the same for both): ``lora`` (a stock PEFT LoRA adapter, the default) and ``full`` (offsite-tuning's
adapters, arXiv 2302.04870: the client trains the bottom and top blocks *themselves*, and
``adapter_model.safetensors`` carries those blocks' weights under their global names, described by an
``adapter_config.json`` of type ``full-blocks``; see :func:`save_full_blocks`). Because the client trained on an emulator that keeps global block indices, its bundle is
a stock PEFT adapter of the full model: :func:`plug_in` loads it through the split engine's strict loader
(every LoRA tensor of the client blocks must be present, none may be left over) and the result equals
``PeftModel.from_pretrained(full_model, bundle)`` (a test checks exactly that). Exports: a merged Hugging
Face folder (adapter folded into the weights) or, for LoRA, a plain PEFT folder.

Served to its owner (issue 18 item 5): a bundle whose split is wider than the split the provider serves also changes
trunk blocks. :func:`plug_into_trunk` builds that client's own trunk (the served trunk with only the changed blocks
replaced by plugged copies; the base trunk is never modified) for ``provider serve --serve-plugged``, and
:func:`load_client_share` loads into the client's parts only the tensors of its own blocks (a client kit lacks the
trunk's blocks). docs/architecture.md, "Using the returned adapters".

Bundle layout (signed by the client's Ed25519 key, see :mod:`guardedp2p.crypto.manifest`)::

    adapter_config.json, adapter_model.safetensors   the PEFT adapter
    manifest.json, manifest.sig                      kind "adapter-bundle": base fingerprint, split, the SHA-256
                                                     of the emulator manifest it was trained on, digests
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from guardedp2p.crypto.manifest import (
    MANIFEST_NAME,
    BadSignatureError,
    Manifest,
    ManifestFormatError,
    MissingFileError,
    load_key,
    public_key_hex,
    read_manifest,
    verify_files,
)
from guardedp2p.engine.split import ClientBottom, ClientTop, ProviderTrunk, SplitConfig, _SplitPart
from guardedp2p.errors import ArtifactError, ConfigError

BUNDLE_KIND = "adapter-bundle"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
#: ``lora``: PEFT LoRA on the client blocks; ``full``: the client blocks themselves are trained and shipped.
ADAPTER_TYPES = ("lora", "full")
FULL_BLOCKS_TYPE = "full-blocks"  # adapter_config.json "adapter_type" of a full-block adapter
FULL_BLOCKS_VERSION = 1


class BundleMismatchError(ArtifactError):
    """The adapter bundle is valid but was made for another emulator or base model."""


@dataclass
class VerifiedBundle:
    folder: Path
    manifest: Manifest
    signer: str  # fingerprint of the key that signed it
    signer_pinned: bool  # True: that key is one the provider trusts; False: only integrity was checked

    @property
    def split(self) -> tuple[int, int]:
        s = self.manifest["split"]
        return int(s["bottom_layers"]), int(s["top_layers"])


def _trusted(keys: Any) -> list[Ed25519PublicKey] | None:
    if keys is None:
        return None
    if isinstance(keys, (list, tuple, set)):
        return [load_key(k) for k in keys]
    return [load_key(keys)]


def verify_adapter_bundle(
    folder: str | Path,
    trusted_keys: Any = None,
    *,
    emulator_manifest_sha256: str | None = None,
    fingerprint: str | None = None,
) -> VerifiedBundle:
    """Verify signature, digests and provenance of a bundle; loads no tensor.

    ``trusted_keys``: one or several client verify keys (objects or NAME.sign.pub paths). With keys, a bundle
    signed by any other key is refused; with ``None`` the embedded signer key is used, which proves integrity
    but not identity (``signer_pinned=False``).
    """
    folder = Path(folder)
    trusted = _trusted(trusted_keys)
    if trusted is None:
        manifest = read_manifest(folder, None, kind=BUNDLE_KIND)
        pinned = False
    else:
        if not (folder / MANIFEST_NAME).is_file():
            raise MissingFileError(f"{folder / MANIFEST_NAME} is missing: not an adapter bundle")
        try:
            embedded = json.loads((folder / MANIFEST_NAME).read_bytes()[:20000])["signer"]["public_key"]
        except (ValueError, KeyError, TypeError):
            raise BadSignatureError("the bundle manifest names no signer key") from None
        key = next((k for k in trusted if public_key_hex(k) == embedded), None)
        if key is None:
            raise BadSignatureError(
                "the adapter bundle is signed by a key this provider does not trust; add the client's NAME.sign.pub"
            )
        manifest = read_manifest(folder, key, kind=BUNDLE_KIND)
        pinned = True
    if sorted(manifest.files) != sorted(ADAPTER_FILES):
        raise ManifestFormatError(
            f"an adapter bundle lists exactly {', '.join(ADAPTER_FILES)}; got {', '.join(sorted(manifest.files))}"
        )
    verify_files(folder, manifest)
    if emulator_manifest_sha256 is not None and manifest.get("emulator_manifest_sha256") != emulator_manifest_sha256:
        raise BundleMismatchError("the adapters were trained on another emulator than the one this provider serves")
    if fingerprint is not None and manifest.get("base_fingerprint") != fingerprint:
        raise BundleMismatchError("the adapters were made for another base model or split (fingerprint mismatch)")
    split = manifest.get("split")
    if not isinstance(split, dict) or not all(isinstance(split.get(k), int) for k in ("bottom_layers", "top_layers")):
        raise ManifestFormatError("the bundle manifest has no split")
    return VerifiedBundle(folder, manifest, str(manifest["signer"]["fingerprint"]), pinned)


# ============================================================================================ full-block adapters
def check_adapter_type(kind: str) -> str:
    if kind not in ADAPTER_TYPES:
        raise ConfigError(f"adapter type must be one of {', '.join(ADAPTER_TYPES)}, got {kind!r}")
    return kind


def _owned_block_params(part: _SplitPart) -> dict[str, torch.nn.Parameter]:
    """The parameters of the blocks ``part`` owns, by global HF name (``model.layers.28.mlp.up_proj.weight``)."""
    prefix = part.arch.blocks_path + "."
    owned = set(part.layer_range)
    out: dict[str, torch.nn.Parameter] = {}
    for name, p in part.named_parameters():
        if name.startswith(prefix) and int(name[len(prefix) :].split(".", 1)[0]) in owned:
            out[name] = p
    return out


def full_block_parameters(bottom: ClientBottom, top: ClientTop) -> dict[str, torch.nn.Parameter]:
    """The client's blocks ``[0, l)`` and ``[N - r, N)``: what a ``full`` adapter trains (embedding, final norm and
    head stay frozen, as in offsite-tuning)."""
    params = _owned_block_params(bottom)
    params.update(_owned_block_params(top))
    if not params:
        raise ConfigError("the client parts own no block to train (split 0/0?)")
    if any("lora_" in n for n in params):
        raise ConfigError("full-block adapters train the blocks themselves; do not attach LoRA to them as well")
    return params


def enable_full_blocks(bottom: ClientBottom, top: ClientTop) -> int:
    """Freeze everything in the client parts except the client blocks; returns the number of trainable weights."""
    for part in (bottom, top):
        for p in part.parameters():
            p.requires_grad_(False)
    params = full_block_parameters(bottom, top)
    for p in params.values():
        p.requires_grad_(True)
    return sum(p.numel() for p in params.values())


def save_full_blocks(
    bottom: ClientBottom, top: ClientTop, out_dir: str | Path, *, base_model_name_or_path: str = ""
) -> Path:
    """Write a full-block adapter folder: ``adapter_model.safetensors`` (the client blocks, global names, float32)
    and ``adapter_config.json`` (type, version, block indices, parameter count)."""
    from safetensors.torch import save_file

    params = full_block_parameters(bottom, top)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().to("cpu", torch.float32).contiguous() for n, p in params.items()}
    save_file(tensors, str(out / ADAPTER_FILES[1]), metadata={"format": "pt", "adapter_type": FULL_BLOCKS_TYPE})
    blocks = sorted(set(bottom.layer_range) | set(top.layer_range))
    cfg = {
        "adapter_type": FULL_BLOCKS_TYPE,
        "version": FULL_BLOCKS_VERSION,
        "blocks_path": bottom.arch.blocks_path,
        "blocks": blocks,
        "parameters": sum(t.numel() for t in tensors.values()),
        "base_model_name_or_path": base_model_name_or_path,
    }
    (out / ADAPTER_FILES[0]).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def adapter_type_of(folder: str | Path) -> str:
    """``full`` for a full-block adapter folder, ``lora`` for a PEFT one (read from ``adapter_config.json``)."""
    try:
        cfg = json.loads((Path(folder) / ADAPTER_FILES[0]).read_text())
    except (OSError, ValueError) as exc:
        raise ManifestFormatError(f"{folder}: unreadable {ADAPTER_FILES[0]} ({exc})") from None
    if not isinstance(cfg, dict):
        raise ManifestFormatError(f"{folder}: {ADAPTER_FILES[0]} is not a JSON object")
    return "full" if cfg.get("adapter_type") == FULL_BLOCKS_TYPE else "lora"


def make_full_block_bundle(
    adapter_dir: str | Path,
    bundle_dir: str | Path,
    signing_key: Any,
    *,
    emulator_manifest: Manifest,
    extra: Mapping[str, Any] | None = None,
) -> Manifest:
    """Sign a full-block adapter folder as an adapter bundle (same files and manifest as the LoRA bundle of
    :func:`guardedp2p.designs.offline.transfer.make_adapter_bundle`, ``adapter.format`` = ``full-blocks``)."""
    from guardedp2p.crypto.manifest import sign_folder

    src, out = Path(adapter_dir), Path(bundle_dir)
    if adapter_type_of(src) != "full":
        raise ConfigError(f"{src} is not a full-block adapter folder (see save_full_blocks)")
    out.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        if src != out:
            shutil.copyfile(src / name, out / name)
    body: dict[str, Any] = {
        "kind": BUNDLE_KIND,
        "base_fingerprint": emulator_manifest["fingerprint"],
        "split": dict(emulator_manifest["split"]),
        "emulator_manifest_sha256": emulator_manifest.sha256,
        "adapter": {
            "format": FULL_BLOCKS_TYPE,
            "client_layers": list(emulator_manifest["layers"]["adapter_bottom"])
            + list(emulator_manifest["layers"]["adapter_top"]),
        },
    }
    if extra:
        body["training"] = dict(extra)
    return sign_folder(out, body, ADAPTER_FILES, signing_key)


def _load_full_blocks(
    bottom: ClientBottom,
    top: ClientTop,
    folder: Path,
    *,
    covered: Collection[int] | None = None,
    leave: Collection[int] = (),
) -> dict[str, int]:
    """Copy a verified full-block adapter into the client blocks; every block tensor must be there, nothing else.

    ``covered``: the blocks the adapter was trained on (default: every client block), so only those must be complete;
    ``leave``: blocks whose tensors are skipped (the provider's trunk runs them, :func:`load_client_share`)."""
    from safetensors.torch import load_file

    params = full_block_parameters(bottom, top)
    blocks_path = bottom.arch.blocks_path
    if covered is not None:
        params = {n: p for n, p in params.items() if _block_of(n, blocks_path) in set(covered)}
    tensors = load_file(str(folder / ADAPTER_FILES[1]))
    left = set(leave)
    tensors = {n: t for n, t in tensors.items() if _block_of(n, blocks_path) not in left}
    extra = sorted(set(tensors) - set(params))
    if extra:
        raise BundleMismatchError(
            f"the full-block adapter carries {len(extra)} tensors outside the client blocks, e.g. {extra[0]!r}"
        )
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise BundleMismatchError(
            f"the full-block adapter lacks {len(missing)} tensors of the client blocks, e.g. {missing[0]!r}; "
            "it was made for another model or split"
        )
    for n, t in tensors.items():
        if tuple(t.shape) != tuple(params[n].shape):
            raise BundleMismatchError(f"{n} has shape {list(t.shape)}, the model expects {list(params[n].shape)}")
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise BundleMismatchError(f"{n} is not a finite float tensor")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    bottom_names = _owned_block_params(bottom)
    return {
        "bottom": sum(1 for n in tensors if n in bottom_names),
        "top": sum(1 for n in tensors if n not in bottom_names),
    }


def _block_of(name: str, blocks_path: str) -> int | None:
    """Global block index of an adapter tensor (``[base_model.model.]model.layers.3.…`` -> 3); None outside blocks."""
    from guardedp2p.engine.lora import PEFT_PREFIX

    name = name.removeprefix(PEFT_PREFIX)
    prefix = blocks_path + "."
    if not name.startswith(prefix):
        return None
    head = name[len(prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def bundle_blocks(folder: str | Path, blocks_path: str) -> set[int]:
    """The blocks a (verified) adapter folder's tensors belong to, read from the safetensors header alone."""
    from safetensors import safe_open

    path = Path(folder) / ADAPTER_FILES[1]
    try:
        with safe_open(str(path), framework="pt") as fh:
            names = list(fh.keys())
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a malformed header
        raise ManifestFormatError(f"{path} is not a readable safetensors file ({exc})") from None
    return {i for i in (_block_of(n, blocks_path) for n in names) if i is not None}


def trunk_blocks_of_bundle(bundle: VerifiedBundle, n_layers: int, blocks_path: str, served: SplitConfig) -> list[int]:
    """The blocks of the trunk served at split ``served`` that the bundle's adapter changes (sorted).

    Refuses a bundle whose split does not fit the model, or whose tensors reach blocks outside its own client blocks
    (no honest ``client tune`` writes one)."""
    from guardedp2p.engine.split import SplitConfigError

    split = SplitConfig(*bundle.split)
    try:
        mine = set(split.client_layers(n_layers))
    except SplitConfigError as exc:
        raise BundleMismatchError(f"the bundle was made for another model: its split does not fit ({exc})") from None
    blocks = bundle_blocks(bundle.folder, blocks_path)
    outside = sorted(blocks - mine)
    if outside:
        raise BundleMismatchError(
            f"the bundle's adapter carries tensors of block(s) {outside}, outside its split's client blocks "
            f"{split.bottom_layers}/{split.top_layers}"
        )
    return sorted(blocks & set(served.trunk_range(n_layers)))


@dataclass
class PluggedModel:
    model: Any
    bundle: VerifiedBundle
    loaded: dict[str, int]


def plug_in(
    full_model: Any, bundle_dir: str | Path, trusted_keys: Any = None, *, check_fingerprint: bool = True
) -> PluggedModel:
    """Verify the bundle, then load its adapter into ``full_model``'s client blocks **in place**.

    Pass a copy if the pristine model is still needed. Refuses a bundle made for another base model (the
    fingerprint over the shared layers must match) and any adapter that leaves a client tensor unset or
    carries tensors for blocks the client does not own. A LoRA bundle is injected as PEFT LoRA; a full-block
    bundle overwrites the client blocks' weights.
    """
    from guardedp2p.engine.fingerprint import model_fingerprint
    from guardedp2p.engine.lora import load_adapter_into_parts
    from guardedp2p.engine.split import build_client_parts

    bundle = verify_adapter_bundle(bundle_dir, trusted_keys)
    split = SplitConfig(*bundle.split)
    if check_fingerprint and model_fingerprint(full_model, split) != bundle.manifest.get("base_fingerprint"):
        raise BundleMismatchError("this model is not the base the adapters were trained for (fingerprint mismatch)")
    parts = build_client_parts(full_model, split)
    if adapter_type_of(bundle.folder) == "full":
        loaded = _load_full_blocks(parts.bottom, parts.top, bundle.folder)
        full_model.train(False)
        return PluggedModel(full_model, bundle, loaded)
    report = load_adapter_into_parts(parts.bottom, parts.top, bundle.folder)
    if report.ignored_keys:
        raise BundleMismatchError(
            f"the adapter carries {len(report.ignored_keys)} tensors outside the client blocks, e.g. {report.ignored_keys[0]!r}"
        )
    full_model.train(False)
    return PluggedModel(full_model, bundle, dict(report.loaded))


class NothingToPlug(ConfigError):
    """The bundle changes no block of the served trunk: the base trunk already serves it to its owner."""


@dataclass
class PluggedTrunk:
    """A client's own trunk: the served trunk with the blocks its bundle changes replaced by plugged copies."""

    trunk: ProviderTrunk
    bundle: VerifiedBundle
    blocks: list[int]  # the served trunk's blocks the bundle changes

    def announcement(self) -> dict[str, Any]:
        """What ACCEPT tells the owner (``ProviderResources.peer_trunks``): the bundle's manifest SHA-256 (the same
        bytes the client holds), the changed trunk blocks and the signer's fingerprint."""
        return {"bundle": self.bundle.manifest.sha256, "blocks": list(self.blocks), "signer": self.bundle.signer}


def plug_into_trunk(
    base: ProviderTrunk,
    bundle_dir: str | Path,
    trusted_keys: Any,
    *,
    load_model: Callable[[], torch.nn.Module],
    fingerprint: str | None = None,
) -> PluggedTrunk:
    """Build the trunk that serves one client its Offline adapters (``provider serve --serve-plugged``).

    The bundle is verified first as an upload is (signature by ``trusted_keys``, digests), and refused with
    :class:`NothingToPlug` when it changes no block of ``base`` (the base trunk then already serves it). Only then is
    a fresh copy of the model loaded (``load_model``; ``fingerprint``: the served split's, which it must match) and
    the bundle plugged in with :func:`plug_in` (the base fingerprint of the bundle's split, strict tensor loading).
    The result shares every unchanged block with ``base`` and holds its own copies of the changed ones, placed on
    their base block's device and cast to the trunk's precision (LoRA weights stay float32, as on the client);
    ``base`` itself is never modified. Memory: one extra copy of the changed blocks, and one model copy while this
    runs.
    """
    import gc

    from guardedp2p.engine.fingerprint import model_fingerprint
    from guardedp2p.engine.split import _block_device, _graft, build_trunk

    bundle = verify_adapter_bundle(bundle_dir, trusted_keys)
    served = base.split_config
    blocks = trunk_blocks_of_bundle(bundle, base.n_layers, base.arch.blocks_path, served)
    if not blocks:
        raise NothingToPlug(
            f"the bundle {bundle.folder} (split {bundle.split[0]}/{bundle.split[1]}) changes no block of the served "
            f"trunk (split {served.bottom_layers}/{served.top_layers}): the base trunk already serves it, and its "
            "owner uses it as is with `client generate --adapter BUNDLE`"
        )
    model = load_model()
    if fingerprint is not None and model_fingerprint(model, served) != fingerprint:
        raise BundleMismatchError("the model loaded for plugging is not the one this provider serves")
    plug_in(model, bundle.folder, trusted_keys)
    trunk = build_trunk(model, served)
    del model
    for path in base.arch.shared_paths:  # rotary tables and the like: the base trunk's, already placed
        _graft(trunk, base, path)
    dtype = base.compute_dtype
    for i in base.layer_range:
        if i not in blocks:
            trunk.blocks[i] = base.blocks[i]  # shared, not copied: untouched weights stay one tensor
            continue
        block = trunk.blocks[i]
        for name, p in block.named_parameters():
            if p.is_floating_point() and "lora_" not in name and p.dtype != dtype:
                p.data = p.data.to(dtype)
        block.to(_block_device(base.blocks[i]) or base.device)
    for p in trunk.parameters():
        p.requires_grad_(False)
    trunk.train(False)
    gc.collect()
    return PluggedTrunk(trunk, bundle, blocks)


def load_client_share(bottom: ClientBottom, top: ClientTop, bundle: VerifiedBundle) -> dict[str, int]:
    """Load a verified bundle into the client's parts when its adapter also changes blocks of the served trunk.

    Only the tensors of the client's own blocks are loaded (each of them must be there); those of the served trunk's
    blocks are the provider's (its plugged trunk, :func:`plug_into_trunk`); any other tensor refuses the bundle.
    Used where the client cannot plug the bundle into a full model (a client kit holds no trunk block)."""
    from guardedp2p.engine.lora import load_adapter_into_parts

    n, path = bottom.n_layers, bottom.arch.blocks_path
    served = bottom.split_config
    trunk_blocks = set(trunk_blocks_of_bundle(bundle, n, path, served))
    if adapter_type_of(bundle.folder) == "full":
        covered = set(SplitConfig(*bundle.split).client_layers(n)) - trunk_blocks
        return _load_full_blocks(bottom, top, bundle.folder, covered=covered, leave=trunk_blocks)
    report = load_adapter_into_parts(bottom, top, bundle.folder)
    stray = [k for k in report.ignored_keys if _block_of(k, path) not in trunk_blocks]
    if stray:
        raise BundleMismatchError(
            f"the adapter carries {len(stray)} tensors outside the client's and the trunk's blocks, e.g. {stray[0]!r}"
        )
    return dict(report.loaded)


def export_peft(bundle_dir: str | Path, out_dir: str | Path, trusted_keys: Any = None) -> Path:
    """Copy the verified adapter as a plain PEFT folder (``PeftModel.from_pretrained(base, out_dir)``)."""
    bundle = verify_adapter_bundle(bundle_dir, trusted_keys)
    if adapter_type_of(bundle.folder) == "full":
        raise ConfigError("a full-block bundle is not a PEFT adapter: export it merged (--merge) instead")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        shutil.copyfile(bundle.folder / name, out / name)
    return out


def export_merged(
    pristine_model: Any, bundle_dir: str | Path, out_dir: str | Path, trusted_keys: Any = None, *, tokenizer: Any = None
) -> Path:
    """Fold the verified adapter into ``pristine_model`` (changed in place) and save a standalone HF folder."""
    from peft import PeftModel

    bundle = verify_adapter_bundle(bundle_dir, trusted_keys)
    if adapter_type_of(bundle.folder) == "full":
        merged = plug_in(pristine_model, bundle_dir, trusted_keys).model
    else:
        merged = PeftModel.from_pretrained(pristine_model, str(bundle.folder)).merge_and_unload()
    out = Path(out_dir)
    _save_float_model(merged, out)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def _save_float_model(model: Any, out: Path) -> None:
    """``save_pretrained`` that also works for a model loaded from GGUF (its weights are already float)."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or str(getattr(method, "value", method)) != "gguf":
        model.save_pretrained(str(out), safe_serialization=True)
        return
    qcfg = getattr(model.config, "quantization_config", None)
    model.hf_quantizer = None
    if qcfg is not None:
        del model.config.quantization_config
    try:
        model.save_pretrained(str(out), safe_serialization=True)
    finally:
        model.hf_quantizer = quantizer
        if qcfg is not None:
            model.config.quantization_config = qcfg


def logits_fn_of(model: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``logits_fn(input_ids, attention_mask)`` of a whole HF model, for the evaluation helpers."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        model.train(False)
        return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits

    return fn


__all__ = [
    "ADAPTER_FILES",
    "ADAPTER_TYPES",
    "BUNDLE_KIND",
    "BundleMismatchError",
    "adapter_type_of",
    "check_adapter_type",
    "enable_full_blocks",
    "full_block_parameters",
    "make_full_block_bundle",
    "save_full_blocks",
    "NothingToPlug",
    "PluggedModel",
    "PluggedTrunk",
    "VerifiedBundle",
    "bundle_blocks",
    "load_client_share",
    "plug_into_trunk",
    "trunk_blocks_of_bundle",
    "export_merged",
    "export_peft",
    "logits_fn_of",
    "plug_in",
    "verify_adapter_bundle",
]
