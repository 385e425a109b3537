"""Every command in docs/troubleshooting.md that can run on this machine is run, and prints what the page says
(issue 21: the page documented messages the code no longer produced).

A block marked ``<!-- check: offline exit=N -->`` runs (in this process, through the CLI's app) in a folder prepared like the page describes; one marked
``<!-- check: provider exit=N -->`` also has a provider on a tiny model listening where the page's commands
connect (its port 5555 is mapped to a free one, as is 5556, where nothing listens). Each ``$`` line is one
command; the lines after it must appear in its output (whitespace-insensitive, ``…`` matching anything), and the
block's last command must exit with N. The page's error tables name fragments of real messages: each must occur
in the package's source.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from guardedp2p.cli.demo import ProviderProcess, free_port
from guardedp2p.cli.main import app
from guardedp2p.crypto.keys import generate_keypair
from tests.tiny_models import tiny_model
from tests.tiny_tokenizer import tiny_tokenizer, write_text_records

DOC = Path(__file__).resolve().parents[2] / "docs" / "troubleshooting.md"
PACKAGE = Path(__file__).resolve().parents[2] / "guardedp2p"
MARK = re.compile(r"<!-- check: (offline|provider) exit=(\d+) -->\n```console\n(.*?)```", re.S)


@dataclass
class Command:
    argv: list[str]
    expect: list[str] = field(default_factory=list)


@dataclass
class Block:
    kind: str
    exit_code: int
    commands: list[Command]
    line: int

    @property
    def name(self) -> str:
        return f"line{self.line}-" + "-".join(self.commands[0].argv[:3])


def blocks() -> list[Block]:
    text = DOC.read_text()
    found = []
    for m in MARK.finditer(text):
        commands: list[Command] = []
        for line in m.group(3).splitlines():
            if line.startswith("$ "):
                commands.append(Command(shlex.split(line[2:])))
            elif line.strip():
                commands[-1].expect.append(line.strip())
        found.append(Block(m.group(1), int(m.group(2)), commands, text[: m.start()].count("\n") + 1))
    return found


def _norm(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


def appears(expected: str, output: str) -> bool:
    """``expected`` (``…`` = anything) occurs in ``output``, whitespace-insensitive."""
    pattern = ".*?".join(re.escape(part) for part in _norm(expected).split("…"))
    return re.search(pattern, _norm(output)) is not None


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    root = tmp_path_factory.mktemp("troubleshooting")
    for name in ("provider", "client", "bob", "impostor"):
        generate_keypair(root / "keys", name)
    base = tiny_model("llama")
    base.save_pretrained(root / "models" / "base")
    tiny_tokenizer().save_pretrained(root / "models" / "base")
    import torch

    torch.manual_seed(1)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.01 * torch.randn_like(p))
    base.save_pretrained(root / "models" / "other")
    tiny_tokenizer().save_pretrained(root / "models" / "other")
    write_text_records(root / "train.jsonl", n=40, distinct=3)
    (root / "bad.jsonl").write_text(
        '{"text": "The clinic opens at nine."}\n{"question": "Where?", "answer": "Ward QX-4"}\n'
    )
    (root / "bad-config.toml").write_text("stepz = 3\n")
    return root


@pytest.fixture(scope="module")
def ports():
    return {"5555": str(free_port()), "5556": str(free_port())}


@pytest.fixture(scope="module")
def provider(sandbox, ports):
    args = ["--model", "models/base", "--bind", f"tcp://127.0.0.1:{ports['5555']}", "--keys", str(sandbox / "keys")]
    args += ["--allow", str(sandbox / "keys" / "client.key"), "--protocols", "online,gradfree"]
    cwd = os.getcwd()
    os.chdir(sandbox)  # the provider's --model is relative, as in the page
    try:
        with ProviderProcess(args, sandbox, ready_timeout=180) as p:
            yield p
    finally:
        os.chdir(cwd)


@dataclass
class Result:
    returncode: int
    output: str


def _run(argv: list[str], sandbox: Path, ports: dict[str, str]) -> Result:
    """One command of the page, in this process (CliRunner: one import of torch for the whole page)."""
    assert argv[0] == "guardedp2p"
    mapped = [_map_ports(a, ports) for a in argv[1:]]
    if mapped[:2] == ["client", "tune"] and not any(a.startswith("--connect") for a in mapped):
        mapped += ["--connect", f"tcp://127.0.0.1:{ports['5555']}"]  # the default address, mapped
    if mapped[:2] == ["provider", "serve"] and "--bind" not in mapped:
        mapped += ["--bind", f"tcp://127.0.0.1:{ports['5555']}"]
    env = {k: None for k in os.environ if k.startswith("GUARDEDP2P_")}
    env.update(COLUMNS="250", GUARDEDP2P_CACHE=str(sandbox / "cache"))
    cwd = os.getcwd()
    os.chdir(sandbox)
    try:
        res = CliRunner().invoke(app, mapped, env=env)
    finally:
        os.chdir(cwd)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return Result(res.exit_code, res.output)


def _map_ports(arg: str, ports: dict[str, str]) -> str:
    for doc_port, real in ports.items():
        arg = arg.replace(f"127.0.0.1:{doc_port}", f"127.0.0.1:{real}")
    return arg


def _check(block: Block, sandbox: Path, ports: dict[str, str]) -> None:
    res = None
    for cmd in block.commands:
        res = _run(cmd.argv, sandbox, ports)
        output = _map_back(res.output, ports)
        for line in cmd.expect:
            assert appears(line, output), f"{' '.join(cmd.argv)}\nexpected: {line}\ngot:\n{output[-3000:]}"
    assert res is not None and res.returncode == block.exit_code, res.output[-3000:] if res else ""
    assert "Traceback" not in res.output


def _map_back(text: str, ports: dict[str, str]) -> str:
    for doc_port, real in ports.items():
        text = text.replace(f"127.0.0.1:{real}", f"127.0.0.1:{doc_port}")
    return text


OFFLINE = [b for b in blocks() if b.kind == "offline"]
WITH_PROVIDER = [b for b in blocks() if b.kind == "provider"]


def test_the_page_marks_blocks_of_both_kinds():
    assert len(OFFLINE) >= 8 and len(WITH_PROVIDER) >= 6


@pytest.mark.parametrize("block", OFFLINE, ids=lambda b: b.name)
def test_offline_commands_print_what_the_page_says(block, sandbox, ports):
    _check(block, sandbox, ports)


@pytest.mark.parametrize("block", WITH_PROVIDER, ids=lambda b: b.name)
def test_commands_against_a_provider_print_what_the_page_says(block, sandbox, ports, provider):
    _check(block, sandbox, ports)


def test_table_fragments_are_real_messages():
    source = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    flat = _norm(source.replace('"\n', "").replace('" "', "").replace('f"', '"'))
    # "[...]" in a fragment stands for the part of the message that names the record's fields or splits
    table_rows = [f.replace(" [...]", "") for f in re.findall(r"^\| `([^`]+)` \|", DOC.read_text(), re.M)]
    assert len(table_rows) >= 6
    missing = [frag for frag in table_rows if frag not in source and _norm(frag) not in flat]
    assert not missing, f"docs/troubleshooting.md quotes messages the code does not contain: {missing}"
