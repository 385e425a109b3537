"""Check a data file before training: what it is, how long its records are, what a run would cut or drop.

Why a separate pass: ``client tune`` used to find a missing or malformed file only after it had connected to a
provider and loaded the model. :func:`check_data` reads the data with the same loaders and tokenization as
training, but loads nothing beyond the tokenizer, so it runs in seconds and can gate a run before any
connection (``guardedp2p data check`` is the same function on the command line). :func:`data_fingerprint`
identifies the data a run used (path, SHA-256, record count) for its summary, so a result can always be traced
back to its input, including the case where no ``--data`` was given and the shipped demo records were used.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from guardedp2p.data.errors import DataFormatError
from guardedp2p.data.fields import FieldMapping
from guardedp2p.data.loaders import LoadedData, check_records
from guardedp2p.data.sources import read_source
from guardedp2p.data.tokenize import (
    IGNORE_INDEX,
    DataConfig,
    Example,
    chat_example,
    encode_instruction,
    encode_lm,
    has_chat_template,
)

#: How many bad records one check reports before it stops.
MAX_REPORTED_ERRORS = 20


class DataFingerprint(TypedDict):
    """What a run's summary records about its data."""

    path: str
    sha256: str
    records: int


@dataclass
class LengthStats:
    """Lengths of the records as training would see them (tokens with a tokenizer, characters without)."""

    unit: str
    min: int
    median: float
    max: int


@dataclass
class DataReport:
    """What :func:`check_data` found. ``truncated``/``dropped``/``loss_tokens`` need a tokenizer (else None).

    truncated: records longer than ``max_length`` tokens, which training cuts on the right.
    dropped: records that keep no loss token after the cut (a prompt or the turns before the first assistant
        answer fill ``max_length``); training skips them.
    loss_tokens: tokens that carry the loss over the whole data, after the cut.
    """

    path: str
    source_format: str
    kind: str
    records: int
    fields: dict[str, str]
    sha256: str
    lengths: LengthStats
    rendering: str
    loss_on: str
    trainable: bool
    max_length: int | None = None
    tokenizer: str | None = None
    truncated: int | None = None
    dropped: int | None = None
    loss_tokens: int | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format_text(self) -> str:
        """A few plain lines for a terminal."""
        kind = {"lm": "text", "mc": "multiple-choice"}.get(self.kind, self.kind)
        mapped = ", ".join(f"{role} <- '{src}'" for role, src in self.fields.items())
        lines = [
            f"{self.path}: {self.records} {kind} records ({self.source_format})",
            f"fields: {mapped}",
            f"layout: {self.rendering}; loss on {self.loss_on}",
        ]
        lg = self.lengths
        where = f" ({self.tokenizer})" if self.tokenizer else " (no --model given, so characters, not tokens)"
        lines.append(f"length in {lg.unit}{where}: min {lg.min}, median {lg.median:g}, max {lg.max}")
        if self.max_length is not None and self.truncated is not None:
            lines.append(
                f"at --max-length {self.max_length}: {self.truncated} record(s) cut, {self.dropped} dropped, "
                f"{self.loss_tokens} loss tokens in all"
            )
        lines.append(f"sha256: {self.sha256}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _sha256_file(path: str, h: Any = None) -> Any:
    h = h or hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h


def content_sha256(path: str, loaded: LoadedData | None = None) -> str:
    """SHA-256 of a file's bytes (what ``sha256sum`` prints); of a folder, over its files' relative paths and
    digests; of a Hub data set (no local bytes), over its normalised records as canonical JSON."""
    if os.path.isfile(path):
        return str(_sha256_file(path).hexdigest())
    if os.path.isdir(path):
        h = hashlib.sha256()
        root = Path(path)
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            h.update(f.relative_to(root).as_posix().encode() + b"\0")
            h.update(_sha256_file(str(f)).digest())
        return h.hexdigest()
    if loaded is None:
        raise ValueError(f"{path}: not a local file or folder; pass the loaded data to fingerprint it")
    h = hashlib.sha256()
    for rec in loaded.records:
        h.update(json.dumps(rec, sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n")
    return h.hexdigest()


def data_fingerprint(
    path: str, *, loaded: LoadedData | None = None, mapping: FieldMapping | None = None, allow_network: bool = False
) -> DataFingerprint:
    """``{"path", "sha256", "records"}`` of the data at ``path`` for a run's summary.

    Pass ``loaded`` (what :func:`~guardedp2p.data.loaders.load_data` returned for ``path``) to avoid reading the
    data twice; otherwise it is loaded here (with ``mapping``) to count the records the run trains on.
    """
    path = os.fspath(path)
    if loaded is None:
        from guardedp2p.data.loaders import load_data

        loaded = load_data(path, mapping, allow_network=allow_network)
    return {"path": path, "sha256": content_sha256(path, loaded), "records": len(loaded.records)}


def _char_length(kind: str, rec: dict[str, Any]) -> int:
    if kind == "lm":
        return len(rec["text"])
    if kind == "instruction":
        return len(rec["prompt"]) + len(rec["response"])
    if kind == "chat":
        return sum(len(m["content"]) for m in rec["messages"])
    return len(rec["question"]) + 1 + max(len(c) for c in rec["choices"])


def _full_example(kind: str, rec: dict[str, Any], tokenizer: Any, config: DataConfig) -> Example:
    """The untruncated training example of one record (for mc: the question and its longest choice)."""
    if kind == "lm":
        return encode_lm([rec], tokenizer, config)[0]
    if kind == "instruction":
        return encode_instruction([rec], tokenizer, config)[0]
    if kind == "chat":
        return chat_example(rec["messages"], tokenizer, config)
    ids = max(
        (tokenizer(rec["question"] + " " + c, add_special_tokens=True)["input_ids"] for c in rec["choices"]), key=len
    )
    return {"input_ids": list(ids), "labels": [IGNORE_INDEX] * len(ids)}


def _rendering(kind: str, tokenizer: Any, config: DataConfig) -> str:
    if kind == "lm":
        return "plain text" + (" + EOS" if config.add_eos else "")
    if kind == "mc":
        return "question + ' ' + choice (evaluation only)"
    if tokenizer is not None and config.use_chat_template and has_chat_template(tokenizer):
        return "the tokenizer's chat template"
    if tokenizer is None:
        return "the tokenizer's chat template if it has one (give --model to see)"
    return "simple 'role: content' chat layout" if kind == "chat" else "plain prompt/response layout"


def check_data(
    path: str,
    *,
    tokenizer: Any = None,
    max_length: int | None = None,
    mapping: FieldMapping | None = None,
    config: DataConfig | None = None,
    allow_network: bool = False,
    tokenizer_name: str | None = None,
) -> DataReport:
    """Read ``path`` as training would and report on it; raise :class:`DataFormatError` listing bad records.

    Without ``tokenizer`` lengths are in characters and nothing about truncation can be said. ``max_length``
    overrides ``config.max_length`` (default 128, the ``client tune`` default).
    """
    path = os.fspath(path)
    config = config or DataConfig()
    if max_length is not None:
        config = DataConfig(**{**asdict(config), "max_length": max_length})
    located, fmt = read_source(path, allow_network=allow_network)
    kind, records, fields = check_records(path, located, mapping, max_errors=MAX_REPORTED_ERRORS)
    loaded = LoadedData(kind=kind, records=records, path=path, fields=fields, source_format=fmt)
    loss_on = {"lm": "every token", "mc": "nothing (evaluation only)"}.get(
        kind, "every token" if config.loss_on == "all" else ("assistant turns" if kind == "chat" else "the output")
    )
    report_warnings: list[str] = []
    if kind == "mc":
        report_warnings.append("multiple-choice records are for evaluation (--eval-data), not for training (--data)")
    truncated = dropped = loss_tokens = None
    if tokenizer is None:
        lengths = [_char_length(kind, r) for r in records]
        unit = "characters"
        limit = None
    else:
        unit, limit = "tokens", config.max_length
        full_config = DataConfig(**{**asdict(config), "max_length": 1 << 30})
        examples = []
        for (loc, _), rec in zip(located, records):
            try:
                examples.append(_full_example(kind, rec, tokenizer, full_config))
            except DataFormatError as exc:
                raise DataFormatError(f"{path}, {loc}: {exc}") from None
        lengths = [len(ex["input_ids"]) for ex in examples]
        truncated = sum(n > limit for n in lengths)
        dropped = loss_tokens = 0
        if kind != "mc":
            for ex in examples:
                n = sum(lab != IGNORE_INDEX for lab in ex["labels"][:limit])
                dropped += n == 0
                loss_tokens += n
        if truncated:
            report_warnings.append(
                f"{truncated} of {len(records)} records are longer than --max-length {limit} tokens and will be cut "
                f"(longest: {max(lengths)})"
            )
        if dropped:
            report_warnings.append(
                f"{dropped} records keep no loss token within --max-length {limit} and will be skipped"
            )
    return DataReport(
        path=path,
        source_format=fmt,
        kind=kind,
        records=len(records),
        fields=fields,
        sha256=content_sha256(path, loaded),
        lengths=LengthStats(unit, min(lengths), float(statistics.median(lengths)), max(lengths)),
        rendering=_rendering(kind, tokenizer, config),
        loss_on=loss_on,
        trainable=kind != "mc" and dropped != len(records),
        max_length=limit,
        tokenizer=(tokenizer_name or str(getattr(tokenizer, "name_or_path", "") or "tokenizer"))
        if tokenizer is not None
        else None,
        truncated=truncated,
        dropped=dropped,
        loss_tokens=loss_tokens,
        warnings=report_warnings,
    )


def load_tokenizer(model: str = "default") -> Any:
    """Load only the tokenizer of ``model`` (``default``, a local Hugging Face folder or ``.gguf``), never weights.

    A folder with tokenizer files but no ``config.json`` is accepted too. For the embedded GGUF default the
    converted copy that loading the model caches is used when present (milliseconds instead of seconds).
    """
    from guardedp2p.engine.loading import ModelLoadError, _gguf_cache_dir, _offline_env, _resolve, prepare_tokenizer

    _offline_env()
    p = Path(model).expanduser()
    extra: dict[str, Any] = {"local_files_only": True}
    if p.is_dir() and ((p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file()):
        folder = p
    else:
        folder, gguf = _resolve(model)
        if gguf is not None:
            import torch

            cache = _gguf_cache_dir(folder, gguf, torch.float32)
            if cache is not None and (cache / "tokenizer_config.json").is_file():
                folder = cache
            else:
                extra["gguf_file"] = gguf
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **extra)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load a tokenizer from {str(folder)!r}: {exc}") from exc
    return prepare_tokenizer(tokenizer)
