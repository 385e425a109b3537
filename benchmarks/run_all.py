"""``make bench``: run every benchmark in turn; each prints JSON lines on stdout.

Every selected bench is imported before any runs, and a bench that fails to import stops the whole run with a
non-zero exit naming it and the error: a silently skipped bench would leave a hole in the results that looks
like a pass (tests/cli/test_run_all.py imports them all in CI).

    python -m benchmarks.run_all [bench_name ...]
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

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


def load_benches(names: list[str]) -> tuple[dict[str, ModuleType], list[str]]:
    """Import ``benchmarks.<name>`` for each name; return (modules, one error line per bench that failed)."""
    modules: dict[str, ModuleType] = {}
    errors: list[str] = []
    for name in names:
        try:
            modules[name] = importlib.import_module(f"benchmarks.{name}")
        except Exception as exc:  # noqa: BLE001 - any import failure is reported by name, none is skipped
            errors.append(f"run_all: benchmark {name} failed to import: {type(exc).__name__}: {exc}")
    return modules, errors


def main(argv: list[str] | None = None) -> int:
    only = list(sys.argv[1:] if argv is None else argv)
    unknown = [n for n in only if n not in BENCHES]
    if unknown:
        print(f"run_all: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    modules, errors = load_benches([n for n in BENCHES if not only or n in only])
    if errors:
        for line in errors:
            print(line, file=sys.stderr)
        return 2
    rc = 0
    for name, mod in modules.items():
        print(f'{{"bench": "run_all", "running": "{name}"}}', flush=True)
        rc |= int(mod.main([]) or 0)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
