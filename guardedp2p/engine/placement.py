"""Big models on the provider: where the trunk's blocks go, in which precision, quantized or not.

``provider serve --device-map/--dtype/--load-in`` end here. The design choices, and why:

* The provider only *serves* the trunk: it never trains it, so 8-bit / 4-bit bitsandbytes weights cost it
  nothing but a little accuracy, and only the trunk's linear layers are quantized. The client's modules
  (embedding step, bottom and top blocks, final norm, LM head) are loaded unquantized in the checkpoint's own
  precision, because the handshake fingerprint hashes exactly those weights: a quantized or down-cast copy
  would not match what the client loads. They are dropped as soon as the fingerprint is computed.
* ``--dtype`` is applied to the trunk *after* the fingerprint (the checkpoint is loaded with ``dtype="auto"``),
  for the same reason: bf16 on the provider must not change the hash of an fp16 or fp32 checkpoint. The
  default is fp32, as on the client; big checkpoints (fp16/bf16 on disk) want ``--dtype bf16`` or ``fp16``.
* Placement is planned here, not by accelerate's ``"auto"``: we know the blocks are equal in size and that the
  embeddings and head are transient, so a plan per block is simple, explainable in the log and checked against
  free GPU memory *before* loading. A trunk that cannot fit fails with a ``PlacementError`` that says what to
  change, instead of a CUDA out-of-memory traceback half-way through loading.
* Parameter counts come from a meta-device model (no memory, no weights): the same functions feed the
  benchmark that documents memory per party (``benchmarks/bench_big_models.py``).
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from guardedp2p.engine.arch import get_arch, get_path, num_layers
from guardedp2p.engine.split import ProviderTrunk, SplitConfig, build_trunk
from guardedp2p.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

log = logging.getLogger("guardedp2p.provider")

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
LOAD_IN = ("8bit", "4bit")
STRATEGIES = ("auto", "balanced")
DEVICE_MAP_HELP = "auto (GPUs when present, as few as hold the trunk; else CPU), balanced (trunk split evenly over all GPUs), cpu, cuda or cuda:N"
# Share of a GPU's free memory the plan may fill; the rest is for activations, the autograd graph kept between
# ACT_UP and GRAD_UP, and the CUDA caching allocator's slack.
GPU_MEMORY_FRACTION = 0.85
# Bytes per quantized weight: int8, or 4 bits + one fp32 absmax per block of 64 (bitsandbytes defaults, no
# double quantization). 8-bit's per-row scales (4 bytes per output row) are ignored (< 0.1 %).
QUANTIZED_WEIGHT_BYTES = {"8bit": 1.0, "4bit": 0.5 + 4 / 64}
_GIB = 1 << 30


class PlacementError(ConfigError):
    """The trunk cannot be placed as asked (no such device, not enough memory)."""


class QuantizationError(ConfigError):
    """``--load-in`` cannot run here (bitsandbytes missing, no backend for the device, unsupported model file)."""


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``fp32|bf16|fp16`` (or the torch names) to a dtype; ``None``/``"auto"`` keeps the checkpoint's own."""
    if name is None or name == "auto":
        return None
    key = _DTYPE_ALIASES.get(name, name)
    if key not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)} (or auto: the checkpoint's own)")
    return DTYPES[key]


@dataclass(frozen=True)
class TrunkLoading:
    """How the provider loads its trunk: placement strategy, compute precision, optional weight quantization."""

    device_map: str = "auto"
    dtype: str = "fp32"  # fp32|bf16|fp16, or auto: the checkpoint's own. fp32 like the client's default.
    load_in: str | None = None  # None, "8bit" or "4bit"

    def validate(self) -> None:
        """Check the names (no hardware is looked at here; see ``plan_trunk_devices``)."""
        parse_dtype(self.dtype)
        if self.load_in is not None and self.load_in not in LOAD_IN:
            raise QuantizationError(f"--load-in must be one of {', '.join(LOAD_IN)}, got {self.load_in!r}")
        if self.device_map not in STRATEGIES + ("cpu",):
            dev = _parse_device(self.device_map)
            if dev.type == "mps" and self.load_in:
                raise QuantizationError("--load-in is not supported on mps; use --dtype fp16 instead")

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return parse_dtype(self.dtype)


def _parse_device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise PlacementError(f"unknown --device-map {name!r}; use {DEVICE_MAP_HELP}") from exc
    if dev.type not in ("cpu", "cuda", "mps"):
        raise PlacementError(f"unknown --device-map {name!r}; use {DEVICE_MAP_HELP}")
    return dev


# ---------------------------------------------------------------------------------------------- sizes


def meta_model(config: PretrainedConfig) -> nn.Module:
    """The model's skeleton on the meta device: shapes and parameter counts without memory or weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _is_quantizable(module: nn.Module) -> bool:
    # what transformers' replace_with_bnb_linear converts: plain nn.Linear and GPT-2's Conv1D
    return type(module) is nn.Linear or type(module).__name__ == "Conv1D"


@dataclass(frozen=True)
class PartCounts:
    """Parameters per part, each tensor counted once (a tied LM head counts with the embeddings)."""

    embed: int
    bottom: int
    trunk: int
    top: int
    head: int
    trunk_quantizable: int  # trunk weights bitsandbytes would quantize (linear layers)
    trunk_blocks: int
    block_max: int  # the largest trunk block
    block_max_quantizable: int

    @property
    def client(self) -> int:
        return self.embed + self.bottom + self.top + self.head

    @property
    def total(self) -> int:
        return self.client + self.trunk


def count_parts(model: nn.Module, split: SplitConfig) -> PartCounts:
    """Count the parameters of each part of ``model`` (a real or a meta-device model)."""
    arch = get_arch(model)
    n = num_layers(model)
    a, b = split.bounds(n)
    seen: set[int] = set()

    def count(modules: Sequence[nn.Module | None], *, quantizable_only: bool = False) -> int:
        total = 0
        for mod in modules:
            if mod is None:
                continue
            for sub in mod.modules():
                if quantizable_only and not _is_quantizable(sub):
                    continue
                for p in sub.parameters(recurse=False):
                    if quantizable_only and p is not getattr(sub, "weight", None):
                        continue
                    if id(p) not in seen:
                        seen.add(id(p))
                        total += p.numel()
        return total

    blocks = get_path(model, arch.blocks_path)
    embed = count([get_path(model, p) for p in arch.embed_paths])
    bottom = count([blocks[i] for i in range(a)])
    trunk_q = count([blocks[i] for i in range(a, b)], quantizable_only=True)
    trunk = trunk_q + count([blocks[i] for i in range(a, b)])
    top = count([blocks[i] for i in range(b, n)])
    head = count([get_path(model, p) for p in arch.head_paths])
    per_block = [sum(p.numel() for p in blocks[i].parameters()) for i in range(a, b)]
    per_block_q = [sum(m.weight.numel() for m in blocks[i].modules() if _is_quantizable(m)) for i in range(a, b)]
    return PartCounts(embed, bottom, trunk, top, head, trunk_q, b - a, max(per_block), max(per_block_q))


def weight_bytes(n_params: int, n_quantizable: int, dtype_bytes: int, load_in: str | None) -> int:
    """Bytes of weights: quantizable ones at the quantized size when ``load_in`` is set, the rest at dtype."""
    if load_in is None:
        return n_params * dtype_bytes
    return int(n_quantizable * QUANTIZED_WEIGHT_BYTES[load_in] + (n_params - n_quantizable) * dtype_bytes)


# ---------------------------------------------------------------------------------------------- planning


def gpu_free_bytes() -> list[int]:
    """Free memory of each visible CUDA device (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    return [int(torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count())]


def _gib(n: float) -> str:
    return f"{n / _GIB:.1f} GiB" if abs(n) >= _GIB / 10 else f"{n / (1 << 20):.1f} MiB"


def plan_trunk_devices(
    strategy: str,
    n_blocks: int,
    block_bytes: int,
    *,
    first_extra_bytes: int = 0,
    gpu_free: Sequence[int] | None = None,
    fraction: float = GPU_MEMORY_FRACTION,
) -> list[str]:
    """One device name per trunk block.

    ``first_extra_bytes`` is what the first device also holds while loading (the client-side modules, kept
    until the fingerprint is computed). ``gpu_free`` defaults to the free memory of the visible GPUs; tests pass
    made-up values. Raises ``PlacementError`` with the sizes and what to try when the trunk does not fit.
    """
    free = list(gpu_free_bytes() if gpu_free is None else gpu_free)
    cpu = ["cpu"] * n_blocks
    need = n_blocks * block_bytes + first_extra_bytes
    advice = "use --load-in 8bit or 4bit, --dtype bf16, more GPUs (--device-map balanced), or --device-map cpu"
    if strategy == "cpu":
        return cpu
    if strategy in STRATEGIES:
        if not free:
            if strategy == "balanced":
                raise PlacementError(
                    "--device-map balanced spreads the trunk over GPUs, but CUDA is not available; use --device-map cpu or auto"
                )
            return cpu
        budgets = [int(f * fraction) for f in free]
        budgets[0] -= first_extra_bytes
        if strategy == "balanced":
            return _plan_balanced(n_blocks, block_bytes, budgets, need, advice)
        out = _plan_sequential(n_blocks, block_bytes, budgets)
        if out is None:
            raise PlacementError(
                f"the trunk needs about {_gib(n_blocks * block_bytes)} ({n_blocks} blocks), plus {_gib(first_extra_bytes)} of "
                f"client-side modules on the first GPU while loading, but the {len(free)} visible GPU(s) have "
                f"{_gib(sum(free))} free, {fraction:.0%} of it usable; {advice}"
            )
        return out
    dev = _parse_device(strategy)
    if dev.type == "cuda":
        if not free:
            raise PlacementError(
                f"--device-map {strategy} asks for a GPU but CUDA is not available; use --device-map cpu or auto"
            )
        idx = dev.index if dev.index is not None else torch.cuda.current_device() if torch.cuda.is_available() else 0
        if idx >= len(free):
            raise PlacementError(f"--device-map {strategy}: only {len(free)} CUDA device(s) are visible")
        if need > free[idx] * fraction:
            raise PlacementError(
                f"the trunk needs about {_gib(need)} (weights, plus {_gib(first_extra_bytes)} of client-side modules while "
                f"loading) but cuda:{idx} has {_gib(free[idx])} free ({fraction:.0%} usable); {advice}"
            )
        return [f"cuda:{idx}"] * n_blocks
    if dev.type == "mps":
        return ["mps"] * n_blocks
    return cpu


def _plan_sequential(n: int, block: int, budgets: list[int]) -> list[str] | None:
    """Fill GPU 0, then GPU 1, ...: as few GPUs as hold the trunk (fewest cross-device hops per step).
    None when the blocks do not fit."""
    out: list[str] = []
    for gpu, budget in enumerate(budgets):
        fits = max(0, budget // block) if block > 0 else n
        take = min(n - len(out), fits)
        out.extend([f"cuda:{gpu}"] * take)
        if len(out) == n:
            return out
    return None


def _plan_balanced(n: int, block: int, budgets: list[int], need: int, advice: str) -> list[str]:
    """Contiguous, near-equal runs of blocks on every GPU (equal memory and compute per GPU)."""
    k = min(len(budgets), n)
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    out: list[str] = []
    for gpu, size in enumerate(sizes):
        if size * block > budgets[gpu]:
            raise PlacementError(
                f"--device-map balanced puts {size} trunk blocks ({_gib(size * block)}) on cuda:{gpu}, which has room for "
                f"{_gib(max(0, budgets[gpu]))}; the whole trunk needs about {_gib(need)}; {advice}"
            )
        out.extend([f"cuda:{gpu}"] * size)
    return out


def module_device_map(model: nn.Module, split: SplitConfig, trunk_devices: Sequence[str]) -> dict[str, str]:
    """The ``device_map`` for ``from_pretrained``: each trunk block where planned, everything else (client-side
    modules, rotary tables, anything the architecture table does not name) on the first trunk device."""
    arch = get_arch(model)
    n = num_layers(model)
    a, b = split.bounds(n)
    if len(trunk_devices) != b - a:
        raise PlacementError(f"{len(trunk_devices)} devices planned for a trunk of {b - a} blocks")
    first = trunk_devices[0]
    dm: dict[str, str] = {}
    for path in arch.embed_paths + arch.head_paths + arch.shared_paths:
        mod = get_path(model, path)
        if mod is not None and (next(mod.parameters(), None) is not None or next(mod.buffers(), None) is not None):
            dm[path] = first
    for i in range(n):
        dm[f"{arch.blocks_path}.{i}"] = trunk_devices[i - a] if a <= i < b else first
    names = [k for k, _ in model.named_parameters()] + [k for k, _ in model.named_buffers()]
    for name in names:
        if not any(name == k or name.startswith(k + ".") for k in dm):
            dm[name.rsplit(".", 1)[0] if "." in name else name] = first
    return dm


# ---------------------------------------------------------------------------------------------- quantization


def check_quantization(load_in: str, device_types: Sequence[str]) -> None:
    """Fail early, with what to do, when bitsandbytes cannot quantize on the planned devices.

    Why a probe: whether a bitsandbytes build has a kernel for a device (CUDA, or the CPU backend of recent
    releases) is only known by trying; transformers would otherwise fail deep inside loading. The probe
    quantizes one 64x64 layer and runs a forward and a backward pass (the Online design needs the trunk's
    input gradient), which takes milliseconds after bitsandbytes' import (a few seconds).
    """
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationError(
            f"--load-in {load_in} needs bitsandbytes, which is not installed: `pip install 'guardedp2p[bnb]'` "
            "(or `pip install bitsandbytes`); or drop --load-in and use --dtype bf16 (half the fp32 memory)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes as bnb
    except Exception as exc:  # noqa: BLE001 - a broken install raises anything (OSError, RuntimeError, ...)
        raise QuantizationError(
            f"bitsandbytes is installed but does not import ({type(exc).__name__}: {exc}); reinstall it or drop --load-in"
        ) from exc
    for dev in sorted(set(device_types)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if load_in == "8bit":
                    layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False).to(dev)
                else:
                    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4").to(dev)
                x = torch.randn(2, 64, device=dev, requires_grad=True)
                layer(x).float().sum().backward()
                if x.grad is None or not torch.isfinite(x.grad).all():
                    raise RuntimeError("no finite input gradient")
        except Exception as exc:  # noqa: BLE001 - any failure means this backend cannot serve a quantized trunk
            where = "the CPU" if dev == "cpu" else dev
            hint = (
                "put the trunk on a GPU (--device-map auto or cuda), or install a bitsandbytes release with the CPU "
                "backend (>= 0.47)"
                if dev == "cpu"
                else "check that bitsandbytes was built for this CUDA version (`python -m bitsandbytes`)"
            )
            raise QuantizationError(
                f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot run {load_in} layers on {where} "
                f"({type(exc).__name__}: {str(exc)[:200]}); {hint}; or drop --load-in and use --dtype bf16"
            ) from exc


class _DropInt8CastWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _quiet_int8_cast_warning() -> None:
    """bitsandbytes logs on *every* int8 matmul that non-fp16 inputs are cast to fp16: expected here (int8
    matmuls compute in fp16 whatever ``--dtype`` says), and at one line per layer per step it floods the log."""
    lg = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastWarning) for f in lg.filters):
        lg.addFilter(_DropInt8CastWarning())


def _bnb_config(load_in: str, skip: list[str], compute_dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    if load_in == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip
    )


def client_module_paths(model: nn.Module, split: SplitConfig) -> list[str]:
    """Module paths the client also holds (kept unquantized so the fingerprint matches)."""
    arch = get_arch(model)
    n = num_layers(model)
    return list(arch.embed_paths + arch.head_paths) + [f"{arch.blocks_path}.{i}" for i in split.client_layers(n)]


# ---------------------------------------------------------------------------------------------- loading


def cast_floating_parameters(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast the plain floating-point parameters of ``module`` in place.

    Quantized bitsandbytes weights (int8 / uint8) and buffers are left alone: rotary ``inv_freq`` tables must
    stay fp32, as transformers keeps them.
    """
    for p in module.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def _checkpoint_dtype(config: PretrainedConfig) -> torch.dtype:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    return torch.float32


@dataclass
class LoadedTrunk:
    """The provider's frozen trunk and what the handshake and the log need about it."""

    trunk: ProviderTrunk
    fingerprint: str
    config: PretrainedConfig
    devices: list[str]  # one per trunk block
    dtype: torch.dtype  # compute dtype
    load_in: str | None = None
    weight_bytes: int = 0

    def describe(self) -> str:
        runs: list[str] = []
        a = self.trunk.layer_range.start
        start = 0
        for i in range(1, len(self.devices) + 1):
            if i == len(self.devices) or self.devices[i] != self.devices[start]:
                runs.append(f"blocks {a + start}-{a + i - 1} on {self.devices[start]}")
                start = i
        quant = f", {self.load_in} weights" if self.load_in else ""
        dtype = str(self.dtype).removeprefix("torch.")  # torch's own name, the wire's name for the same dtype
        return f"{'; '.join(runs)}; {dtype}{quant}; {_gib(self.weight_bytes)} of weights"


def _trunk_weight_bytes(trunk: ProviderTrunk) -> int:
    return sum(p.numel() * p.element_size() for i in trunk.layer_range for p in trunk.blocks[i].parameters())


def load_provider_trunk(name_or_path: str, split: SplitConfig, loading: TrunkLoading | None = None) -> LoadedTrunk:
    """Load only what the provider serves: plan placement, load, fingerprint, keep the trunk, free the rest.

    Hugging Face folders go through ``from_pretrained(device_map=..., quantization_config=...)``, so weights
    stream from disk to their device without a full copy in RAM. The GGUF default is de-quantized on the CPU by
    transformers (that cannot be avoided) and its trunk blocks are then moved to their planned devices.
    """
    from guardedp2p.engine.loading import ModelLoadError, _offline_env, _resolve, load_causal_lm

    loading = loading or TrunkLoading()
    loading.validate()
    _offline_env()
    folder, gguf = _resolve(str(name_or_path))
    target = loading.torch_dtype
    if gguf is not None:
        if loading.load_in:
            raise QuantizationError(
                f"--load-in {loading.load_in} needs a Hugging Face model folder (safetensors), not the GGUF file "
                f"{gguf!r}: transformers de-quantizes GGUF weights on load and cannot re-quantize them with "
                "bitsandbytes; pass a Hugging Face folder, or drop --load-in"
            )
        model, _ = load_causal_lm(str(name_or_path), device="cpu")
        ckpt_dtype = torch.float32
        counts = count_parts(model, split)
    else:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not read the model config in {str(folder)!r}: {exc}") from exc
        get_arch(config)
        split.validate(num_layers(config))
        ckpt_dtype = _checkpoint_dtype(config)
        skeleton = meta_model(config)
        counts = count_parts(skeleton, split)
    final_dtype = target or ckpt_dtype
    # while loading, blocks sit at the checkpoint's precision (cast afterwards), so plan for the larger of the two
    elt = max(torch.finfo(ckpt_dtype).bits, torch.finfo(final_dtype).bits) // 8
    block_bytes = weight_bytes(counts.block_max, counts.block_max_quantizable, elt, loading.load_in)
    # the client-side modules share the first trunk device until the fingerprint is taken (GGUF: they stay on CPU)
    client_bytes = 0 if gguf is not None else counts.client * torch.finfo(ckpt_dtype).bits // 8
    devices = plan_trunk_devices(loading.device_map, counts.trunk_blocks, block_bytes, first_extra_bytes=client_bytes)
    if loading.load_in:
        if loading.load_in == "8bit":
            _quiet_int8_cast_warning()
        check_quantization(loading.load_in, sorted({torch.device(d).type for d in devices}))
    if gguf is None:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        kwargs: dict[str, Any] = {
            "local_files_only": True,
            "dtype": "auto",
            "device_map": module_device_map(skeleton, split, devices),
        }
        if loading.load_in:
            kwargs["quantization_config"] = _bnb_config(
                loading.load_in, client_module_paths(skeleton, split), final_dtype
            )
        del skeleton
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not load model from {str(folder)!r}: {exc}") from exc
        except torch.cuda.OutOfMemoryError as exc:
            raise PlacementError(
                f"out of GPU memory while loading the trunk ({exc}); use --load-in 8bit or 4bit, --dtype bf16, "
                "--device-map balanced over more GPUs, or --device-map cpu"
            ) from exc
        model.train(False)
    loaded = trunk_from_model(
        model, split, dtype=target, devices=devices if gguf is not None else None, load_in=loading.load_in
    )
    del model  # the trunk holds only its blocks: embeddings, head and the client's blocks are freed here
    _free_memory()
    log.info("trunk loaded: %s", loaded.describe())
    return loaded


def trunk_from_model(
    model: nn.Module,
    split: SplitConfig,
    *,
    dtype: torch.dtype | None = None,
    devices: Sequence[str] | None = None,
    load_in: str | None = None,
) -> LoadedTrunk:
    """Fingerprint ``model``, cut out its frozen trunk, then move blocks to ``devices`` and cast to ``dtype``.

    The order matters: the fingerprint must see the client-side weights as loaded, before any cast. The caller
    drops its reference to ``model`` afterwards so that everything but the trunk is freed.
    """
    from guardedp2p.engine.fingerprint import model_fingerprint

    fingerprint = model_fingerprint(model, split)
    trunk = build_trunk(model, split)
    if devices is not None:
        _move_trunk(trunk, devices)
    if dtype is not None:
        cast_floating_parameters(trunk, dtype)
    for p in trunk.parameters():
        p.requires_grad_(False)
    trunk.train(False)
    placed = [str(_block_device_or_cpu(trunk.blocks[i])) for i in trunk.layer_range]
    return LoadedTrunk(
        trunk, fingerprint, trunk.config, placed, trunk.compute_dtype, load_in, _trunk_weight_bytes(trunk)
    )


def _block_device_or_cpu(block: nn.Module) -> torch.device:
    p = next(block.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _move_trunk(trunk: ProviderTrunk, devices: Sequence[str]) -> None:
    """Place trunk blocks by hand (models that did not go through ``from_pretrained(device_map=...)``)."""
    blocks = trunk.blocks
    for dev, i in zip(devices, trunk.layer_range):
        blocks[i].to(dev)
    for path in trunk.arch.shared_paths:
        get_path(trunk, path).to(devices[0])
