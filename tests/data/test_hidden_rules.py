"""guardedp2p.data.hidden_rules and ``guardedp2p data make-demo``: deterministic, sized, disjoint, balanced, and
every hidden rule the same in every file."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from guardedp2p.data.hidden_rules import (
    RULES,
    TaskConfig,
    default_task_paths,
    make_mc_items,
    make_records,
    population_size,
    write_task,
)
from guardedp2p.errors import ConfigError

SMALL = TaskConfig(seed=3, train=48, eval_mc=64, eval_nll=24, aux=40)


def read(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def name_of(text: str) -> str:
    m = re.match(r"Patient (.+?), born ", text)
    assert m, text
    return m.group(1)


def pairs_in(text: str) -> dict[str, tuple[str, str]]:
    """rule code field -> (key value, code) as written in a record or question."""
    out = {}
    for rule in RULES:
        m = re.search(rf"; {re.escape(rule.key)}: ([^;]+); {re.escape(rule.code)}: ([A-Z]{{2}}-\d)", text)
        if m:
            out[rule.code] = (m.group(1), m.group(2))
    return out


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("task"), SMALL)


def test_same_seed_same_bytes_other_seed_other_data(task, tmp_path):
    again = write_task(tmp_path / "again", SMALL)
    for key in ("train", "eval_mc", "eval_nll", "aux", "task_json"):
        assert Path(getattr(task, key)).read_bytes() == Path(getattr(again, key)).read_bytes(), key
    other = write_task(tmp_path / "other", TaskConfig(seed=4, train=48, eval_mc=64, eval_nll=24, aux=40))
    assert Path(other.train).read_bytes() != Path(task.train).read_bytes()
    assert Path(other.eval_mc).read_bytes() != Path(task.eval_mc).read_bytes()


def test_sizes_and_task_json(task):
    assert len(read(task.train)) == 48
    assert len(read(task.eval_mc)) == 64
    assert len(read(task.eval_nll)) == 24
    assert len(read(task.aux)) == 40
    desc = json.loads(Path(task.task_json).read_text())
    assert desc["config"] == {"seed": 3, "train": 48, "eval_mc": 64, "eval_nll": 24, "aux": 40, "num_choices": 4}
    assert desc["digest"] == SMALL.digest()
    assert len(desc["rules"]) == len(RULES) >= 8
    assert desc["rules"][0]["mapping"] == RULES[0].mapping()


def test_default_sizes_meet_the_issue():
    cfg = TaskConfig()
    assert cfg.train >= 2000 and cfg.eval_mc >= 1000 and cfg.eval_nll >= 500 and cfg.aux >= 3000
    assert population_size() >= max(cfg.train, cfg.eval_mc + cfg.eval_nll, cfg.aux)


def test_populations_are_disjoint(task):
    train = {name_of(r["text"]) for r in read(task.train)}
    mc = {name_of(r["question"]) for r in read(task.eval_mc)}
    nll = {name_of(r["text"]) for r in read(task.eval_nll)}
    aux = {name_of(r["text"]) for r in read(task.aux)}
    assert len(train) == 48 and len(mc) == 64 and len(nll) == 24 and len(aux) == 40  # distinct people within each
    sets = {"train": train, "mc": mc, "nll": nll, "aux": aux}
    for a in sets:
        for b in sets:
            if a < b:
                assert not sets[a] & sets[b], (a, b)
    # even without the middle initial, no first+last name pair is shared between populations
    drop_initial = lambda names: {re.sub(r" [A-Z]\. ", " ", n) for n in names}  # noqa: E731
    assert not drop_initial(train) & drop_initial(mc | nll)
    assert not drop_initial(train) & drop_initial(aux)
    assert not drop_initial(mc | nll) & drop_initial(aux)


def test_mc_items_are_balanced(task):
    items = read(task.eval_mc)
    assert Counter(it["label"] for it in items) == {0: 16, 1: 16, 2: 16, 3: 16}
    assert Counter(it["rule"] for it in items) == {r.code: 8 for r in RULES}
    assert Counter((it["rule"], it["key"]) for it in items) == {(r.code, k): 2 for r in RULES for k in r.keys}
    for it in items:
        rule = next(r for r in RULES if r.code == it["rule"])
        assert sorted(it["choices"]) == sorted(rule.codes)  # distractors: the same rule's other codes
        assert it["question"].endswith(f"; {rule.key}: {it['key']}; {rule.code}:")


def test_every_rule_is_the_same_in_every_file(task):
    seen: dict[str, dict[str, str]] = {r.code: {} for r in RULES}
    for path in (task.train, task.eval_nll, task.aux):
        for rec in read(path):
            pairs = pairs_in(rec["text"])
            assert set(pairs) == {r.code for r in RULES}
            for code_field, (key, code) in pairs.items():
                assert seen[code_field].setdefault(key, code) == code, (path, code_field, key)
                assert rec["codes"][code_field] == code
            for value in rec["pii"].values():
                assert value in rec["text"]
            assert rec["pii"]["diagnosis"] == pairs["ward code"][0]
    for it in read(task.eval_mc):
        pairs = pairs_in(it["question"])  # the rules written before the asked one
        for code_field, (key, code) in pairs.items():
            assert seen[code_field][key] == code
        assert it["choices"][it["label"]] == seen[it["rule"]][it["key"]]
    assert seen == {r.code: r.mapping() for r in RULES}


def test_rules_are_independent_codes_unguessable_from_context():
    assert len(RULES) >= 8
    all_codes = [c for r in RULES for c in r.codes]
    assert len(set(all_codes)) == len(all_codes)
    for r in RULES:
        assert len(r.keys) == len(set(r.keys)) == len(r.codes) == 4
        assert len({c[0] for c in r.codes}) == 4  # choices differ from their first letter on
        initials = {k[0].upper() for k in r.keys}
        assert not initials & {ch for c in r.codes for ch in c if ch.isalpha()}, r.code
    # rule keys are drawn independently: in 2,000 training people every pair of rules shows all 16 combinations
    recs = make_records(2000, 0, "train")
    for i in range(len(RULES)):
        for j in range(i + 1, len(RULES)):
            combos = Counter((r["fields"][RULES[i].key], r["fields"][RULES[j].key]) for r in recs)
            assert len(combos) == 16 and min(combos.values()) > 60


def test_prefix_stable_and_validated():
    assert make_records(5, 1, "aux") == make_records(9, 1, "aux")[:5]
    assert make_mc_items(32, 0)[:3] != make_mc_items(32, 1)[:3]
    with pytest.raises(ConfigError, match="population"):
        TaskConfig(train=population_size() + 1).validate()
    with pytest.raises(ConfigError, match="non-negative"):
        TaskConfig(aux=-1).validate()


def test_default_task_paths_generates_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GUARDEDP2P_CACHE", str(tmp_path / "cache"))
    p1 = default_task_paths(SMALL)
    assert Path(p1.folder) == tmp_path / "cache" / "tasks" / SMALL.digest()
    stamp = Path(p1.train).stat().st_mtime_ns
    p2 = default_task_paths(SMALL)
    assert p2 == p1 and Path(p2.train).stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "cache" / "tasks").iterdir()] == [SMALL.digest()]  # no temp debris
    p3 = default_task_paths(SMALL, cache_dir=tmp_path / "elsewhere")
    assert Path(p3.eval_mc).read_bytes() == Path(p1.eval_mc).read_bytes()


def test_cli_make_demo_writes_the_files(tmp_path):
    from typer.testing import CliRunner

    from guardedp2p.cli.main import app

    out = tmp_path / "t"
    res = CliRunner().invoke(
        app,
        [
            "data",
            "make-demo",
            "--out",
            str(out),
            "--seed",
            "3",
            "--train",
            "48",
            "--eval-mc",
            "64",
            "--eval-nll",
            "24",
            "--aux",
            "40",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    got = json.loads(res.output.strip().splitlines()[-1])
    assert got["digest"] == SMALL.digest()
    ref = write_task(tmp_path / "ref", SMALL)
    for name in ("train.jsonl", "eval_mc.jsonl", "eval_nll.jsonl", "aux.jsonl", "task.json"):
        assert (out / name).read_bytes() == (Path(ref.folder) / name).read_bytes(), name
    bad = CliRunner().invoke(app, ["data", "make-demo", "--out", str(tmp_path / "bad"), "--train", "999999"])
    assert bad.exit_code == 2 and "population" in bad.output
