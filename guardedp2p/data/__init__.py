"""Data layer: load records, tokenize with loss masks, batch resumably, evaluate, and ship demo data."""

from guardedp2p.data.check import DataFingerprint, DataReport, check_data, data_fingerprint
from guardedp2p.data.collate import BatchIterator, collate
from guardedp2p.data.demo import DemoPaths, demo_paths, make_demo_mc_items, make_demo_records
from guardedp2p.data.fields import KIND_CHOICES, FieldMapping
from guardedp2p.data.loaders import (
    SCHEMAS,
    DataFormatError,
    LoadedData,
    MissingDependencyError,
    TaskKind,
    detect_kind,
    load_data,
    load_records,
)
from guardedp2p.data.mc_eval import evaluate_loss, evaluate_mc, score_continuations
from guardedp2p.data.tokenize import (
    IGNORE_INDEX,
    SIMPLE_CHAT_TEMPLATE,
    DataConfig,
    encode_chat,
    encode_instruction,
    encode_lm,
    encode_records,
)

__all__ = [
    "IGNORE_INDEX",
    "KIND_CHOICES",
    "SCHEMAS",
    "SIMPLE_CHAT_TEMPLATE",
    "BatchIterator",
    "DataConfig",
    "DataFingerprint",
    "DataFormatError",
    "DataReport",
    "DemoPaths",
    "FieldMapping",
    "LoadedData",
    "MissingDependencyError",
    "TaskKind",
    "check_data",
    "collate",
    "data_fingerprint",
    "demo_paths",
    "detect_kind",
    "encode_chat",
    "encode_instruction",
    "encode_lm",
    "encode_records",
    "evaluate_loss",
    "evaluate_mc",
    "load_data",
    "load_records",
    "make_demo_mc_items",
    "make_demo_records",
    "score_continuations",
]
