"""Model engine: local loading, bottom/trunk/top split, client-side LoRA and the shared model fingerprint.

Importing this package costs only torch; transformers and peft are imported when first needed.
"""

from guardedp2p.engine.arch import (
    ArchSpec,
    UnsupportedArchitectureError,
    get_arch,
    supported_model_types,
)
from guardedp2p.engine.device import DeviceError, pick_device
from guardedp2p.engine.fingerprint import model_fingerprint
from guardedp2p.engine.loading import ModelLoadError, load_causal_lm
from guardedp2p.engine.lora import (
    AdapterError,
    AdapterLoadReport,
    LoraSettings,
    attach_lora,
    count_parameters,
    load_adapter_into_parts,
    lora_state_dict,
    save_adapter,
    trainable_parameters,
)
from guardedp2p.engine.placement import (
    LoadedTrunk,
    PlacementError,
    QuantizationError,
    TrunkLoading,
    load_provider_trunk,
)
from guardedp2p.engine.split import (
    ClientBottom,
    ClientParts,
    ClientTop,
    ProviderTrunk,
    SplitConfig,
    SplitConfigError,
    SplitParts,
    build_client_parts,
    build_trunk,
    loss_fn,
    split_model,
)

__all__ = [
    "AdapterError",
    "AdapterLoadReport",
    "ArchSpec",
    "ClientBottom",
    "ClientParts",
    "ClientTop",
    "DeviceError",
    "LoadedTrunk",
    "LoraSettings",
    "ModelLoadError",
    "PlacementError",
    "ProviderTrunk",
    "QuantizationError",
    "SplitConfig",
    "SplitConfigError",
    "SplitParts",
    "TrunkLoading",
    "UnsupportedArchitectureError",
    "attach_lora",
    "build_client_parts",
    "build_trunk",
    "count_parameters",
    "get_arch",
    "load_adapter_into_parts",
    "load_causal_lm",
    "load_provider_trunk",
    "lora_state_dict",
    "loss_fn",
    "model_fingerprint",
    "pick_device",
    "save_adapter",
    "split_model",
    "supported_model_types",
    "trainable_parameters",
]
