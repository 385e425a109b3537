"""``make bench``: run every benchmark in turn; each prints JSON lines on stdout."""

from __future__ import annotations

import importlib
import sys

BENCHES = [
    "bench_channel",
    "bench_codecs",
    "bench_fuzz",
    "bench_online",
    "bench_gradfree",
    "bench_defences",
    "bench_multiclient",
    "bench_big_models",
]


def main() -> int:
    rc = 0
    only = sys.argv[1:]
    for name in BENCHES:
        if only and name not in only:
            continue
        try:
            mod = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError:
            continue
        print(f'{{"bench": "run_all", "running": "{name}"}}', flush=True)
        rc |= int(mod.main([]) or 0)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
