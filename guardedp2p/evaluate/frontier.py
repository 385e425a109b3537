"""The privacy-utility frontier: every design and defence, several training seeds, statistics on every number.

``guardedp2p evaluate`` runs this. For each row (a design and a defence at one setting) and each training seed:

1. **A real run.** The client fine-tunes through the real protocol code over an in-process channel, against a
   provider that records what it observes (``provider serve --record``); the client side keeps the ground truth
   (the token ids of every ACT_UP it sent, :class:`~guardedp2p.evaluate.grid.ClientTruth`). Local LoRA (the
   reference: the same LoRA on the same blocks, trained with no split and no defence) and Offline (emulator) run
   their own paths.
2. **Utility, per item.** The client's tuned model is scored item by item on the held-out multiple-choice set
   (correct or not, NLL of the right answer) and record by record on held-out NLL records (mean NLL of the
   hidden-rule code tokens), with the wire's mechanisms applied at the cuts (:mod:`guardedp2p.evaluate.utility`).
3. **Privacy, from the provider's transcript.** Training steps spread evenly over the run (early, middle, late)
   are taken from the transcript, and the adaptive attacker of :mod:`guardedp2p.attacks.adaptive` (which knows
   the defence and replays it on its auxiliary data) reconstructs their sequences; each sequence is scored
   (ROUGE-L F1, token accuracy, secrets recovered exactly).

Rows then aggregate over seeds with the CIs of :mod:`guardedp2p.evaluate.stats`: accuracy with a two-level
(seeds x items) bootstrap, utility loss = local-LoRA accuracy minus the row's, paired with the local run of the
same seed on the same items; privacy with a bootstrap over the attacked sequences (pooled over seeds) that also
resamples the choice of the best attack. A **sanity gate** refuses to print privacy numbers when the undefended
Online row is not broken wide open (best ROUGE-L >= 0.9 and secrets >= 0.8): then the harness is broken.

Every unit of work (a run, an attacker, an attack) is cached under ``<out>/cache`` by a hash of everything it
depends on, so an interrupted grid resumes where it stopped and a grown grid only runs what is new.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from guardedp2p.errors import ConfigError, GuardedP2PError

log = logging.getLogger("guardedp2p.evaluate")

_CLAIM_POLL_S = 30.0  # how often a reporting run looks again for a unit another worker is training
FRONTIER_VERSION = 1  # bump when a change alters cached numbers
SANITY_ROUGEL = 0.9
SANITY_SECRETS = 0.8
ATTACKS = ("sip_adaptive", "sip", "bisr_f", "template")
ATTACK_LABELS = {
    "sip_adaptive": "SIP, adaptive (replays the defence)",
    "sip_freq": "SIP, adaptive, then frequency analysis of the pseudonymised fields (knows their distribution, not the key)",
    "sip": "SIP (pre-trained bottom, codec-aware)",
    "bisr_f": "BiSR(f) (forward matching, init SIP)",
    "template": "format prior (one typical aux record for every sequence)",
}


class HarnessBroken(GuardedP2PError):
    """The undefended row was not recovered: the attack is broken, so no privacy number can be trusted."""

    exit_code = 3


# ============================================================================ rows
@dataclass(frozen=True)
class RowDef:
    """One row: a design with one defence setting. ``family`` groups settings of the same defence.

    Defence fields (several may combine, ``+`` in a row name): ``codec``; ``dcor`` (distance-correlation weight);
    ``noise_scale`` (plain Gaussian sigma on h1); ``dp_epsilon`` (per-record clipped Gaussian on h1 and, in Online,
    on the gradient sent up, its multiplier calibrated by the dp-accounting PLD accountant to this ε over the whole
    run, δ of :data:`guardedp2p.privacy.presets.STRONG_DELTA`); ``dx_epsilon`` (dχ-privacy on the input embeddings,
    ``dx_selective``: only on tokens outside the public keep list, the kept ones at
    :data:`~guardedp2p.privacy.presets.BALANCED_EPSILON_KEEP`); ``preset`` (a ``--privacy`` preset, resolved as
    the CLI resolves it); ``obfuscate`` (weight of the learned adversarial obfuscation); ``bottom`` (client bottom
    blocks, 0: the grid's ``--bottom-layers``).
    """

    key: str
    label: str
    design: str  # local | online | gradfree | offline
    family: str
    codec: str = "fp32"
    dcor: float = 0.0
    noise_scale: float = 0.0
    dp_epsilon: float = 0.0
    dx_epsilon: float = 0.0
    dx_selective: bool = False
    dx_digits: bool = False  # with dx_selective: digits leave the keep list (dates, account numbers get full noise)
    preset: str = ""
    obfuscate: float = 0.0
    bottom: int = 0
    top_blocks_lr: float = 0.0  # > 0: the client's top blocks train in full at this lr beside LoRA (more capacity)
    pseudonym: bool = False  # the client pseudonymises the task's categorical fields with a secret key

    @property
    def split(self) -> bool:
        return self.design in ("online", "gradfree")

    def noise(self) -> dict[str, Any]:
        """The plain noise of the row (``noise:<sigma>``); rows whose noise depends on the task and recipe (dp, dx,
        presets) are resolved by :func:`_row_noise`."""
        return {"kind": "gaussian", "scale": self.noise_scale} if self.noise_scale > 0 else {}

    def defence(self) -> str:
        if self.design == "local":
            return "none (reference: no split, no wire)"
        if self.design == "offline":
            return "emulator (no per-step exchange)"
        bits = []
        if self.preset:
            bits.append(f"--privacy {self.preset}")
        if self.dcor:
            bits.append(f"dCor alpha {self.dcor:g}")
        if self.noise_scale:
            bits.append(f"Gaussian noise sigma {self.noise_scale:g} on h1")
        if self.dp_epsilon:
            bits.append(f"clipped Gaussian, epsilon {self.dp_epsilon:g} over the run")
        if self.dx_epsilon:
            on = "rare and digit" if self.dx_digits else ("rare" if self.dx_selective else "all")
            bits.append(f"dx epsilon {self.dx_epsilon:g} on {on} input tokens")
        if self.obfuscate:
            bits.append(f"learned obfuscation weight {self.obfuscate:g}")
        if self.bottom:
            bits.append(f"{self.bottom} client bottom block{'s' if self.bottom > 1 else ''}")
        if self.top_blocks_lr:
            bits.append(f"top blocks trained in full (lr {self.top_blocks_lr:g})")
        if self.pseudonym:
            bits.append("task fields pseudonymised with a client key")
        if self.codec != "fp32":
            bits.append(f"{self.codec} codec")
        if self.design == "gradfree":
            bits.append("frozen bottom, no gradients")
        return ", ".join(bits) if bits else "none"


_FIXED: dict[str, RowDef] = {
    r.key: r
    for r in (
        RowDef("local", "Local LoRA", "local", "reference"),
        RowDef("online", "Online, no defence", "online", "none"),
        RowDef("dcor_weak", "Online + dCor 0.5", "online", "dcor", dcor=0.5),
        RowDef("dcor_strong", "Online + dCor 4", "online", "dcor", dcor=4.0),
        RowDef("int8", "Online, int8", "online", "codec", codec="int8"),
        RowDef("nf4", "Online, nf4", "online", "codec", codec="nf4"),
        RowDef("noise", "Online + noise 2", "online", "noise", noise_scale=2.0),
        RowDef("gradfree", "Gradfree", "gradfree", "design"),
        RowDef("gradfree_nf4", "Gradfree, nf4", "gradfree", "design", codec="nf4"),
        RowDef("offline", "Offline (emulator)", "offline", "design"),
    )
}
#: The headline grid, every row at every seed: no defence, the best measured points of the defences that keep the
#: task, Gradfree plain and with its top blocks trained, Offline, and Local LoRA (the reference of every utility
#: loss). The defended points: ``--privacy balanced`` (token-selective dchi) for Online and, with the top blocks
#: trained, for Gradfree; field-aware dchi (``--privacy fields``) with the top blocks trained, for Gradfree;
#: and, for both designs, the same with the task's categorical fields pseudonymised (``--pseudonymize``), the best
#: measured point of each. Online's field-aware row without pseudonyms stays a sweep point. Chosen from
#: the seed-0 frontier of docs/results/frontier.md: every point of the other families measured there (learned
#: obfuscation, dchi on all tokens, dCor, cut depth, formal DP noise) loses the task or is read back by the
#: adaptive attacker, so three seeds would only narrow the CI of a row no one would deploy; they stay in the grid
#: as :data:`SWEEP_ROWS`.
HEADLINE_ROWS: tuple[str, ...] = (
    "local",
    "online",
    "preset:balanced",
    "gradfree",
    "gf:topblocks:5e-4",
    "gf:preset:balanced+topblocks:5e-4",
    "gf:dxfield:30+topblocks:5e-4",
    "gf:pseudo:task+dxfield:30+topblocks:5e-4",
    "pseudo:task+dxfield:30+topblocks:5e-4",
    "offline",
)
#: Points of every family, measured on the first seed only (``--sweep-rows default``): the frontier's shape, not
#: its headline. Online with field-aware dchi and its top blocks; Online with its top blocks and no defence (the
#: reference of the field-aware Online rows); learned obfuscation at four weights; dchi on every input token, and
#: field-aware on Online's top LoRA; cut depth at 1, 4 and 8 client bottom blocks (2 is the grid's own); dCor at
#: four weights; ``--privacy balanced`` on plain Gradfree; Gradfree's field-aware dchi at epsilon 10; formal DP noise over the whole run at epsilon 8 (``preset:strong``, Online) and
#: at 1e3, 1e5 and 1e7 on Gradfree with its top blocks.
SWEEP_ROWS: tuple[str, ...] = (
    "dxfield:30+topblocks:5e-4",
    "topblocks:5e-4",
    "obf:1",
    "obf:0.5",
    "obf:0.3",
    "obf:0.1",
    "dx:50",
    "dxfield:30",
    "depth:1",
    "depth:4",
    "depth:8",
    "dcor_weak",
    "dcor:1",
    "dcor:2",
    "dcor_strong",
    "gf:preset:balanced",
    "gf:dxfield:10+topblocks:5e-4",
    "preset:strong",
    "gf:dp:1000+topblocks:5e-4",
    "gf:dp:100000+topblocks:5e-4",
    "gf:dp:10000000+topblocks:5e-4",
)
#: ``--fast`` (tiny random model): one row of each mechanism the attacker replays (dCor bottoms, codec, noise), the
#: three designs, and one sweep row, so the CI test covers every path of the grid in a couple of minutes.
FAST_ROWS: tuple[str, ...] = ("local", "online", "dcor_strong", "int8", "noise", "gradfree", "offline")
FAST_SWEEP_ROWS: tuple[str, ...] = ("gf:topblocks:5e-4",)
ROW_HELP = (
    "local, online, dcor_weak, dcor_strong, int8, nf4, noise, gradfree, gradfree_nf4, offline, or settings "
    "joined by '+': dcor:<alpha>, noise:<sigma>, dp:<epsilon>, dx:<epsilon>, dxtok:<epsilon> (rare tokens only), "
    "dxfield:<epsilon> (rare tokens and every digit), "
    "obf:<weight>, depth:<bottom blocks>, preset:<balanced|strong>, codec:<fp16|bf16|int8|nf4|...>, "
    "topblocks:<lr> (the top blocks trained in full beside LoRA), pseudo:task (the task's categorical fields "
    "pseudonymised with a client key); prefix gf: "
    "for Gradfree (gradfree:<codec> is gf:codec:<codec>), e.g. obf:1+dxtok:30 or gf:dp:8"
)

_SETTING_FAMILY = {
    "dcor": "dcor",
    "noise": "noise",
    "dp": "dp",
    "dx": "dx",
    "dxtok": "dx",
    "dxfield": "dx",
    "obf": "obfuscation",
    "depth": "depth",
    "preset": "preset",
    "codec": "codec",
    "topblocks": "capacity",
    "pseudo": "pseudonym",
}


def _setting(key: str, piece: str) -> dict[str, Any]:
    """The RowDef fields of one ``kind:arg`` piece of row ``key``."""
    kind, _, arg = piece.partition(":")
    if kind not in _SETTING_FAMILY or not arg:
        raise ConfigError(f"unknown row {key!r}; choose from {ROW_HELP}")
    if kind == "codec":
        from guardedp2p.wire.handshake import FLOAT_CODECS

        if arg not in FLOAT_CODECS:
            raise ConfigError(f"row {key!r}: unknown codec {arg!r}; use one of {', '.join(FLOAT_CODECS)}")
        return {"codec": arg}
    if kind == "pseudo":
        if arg != "task":
            raise ConfigError(f"row {key!r}: pseudo takes 'task' (the task's categorical fields), e.g. pseudo:task")
        return {"pseudonym": True}
    if kind == "preset":
        from guardedp2p.privacy.presets import PRESETS

        if arg not in PRESETS:
            raise ConfigError(f"row {key!r}: unknown preset {arg!r}; use one of {', '.join(PRESETS)}")
        return {"preset": "" if arg == "off" else arg}
    try:
        value = float(arg)
        if not math.isfinite(value) or value < 0 or (value == 0 and kind != "dcor"):
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"row {key!r}: {kind} needs a positive number (dcor: non-negative), e.g. {kind}:0.5"
        ) from None
    if kind == "depth":
        if value != int(value):
            raise ConfigError(f"row {key!r}: depth is a whole number of blocks, e.g. depth:4")
        return {"bottom": int(value)}
    field_of = {
        "dcor": "dcor",
        "noise": "noise_scale",
        "dp": "dp_epsilon",
        "dx": "dx_epsilon",
        "obf": "obfuscate",
        "topblocks": "top_blocks_lr",
    }
    if kind == "dxtok":
        return {"dx_epsilon": value, "dx_selective": True}
    if kind == "dxfield":
        return {"dx_epsilon": value, "dx_selective": True, "dx_digits": True}
    return {field_of[kind]: value}


def _label(design: str, pieces: Sequence[str]) -> str:
    names = {
        "dcor": "dCor {}",
        "noise": "noise {}",
        "dp": "DP eps {}",
        "dx": "dx eps {}",
        "dxtok": "dx eps {} (rare tokens)",
        "dxfield": "dx eps {} (rare tokens, digits)",
        "obf": "obfuscation {}",
        "depth": "bottom {} blocks",
        "preset": "--privacy {}",
        "codec": "{}",
        "topblocks": "top blocks lr {}",
        "pseudo": "pseudonymised fields",
    }
    bits = []
    for p in pieces:
        kind, _, arg = p.partition(":")
        bits.append(names[kind].format(arg) if "{}" in names[kind] else names[kind])
    head = "Online" if design == "online" else "Gradfree"
    return f"{head} + " + " + ".join(bits) if bits else head


def parse_row(key: str) -> RowDef:
    """A row by name, or settings joined by ``+`` (``dcor:2``, ``dp:8``, ``obf:1+dxtok:30``, ``gf:dx:40``)."""
    key = key.strip()
    if key in _FIXED:
        return _FIXED[key]
    rest, design = key, "online"
    if rest.startswith("gf:"):
        rest, design = rest[3:], "gradfree"
    elif rest.startswith("gradfree:"):  # the older spelling of a Gradfree codec row
        rest, design = "codec:" + rest.removeprefix("gradfree:"), "gradfree"
    pieces = [p.strip() for p in rest.split("+") if p.strip()]
    if not pieces:
        raise ConfigError(f"unknown row {key!r}; choose from {ROW_HELP}")
    fields_: dict[str, Any] = {}
    for p in pieces:
        f = _setting(key, p)
        clash = set(f) & set(fields_)
        if clash:
            raise ConfigError(f"row {key!r} sets {', '.join(sorted(clash))} twice")
        fields_.update(f)
    noises = [k for k in ("noise_scale", "dp_epsilon", "dx_epsilon", "preset") if fields_.get(k)]
    if len(noises) > 1:
        raise ConfigError(f"row {key!r} combines two noise mechanisms ({', '.join(noises)}); a run has one")
    if design == "gradfree" and (fields_.get("dcor") or fields_.get("obfuscate")):
        raise ConfigError(f"row {key!r}: dCor and obfuscation train the bottom, which Gradfree freezes")
    families = {_SETTING_FAMILY[p.partition(":")[0]] for p in pieces}
    family = families.pop() if len(families) == 1 else "combined"
    if design == "gradfree" and family == "codec":
        family = "design"
    return RowDef(key, _label(design, pieces), design, family, **fields_)


# ============================================================================ config
@dataclass
class FrontierConfig:
    """Everything the frontier depends on. ``None`` recipe fields take the task's recipe
    (:class:`guardedp2p.evaluate.tasks.Recipe`).

    eval_items / nll_records: held-out multiple-choice items and NLL records scored per run (None: all).
    attack_steps / attack_sequences: training steps taken from each run's transcript (evenly spread from the
    first to the last step) and the number of distinct sequences attacked per run.
    results: where frontier.json / .md / .png go; out: the work and cache folder.
    strict: raise :class:`HarnessBroken` (CLI: exit code 3) when the sanity gate fails or cannot run.
    """

    model: str = "default"
    task: str = "hidden_rules"
    rows: tuple[str, ...] = HEADLINE_ROWS
    seeds: tuple[int, ...] = (0, 1, 2)
    sweep_rows: tuple[str, ...] = ()  # measured on the first seed only (a family's shape, not a headline number)
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    max_length: int | None = None
    eval_items: int | None = 256
    nll_records: int | None = 64
    attack_steps: int = 16
    attack_sequences: int = 64
    attacks: tuple[str, ...] = ("sip_adaptive", "template")  # template: the format prior, an attack anyone can make
    bottom_layers: int = 2
    top_layers: int = 2
    lora_r: int = 8
    lora_alpha: int = 16
    adaptive: Any = None  # AdaptiveConfig; None: its defaults
    out: str = "runs/frontier"
    results: str = "docs/results"
    device: str = "cpu"
    progress: bool = True
    strict: bool = False
    protocol_eval: bool = False  # also run the protocol's own evaluation (a cross-check of the per-item scores)
    runs_only: bool = False  # fill the cache with the training runs and stop (no attack, no report): split work
    keep_transcripts: bool = False
    command: str = ""
    fast: bool = False
    carry: str | None = None  # an earlier frontier.json: rows whose runs are gone from the cache are carried from it

    def validate(self) -> None:
        for r in (*self.rows, *self.sweep_rows):
            parse_row(r)
        if not self.rows:
            raise ConfigError("no row to run")
        if not self.seeds:
            raise ConfigError("give at least one training seed")
        if self.attack_steps < 1 or self.attack_sequences < 1:
            raise ConfigError("--attack-steps and --attack-sequences must be >= 1")
        bad = [a for a in self.attacks if a not in ATTACKS]
        if bad:
            raise ConfigError(f"unknown attack(s) {', '.join(bad)}; choose from {', '.join(ATTACKS)}")
        if not self.attacks:
            raise ConfigError("give at least one attack")

    def row_defs(self) -> list[RowDef]:
        defs = [parse_row(r) for r in (*self.rows, *self.sweep_rows)]
        keys = [d.key for d in defs]
        if "local" not in keys:  # the reference of every utility loss
            defs.insert(0, _FIXED["local"])
        seen: set[str] = set()
        return [d for d in defs if not (d.key in seen or seen.add(d.key))]  # type: ignore[func-returns-value]

    def seeds_for(self, row: RowDef) -> tuple[int, ...]:
        """Every seed for a headline row (and Local LoRA, the reference); the first seed for a sweep row."""
        headline = {parse_row(r).key for r in self.rows} | {"local"}
        return self.seeds if row.key in headline else self.seeds[:1]


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _adaptive_config(cfg: FrontierConfig) -> Any:
    from guardedp2p.attacks.adaptive import AdaptiveConfig

    return cfg.adaptive if cfg.adaptive is not None else AdaptiveConfig()


# ============================================================================ progress
class _Bar:
    """One rich progress bar on a terminal, plain lines elsewhere (CI logs), nothing when disabled."""

    def __init__(self, enabled: bool, description: str, total: int) -> None:
        self.enabled, self.description, self.total = enabled, description, max(1, total)
        self._p: Any = None
        self._task: Any = None
        self._last = 0.0
        self._t0 = time.perf_counter()

    def __enter__(self) -> _Bar:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            console = Console(stderr=True)
            if console.is_terminal:
                self._p = Progress(
                    TextColumn("  {task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    console=console,
                    transient=True,
                )
                self._p.__enter__()
                self._task = self._p.add_task(self.description, total=self.total)
        return self

    def update(self, done: int, note: str = "", total: int | None = None) -> None:
        if not self.enabled:
            return
        if total:
            self.total = total
        desc = f"{self.description} {note}".strip()
        if self._p is not None:
            self._p.update(self._task, completed=done, total=self.total, description=desc)
            return
        now = time.perf_counter()
        if now - self._last >= 10 or done >= self.total:
            self._last = now
            print(f"  [{now - self._t0:7.1f}s] {desc}: {done}/{self.total}", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)


# ============================================================================ cache
class _Cache:
    """JSON (and safetensors) files under ``<out>/cache/<kind>/<key>``, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, kind: str, key: str, suffix: str = ".json") -> Path:
        return self.root / kind / f"{key}{suffix}"

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        p = self.path(kind, key)
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def put(self, kind: str, key: str, value: dict[str, Any]) -> None:
        p = self.path(kind, key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(value, default=_json_default))
        tmp.replace(p)

    def put_tensors(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> Path:
        from safetensors.torch import save_file

        p = self.path(kind, key, ".safetensors")
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(p)
        return p

    def get_tensors(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        p = self.path(kind, key, ".safetensors")
        return load_file(str(p)) if p.is_file() else None

    def claim(self, kind: str, key: str) -> bool:
        """Claim one unit for this process (``--runs-only`` workers sharing a grid): False when a live process on
        this machine holds it. A claim left by a process that died is taken over, so a cut-off worker never blocks
        the grid."""
        p = self.claim_path(kind, key)
        p.parent.mkdir(parents=True, exist_ok=True)
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    host, pid = p.read_text().split()
                except (OSError, ValueError):
                    return False  # being written this instant: another worker got there first
                if host != socket.gethostname() or _alive(int(pid)):
                    return False
                p.unlink(missing_ok=True)  # its holder died: take it over
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me)
            return True
        return False

    def release(self, kind: str, key: str) -> None:
        self.claim_path(kind, key).unlink(missing_ok=True)

    def claim_path(self, kind: str, key: str) -> Path:
        return self.path("claims", f"{kind}-{key}", ".claim")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


# ============================================================================ context
@dataclass
class _Ctx:
    cfg: FrontierConfig
    task: Any
    base: Any
    tok: Any
    cache: _Cache
    work: Path
    console: Any
    recipe: Any
    eval_items: list[dict[str, Any]] = field(default_factory=list)
    nll_records: list[dict[str, Any]] = field(default_factory=list)
    secrets_index: dict[str, dict[str, str]] = field(default_factory=dict)
    attackers: dict[str, Any] = field(default_factory=dict)
    public: list[list[int]] | None = None  # token ids of the public (aux) records: keep lists, obfuscation
    n_train: int = 0
    template: list[int] | None = None  # the format prior's guess (token ids)
    pseudo: dict[int, _PseudoTask] = field(default_factory=dict)  # per seed: the task as a pseudonymising client has it
    pseudo_prior: dict[str, Any] | None = None  # field value counts in the aux records (the attacker's knowledge)


@dataclass
class _PseudoTask:
    """The task as a client that pseudonymises its categorical fields holds it: its key's coder, the encoded
    training and evaluation files it tunes on, and the encoded items and NLL records it is scored on."""

    coder: Any  # guardedp2p.privacy.pseudonym.FieldPseudonymizer
    train: str
    eval_mc: str
    eval_items: list[dict[str, Any]]
    nll_records: list[dict[str, Any]]


def escape(text: str) -> str:
    from rich.markup import escape as _escape

    return _escape(text)


def _say(ctx: _Ctx, text: str) -> None:
    if ctx.console is not None:
        ctx.console.print(text, highlight=False)
    log.info(text)


def _device(name: str) -> torch.device:
    from guardedp2p.engine.device import pick_device

    return pick_device(name)


def _bottom(ctx: _Ctx, row: RowDef) -> int:
    return row.bottom or ctx.cfg.bottom_layers


def _public_ids(ctx: _Ctx) -> list[list[int]]:
    """The auxiliary (public, other people's) records as token ids: what the client may use as public text in the
    task's style (the keep list of token-selective dχ, the learned obfuscation's inverter) and what the attacker
    holds anyway."""
    if ctx.public is None:
        from guardedp2p.attacks.adaptive import encode_records_for_attack

        ctx.public = encode_records_for_attack(ctx.task.aux, ctx.tok, ctx.recipe.max_length)
    return ctx.public


def _public_file(ctx: _Ctx) -> Path:
    """The public records as a JSONL file (the form ``--obfuscate-public`` takes)."""
    path = ctx.work / "public_aux.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in ctx.task.aux), encoding="utf-8")
        tmp.replace(path)
    return path


def _pseudo_task(ctx: _Ctx, row: RowDef, seed: int) -> _PseudoTask | None:
    """``row``'s client pseudonymises the task's categorical fields (:mod:`guardedp2p.privacy.pseudonym`) with a key
    of its own, derived here from the seed so runs are reproducible; the attacker is never given it."""
    if not row.pseudonym:
        return None
    if seed in ctx.pseudo:
        return ctx.pseudo[seed]
    from guardedp2p.data.hidden_rules import categorical_fields
    from guardedp2p.data.loaders import load_records
    from guardedp2p.privacy.pseudonym import FieldPseudonymizer, PseudonymSchema

    if ctx.task.name != "hidden_rules":
        raise ConfigError(f"row {row.key!r}: pseudo:task needs the hidden_rules task, not {ctx.task.name!r}")
    key = hashlib.sha256(f"guardedp2p frontier pseudonym key, seed {seed}".encode()).digest()
    coder = FieldPseudonymizer(PseudonymSchema.from_mapping(categorical_fields()), key)
    folder = ctx.work / "pseudo" / f"{ctx.task.digest}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)

    def write(name: str, recs: list[dict[str, Any]]) -> str:
        path = folder / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
        tmp.replace(path)
        return str(path)

    train = write("train.jsonl", [coder.encode_record(r) for r in ctx.task.train_records()])
    all_items = [coder.encode_mc_item(i) for i in load_records(ctx.task.eval_mc)]
    eval_mc = write("eval_mc.jsonl", all_items)
    items = [coder.encode_mc_item(i) for i in ctx.eval_items]
    nll = [coder.encode_record(r) for r in ctx.nll_records]
    ctx.pseudo[seed] = _PseudoTask(coder, train, eval_mc, items, nll)
    return ctx.pseudo[seed]


def _row_noise(ctx: _Ctx, row: RowDef) -> dict[str, Any]:
    """The ``TuneOptions.noise`` of ``row`` on this task and recipe (presets and ε-calibrated noise depend on the
    run's shape, token-selective dχ on the public records)."""
    from guardedp2p.privacy.presets import (
        RunShape,
        formal_gaussian_noise,
        resolve_preset,
    )

    if not (row.preset or row.dp_epsilon or row.dx_epsilon):
        return row.noise()
    if not ctx.n_train:
        ctx.n_train = len(ctx.task.train_records())
    r = ctx.recipe
    # Gradfree's trunk-output cache is on in the frontier's runs as in the CLI's: each record's activation is sent
    # once, and the calibration counts that (guardedp2p/designs/gradfree/run.py)
    shape = RunShape(row.design, r.steps, r.batch_size, ctx.n_train, 1, r.max_length, cached=row.design == "gradfree")
    if row.preset:
        from guardedp2p.privacy.presets import preset_digit_ids

        digits = preset_digit_ids(row.preset, ctx.tok)
        noise = dict(resolve_preset(row.preset, shape=shape, public_ids=_public_ids(ctx), digit_ids=digits).noise)
    elif row.dp_epsilon:
        noise = formal_gaussian_noise(row.dp_epsilon, shape)[0]
    else:
        from guardedp2p.privacy.noise import digit_token_ids
        from guardedp2p.privacy.presets import selective_dx

        exclude = digit_token_ids(ctx.tok) if row.dx_digits else []
        noise = selective_dx(row.dx_epsilon, _public_ids(ctx) if row.dx_selective else None, exclude=exclude)
    if "keep_ids" in noise:
        noise["keep_ids"] = tuple(int(i) for i in noise["keep_ids"])
    return noise


def _obfuscation(ctx: _Ctx, row: RowDef, seed: int) -> Any:
    if not row.obfuscate:
        return None
    from guardedp2p.privacy.obfuscation import ObfuscationConfig

    return ObfuscationConfig(
        weight=row.obfuscate, public_text=str(_public_file(ctx)), max_length=ctx.recipe.max_length, seed=seed
    )


def _train_config(ctx: _Ctx, seed: int, dcor: float = 0.0, top_blocks_lr: float = 0.0) -> Any:
    from guardedp2p.train.config import TrainConfig

    r = ctx.recipe
    return TrainConfig(
        steps=r.steps,
        batch_size=r.batch_size,
        lr=r.lr,
        max_length=r.max_length,
        seed=seed,
        warmup_steps=min(5, max(0, r.steps // 5)),
        checkpoint_every=0,
        dcor_alpha=dcor,
        lora_r=ctx.cfg.lora_r,
        lora_alpha=ctx.cfg.lora_alpha,
        top_train="blocks" if top_blocks_lr else "lora",
        top_lr=top_blocks_lr or None,
    )


def _tune_options(ctx: _Ctx, row: RowDef, seed: int, run_dir: Path) -> Any:
    from guardedp2p.service.client import TuneOptions
    from guardedp2p.wire.handshake import CODEC_DIRECTIONS

    cfg = ctx.cfg
    pseudo = _pseudo_task(ctx, row, seed)
    return TuneOptions(
        protocol=row.design if row.split else "online",
        model=cfg.model,
        data=pseudo.train if pseudo else ctx.task.train,
        eval_data=pseudo.eval_mc if pseudo else ctx.task.eval_mc,
        out=str(run_dir / "run"),
        train=_train_config(ctx, seed, row.dcor, row.top_blocks_lr),
        bottom_layers=_bottom(ctx, row),
        top_layers=cfg.top_layers,
        codecs={d: row.codec for d in CODEC_DIRECTIONS},
        noise=_row_noise(ctx, row),
        obfuscation=_obfuscation(ctx, row, seed),
        micro_batches=1,  # the frontier measures utility and privacy; pipelining changes neither
        device=cfg.device,
        eval_max_items=cfg.eval_items,
        skip_eval=not cfg.protocol_eval,
        progress=cfg.progress,
        retries=0,
    )


def _row_identity(row: RowDef) -> dict[str, Any]:
    """What makes a row's runs differ: its fields that are not at their defaults (so adding a field with a default
    keeps every cached run valid), never its name or label."""
    return {
        f.name: getattr(row, f.name)
        for f in fields(row)
        if f.name not in ("key", "label") and getattr(row, f.name) != f.default
    }


def _run_key(ctx: _Ctx, row: RowDef, seed: int) -> str:
    cfg = ctx.cfg
    return _hash(
        {
            "v": FRONTIER_VERSION,
            "row": _row_identity(row),
            "seed": seed,
            "recipe": asdict(ctx.recipe),
            "split": [cfg.bottom_layers, cfg.top_layers],
            "lora": [cfg.lora_r, cfg.lora_alpha],
            "task": ctx.task.digest,
            "model": cfg.model,
            "eval_items": cfg.eval_items,
            "nll_records": cfg.nll_records,
            "attack_steps": cfg.attack_steps,
            "attack_sequences": cfg.attack_sequences,
            "protocol_eval": cfg.protocol_eval,
        }
    )


# ============================================================================ utility of one tuned model
def _score_utility(
    ctx: _Ctx,
    model: torch.nn.Module,
    up: Any = None,
    down: Any = None,
    *,
    noise: dict[str, Any] | None = None,
    bottom: int | None = None,
    pseudo: _PseudoTask | None = None,
) -> dict[str, Any]:
    """Per-item scores of ``model`` with the run's mechanisms at the cuts (``up``/``down``) and on the input
    embeddings (dχ ``noise``): the utility the client gets when it uses what it tuned over the same protection
    (and, for a pseudonymising client, on its items encoded with its key, as it would query)."""
    from guardedp2p.evaluate.utility import cut_hooks, input_noise, mc_item_scores, record_field_nll

    cfg = ctx.cfg
    eval_items = pseudo.eval_items if pseudo else ctx.eval_items
    nll_records = pseudo.nll_records if pseudo else ctx.nll_records
    with cut_hooks(model, bottom or cfg.bottom_layers, cfg.top_layers, up, down), input_noise(model, noise):
        with _Bar(cfg.progress, "utility: multiple-choice items", len(eval_items)) as bar:
            items = mc_item_scores(model, ctx.tok, eval_items, max_length=ctx.recipe.max_length, progress=bar.update)
        nll = (
            record_field_nll(model, ctx.tok, nll_records, max_length=ctx.recipe.max_length)
            if nll_records
            else np.array([])
        )
    return {
        "acc": items.acc,
        "correct": items.correct.tolist(),
        "answer_nll": [round(float(x), 5) for x in items.answer_nll],
        "field_nll": [round(float(x), 5) for x in nll],
        "pred": items.pred,
    }


# ============================================================================ one run of one row and seed
def _choose_steps(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (first and last included), distinct."""
    if n <= k:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, k)})


def _run_split(ctx: _Ctx, row: RowDef, seed: int, key: str) -> dict[str, Any]:
    from guardedp2p.attacks.transcript import load_transcript
    from guardedp2p.evaluate.grid import ClientTruth, EvaluationError, TappedChannel
    from guardedp2p.evaluate.utility import cut_transforms
    from guardedp2p.service.client import prepare_client, tune
    from guardedp2p.service.provider import ProviderOptions, build_provider_app
    from guardedp2p.transport.inproc import InProcClientChannel

    cfg = ctx.cfg
    run_dir = ctx.work / "runs" / f"{row.key}-seed{seed}"
    record_dir = run_dir / "transcript"
    shutil.rmtree(record_dir, ignore_errors=True)  # a partial transcript of an interrupted run
    app = build_provider_app(
        ProviderOptions(
            model=cfg.model,
            bottom_layers=_bottom(ctx, row),
            top_layers=cfg.top_layers,
            protocols=(row.design,),
            record_dir=str(record_dir),
            device=cfg.device,
        ),
        model=copy.deepcopy(ctx.base),
    )
    opts = _tune_options(ctx, row, seed, run_dir)
    tuned = copy.deepcopy(
        ctx.base
    )  # LoRA patches this model's client blocks in place: after tune() it is the client's model
    client = prepare_client(opts, model=tuned, tokenizer=ctx.tok)
    truth = ClientTruth(client.top)

    provider = {"app": app}  # dropped after the run: the provider's copy of the model is then freed

    def connect() -> Any:
        return TappedChannel(InProcClientChannel(provider["app"]), truth)

    handle = client.bottom.register_forward_hook(truth.on_bottom, with_kwargs=True)
    # our own bar, fed by the client's outgoing training messages: tune()'s rich bar shows nothing off a terminal
    opts.progress = False
    try:
        with _Bar(cfg.progress, f"{row.label} tuning (seed {seed})", ctx.recipe.steps) as bar:
            truth.on_train_step = bar.update
            summary = tune(opts, connect, client=client, console=None)
    finally:
        handle.remove()
    del client, app
    provider.clear()
    noise = _row_noise(ctx, row)
    up, down = cut_transforms(row.codec, row.codec, noise, device=_device(cfg.device))
    utility = _score_utility(
        ctx, tuned, up, down, noise=noise, bottom=_bottom(ctx, row), pseudo=_pseudo_task(ctx, row, seed)
    )
    del tuned
    if cfg.protocol_eval:
        utility["protocol_acc"] = summary.get("eval_after")

    # ---- what the provider saw: observations of training steps spread over the run
    observed = {o.key: o for o in load_transcript(record_dir)}
    train_obs = [observed[k] for k in truth.train_keys if k in observed]
    n_steps = max(cfg.attack_steps, math.ceil(cfg.attack_sequences / max(1, ctx.recipe.batch_size)))
    chosen = [train_obs[i] for i in _choose_steps(len(train_obs), n_steps)]
    tensors: dict[str, torch.Tensor] = {}
    steps: list[int] = []
    seen: set[tuple[int, ...]] = set()
    n_seq = 0
    for o in chosen:
        if not torch.equal(truth.masks[o.key], o.mask.to(torch.long)):
            raise EvaluationError(
                f"client-side ground truth of {o.key} does not line up with the provider's observation"
            )
        if o.h1 is None:
            raise EvaluationError(f"the transcript holds no h1 for {o.key}")
        ids = truth.ids[o.key]
        keep = []
        for b in range(ids.shape[0]):
            sig = tuple(int(t) for t, m in zip(ids[b].tolist(), o.mask[b].tolist()) if m)
            if sig not in seen:
                seen.add(sig)
                keep.append(b)
        if not keep:
            continue
        i = len(steps)
        tensors[f"h1_{i}"] = o.h1[keep].float()
        tensors[f"mask_{i}"] = o.mask[keep].to(torch.long)
        tensors[f"ids_{i}"] = ids[keep].to(torch.long)
        steps.append(int(o.step))
        n_seq += len(keep)
    ctx.cache.put_tensors("observations", key, tensors)
    if not cfg.keep_transcripts:
        shutil.rmtree(record_dir, ignore_errors=True)
    n = max(1, summary["steps"])
    ts = summary.get("time_split") or {}
    return {
        "utility": utility,
        "cost": {
            "bytes_per_step": summary["bytes_per_step"],
            "bytes_up_per_step": summary["train_bytes_up"] / n,
            "bytes_down_per_step": summary["train_bytes_down"] / n,
            "gradient_bytes": summary["gradient_bytes"],
            "one_off_bytes": 0,
            "train_s": summary["train_s"],
            "client_s_per_step": ts.get("client_compute_s", summary["train_s"]) / n,
        },
        "observations": {"steps": steps, "sequences": n_seq, "train_steps": len(train_obs), "recorded": len(observed)},
        "run": {
            "steps": summary["steps"],
            "loss_first": summary["loss_first"],
            "loss_last": summary["loss_last"],
            "wall_s": summary["wall_s"],
        },
    }


def _run_local(ctx: _Ctx, row: RowDef, seed: int, key: str) -> dict[str, Any]:
    """Local LoRA: the client's own parts and LoRA, the pre-trained trunk run locally; the same batches and init."""
    from guardedp2p.data.collate import BatchIterator
    from guardedp2p.engine.split import ProviderTrunk, SplitConfig, loss_fn
    from guardedp2p.service.client import prepare_client, prepare_data
    from guardedp2p.train.trainer import SplitTrainer

    cfg = ctx.cfg
    opts = _tune_options(ctx, row, seed, ctx.work / "runs" / f"{row.key}-seed{seed}")
    tuned = copy.deepcopy(ctx.base)
    client = prepare_client(opts, model=tuned, tokenizer=ctx.tok)
    trunk = ProviderTrunk(tuned, SplitConfig(cfg.bottom_layers, cfg.top_layers))

    def trunk_fn(h1: torch.Tensor, mask: torch.Tensor, *, train: bool, input_ids: torch.Tensor) -> torch.Tensor:
        return trunk(h1, mask)

    trainer = SplitTrainer(client.bottom, client.top, trunk_fn, opts.train, loss_fn=loss_fn, train_bottom=True)
    data = prepare_data(opts, ctx.tok)
    it = BatchIterator(data.train_examples, opts.train.batch_size, seed=opts.train.seed, pad_id=ctx.tok.pad_token_id)
    t0 = time.perf_counter()
    losses = []
    with _Bar(cfg.progress, "local LoRA tuning", opts.train.steps) as bar:
        while trainer.step < opts.train.steps:
            res = trainer.train_step([next(it)])
            losses.append(res.task_loss)
            bar.update(trainer.step, f"loss {res.task_loss:.3f}")
    train_s = time.perf_counter() - t0
    del client, trainer
    utility = _score_utility(ctx, tuned)
    n = max(1, len(losses))
    return {
        "utility": utility,
        "cost": {
            "bytes_per_step": 0.0,
            "bytes_up_per_step": 0.0,
            "bytes_down_per_step": 0.0,
            "gradient_bytes": 0,
            "one_off_bytes": 0,
            "train_s": round(train_s, 3),
            "client_s_per_step": train_s / n,
        },
        "run": {
            "steps": len(losses),
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
        },
    }


def _run_offline(ctx: _Ctx, row: RowDef, seed: int, key: str) -> dict[str, Any]:
    """Offline: build and sign an emulator, download it, tune on it, upload, plug into the full model."""
    from guardedp2p.crypto.keys import generate_keypair
    from guardedp2p.designs.offline.build import EmulatorBuildOptions, build_emulator_folder
    from guardedp2p.designs.offline.emulator import EmulatorConfig
    from guardedp2p.designs.offline.plugin import plug_in
    from guardedp2p.designs.offline.run import OfflineOptions, tune_offline
    from guardedp2p.service.provider import ProviderOptions, build_provider_app
    from guardedp2p.transport.inproc import InProcClientChannel

    cfg = ctx.cfg
    run_dir = ctx.work / "runs" / f"{row.key}-seed{seed}"
    keys = ctx.work / "keys"
    for name in ("provider", "client"):
        if not (keys / f"{name}.sign.key").exists():
            generate_keypair(keys, name)
    emu_dir = ctx.work / "emulator"
    if not (emu_dir / "manifest.json").exists():  # the provider builds one emulator and serves it to every client
        shutil.rmtree(emu_dir, ignore_errors=True)
        build_emulator_folder(
            EmulatorBuildOptions(
                model=cfg.model,
                out=str(emu_dir),
                keys=str(keys),
                key_name="provider",
                device=cfg.device,
                progress=False,
                emulator=EmulatorConfig(bottom_layers=cfg.bottom_layers, top_layers=cfg.top_layers),
            ),
            model=ctx.base,
            tokenizer=ctx.tok,
        )
    app = build_provider_app(
        ProviderOptions(
            model=cfg.model,
            bottom_layers=cfg.bottom_layers,
            top_layers=cfg.top_layers,
            protocols=("offline",),
            emulator_dir=str(emu_dir),
            device=cfg.device,
        ),
        model=copy.deepcopy(ctx.base),
    )
    app.resources.upload_dir = str(run_dir / "uploads")
    app.resources.client_verify_keys = [keys / "client.sign.pub"]
    opts = replace(_tune_options(ctx, row, seed, run_dir), protocol="offline", skip_eval=True)
    off = OfflineOptions(
        provider_verify_key=keys / "provider.sign.pub", client_keys=str(keys), client_key_name="client", baselines=False
    )
    summary = tune_offline(opts, partial(InProcClientChannel, app), console=None, offline=off, base_tokenizer=ctx.tok)
    del app
    plugged = plug_in(copy.deepcopy(ctx.base), summary["bundle_dir"], keys / "client.sign.pub")
    utility = _score_utility(ctx, plugged.model)
    del plugged
    n = max(1, summary["steps"])
    return {
        "utility": utility,
        "cost": {
            "bytes_per_step": 0.0,
            "bytes_up_per_step": 0.0,
            "bytes_down_per_step": 0.0,
            "gradient_bytes": 0,
            "one_off_bytes": int(summary["bytes_up"] + summary["bytes_down"]),
            "train_s": summary["train_s"],
            "client_s_per_step": summary["train_s"] / n,
        },
        "ip": {"fraction": summary.get("param_fraction")},
        "run": {
            "steps": summary["steps"],
            "loss_first": summary["loss_first"],
            "loss_last": summary["loss_last"],
            "wall_s": summary["wall_s"],
        },
    }


def _run(ctx: _Ctx, row: RowDef, seed: int) -> dict[str, Any]:
    key = _run_key(ctx, row, seed)
    hit = ctx.cache.get("runs", key)
    if hit is not None and (not row.split or ctx.cache.path("observations", key, ".safetensors").is_file()):
        return hit
    t0, c0 = time.perf_counter(), time.process_time()
    fn = {"local": _run_local, "offline": _run_offline}.get(row.design, _run_split)
    res = fn(ctx, row, seed, key)
    res.update(
        {
            "key": key,
            "row": row.key,
            "seed": seed,
            "run_s": round(time.perf_counter() - t0, 1),
            "cpu_s": round(time.process_time() - c0, 1),
        }
    )
    ctx.cache.put("runs", key, res)
    return res


# ============================================================================ attacks
def _mechanism(ctx: _Ctx, row: RowDef) -> Any:
    from guardedp2p.attacks.adaptive import Mechanism

    r, cfg = ctx.recipe, ctx.cfg
    tc = _train_config(ctx, 0, row.dcor)
    obf = _obfuscation(ctx, row, 0)
    return Mechanism(
        design=row.design,
        up_codec=row.codec,
        noise=tuple(sorted(_row_noise(ctx, row).items())),
        dcor_alpha=row.dcor,
        obfuscation=tuple(sorted((k, v) for k, v in asdict(obf).items() if k != "public_text")) if obf else (),
        bottom_layers=_bottom(ctx, row),
        top_layers=cfg.top_layers,
        steps=r.steps,
        batch_size=r.batch_size,
        lr=r.lr,
        max_length=r.max_length,
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        warmup_steps=tc.warmup_steps,
        schedule=tc.schedule,
        max_grad_norm=tc.max_grad_norm,
    )


def _attacker_key(ctx: _Ctx, mech: Any, blind: bool = False) -> str:
    acfg = _adaptive_config(ctx.cfg)
    return _hash(
        {
            "v": FRONTIER_VERSION,
            "mech": mech.key(),
            "adaptive": asdict(acfg),
            "task": ctx.task.digest,
            "model": ctx.cfg.model,
            "blind": blind,
        }
    )


def _attacker(ctx: _Ctx, row: RowDef, blind: bool = False) -> tuple[str, Any, dict[str, Any]]:
    """The adaptive inverter for ``row``'s mechanism: from memory, from the cache, or trained now."""
    from guardedp2p.attacks.adaptive import AdaptiveInverter, train_adaptive_inverter
    from guardedp2p.attacks.sip import Inverter, SIPInverter

    mech = _mechanism(ctx, row)
    key = _attacker_key(ctx, mech, blind)
    if key in ctx.attackers:
        return ctx.attackers[key]
    acfg = _adaptive_config(ctx.cfg)
    meta = ctx.cache.get("attackers", key)
    weights = ctx.cache.get_tensors("attackers", key)
    if meta is not None and weights is not None:
        out_ids = weights.pop("__out_ids__")
        net = Inverter(int(meta["d_in"]), len(out_ids), acfg.sip)
        net.load_state_dict(weights)
        inv = SIPInverter(net, out_ids, int(meta["vocab"]), float(meta["summary"]["holdout_rougeL"] or math.nan))
        adaptive = AdaptiveInverter(inv, mech, [], bool(meta["summary"]["plateaued"]), 0, 0, [], 0.0, 0.0, 0.0)
        ctx.attackers[key] = (key, adaptive, meta["summary"])
        return ctx.attackers[key]
    _say(
        ctx,
        escape(
            f"  attacker for ({mech.describe()}): replay the run on {len(ctx.task.aux)} aux records, train the inverter"
        ),
    )
    bars: dict[str, _Bar] = {}

    def progress(phase: str, done: int, total: int, note: str) -> None:
        if phase not in bars:
            for b in bars.values():
                b.__exit__(None, None, None)
            bars.clear()
            bars[phase] = _Bar(ctx.cfg.progress, phase, total).__enter__()
        bars[phase].update(done, note, total)

    c0 = time.process_time()
    try:
        adaptive = train_adaptive_inverter(
            ctx.base, ctx.tok, ctx.task.aux, ctx.task.aux_holdout, mech, acfg, progress=progress, blind=blind
        )
    finally:
        for b in bars.values():
            b.__exit__(None, None, None)
    summary = adaptive.summary()
    summary["cpu_s"] = round(time.process_time() - c0, 1)
    net = adaptive.inverter.net
    ctx.cache.put_tensors(
        "attackers",
        key,
        {**{k: v.detach().cpu() for k, v in net.state_dict().items()}, "__out_ids__": adaptive.inverter.out_ids},
    )
    ctx.cache.put(
        "attackers",
        key,
        {"summary": summary, "d_in": int(net.norm.normalized_shape[0]), "vocab": adaptive.inverter.vocab_size},
    )
    _say(
        ctx,
        f"  attacker ready: held-out ROUGE-L {summary['holdout_rougeL']:.3f} ({'plateaued' if summary['plateaued'] else 'NOT plateaued'}, "
        f"{summary['train_s']:.0f} s)",
    )
    ctx.attackers[key] = (key, adaptive, summary)
    return ctx.attackers[key]


def _normalise_text(s: str) -> str:
    return " ".join(s.split())


def _secrets_for(ctx: _Ctx, ref_text: str) -> dict[str, str]:
    """The secrets of the training record this sequence comes from, restricted to what the sequence holds."""
    from guardedp2p.attacks.metrics import secret_found

    ref = _normalise_text(ref_text)
    pii = ctx.secrets_index.get(ref[:48])
    if pii is None:
        return {}
    return {k: v for k, v in pii.items() if secret_found(ref, v)}


def _template_guess(ctx: _Ctx, candidates: int = 200, refs: int = 200) -> list[int]:
    """The format prior as one guess: the auxiliary record (of the first ``candidates``) with the highest mean
    ROUGE-L against ``refs`` other auxiliary records. An attacker who sees nothing can always send it; any
    reconstruction's ROUGE-L is to be read against this one's."""
    if ctx.template is not None:
        return list(ctx.template)
    from guardedp2p.attacks.metrics import rouge_f1

    texts = [str(r["text"]) for r in ctx.task.aux]
    cand, ref = texts[:candidates], texts[candidates : candidates + refs] or texts[:candidates]
    best = max(range(len(cand)), key=lambda i: sum(rouge_f1(cand[i], t)["rougeL"] for t in ref))
    ids = _public_ids(ctx)[best]
    ctx.template = list(ids)
    return list(ids)


def _attack(ctx: _Ctx, row: RowDef, run: dict[str, Any], attack: str, blind: bool = False) -> dict[str, Any]:
    """Per-sequence scores of one attack on one run's chosen observations (cached)."""
    from guardedp2p.attacks.common import valid_ids
    from guardedp2p.attacks.metrics import ids_to_text, score_sample, secrets_recovered

    adaptive_attack = attack in ("sip_adaptive", "sip_freq")
    akey, adaptive, asummary = _attacker(ctx, row, blind) if adaptive_attack else ("", None, {})
    key = _hash({"v": FRONTIER_VERSION, "run": run["key"], "attack": attack, "attacker": akey, "blind": blind})
    hit = ctx.cache.get("attacks", key)
    if hit is not None:
        return hit
    obs = ctx.cache.get_tensors("observations", run["key"])
    if obs is None:
        raise ConfigError(
            f"the observations of run {run['key']} are missing from the cache; delete {ctx.cache.root / 'runs'} entries to rerun it"
        )
    n = len(run["observations"]["steps"])
    t0 = time.perf_counter()
    recs: list[torch.Tensor] = []
    if adaptive_attack:
        from guardedp2p.attacks.adaptive import invert

        assert adaptive is not None
        recs = [invert(adaptive, obs[f"h1_{i}"], obs[f"mask_{i}"], blind=blind) for i in range(n)]
    elif attack == "template":
        guess = torch.tensor(_template_guess(ctx), dtype=torch.long)
        recs = []
        for i in range(n):
            B, L = obs[f"ids_{i}"].shape
            row_ids = torch.full((L,), int(ctx.tok.pad_token_id or 0), dtype=torch.long)
            row_ids[: min(L, len(guess))] = guess[:L]
            recs.append(row_ids.expand(B, L).clone())
    else:
        recs = _legacy_attack(ctx, row, obs, n, attack)
    pairs = [
        (run["observations"]["steps"][i], hyp, ref)
        for i in range(n)
        for hyp, ref in zip(valid_ids(recs[i], obs[f"mask_{i}"]), valid_ids(obs[f"ids_{i}"], obs[f"mask_{i}"]))
    ]
    pseudo = _pseudo_task(ctx, row, int(run["seed"]))
    seqs = []
    if pseudo is None:
        for step, hyp, ref in pairs:
            s = score_sample(hyp, ref, ctx.tok, "detok")
            sec = _secrets_for(ctx, ids_to_text(ref, ctx.tok, "detok"))
            seqs.append(
                {
                    "step": step,
                    "rougeL": round(s.rougeL, 5),
                    "token_acc": round(s.token_acc, 5),
                    "secrets": secrets_recovered(s.hyp_text, sec),
                    "ref": s.ref_text,
                    "hyp": s.hyp_text,
                }
            )
    else:
        seqs = _score_pseudonymised(ctx, pseudo, pairs, frequency=attack == "sip_freq")
    res = {"attack": attack, "attacker": asummary, "sequences": seqs, "seconds": round(time.perf_counter() - t0, 2)}
    ctx.cache.put("attacks", key, res)
    return res


def _score_pseudonymised(
    ctx: _Ctx, pseudo: _PseudoTask, pairs: list[tuple[int, Any, Any]], *, frequency: bool
) -> list[dict[str, Any]]:
    """Scores against what the client *wrote*, not what it sent: the sent tokens are the pseudonymised text, so the
    reference is decoded with the client's key. The attacker reads the surrogates at face value, or (``frequency``)
    maps them back by frequency analysis against the value counts of its own auxiliary records
    (:func:`guardedp2p.privacy.pseudonym.frequency_inverse`), counted over every sequence of the run it attacks.
    Token accuracy is position by position on the re-tokenised texts."""
    from guardedp2p.attacks.metrics import ids_to_text, rouge_f1, secrets_recovered, token_accuracy
    from guardedp2p.privacy.pseudonym import apply_inverse, field_counts, frequency_inverse

    schema = pseudo.coder.schema
    hyps = [ids_to_text(h, ctx.tok, "detok") for _, h, _ in pairs]
    refs = [pseudo.coder.decode(ids_to_text(r, ctx.tok, "detok")) for _, _, r in pairs]
    if frequency:
        if ctx.pseudo_prior is None:
            ctx.pseudo_prior = field_counts(schema, (str(r["text"]) for r in ctx.task.aux))
        guess = frequency_inverse(schema, field_counts(schema, hyps), ctx.pseudo_prior)
        hyps = [apply_inverse(schema, h, guess) for h in hyps]

    def ids(text: str) -> list[int]:
        return list(ctx.tok(text, add_special_tokens=False)["input_ids"])

    out = []
    for (step, _, _), hyp, ref in zip(pairs, hyps, refs):
        out.append(
            {
                "step": step,
                "rougeL": round(rouge_f1(hyp, ref)["rougeL"], 5),
                "token_acc": round(token_accuracy(ids(hyp), ids(ref)), 5),
                "secrets": secrets_recovered(hyp, _secrets_for(ctx, ref)),
                "ref": ref,
                "hyp": hyp,
            }
        )
    return out


def _legacy_attack(ctx: _Ctx, row: RowDef, obs: dict[str, torch.Tensor], n: int, attack: str) -> list[torch.Tensor]:
    """SIP on the pre-trained bottom (codec-aware) or BiSR(f) initialised by it, from :mod:`guardedp2p.attacks.runner`."""
    from guardedp2p.attacks.runner import AttackSuiteConfig, run_attacks
    from guardedp2p.attacks.transcript import Observation
    from guardedp2p.engine.split import SplitConfig

    observations = [Observation("s", i, obs[f"mask_{i}"], h1=obs[f"h1_{i}"]) for i in range(n)]
    acfg = AttackSuiteConfig.fast()
    acfg.aux_max_length = ctx.recipe.max_length
    if ctx.cfg.fast:
        acfg.sip.epochs, acfg.sip.hidden, acfg.bisr_f.steps = 2, 32, 20
    transform = _mechanism(ctx, row).transform()
    report = run_attacks(
        observations,
        ctx.base,
        SplitConfig(_bottom(ctx, row), ctx.cfg.top_layers),
        ctx.tok,
        ctx.task.aux,
        [attack],
        acfg,
        transform=transform,
        progress=ctx.cfg.progress,
    )
    return report.results[attack].reconstructions


# ============================================================================ aggregation
def _interval(iv: Any, scale: float = 1.0, nd: int = 4) -> list[float]:
    return [round(iv.lo * scale, nd), round(iv.hi * scale, nd)]


def _same_seeds(local: list[dict[str, Any]], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Local LoRA runs of the seeds ``runs`` has, in its order: the utility loss pairs a run with its own seed."""
    by_seed = {r["seed"]: r for r in local}
    return [by_seed[r["seed"]] for r in runs]


def _utility_block(runs: list[dict[str, Any]], local: list[dict[str, Any]]) -> dict[str, Any]:
    from guardedp2p.evaluate.stats import hierarchical_bootstrap_ci, seed_t_ci

    A = np.array([r["utility"]["correct"] for r in runs], float)
    L = np.array([r["utility"]["correct"] for r in local], float)
    acc = hierarchical_bootstrap_ci(A, seed=11)
    loss = hierarchical_bootstrap_ci(L, A, seed=12)  # local minus row, same seed, same items
    out: dict[str, Any] = {
        "acc": round(acc.estimate, 4),
        "ci95": _interval(acc),
        "ci_method": acc.method,
        "loss_pts_vs_local": round(100 * loss.estimate, 2),
        "loss_ci95": _interval(loss, 100, 2),
        "acc_per_seed": [round(float(a.mean()), 4) for a in A],
        "acc_seed_t_ci95": _interval(seed_t_ci(A.mean(axis=1))),
    }
    F_ = np.array([r["utility"]["field_nll"] for r in runs], float)
    FL = np.array([r["utility"]["field_nll"] for r in local], float)
    if F_.size and FL.size:
        ok = np.all(np.isfinite(F_), axis=0) & np.all(np.isfinite(FL), axis=0)
        if ok.any():
            nll = hierarchical_bootstrap_ci(F_[:, ok], seed=13)
            d = hierarchical_bootstrap_ci(F_[:, ok], FL[:, ok], seed=14)
            out.update(
                {
                    "nll": round(nll.estimate, 4),
                    "nll_ci95": _interval(nll),
                    "nll_diff_vs_local": round(d.estimate, 4),
                    "nll_diff_ci95": _interval(d),
                    "nll_what": "mean NLL (nats/token) of the hidden-rule code tokens of held-out records",
                }
            )
    if "nll" not in out:
        N = np.array([r["utility"]["answer_nll"] for r in runs], float)
        NL = np.array([r["utility"]["answer_nll"] for r in local], float)
        nll = hierarchical_bootstrap_ci(N, seed=13)
        d = hierarchical_bootstrap_ci(N, NL, seed=14)
        out.update(
            {
                "nll": round(nll.estimate, 4),
                "nll_ci95": _interval(nll),
                "nll_diff_vs_local": round(d.estimate, 4),
                "nll_diff_ci95": _interval(d),
                "nll_what": "mean NLL (nats/token) of the right answer of each multiple-choice item",
            }
        )
    prot = [r["utility"].get("protocol_acc") for r in runs]
    if any(p is not None for p in prot):
        out["protocol_acc_per_seed"] = prot
    return out


def _privacy_block(
    ctx: _Ctx, row: RowDef, runs: list[dict[str, Any]], blind: bool = False, attacks: Sequence[str] | None = None
) -> dict[str, Any]:
    from guardedp2p.attacks.metrics import summarize_secrets
    from guardedp2p.evaluate.stats import bootstrap_max_of_means_ci

    if not row.split:
        why = (
            "nothing leaves the client"
            if row.design == "local"
            else "no per-step exchange to attack (the provider sees one signed upload)"
        )
        return {
            "best_attack": None,
            "best_rougeL": None,
            "ci95": None,
            "worst_rougeL": None,
            "secrets_recovered": None,
            "token_acc": None,
            "sequences": 0,
            "steps_observed": 0,
            "adaptive": None,
            "not_applicable": why,
        }
    per_attack: dict[str, list[dict[str, Any]]] = {}
    attackers: dict[str, Any] = {}
    names_ = list(attacks or (("sip_adaptive",) if blind else ctx.cfg.attacks))
    if row.pseudonym and "sip_adaptive" in names_:
        names_.insert(names_.index("sip_adaptive") + 1, "sip_freq")  # the attacker who knows the defence
    for a in names_:
        res = [_attack(ctx, row, r, a, blind=blind) for r in runs]
        per_attack[a] = [s for x in res for s in x["sequences"]]
        if res and res[0].get("attacker"):
            attackers[a] = res[0]["attacker"]
    names = list(per_attack)
    M = np.array([[s["rougeL"] for s in per_attack[a]] for a in names], float)
    b, iv = bootstrap_max_of_means_ci(M, seed=21)
    best = names[b]
    seqs = per_attack[best]
    # secrets: the attack that recovers most of them, which need not be the one with the best ROUGE-L (the format
    # prior scores a high ROUGE-L and recovers almost no secret)
    secs = {a: summarize_secrets([s["secrets"] for s in per_attack[a]]) for a in names}
    sec_attack = max(names, key=lambda a: -1.0 if math.isnan(secs[a].fraction) else secs[a].fraction)
    sec = secs[sec_attack]
    worst = max(range(len(seqs)), key=lambda i: seqs[i]["rougeL"])
    steps = [len(r["observations"]["steps"]) for r in runs]
    out = {
        "best_attack": best,
        "best_attack_label": ATTACK_LABELS[best],
        "best_rougeL": round(iv.estimate, 4),
        "ci95": _interval(iv),
        "worst_rougeL": round(float(M.max()), 4),
        "token_acc": round(float(np.mean([s["token_acc"] for s in seqs])), 4),
        "secrets_recovered": None if math.isnan(sec.fraction) else round(sec.fraction, 4),
        "secrets_per_field": {k: round(v, 4) for k, v in sec.per_field.items()},
        "secrets_fields_scored": sec.n_fields,
        "secrets_attack": sec_attack,
        "sequences": len(seqs),
        "steps_observed": min(steps) if steps else 0,
        "steps_observed_per_seed": steps,
        "adaptive": best in ("sip_adaptive", "sip_freq"),
        "per_attack": {
            a: {
                "mean_rougeL": round(float(M[i].mean()), 4),
                "worst_rougeL": round(float(M[i].max()), 4),
                "token_acc": round(float(np.mean([s["token_acc"] for s in per_attack[a]])), 4),
                "secrets_recovered": None if math.isnan(secs[a].fraction) else round(secs[a].fraction, 4),
            }
            for i, a in enumerate(names)
        },
        "most_leaked": {
            "ref": seqs[worst]["ref"],
            "hyp": seqs[worst]["hyp"],
            "rougeL": seqs[worst]["rougeL"],
            "step": seqs[worst]["step"],
        },
        "attacker": attackers.get("sip_adaptive")
        and {k: v for k, v in attackers["sip_adaptive"].items() if k != "convergence"},
        "convergence": (attackers.get("sip_adaptive") or {}).get("convergence"),
        "harness_broken": False,
    }
    return out


def sanity_gate(
    rows: Sequence[Mapping[str, Any]], min_rougeL: float = SANITY_ROUGEL, min_secrets: float = SANITY_SECRETS
) -> dict[str, Any]:
    """Does the undefended Online row leak as it must? If not, the attack harness is broken.

    Returns ``{"ok": True|False|None, "message", ...}`` (None: no scored undefended Online row to check).
    """
    base = next((r for r in rows if r.get("row") == "online"), None)
    p = (base or {}).get("privacy") or {}
    v, s = p.get("best_rougeL"), p.get("secrets_recovered")
    out: dict[str, Any] = {
        "row": "online",
        "best_rougeL": v,
        "secrets_recovered": s,
        "min_rougeL": min_rougeL,
        "min_secrets": min_secrets,
    }
    if v is None:
        out.update(
            ok=None,
            message="sanity gate not run: the grid has no scored 'online' (no defence) row, so no privacy number is vouched for",
        )
        return out
    s_ok = s is not None and s >= min_secrets
    ok = v >= min_rougeL and s_ok
    if ok:
        msg = f"undefended Online: best ROUGE-L {v:.3f} >= {min_rougeL}, secrets recovered {s:.3f} >= {min_secrets}: the attack works"
    else:
        msg = (
            f"HARNESS BROKEN: undefended Online reached best ROUGE-L {v:.3f} (needs >= {min_rougeL}) and secrets recovered "
            f"{'n/a' if s is None else f'{s:.3f}'} (needs >= {min_secrets}). An attack that cannot read an undefended run says "
            "nothing about a defended one: no privacy number of this grid is reported."
        )
    out.update(ok=ok, message=msg)
    return out


def pareto_front(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Rows with a privacy number that no other such row beats on both axes (higher acc, lower best ROUGE-L)."""
    pts = [(r["row"], r["utility"]["acc"], r["privacy"].get("best_rougeL")) for r in rows]
    pts = [(k, a, p) for k, a, p in pts if p is not None and a is not None]
    front = []
    for k, a, p in pts:
        dominated = any((a2 >= a and p2 <= p) and (a2 > a or p2 < p) for k2, a2, p2 in pts if k2 != k)
        if not dominated:
            front.append(k)
    return front


# ============================================================================ main entry
def _load(ctx_cfg: FrontierConfig, model: Any, tokenizer: Any, console: Any) -> tuple[Any, Any, Any]:
    from guardedp2p.evaluate.tasks import load_task

    task = load_task(ctx_cfg.task)
    if model is None:
        if ctx_cfg.fast:
            from guardedp2p.evaluate.fast import fast_model

            model, tokenizer = fast_model(task)
        else:
            from guardedp2p.engine.loading import load_causal_lm

            if console is not None:
                console.print(f"loading {ctx_cfg.model}…")
            model, tokenizer = load_causal_lm(ctx_cfg.model, device=ctx_cfg.device)
    if tokenizer is None:
        raise ConfigError("run_frontier(model=...) needs the model's tokenizer too")
    return task, model, tokenizer


def run_frontier(
    cfg: FrontierConfig, *, model: Any = None, tokenizer: Any = None, console: Any = None, blind_attacker: bool = False
) -> dict[str, Any]:
    """Run (or resume) the frontier; write frontier.json, frontier.md and frontier.png into ``cfg.results``.

    ``model``/``tokenizer``: the pre-trained model (loaded from ``cfg.model`` when not given; a tiny random one
    with ``cfg.fast``). It stays pristine: every party gets its own copy. ``blind_attacker`` zeroes what the
    adaptive attacker sees (a deliberately broken attack: the sanity gate must trip).
    """
    from guardedp2p.data.loaders import load_records
    from guardedp2p.evaluate.grid import client_param_fraction
    from guardedp2p.evaluate.tasks import Recipe

    cfg.validate()
    t0 = time.perf_counter()
    task, base, tok = _load(cfg, model, tokenizer, console)
    for p in base.parameters():
        p.requires_grad_(False)
    base.train(False)
    r = task.recipe
    recipe = Recipe(
        steps=cfg.steps or r.steps,
        batch_size=cfg.batch_size or r.batch_size,
        lr=cfg.lr or r.lr,
        max_length=cfg.max_length or r.max_length,
    )
    work = Path(cfg.out)
    work.mkdir(parents=True, exist_ok=True)
    ctx = _Ctx(cfg, task, base, tok, _Cache(work / "cache"), work, console, recipe)
    items = load_records(task.eval_mc)
    ctx.eval_items = items[: cfg.eval_items] if cfg.eval_items else items
    ctx.nll_records = task.eval_nll_records(cfg.nll_records)
    for rec in task.train_records():
        if isinstance(rec.get("pii"), dict):
            ctx.secrets_index[_normalise_text(str(rec["text"]))[:48]] = {str(k): str(v) for k, v in rec["pii"].items()}
    defs = cfg.row_defs()
    ip = client_param_fraction(base, cfg.bottom_layers, cfg.top_layers)

    settings = {
        "version": FRONTIER_VERSION,
        "model": cfg.model + (" (tiny random, --fast)" if cfg.fast else ""),
        "task": task.name,
        "recipe": asdict(recipe),
        "split": [cfg.bottom_layers, cfg.top_layers],
        "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha},
        "eval_items": len(ctx.eval_items),
        "nll_records": len(ctx.nll_records),
        "attacks": list(cfg.attacks),
        "attack_steps": cfg.attack_steps,
        "attack_sequences": cfg.attack_sequences,
        "aux_records": len(task.aux),
        "aux_holdout": len(task.aux_holdout),
    }
    carried, carried_prior = _carried_rows(ctx, defs, settings)
    if carried:
        _say(ctx, f"carried unchanged from {cfg.carry} (no run of theirs in the cache): {', '.join(carried)}")
    units = [(d, s) for d in defs if d.key not in carried for s in cfg.seeds_for(d)]
    runs: dict[str, list[dict[str, Any]]] = {d.key: [] for d in defs}
    claimed_elsewhere: list[str] = []
    for i, (d, s) in enumerate(units, 1):
        key = _run_key(ctx, d, s)
        cached = ctx.cache.get("runs", key) is not None
        held = waiting = False
        while not cached and not (held := ctx.cache.claim("runs", key)):
            # another worker is training this unit: a --runs-only worker moves on, a reporting one waits for it
            if cfg.runs_only:
                break
            if not waiting:
                _say(
                    ctx,
                    f"[bold][{i}/{len(units)}][/] {d.label}, seed {s}: another worker is training it, waiting (if "
                    f"that worker is gone for good, delete {ctx.cache.claim_path('runs', key)})",
                )
                claimed_elsewhere.append(f"{d.key} seed {s}")
                waiting = True
            time.sleep(_CLAIM_POLL_S)
            cached = ctx.cache.get("runs", key) is not None
        if not cached and not held:
            _say(ctx, f"[bold][{i}/{len(units)}][/] {d.label}, seed {s}: being trained by another worker, skipped")
            claimed_elsewhere.append(f"{d.key} seed {s}")
            continue
        try:
            runs[d.key].append(_run_unit(ctx, d, s, i, len(units), cached))
        finally:
            if held:
                ctx.cache.release("runs", key)

    if cfg.runs_only:
        _say(ctx, f"--runs-only: {len(units)} run(s) cached under {ctx.cache.root}; attacks and reports skipped")
        return {
            "runs_only": True,
            "runs": {k: [r["key"] for r in v] for k, v in runs.items()},
            "skipped_claimed": claimed_elsewhere,
            "wall_s": round(time.perf_counter() - t0, 1),
        }

    rows: list[dict[str, Any]] = []
    split_defs = [d for d in defs if d.split and d.key not in carried]
    for j, d in enumerate(split_defs, 1):
        _say(
            ctx,
            f"[bold]attack {j}/{len(split_defs)}[/]: {d.label} ({', '.join(cfg.attacks)}, {len(cfg.seeds_for(d))} seed(s))",
        )
        for a in ("sip_adaptive",) if blind_attacker else cfg.attacks:
            for run in runs[d.key]:
                _attack(ctx, d, run, a, blind=blind_attacker)
    prior: dict[str, Any] | None = None
    if not blind_attacker and "online" in runs and runs["online"]:
        # the format prior: the best single guess from the aux records' format, sent for every sequence
        _say(ctx, "[bold]format prior[/]: the most typical auxiliary record as the guess for every sequence")
        pb = _privacy_block(ctx, _FIXED["online"], runs["online"], attacks=("template",))
        prior = {
            "rougeL": pb.get("best_rougeL"),
            "ci95": pb.get("ci95"),
            "secrets_recovered": pb.get("secrets_recovered"),
            "sequences": pb.get("sequences"),
            "what": "one guess for every sequence: the auxiliary record with the highest mean ROUGE-L against other "
            "auxiliary records (knows the format, sees nothing of the client's)",
        }
    if prior is None and carried_prior is not None and not blind_attacker:
        prior = {**carried_prior, "carried": True}
    for d in defs:
        if d.key in carried:
            rows.append(carried[d.key])
            continue
        rs = runs[d.key]
        util = _utility_block(rs, _same_seeds(runs["local"], rs))
        priv = _privacy_block(ctx, d, rs, blind=blind_attacker)
        frac: float | None
        if d.design == "local":
            frac = 1.0  # the reference trains the whole model where the data is: the client holds every weight
        elif d.design == "offline":
            frac = (rs[0].get("ip") or {}).get("fraction")
        elif d.bottom and d.bottom != cfg.bottom_layers:
            frac = client_param_fraction(base, d.bottom, cfg.top_layers)["fraction"]
        else:
            frac = ip["fraction"]
        # what the client holds in memory, in fp32 weights (the cost side of cut depth; activations come on top)
        client_mib = None if frac is None else frac * ip["total_params"] * 4 / 2**20
        rows.append(
            {
                "row": d.key,
                "label": d.label,
                "design": d.design,
                "defence": d.defence(),
                "family": d.family,
                "utility": util,
                "privacy": priv,
                "bytes_per_step": round(float(np.mean([x["cost"]["bytes_per_step"] for x in rs])), 1),
                "client_s_per_step": round(float(np.mean([x["cost"]["client_s_per_step"] for x in rs])), 4),
                "ip_exposure": None if frac is None else round(float(frac), 4),
                "client_weights_mib": None if client_mib is None else round(float(client_mib), 1),
                "one_off_bytes": int(np.mean([x["cost"].get("one_off_bytes", 0) for x in rs])),
                "train_s_per_seed": [x["cost"]["train_s"] for x in rs],
                "seeds": [x["seed"] for x in rs],
            }
        )
    gate = sanity_gate(rows)
    if gate["ok"] is False:
        for row in rows:
            if row["privacy"].get("not_applicable") is None:
                row["privacy"]["harness_broken"] = True
    front = pareto_front(rows) if gate["ok"] is not False else []
    for row in rows:
        row["pareto"] = row["row"] in front
    result = {
        **{k: v for k, v in settings.items() if k != "version"},
        "seeds": len(cfg.seeds),
        "seed_list": list(cfg.seeds),
        "carried_rows": sorted(carried),
        "headline": (
            not cfg.fast
            and set(HEADLINE_ROWS) <= {parse_row(r).key for r in cfg.rows} | {"local"}
            and len(cfg.seeds) >= 3
            and cfg.task == "hidden_rules"
            and cfg.model == "default"
        ),
        "sanity": gate,
        "prior": prior,
        "harness_broken": gate["ok"] is False,
        "pareto_front": front,
        "rows": rows,
        "command": cfg.command,
        "wall_s": round(time.perf_counter() - t0, 1),
        "compute": _compute_spent(runs, ctx, [d for d in defs if cfg.seeds_for(d) == cfg.seeds]),
        "torch_threads": torch.get_num_threads(),
        "version": FRONTIER_VERSION,
    }
    result = _finite(result)
    from guardedp2p.evaluate.report import write_reports

    result["files"] = write_reports(result, Path(cfg.results))
    if cfg.strict and gate["ok"] is not True:
        raise HarnessBroken(gate["message"] + f" (reports written to {cfg.results})")
    return result


# what must match for a row of an earlier frontier.json to stand beside rows measured now
_CARRY_SETTINGS = (
    "version",
    "model",
    "task",
    "recipe",
    "split",
    "lora",
    "eval_items",
    "nll_records",
    "attacks",
    "attack_steps",
    "attack_sequences",
    "aux_records",
    "aux_holdout",
)


def _carried_rows(ctx: _Ctx, defs: Sequence[RowDef], settings: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """Rows of ``cfg.carry`` (an earlier frontier.json) to publish unchanged, and its format prior.

    Why: the cache under ``--out`` is work space that a new machine or a cleaned checkout does not have, while the
    published frontier.json is committed. A row is carried only when none of its runs is in the cache now, the
    earlier file ran it at the same seeds, and every setting that changes a number matched; the report marks it.
    Local LoRA is carried only when nothing is measured now (a measured row's paired utility CI needs its per-item
    results)."""
    cfg = ctx.cfg
    if not cfg.carry:
        return {}, None
    path = Path(cfg.carry)
    try:
        prev = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--carry {path}: cannot read it as a frontier.json ({e})") from e
    if not isinstance(prev, dict) or not isinstance(prev.get("rows"), list):
        raise ConfigError(f"--carry {path}: not a frontier.json (no 'rows')")
    differ = [k for k in _CARRY_SETTINGS if _hash(prev.get(k)) != _hash(settings.get(k))]
    if differ:
        detail = "; ".join(f"{k}: {prev.get(k)!r} there, {settings.get(k)!r} now" for k in differ)
        raise ConfigError(
            f"--carry {path} was measured with other settings, so its rows cannot stand beside these ({detail})"
        )
    published = {r.get("row"): r for r in prev["rows"] if isinstance(r, dict)}
    keep = [
        d
        for d in defs
        if d.key in published
        and list(published[d.key].get("seeds") or []) == list(cfg.seeds_for(d))
        and all(ctx.cache.get("runs", _run_key(ctx, d, s)) is None for s in cfg.seeds_for(d))
    ]
    if len(keep) < len(defs):
        keep = [d for d in keep if d.key != "local"]
    how: dict[str, Any] = {"from": str(path), "command": prev.get("command", "")}
    ref = published.get("local")
    if keep and all(d.key != "local" for d in keep) and isinstance(ref, dict):
        # the reference the carried rows' paired utility losses were measured against
        how["reference"] = {
            "acc": ref["utility"].get("acc"),
            "ci95": ref["utility"].get("ci95"),
            "seeds": ref.get("seeds"),
        }
    carried: dict[str, Any] = {}
    for d in keep:
        row = published[d.key]
        # a row carried twice keeps where it was measured and the reference it was paired with
        origin = row["carried"] if isinstance(row.get("carried"), dict) else how
        carried[d.key] = {**row, "label": d.label, "defence": d.defence(), "family": d.family, "carried": origin}
    return carried, prev.get("prior") if "online" in carried else None


def _run_unit(ctx: _Ctx, d: RowDef, s: int, i: int, n: int, cached: bool) -> dict[str, Any]:
    """One training run of the grid (from the cache when it is there), with its progress lines."""
    _say(ctx, f"[bold][{i}/{n}][/] {d.label}, seed {s}" + (" (cached)" if cached else f": {ctx.recipe.steps} steps"))
    res = _run(ctx, d, s)
    if not cached:
        _say(
            ctx,
            f"  acc {res['utility']['acc']:.3f}, {res['cost']['bytes_per_step'] / 1e6:.2f} MB/step, {res['run_s']:.0f} s",
        )
    return res


def _compute_spent(
    runs: Mapping[str, list[dict[str, Any]]], ctx: _Ctx, headline: Sequence[RowDef] = ()
) -> dict[str, Any]:
    """What the grid cost when each unit ran (cached units included): the budget of a fresh run on this machine.

    ``headline``: the rows run at every seed; their runs and attackers are also summed on their own (the budget the
    headline grid is held to, without the sweep rows)."""
    run_s = {k: round(sum(float(r.get("run_s", 0.0)) for r in rs), 1) for k, rs in runs.items()}
    run_cpu = {k: round(sum(float(r.get("cpu_s", 0.0)) for r in rs), 1) for k, rs in runs.items()}
    att = [s for _, _, s in ctx.attackers.values()]
    attacker_s = round(
        sum(float(s.get("simulate_s", 0)) + float(s.get("features_s", 0)) + float(s.get("train_s", 0)) for s in att), 1
    )
    attacker_cpu = round(sum(float(s.get("cpu_s", 0)) for s in att), 1)
    head: dict[str, Any] = {}
    if headline:
        keys = {d.key for d in headline}
        mine = {_attacker_key(ctx, _mechanism(ctx, d)) for d in headline if d.split}
        h_att = [s for k, (_, _, s) in ctx.attackers.items() if k in mine]
        cpu = sum(run_cpu.get(k, 0.0) for k in keys) + sum(float(s.get("cpu_s", 0)) for s in h_att)
        head = {
            "rows": sorted(keys),
            "attackers": len(h_att),
            "cpu_s": round(cpu, 1),
            # single-threaded units shared by two --runs-only processes (then one process for the attackers)
            "two_core_wall_h_estimate": round(cpu / 2 / 3600, 2),
        }
    return {
        "headline": head,
        "runs_s": run_s,
        "runs_cpu_s": run_cpu,
        "attackers_s": attacker_s,
        "attackers_cpu_s": attacker_cpu,
        "attackers": len(att),
        "total_s": round(sum(run_s.values()) + attacker_s, 1),
        "total_cpu_s": round(sum(run_cpu.values()) + attacker_cpu, 1),
        "note": "wall and CPU seconds of each unit when it ran (CPU time of this process, all threads; a busy shared machine "
        "stretches the wall time, not the CPU time); attacks on cached observations add seconds",
    }


def _finite(o: Any) -> Any:
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if isinstance(o, dict):
        return {str(k): _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        return _finite(o.item())
    return o


REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "top": ("eval_items", "seeds", "rows"),
    "row": ("row", "design", "defence", "utility", "privacy", "bytes_per_step", "client_s_per_step", "ip_exposure"),
    "utility": ("acc", "ci95", "loss_pts_vs_local", "loss_ci95", "nll"),
    "privacy": (
        "best_attack",
        "best_rougeL",
        "ci95",
        "worst_rougeL",
        "secrets_recovered",
        "sequences",
        "steps_observed",
        "adaptive",
    ),
}


def missing_fields(result: Mapping[str, Any]) -> list[str]:
    """Fields of the frontier.json shape (issue 15) that ``result`` lacks; privacy values may be null only for
    rows with no exchange to attack (``not_applicable``)."""
    miss = [f"top.{k}" for k in REQUIRED_FIELDS["top"] if k not in result]
    for r in result.get("rows", []):
        name = r.get("row", "?")
        miss += [f"{name}.{k}" for k in REQUIRED_FIELDS["row"] if k not in r]
        u, p = r.get("utility", {}), r.get("privacy", {})
        miss += [f"{name}.utility.{k}" for k in REQUIRED_FIELDS["utility"] if u.get(k) is None]
        for k in REQUIRED_FIELDS["privacy"]:
            if k not in p or (p.get(k) is None and not p.get("not_applicable") and k != "secrets_recovered"):
                miss.append(f"{name}.privacy.{k}")
    return miss


__all__ = [
    "ATTACKS",
    "FrontierConfig",
    "FAST_ROWS",
    "FAST_SWEEP_ROWS",
    "HEADLINE_ROWS",
    "SWEEP_ROWS",
    "HarnessBroken",
    "RowDef",
    "missing_fields",
    "pareto_front",
    "parse_row",
    "run_frontier",
    "sanity_gate",
]
