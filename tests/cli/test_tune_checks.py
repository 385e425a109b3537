"""``client tune`` checks everything before it connects or loads a model (issue 21): data, keys, model path and
split, the output folder; --dry-run prints the plan; --config / --print-config / GUARDEDP2P_* variables; choices
that name their valid values. No provider runs here: every command must finish before connecting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from guardedp2p.cli.main import app
from guardedp2p.crypto.keys import generate_keypair
from tests.tiny_models import tiny_model
from tests.tiny_tokenizer import tiny_tokenizer, write_text_records

runner = CliRunner()
NOWHERE = "tcp://127.0.0.1:9"  # nothing listens on the discard port: a run that connected would time out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("checks")
    model_dir = root / "model"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    keys = root / "keys"
    for name in ("provider", "client"):
        generate_keypair(keys, name)
    data = write_text_records(root / "train.jsonl", n=20, distinct=3)
    return root, model_dir, keys, data


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for var in list(os.environ):
        if var.startswith("GUARDEDP2P_") and var not in ("GUARDEDP2P_CACHE", "GUARDEDP2P_NO_MODEL_CACHE"):
            monkeypatch.delenv(var)


def _flat(text: str) -> str:
    """Output with rich's error-box borders and line wrapping undone."""
    return " ".join(text.replace("│", " ").split())


def _tune(world, *extra: str) -> list[str]:
    _, model_dir, keys, data = world
    return [
        "client",
        "tune",
        "--connect",
        NOWHERE,
        "--provider-key",
        str(keys / "provider.key"),
        "--keys",
        str(keys),
        "--model",
        str(model_dir),
        "--data",
        str(data),
        *extra,
    ]


def test_dry_run_prints_the_plan_and_touches_nothing(world, tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, [*_tune(world, "--out", str(out), "--steps", "20"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "6 blocks" in res.stdout and "20 lm records" in res.stdout and "2 warm-up steps" in res.stdout
    assert "CURVE" in res.stdout and "dry run" in res.stdout
    assert not out.exists()
    res = runner.invoke(app, [*_tune(world, "--out", str(out)), "--dry-run", "--json"])
    plan = json.loads(res.stdout.strip().splitlines()[-1])
    assert plan["ok"] and plan["data"]["records"] == 20 and len(plan["data"]["sha256"]) == 64


@pytest.mark.parametrize(
    ("extra", "expected"), [((), 2), (("--protocol", "gradfree"), 4), (("--micro-batches", "3"), 3)]
)
def test_micro_batches_default_to_each_protocols_fastest(world, tmp_path, extra, expected):
    """Online pipelines 2 micro-batches and Gradfree 4 unless told otherwise (docs/results/perf.md, section 0)."""
    res = runner.invoke(app, [*_tune(world, "--out", str(tmp_path / "run"), *extra), "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["micro_batches"] == expected


def test_malformed_data_fails_before_connecting(world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"nothing": 1}\n')
    args = _tune(world, "--out", str(tmp_path / "run"))
    args[args.index("--data") + 1] = str(bad)
    res = runner.invoke(app, args)  # no --dry-run: it must stop on the data, not on the unreachable provider
    assert res.exit_code == 2, res.output
    assert "DataFormatError" in res.output and "line 2" in _flat(res.output)
    assert not (tmp_path / "run").exists()


def test_split_deeper_than_the_model_and_missing_keys_fail_first(world, tmp_path):
    res = runner.invoke(app, [*_tune(world, "--bottom-layers", "3", "--top-layers", "3"), "--dry-run"])
    assert res.exit_code == 2 and "leave no block of the model's 6" in _flat(res.output)
    args = _tune(world, "--dry-run")
    args[args.index("--provider-key") + 1] = str(tmp_path / "missing.key")
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "missing.key" in res.output


def test_non_empty_out_needs_resume_or_overwrite(world, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "state.json").write_text(json.dumps({"step": 6}))
    (out / "summary.json").write_text("{}")
    (out / "trunk_cache").mkdir()
    res = runner.invoke(app, _tune(world, "--out", str(out)))
    assert res.exit_code == 2
    out_text = _flat(res.output)
    assert "checkpoint at step 6" in out_text and "--resume" in out_text and "--overwrite" in out_text
    res = runner.invoke(app, [*_tune(world, "--out", str(out), "--resume"), "--dry-run"])
    assert res.exit_code == 0 and "resume from step 6" in res.stdout
    res = runner.invoke(app, [*_tune(world, "--out", str(out), "--resume", "--overwrite"), "--dry-run"])
    assert res.exit_code == 2 and "contradict" in _flat(res.output)
    # --overwrite clears the run's outputs (not the caches) before connecting: here the connection then fails
    res = runner.invoke(app, _tune(world, "--out", str(out), "--overwrite", "--retries", "0", "--timeout", "0.5"))
    assert res.exit_code != 0
    assert not (out / "checkpoint").exists() and not (out / "summary.json").exists() and (out / "trunk_cache").is_dir()


def test_protocol_typo_names_the_designs(world):
    res = runner.invoke(app, _tune(world, "--protocol", "offlne"))
    assert res.exit_code == 2
    out = _flat(res.output)
    assert "choose one of online, gradfree, offline" in out and "did you mean offline" in out
    res = runner.invoke(app, _tune(world, "--codec-up", "int9"))
    assert res.exit_code == 2 and "int8-block" in _flat(res.output)


def test_config_file_env_and_flags_merge_in_that_order(world, tmp_path, monkeypatch):
    toml = tmp_path / "run.toml"
    toml.write_text('steps = 3\n[client.tune]\nbatch-size = 2\nlr = 0.01\nseed = 4\nreport_to = "none"\n')
    monkeypatch.setenv("GUARDEDP2P_SEED", "5")
    res = runner.invoke(app, [*_tune(world, "--config", str(toml), "--lr", "0.02"), "--print-config"])
    assert res.exit_code == 0, res.output
    printed = res.stdout
    assert "steps = 3  # config file" in printed and "batch-size = 2  # config file" in printed
    assert "lr = 0.02  # command line" in printed and "seed = 5  # environment" in printed
    # what --print-config prints is a config file --config reads back
    import tomllib

    table = tomllib.loads(printed)["client"]["tune"]
    assert table["steps"] == 3 and table["lr"] == 0.02
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("steps: 9\nmax_length: 32\n")
    res = runner.invoke(app, [*_tune(world, "--config", str(yaml_file)), "--print-config"])
    assert "steps = 9" in res.stdout and "max-length = 32" in res.stdout


def test_config_file_refuses_unknown_and_command_line_only_keys(world, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("stepz = 3\n")
    res = runner.invoke(app, [*_tune(world, "--config", str(bad)), "--print-config"])
    out = _flat(res.output)
    assert res.exit_code == 2 and "no option 'stepz'" in out and "did you mean steps" in out
    bad.write_text("overwrite = true\n")
    res = runner.invoke(app, [*_tune(world, "--config", str(bad)), "--print-config"])
    assert res.exit_code == 2 and "on the command line" in _flat(res.output)


def test_dangerous_flags_never_come_from_the_environment(world, tmp_path, monkeypatch):
    out = tmp_path / "run"
    (out / "summary.json").parent.mkdir(parents=True)
    (out / "summary.json").write_text("{}")
    monkeypatch.setenv("GUARDEDP2P_OVERWRITE", "1")
    res = runner.invoke(app, [*_tune(world, "--out", str(out)), "--dry-run"])
    assert res.exit_code == 2 and "is not empty" in _flat(res.output)


def test_help_groups_the_options_in_panels():
    res = runner.invoke(app, ["client", "tune", "-h"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for panel in ("Connection", "Model and split", "Data", "Training", "Wire and privacy", "Outputs and reporting"):
        assert panel in res.stdout
    assert "[online|gradfree|offline]" in res.stdout and "--report-to" in res.stdout


def test_resume_command_drops_overwrite_and_adds_resume():
    from guardedp2p.cli.client import resume_command

    cmd = resume_command(["/x/guardedp2p", "client", "tune", "--data", "my file.jsonl", "--overwrite"])
    assert cmd == "guardedp2p client tune --data 'my file.jsonl' --resume"
    assert resume_command(["g", "client", "tune", "--resume"]).count("--resume") == 1


def test_short_runs_warm_up_within_the_run():
    from guardedp2p.service.client import effective_warmup

    assert effective_warmup(None, 60) == 5 and effective_warmup(None, 20) == 2 and effective_warmup(None, 2) == 0
    assert effective_warmup(30, 10) == 10 and effective_warmup(3, 100) == 3


def test_plan_reads_the_model_depth_without_weights(world):
    from guardedp2p.service.client import model_depth

    _, model_dir, _, _ = world
    assert model_depth(str(model_dir)) == 6 and model_depth("default") == 30
    with pytest.raises(Exception, match="does not exist"):
        model_depth(str(Path(model_dir) / "nope"))


def test_config_from_the_environment_and_help_without_the_file(world, tmp_path, monkeypatch):
    toml = tmp_path / "env.toml"
    toml.write_text("[client.tune]\nsteps = 11\n")
    monkeypatch.setenv("GUARDEDP2P_CONFIG", str(toml))
    res = runner.invoke(app, [*_tune(world), "--print-config"])
    assert res.exit_code == 0 and "steps = 11  # config file" in res.stdout
    res = runner.invoke(app, [*_tune(world, "--config", str(tmp_path / "missing.toml")), "-h"])
    assert res.exit_code == 0, "asking for help never reads the file"
    res = runner.invoke(app, ["demo", "--config", str(toml), "--print-config"])
    assert res.exit_code == 0 and "[demo]" in res.stdout and "steps = 60" in res.stdout, "[client.tune] is not demo's"
