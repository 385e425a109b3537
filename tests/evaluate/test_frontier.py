"""The frontier end to end (`guardedp2p evaluate --fast`: tiny random model, the real protocol, the adaptive attacker),
its resumable cache, the sanity gate tripping on a blinded attacker, and the pieces it is made of."""

from __future__ import annotations

import json
import time

import pytest
import torch

from guardedp2p.evaluate.frontier import (
    FAST_ROWS,
    FAST_SWEEP_ROWS,
    HarnessBroken,
    missing_fields,
    pareto_front,
    parse_row,
    run_frontier,
    sanity_gate,
)


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """One `guardedp2p evaluate --fast` through the CLI, shared by the tests that inspect it (it dominates the cost)."""
    import typer
    from typer.testing import CliRunner

    from guardedp2p.cli.evaluate import evaluate

    tmp = tmp_path_factory.mktemp("frontier")
    app = typer.Typer()
    app.command("evaluate")(evaluate)
    app.command("noop")(lambda: None)  # two commands: `evaluate` stays a sub-command, as in the main app
    n = torch.get_num_threads()
    t0 = time.process_time()  # CPU time: a busy shared machine stretches the wall clock, not this
    try:
        result = CliRunner().invoke(
            app, ["evaluate", "--fast", "--strict", "--out", str(tmp / "work"), "--threads", "1", "--json"]
        )
    finally:
        torch.set_num_threads(n)
    return tmp, result, time.process_time() - t0


@pytest.mark.timeout(1200)  # the shared fixture runs here: ~1 CPU minute, far more wall time on a loaded machine
def test_fast_frontier_writes_every_field_and_passes_the_gate(fast_run):
    tmp, result, _ = fast_run
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout.strip().splitlines()[-1])
    assert missing_fields(res) == [], missing_fields(res)
    assert [r["row"] for r in res["rows"]] == [*FAST_ROWS, *FAST_SWEEP_ROWS]
    assert res["seeds"] == 2 and res["eval_items"] == 24 and res["sanity"]["ok"] is True and not res["harness_broken"]
    on_disk = json.loads((tmp / "work" / "results" / "frontier.json").read_text())
    assert missing_fields(on_disk) == []
    for name in ("frontier.png", "frontier_convergence.png"):
        assert (tmp / "work" / "results" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp / "work" / "results" / "frontier.md").read_text()
    assert (
        res["command"].startswith("guardedp2p evaluate ")
        and "--fast" in res["command"]
        and "--strict" in res["command"]
    )
    assert res["command"] in md and "Sanity gate passed" in md and "convergence" in md
    rows = {r["row"]: r for r in res["rows"]}
    for key in ("online", "dcor_strong", "int8", "noise", "gradfree"):
        p = rows[key]["privacy"]
        assert set(p["per_attack"]) == {"sip_adaptive", "template"}, key
        assert all(0 <= a["token_acc"] <= 1 for a in p["per_attack"].values()), key
        assert p["sequences"] >= 32 and p["steps_observed"] >= 8, key
        # the best attack is at least the format prior: one typical aux record sent for every sequence
        assert p["best_rougeL"] >= p["per_attack"]["template"]["mean_rougeL"] - 1e-9, key
        assert p["ci95"][0] <= p["best_rougeL"] <= p["ci95"][1] and p["worst_rougeL"] >= p["best_rougeL"]
        assert p["convergence"] and p["attacker"]["plateaued"] is True
        assert rows[key]["bytes_per_step"] > 0
    for key in ("local", "offline"):
        assert rows[key]["privacy"]["not_applicable"] and rows[key]["privacy"]["best_rougeL"] is None
    # the reference against itself, and undefended Online against the same training: no loss, zero-width CI
    assert rows["local"]["utility"]["loss_pts_vs_local"] == 0 and rows["local"]["utility"]["loss_ci95"] == [0, 0]
    assert abs(rows["online"]["utility"]["loss_pts_vs_local"]) < 1e-9
    assert rows["int8"]["bytes_per_step"] < rows["online"]["bytes_per_step"]
    assert rows["offline"]["ip_exposure"] > rows["online"]["ip_exposure"]
    assert 0 < rows["online"]["client_weights_mib"] < rows["local"]["client_weights_mib"]
    assert res["pareto_front"] and all(rows[k]["pareto"] for k in res["pareto_front"])
    assert rows["online"]["privacy"]["adaptive"] is True
    # a sweep row runs on the first seed only, and its utility loss pairs it with Local LoRA of that seed
    sweep = rows[FAST_SWEEP_ROWS[0]]
    assert sweep["seeds"] == [0] and rows["online"]["seeds"] == [0, 1] and rows["local"]["seeds"] == [0, 1]
    local0 = rows["local"]["utility"]["acc_per_seed"][0]
    assert sweep["utility"]["loss_pts_vs_local"] == pytest.approx(100 * (local0 - sweep["utility"]["acc"]), abs=0.01)
    assert "sweep points" in md and "| 1 |" in md
    head = res["compute"]["headline"]
    assert FAST_SWEEP_ROWS[0] not in head["rows"] and "online" in head["rows"] and head["cpu_s"] > 0
    assert "The headline rows alone" in md and "## Every attack on every row" in md
    fields = rows["online"]["privacy"]["secrets_per_field"]
    assert fields and all(0 <= v <= 1 for v in fields.values())
    assert "## Which private fields the attacker recovers" in md
    header = next(line for line in md.splitlines() if line.startswith("| row | attack | ") and "token acc" not in line)
    assert all(f" {f} " in header for f in fields)
    prior = res["prior"]
    assert 0 < prior["rougeL"] < rows["online"]["privacy"]["best_rougeL"] and "format prior" in md
    # the tiny model's noise row: the learned attack fails there (the format prior is all that is left), and the
    # gate still passed on the undefended row
    noise = rows["noise"]["privacy"]
    assert noise["per_attack"]["sip_adaptive"]["mean_rougeL"] < 0.5 < rows["online"]["privacy"]["best_rougeL"]
    assert noise["best_rougeL"] == pytest.approx(prior["rougeL"], abs=0.05)


def test_fast_frontier_stays_fast_and_resumes_from_its_cache(fast_run):
    from guardedp2p.cli.evaluate import fast_config

    tmp, result, seconds = fast_run
    assert result.exit_code == 0
    assert seconds < 100, f"--fast took {seconds:.0f} s of CPU"
    t0 = time.perf_counter()
    again = run_frontier(fast_config(out=str(tmp / "work"), results=str(tmp / "again"), progress=False))
    assert time.perf_counter() - t0 < 40  # every run, attacker and attack comes from the cache
    first = json.loads(result.stdout.strip().splitlines()[-1])
    assert [r["utility"] for r in again["rows"]] == [r["utility"] for r in first["rows"]]
    assert [r["privacy"]["best_rougeL"] for r in again["rows"]] == [r["privacy"]["best_rougeL"] for r in first["rows"]]


def test_sanity_gate_trips_on_a_blinded_attacker(fast_run):
    from guardedp2p.cli.evaluate import fast_config

    tmp, _, _ = fast_run
    cfg = fast_config(
        out=str(tmp / "work"), results=str(tmp / "blind"), rows=("online", "int8"), seeds=(0,), progress=False
    )
    res = run_frontier(cfg, blind_attacker=True)  # the runs come from the cache; the attacker sees only zeros
    assert res["harness_broken"] is True and res["sanity"]["ok"] is False
    assert "HARNESS BROKEN" in res["sanity"]["message"]
    assert all(r["privacy"]["harness_broken"] for r in res["rows"] if not r["privacy"].get("not_applicable"))
    assert res["pareto_front"] == []
    md = (tmp / "blind" / "frontier.md").read_text()
    assert "The attack harness is broken" in md and "withheld" in md
    with pytest.raises(HarnessBroken, match="HARNESS BROKEN"):
        run_frontier(
            fast_config(
                out=str(tmp / "work"),
                results=str(tmp / "blind"),
                rows=("online",),
                seeds=(0,),
                progress=False,
                strict=True,
            ),
            blind_attacker=True,
        )


def test_sanity_gate_rules():
    def rows(r, s):
        return [{"row": "online", "privacy": {"best_rougeL": r, "secrets_recovered": s}}]

    assert sanity_gate(rows(0.95, 0.9))["ok"] is True
    assert sanity_gate(rows(0.95, 0.5))["ok"] is False  # text recovered but not the secrets: still broken
    assert sanity_gate(rows(0.85, 0.9))["ok"] is False
    assert sanity_gate([])["ok"] is None


def test_rows_and_the_pareto_front():
    assert parse_row("dcor:2").dcor == 2.0 and parse_row("noise:0.5").noise() == {"kind": "gaussian", "scale": 0.5}
    assert parse_row("gradfree:nf4").design == "gradfree" and parse_row("codec:int8").codec == "int8"
    field = parse_row("dxfield:30")
    assert (field.dx_epsilon, field.dx_selective, field.dx_digits, field.family) == (30.0, True, True, "dx")
    assert "digit" in field.defence() and not parse_row("dxtok:30").dx_digits
    from guardedp2p.errors import ConfigError

    for bad in ("dp", "noise:-1", "codec:zip"):
        with pytest.raises(ConfigError):
            parse_row(bad)

    def row(k, a, p):
        return {"row": k, "utility": {"acc": a}, "privacy": {"best_rougeL": p}}

    rows = [row("a", 0.8, 0.9), row("b", 0.7, 0.5), row("c", 0.6, 0.6), row("d", 0.9, None)]
    assert pareto_front(rows) == ["a", "b"]


def test_cli_unknown_row_exits_cleanly(tmp_path):
    import typer
    from typer.testing import CliRunner

    from guardedp2p.cli.evaluate import evaluate

    app = typer.Typer()
    app.command("evaluate")(evaluate)
    app.command("noop")(lambda: None)
    result = CliRunner().invoke(app, ["evaluate", "--rows", "online,bogus", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "unknown row" in result.output


def test_runs_only_fills_the_cache_and_stops(fast_run):
    from guardedp2p.cli.evaluate import fast_config

    tmp, _, _ = fast_run
    res = run_frontier(
        fast_config(
            out=str(tmp / "work"), rows=("gradfree",), sweep_rows=(), seeds=(0,), runs_only=True, progress=False
        )
    )
    assert res["runs_only"] is True and set(res["runs"]) == {"local", "gradfree"}  # the reference always runs
    assert "rows" not in res and "files" not in res  # no attack ran, no report was written


def test_hand_written_findings_survive_a_regenerated_report(fast_run):
    from guardedp2p.evaluate.report import FINDINGS_MARKER, write_reports

    tmp, result, _ = fast_run
    res = json.loads(result.stdout.strip().splitlines()[-1])
    folder = tmp / "findings"
    write_reports(res, folder)
    md = folder / "frontier.md"
    md.write_text(md.read_text() + "\n" + FINDINGS_MARKER + "\n\nOur reading of the table.\n")
    write_reports(res, folder)
    text = md.read_text()
    assert text.count(FINDINGS_MARKER) == 1 and text.rstrip().endswith("Our reading of the table.")
    assert "Sanity gate passed" in text


def test_pseudonymised_row_scores_against_what_the_client_wrote(fast_run):
    """`pseudo:task`: the client tunes on its key's surrogates, the provider sees only those, and the attack is
    scored against the original record, both reading the surrogates at face value and after frequency analysis."""
    from guardedp2p.cli.evaluate import fast_config
    from guardedp2p.data.loaders import load_records
    from guardedp2p.evaluate.tasks import load_task

    tmp, _, _ = fast_run
    res = run_frontier(
        fast_config(
            out=str(tmp / "work"),
            results=str(tmp / "pseudo"),
            rows=("gradfree",),
            sweep_rows=("gf:pseudo:task",),
            seeds=(0,),
            progress=False,
        )
    )
    row = next(r for r in res["rows"] if r["row"] == "gf:pseudo:task")
    assert "pseudonymised" in row["defence"]
    per = row["privacy"]["per_attack"]
    assert {"sip_adaptive", "sip_freq", "template"} <= set(per)
    task = load_task("fast")
    originals = {str(r["text"])[:60] for r in task.train_records()}
    assert row["privacy"]["most_leaked"]["ref"][:60] in originals  # the reference is decoded with the client's key
    (sent,) = (tmp / "work" / "pseudo").glob("*-seed0/train.jsonl")
    sent_texts = [str(r["text"]) for r in load_records(str(sent))]
    plain = [str(r["text"]) for r in task.train_records()]
    assert len(sent_texts) == len(plain) and sum(a != b for a, b in zip(sent_texts, plain)) > len(plain) // 2
    plain_row = next(r for r in res["rows"] if r["row"] == "gradfree")
    # face-value reading of surrogates recovers less of the original text than reading the plain one
    assert per["sip_adaptive"]["mean_rougeL"] < plain_row["privacy"]["per_attack"]["sip_adaptive"]["mean_rougeL"]


def test_carry_publishes_rows_whose_cache_is_gone_and_measures_the_rest(fast_run):
    """`--carry`: a machine without the cache republishes the earlier file's rows unchanged (marked) and measures
    only what is new; a file measured with other settings is refused."""
    from guardedp2p.cli.evaluate import fast_config
    from guardedp2p.errors import ConfigError

    tmp, result, _ = fast_run
    first = json.loads(result.stdout.strip().splitlines()[-1])
    published = tmp / "published.json"
    published.write_text(json.dumps(first))

    def carry_from(src, results):
        return run_frontier(
            fast_config(
                out=str(tmp / "fresh"),
                results=str(tmp / results),
                rows=tuple(FAST_ROWS),
                sweep_rows=(*FAST_SWEEP_ROWS, "gf:codec:int8"),
                seeds=(0, 1),
                carry=str(src),
                progress=False,
            )
        )

    # an empty cache folder and one row the file lacks: that row and local (its reference) run, the rest is carried
    res = carry_from(published, "carried")
    by = {r["row"]: r for r in res["rows"]}
    before = {r["row"]: r for r in first["rows"]}
    carried = set(res["carried_rows"])
    assert carried == {r["row"] for r in first["rows"]} - {"local"}  # local runs: the new row's paired CI needs it
    assert by["gf:codec:int8"].get("carried") is None and by["gf:codec:int8"]["utility"]["loss_ci95"]
    for key in carried:
        assert by[key]["carried"]["from"] == str(published)
        assert by[key]["carried"]["reference"]["acc"] == before["local"]["utility"]["acc"]  # what it was paired with
        assert by[key]["utility"] == before[key]["utility"] and by[key]["privacy"] == before[key]["privacy"]
    assert res["prior"]["carried"] is True and res["prior"]["rougeL"] == first["prior"]["rougeL"]
    md = (tmp / "carried" / "frontier.md").read_text()
    assert "†" in md and "paired against the Local LoRA runs of that measurement" in md
    trained = {json.loads(p.read_text())["row"] for p in (tmp / "fresh" / "cache" / "runs").glob("*.json")}
    assert trained == {"local", "gf:codec:int8"}
    # carried again from the carried file: provenance and reference are the original ones
    again = carry_from(tmp / "carried" / "frontier.json", "carried2")
    for row in again["rows"]:
        if row["row"] in carried:
            assert row["carried"] == by[row["row"]]["carried"]
    with pytest.raises(ConfigError, match="other settings.*attack_steps"):
        run_frontier(
            fast_config(
                out=str(tmp / "fresh"), results=str(tmp / "x"), attack_steps=9, carry=str(published), progress=False
            )
        )


def test_runs_only_workers_claim_units_and_take_over_a_dead_workers(tmp_path):
    import os
    import subprocess
    import sys

    from guardedp2p.evaluate.frontier import _Cache

    cache = _Cache(tmp_path)
    assert cache.claim("runs", "k1") and not cache.claim("runs", "k1")  # held by a live process (this one)
    cache.release("runs", "k1")
    assert cache.claim("runs", "k1")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim = cache.path("claims", "runs-k2", ".claim")
    claim.write_text(f"{os.uname().nodename} {int(dead.stdout)}")
    assert cache.claim("runs", "k2")  # its holder died: taken over


def test_a_reporting_run_waits_for_a_unit_another_worker_is_training(fast_run, monkeypatch):
    """A unit claimed by a live worker is waited for (its result is used once it lands), never trained twice."""
    import threading

    from guardedp2p.cli.evaluate import fast_config
    from guardedp2p.evaluate import frontier

    tmp, _, _ = fast_run
    runs = tmp / "work" / "cache" / "runs"
    (path,) = [
        p for p in runs.glob("*.json") if (r := json.loads(p.read_text()))["row"] == "gradfree" and r["seed"] == 0
    ]
    saved = path.read_text()
    path.unlink()
    cache = frontier._Cache(tmp / "work" / "cache")
    assert cache.claim("runs", path.stem)  # "another worker" (this live process) holds it
    monkeypatch.setattr(frontier, "_CLAIM_POLL_S", 0.2)

    def worker_finishes() -> None:
        time.sleep(1.0)
        path.write_text(saved)
        cache.release("runs", path.stem)

    t = threading.Thread(target=worker_finishes)
    t.start()
    try:
        res = run_frontier(
            fast_config(
                out=str(tmp / "work"),
                results=str(tmp / "wait"),
                rows=("gradfree",),
                sweep_rows=(),
                seeds=(0,),
                progress=False,
            )
        )
    finally:
        t.join()
    assert path.read_text() == saved  # the worker's result was used, not overwritten by a second training
    row = next(r for r in res["rows"] if r["row"] == "gradfree")
    assert row["utility"]["acc"] == pytest.approx(json.loads(saved)["utility"]["acc"], abs=1e-3)
