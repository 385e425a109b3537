"""Read a user's training or evaluation file into plain records and decide what task it is.

Three on-disk formats are accepted (``.jsonl``, ``.csv``, a ``datasets.save_to_disk`` folder) and three
record schemas (see :data:`SCHEMAS`). Every record of one file must follow the same schema: a file that mixes
them is almost always a mistake (a stray line from another data set), and silently training on the
intersection would hide it. Errors name the file, the line (or row) and the fields found, so the user can fix
the file without reading our code.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Any, Literal

from guardedp2p.errors import ConfigError

TaskKind = Literal["lm", "instruction", "mc"]

#: The accepted record schemas: task kind -> required fields. Other fields are kept and ignored.
SCHEMAS: dict[str, tuple[str, ...]] = {
    "lm": ("text",),
    "instruction": ("prompt", "response"),
    "mc": ("question", "choices", "label"),
}

_SCHEMA_HELP = (
    "accepted schemas: {'text'} for language modelling; {'prompt', 'response'} for instruction tuning "
    "(loss on the response only); {'question', 'choices', 'label'} for multiple choice "
    "(choices: a list of >= 2 strings, in CSV a JSON array; label: the 0-based index of the right choice)"
)


class DataFormatError(ConfigError):
    """A data file is unreadable or its records do not follow one accepted schema."""


class MissingDependencyError(ConfigError):
    """An optional package needed for this input is not installed."""


@dataclass(frozen=True)
class LoadedData:
    """Records of one file together with the task kind they were detected as."""

    kind: TaskKind
    records: list[dict[str, Any]]
    path: str


def _where(path: str, loc: str) -> str:
    return f"{path}, {loc}"


def detect_kind(record: dict[str, Any], where: str = "record") -> TaskKind:
    """Return the task kind of one record, or raise :class:`DataFormatError` naming its fields.

    A record that carries the fields of two schemas (e.g. ``text`` and ``prompt``/``response``) is refused:
    we cannot guess which one the user meant to train on.
    """
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(record).__name__}; {_SCHEMA_HELP}")
    matches = [kind for kind, fields in SCHEMAS.items() if all(f in record for f in fields)]
    found = sorted(str(k) for k in record)
    if not matches:
        raise DataFormatError(f"{where}: unrecognised record with fields {found}; {_SCHEMA_HELP}")
    if len(matches) > 1:
        raise DataFormatError(
            f"{where}: record has fields {found}, which match several schemas ({', '.join(matches)}); "
            f"keep the fields of only one; {_SCHEMA_HELP}"
        )
    return matches[0]  # type: ignore[return-value]


def _validate(record: dict[str, Any], kind: TaskKind, where: str) -> dict[str, Any]:
    """Check field types (and coerce CSV strings for ``choices``/``label``); return the record."""
    out = dict(record)
    if kind == "lm":
        if not isinstance(out["text"], str) or not out["text"].strip():
            raise DataFormatError(f"{where}: field 'text' must be a non-empty string")
    elif kind == "instruction":
        for field in ("prompt", "response"):
            if not isinstance(out[field], str):
                raise DataFormatError(f"{where}: field '{field}' must be a string")
        if not out["response"].strip():
            raise DataFormatError(f"{where}: field 'response' is empty, so there is nothing to train on")
    else:
        if not isinstance(out["question"], str):
            raise DataFormatError(f"{where}: field 'question' must be a string")
        choices = out["choices"]
        if isinstance(choices, str):  # CSV cell
            try:
                choices = json.loads(choices)
            except json.JSONDecodeError:
                raise DataFormatError(
                    f'{where}: field \'choices\' must be a JSON array of strings, e.g. ["yes", "no"]'
                ) from None
        if (
            not isinstance(choices, (list, tuple))
            or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)
        ):
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
    return out


def _check_all(path: str, located: list[tuple[str, dict[str, Any]]]) -> LoadedData:
    """Detect the kind of every record, refuse a mix, validate types."""
    if not located:
        raise DataFormatError(f"{path}: no records found; {_SCHEMA_HELP}")
    first_loc, first = located[0]
    kind = detect_kind(first, _where(path, first_loc))
    records = []
    for loc, rec in located:
        where = _where(path, loc)
        k = detect_kind(rec, where)
        if k != kind:
            raise DataFormatError(
                f"{where}: record with fields {sorted(rec)} is of kind '{k}', but the file started with kind "
                f"'{kind}' ({first_loc}); one file must hold one kind of record; {_SCHEMA_HELP}"
            )
        records.append(_validate(rec, kind, where))
    return LoadedData(kind=kind, records=records, path=path)


def _read_jsonl(path: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{path}, line {lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DataFormatError(
                    f"{path}, line {lineno}: expected a JSON object, got {type(obj).__name__}; {_SCHEMA_HELP}"
                )
            out.append((f"line {lineno}", obj))
    return out


def _read_csv(path: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames:
            raise DataFormatError(f"{path}: empty CSV, expected a header row; {_SCHEMA_HELP}")
        start = reader.line_num + 1
        for row in reader:
            if None in row:
                raise DataFormatError(f"{path}, line {start}: more cells than header columns")
            # Empty cells mean "field absent" so that rows of other schemas are detected as such.
            rec = {k: v for k, v in row.items() if v is not None and v != ""}
            out.append((f"line {start}", rec))
            start = reader.line_num + 1
    return out


def _read_hf_folder(path: str) -> list[tuple[str, dict[str, Any]]]:
    try:
        import datasets  # noqa: PLC0415  (optional dependency, imported only for this format)
    except ImportError:
        raise MissingDependencyError(
            f"{path} is a folder, read as a Hugging Face `datasets.save_to_disk` folder, but the `datasets` "
            "package is not installed; run `pip install datasets` or convert the data to .jsonl"
        ) from None
    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as exc:
        raise DataFormatError(f"{path}: not a `datasets.save_to_disk` folder ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds.keys())
        if len(splits) != 1:
            raise DataFormatError(
                f"{path}: a DatasetDict with splits {splits}; point at one split's sub-folder, "
                f"e.g. {os.path.join(path, splits[0] if splits else 'train')}"
            )
        ds = ds[splits[0]]
    return [(f"row {i}", dict(row)) for i, row in enumerate(ds)]


def load_data(path: str) -> LoadedData:
    """Load ``path`` and return its records with the detected :data:`TaskKind`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        located = _read_hf_folder(path)
    elif not os.path.exists(path):
        raise DataFormatError(f"{path}: no such file or folder")
    else:
        ext = os.path.splitext(path)[1].lower()
        if ext in (".jsonl", ".ndjson"):
            located = _read_jsonl(path)
        elif ext == ".csv":
            located = _read_csv(path)
        else:
            raise DataFormatError(
                f"{path}: unsupported file type '{ext or '(none)'}'; use .jsonl, .csv or a "
                "`datasets.save_to_disk` folder"
            )
    return _check_all(path, located)


def load_records(path: str) -> list[dict[str, Any]]:
    """Load ``path`` (.jsonl, .csv or a ``datasets.save_to_disk`` folder) as a list of validated records.

    Use :func:`load_data` to also get the detected task kind.
    """
    return load_data(path).records
