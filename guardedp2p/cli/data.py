"""``guardedp2p data``: make and inspect data sets.

``make-demo`` writes the generated hidden-rules task (:mod:`guardedp2p.data.hidden_rules`): training records,
held-out multiple-choice items, held-out records for the field NLL, auxiliary records and ``task.json``.
Mounted by the main app as ``app.add_typer(data_app, name="data")``; further commands (e.g. checking a user's
file) are added to ``data_app``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from guardedp2p.cli.common import friendly_errors, print_json
from guardedp2p.cli.data_check import check_cmd
from guardedp2p.cli.data_fields import fields_cmd

data_app = typer.Typer(
    help="Data sets: check your own data file before training, generate the hidden-rules demo task.",
    no_args_is_help=True,
)
data_app.command("check")(check_cmd)
data_app.command("fields")(fields_cmd)


@data_app.command("make-demo")
@friendly_errors
def make_demo(
    out: Path = typer.Option(
        ..., "--out", help="Folder to write train.jsonl, eval_mc.jsonl, eval_nll.jsonl, aux.jsonl and task.json into."
    ),
    seed: int = typer.Option(0, help="Generator seed: the same seed and sizes give byte-identical files."),
    train: int = typer.Option(2000, "--train", help="Training records (the client's private data)."),
    eval_mc: int = typer.Option(
        1024,
        "--eval-mc",
        help="Held-out multiple-choice items (a multiple of 32 balances rules, keys and label positions exactly).",
    ),
    eval_nll: int = typer.Option(
        512, "--eval-nll", help="Held-out records for the field NLL (other people than the MC items)."
    ),
    aux: int = typer.Option(3000, "--aux", help="Records of other people the attacker may hold (auxiliary data)."),
    json_out: bool = typer.Option(
        False, "--json", help="Print the written paths as one JSON object on the last stdout line."
    ),
) -> None:
    """Generate the hidden-rules task: eight made-up house rules a base model cannot know, so fine-tuning gains are measurable."""
    from guardedp2p.data.hidden_rules import TaskConfig, write_task

    cfg = TaskConfig(seed=seed, train=train, eval_mc=eval_mc, eval_nll=eval_nll, aux=aux)
    paths = write_task(out, cfg)
    if json_out:
        print_json({"digest": cfg.digest(), **paths.__dict__})
    else:
        typer.echo(
            f"wrote task {cfg.digest()} to {paths.folder}: train {train}, eval_mc {eval_mc}, eval_nll {eval_nll}, aux {aux}"
        )
