"""``guardedp2p provider emulator …``: build, verify and plug in for the Offline design (mounted by the provider CLI)."""

from __future__ import annotations

from pathlib import Path

import typer

from guardedp2p.cli.common import friendly_errors, print_json, setup_logging

emulator_app = typer.Typer(
    help="Offline design: build and sign the emulator a client tunes on; verify and plug in its adapters.",
    no_args_is_help=True,
)


def _block_list(text: str | None) -> tuple[int, ...] | None:
    """``--drop-blocks 13,14,15``: global block indices, or a usage error that says what was wrong."""
    if text is None:
        return None
    try:
        blocks = tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise typer.BadParameter(f"expected block indices separated by commas, e.g. 13,14,15; got {text!r}") from None
    if not blocks:
        raise typer.BadParameter("name at least one block to drop")
    return blocks


@emulator_app.command("build")
@friendly_errors
def build(
    model: str = typer.Option(
        "default", help="Hugging Face model folder, or 'default' for the embedded SmolLM2-135M-Instruct."
    ),
    out: Path = typer.Option(Path("emulator"), help="Folder to write the signed emulator into."),
    keys: Path = typer.Option(
        ..., help="Folder holding the provider's signing key NAME.sign.key (from `guardedp2p keys generate`)."
    ),
    name: str = typer.Option("provider", help="Key name inside --keys."),
    bottom_layers: int = typer.Option(2, help="Blocks at the start the client adapts (shipped exactly)."),
    top_layers: int = typer.Option(2, help="Blocks at the end the client adapts (shipped exactly)."),
    emulator_layers: int | None = typer.Option(
        None, help="Middle blocks kept by uniform layer drop (default: half of them)."
    ),
    keep_fraction: float | None = typer.Option(
        None, help="Instead of --emulator-layers: keep this fraction of the middle blocks (e.g. 0.7)."
    ),
    drop_blocks: str | None = typer.Option(
        None,
        help="Instead of --emulator-layers / --keep-fraction: the middle blocks to drop, by global index, e.g. "
        "15 or 13,14,15,16. On SmolLM2-135M transfer needs nearly every block: dropping block 15 alone kept 73 % "
        "of the fine-tuning gain at plug-in, the four central blocks 16 %, half the middle none "
        "(docs/results/offline.md).",
    ),
    fill: str = typer.Option(
        "drop",
        help="What runs in a dropped middle block's slot: drop (nothing: the emulator is shallower and faster) or "
        "share (the kept block before it, run again: CRaSh's layer sharing, the full model's depth at no extra "
        "parameter shipped, a full model's compute). See docs/results/offline.md for what each transfers.",
    ),
    distill_kd_only: bool = typer.Option(
        False,
        "--distill-kd-only",
        help="Distil on hidden states only (no LM loss), e.g. on text close to a client's task.",
    ),
    distill_data: str | None = typer.Option(
        None,
        help="Provider text for distillation: .txt (a passage per line), .jsonl or .csv with 'text'. Default: "
        "builtin:python-docs, the CPython language reference shipped with every Python (public, not a client's).",
    ),
    distill_steps: int = typer.Option(
        0, help="Distillation steps (0: layer drop only). Loss: LM + 30 x normalised hidden MSE."
    ),
    distill_lr: float = typer.Option(1e-4, help="Distillation learning rate (AdamW, warm-up then constant)."),
    distill_batch_size: int = typer.Option(4, help="Distillation sequences per step."),
    distill_max_length: int = typer.Option(128, help="Distillation sequence length in tokens."),
    distill_warmup: int = typer.Option(10, help="Distillation warm-up steps (then a constant learning rate)."),
    distill_cache: Path | None = typer.Option(
        None,
        help="Where distilled emulators and their resumable checkpoints are kept, keyed by model, layers, settings "
        "and text (default: $GUARDEDP2P_CACHE/emulators). A repeated build loads the result; an interrupted one resumes.",
    ),
    quantize: str = typer.Option(
        "none", help="Weight codes for the kept middle blocks: none, int8, int4 or nf4 (adapters always ship exact)."
    ),
    middle_dtype: str = typer.Option(
        "float32", help="Float storage of unquantized middle tensors: float32, float16 or bfloat16."
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    json_out: bool = typer.Option(False, "--json", help="Print the manifest summary as JSON."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True),
) -> None:
    """Build the emulator (layer drop, optional distillation and quantization) and sign it."""
    setup_logging(verbose)
    from rich.console import Console

    from guardedp2p.designs.offline.build import EmulatorBuildOptions, build_emulator_folder
    from guardedp2p.designs.offline.emulator import DistillConfig, EmulatorConfig

    opts = EmulatorBuildOptions(
        model=model,
        out=str(out),
        keys=str(keys),
        key_name=name,
        emulator=EmulatorConfig(
            bottom_layers=bottom_layers,
            top_layers=top_layers,
            emulator_layers=emulator_layers,
            keep_fraction=keep_fraction,
            quantize=quantize,
            middle_dtype=middle_dtype,
            fill=fill,
            drop_blocks=_block_list(drop_blocks),
        ),
        distill=DistillConfig(
            steps=distill_steps,
            lr=distill_lr,
            batch_size=distill_batch_size,
            max_length=distill_max_length,
            warmup_steps=distill_warmup,
            w_lm=0.0 if distill_kd_only else 1.0,
            checkpoint_every=25,
        ),
        distill_data=distill_data or None,
        distill_cache=str(distill_cache) if distill_cache else None,
        device=device,
        progress=not json_out,
    )
    m = build_emulator_folder(opts, console=Console(stderr=True))
    summary = _summary(out, m)
    if json_out:
        print_json(summary)
    else:
        typer.echo(
            f"emulator written to {out}: {summary['emulator_bytes']} bytes, {100 * (summary['param_fraction'] or 0):.1f}% of the parameters, "
            f"middle blocks kept {summary['middle_kept']}, signed by {summary['signer']}"
        )


@emulator_app.command("verify")
@friendly_errors
def verify(
    folder: Path = typer.Argument(..., help="Emulator folder or adapter bundle folder."),
    key: Path = typer.Option(..., help="The signer's public key NAME.sign.pub."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Verify a signed emulator or adapter bundle (signature and every SHA-256); loads nothing."""
    from guardedp2p.crypto.manifest import verify_artifact

    m = verify_artifact(folder, key)
    summary = _summary(folder, m)
    if json_out:
        print_json(summary)
    else:
        typer.echo(
            f"OK: {m.kind} {folder}, {len(m.files)} files, {m.total_bytes} bytes, signed by {m['signer']['fingerprint']}"
        )


@emulator_app.command("plug-in")
@friendly_errors
def plug_in_cmd(
    bundle: Path = typer.Option(..., help="The client's adapter bundle folder (as received by `provider serve`)."),
    model: str = typer.Option("default", help="The full model the emulator was built from."),
    client_key: list[Path] = typer.Option(
        [], help="Trusted client signing key NAME.sign.pub (repeatable). Without it only integrity is checked."
    ),
    out: Path = typer.Option(Path("plugged"), help="Output folder."),
    merge: bool = typer.Option(
        True, "--merge/--peft", help="Write a merged model (LoRA folded in) or just the PEFT adapter folder."
    ),
    eval_data: Path | None = typer.Option(
        None, help="Evaluate the plugged model on this data (multiple choice or text)."
    ),
    device: str = typer.Option("auto"),
    json_out: bool = typer.Option(False, "--json"),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True),
) -> None:
    """Verify a client's adapter bundle, insert it into the full model, optionally evaluate, and export."""
    setup_logging(verbose)
    import copy

    from guardedp2p.designs.offline.plugin import export_merged, export_peft, plug_in, verify_adapter_bundle
    from guardedp2p.engine.device import pick_device
    from guardedp2p.engine.loading import load_causal_lm

    keys = [str(k) for k in client_key] or None
    vb = verify_adapter_bundle(bundle, keys)
    result: dict = {"bundle": str(bundle), "signer": vb.signer, "signer_pinned": vb.signer_pinned}
    if eval_data is not None or merge:
        full, tok = load_causal_lm(model, device=pick_device(device))
        if eval_data is not None:
            result["eval"] = _evaluate_plugged(copy.deepcopy(full), tok, bundle, keys, eval_data)
        if merge:
            plug_in(copy.deepcopy(full), bundle, keys)  # refuses a bundle made for another base model
            export_merged(full, bundle, out, keys, tokenizer=tok)
        else:
            export_peft(bundle, out, keys)
    else:
        export_peft(bundle, out, keys)
    result["out"] = str(out)
    if json_out:
        print_json(result)
    else:
        typer.echo(
            f"plugged-in model written to {out} (signer {vb.signer}, pinned={vb.signer_pinned})"
            + (f"; eval {result['eval']}" if "eval" in result else "")
        )


def _evaluate_plugged(model, tok, bundle: Path, keys, eval_data: Path) -> dict:
    from guardedp2p.data.collate import collate
    from guardedp2p.data.loaders import load_data
    from guardedp2p.data.mc_eval import evaluate_loss, evaluate_mc
    from guardedp2p.data.tokenize import DataConfig, encode_records
    from guardedp2p.designs.offline.plugin import logits_fn_of, plug_in

    plugged = plug_in(model, bundle, keys)
    fn = logits_fn_of(plugged.model)
    ev = load_data(str(eval_data))
    if ev.kind == "mc":
        r = evaluate_mc(fn, tok, ev.records)
        return {"acc": r["acc"], "acc_norm": r["acc_norm"], "n": r["n"]}
    ex = encode_records(ev.records, tok, DataConfig(max_length=128), kind=ev.kind)
    batches = [collate(ex[i : i + 8], tok.pad_token_id) for i in range(0, len(ex), 8)]
    return {"loss": evaluate_loss(fn, batches)}


def _summary(folder: Path, m) -> dict:
    params = m.get("params") or {}
    layers = m.get("layers") or {}
    return {
        "folder": str(folder),
        "kind": m.kind,
        "files": {n: e.size for n, e in m.files.items()},
        "emulator_bytes": m.total_bytes,
        "manifest_sha256": m.sha256,
        "signer": m["signer"]["fingerprint"],
        "fingerprint": m.get("fingerprint") or m.get("base_fingerprint"),
        "middle_kept": layers.get("middle_kept"),
        "compression": m.get("compression"),
        "param_fraction": params.get("fraction_of_full"),
    }
