"""``make bench-quick``: the headline ratios of issue 19 in a few minutes (docs/results/perf.md has the full runs).

Runs a short ``bench_channel --wire`` (a 64 MiB activation through encode -> CURVE / plaintext -> decode, one frame
vs 1 MiB chunks) and ``bench_online --quick`` (Online and Gradfree, unpipelined and with 2 and 4 micro-batches, against a
local LoRA step at one thread; the client's peak memory against a full fine-tune), prints their JSON lines, then
one ``quick_headline`` line and a few lines of text with the ratios and their targets.

    python -m benchmarks.bench_quick
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from typing import Any


def _run(main: Any, argv: list[str]) -> list[dict[str, Any]]:
    """Run a bench's ``main(argv)``, echo its JSON lines, return them parsed."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(argv)
    rows = []
    for line in buf.getvalue().splitlines():
        if line.startswith("{"):
            print(line, flush=True)
            rows.append(json.loads(line))
    return rows


def main(argv: list[str] | None = None) -> int:
    from benchmarks import bench_channel, bench_online

    t0 = time.perf_counter()
    load = os.getloadavg()
    wire = _run(bench_channel.main, ["--wire", "--size-mib", "64", "--chunks", "none,1024", "--reps", "3"])
    online = _run(bench_online.main, ["--quick"])
    ratio = {r["chunk_kib"]: r for r in wire if r["bench"] == "channel_wire_ratio"}
    summary = next(r for r in online if r["bench"] == "online_summary")
    headline = {
        "bench": "quick_headline",
        "curve_mib_per_s_1mib_chunks": ratio[1024]["curve_mib_per_s"],
        "curve_mib_per_s_one_frame": ratio[None]["curve_mib_per_s"],
        "curve_over_plain_1mib_chunks": ratio[1024]["curve_over_plain"],
        "curve_over_plain_by_cpu_1mib_chunks": ratio[1024]["curve_over_plain_by_cpu"],
        "online_over_local": summary["online_over_local_t1"],
        "online_best_micro_batches": summary["online_best_micro_batches"],
        "online_unpipelined_over_local": summary["online_unpipelined_over_local_t1"],
        "gradfree_over_local": summary["gradfree_over_local_t1"],
        "gradfree_best_micro_batches": summary["gradfree_best_micro_batches"],
        "gradfree_unpipelined_over_local": summary["gradfree_unpipelined_over_local_t1"],
        "client_peak_over_full_finetune": summary.get("client_peak_over_full_finetune"),
        "client_train_peak_over_full_finetune": summary.get("client_train_peak_over_full_finetune"),
        "loadavg_before": [round(x, 2) for x in load],
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(headline), flush=True)
    lines = [
        f"CURVE, 64 MiB activation, 1 MiB chunks: {headline['curve_mib_per_s_1mib_chunks']} MiB/s "
        f"(one frame: {headline['curve_mib_per_s_one_frame']}); CURVE / plaintext "
        f"{headline['curve_over_plain_1mib_chunks']} wall, {headline['curve_over_plain_by_cpu_1mib_chunks']} by CPU "
        "(targets: >= 800 MiB/s for 256 MiB, >= 0.5)",
        f"Online step / local LoRA step: {headline['online_over_local']} at its best "
        f"({headline['online_best_micro_batches']} micro-batch(es)), {headline['online_unpipelined_over_local']} "
        "unpipelined (target <= 0.70)",
        f"Gradfree step / local LoRA step: {headline['gradfree_over_local']} at its best "
        f"({headline['gradfree_best_micro_batches']} micro-batch(es)), {headline['gradfree_unpipelined_over_local']} "
        "unpipelined (target <= 0.45)",
        f"client peak RSS / full fine-tune: {headline['client_peak_over_full_finetune']} "
        f"(training step alone: {headline['client_train_peak_over_full_finetune']}; target <= 0.35)",
        f"load average before: {headline['loadavg_before'][0]} on {os.cpu_count()} CPUs; {headline['wall_s']} s",
    ]
    print("\n".join(lines), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
