"""The privacy-utility picture of an evaluation grid (and the accuracy-vs-bytes picture of the codec bench).

Drawn with matplotlib's Agg canvas directly (no pyplot, no global backend switch), so it works headless and
never changes the plotting state of a program that imports guardedp2p.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _canvas(width: float = 7.5, height: float = 5.0) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def plot_privacy_utility(rows: Sequence[dict[str, Any]], path: str | Path, *, metric: str = "acc") -> Path:
    """x = task metric after tuning, y = best attack ROUGE-L, marker area proportional to bytes per step.

    A row without an online exchange (Offline) is drawn as a hollow marker on y = 0 and labelled "n/a".
    """
    fig, ax = _canvas()
    bps = [(_num(r["cost"].get("bytes_per_step")) or 0.0) for r in rows]
    top = max(bps) if bps and max(bps) > 0 else 1.0
    placed: list[tuple[float, float]] = []
    # big markers first so that smaller ones drawn later stay visible on top of them
    for i in sorted(range(len(rows)), key=lambda k: -bps[k]):
        r = rows[i]
        x = _num(r["utility"].get("after"))
        y = _num(r["privacy"].get("best_rougeL"))
        if x is None:
            continue
        size = 40 + 600 * (bps[i] / top)
        colour = f"C{i % 10}"
        na = y is None
        y = 0.0 if y is None else y
        if na:
            ax.scatter([x], [y], s=size, facecolors="none", edgecolors=colour, marker="s", linewidths=1.5)
        else:
            ax.scatter([x], [y], s=size, color=colour, alpha=0.75, edgecolors="black", linewidths=0.5)
        # rows landing on the same spot get their labels stacked instead of printed over each other
        same = sum(1 for (px, py) in placed if abs(px - x) < 0.01 and abs(py - y) < 0.03)
        placed.append((x, y))
        label = f"{r['label']} (privacy n/a)" if na else r["label"]
        ax.annotate(
            label,
            (x, y),
            textcoords="offset points",
            xytext=(8, 6 - 10 * same),
            fontsize=7,
            color=colour if not na else "black",
        )
    ax.margins(x=0.25)
    ax.axhline(0.8, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel(
        f"utility: eval {metric} after tuning" + (" (higher is better)" if metric == "acc" else " (lower is better)")
    )
    ax.set_ylabel("privacy: best attack ROUGE-L F1 (lower is better)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("privacy vs utility (marker area ~ bytes per training step)", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(out))
    return out


def plot_accuracy_vs_bytes(points: Sequence[dict[str, Any]], path: str | Path, *, metric: str = "acc") -> Path:
    """Codec bench: x = bytes per step (log), y = eval metric after tuning; one labelled marker per setting."""
    fig, ax = _canvas()
    for i, p in enumerate(points):
        x, y = _num(p.get("bytes_per_step")), _num(p.get("eval_after"))
        if x is None or y is None or x <= 0:
            continue
        ax.scatter([x], [y], color=f"C{i % 10}", s=50, edgecolors="black", linewidths=0.5)
        ax.annotate(str(p.get("label", "")), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("bytes per training step (up + down, log scale)")
    ax.set_ylabel(f"eval {metric} after tuning")
    ax.set_title("Online: accuracy vs traffic per codec and dCor strength", fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(out))
    return out


__all__ = ["plot_privacy_utility", "plot_accuracy_vs_bytes"]
