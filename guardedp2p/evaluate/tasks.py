"""Where the frontier's data comes from: one small seam, so that switching the measured task is one line.

A :class:`TaskSource` gives the frontier everything it reads: the client's private training records, the
held-out multiple-choice items (utility), optional held-out records for the field NLL, and the *attacker's*
auxiliary records (other people, same house style, with their secrets) plus a disjoint held-out slice of them
for the attacker's convergence curve. Records are ``{"text", "pii", ...}`` JSON lines; ``pii`` holds the
secrets that the secrets-recovered metric looks for.

Two sources are registered in :data:`TASKS`:

* ``hidden_rules`` (the default, :data:`DEFAULT_TASK`): the generated clinic task with eight hidden rules of
  :mod:`guardedp2p.data.hidden_rules` (1,024 MC items, 3,000 auxiliary records; generated once into a cache).
* ``demo``: the shipped demo task of :mod:`guardedp2p.data.demo` (64 MC items). Its shipped auxiliary file holds
  300 records; the threat model of issue 15 gives the attacker >= 3,000, so the aux population is regenerated
  with several generator seeds (the same 1,200 aux names with fresh birth dates, addresses and accounts; still
  disjoint from the training names).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from guardedp2p.errors import ConfigError

DEFAULT_TASK = "hidden_rules"


@dataclass(frozen=True)
class Recipe:
    """The client's fine-tuning recipe on a task (the attacker knows it too: it is part of the defence's setting)."""

    steps: int = 60
    batch_size: int = 4
    lr: float = 2e-3
    max_length: int = 128


@dataclass
class TaskSource:
    """Paths and in-memory records of one task (see the module docstring)."""

    name: str
    train: str
    eval_mc: str
    aux: list[dict[str, Any]]
    aux_holdout: list[dict[str, Any]]
    eval_nll: str | None = None
    recipe: Recipe = field(default_factory=Recipe)
    digest: str = ""

    def train_records(self) -> list[dict[str, Any]]:
        from guardedp2p.data.loaders import load_records

        return load_records(self.train)

    def eval_nll_records(self, n: int | None = None) -> list[dict[str, Any]]:
        if not self.eval_nll:
            return []
        from guardedp2p.data.loaders import load_records

        recs = load_records(self.eval_nll)
        return recs[:n] if n else recs


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def hidden_rules_task(
    *,
    train: int | None = None,
    eval_mc: int | None = None,
    eval_nll: int | None = None,
    aux: int = 3000,
    holdout: int = 200,
    seed: int = 0,
) -> TaskSource:
    """The generated hidden-rules task (:func:`guardedp2p.data.hidden_rules.default_task_paths`), cached on disk.

    ``holdout`` extra aux people (after the first ``aux``) form the attacker's held-out convergence set.
    """
    from dataclasses import replace

    from guardedp2p.data.hidden_rules import TaskConfig, default_task_paths, make_records
    from guardedp2p.data.loaders import load_records

    cfg = TaskConfig(seed=seed, aux=aux)
    cfg = replace(
        cfg, **{k: v for k, v in (("train", train), ("eval_mc", eval_mc), ("eval_nll", eval_nll)) if v is not None}
    )
    paths = default_task_paths(cfg)
    aux_recs = load_records(paths.aux)
    hold = make_records(holdout, seed, "aux", skip=aux)
    # records of ~150 SmolLM2 tokens: 160 keeps every field (the account number comes last). 120 steps at lr 4e-3:
    # local LoRA gains +43 points on the 1,024 items in 558 CPU s (docs/results/task.md); at 60 steps and 2e-3 it
    # stays within a few points of chance, which leaves no utility loss to measure.
    return TaskSource(
        "hidden_rules",
        paths.train,
        paths.eval_mc,
        aux_recs,
        hold,
        eval_nll=paths.eval_nll,
        recipe=Recipe(steps=120, lr=4e-3, max_length=160),
        digest=_digest("hidden_rules", cfg.digest(), holdout),
    )


def demo_task(*, aux: int = 3000, holdout: int = 200) -> TaskSource:
    """The shipped demo task, with an auxiliary set regenerated to ``aux`` records (see the module docstring)."""
    from guardedp2p.data.demo import demo_paths, make_demo_records

    people = 1200  # size of the demo's aux population
    need = aux + holdout
    recs: list[dict[str, Any]] = []
    s = 0
    while len(recs) < need:
        recs += make_demo_records(min(people, need - len(recs)), seed=s, population="aux")
        s += 1
    p = demo_paths()
    return TaskSource(
        "demo",
        p.train,
        p.eval_mc,
        recs[:aux],
        recs[aux:need],
        recipe=Recipe(max_length=128),
        digest=_digest("demo", aux, holdout),
    )


def fast_task() -> TaskSource:
    """A small hidden-rules task for ``--fast`` (64 training records, 32 MC items, 16 NLL records, 200 aux)."""
    return hidden_rules_task(train=64, eval_mc=32, eval_nll=16, aux=200, holdout=12)


TASKS: dict[str, Callable[[], TaskSource]] = {"hidden_rules": hidden_rules_task, "demo": demo_task, "fast": fast_task}


def load_task(name: str = DEFAULT_TASK) -> TaskSource:
    """The task registered as ``name`` in :data:`TASKS`."""
    try:
        make = TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; choose from {', '.join(TASKS)}") from None
    return make()


__all__ = ["DEFAULT_TASK", "Recipe", "TASKS", "TaskSource", "demo_task", "fast_task", "hidden_rules_task", "load_task"]
