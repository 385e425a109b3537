"""Offline GuardedTuning (Shi, Ouyang, Wang, arXiv 2501.04323): an enhanced offsite-tuning (arXiv 2302.04870).

The provider ships a signed *emulator* once (its model with the middle compressed by layer drop, optional
distillation and weight quantization); the client fine-tunes its adapters on it locally, with no per-step
traffic, and sends back only a signed adapter bundle, which the provider plugs into the full model.

Modules: :mod:`~guardedp2p.designs.offline.emulator` (layer selection, build, distil, save/load),
:mod:`~guardedp2p.designs.offline.quantize` (int8/int4/nf4 weight codes), :mod:`~guardedp2p.crypto.manifest`
(signed manifests and their verification), :mod:`~guardedp2p.designs.offline.transfer` (client-side chunked,
resumable download and bundle upload) and :mod:`~guardedp2p.designs.offline.plugin` (provider-side plug-in).
"""

from guardedp2p.crypto.manifest import (
    BadSignatureError,
    DigestMismatchError,
    ManifestFormatError,
    MissingFileError,
    verify_artifact,
)
from guardedp2p.designs.offline.emulator import (
    DistillConfig,
    Emulator,
    EmulatorConfig,
    LayerMap,
    build_emulator,
    distill_emulator,
    layer_map,
    load_emulator,
    save_emulator,
    uniform_drop_indices,
)

__all__ = [
    "BadSignatureError",
    "DigestMismatchError",
    "DistillConfig",
    "Emulator",
    "EmulatorConfig",
    "LayerMap",
    "ManifestFormatError",
    "MissingFileError",
    "build_emulator",
    "distill_emulator",
    "layer_map",
    "load_emulator",
    "save_emulator",
    "uniform_drop_indices",
    "verify_artifact",
]
