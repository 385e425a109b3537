"""Read a user's training or evaluation data into plain records and decide what task it is.

Inputs: ``.jsonl``/``.json``, ``.csv``, ``.parquet``, a ``datasets.save_to_disk`` folder, or (only with network
access allowed) a Hub data set id (:mod:`guardedp2p.data.sources`). Records: plain text, chat, instruction or
multiple choice under their usual field names or names given in a :class:`FieldMapping`
(:mod:`guardedp2p.data.fields`); each record is normalised to the canonical fields of its kind (see
:data:`SCHEMAS`). Every record of one input must be of the same kind: a file that mixes them is almost always a
mistake (a stray line from another data set), and silently training on the intersection would hide it. Errors
name the file, the line (or row), the fields found and the missing one, so the user can fix the file without
reading our code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from guardedp2p.data.errors import DataFormatError, MissingDependencyError
from guardedp2p.data.fields import (
    SCHEMA_HELP,
    SCHEMAS,
    FieldMapping,
    Layout,
    TaskKind,
    detect_kind,
    matching_layouts,
    normalise,
    pick_layout,
)
from guardedp2p.data.sources import Located, read_source

__all__ = [
    "SCHEMAS",
    "DataFormatError",
    "FieldMapping",
    "LoadedData",
    "MissingDependencyError",
    "TaskKind",
    "detect_kind",
    "load_data",
    "load_records",
]


@dataclass(frozen=True)
class LoadedData:
    """Records of one input (normalised to their kind's canonical fields) and what was detected.

    fields: canonical role -> the user's field name, e.g. ``{"instruction": "prompt", "output": "response"}``.
    source_format: ``jsonl``, ``json``, ``csv``, ``parquet``, ``datasets`` or ``hub``.
    """

    kind: TaskKind
    records: list[dict[str, Any]]
    path: str
    fields: dict[str, str] = field(default_factory=dict)
    source_format: str = ""


def _where(path: str, loc: str) -> str:
    return f"{path}, {loc}"


def _record_error(path: str, loc: str, rec: dict[str, Any], first: tuple[str, Layout], mapping: FieldMapping) -> str:
    """The message for a record that does not follow the kind of the file's first record."""
    where = _where(path, loc)
    first_loc, layout = first
    others = [lay for lay in matching_layouts(rec, mapping) if lay.kind != layout.kind]
    if others:
        return (
            f"{where}: record with fields {sorted(rec)} is of kind '{others[0].kind}', but the file started with "
            f"kind '{layout.kind}' ({first_loc}); one file must hold one kind of record; {SCHEMA_HELP}"
        )
    missing = layout.missing(rec)
    return (
        f"{where}: unrecognised record with fields {sorted(str(k) for k in rec)}; the file's records are of kind "
        f"'{layout.kind}' ({first_loc}) and this one lacks field(s) {missing}; {SCHEMA_HELP}"
    )


def check_records(
    path: str, located: Located, mapping: FieldMapping | None = None, *, max_errors: int = 1
) -> tuple[TaskKind, list[dict[str, Any]], dict[str, str]]:
    """Detect the kind, refuse a mix, validate and normalise every record.

    With ``max_errors > 1`` up to that many bad records are reported together in one :class:`DataFormatError`
    (what ``guardedp2p data check`` wants); training stops at the first.
    """
    mapping = mapping or FieldMapping()
    if not located:
        raise DataFormatError(f"{path}: no records found; {SCHEMA_HELP}")
    first_loc, first_rec = located[0]
    layout = pick_layout(first_rec, _where(path, first_loc), mapping)
    records: list[dict[str, Any]] = []
    errors: list[str] = []
    for loc, rec in located:
        where = _where(path, loc)
        try:
            try:
                lay = pick_layout(rec, where, mapping)
            except DataFormatError:
                same = [x for x in matching_layouts(rec, mapping) if x.kind == layout.kind]
                if not same:
                    raise DataFormatError(_record_error(path, loc, rec, (first_loc, layout), mapping)) from None
                raise
            if lay.kind != layout.kind:
                raise DataFormatError(_record_error(path, loc, rec, (first_loc, layout), mapping))
            records.append(normalise(rec, lay, where))
        except DataFormatError as exc:
            if max_errors <= 1:
                raise
            errors.append(str(exc))
            if len(errors) >= max_errors:
                break
    if errors:
        # the schema help is said once at the end, not after every record
        short = [e.replace(f"; {SCHEMA_HELP}", "") for e in errors]
        shown = "\n".join(f"  {e}" for e in short)
        more = " (stopped there)" if len(errors) >= max_errors else ""
        tail = f"\n{SCHEMA_HELP}" if short != errors else ""
        raise DataFormatError(f"{path}: {len(errors)} bad record(s){more}:\n{shown}{tail}")
    return layout.kind, records, layout.describe(first_rec)


def load_data(path: str, mapping: FieldMapping | None = None, *, allow_network: bool = False) -> LoadedData:
    """Load ``path`` and return its normalised records with the detected :data:`TaskKind`.

    ``allow_network`` lets a ``path`` that is not a local file or folder be read as a Hub data set id; without
    it such a path is an error (private training data should not silently come from somewhere else).
    """
    path = os.fspath(path)
    located, fmt = read_source(path, allow_network=allow_network)
    kind, records, fields = check_records(path, located, mapping)
    return LoadedData(kind=kind, records=records, path=path, fields=fields, source_format=fmt)


def load_records(
    path: str, mapping: FieldMapping | None = None, *, allow_network: bool = False
) -> list[dict[str, Any]]:
    """Load ``path`` (any input :func:`load_data` accepts) as a list of validated, normalised records.

    Use :func:`load_data` to also get the detected task kind.
    """
    return load_data(path, mapping, allow_network=allow_network).records
