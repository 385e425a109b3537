"""Every example runs, in its ``--fast`` mode (tiny random model, tiny tokenizer), so the examples never rot.

Each Python example is a subprocess, exactly as a user starts it (``python examples/NAME.py --fast``). The
two-terminal walk-through (examples/two_terminals.md) is executed from the page itself: its ``guardedp2p``
command lines are extracted, given a tiny model and a free port, and run as two parties in two folders.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TIMEOUT = 600  # generous: on a loaded 2-core box importing torch alone can take 30 s

PY_EXAMPLES = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "GUARDEDP2P_EXAMPLE_FAST": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        }
    )
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_the_expected_examples_exist():
    assert set(PY_EXAMPLES) >= {
        "loopback_online.py",
        "loopback_gradfree.py",
        "loopback_offline.py",
        "byo_model_and_data.py",
        "evaluate_privacy.py",
    }
    assert (EXAMPLES / "README.md").is_file() and (EXAMPLES / "two_terminals.md").is_file()


EXPECT = {
    "loopback_online.py": ["guardedp2p online run", "gradient bytes on the wire"],
    "loopback_gradfree.py": ["guardedp2p gradfree run", "gradient bytes on the wire: 0", "trunk-output cache"],
    "loopback_offline.py": ["guardedp2p offline run", "plug_in", "pinned=True"],
    "byo_model_and_data.py": ["kind 'instruction'", "continuation by the tuned model"],
    "evaluate_privacy.py": ["design online", "DRA effectiveness"],
}


@pytest.mark.parametrize("name", PY_EXAMPLES)
def test_example_runs_in_fast_mode(name, tmp_path):
    res = _run([sys.executable, str(EXAMPLES / name), "--fast"], cwd=tmp_path)
    assert res.returncode == 0, f"{name} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    for text in EXPECT.get(name, []):
        assert text in res.stdout, f"{name}: {text!r} missing from its output:\n{res.stdout[-3000:]}"


# ------------------------------------------------------------------------------------------- two terminals
def walkthrough_commands(md: Path = EXAMPLES / "two_terminals.md") -> list[tuple[str, list[str]]]:
    """(party, argv) of every ``guardedp2p`` line in a ```bash block whose first line is ``# provider``/``# client``."""
    out: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```bash\n(.*?)```", md.read_text(), flags=re.S):
        lines = block.replace("\\\n", " ").splitlines()
        m = re.match(r"#\s*(provider|client)\b", lines[0]) if lines else None
        if not m:
            continue
        for line in lines[1:]:
            if line.startswith("guardedp2p "):
                out.append((m.group(1), shlex.split(line)[1:]))
    return out


def test_two_terminal_walkthrough_runs_as_written(tmp_path):
    from guardedp2p.cli.demo import ProviderProcess, free_port

    sys.path.insert(0, str(EXAMPLES))
    try:
        from _tiny import setup_fast
    finally:
        sys.path.remove(str(EXAMPLES))
    model_dir, data = setup_fast(tmp_path)
    cmds = walkthrough_commands()
    kinds = [tuple(argv[:2]) for _, argv in cmds]
    assert ("keys", "generate") in kinds and ("provider", "serve") in kinds and ("client", "tune") in kinds
    dirs = {"provider": tmp_path / "provider", "client": tmp_path / "client"}
    for d in dirs.values():
        d.mkdir()
    cli = [sys.executable, "-m", "guardedp2p.cli.main"]
    port = str(free_port())

    def local(argv: list[str]) -> list[str]:
        return [a.replace("5555", port) for a in argv]

    for party, argv in cmds:  # 1. keys
        if argv[:2] == ["keys", "generate"]:
            res = _run(cli + argv, cwd=dirs[party], timeout=120)
            assert res.returncode == 0, res.stderr
    (dirs["client"] / "provider.key").write_bytes(
        (dirs["provider"] / "keys" / "provider.key").read_bytes()
    )  # 2. exchange
    (dirs["provider"] / "client.key").write_bytes((dirs["client"] / "keys" / "client.key").read_bytes())
    for party, argv in cmds:
        if argv[:2] == ["keys", "show"]:
            res = _run(cli + argv, cwd=dirs[party], timeout=120)
            assert res.returncode == 0 and "Fingerprint" in res.stdout, res.stderr
    serve = next(argv for party, argv in cmds if argv[:2] == ["provider", "serve"] and "--emulator" not in argv)
    tune = next(argv for party, argv in cmds if argv[:2] == ["client", "tune"])
    tiny = ["--model", model_dir]
    cwd = Path.cwd()
    os.chdir(dirs["provider"])  # ProviderProcess starts the provider in the current folder, as terminal A would
    try:
        with ProviderProcess(local(serve[2:]) + tiny, tmp_path, ready_timeout=300) as provider:
            res = _run(
                cli
                + local(tune)
                + tiny
                + [
                    "--data",
                    data,
                    "--steps",
                    "3",
                    "--batch-size",
                    "4",
                    "--max-length",
                    "16",
                    "--lora-r",
                    "4",
                    "--device",
                    "cpu",
                    "--json",
                ],
                cwd=dirs["client"],
            )
            assert res.returncode == 0, f"{res.stderr[-3000:]}\nprovider log:\n{provider.tail()}"
    finally:
        os.chdir(cwd)
    out = dirs["client"] / "runs" / "first"
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "summary.json").is_file()
    assert (out / "checkpoint").is_dir()
