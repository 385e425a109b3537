"""``guardedp2p data check FILE``: read a data file as training would, without a provider or a model.

It prints what the file was taken for (format, kind, fields), how long its records are (tokens with ``--model``,
characters without) and what ``--max-length`` would cut or drop, or every bad record with its line. The same
check can run before ``client tune`` connects, so a broken file costs seconds, not a session.
"""

from __future__ import annotations

import typer

from guardedp2p.cli.common import friendly_errors, print_json
from guardedp2p.cli.data_options import (
    allow_network_option,
    chat_template_option,
    data_config,
    data_kind_option,
    field_mapping,
    input_field_option,
    instruction_field_option,
    loss_on_option,
    messages_field_option,
    output_field_option,
    text_field_option,
)


@friendly_errors
def check_cmd(
    file: str = typer.Argument(
        ..., help="A .jsonl/.json/.csv/.parquet file, a `datasets.save_to_disk` folder, or (--allow-network) a Hub id."
    ),
    model: str | None = typer.Option(
        None, help="Count tokens with this model's tokenizer ('default' or a local folder); only the tokenizer loads."
    ),
    max_length: int = typer.Option(128, help="Longest sequence in tokens, as in `client tune` (needs --model)."),
    data_kind: str = data_kind_option(),
    text_field: str | None = text_field_option(),
    messages_field: str | None = messages_field_option(),
    instruction_field: str | None = instruction_field_option(),
    input_field: str | None = input_field_option(),
    output_field: str | None = output_field_option(),
    loss_on: str = loss_on_option(),
    chat_template: bool = chat_template_option(),
    allow_network: bool = allow_network_option(),
    as_json: bool = typer.Option(
        False,
        "--json",
        help="Print one JSON object (the report; on failure the error, as every --json does) instead of text.",
    ),
) -> None:
    """Check a data file before training: format, kind, fields, lengths, what --max-length cuts; bad records by line."""
    from guardedp2p.data.check import check_data, load_tokenizer

    mapping = field_mapping(data_kind, text_field, messages_field, instruction_field, input_field, output_field)
    config = data_config(max_length, loss_on, chat_template)
    tokenizer = load_tokenizer(model) if model else None
    report = check_data(
        file, tokenizer=tokenizer, mapping=mapping, config=config, allow_network=allow_network, tokenizer_name=model
    )
    if as_json:
        print_json({"ok": True, **report.to_dict()})
    else:
        typer.echo(report.format_text())
