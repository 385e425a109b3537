"""Signals end a real ``client tune`` process cleanly (issue 21): Ctrl-C twice abandons the step in flight and
keeps it for ``--resume``, SIGTERM stops between steps and tells the provider; both print where the checkpoint is
and the exact command that resumes, and exit 130 / 143. Provider and client are two processes over CURVE on
127.0.0.1, on a tiny model saved as a Hugging Face folder (as tests/cli/test_cli_e2e.py)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from guardedp2p.cli.demo import ProviderProcess, free_port
from guardedp2p.crypto.keys import generate_keypair
from tests.tiny_models import tiny_model
from tests.tiny_tokenizer import tiny_tokenizer, write_text_records

CLI = [sys.executable, "-m", "guardedp2p.cli.main"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    model_dir = root / "model"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    keys = root / "keys"
    for name in ("provider", "client"):
        generate_keypair(keys, name)
    data = write_text_records(root / "train.jsonl", n=40, distinct=3)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    args = ["--model", str(model_dir), "--bind", endpoint, "--keys", str(keys), "--name", "provider"]
    args += ["--allow", str(keys / "client.key"), "--protocols", "online,gradfree"]
    with ProviderProcess(args, root, ready_timeout=180) as provider:
        yield root, model_dir, keys, data, endpoint, provider


def _tune_args(world, out: Path, steps: int = 100000) -> list[str]:
    _, model_dir, keys, data, endpoint, _ = world
    return [
        "client",
        "tune",
        "--connect",
        endpoint,
        "--provider-key",
        str(keys / "provider.key"),
        "--keys",
        str(keys),
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--batch-size",
        "4",
        "--max-length",
        "16",
        "--lora-r",
        "4",
        "--checkpoint-every",
        "2",
        "--timeout",
        "120",
    ]


def _start(args: list[str]) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARDEDP2P_") or k == "GUARDEDP2P_CACHE"}
    return subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_checkpoint(out: Path, proc: subprocess.Popen[str], timeout: float = 240.0) -> int:
    deadline = time.monotonic() + timeout
    state = out / "checkpoint" / "state.json"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            return int(json.loads(state.read_text())["step"])
        except (OSError, ValueError, KeyError):
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("no checkpoint appeared")


def _resume_line(stderr: str) -> list[str]:
    lines = stderr.splitlines()
    i = next(i for i, line in enumerate(lines) if line.strip() == "resume with:")
    return shlex.split(lines[i + 1])


def test_ctrl_c_twice_abandons_the_step_in_flight_and_resume_repeats_it(world):
    root, *_, provider = world
    out = root / "run-int"
    proc = _start(_tune_args(world, out))
    _wait_for_checkpoint(out, proc)
    assert provider.proc is not None
    os.kill(provider.proc.pid, signal.SIGSTOP)  # the next step now waits for a reply that does not come
    try:
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        time.sleep(1.0)
        assert proc.poll() is None, "the first Ctrl-C waits for the step in flight"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        os.kill(provider.proc.pid, signal.SIGCONT)
    assert proc.returncode == 130, stderr[-3000:]
    assert "abandoned the step in flight" in stderr and "Exception ignored" not in stderr, stderr[-3000:]
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    saved = int(state["step"])
    assert f"checkpoint at step {saved} of 100000 in {out / 'checkpoint'}" in stderr
    # the saved data position is the one before the abandoned step: resuming repeats it, nothing is lost
    assert state["data"]["position"] == saved
    resume = _resume_line(stderr)
    assert resume[:3] == ["guardedp2p", "client", "tune"] and resume[-1] == "--resume"
    assert resume[1:-1] == _tune_args(world, out)
    finish = resume[1:]
    finish[finish.index("--steps") + 1] = str(saved + 2)
    res = subprocess.run([*CLI, *finish, "--json"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] == saved and summary["steps"] == saved + 2
    history = json.loads((out / "summary.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, saved + 3))


def test_sigterm_stops_between_steps_and_says_bye(world):
    root, *_, provider = world
    out = root / "run-term"
    proc = _start([*_tune_args(world, out), "--json"])
    _wait_for_checkpoint(out, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert "SIGTERM: stopped between steps" in stderr and "--resume" in stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["ok"] is False and result["error"] == "RunStopped" and result["exit_code"] == 143
    assert result["checkpoint_step"] == json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    assert result["resume"].endswith("--resume")
    deadline = time.monotonic() + 10
    while "client said BYE" not in provider.tail(200) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "client said BYE" in provider.tail(200)
