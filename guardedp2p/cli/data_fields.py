"""``guardedp2p data fields FILE``: the categorical fields of a data file, as a ``--pseudonymize`` schema to review.

For each candidate field (written ``name: value`` in most records, few distinct values) it prints the values'
counts and what keyed pseudonymisation would leave to an attacker who knows the field's distribution: the share of
values frequency analysis decodes (:func:`guardedp2p.privacy.pseudonym.frequency_exposure`) beside the share of
the most common value, which anyone guesses without reading anything. ``--out`` writes the schema for
``client tune --pseudonymize``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from guardedp2p.cli.common import friendly_errors, print_json
from guardedp2p.cli.data_options import allow_network_option

#: Exposure above the top value's share by more than this: frequency analysis reads the field (said in the table).
EXPOSED_MARGIN = 0.15


def _texts(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _texts(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _texts(v)]
    return []


@friendly_errors
def fields_cmd(
    file: str = typer.Argument(..., help="A .jsonl/.json/.csv/.parquet file or a `datasets.save_to_disk` folder."),
    max_values: int = typer.Option(12, min=2, help="Most distinct values for a field to count as categorical."),
    min_share: float = typer.Option(0.5, min=0.0, max=1.0, help="Least share of records a field must appear in."),
    out: Path | None = typer.Option(
        None, help="Write the suggested schema here (JSON) for `client tune --pseudonymize`."
    ),
    allow_network: bool = allow_network_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
) -> None:
    """Suggest a --pseudonymize schema: categorical fields, their values, and what frequency analysis would read."""
    from guardedp2p.data.loaders import load_data
    from guardedp2p.privacy.pseudonym import PseudonymSchema, frequency_exposure, save_schema, suggest_schema

    loaded = load_data(file, None, allow_network=allow_network)
    texts = [" ".join(_texts(r)) for r in loaded.records]
    found = suggest_schema(texts, max_values=max_values, min_share=min_share)
    rows: list[dict[str, Any]] = []
    for name, counts in found.items():
        total = sum(counts.values())
        top = max(counts.values()) / total
        exposure = frequency_exposure(counts)
        rows.append(
            {
                "field": name,
                "values": dict(counts.most_common()),
                "top_share": round(top, 4),
                "frequency_exposure": round(exposure, 4),
                "exposed": exposure > top + EXPOSED_MARGIN,
            }
        )
    if out is not None and rows:
        save_schema(PseudonymSchema.from_mapping({r["field"]: list(r["values"]) for r in rows}), out)
    report = {"file": file, "records": len(texts), "fields": rows, "schema": str(out) if out and rows else None}
    if as_json:
        print_json(report)
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not rows:
        console.print(f"no categorical 'name: value' field in {len(texts)} record(s) of {file}")
        return
    table = Table(title=f"categorical fields of {file} ({len(texts)} records)")
    for col in ("field", "values", "most common", "frequency analysis decodes", "verdict"):
        table.add_column(col)
    for r in rows:
        verdict = "[red]exposed[/]" if r["exposed"] else "hidden (~ a guess)"
        table.add_row(
            r["field"], str(len(r["values"])), f"{r['top_share']:.0%}", f"{r['frequency_exposure']:.0%}", verdict
        )
    console.print(table)
    console.print(
        "[dim]'frequency analysis decodes': the share of values an attacker who knows each field's distribution "
        "maps back by ranking frequencies (simulated on these counts); 'most common': what a blind guess gets. 'exposed': frequencies give the key away; use another "
        "defence for that field.[/]"
    )
    if out is not None:
        console.print(f"schema written to {out}: review it, then `client tune --pseudonymize {out}`")
