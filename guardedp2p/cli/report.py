"""Human-readable run summaries (rich tables)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def print_summary(s: dict[str, Any], console: Console) -> None:
    t = Table(title=f"guardedp2p {s.get('protocol', '?')} run", show_header=True)
    t.add_column("metric")
    t.add_column("value", justify="right")
    metric = s.get("eval_metric", "eval")
    rows = [
        ("steps", f"{s.get('steps')}"),
        (
            "train loss first → last",
            f"{s.get('loss_first', float('nan')):.3f} → {s.get('loss_last', float('nan')):.3f}",
        ),
        (
            f"eval {metric} before → after",
            f"{s.get('eval_before', float('nan')):.3f} → {s.get('eval_after', float('nan')):.3f}",
        ),
        ("bytes up / down (total)", f"{_fmt_bytes(s.get('bytes_up', 0))} / {_fmt_bytes(s.get('bytes_down', 0))}"),
        ("bytes per training step", _fmt_bytes(s.get("bytes_per_step", 0))),
    ]
    if "bytes_per_step_fp32" in s:
        rows.append(("saving vs fp32 wire", f"{100 * (1 - s['bytes_per_step'] / s['bytes_per_step_fp32']):.1f} %"))
    rows.append(("gradient bytes on the wire", _fmt_bytes(s.get("gradient_bytes", 0))))
    if "cache_hits" in s:
        rows.append(("trunk cache hits / misses", f"{s['cache_hits']} / {s['cache_misses']}"))
    ts = s.get("time_split") or {}
    if ts:
        rows.append(
            (
                "time client / provider / wire / codec",
                f"{ts.get('client_compute_s')} / {ts.get('provider_compute_s')} / {ts.get('wire_s')} / {ts.get('serialisation_s')} s",
            )
        )
    rows.append(("wall time", f"{s.get('wall_s', 0):.1f} s"))
    if s.get("codecs"):
        rows.append(("codecs", ", ".join(f"{k}={v}" for k, v in s["codecs"].items())))
    if "plug_in" in s:  # offline: the five numbers, as offsite-tuning reports them

        def _n(key: str) -> str:
            v = s.get(key)
            return f"{v:.3f}" if isinstance(v, (int, float)) else "–"

        rows.append((f"five numbers ({metric})", ""))
        rows.append(("  full model zero-shot → fine-tuned", f"{_n('zero_shot_full')} → {_n('full_finetune')}"))
        rows.append(("  emulator zero-shot → fine-tuned", f"{_n('emulator_zero_shot')} → {_n('emulator_finetune')}"))
        rows.append(("  plug-in (your adapters, full model)", _n("plug_in")))
        if isinstance(s.get("param_fraction"), (int, float)):
            rows.append(("provider parameters you received", f"{100 * s['param_fraction']:.1f} %"))
    if s.get("adapter_dir"):
        rows.append(("adapter (PEFT folder)", str(s["adapter_dir"])))
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
