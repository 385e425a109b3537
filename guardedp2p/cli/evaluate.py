"""``guardedp2p evaluate``: the design x defence grid on the demo task, four axes per row, one table and one plot.

Mounted by the main app as ``app.command("evaluate")(evaluate)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from guardedp2p.cli.common import friendly_errors, print_json, setup_logging


def evaluate(
    rows: Optional[str] = typer.Option(
        None, help="Comma-separated subset of rows: online, dcor_weak, dcor_strong, int8, nf4, gradfree, gradfree_nf4, offline. "
        "Default: all but gradfree_nf4."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps per row (default 30; 6 with --fast)."),
    records: Optional[int] = typer.Option(None, help="Training sequences attacked per row, from the last training steps, rounded up to whole batches (default 8; 4 with --fast)."),
    out: Path = typer.Option(Path("runs/evaluate"), help="Output folder: results.json, privacy_utility.png, one sub-folder per row."),
    model: str = typer.Option("default", help="Model folder or 'default' (embedded SmolLM2-135M-Instruct)."),
    data: Optional[Path] = typer.Option(None, help="Training records (.jsonl with 'text'). Default: the shipped synthetic demo records."),
    eval_data: Optional[Path] = typer.Option(None, help="Multiple-choice evaluation items. Default: the shipped demo task."),
    aux: Optional[Path] = typer.Option(None, help="Public auxiliary text the attacker trains SIP on. Default: the shipped demo aux records."),
    dcor_weak: float = typer.Option(0.5, help="dCor penalty weight of the 'dcor_weak' row."),
    dcor_strong: float = typer.Option(4.0, help="dCor penalty weight of the 'dcor_strong' row."),
    batch_size: int = typer.Option(4, help="Sequences per training step."),
    lr: float = typer.Option(2e-3, help="Peak learning rate."),
    eval_items: Optional[int] = typer.Option(None, help="Evaluate on the first N multiple-choice items only (default: all; 16 with --fast)."),
    attacks: str = typer.Option("sip,bisr_b,bisr_f,bisr_bf", help="Attacks to run where they apply: sip, bisr_b, bisr_f, bisr_bf, tag, lamp, eia (tag, lamp, eia: slow baselines, add them explicitly)."),
    attack_budget: Optional[str] = typer.Option(None, help="fast (default), full (reference budgets, slow) or tiny (plumbing only; default with --fast)."),
    fast: bool = typer.Option(False, "--fast", help="Tiny budgets everywhere: a smoke run in minutes, numbers not meaningful."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    threads: Optional[int] = typer.Option(None, help="Torch intra-op threads (default: torch's choice; 1 is often fastest on a busy machine)."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as one JSON object on the last stdout line."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True),
) -> None:
    """Measure utility, privacy (best attack ROUGE-L), IP exposure and cost for each design and defence, from the same runs."""
    run_evaluate(rows=rows, steps=steps, records=records, out=out, model=model, data=data, eval_data=eval_data, aux=aux,
                 dcor_weak=dcor_weak, dcor_strong=dcor_strong, batch_size=batch_size, lr=lr, eval_items=eval_items, attacks=attacks,
                 attack_budget=attack_budget, fast=fast, device=device, threads=threads, json_out=json_out, verbose=verbose)


@friendly_errors
def run_evaluate(*, rows: Optional[str], steps: Optional[int], records: Optional[int], out: Path, model: str, data: Optional[Path],
                 eval_data: Optional[Path], aux: Optional[Path], dcor_weak: float, dcor_strong: float, batch_size: int, lr: float,
                 eval_items: Optional[int], attacks: str, attack_budget: Optional[str], fast: bool, device: str, threads: Optional[int],
                 json_out: bool, verbose: int, loaded: Any = None) -> dict[str, Any]:
    """The command's body (``loaded``: an already loaded ``(model, tokenizer)``, for tests)."""
    setup_logging(verbose, quiet=verbose == 0)
    import torch
    from rich.console import Console

    from guardedp2p.evaluate.grid import DEFAULT_ROWS, GridConfig, run_grid, summary_table

    if threads:
        torch.set_num_threads(threads)
    cfg = GridConfig(
        model=model,
        rows=tuple(r.strip() for r in rows.split(",") if r.strip()) if rows else DEFAULT_ROWS,
        steps=steps if steps is not None else (6 if fast else 30),
        records=records if records is not None else (4 if fast else 8),
        batch_size=batch_size, lr=lr, dcor_weak=dcor_weak, dcor_strong=dcor_strong,
        attacks=tuple(a.strip() for a in attacks.split(",") if a.strip()),
        attack_budget=attack_budget or ("tiny" if fast else "fast"),
        eval_items=eval_items if eval_items is not None else (16 if fast else None),
        aux_records=60 if fast else 300,
        data=str(data) if data else None, eval_data=str(eval_data) if eval_data else None, aux=str(aux) if aux else None,
        out=str(out), device=device,
    )
    console = Console(stderr=True)
    model_obj, tok = loaded if loaded is not None else (None, None)
    results = run_grid(cfg, model=model_obj, tokenizer=tok, console=console)
    table_console = Console(stderr=json_out)
    table_console.print(summary_table(results))
    sanity = results["sanity"]
    style = "green" if sanity["ok"] else ("red" if sanity["ok"] is False else "yellow")
    table_console.print(f"[{style}]sanity:[/] {sanity['message']}", highlight=False)
    table_console.print(f"wrote {results['files']['results']} and {results['files']['plot']} ({results['wall_s']:.0f} s)", highlight=False)
    if json_out:
        print_json(results)
    return results


__all__ = ["evaluate", "run_evaluate"]


if __name__ == "__main__":  # python -m guardedp2p.cli.evaluate (before the command is mounted in the main app)
    typer.run(evaluate)
