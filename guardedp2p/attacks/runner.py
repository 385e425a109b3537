"""Run the attack suite on recorded observations and score it against ground truth kept separately.

Pipeline (Chen et al., BiSR, CCS'24, arXiv 2409.00960): SIP -> BiSR(b) (init SIP) -> BiSR(f) (init SIP) -> BiSR(b+f) (init BiSR(b));
TAG, LAMP and EIA run independently. Attacks needing g₂ are skipped on Gradfree transcripts (no gradient ever
reaches the provider) with the reason recorded. Prerequisites are added automatically (asking for BiSR(b) runs
SIP too) and reported like any other attack.

The attacker's inputs are exactly: the observations (what the provider recorded), the *pre-trained* model, the
public split, the tokenizer, public auxiliary text and, for a lossy uplink, the public ``transform`` that maps a
clean h₁ to what the wire delivers (codec round trip, noise mechanism). The client's token ids are passed as
``ground_truth`` and used only for scoring, after every reconstruction is done.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

import torch

from guardedp2p.attacks.baselines import EIAConfig, LAMPConfig, eia, lamp, tag, tag_config
from guardedp2p.attacks.bisr import ForwardMatchConfig, GradMatchConfig, bisr_b, bisr_f
from guardedp2p.attacks.common import AttackConfigError, AttackerModel, Transform, valid_ids
from guardedp2p.attacks.metrics import ScoreSummary, TextMode, score_many
from guardedp2p.attacks.sip import SIPConfig, SIPInverter, sip_attack, train_sip_for
from guardedp2p.attacks.transcript import Observation
from guardedp2p.engine.split import SplitConfig

ATTACKS: tuple[str, ...] = ("sip", "bisr_b", "bisr_f", "bisr_bf", "tag", "lamp", "eia")
DEFAULT_ATTACKS: tuple[str, ...] = ("sip", "bisr_b", "bisr_f", "bisr_bf", "tag")
NEEDS_GRADIENTS = frozenset({"bisr_b", "bisr_bf", "tag", "lamp"})
PREREQUISITES: dict[str, tuple[str, ...]] = {"bisr_b": ("sip",), "bisr_f": ("sip",), "bisr_bf": ("sip", "bisr_b")}
LABELS = {
    "sip": "SIP",
    "bisr_b": "BiSR(b)",
    "bisr_f": "BiSR(f)",
    "bisr_bf": "BiSR(b+f)",
    "tag": "TAG*",
    "lamp": "LAMP",
    "eia": "EIA*",
}


@dataclass
class AttackSuiteConfig:
    """Hyper-parameters of every attack (defaults: Chen et al., BiSR, CCS'24, arXiv 2409.00960) and of the harness.

    max_observations: attack at most this many observations (the first ones in (session, step) order).
    text_mode: how reconstructions are scored (see :mod:`guardedp2p.attacks.metrics`).
    aux_max_length: truncate auxiliary sequences to this many tokens.
    """

    sip: SIPConfig = field(default_factory=SIPConfig)
    bisr_b: GradMatchConfig = field(default_factory=GradMatchConfig)
    bisr_f: ForwardMatchConfig = field(default_factory=ForwardMatchConfig)
    tag: GradMatchConfig = field(default_factory=tag_config)
    lamp: LAMPConfig = field(default_factory=LAMPConfig)
    eia: EIAConfig = field(default_factory=EIAConfig)
    max_observations: int | None = None
    text_mode: TextMode = "detok"
    aux_max_length: int = 128

    @classmethod
    def fast(cls) -> AttackSuiteConfig:
        """Scaled-down budgets for demos and CPU runs: 5 SIP epochs, 100 BiSR(f) steps, 2,000 EIA steps."""
        return cls(
            sip=SIPConfig(epochs=5),
            bisr_f=ForwardMatchConfig(steps=100),
            lamp=LAMPConfig(candidates=20),
            eia=EIAConfig(steps=2000),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AttackResult:
    """One attack's output: a reconstruction (B x L ids) per attacked observation, and scores if scored."""

    name: str
    reconstructions: list[torch.Tensor] = field(default_factory=list)
    seconds: float = 0.0
    skipped: str | None = None
    scores: ScoreSummary | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return LABELS.get(self.name, self.name)

    def as_dict(self, with_samples: bool = False) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "seconds": round(self.seconds, 3),
            "skipped": self.skipped,
            "scores": self.scores.as_dict(with_samples) if self.scores is not None else None,
            "info": self.info,
        }


@dataclass
class AttackReport:
    """Everything :func:`run_attacks` produced. ``best`` is the DRA effectiveness: the attack with the highest
    mean ROUGE-L F1 (Chen et al., BiSR, CCS'24, arXiv 2409.00960, metrics), computed only when ground truth was given."""

    design: str
    results: dict[str, AttackResult]
    n_observations: int
    n_sequences: int
    text_mode: str
    sip_holdout_rougeL: float | None = None
    best: str | None = None
    best_rougeL: float | None = None
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    inverter: SIPInverter | None = field(default=None, repr=False)  # reusable by the caller, not serialised

    def as_dict(self, with_samples: bool = False) -> dict[str, Any]:
        return {
            "design": self.design,
            "n_observations": self.n_observations,
            "n_sequences": self.n_sequences,
            "text_mode": self.text_mode,
            "sip_holdout_rougeL_ids": self.sip_holdout_rougeL,
            "best": self.best,
            "best_rougeL": self.best_rougeL,
            "attacks": {k: r.as_dict(with_samples) for k, r in self.results.items()},
            "config": self.config,
            "notes": self.notes,
        }

    def to_json(self, with_samples: bool = False) -> str:
        return json.dumps(self.as_dict(with_samples), indent=2, default=_json_default)

    def table(self) -> list[tuple[str, str]]:
        """(label, "ROUGE-L ± std" or the skip reason) rows, for CLI printing."""
        rows = []
        for r in self.results.values():
            if r.skipped:
                rows.append((r.label, f"skipped: {r.skipped}"))
            elif r.scores is not None:
                rows.append((r.label, f"{r.scores.rougeL:.3f} ± {r.scores.rougeL_std:.3f}"))
            else:
                rows.append((r.label, "not scored"))
        return rows


def _json_default(o: Any) -> Any:
    if is_dataclass(o):
        return asdict(o)  # type: ignore[arg-type]
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    return repr(o)


def resolve_attacks(attacks: Sequence[str]) -> list[str]:
    """Validate names and add prerequisites, in pipeline order."""
    wanted = set()
    for a in attacks:
        if a not in ATTACKS:
            raise AttackConfigError(f"unknown attack {a!r}; choose from {list(ATTACKS)}")
        wanted.add(a)
        wanted.update(PREREQUISITES.get(a, ()))
    return [a for a in ATTACKS if a in wanted]


def infer_design(observations: Sequence[Observation]) -> str:
    """ "online" when the provider saw client gradients, else "gradfree" (forward activations only)."""
    return "online" if any(o.g2 is not None for o in observations) else "gradfree"


def encode_aux(aux: Sequence[Any], tokenizer: Any, max_length: int = 128) -> list[list[int]]:
    """Token ids of the auxiliary corpus, encoded the way the client encodes its LM records (BOS/EOS included).

    Items may be strings, ``{"text": ...}`` records, or already-tokenised id lists.
    """
    from guardedp2p.data.tokenize import DataConfig, encode_lm

    out: list[list[int]] = []
    texts: list[dict[str, str]] = []
    for a in aux:
        if isinstance(a, str):
            texts.append({"text": a})
        elif isinstance(a, Mapping) and "text" in a:
            texts.append({"text": str(a["text"])})
        elif isinstance(a, (list, tuple)) or isinstance(a, torch.Tensor):
            out.append([int(t) for t in a][:max_length])
        else:
            raise AttackConfigError("auxiliary items must be strings, {'text': ...} records or token-id lists")
    if texts:
        if tokenizer is None:
            raise AttackConfigError("auxiliary text needs a tokenizer")
        out += [ex["input_ids"] for ex in encode_lm(texts, tokenizer, DataConfig(max_length=max_length))]
    return out


def first_token_of(tokenizer: Any) -> int | None:
    """The fixed first token the tokenizer prepends (BOS), if any: gradient attacks cannot infer x₀ otherwise."""
    if tokenizer is None:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:  # noqa: BLE001 - any tokenizer failure just means "unknown"
        return None
    return int(bos) if ids and int(ids[0]) == int(bos) else None


def _ground_truth_for(
    observations: Sequence[Observation],
    ground_truth: Sequence[torch.Tensor] | Mapping[tuple[str, int], torch.Tensor],
) -> list[torch.Tensor]:
    if isinstance(ground_truth, Mapping):
        missing = [o.key for o in observations if o.key not in ground_truth]
        if missing:
            raise AttackConfigError(f"no ground truth for observations {missing[:3]}… (keys are (session, step))")
        gts = [ground_truth[o.key] for o in observations]
    else:
        if len(ground_truth) != len(observations):
            raise AttackConfigError(f"{len(ground_truth)} ground-truth batches for {len(observations)} observations")
        gts = list(ground_truth)
    for o, g in zip(observations, gts):
        if tuple(g.shape) != tuple(o.mask.shape):
            raise AttackConfigError(
                f"ground truth of {o.key} has shape {list(g.shape)}, the observation's mask {list(o.mask.shape)}"
            )
    return gts


def score_report(
    report: AttackReport,
    observations: Sequence[Observation],
    ground_truth: Sequence[torch.Tensor] | Mapping[tuple[str, int], torch.Tensor],
    tokenizer: Any,
    text_mode: TextMode | None = None,
) -> AttackReport:
    """Score every attack's reconstructions against the client's ids, on masked positions; fill ``best``."""
    mode: TextMode = text_mode or report.text_mode  # type: ignore[assignment]
    obs = list(observations)[: report.n_observations]
    gts = _ground_truth_for(obs, ground_truth)
    refs = [r for o, g in zip(obs, gts) for r in valid_ids(g, o.mask)]
    best, best_v = None, float("-inf")
    for name, res in report.results.items():
        if res.skipped or not res.reconstructions:
            continue
        hyps = [h for o, rec in zip(obs, res.reconstructions) for h in valid_ids(rec, o.mask)]
        res.scores = score_many(hyps, refs, tokenizer, mode)
        if res.scores.rougeL > best_v:
            best, best_v = name, res.scores.rougeL
    report.text_mode = "ids" if tokenizer is None else mode
    report.best, report.best_rougeL = best, (best_v if best is not None else None)
    for r in report.results.values():
        if r.scores is not None:
            report.notes = sorted(set(report.notes) | set(r.scores.notes))
    return report


class _Progress:
    """Rich progress bars on a terminal; plain log lines on stderr otherwise (rich shows nothing until the end
    when stderr is not a terminal, which hides a long run's progress in CI logs); nothing when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._p: Any = None
        self._plain: dict[int, list[Any]] = {}
        self._t0 = time.perf_counter()

    @contextlib.contextmanager
    def run(self) -> Iterator[_Progress]:
        if not self.enabled:
            yield self
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        if not console.is_terminal:
            self._console = console
            yield self
            return
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as p:
            self._p = p
            yield self
        self._p = None

    def task(self, description: str, total: int) -> Any:
        if not self.enabled:
            return None
        if self._p is not None:
            return self._p.add_task(description, total=total)
        tid = len(self._plain)
        self._plain[tid] = [description, total, 0]
        return tid

    def advance(self, task: Any, n: int = 1, **kw: Any) -> None:
        if not self.enabled or task is None:
            return
        if self._p is not None:
            self._p.update(task, advance=n, **kw)
            return
        st = self._plain[task]
        st[2] += n
        desc = kw.get("description", st[0])
        import sys

        print(f"[{time.perf_counter() - self._t0:7.1f}s] {desc}: {st[2]}/{st[1]}", file=sys.stderr, flush=True)


def run_attacks(
    observations: Sequence[Observation],
    pretrained_model: Any,
    split_cfg: SplitConfig,
    tokenizer: Any,
    aux_texts: Sequence[Any],
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    config: AttackSuiteConfig | None = None,
    *,
    ground_truth: Sequence[torch.Tensor] | Mapping[tuple[str, int], torch.Tensor] | None = None,
    transform: Transform | None = None,
    inverter: SIPInverter | None = None,
    progress: bool = True,
) -> AttackReport:
    """Reconstruct the client's tokens from ``observations`` with each attack; score if ``ground_truth`` is given.

    ``pretrained_model`` must hold the *pre-trained* weights (never the client's tuned adapters).
    ``transform`` is the public uplink mechanism (codec round trip, noise) used to train a defence-aware SIP.
    ``inverter`` reuses an already trained SIP (its training dominates the cost when sweeping settings).
    ``ground_truth`` is one B x L id tensor per observation (a list aligned with ``observations`` or a dict keyed
    by (session, step)); it is read only by :func:`score_report`, after all reconstructions.
    """
    cfg = config or AttackSuiteConfig()
    obs = list(observations)
    if cfg.max_observations is not None:
        obs = obs[: cfg.max_observations]
    if not obs:
        raise AttackConfigError("no observations to attack (is the transcript empty, or all evaluation steps?)")
    names = resolve_attacks(attacks)
    design = infer_design(obs)
    attacker = AttackerModel(pretrained_model, split_cfg)
    first = first_token_of(tokenizer)
    results: dict[str, AttackResult] = {n: AttackResult(n) for n in names}
    notes: list[str] = []
    sip_logits: list[torch.Tensor] = []
    holdout: float | None = None

    for n in names:
        if n in NEEDS_GRADIENTS and any(o.g2 is None or o.h2 is None for o in obs):
            results[n].skipped = "needs h2 and g2, which the provider never sees in this design"
    if any(o.h1 is None for o in obs):
        for n in ("sip", "bisr_f", "eia"):
            if n in results:
                results[n].skipped = "needs h1 (missing from the transcript)"

    if "sip" in results and results["sip"].skipped:
        for n in ("bisr_b", "bisr_f", "bisr_bf"):
            if n in results and not results[n].skipped:
                results[n].skipped = "needs SIP (its initialisation), which was skipped"

    with _Progress(progress).run() as prog:
        # ---------------------------------------------------------------- SIP
        if "sip" in results and not results["sip"].skipped:
            t0 = time.perf_counter()
            if inverter is None:
                aux_ids = encode_aux(aux_texts, tokenizer, cfg.aux_max_length)
                task = prog.task("SIP: train inverter", cfg.sip.epochs)
                inverter = train_sip_for(
                    attacker,
                    aux_ids,
                    cfg.sip,
                    transform=transform,
                    special_ids=list(getattr(tokenizer, "all_special_ids", []) or []),
                    progress=lambda e, E, loss: prog.advance(
                        task, description=f"SIP: train inverter (loss {loss:.3f})"
                    ),
                )
            holdout = inverter.holdout_rougeL
            results["sip"].info["holdout_rougeL_ids"] = holdout
            if not inverter.usable:
                notes.append(f"SIP held-out ROUGE-L {holdout:.3f} is below the keep threshold; its guesses are weak")
            task = prog.task("SIP: invert", len(obs))
            for o in obs:
                assert o.h1 is not None  # checked above: SIP is skipped when an observation lacks h1
                ids, logits = sip_attack(inverter, o.h1, o.mask)
                results["sip"].reconstructions.append(ids)
                sip_logits.append(logits)
                prog.advance(task)
            results["sip"].seconds = time.perf_counter() - t0

        def loop(name: str, fn: Any) -> None:
            res = results.get(name)
            if res is None or res.skipped:
                return
            t0 = time.perf_counter()
            task = prog.task(LABELS[name], len(obs))
            infos = []
            for i, o in enumerate(obs):
                rec = fn(i, o)
                res.reconstructions.append(rec.ids.cpu())
                infos.append(rec.info or {})
                prog.advance(task)
            res.seconds = time.perf_counter() - t0
            for key in ("distance", "loss"):
                vals = [float(x[key]) for x in infos if key in x]
                if vals:
                    res.info[f"mean_final_{key}"] = sum(vals) / len(vals)
            if any("refined_positions" in x for x in infos):
                res.info["refined_positions"] = int(sum(x.get("refined_positions", 0) for x in infos))

        bisr_b_recs: list[Any] = []

        def run_b(i: int, o: Observation) -> Any:
            assert o.h2 is not None and o.g2 is not None  # checked above: BiSR(b) is skipped without them
            rec = bisr_b(attacker, o.h2, o.g2, o.mask, sip_logits[i], cfg.bisr_b, first_token=first)
            if first is None:
                rec.ids[:, 0] = results["sip"].reconstructions[i][:, 0]  # x₀ is no label: keep SIP's guess
            bisr_b_recs.append(rec)
            return rec

        loop("bisr_b", run_b)
        loop(
            "bisr_f",
            lambda i, o: bisr_f(
                attacker, o.h1, o.mask, results["sip"].reconstructions[i], cfg.bisr_f, init_logits=sip_logits[i]
            ),
        )
        if (
            "bisr_bf" in results
            and not results["bisr_bf"].skipped
            and (results["bisr_b"].skipped or results["sip"].skipped)
        ):
            results["bisr_bf"].skipped = "needs BiSR(b)"
        if "bisr_bf" in results and any(o.h1 is None for o in obs):
            results["bisr_bf"].skipped = "needs h1 (missing from the transcript)"
        loop(
            "bisr_bf",
            lambda i, o: bisr_f(
                attacker, o.h1, o.mask, bisr_b_recs[i].ids, cfg.bisr_f, init_logits=bisr_b_recs[i].logits
            ),
        )
        loop("tag", lambda i, o: tag(attacker, o.h2, o.g2, o.mask, cfg.tag, first_token=first))
        loop("lamp", lambda i, o: lamp(attacker, o.h2, o.g2, o.mask, cfg.lamp, first_token=first))
        loop("eia", lambda i, o: eia(attacker, o.h1, o.mask, cfg.eia))

    report = AttackReport(
        design=design,
        results=results,
        n_observations=len(obs),
        n_sequences=sum(o.batch_size for o in obs),
        text_mode=cfg.text_mode,
        sip_holdout_rougeL=holdout,
        config=cfg.as_dict(),
        notes=notes,
    )
    if "bisr_f" in results or "bisr_bf" in results:
        report.notes.append("BiSR(f) runs on h1 exactly as observed (after the uplink codec / noise)")
    if ground_truth is not None:
        score_report(report, obs, ground_truth, tokenizer, cfg.text_mode)
    report.inverter = inverter
    return report
