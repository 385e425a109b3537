"""The frontier's three files: frontier.json (every number), frontier.md (the table a reader reads) and
frontier.png (privacy against utility, the Pareto front marked, marker area ~ bytes per training step)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HEADLINE_COMMAND = "nice -n 10 guardedp2p evaluate --threads 1"


def _ip(row: dict[str, Any]) -> str:
    """IP exposure (share of the weights the client holds) and what those weights weigh in fp32."""
    if row.get("ip_exposure") is None:
        return "n/a"
    mib = row.get("client_weights_mib")
    return f"{100 * row['ip_exposure']:.1f}%" + (f" ({mib:.0f} MiB)" if mib is not None else "")


def _f(x: Any, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{float(x):.{nd}f}"


def _ci(ci: Any, nd: int = 3) -> str:
    return "" if not ci else f" [{_f(ci[0], nd)}, {_f(ci[1], nd)}]"


def _bytes(b: Any) -> str:
    if not b:
        return "0"
    b = float(b)
    return f"{b / 1e6:.2f} MB" if b >= 1e5 else f"{b / 1e3:.1f} kB"


#: The order private fields are shown in; fields a task adds are shown after these.
FIELD_ORDER = ("name", "born", "address", "account", "diagnosis")


def _fields_table(rows: Sequence[Mapping[str, Any]], broken: bool) -> list[str]:
    """Secrets recovered field by field, for the attack that recovers most of them.

    Why: one secrets fraction averages a name with a diagnosis, and ROUGE-L over the whole record mostly scores
    the template and the task's own inputs. Whoever signs off on a deployment asks which fields leak: a row can
    keep every identifier and still give away the one field the task needs in the clear."""
    per = [
        (r["label"], r["privacy"]["secrets_per_field"], r["privacy"].get("secrets_attack", ""))
        for r in rows
        if r["privacy"].get("secrets_per_field") and not broken
    ]
    if not per:
        return []
    seen = {k for _, fields, _ in per for k in fields}
    cols = [f for f in FIELD_ORDER if f in seen] + sorted(seen - set(FIELD_ORDER))
    out = [
        "## Which private fields the attacker recovers",
        "",
        "Fraction of each private field rebuilt exactly, by the attack that recovers the most secrets (usually the "
        "adaptive inverter; the format prior recovers almost none). The task's hidden rules read the diagnosis, "
        "so a defence that keeps the task leaves it readable; names, birth dates, addresses and account numbers "
        "are what no rule needs.",
        "",
        "| row | attack | " + " | ".join(cols) + " |",
        "|---|---|" + "---:|" * len(cols),
    ]
    for label, fields, attack in per:
        out.append(f"| {label} | {attack} | " + " | ".join(_f(fields.get(c)) for c in cols) + " |")
    out.append("")
    return out


def frontier_markdown(result: Mapping[str, Any]) -> str:
    """The human-readable report (no number in it that is not in frontier.json)."""
    rows = result["rows"]
    broken = result.get("harness_broken")
    out = ["# Privacy-utility frontier", ""]
    if result.get("command"):
        out += [
            "Produced by (from the repository root, resumable: the same command continues an interrupted grid):",
            "",
            "```",
            result["command"],
            "```",
            "",
        ]
    if not result.get("headline", False):
        out += [
            f"> This is **not** the full headline grid. That one is `{HEADLINE_COMMAND}` (no defence, each defence family "
            "at its headline point, Gradfree, Offline and the Local LoRA reference, 3 training seeds).",
            "",
        ]
    out += [
        f"Model {result['model']}, task `{result['task']}`, split {result['split'][0]}/{result['split'][1]}, recipe "
        f"{result['recipe']['steps']} steps x batch {result['recipe']['batch_size']}, lr {result['recipe']['lr']:g}, LoRA r={result['lora']['r']}; "
        f"{result['seeds']} training seed(s) {result.get('seed_list')}, {result['eval_items']} multiple-choice items, "
        f"{result.get('nll_records', 0)} NLL records; wall time {result['wall_s'] / 60:.1f} min "
        f"(torch threads {result.get('torch_threads')}, cached units are not re-run).",
        "",
    ]
    gate = result["sanity"]
    if broken:
        out += [
            "> **The attack harness is broken.** " + gate["message"],
            "> The privacy columns below are withheld.",
            "",
        ]
    elif gate.get("ok") is None:
        out += ["> **Sanity gate not run:** " + gate["message"], ""]
    else:
        out += [f"Sanity gate passed: {gate['message']}.", ""]
    prior = result.get("prior")
    if prior and not broken:
        out += [
            f"**Read every ROUGE-L against the format prior: {_f(prior['rougeL'])}{_ci(prior['ci95'])}** (secrets "
            f"{_f(prior['secrets_recovered'])}): the score of one fixed guess, the most typical auxiliary record, "
            "sent for every sequence: an attacker who knows only the records' format and sees nothing. A defence "
            "near this floor leaks little beyond the template; the secrets column says what leaked of the private "
            "fields themselves.",
            "",
        ]
    out += [
        "| row | defence | seeds | acc [95% CI] | loss vs local, pts [CI] | NLL diff vs local [CI] | best attack ROUGE-L [CI] | "
        "worst seq | secrets | seqs / steps | bytes/step | client s/step | IP exposure (client weights) | Pareto |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for r in rows:
        u, p = r["utility"], r["privacy"]
        if p.get("not_applicable"):
            priv = ["n/a", "n/a", "n/a", "0"]
        elif broken:
            priv = ["withheld", "withheld", "withheld", f"{p['sequences']} / {p['steps_observed']}"]
        else:
            priv = [
                f"{_f(p['best_rougeL'])}{_ci(p['ci95'])}",
                _f(p["worst_rougeL"]),
                _f(p["secrets_recovered"]),
                f"{p['sequences']} / {p['steps_observed']}",
            ]
        bps = (
            _bytes(r["bytes_per_step"])
            if r["bytes_per_step"]
            else (f"0 ({_bytes(r['one_off_bytes'])} once)" if r.get("one_off_bytes") else "0")
        )
        out.append(
            f"| {r['label']}{' †' if r.get('carried') else ''} | {r['defence']} | {len(r.get('seeds') or []) or ''} | {_f(u['acc'])}{_ci(u['ci95'])} | {_f(u['loss_pts_vs_local'], 1)}{_ci(u['loss_ci95'], 1)} | "
            f"{_f(u.get('nll_diff_vs_local'))}{_ci(u.get('nll_diff_ci95'))} | {priv[0]} | {priv[1]} | {priv[2]} | {priv[3]} | {bps} | "
            f"{_f(r['client_s_per_step'], 3)} | {_ip(r)} | "
            f"{'yes' if r.get('pareto') else ''} |"
        )
    carried = [r for r in rows if r.get("carried")]
    if carried:
        sources = sorted({(r["carried"].get("from", ""), r["carried"].get("command", "")) for r in carried})
        out += [
            "",
            "† Carried unchanged from an earlier measurement with the same settings (model, task, recipe, split, "
            "LoRA, items, attacks): their runs were no longer in this machine's cache, so they were not re-run. "
            + " ".join(f"Source: `{src}`, produced by `{cmd}`." for src, cmd in sources)
            + "".join(
                f" Their utility losses are paired against the Local LoRA runs of that measurement (accuracy "
                f"{_f(ref['acc'])}{_ci(ref.get('ci95'))}, seeds {ref.get('seeds')}), not against the Local LoRA row above."
                for ref in {
                    json.dumps(r["carried"]["reference"], sort_keys=True): r["carried"]["reference"]
                    for r in carried
                    if r["carried"].get("reference")
                }.values()
            )
            + (
                " The format prior is carried with the undefended Online row."
                if (result.get("prior") or {}).get("carried")
                else ""
            ),
        ]
    seed_counts = {len(r.get("seeds") or []) for r in rows}
    if len(seed_counts) > 1:
        out += [
            "",
            f"Rows with fewer seeds are sweep points (`--sweep-rows`), measured on the first seed only: their CIs are "
            f"over items, not over training seeds; the headline rows ran every seed in {result.get('seed_list')}.",
        ]
    out += ["", "![privacy vs utility](frontier.png)", ""]
    attackers = [(r["label"], r["privacy"]) for r in rows if r["privacy"].get("convergence")]
    if attackers:
        out += [
            "## The attacker's convergence",
            "",
            "Held-out ROUGE-L of the adaptive inverter on auxiliary records it never trained on, against its optimiser steps "
            "(it stops once the score has plateaued).",
            "",
            "![attacker convergence](frontier_convergence.png)",
            "",
            "| mechanism (row) | aux records | snapshots (steps) | curve: step -> held-out ROUGE-L | plateaued |",
            "|---|---:|---|---|:-:|",
        ]
        for label, p in attackers:
            a = p.get("attacker") or {}
            curve = ", ".join(f"{c['step']}: {c['rougeL']:.3f}" for c in p["convergence"])
            out.append(
                f"| {a.get('mechanism', '?')} ({label}) | {a.get('aux_train', '?')} | {a.get('snapshot_steps')} | {curve} | "
                f"{'yes' if a.get('plateaued') else '**no**'} |"
            )
        out.append("")
    by_attack = [
        (r["label"], r["privacy"]["per_attack"]) for r in rows if r["privacy"].get("per_attack") and not broken
    ]
    if by_attack:
        out += [
            "## Every attack on every row",
            "",
            "Mean and worst per-sequence ROUGE-L, token accuracy (position by position) and secrets recovered of each "
            "attack; the table above reports the best one.",
            "",
            "| row | attack | mean ROUGE-L | worst seq | token acc | secrets |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for label, attacks in by_attack:
            for name, a in attacks.items():
                out.append(
                    f"| {label} | {name} | {_f(a.get('mean_rougeL'))} | {_f(a.get('worst_rougeL'))} | "
                    f"{_f(a.get('token_acc'))} | {_f(a.get('secrets_recovered'))} |"
                )
        out.append("")
    out += _fields_table(rows, bool(broken))
    leaks = [(r["label"], r["privacy"]["most_leaked"]) for r in rows if r["privacy"].get("most_leaked") and not broken]
    if leaks:
        out += ["## The most-leaked sequence of each row", ""]
        for label, m in leaks:
            out += [
                f"- **{label}** (step {m['step']}, ROUGE-L {m['rougeL']:.3f})",
                f"  - sent: `{m['ref']}`",
                f"  - rebuilt: `{m['hyp']}`",
            ]
        out.append("")
    comp = result.get("compute") or {}
    if comp:
        per = ", ".join(f"{k} {v / 60:.1f}" for k, v in comp.get("runs_s", {}).items())
        out += [
            "## Budget",
            "",
            f"Compute of this grid when each unit ran: {comp['total_s'] / 60:.1f} min of wall time in total "
            f"({comp['total_s'] / 3600:.2f} h; {comp.get('total_cpu_s', 0) / 3600:.2f} h of CPU time, which a busy shared machine "
            f"does not stretch): runs {per} min (all seeds of a row), {comp['attackers']} attacker(s) "
            f"{comp['attackers_s'] / 60:.1f} min. Units are "
            "cached under `--out` by a hash of everything they depend on: an interrupted grid resumes, a grown grid runs only "
            "what is new.",
            "",
        ]
        head = comp.get("headline") or {}
        if head:
            out += [
                f"The headline rows alone ({', '.join(head['rows'])}, every seed, and their {head['attackers']} "
                f"attacker(s)) took {head['cpu_s'] / 3600:.2f} h of CPU time: about {head['two_core_wall_h_estimate']:.2f} h "
                "of wall time on 2 cores with two single-threaded `--runs-only` processes sharing `--out`.",
                "",
            ]
    out += [
        "## How the numbers are made",
        "",
        "- **Utility**: accuracy on held-out multiple-choice items of new people; 95% CI by a two-level bootstrap that resamples "
        "training seeds and items (paired: the same items for every seed). *Loss vs local* = local-LoRA accuracy minus the row's, "
        "in points, each seed paired with the local run of the same seed on the same items (`guardedp2p/evaluate/stats.py`). "
        "The NLL difference is the same paired statistic on the mean NLL of the hidden-rule code tokens of held-out records.",
        "- **Privacy**: training steps spread evenly over each run (first to last) are taken from the provider's recorded "
        "transcript; each distinct sequence sent at those steps is reconstructed. *best attack ROUGE-L* is the best attack's "
        "mean per-sequence ROUGE-L F1 (detokenised text), with a bootstrap CI over the attacked sequences pooled over seeds that "
        "also resamples which attack is best; *worst seq* is the most-leaked sequence's ROUGE-L; *secrets* is the fraction of "
        "private fields (name, address, date of birth, account number, diagnosis) present in a sequence that the reconstruction "
        "reproduces exactly.",
        "- **The attacker** knows the pre-trained model, holds auxiliary records of other people, and knows the defence and the "
        "client's recipe: it replays the client's fine-tuning (same LoRA, steps, learning rate, dCor weight, noise) on its "
        "auxiliary data, keeps the bottom at the start, middle and end of that replay, and trains a bi-GRU inverter (SIP) on "
        "their activations passed through the same mechanism (noise at the same scale, the codec's round trip) "
        "(`guardedp2p/attacks/adaptive.py`).",
        f"- **Sanity gate**: the undefended Online row must reach best ROUGE-L >= {gate['min_rougeL']} and secrets >= "
        f"{gate['min_secrets']}, or the harness is declared broken and no privacy number is printed.",
        "- **Pareto front**: rows with a privacy number that no other row beats on both accuracy and best ROUGE-L. Local LoRA "
        "(nothing leaves the client, but the client needs the whole model) and Offline (no per-step exchange; the client "
        "receives an emulator) have no privacy number and are drawn as hollow squares below the axis.",
        "- **Cost**: wire bytes per training step (up + down, measured on the channel), the client's own compute per step, "
        "and IP exposure = the share of the provider's parameters the client holds.",
        "",
    ]
    return "\n".join(out)


NA_Y = -0.08  # where rows without a privacy number (Local LoRA, Offline) are drawn, below the axis


def plot_frontier(rows: Sequence[Mapping[str, Any]], path: str | Path, *, harness_broken: bool = False) -> Path:
    """x = accuracy (CI bars), y = best-attack ROUGE-L (CI bars), marker area ~ bytes per step; Pareto front joined."""
    from guardedp2p.evaluate.plot import _canvas

    fig, ax = _canvas(8.0, 5.5)
    bps = [float(r.get("bytes_per_step") or 0.0) for r in rows]
    top = max(bps) if bps and max(bps) > 0 else 1.0
    front = []
    placed: list[tuple[float, float]] = []

    def label_at(text: str, x: float, y: float, colour: str) -> None:
        # rows landing on the same spot get their labels stacked instead of printed over each other
        same = sum(1 for (px, py) in placed if abs(px - x) < 0.02 and abs(py - y) < 0.04)
        placed.append((x, y))
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(8, 6 - 10 * same), fontsize=7, color=colour)

    for i in sorted(range(len(rows)), key=lambda k: -bps[k]):
        r = rows[i]
        u, p = r["utility"], r["privacy"]
        x = u.get("acc")
        if x is None:
            continue
        y = None if (p.get("not_applicable") or harness_broken) else p.get("best_rougeL")
        colour = f"C{i % 10}"
        size = 40 + 700 * (bps[i] / top)
        xerr = [[x - u["ci95"][0]], [u["ci95"][1] - x]] if u.get("ci95") else None
        if y is None:
            ax.scatter([x], [NA_Y], s=60, facecolors="none", edgecolors=colour, marker="s", linewidths=1.5, zorder=3)
            ax.errorbar([x], [NA_Y], xerr=xerr, fmt="none", ecolor=colour, alpha=0.6)
            label_at(f"{r['label']} (privacy n/a)", x, NA_Y, colour)
            continue
        yerr = [[y - p["ci95"][0]], [p["ci95"][1] - y]] if p.get("ci95") else None
        ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="none", ecolor=colour, alpha=0.6)
        on = bool(r.get("pareto"))
        ax.scatter(
            [x], [y], s=size, color=colour, alpha=0.8, edgecolors="black", linewidths=2.0 if on else 0.5, zorder=3
        )
        label_at(r["label"] + (" *" if on else ""), x, y, colour)
        if on:
            front.append((x, y))
    if len(front) > 1:
        front.sort()
        ax.plot(
            [a for a, _ in front],
            [b for _, b in front],
            color="black",
            linestyle="--",
            linewidth=1,
            label="Pareto front (*)",
        )
        ax.legend(loc="upper left", fontsize=7)
    ax.margins(x=0.2)
    ax.set_xlabel("utility: held-out accuracy (higher is better), 95% CI")
    ax.set_ylabel("privacy: best attack ROUGE-L F1 (lower is better), 95% CI")
    ax.axhline(0.0, color="grey", linewidth=0.6)
    ax.set_ylim(NA_Y - 0.07, 1.05)
    title = "privacy vs utility (marker area ~ bytes per training step)"
    if harness_broken:
        title += "\nHARNESS BROKEN: privacy withheld"
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(out))
    return out


def plot_convergence(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Held-out ROUGE-L of each row's adaptive inverter against its optimiser steps (one line per attacker)."""
    from guardedp2p.evaluate.plot import _canvas

    fig, ax = _canvas(7.0, 4.0)
    for i, r in enumerate(rows):
        curve = r["privacy"].get("convergence") or []
        if not curve:
            continue
        ax.plot(
            [c["step"] for c in curve],
            [c["rougeL"] for c in curve],
            marker="o",
            markersize=3,
            color=f"C{i % 10}",
            label=r["label"],
        )
    ax.set_xlabel("attacker's inverter: optimiser steps")
    ax.set_ylabel("held-out aux ROUGE-L F1")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("adaptive attacker convergence (stops at a plateau)", fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(out))
    return out


FINDINGS_MARKER = "<!-- findings: written by hand, kept when the report is regenerated -->"


def write_reports(result: dict[str, Any], folder: Path) -> dict[str, str]:
    """Write frontier.json / .md / .png (and the attackers' convergence plot) into ``folder``; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "json": str(folder / "frontier.json"),
        "md": str(folder / "frontier.md"),
        "png": str(folder / "frontier.png"),
        "convergence_png": str(folder / "frontier_convergence.png"),
    }
    plot_frontier(result["rows"], files["png"], harness_broken=bool(result.get("harness_broken")))
    plot_convergence(result["rows"], files["convergence_png"])
    md = folder / "frontier.md"
    kept = ""
    if md.is_file():  # the hand-written findings below the marker survive a regenerated table
        old = md.read_text(encoding="utf-8")
        if FINDINGS_MARKER in old:
            kept = old[old.index(FINDINGS_MARKER) :]
    md.write_text(frontier_markdown(result) + "\n" + (("\n" + kept) if kept else ""), encoding="utf-8")
    (folder / "frontier.json").write_text(json.dumps({**result, "files": files}, indent=2) + "\n")
    return files


__all__ = ["FINDINGS_MARKER", "frontier_markdown", "plot_convergence", "plot_frontier", "write_reports"]
