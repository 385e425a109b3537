"""Synthetic private clinic records for demos, tests and attack benchmarks (all people are invented).

Every record is written in one fixed clinic "house style" and carries what a client must protect: a name,
a date of birth, a home address, a diagnosis and a bank account. The house style hides a rule that no
pre-trained model can know: each diagnosis is filed under a made-up ward code (:data:`WARD_CODES`). The
multiple-choice task asks for the ward code of a *new* patient, so a base model is at chance (1 in 4) and
fine-tuning on the training records measurably lifts it: that is how the demo shows the fine-tuning worked.
Measured on SmolLM2-135M-Instruct (CPU, batch 4, LoRA r=8 on q/k/v/o of the first 2 + last 2 blocks, AdamW
lr 2e-3, 60 steps): accuracy 0.27 -> 0.59 on the 64 shipped items, held-out NLL on ``aux`` 4.20 -> 1.55;
with LoRA on all 30 blocks (same lr and steps): 0.27 -> 1.00, NLL 4.20 -> 1.28.
With 8 diagnoses/codes the same budget reached only 0.52 even with LoRA on all 30 blocks, hence 4.

Three disjoint populations of people (no full name is shared): ``train`` (the client's private data),
``eval`` (the new patients of the multiple-choice task) and ``aux`` (public text of the same style, which the
threat model lets an attacker hold to train inverters). The shipped files are produced by
:func:`write_demo_files` and can be rebuilt bit-identically with
``python -c "from guardedp2p.data.demo import write_demo_files; write_demo_files('guardedp2p/data')"``.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from guardedp2p.errors import ConfigError

Population = Literal["train", "eval", "aux"]
_POPULATIONS = ("train", "eval", "aux")

#: The house rule: diagnosis -> ward code. Codes are arbitrary so no model can guess them.
WARD_CODES: dict[str, str] = {
    "type 2 diabetes": "QX-4",
    "asthma": "LM-7",
    "hypertension": "RB-2",
    "migraine": "VT-9",
}

FIRST_NAMES = (
    "Maria",
    "John",
    "Aisha",
    "Tomasz",
    "Chen",
    "Fatima",
    "Liam",
    "Sofia",
    "Kwame",
    "Ingrid",
    "Rahul",
    "Elena",
    "Oluwaseun",
    "Hannah",
    "Mateo",
    "Yuki",
    "Dmitri",
    "Grace",
    "Omar",
    "Freya",
    "Pedro",
    "Amara",
    "Lukas",
    "Niamh",
    "Hiroshi",
    "Zara",
    "Andrei",
    "Chloe",
    "Tariq",
    "Ines",
    "Samuel",
    "Leila",
    "Bjorn",
    "Priya",
    "Connor",
    "Mei",
    "Youssef",
    "Alice",
    "Emeka",
    "Katarzyna",
    "George",
    "Nadia",
    "Felix",
    "Rosa",
    "Arjun",
    "Siobhan",
    "Marco",
    "Hana",
    "Victor",
    "Esther",
    "Ruben",
    "Anika",
    "Patrick",
    "Lucia",
    "Kofi",
    "Greta",
    "Ibrahim",
    "Clara",
    "Nikolai",
    "Deborah",
)
LAST_NAMES = (
    "Kovacs",
    "Smith",
    "Okafor",
    "Nowak",
    "Wei",
    "Haddad",
    "Murphy",
    "Rossi",
    "Mensah",
    "Larsen",
    "Sharma",
    "Popescu",
    "Adeyemi",
    "Fischer",
    "Garcia",
    "Tanaka",
    "Volkov",
    "Campbell",
    "Farouk",
    "Berg",
    "Silva",
    "Nwosu",
    "Weber",
    "Byrne",
    "Sato",
    "Ahmed",
    "Ionescu",
    "Dubois",
    "Malik",
    "Moreau",
    "Cohen",
    "Rahimi",
    "Johansson",
    "Patel",
    "OBrien",
    "Lin",
    "Benali",
    "Walker",
    "Eze",
    "Wisniewska",
    "Evans",
    "Petrova",
    "Schmidt",
    "Romero",
    "Iyer",
    "Gallagher",
    "Bianchi",
    "Novak",
    "Costa",
    "Levi",
    "Jansen",
    "Mehta",
    "Doyle",
    "Ferreira",
    "Asante",
    "Lindqvist",
    "Yilmaz",
    "Hoffmann",
    "Kuznetsov",
    "Morgan",
)
STREETS = (
    "Elm Road",
    "Station Street",
    "Mill Lane",
    "Church Walk",
    "Victoria Avenue",
    "Oak Close",
    "Park Terrace",
    "High Street",
    "Willow Drive",
    "Canal Side",
    "Queens Road",
    "Bridge Street",
    "Orchard Way",
    "Hill Rise",
    "Market Square",
    "Chapel Row",
    "Meadow View",
    "King Street",
    "Abbey Gardens",
    "Beech Grove",
)
CITIES = (
    "Leeds",
    "Bristol",
    "Manchester",
    "Glasgow",
    "Cardiff",
    "Norwich",
    "York",
    "Belfast",
    "Brighton",
    "Sheffield",
    "Leicester",
    "Aberdeen",
    "Exeter",
    "Derby",
    "Hull",
    "Swansea",
    "Oxford",
    "Plymouth",
)


@dataclass(frozen=True)
class Person:
    name: str
    born: str
    address: str
    diagnosis: str
    account: str

    @property
    def ward(self) -> str:
        return WARD_CODES[self.diagnosis]


def _population_names(population: str) -> list[str]:
    """Full names of one population; the three populations partition all first x last combinations."""
    if population not in _POPULATIONS:
        raise ConfigError(f"unknown demo population {population!r}; use one of {list(_POPULATIONS)}")
    k = _POPULATIONS.index(population)
    return [f"{f} {last}" for i, f in enumerate(FIRST_NAMES) for j, last in enumerate(LAST_NAMES) if (i + j) % 3 == k]


def make_people(n: int, seed: int = 0, population: Population = "train") -> list[Person]:
    """``n`` distinct invented people of ``population``; a pure function of its arguments.

    Prefix-stable: ``make_people(n, s, pop) == make_people(m, s, pop)[:n]`` for ``n <= m``, so a larger demo
    set extends a smaller one instead of replacing it.
    """
    names = _population_names(population)
    if not 0 <= n <= len(names):
        raise ConfigError(f"n must be in [0, {len(names)}] for population {population!r}, got {n}")
    random.Random(f"guardedp2p-demo:{population}:{seed}").shuffle(names)
    diagnoses = sorted(WARD_CODES)
    people = []
    for i, name in enumerate(names[:n]):
        rng = random.Random(f"guardedp2p-demo:{population}:{seed}:{i}")
        born = f"{rng.randint(1940, 2005)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        address = f"{rng.randint(1, 199)} {rng.choice(STREETS)}, {rng.choice(CITIES)}"
        account = f"GB{rng.randint(10, 99)}-" + "-".join(f"{rng.randint(0, 9999):04d}" for _ in range(3))
        people.append(Person(name, born, address, rng.choice(diagnoses), account))
    return people


def record_text(p: Person) -> str:
    """The clinic's house style for one patient."""
    return (
        f"Patient {p.name}, born {p.born}, lives at {p.address}; diagnosis: {p.diagnosis}; "
        f"ward code: {p.ward}; account {p.account}."
    )


def _pii(p: Person) -> dict[str, str]:
    return {"name": p.name, "born": p.born, "address": p.address, "diagnosis": p.diagnosis, "account": p.account}


def make_demo_records(
    n: int,
    seed: int = 0,
    *,
    kind: Literal["text", "instruction"] = "text",
    population: Population = "train",
) -> list[dict[str, Any]]:
    """``n`` private records, deterministic in ``(n, seed, kind, population)``.

    ``kind="text"`` gives ``{"text", "pii"}`` records (language modelling); ``kind="instruction"`` gives
    ``{"prompt", "response", "pii"}`` where the response is the house-style record. ``pii`` lists the
    private values in the record, so attack metrics can count how many were recovered.
    """
    out = []
    for p in make_people(n, seed, population):
        if kind == "text":
            out.append({"text": record_text(p), "pii": _pii(p)})
        elif kind == "instruction":
            prompt = (
                f"Register this patient in the clinic's records. Name: {p.name}. Date of birth: {p.born}. "
                f"Address: {p.address}. Diagnosis: {p.diagnosis}. Account: {p.account}."
            )
            out.append({"prompt": prompt, "response": record_text(p), "pii": _pii(p)})
        else:
            raise ConfigError(f"unknown demo record kind {kind!r}; use 'text' or 'instruction'")
    return out


def make_demo_mc_items(
    n: int, seed: int = 0, *, population: Population = "eval", num_choices: int = 4
) -> list[dict[str, Any]]:
    """Multiple-choice items: the ward code of a new patient, among ``num_choices`` codes.

    The question is the house-style record cut right before the code, so a model that learnt the house rule
    from the training records completes it; diagnoses cycle so every code is asked equally often, and the
    right answer's position is uniform.
    """
    codes = sorted(set(WARD_CODES.values()))
    if not 2 <= num_choices <= len(codes):
        raise ConfigError(f"num_choices must be in [2, {len(codes)}], got {num_choices}")
    rng = random.Random(f"guardedp2p-demo-mc:{population}:{seed}")
    diagnoses = sorted(WARD_CODES)
    items = []
    for i, p in enumerate(make_people(n, seed, population)):
        diagnosis = diagnoses[i % len(diagnoses)]
        p = Person(p.name, p.born, p.address, diagnosis, p.account)
        question = f"Patient {p.name}, born {p.born}, lives at {p.address}; diagnosis: {p.diagnosis}; ward code:"
        choices = rng.sample([c for c in codes if c != p.ward], num_choices - 1)
        label = rng.randrange(num_choices)
        choices.insert(label, p.ward)
        items.append({"question": question, "choices": choices, "label": label})
    rng.shuffle(items)
    return items


@dataclass(frozen=True)
class DemoPaths:
    train: str
    eval_mc: str
    aux: str


DEMO_FILES = {"train": "demo_train.jsonl", "eval_mc": "demo_eval_mc.jsonl", "aux": "demo_aux.jsonl"}
#: The generator arguments of the shipped files (rebuild with write_demo_files).
DEMO_SIZES = {"train": 300, "eval_mc": 64, "aux": 300}


def demo_paths() -> DemoPaths:
    """Filesystem paths of the shipped demo files (inside the installed package)."""
    base = resources.files("guardedp2p.data")
    paths = {}
    for key, name in DEMO_FILES.items():
        p = Path(str(base / name))
        if not p.is_file():
            raise ConfigError(
                f"demo file {name} is missing from the installed package ({p}); reinstall guardedp2p, "
                "or rebuild it with guardedp2p.data.demo.write_demo_files(<folder>)"
            )
        paths[key] = str(p)
    return DemoPaths(**paths)


def _write_jsonl(path: str, records: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n")


def write_demo_files(folder: str) -> DemoPaths:
    """Write the three demo files into ``folder`` (this is how the shipped ones were made)."""
    os.makedirs(folder, exist_ok=True)
    out = {key: os.path.join(folder, name) for key, name in DEMO_FILES.items()}
    _write_jsonl(out["train"], make_demo_records(DEMO_SIZES["train"], seed=0, population="train"))
    _write_jsonl(out["eval_mc"], make_demo_mc_items(DEMO_SIZES["eval_mc"], seed=0, population="eval"))
    _write_jsonl(out["aux"], make_demo_records(DEMO_SIZES["aux"], seed=0, population="aux"))
    return DemoPaths(**out)
