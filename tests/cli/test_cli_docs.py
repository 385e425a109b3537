"""The CLI documentation matches the CLI.

* docs/cli.md is generated from the Typer app by scripts/gen_cli_docs.py; it must be up to date.
* Every ``guardedp2p …`` command line quoted in the hand-written docs and examples must use only commands and
  flags that exist (each is parsed by the real CLI with ``--help`` appended, which fails on an unknown option).
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS_WITH_COMMANDS = [
    "docs/user-guide.md",
    "docs/troubleshooting.md",
    "docs/architecture.md",
    "examples/README.md",
    "examples/two_terminals.md",
    "docs/big-models.md",
]


def _gen():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_md_is_up_to_date():
    gen = _gen()
    current = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") if (ROOT / "docs" / "cli.md").is_file() else ""
    assert current == gen.render(), "docs/cli.md is stale: run `python scripts/gen_cli_docs.py` and commit docs/cli.md"


def test_cli_md_lists_every_command_and_no_hidden_option():
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    for cmd in (
        "guardedp2p keys generate",
        "guardedp2p keys show",
        "guardedp2p provider serve",
        "guardedp2p provider fingerprint",
        "guardedp2p provider emulator build",
        "guardedp2p provider emulator verify",
        "guardedp2p provider emulator plug-in",
        "guardedp2p client tune",
        "guardedp2p demo",
    ):
        assert f"`{cmd}`" in text, cmd
    assert "--ready-file" not in text and "--max-messages" not in text  # hidden test hooks stay out of the docs


def test_generation_is_deterministic():
    gen = _gen()
    assert gen.render() == gen.render()


def quoted_commands(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, argv after 'guardedp2p') of each command line inside ```bash blocks of ``path``."""
    out: list[tuple[int, list[str]]] = []
    text = path.read_text(encoding="utf-8")
    for m in re.finditer(r"```bash\n(.*?)```", text, flags=re.S):
        start = text[: m.start()].count("\n") + 2
        lines: list[tuple[int, str]] = []
        buf, first = "", None
        for i, line in enumerate(m.group(1).splitlines()):  # join backslash continuations
            first = start + i if first is None else first
            buf += line.rstrip("\\") + " "
            if not line.endswith("\\"):
                lines.append((first, buf.strip()))
                buf, first = "", None
        for lineno, line in lines:
            cmd = re.sub(r"^(\.venv/bin/)?guardedp2p\s", "", line)
            if cmd == line or "…" in cmd or "..." in cmd:
                continue
            out.append((lineno, shlex.split(cmd, comments=True)))
    return out


@pytest.mark.parametrize("doc", DOCS_WITH_COMMANDS)
def test_quoted_commands_use_real_flags(doc):
    from typer.testing import CliRunner

    from guardedp2p.cli.main import app

    path = ROOT / doc
    if not path.is_file():
        pytest.skip(f"{doc} not written yet")
    cmds = quoted_commands(path)
    runner = CliRunner()
    bad = []
    for lineno, argv in cmds:
        res = runner.invoke(app, argv + ["--help"])
        if res.exit_code != 0:
            bad.append(f"{doc}:{lineno}: guardedp2p {shlex.join(argv)}\n{res.output[-600:]}")
    assert not bad, "commands in the docs that the CLI refuses:\n" + "\n".join(bad)
