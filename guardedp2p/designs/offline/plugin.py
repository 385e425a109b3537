"""Provider side of the Offline design's last step: verify the client's adapter bundle and plug it in.

Plug-in = the full model with the trained LoRA weights loaded into blocks ``[0, l)`` and ``[N - r, N)``
(offsite-tuning, Xiao, Lin, Han, arXiv 2302.04870). Because the client trained on an emulator that keeps global block indices, its bundle is
a stock PEFT adapter of the full model: :func:`plug_in` loads it through the split engine's strict loader
(every LoRA tensor of the client blocks must be present, none may be left over) and the result equals
``PeftModel.from_pretrained(full_model, bundle)`` (a test checks exactly that). Exports: a merged Hugging
Face folder (LoRA folded into the weights) or a plain PEFT folder.

Bundle layout (signed by the client's Ed25519 key, see :mod:`guardedp2p.crypto.manifest`)::

    adapter_config.json, adapter_model.safetensors   the PEFT adapter
    manifest.json, manifest.sig                      kind "adapter-bundle": base fingerprint, split, the SHA-256
                                                     of the emulator manifest it was trained on, digests
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
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
from guardedp2p.errors import ArtifactError

BUNDLE_KIND = "adapter-bundle"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


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


@dataclass
class PluggedModel:
    model: Any
    bundle: VerifiedBundle
    loaded: dict[str, int]


def plug_in(
    full_model: Any, bundle_dir: str | Path, trusted_keys: Any = None, *, check_fingerprint: bool = True
) -> PluggedModel:
    """Verify the bundle, then load its LoRA into ``full_model``'s client blocks **in place**.

    Pass a copy if the pristine model is still needed. Refuses a bundle made for another base model (the
    fingerprint over the shared layers must match) and any adapter that leaves a client LoRA tensor unset or
    carries tensors for blocks the client does not own.
    """
    from guardedp2p.engine.fingerprint import model_fingerprint
    from guardedp2p.engine.lora import load_adapter_into_parts
    from guardedp2p.engine.split import SplitConfig, build_client_parts

    bundle = verify_adapter_bundle(bundle_dir, trusted_keys)
    split = SplitConfig(*bundle.split)
    if check_fingerprint and model_fingerprint(full_model, split) != bundle.manifest.get("base_fingerprint"):
        raise BundleMismatchError("this model is not the base the adapters were trained for (fingerprint mismatch)")
    parts = build_client_parts(full_model, split)
    report = load_adapter_into_parts(parts.bottom, parts.top, bundle.folder)
    if report.ignored_keys:
        raise BundleMismatchError(
            f"the adapter carries {len(report.ignored_keys)} tensors outside the client blocks, e.g. {report.ignored_keys[0]!r}"
        )
    full_model.train(False)
    return PluggedModel(full_model, bundle, dict(report.loaded))


def export_peft(bundle_dir: str | Path, out_dir: str | Path, trusted_keys: Any = None) -> Path:
    """Copy the verified adapter as a plain PEFT folder (``PeftModel.from_pretrained(base, out_dir)``)."""
    bundle = verify_adapter_bundle(bundle_dir, trusted_keys)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        shutil.copyfile(bundle.folder / name, out / name)
    return out


def export_merged(
    pristine_model: Any, bundle_dir: str | Path, out_dir: str | Path, trusted_keys: Any = None, *, tokenizer: Any = None
) -> Path:
    """Fold the verified LoRA into a copy-free ``pristine_model`` and save a standalone HF folder (safetensors)."""
    from peft import PeftModel

    bundle = verify_adapter_bundle(bundle_dir, trusted_keys)
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
    "BUNDLE_KIND",
    "BundleMismatchError",
    "PluggedModel",
    "VerifiedBundle",
    "export_merged",
    "export_peft",
    "logits_fn_of",
    "plug_in",
    "verify_adapter_bundle",
]
