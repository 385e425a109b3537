"""A generated clinic task with eight hidden house rules, big enough to measure fine-tuning gains you can trust.

Why: the shipped demo (:mod:`guardedp2p.data.demo`) has one hidden rule and 64 multiple-choice items, so one
item is 1.6 accuracy points and a difference between two designs drowns in sampling noise. This module generates,
deterministically from a seed, records in the same house style (``{"text", "pii"}``, the same name / birth date /
address / diagnosis / account fields) extended with eight independent hidden rules (:data:`RULES`): each maps
one field written in the record (diagnosis, insurer, referral, ...) to a made-up code (ward, billing, intake,
...). The codes are arbitrary letter pairs, so no pre-trained model can know them: a base model sits at chance
(1 in 4) on the multiple-choice items, and every point above chance is something the fine-tuning learnt from the
client's private records. Each rule has four keys and four codes (the demo measured that one rule with eight
codes is much slower to learn than four), and each item asks about one rule.

With the default sizes (:class:`TaskConfig`) the held-out multiple-choice set has 1,024 items: the standard
error of one accuracy near 0.5 is 1.6 points (6.3 on the demo's 64 items), and two runs scored on the *same*
items differ with a paired standard error of ``sqrt(d / 1024)``, ``d`` the fraction of items on which they
disagree: about 1 point at ``d = 0.1``, so a 1.5-point difference is within reach of a paired test (or of a
few seeds), where the demo could not resolve 10. ``eval_nll`` records give a continuous metric on top (mean
token NLL on the private and code fields, see :mod:`guardedp2p.data.field_nll`) that moves even when the
accuracy does not.

Measured (docs/results/task.md, ``benchmarks/bench_task.py``): SmolLM2-135M-Instruct scores 0.266 on the 1,024
items (chance 0.25); LoRA r=8 on the default split's client blocks (first 2 + last 2), trained locally for 120
steps of 4 records (lr 4e-3, 558 CPU seconds on one thread), scores 0.698, and the NLL of the code tokens falls
from 3.59 to 0.36. Learning is steep around those 100-125 steps, so seeds and small recipe changes move the
accuracy by many points: compare designs at equal steps and seeds, or on the NLL.

Three disjoint populations of people, as in the demo and the threat model of the GuardedTuning paper
(arXiv 2501.04323): ``train`` (the client's private records), ``eval`` (the new patients of the
multiple-choice and NLL sets; the two sets share no person) and ``aux`` (records of other people in the same
style, which an attacker may hold to train inverters). Populations partition the (first, last) name pairs, so no
two populations share a first+last name even though a middle initial multiplies each population's size.

Files are written by :func:`write_task` (CLI: ``guardedp2p data make-demo``); evaluation code that wants the
default task without shipping megabytes in the wheel calls :func:`default_task_paths`, which generates it once
into a cache folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from guardedp2p.data.demo import CITIES, FIRST_NAMES, LAST_NAMES, STREETS
from guardedp2p.errors import ConfigError

Population = Literal["train", "eval", "aux"]
_POPULATIONS: tuple[Population, ...] = ("train", "eval", "aux")
_INITIALS = "ABCDEFGHIJKLMNOPRSTW"  # 20 middle initials: 20 x 1,200 name pairs = 24,000 people per population

#: Bumped whenever the generated text changes for the same config, so cached tasks are regenerated.
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class Rule:
    """One hidden house rule: the value of field ``key`` (written in the record) decides the made-up ``code``.

    ``keys[i]`` maps to ``codes[i]``. Code letters avoid the initials of the rule's own keys, so a base model
    cannot score above chance by copying letters from the context.
    """

    key: str
    code: str
    keys: tuple[str, ...]
    codes: tuple[str, ...]

    def mapping(self) -> dict[str, str]:
        return dict(zip(self.keys, self.codes))


#: The eight hidden rules, in the order their fields appear in a record.
RULES: tuple[Rule, ...] = (
    Rule("diagnosis", "ward code", ("asthma", "gout", "migraine", "eczema"), ("KD-3", "WF-8", "PJ-5", "HN-1")),
    Rule("insurer", "billing code", ("Northwind", "Bluecrest", "Harbor", "Oakline"), ("QT-7", "ZL-2", "VX-6", "JR-4")),
    Rule("referral", "intake code", ("GP", "emergency", "specialist", "self"), ("FW-9", "KM-1", "XB-5", "DQ-8")),
    Rule("blood type", "lab code", ("A", "B", "AB", "O"), ("YH-2", "TK-6", "WP-3", "LZ-7")),
    Rule("allergy", "alert code", ("penicillin", "latex", "pollen", "none"), ("RV-4", "CJ-9", "HX-5", "FB-1")),
    Rule("shift", "team code", ("morning", "afternoon", "evening", "night"), ("ZT-3", "PW-8", "QC-2", "YK-5")),
    Rule("language", "interpreter code", ("English", "Polish", "Urdu", "Welsh"), ("VM-6", "DH-3", "JN-7", "BX-9")),
    Rule("diet", "meal code", ("vegetarian", "halal", "kosher", "vegan"), ("TW-4", "GF-2", "RJ-8", "CZ-1")),
)

#: The private fields of a record (the demo's five); attack metrics count how many of these are recovered.
PII_FIELDS = ("name", "born", "address", "diagnosis", "account")


@dataclass(frozen=True)
class TaskConfig:
    """Sizes and seed of a generated task. The defaults are the measured task of docs/results/task.md.

    Multiple-choice items cycle through the rules and their keys, so an ``eval_mc`` that is a multiple of
    ``8 * 4 = 32`` (the default 1,024) asks every (rule, key) pair and uses every label position exactly equally
    often; other sizes are balanced up to one item.
    """

    seed: int = 0
    train: int = 2000
    eval_mc: int = 1024
    eval_nll: int = 512
    aux: int = 3000
    num_choices: int = 4

    def validate(self) -> None:
        for name in ("train", "eval_mc", "eval_nll", "aux"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"task size {name} must be a non-negative integer, got {v!r}")
        cap = population_size()
        for pop, need in (("train", self.train), ("eval", self.eval_mc + self.eval_nll), ("aux", self.aux)):
            if need > cap:
                raise ConfigError(
                    f"the {pop} population holds {cap} people but {need} were asked for; use smaller sizes"
                )
        if not 2 <= self.num_choices <= min(len(r.codes) for r in RULES):
            raise ConfigError(f"num_choices must be in [2, 4], got {self.num_choices}")

    def digest(self) -> str:
        """Short hash of the config and generator version: the cache folder name of this task."""
        blob = json.dumps({"config": asdict(self), "version": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Patient:
    name: str
    born: str
    address: str
    account: str
    keys: tuple[str, ...]  # one key per rule, in RULES order

    @property
    def diagnosis(self) -> str:
        return self.keys[0]

    def codes(self) -> tuple[str, ...]:
        return tuple(rule.mapping()[k] for rule, k in zip(RULES, self.keys))


def categorical_fields() -> dict[str, tuple[str, ...]]:
    """Every field of a record with a closed vocabulary: each rule's key field (``diagnosis``: its four values)
    and its code field (``ward code``: its four codes). The schema a client would declare to pseudonymise the task
    (:mod:`guardedp2p.privacy.pseudonym`)."""
    out: dict[str, tuple[str, ...]] = {}
    for r in RULES:
        out[r.key] = r.keys
        out[r.code] = r.codes
    return out


def population_size() -> int:
    """People per population (each population gets a third of the first x last name pairs)."""
    pairs = len(FIRST_NAMES) * len(LAST_NAMES)
    return (pairs // 3) * len(_INITIALS)


def _population_names(population: Population) -> list[str]:
    if population not in _POPULATIONS:
        raise ConfigError(f"unknown population {population!r}; use one of {list(_POPULATIONS)}")
    k = _POPULATIONS.index(population)
    pairs = [(f, last) for i, f in enumerate(FIRST_NAMES) for j, last in enumerate(LAST_NAMES) if (i + j) % 3 == k]
    return [f"{f} {m}. {last}" for f, last in pairs for m in _INITIALS]


def make_patients(n: int, seed: int, population: Population) -> list[Patient]:
    """``n`` distinct invented patients of ``population``, a pure function of the arguments (prefix-stable in n)."""
    names = _population_names(population)
    if not 0 <= n <= len(names):
        raise ConfigError(f"n must be in [0, {len(names)}] for population {population!r}, got {n}")
    random.Random(f"guardedp2p-hidden:{population}:{seed}").shuffle(names)
    out = []
    for i, name in enumerate(names[:n]):
        rng = random.Random(f"guardedp2p-hidden:{population}:{seed}:{i}")
        born = f"{rng.randint(1940, 2005)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        address = f"{rng.randint(1, 199)} {rng.choice(STREETS)}, {rng.choice(CITIES)}"
        account = f"GB{rng.randint(10, 99)}-" + "-".join(f"{rng.randint(0, 9999):04d}" for _ in range(3))
        keys = tuple(rng.choice(rule.keys) for rule in RULES)
        out.append(Patient(name, born, address, account, keys))
    return out


def _prefix(p: Patient) -> str:
    return f"Patient {p.name}, born {p.born}, lives at {p.address}"


def record_text(p: Patient) -> str:
    """The house style: the demo's record with the eight (key; code) pairs between address and account."""
    parts = [_prefix(p)]
    for rule, key, code in zip(RULES, p.keys, p.codes()):
        parts.append(f"{rule.key}: {key}; {rule.code}: {code}")
    return "; ".join(parts) + f"; account {p.account}."


def question_text(p: Patient, rule_index: int) -> str:
    """The record cut right before the code of rule ``rule_index`` (the MC question)."""
    parts = [_prefix(p)]
    for j, (rule, key, code) in enumerate(zip(RULES, p.keys, p.codes())):
        if j == rule_index:
            parts.append(f"{rule.key}: {key}; {rule.code}:")
            break
        parts.append(f"{rule.key}: {key}; {rule.code}: {code}")
    return "; ".join(parts)


def _record(p: Patient) -> dict[str, Any]:
    pii = {"name": p.name, "born": p.born, "address": p.address, "diagnosis": p.diagnosis, "account": p.account}
    fields = {rule.key: key for rule, key in zip(RULES, p.keys)}
    codes = {rule.code: code for rule, code in zip(RULES, p.codes())}
    return {"text": record_text(p), "pii": pii, "fields": fields, "codes": codes}


def make_records(n: int, seed: int = 0, population: Population = "train", *, skip: int = 0) -> list[dict[str, Any]]:
    """``n`` records ``{"text", "pii", "fields", "codes"}`` of ``population`` (people ``skip .. skip+n-1``).

    ``pii`` holds the demo's five private fields; ``fields`` the rule inputs and ``codes`` the rule outputs
    written in the text (extra keys: the loaders keep and ignore them).
    """
    return [_record(p) for p in make_patients(skip + n, seed, population)[skip:]]


def make_mc_items(n: int, seed: int = 0, *, num_choices: int = 4, skip: int = 0) -> list[dict[str, Any]]:
    """``n`` multiple-choice items on new (``eval``) patients, each asking the code of one rule.

    Item ``i`` asks rule ``i % 8`` with that rule's key ``(i // 8) % 4`` (the patient's other fields stay
    random), so rules and keys are asked equally often; the right answer's position comes from a shuffled,
    balanced list of positions, and the distractors are other codes of the same rule. Items carry ``rule`` and
    ``key`` for per-rule breakdowns.
    """
    people = make_patients(skip + n, seed, "eval")[skip:]
    rng = random.Random(f"guardedp2p-hidden-mc:{seed}")
    labels = [i % num_choices for i in range(n)]
    rng.shuffle(labels)
    items = []
    for i, p in enumerate(people):
        r = i % len(RULES)
        rule = RULES[r]
        keys = list(p.keys)
        keys[r] = rule.keys[(i // len(RULES)) % len(rule.keys)]
        p = Patient(p.name, p.born, p.address, p.account, tuple(keys))
        answer = rule.mapping()[keys[r]]
        choices = rng.sample([c for c in rule.codes if c != answer], num_choices - 1)
        choices.insert(labels[i], answer)
        items.append(
            {"question": question_text(p, r), "choices": choices, "label": labels[i], "rule": rule.code, "key": keys[r]}
        )
    return items


TASK_FILES = {"train": "train.jsonl", "eval_mc": "eval_mc.jsonl", "eval_nll": "eval_nll.jsonl", "aux": "aux.jsonl"}
TASK_JSON = "task.json"


@dataclass(frozen=True)
class TaskPaths:
    """Where the files of one generated task are."""

    folder: str
    train: str
    eval_mc: str
    eval_nll: str
    aux: str
    task_json: str


def _paths(folder: str | Path) -> TaskPaths:
    folder = str(folder)
    return TaskPaths(
        folder=folder,
        task_json=os.path.join(folder, TASK_JSON),
        **{k: os.path.join(folder, v) for k, v in TASK_FILES.items()},
    )


def task_description(cfg: TaskConfig) -> dict[str, Any]:
    """The content of ``task.json``: sizes, seed, files and the hidden rules (the answer key)."""
    return {
        "task": "guardedp2p-hidden-rules",
        "generator_version": GENERATOR_VERSION,
        "digest": cfg.digest(),
        "config": asdict(cfg),
        "files": dict(TASK_FILES),
        "populations": {"train": "train", "eval_mc": "eval", "eval_nll": "eval", "aux": "aux"},
        "rules": [{"key": r.key, "code": r.code, "mapping": r.mapping()} for r in RULES],
        "pii_fields": list(PII_FIELDS),
    }


def _write_jsonl(path: str, records: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n")


def write_task(folder: str | Path, cfg: TaskConfig | None = None) -> TaskPaths:
    """Generate the task's four JSONL files and ``task.json`` into ``folder`` (created if needed)."""
    cfg = cfg or TaskConfig()
    cfg.validate()
    os.makedirs(folder, exist_ok=True)
    out = _paths(folder)
    _write_jsonl(out.train, make_records(cfg.train, cfg.seed, "train"))
    _write_jsonl(out.eval_mc, make_mc_items(cfg.eval_mc, cfg.seed, num_choices=cfg.num_choices))
    _write_jsonl(out.eval_nll, make_records(cfg.eval_nll, cfg.seed, "eval", skip=cfg.eval_mc))
    _write_jsonl(out.aux, make_records(cfg.aux, cfg.seed, "aux"))
    with open(out.task_json, "w", encoding="utf-8", newline="\n") as fh:
        json.dump(task_description(cfg), fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    return out


def cache_root() -> Path:
    """``$GUARDEDP2P_CACHE`` or ``~/.cache/guardedp2p`` (the model loader's cache root too)."""
    return Path(os.environ.get("GUARDEDP2P_CACHE", Path.home() / ".cache" / "guardedp2p"))


def default_task_paths(cfg: TaskConfig | None = None, *, cache_dir: str | Path | None = None) -> TaskPaths:
    """Paths of the (default) task's files, generating them once into ``<cache>/tasks/<digest>/``.

    Generation goes to a temporary sibling folder renamed into place, so concurrent callers never read a
    half-written task. A folder whose ``task.json`` is present is trusted (its name is the config's digest).
    """
    cfg = cfg or TaskConfig()
    cfg.validate()
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "tasks"
    folder = root / cfg.digest()
    if (folder / TASK_JSON).is_file():
        return _paths(folder)
    root.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{cfg.digest()}-", dir=root)
    try:
        write_task(tmp, cfg)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / TASK_JSON).is_file():  # lost a race to a writer that finished: use theirs
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return _paths(folder)


__all__ = [
    "categorical_fields",
    "GENERATOR_VERSION",
    "PII_FIELDS",
    "RULES",
    "Patient",
    "Rule",
    "TaskConfig",
    "TaskPaths",
    "default_task_paths",
    "make_mc_items",
    "make_patients",
    "make_records",
    "population_size",
    "question_text",
    "record_text",
    "task_description",
    "write_task",
]
