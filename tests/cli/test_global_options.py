"""Global CLI options: --version, -h, --log-level/--log-file/--quiet, and errors as JSON under --json."""

from __future__ import annotations

import json
import logging

import pytest
from typer.testing import CliRunner

from guardedp2p import __version__
from guardedp2p.cli.common import setup_logging
from guardedp2p.cli.main import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("GUARDEDP2P_LOG_LEVEL", "GUARDEDP2P_LOG_FILE", "GUARDEDP2P_QUIET"):
        monkeypatch.delenv(var, raising=False)


def test_version_flag_and_short_help() -> None:
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"guardedp2p {__version__}"
    res = runner.invoke(app, ["client", "tune", "-h"])
    assert res.exit_code == 0 and "--provider-key" in res.stdout


def test_error_is_a_json_object_under_json(tmp_path) -> None:
    res = runner.invoke(app, ["keys", "show", str(tmp_path / "missing.key"), "--json"])
    assert res.exit_code == 2
    obj = json.loads(res.stdout.strip().splitlines()[-1])
    assert obj["ok"] is False and obj["error"] == "ConfigError" and "does not exist" in obj["message"]
    assert obj["exit_code"] == 2


def test_global_log_options_reach_sub_commands(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    log_file = tmp_path / "run.jsonl"
    res = runner.invoke(app, ["--log-level", "warning", "--log-file", str(log_file), "--version"])
    assert res.exit_code == 0  # eager --version: options parsed, nothing else runs
    monkeypatch.setenv("GUARDEDP2P_LOG_LEVEL", "debug")
    monkeypatch.setenv("GUARDEDP2P_LOG_FILE", str(log_file))
    try:
        setup_logging(0, quiet=True)  # the named level wins over quiet
        assert logging.getLogger().level == logging.DEBUG
        logging.getLogger("guardedp2p.test").info("line one\nwith a newline")
        for h in logging.getLogger().handlers:
            h.flush()
        events = [json.loads(line) for line in log_file.read_text().splitlines()]
        assert events[-1]["message"] == "line one\nwith a newline" and events[-1]["level"] == "info"
    finally:
        logging.basicConfig(handlers=[logging.NullHandler()], force=True)


def test_quiet_env_gives_warnings_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDEDP2P_QUIET", "1")
    setup_logging(0)
    assert logging.getLogger().level == logging.WARNING
    assert logging.getLogger("transformers").level == logging.ERROR
