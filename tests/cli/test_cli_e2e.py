"""The real CLI as two processes over CURVE on 127.0.0.1, on a tiny model saved as a Hugging Face folder:
a full run, refused keys with readable errors, and a provider killed mid-run followed by --resume."""

from __future__ import annotations

import json
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
    root = tmp_path_factory.mktemp("e2e")
    model_dir = root / "model"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    keys = root / "keys"
    for name in ("provider", "client", "stranger", "impostor"):
        generate_keypair(keys, name)
    data = write_text_records(root / "train.jsonl", n=40, distinct=3)
    return root, model_dir, keys, data


def _provider_args(model_dir: Path, keys: Path, endpoint: str) -> list[str]:
    return [
        "--model",
        str(model_dir),
        "--bind",
        endpoint,
        "--keys",
        str(keys),
        "--name",
        "provider",
        "--allow",
        str(keys / "client.key"),
        "--protocols",
        "online,gradfree",
    ]


def _tune(
    model_dir: Path,
    keys: Path,
    endpoint: str,
    data: Path,
    out: Path,
    *extra: str,
    who: str = "client",
    provider_key: str = "provider",
    timeout: float = 240,
) -> subprocess.CompletedProcess:
    cmd = [
        *CLI,
        "client",
        "tune",
        "--connect",
        endpoint,
        "--provider-key",
        str(keys / f"{provider_key}.key"),
        "--keys",
        str(keys),
        "--name",
        who,
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--max-length",
        "16",
        "--lora-r",
        "4",
        "--json",
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def provider(world):
    root, model_dir, keys, _ = world
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with ProviderProcess(_provider_args(model_dir, keys, endpoint), root, ready_timeout=120) as p:
        yield endpoint, p


def test_full_run_over_curve_prints_json_summary(world, provider):
    root, model_dir, keys, data = world
    endpoint, _ = provider
    res = _tune(
        model_dir,
        keys,
        endpoint,
        data,
        root / "run1",
        "--steps",
        "4",
        "--codec-up",
        "int8",
        "--codec-down",
        "int8",
        "--codec-grad",
        "int8",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    for key in (
        "protocol",
        "steps",
        "loss_first",
        "loss_last",
        "eval_before",
        "eval_after",
        "bytes_up",
        "bytes_down",
        "wall_s",
    ):
        assert key in summary
    assert summary["steps"] == 4 and summary["codecs"]["up"] == "int8"
    assert (root / "run1" / "adapter" / "adapter_model.safetensors").is_file()


def test_unknown_client_key_is_refused_quickly_with_advice(world, provider):
    root, model_dir, keys, data = world
    endpoint, p = provider
    res = _tune(model_dir, keys, endpoint, data, root / "run-stranger", "--steps", "1", who="stranger")
    assert res.returncode != 0
    assert "refused this client's key" in res.stderr and "--allow" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert p.proc.poll() is None, "the provider keeps running"


def test_wrong_pinned_provider_key_is_refused(world, provider):
    root, model_dir, keys, data = world
    endpoint, p = provider
    res = _tune(model_dir, keys, endpoint, data, root / "run-impostor", "--steps", "1", provider_key="impostor")
    assert res.returncode != 0
    assert "does not match" in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert p.proc.poll() is None


def test_split_mismatch_is_rejected_with_reason(world, provider):
    root, model_dir, keys, data = world
    endpoint, _ = provider
    res = _tune(model_dir, keys, endpoint, data, root / "run-split", "--steps", "1", "--bottom-layers", "1")
    assert res.returncode != 0
    assert "split mismatch" in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]


@pytest.mark.slow
def test_provider_killed_mid_run_then_resume(world):
    root, model_dir, keys, data = world
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    out = root / "run-kill"
    cmd = [
        *CLI,
        "client",
        "tune",
        "--connect",
        endpoint,
        "--provider-key",
        str(keys / "provider.key"),
        "--keys",
        str(keys),
        "--name",
        "client",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--max-length",
        "16",
        "--lora-r",
        "4",
        "--steps",
        "400",
        "--checkpoint-every",
        "2",
        "--timeout",
        "2",
        "--retries",
        "1",
        "--json",
    ]
    with ProviderProcess(_provider_args(model_dir, keys, endpoint), root, ready_timeout=120) as p:
        client = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        while not (out / "checkpoint" / "state.json").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        p.proc.send_signal(signal.SIGKILL)
        p.proc.wait()
        _, err = client.communicate(timeout=120)
    assert client.returncode != 0
    assert "--resume" in err and "Traceback" not in err, err[-2000:]
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    done = state["step"]
    assert 0 < done < 400
    with ProviderProcess(_provider_args(model_dir, keys, endpoint), root, ready_timeout=120):
        res = subprocess.run(
            [*cmd[: cmd.index("--steps")], "--steps", str(done + 3), "--resume", "--json"],
            capture_output=True,
            text=True,
            timeout=240,
        )
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] == done and summary["steps"] == done + 3
