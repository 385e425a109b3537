"""Data options shared by ``guardedp2p data check`` and ``guardedp2p client tune``: one spelling, one help text.

Each ``*_option()`` returns a fresh ``typer.Option`` to use as a parameter default, as everywhere else in the CLI
(``text_field: str | None = text_field_option()``); :func:`field_mapping` and :func:`data_config` turn the parsed
values into the :mod:`guardedp2p.data` configs, so both commands read a file exactly the same way.
"""

from __future__ import annotations

from typing import Any

import typer

from guardedp2p.data.fields import FieldMapping
from guardedp2p.data.tokenize import DataConfig

DATA_KIND_HELP = (
    "What the records are: auto (from their fields), text, chat, instruction or mc; set it when a record has the "
    "fields of two kinds (e.g. Alpaca's 'text' next to 'instruction'/'output')."
)
TEXT_FIELD_HELP = "Field holding plain text (default: 'text')."
MESSAGES_FIELD_HELP = "Field holding a chat's list of {role, content} turns (default: 'messages' or 'conversations')."
INSTRUCTION_FIELD_HELP = "Field holding the instruction or prompt (default: 'instruction' or 'prompt')."
INPUT_FIELD_HELP = "Optional field appended to the instruction after a blank line (default: 'input' or 'context')."
OUTPUT_FIELD_HELP = "Field holding the expected answer (default: 'output', 'response' or 'completion')."
LOSS_ON_HELP = (
    "assistant: loss on the assistant turns of chat records and the output of instruction records; all: on every "
    "token, prompts and user turns included."
)
CHAT_TEMPLATE_HELP = (
    "Lay chat and instruction records out with the tokenizer's chat template when it has one (else a simple "
    "'role: content' layout)."
)
ALLOW_NETWORK_HELP = (
    "Let a data argument that is not a local file or folder be read as a Hugging Face Hub data set id NAME[:SPLIT] "
    "(downloads it with `datasets`)."
)


def data_kind_option() -> Any:
    return typer.Option("auto", "--data-kind", help=DATA_KIND_HELP)


def text_field_option() -> Any:
    return typer.Option(None, "--text-field", help=TEXT_FIELD_HELP)


def messages_field_option() -> Any:
    return typer.Option(None, "--messages-field", help=MESSAGES_FIELD_HELP)


def instruction_field_option() -> Any:
    return typer.Option(None, "--instruction-field", help=INSTRUCTION_FIELD_HELP)


def input_field_option() -> Any:
    return typer.Option(None, "--input-field", help=INPUT_FIELD_HELP)


def output_field_option() -> Any:
    return typer.Option(None, "--output-field", help=OUTPUT_FIELD_HELP)


def loss_on_option() -> Any:
    return typer.Option("assistant", "--loss-on", help=LOSS_ON_HELP)


def chat_template_option() -> Any:
    return typer.Option(True, "--chat-template/--no-chat-template", help=CHAT_TEMPLATE_HELP)


def allow_network_option() -> Any:
    return typer.Option(False, "--allow-network", help=ALLOW_NETWORK_HELP)


def field_mapping(
    data_kind: str = "auto",
    text_field: str | None = None,
    messages_field: str | None = None,
    instruction_field: str | None = None,
    input_field: str | None = None,
    output_field: str | None = None,
) -> FieldMapping:
    """The :class:`FieldMapping` of the parsed flags (raises a ConfigError naming the accepted kinds)."""
    return FieldMapping(
        kind=data_kind,
        text_field=text_field,
        messages_field=messages_field,
        instruction_field=instruction_field,
        input_field=input_field,
        output_field=output_field,
    )


def data_config(max_length: int, loss_on: str = "assistant", chat_template: bool = True) -> DataConfig:
    """The tokenization :class:`DataConfig` of the parsed flags."""
    return DataConfig(max_length=max_length, loss_on=loss_on, use_chat_template=chat_template)  # type: ignore[arg-type]
