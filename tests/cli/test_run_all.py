"""Every benchmark imports, and ``make bench`` (benchmarks/run_all.py) refuses to skip one that does not.

Most benches import the package lazily inside ``main``, so importing the module alone would miss a moved or
renamed module (the layout consolidation of issue 14 did exactly that); the second test resolves every
``guardedp2p`` / ``tests`` / ``benchmarks`` import in each bench's source, nested ones included, and refuses the
deprecated old paths of :mod:`guardedp2p._compat`.
"""

from __future__ import annotations

import ast
import importlib
import types
from pathlib import Path

import pytest

from benchmarks import run_all
from guardedp2p._compat import MOVED

ROOT = Path(__file__).resolve().parents[2]
BENCH_FILES = sorted((ROOT / "benchmarks").glob("bench_*.py"))
OWN_PACKAGES = ("guardedp2p", "tests", "benchmarks")


def test_there_are_benches_to_check():
    assert len(BENCH_FILES) >= 8, BENCH_FILES


@pytest.mark.parametrize("path", BENCH_FILES, ids=lambda p: p.stem)
def test_bench_module_imports_and_has_main(path: Path):
    mod = importlib.import_module(f"benchmarks.{path.stem}")
    assert callable(getattr(mod, "main", None)), f"{path.name} has no main(argv)"


def _own_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) of every import of this project's own packages, at any depth."""
    out: list[tuple[int, str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mod = node.module
            if mod.split(".")[0] in OWN_PACKAGES:
                out.append((node.lineno, mod, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in OWN_PACKAGES:
                    out.append((node.lineno, a.name, []))
    return out


@pytest.mark.parametrize("path", BENCH_FILES, ids=lambda p: p.stem)
def test_every_import_inside_a_bench_resolves(path: Path):
    problems = []
    for line, mod, names in _own_imports(path):
        if mod in MOVED:
            problems.append(f"{path.name}:{line}: {mod} is a deprecated alias; import {MOVED[mod]}")
            continue
        try:
            module = importlib.import_module(mod)
        except ImportError as exc:
            problems.append(f"{path.name}:{line}: import {mod}: {exc}")
            continue
        for name in names:
            if name == "*" or hasattr(module, name):
                continue
            if f"{mod}.{name}" in MOVED:
                problems.append(f"{path.name}:{line}: {mod}.{name} is a deprecated alias")
                continue
            try:
                importlib.import_module(f"{mod}.{name}")
            except ImportError:
                problems.append(f"{path.name}:{line}: {mod} has no {name}")
    assert not problems, "\n".join(problems)


def test_run_all_lists_only_existing_benches():
    stems = {p.stem for p in BENCH_FILES}
    assert set(run_all.BENCHES) <= stems, set(run_all.BENCHES) - stems


def test_run_all_fails_naming_a_bench_that_does_not_import(monkeypatch, capsys):
    ran: list[str] = []
    good = types.ModuleType("benchmarks.bench_good")
    good.main = lambda argv: ran.append("good") or 0  # type: ignore[attr-defined]
    real_import = importlib.import_module

    def fake_import(name: str, package: str | None = None):
        if name == "benchmarks.bench_good":
            return good
        if name == "benchmarks.bench_broken":
            raise ImportError("cannot import name 'gone' from 'guardedp2p.somewhere'")
        return real_import(name, package)

    monkeypatch.setattr(run_all, "BENCHES", ["bench_good", "bench_broken"])
    monkeypatch.setattr(run_all.importlib, "import_module", fake_import)
    rc = run_all.main([])
    err = capsys.readouterr().err
    assert rc != 0
    assert "bench_broken" in err and "cannot import name 'gone'" in err, err
    assert ran == [], "no bench may run when one of the selected benches is broken"


def test_run_all_runs_the_selected_benches_in_order(monkeypatch, capsys):
    ran: list[str] = []

    def bench(name: str, rc: int) -> types.ModuleType:
        mod = types.ModuleType(f"benchmarks.{name}")
        mod.main = lambda argv: ran.append(name) or rc  # type: ignore[attr-defined]
        return mod

    mods = {"benchmarks.bench_a": bench("bench_a", 0), "benchmarks.bench_b": bench("bench_b", 1)}
    monkeypatch.setattr(run_all, "BENCHES", ["bench_a", "bench_b"])
    monkeypatch.setattr(run_all.importlib, "import_module", lambda name, package=None: mods[name])
    assert run_all.main(["bench_a"]) == 0 and ran == ["bench_a"]
    ran.clear()
    assert run_all.main([]) == 1 and ran == ["bench_a", "bench_b"]  # a failing bench fails the run
    assert '"running": "bench_b"' in capsys.readouterr().out


def test_run_all_refuses_an_unknown_bench_name(capsys):
    assert run_all.main(["bench_typo"]) == 2
    assert "bench_typo" in capsys.readouterr().err
