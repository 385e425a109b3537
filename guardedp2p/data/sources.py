"""Read raw rows from the places users keep data: JSONL/JSON, CSV, Parquet, ``datasets`` folders, Hub ids.

Each reader returns ``(location, row)`` pairs, the location being what an error message should point at
(``line 12`` in a text file, ``row 12`` in a columnar one), so a bad record can be found and fixed without reading
our code. Columnar sources (Parquet, ``datasets``) store a missing value as null; those nulls are dropped so
that a row reads like the JSON object it would have been, just as empty CSV cells are.

Hub data set ids are read with ``datasets.load_dataset`` only when the caller allows network access: the
client's data is private, and guardedp2p otherwise never reaches out (see the user guide, "Your data").
"""

from __future__ import annotations

import csv
import json
import os
import re
from typing import Any

from guardedp2p.data.errors import DataFormatError, MissingDependencyError

Located = list[tuple[str, dict[str, Any]]]

#: File suffix -> source format name.
FILE_FORMATS: dict[str, str] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
ACCEPTED = (
    "accepted inputs: .jsonl/.ndjson (one JSON object per line), .json (a JSON array of objects, or JSON lines), "
    ".csv (a header row), .parquet, a folder written by `datasets.save_to_disk`, or a Hub data set id "
    "NAME[:SPLIT] with network access allowed"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.\-\[\]%:]+)?$")


def _import_datasets(why: str) -> Any:
    try:
        import datasets  # noqa: PLC0415  (heavy import, only for the sources that need it)
    except ImportError:
        raise MissingDependencyError(
            f"{why} needs the `datasets` package, which is not installed; run `pip install datasets` "
            "(or `make setup`), or convert the data to .jsonl"
        ) from None
    return datasets


def read_jsonl(path: str) -> Located:
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(
                    f"{path}, line {lineno}: invalid JSON ({exc.msg} at column {exc.colno}); each line must be "
                    "one JSON object"
                ) from None
            if not isinstance(obj, dict):
                raise DataFormatError(f"{path}, line {lineno}: expected a JSON object, got {type(obj).__name__}")
            out.append((f"line {lineno}", obj))
    return out


def read_json(path: str) -> Located:
    """A ``.json`` file: a JSON array of objects, or JSON lines (what ``Dataset.to_json`` writes)."""
    with open(path, encoding="utf-8") as fh:
        head = fh.read(4096).lstrip()
    if not head.startswith("["):
        return read_jsonl(path)
    with open(path, encoding="utf-8") as fh:
        try:
            items = json.load(fh)
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{path}, line {exc.lineno}: invalid JSON ({exc.msg})") from None
    out = []
    for i, obj in enumerate(items):
        if not isinstance(obj, dict):
            raise DataFormatError(f"{path}, item {i}: expected a JSON object, got {type(obj).__name__}")
        out.append((f"item {i}", obj))
    return out


def read_csv(path: str) -> Located:
    out = []
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames:
            raise DataFormatError(f"{path}: empty CSV, expected a header row naming the fields")
        start = reader.line_num + 1
        for row in reader:
            if None in row:
                raise DataFormatError(f"{path}, line {start}: more cells than header columns")
            # Empty cells mean "field absent" so that rows of other schemas are detected as such.
            rec = {k: v for k, v in row.items() if v is not None and v != ""}
            out.append((f"line {start}", rec))
            start = reader.line_num + 1
    return out


def _rows(rows: Any) -> Located:
    return [(f"row {i}", {k: v for k, v in dict(row).items() if v is not None}) for i, row in enumerate(rows)]


def read_parquet(path: str) -> Located:
    try:
        import pyarrow.parquet as pq  # noqa: PLC0415
    except ImportError:
        raise MissingDependencyError(
            f"{path} is a Parquet file, which needs the `pyarrow` package; run `pip install pyarrow` (or "
            "`make setup`), or convert the data to .jsonl"
        ) from None
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        raise DataFormatError(f"{path}: not a readable Parquet file ({exc})") from None
    return _rows(table.to_pylist())


def _single_split(ds: Any, datasets: Any, where: str, hint: str) -> Any:
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds.keys())
        if len(splits) != 1:
            raise DataFormatError(f"{where}: a DatasetDict with splits {splits}; {hint.format(split=splits[0])}")
        ds = ds[splits[0]]
    return ds


def read_datasets_folder(path: str) -> Located:
    """A folder written by ``Dataset.save_to_disk`` (or one split of a ``DatasetDict``)."""
    datasets = _import_datasets(f"{path} is a folder, read as a Hugging Face `datasets.save_to_disk` folder; it")
    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as exc:
        raise DataFormatError(
            f"{path}: a folder, but not one written by `datasets.save_to_disk` ({exc}); {ACCEPTED}"
        ) from None
    ds = _single_split(ds, datasets, path, f"point at one split's sub-folder, e.g. {os.path.join(path, '{split}')}")
    return _rows(ds)


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` or ``name``, optionally ``:split`` (e.g. ``tatsu-lab/alpaca:train[:1000]``)."""
    return bool(_HUB_ID.match(name)) and os.path.splitext(name.split(":", 1)[0])[1].lower() not in FILE_FORMATS


def read_hub(name: str) -> Located:
    """``NAME[:SPLIT]`` through ``datasets.load_dataset`` (split defaults to ``train``). Only with network allowed."""
    repo, _, split = name.partition(":")
    datasets = _import_datasets(f"the Hub data set {repo!r}")
    try:
        ds = datasets.load_dataset(repo, split=split or "train")
    except Exception as exc:  # noqa: BLE001  (datasets raises many unrelated types; all mean "cannot read it")
        raise DataFormatError(
            f"{name}: could not load the Hub data set {repo!r} ({type(exc).__name__}: {exc})"
        ) from None
    ds = _single_split(ds, datasets, name, "name one with NAME:SPLIT, e.g. {split}")
    return _rows(ds)


def read_source(path: str, *, allow_network: bool = False) -> tuple[Located, str]:
    """Rows of ``path`` and the source format name (``jsonl``, ``json``, ``csv``, ``parquet``, ``datasets``, ``hub``)."""
    if os.path.isdir(path):
        return read_datasets_folder(path), "datasets"
    if not os.path.exists(path):
        if looks_like_hub_id(path):
            if allow_network:
                return read_hub(path), "hub"
            raise DataFormatError(
                f"{path}: no such file or folder; if you meant the Hugging Face Hub data set of that name, allow "
                "network access (--allow-network), or download it once and pass the local copy"
            )
        raise DataFormatError(f"{path}: no such file or folder")
    ext = os.path.splitext(path)[1].lower()
    fmt = FILE_FORMATS.get(ext)
    readers = {"jsonl": read_jsonl, "json": read_json, "csv": read_csv, "parquet": read_parquet}
    if fmt is None:
        raise DataFormatError(f"{path}: unsupported file type '{ext or '(none)'}'; {ACCEPTED}")
    return readers[fmt](path), fmt
