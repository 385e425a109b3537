"""Which fields of a user's records hold the text, the conversation or the instruction, and what task they make.

People arrive with data shaped for the tools they already use, so the same kinds of task come under several
field names:

* language modelling: ``{"text": ...}`` (the loss is on every token);
* chat: ``{"messages": [{"role": ..., "content": ...}, ...]}`` as in transformers chat templates and TRL, or
  ShareGPT's ``{"conversations": [{"from": "human"|"gpt", "value": ...}, ...]}`` (loss on assistant turns);
* instruction: Alpaca's ``instruction`` / optional ``input`` / ``output``, Dolly's ``instruction`` /
  ``context`` / ``response``, TRL's ``prompt`` / ``completion`` and guardedp2p's own ``prompt`` / ``response``
  (loss on the output);
* multiple choice, for evaluation: ``question`` / ``choices`` / ``label``.

:class:`FieldMapping` names the fields when a data set uses others, and ``kind`` settles the rare record that
fits two kinds (Alpaca's Hub copy carries a ready-made ``text`` column next to ``instruction``/``output``).
Every record is normalised to one canonical shape per kind (``text``; ``messages``; ``prompt`` + ``response``;
``question`` + ``choices`` + ``label``), which is all the tokenizer side ever sees. The project's user guide
("Your data") lists the same formats for users.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from guardedp2p.data.errors import DataFormatError

TaskKind = Literal["lm", "chat", "instruction", "mc"]
#: Values accepted for :attr:`FieldMapping.kind`; ``text`` is the user-facing name of ``lm``.
KIND_CHOICES: tuple[str, ...] = ("auto", "text", "chat", "instruction", "mc")

#: The canonical record of each kind: task kind -> fields a normalised record carries.
SCHEMAS: dict[str, tuple[str, ...]] = {
    "lm": ("text",),
    "chat": ("messages",),
    "instruction": ("prompt", "response"),
    "mc": ("question", "choices", "label"),
}
_CANONICAL = frozenset(f for fields in SCHEMAS.values() for f in fields)

# Default source names, tried in this order when the user maps nothing.
_TEXT = ("text",)
_MESSAGES = ("messages", "conversations")
_INSTRUCTION = ("instruction", "prompt")
_OUTPUT = ("output", "response", "completion")
_INPUT = ("input", "context")
# ShareGPT speaker names -> chat roles.
_ROLE_ALIASES = {"human": "user", "gpt": "assistant"}
# Field names that make a record look like some kind; dropped from a normalised record of another kind.
_KNOWN = _CANONICAL | set(_TEXT + _MESSAGES + _INSTRUCTION + _OUTPUT + _INPUT)

SCHEMA_HELP = (
    "accepted schemas: {'text'} for language modelling (loss on every token); "
    "{'messages': [{'role', 'content'}, ...]} for chat (loss on assistant turns; ShareGPT's 'conversations' "
    "with 'from'/'value' also works); {'instruction', 'output'} with optional 'input' for instruction tuning "
    "('prompt' + 'response' or 'prompt' + 'completion' too; loss on the output only); "
    "{'question', 'choices', 'label'} for multiple choice (choices: a list of >= 2 strings, in CSV a JSON array; "
    "label: the 0-based index of the right choice). Other field names: map them with --text-field, "
    "--messages-field, --instruction-field, --input-field, --output-field"
)


@dataclass(frozen=True)
class FieldMapping:
    """Where the training fields live in the user's records (``None``: the usual names, see the module doc).

    kind: ``auto`` detects the kind from the fields of each record; ``text``, ``chat``, ``instruction`` or
        ``mc`` forces it (then fields of other kinds are ignored instead of reported as ambiguous).
    text_field: the field holding plain text (language modelling).
    messages_field: the field holding the list of chat turns.
    instruction_field / input_field / output_field: the instruction, its optional extra input (appended to the
        instruction after a blank line) and the expected output.
    """

    kind: str = "auto"
    text_field: str | None = None
    messages_field: str | None = None
    instruction_field: str | None = None
    input_field: str | None = None
    output_field: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KIND_CHOICES:
            raise DataFormatError(f"data kind {self.kind!r} is not one of {', '.join(KIND_CHOICES)}")
        for name in ("text_field", "messages_field", "instruction_field", "input_field", "output_field"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise DataFormatError(f"FieldMapping.{name} must be a non-empty field name, got {value!r}")

    @property
    def task_kind(self) -> TaskKind | None:
        """The forced task kind, or None for ``auto``."""
        if self.kind == "auto":
            return None
        return "lm" if self.kind == "text" else self.kind  # type: ignore[return-value]

    def layouts(self) -> list[Layout]:
        """Every field layout a record may use, in order of preference, restricted to the forced kind."""
        out: list[Layout] = []
        out += [Layout("lm", {"text": f}) for f in _one(self.text_field, _TEXT)]
        out += [Layout("chat", {"messages": f}) for f in _one(self.messages_field, _MESSAGES)]
        inputs = _one(self.input_field, _INPUT)
        for ins in _one(self.instruction_field, _INSTRUCTION):
            for outp in _one(self.output_field, _OUTPUT):
                if ins != outp:
                    out.append(Layout("instruction", {"instruction": ins, "output": outp}, optional=inputs))
        out.append(Layout("mc", {"question": "question", "choices": "choices", "label": "label"}))
        forced = self.task_kind
        return [lay for lay in out if forced is None or lay.kind == forced]

    def is_default(self) -> bool:
        return self == FieldMapping()


def _one(given: str | None, defaults: tuple[str, ...]) -> tuple[str, ...]:
    return (given,) if given is not None else defaults


@dataclass(frozen=True)
class Layout:
    """One way a record can spell a kind: canonical role -> source field name (plus optional fields)."""

    kind: TaskKind
    fields: dict[str, str]
    optional: tuple[str, ...] = field(default=())

    def matches(self, record: dict[str, Any]) -> bool:
        return all(src in record for src in self.fields.values())

    def missing(self, record: dict[str, Any]) -> list[str]:
        return [src for src in self.fields.values() if src not in record]

    def describe(self, record: dict[str, Any] | None = None) -> dict[str, str]:
        """Canonical role -> source field, including the optional input field when ``record`` has it."""
        out = dict(self.fields)
        for name in self.optional:
            if record is None or name in record:
                out["input"] = name
                break
        return out


def matching_layouts(record: dict[str, Any], mapping: FieldMapping) -> list[Layout]:
    """The layouts ``record`` fits, at most one per kind (the first in order of preference)."""
    seen: set[str] = set()
    out = []
    for lay in mapping.layouts():
        if lay.kind not in seen and lay.matches(record):
            seen.add(lay.kind)
            out.append(lay)
    return out


def detect_kind(record: dict[str, Any], where: str = "record", mapping: FieldMapping | None = None) -> TaskKind:
    """Return the task kind of one record, or raise :class:`DataFormatError` naming its fields.

    A record that carries the fields of two kinds (e.g. ``text`` and ``prompt``/``response``) is refused unless
    ``mapping.kind`` says which one is meant: we cannot guess which the user meant to train on.
    """
    return pick_layout(record, where, mapping or FieldMapping()).kind


def pick_layout(record: Any, where: str, mapping: FieldMapping) -> Layout:
    """The single layout ``record`` follows; errors list the fields found and the accepted schemas."""
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(record).__name__}; {SCHEMA_HELP}")
    matches = matching_layouts(record, mapping)
    found = sorted(str(k) for k in record)
    if not matches:
        raise DataFormatError(f"{where}: unrecognised record with fields {found}; {SCHEMA_HELP}")
    if len(matches) > 1:
        kinds = ", ".join(lay.kind for lay in matches)
        raise DataFormatError(
            f"{where}: record has fields {found}, which match several schemas ({kinds}); keep the fields of only "
            f"one, or say which kind to train on with --data-kind text|chat|instruction; {SCHEMA_HELP}"
        )
    return matches[0]


def _parse_json_cell(value: Any, src: str, where: str, example: str) -> Any:
    """CSV cells hold lists as JSON text; decode them (other sources give lists already)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise DataFormatError(f"{where}: field '{src}' must be a JSON array, e.g. {example}") from None


def _messages(value: Any, src: str, where: str) -> list[dict[str, str]]:
    value = _parse_json_cell(value, src, where, '[{"role": "user", "content": "hi"}]')
    if not isinstance(value, (list, tuple)) or not value:
        raise DataFormatError(f"{where}: field '{src}' must be a non-empty list of turns {{'role', 'content'}}")
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise DataFormatError(
                f"{where}: field '{src}', turn {i}: expected an object with 'role' and 'content', "
                f"got {type(turn).__name__}"
            )
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if not isinstance(role, str) or not role.strip():
            raise DataFormatError(
                f"{where}: field '{src}', turn {i}: missing 'role' (or ShareGPT 'from'); found keys {sorted(turn)}"
            )
        if not isinstance(content, str):
            raise DataFormatError(
                f"{where}: field '{src}', turn {i} ({role}): 'content' (or ShareGPT 'value') must be a string, "
                f"got {type(content).__name__}"
            )
        out.append({"role": _ROLE_ALIASES.get(role, role), "content": content})
    if not any(t["role"] == "assistant" and t["content"].strip() for t in out):
        roles = [t["role"] for t in out]
        raise DataFormatError(
            f"{where}: field '{src}' has no non-empty assistant turn (roles {roles}), so there is nothing to "
            "train on; chat roles are 'system', 'user' and 'assistant' (ShareGPT: 'human', 'gpt')"
        )
    return out


def _mc(out: dict[str, Any], where: str) -> None:
    if not isinstance(out["question"], str):
        raise DataFormatError(f"{where}: field 'question' must be a string")
    choices = _parse_json_cell(out["choices"], "choices", where, '["yes", "no"]')
    if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise DataFormatError(f"{where}: field 'choices' must be a list of at least 2 non-empty strings")
    label = out["label"]
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():  # CSV cell
        label = int(label.strip())
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise DataFormatError(
            f"{where}: field 'label' must be an integer index in [0, {len(choices) - 1}], got {label!r}"
        )
    out["choices"] = list(choices)
    out["label"] = label


def normalise(record: dict[str, Any], layout: Layout, where: str) -> dict[str, Any]:
    """Check field types and return the canonical record of ``layout.kind`` (other fields kept as they are).

    Source fields are replaced by the canonical ones; fields that would make the record look like another kind
    (``text``, ``messages``, ``instruction``, ``label``, ...) are dropped, so a normalised record is never
    ambiguous, even when ``FieldMapping.kind`` picked one kind out of several.
    """
    used = set(layout.fields.values()) | set(layout.optional)
    out = {k: v for k, v in record.items() if k not in used and k not in _KNOWN}
    f = layout.fields
    if layout.kind == "lm":
        text = record[f["text"]]
        if not isinstance(text, str) or not text.strip():
            raise DataFormatError(f"{where}: field '{f['text']}' must be a non-empty string")
        out["text"] = text
    elif layout.kind == "chat":
        out["messages"] = _messages(record[f["messages"]], f["messages"], where)
    elif layout.kind == "instruction":
        prompt, response = record[f["instruction"]], record[f["output"]]
        for src, value in ((f["instruction"], prompt), (f["output"], response)):
            if not isinstance(value, str):
                raise DataFormatError(f"{where}: field '{src}' must be a string, got {type(value).__name__}")
        if not response.strip():
            raise DataFormatError(f"{where}: field '{f['output']}' is empty, so there is nothing to train on")
        extra = layout.describe(record).get("input")
        if extra is not None:
            value = record[extra]
            if value is not None and not isinstance(value, str):
                raise DataFormatError(f"{where}: field '{extra}' must be a string, got {type(value).__name__}")
            if value and value.strip():
                prompt = f"{prompt}\n\n{value}"
        out["prompt"], out["response"] = prompt, response
    else:
        out.update({k: record[k] for k in SCHEMAS["mc"]})
        _mc(out, where)
    return out
