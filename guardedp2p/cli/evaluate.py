"""``guardedp2p evaluate``: the privacy-utility frontier (issue 15), with CIs, an adaptive attacker and a sanity gate.

Writes frontier.json, frontier.md and frontier.png (by default into docs/results) and caches every run, attacker
and attack under ``--out``, so an interrupted grid resumes. Mounted by the main app as
``app.command("evaluate")(evaluate)``.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import typer

from guardedp2p.cli.common import friendly_errors, print_json, setup_logging
from guardedp2p.evaluate.frontier import HEADLINE_ROWS, ROW_HELP, SWEEP_ROWS


def evaluate(
    ctx: typer.Context,
    rows: str | None = typer.Option(
        None,
        help=f"Comma-separated rows, run at every seed: {ROW_HELP}. Default: the headline grid "
        f"({', '.join(HEADLINE_ROWS)}). Local LoRA always runs (the utility reference).",
    ),
    sweep_rows: str | None = typer.Option(
        None,
        help="More rows, same syntax, measured on the first seed only (the shape of a defence family, not a headline "
        f"number). 'default': {', '.join(SWEEP_ROWS)}.",
    ),
    seeds: str = typer.Option(
        "0,1,2", help="Training seeds, comma-separated (>= 3 for headline numbers; 2 with --fast)."
    ),
    task: str | None = typer.Option(
        None, help="hidden_rules (default: 8 hidden rules, 1,024 MC items, 3,000 aux records) or demo."
    ),
    steps: int | None = typer.Option(
        None, help="Optimizer steps per run (default: the task's recipe, 120 on hidden_rules; 8 with --fast)."
    ),
    batch_size: int | None = typer.Option(None, help="Sequences per training step (default: the task's recipe, 4)."),
    lr: float | None = typer.Option(
        None, help="Peak learning rate (default: the task's recipe, 4e-3 on hidden_rules)."
    ),
    eval_items: int | None = typer.Option(
        None, help="Held-out multiple-choice items scored per run (default 256; 0: all; 24 with --fast)."
    ),
    nll_records: int | None = typer.Option(
        None, help="Held-out records for the code-token NLL per run (default 64; 0: all)."
    ),
    attack_steps: int | None = typer.Option(
        None, help="Training steps attacked per run, spread from first to last (default 16, >= 8)."
    ),
    attack_sequences: int | None = typer.Option(None, help="Distinct sequences attacked per run (default 64)."),
    attacks: str = typer.Option(
        "sip_adaptive,template",
        help="sip_adaptive (replays the defence on aux data), template (the format prior: one typical aux record "
        "sent for every sequence, what an attacker who sees nothing scores), sip (pre-trained bottom, "
        "codec-aware), bisr_f (slow). The best one counts.",
    ),
    out: Path = typer.Option(
        Path("runs/frontier"), help="Work folder: the cache of runs, attackers and attacks (resumable)."
    ),
    results: Path | None = typer.Option(
        None, help="Where frontier.json/.md/.png go (default: docs/results; <out>/results with --fast)."
    ),
    model: str = typer.Option("default", help="Model folder or 'default' (embedded SmolLM2-135M-Instruct)."),
    fast: bool = typer.Option(
        False, "--fast", help="Tiny random model, small task and budgets: the whole pipeline in a couple of minutes."
    ),
    strict: bool = typer.Option(
        False,
        "--strict",
        help="Exit with code 3 when the sanity gate fails (harness broken) or cannot run (no 'online' row).",
    ),
    keep_transcripts: bool = typer.Option(
        False, "--keep-transcripts", help="Keep each run's full provider transcript under --out."
    ),
    protocol_eval: bool = typer.Option(
        False, "--protocol-eval", help="Also run the protocol's own evaluation (a cross-check; slower)."
    ),
    runs_only: bool = typer.Option(
        False,
        "--runs-only",
        help="Only fill the cache with the training runs (no attack, no report): lets several processes or machines "
        "share one grid; a later run without it finds them cached.",
    ),
    carry: Path | None = typer.Option(
        None,
        "--carry",
        help="An earlier frontier.json (e.g. docs/results/frontier.json): rows with no run in the cache are carried "
        "from it unchanged and marked, when it was measured with the same settings; the rest is measured. For a "
        "machine whose cache is gone.",
    ),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    threads: int | None = typer.Option(None, help="Torch intra-op threads (1 is often fastest on a busy machine)."),
    json_out: bool = typer.Option(
        False, "--json", help="Print frontier.json as one JSON object on the last stdout line."
    ),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True),
) -> None:
    """Measure the privacy-utility frontier: utility with CIs over items and seeds, an adaptive attacker on the
    provider's transcript, bytes and client time per step, IP exposure; refuse privacy numbers when the attack
    cannot break the undefended run."""
    run_evaluate(
        rows=rows,
        sweep_rows=sweep_rows,
        seeds=seeds,
        task=task,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        eval_items=eval_items,
        nll_records=nll_records,
        attack_steps=attack_steps,
        attack_sequences=attack_sequences,
        attacks=attacks,
        out=out,
        results=results,
        model=model,
        fast=fast,
        strict=strict,
        keep_transcripts=keep_transcripts,
        protocol_eval=protocol_eval,
        runs_only=runs_only,
        carry=carry,
        device=device,
        threads=threads,
        json_out=json_out,
        verbose=verbose,
        command=_command_line(ctx),
    )


def _command_line(ctx: Any) -> str:
    """The command as typed: ``guardedp2p evaluate`` and the options given on the command line (not the defaults)."""
    parts = ["guardedp2p", "evaluate"]
    if ctx is None:
        return " ".join(parts)
    for param in ctx.command.params:
        name = getattr(param, "name", None)
        src = ctx.get_parameter_source(name) if name else None
        if src is None or getattr(src, "name", "") != "COMMANDLINE" or not getattr(param, "opts", None):
            continue
        value = ctx.params.get(name)
        flag = param.opts[0]
        if getattr(param, "is_flag", False):
            parts.append(flag)
        elif getattr(param, "count", False):
            parts.append("-" + "v" * int(value or 0))
        else:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


def _ints(s: str, what: str) -> tuple[int, ...]:
    from guardedp2p.errors import ConfigError

    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers, got {s!r}") from None


def fast_config(**over: Any) -> Any:
    """The ``--fast`` configuration (tiny random model, small task, small attacker); ``over`` replaces fields."""
    from guardedp2p.attacks.adaptive import AdaptiveConfig
    from guardedp2p.attacks.sip import SIPConfig
    from guardedp2p.evaluate.frontier import FAST_ROWS, FAST_SWEEP_ROWS, FrontierConfig

    base: dict[str, Any] = dict(
        model="tiny",
        task="fast",
        fast=True,
        rows=FAST_ROWS,
        sweep_rows=FAST_SWEEP_ROWS,
        seeds=(0, 1),
        steps=8,
        batch_size=2,
        eval_items=24,
        nll_records=8,
        attack_steps=8,
        attack_sequences=16,
        out="runs/frontier-fast",
        adaptive=AdaptiveConfig(
            sip=SIPConfig(batch_size=8, lr=2e-2, hidden=32, holdout=0.0), max_epochs=3, eval_every=10, patience=2
        ),
    )
    base.update(over)
    if "results" not in over:
        base["results"] = str(Path(base["out"]) / "results")
    return FrontierConfig(**base)


@friendly_errors
def run_evaluate(
    *,
    rows: str | None,
    seeds: str,
    sweep_rows: str | None = None,
    task: str | None,
    steps: int | None,
    batch_size: int | None,
    lr: float | None,
    eval_items: int | None,
    nll_records: int | None,
    attack_steps: int | None,
    attack_sequences: int | None,
    attacks: str,
    out: Path,
    results: Path | None,
    model: str,
    fast: bool,
    strict: bool,
    keep_transcripts: bool,
    protocol_eval: bool,
    device: str,
    threads: int | None,
    json_out: bool,
    verbose: int,
    command: str = "guardedp2p evaluate",
    runs_only: bool = False,
    carry: Path | None = None,
    loaded: Any = None,
) -> dict[str, Any]:
    """The command's body (``loaded``: an already loaded ``(model, tokenizer)``, for tests)."""
    setup_logging(verbose, quiet=verbose == 0)
    import torch
    from rich.console import Console

    from guardedp2p.evaluate.frontier import FrontierConfig, run_frontier

    if threads:
        torch.set_num_threads(threads)
    given: dict[str, Any] = {
        "attacks": tuple(a.strip() for a in attacks.split(",") if a.strip()),
        "strict": strict,
        "keep_transcripts": keep_transcripts,
        "protocol_eval": protocol_eval,
        "runs_only": runs_only,
        "carry": str(carry) if carry is not None else None,
        "device": device,
        "progress": True,
        "command": command,
    }
    if rows:
        given["rows"] = tuple(r.strip() for r in rows.split(",") if r.strip())
    if sweep_rows is not None:
        given["sweep_rows"] = (
            SWEEP_ROWS if sweep_rows == "default" else tuple(r.strip() for r in sweep_rows.split(",") if r.strip())
        )
    for name, v in (
        ("steps", steps),
        ("batch_size", batch_size),
        ("lr", lr),
        ("attack_steps", attack_steps),
        ("attack_sequences", attack_sequences),
        ("task", task),
    ):
        if v is not None:
            given[name] = v
    if eval_items is not None:
        given["eval_items"] = eval_items or None
    if nll_records is not None:
        given["nll_records"] = nll_records or None
    if seeds != "0,1,2" or not fast:
        given["seeds"] = _ints(seeds, "--seeds")
    if fast:
        if out != Path("runs/frontier"):
            given["out"] = str(out)
        if results is not None:
            given["results"] = str(results)
        cfg = fast_config(**given)
    else:
        cfg = FrontierConfig(model=model, out=str(out), results=str(results or Path("docs/results")), **given)
    console = Console(stderr=True)
    model_obj, tok = loaded if loaded is not None else (None, None)
    res = run_frontier(cfg, model=model_obj, tokenizer=tok, console=console)
    if res.get("runs_only"):
        if json_out:
            print_json(res)
        return res
    table_console = Console(stderr=json_out)
    gate = res["sanity"]
    style = "green" if gate["ok"] else ("red" if gate["ok"] is False else "yellow")
    from rich.markup import escape

    table_console.print(f"[{style}]sanity:[/] {escape(gate['message'])}", highlight=False)
    for r in res["rows"]:
        u, p = r["utility"], r["privacy"]
        priv = (
            "n/a"
            if p.get("not_applicable")
            else ("withheld" if res["harness_broken"] else f"{p['best_rougeL']:.3f} (secrets {p['secrets_recovered']})")
        )
        table_console.print(
            f"  {escape(r['label']):28s} acc {u['acc']:.3f} loss {u['loss_pts_vs_local']:+.1f} pts  privacy {priv}",
            highlight=False,
        )
    table_console.print(
        f"wrote {res['files']['json']}, {res['files']['md']} and {res['files']['png']} ({res['wall_s']:.0f} s)",
        highlight=False,
    )
    if json_out:
        print_json(res)
    return res


__all__ = ["evaluate", "fast_config", "run_evaluate"]


if __name__ == "__main__":  # python -m guardedp2p.cli.evaluate
    typer.run(evaluate)
