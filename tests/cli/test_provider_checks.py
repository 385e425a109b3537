"""``provider serve`` checks keys, allow-list, port, model path and split before it loads the model, and
``--dry-run`` prints the plan (issue 21). The model folder here has a config.json and no weights at all: any
command that got as far as loading it would fail."""

from __future__ import annotations

import json
import socket

import pytest
from typer.testing import CliRunner

from guardedp2p.cli.demo import free_port
from guardedp2p.cli.main import app
from guardedp2p.crypto.keys import generate_keypair

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("provider-checks")
    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 6}))
    keys = root / "keys"
    for name in ("provider", "client"):
        generate_keypair(keys, name)
    return root, model, keys


def _serve(world, *extra: str, port: int | None = None) -> list[str]:
    _, model, keys = world
    bind = f"tcp://127.0.0.1:{port or free_port()}"
    return ["provider", "serve", "--model", str(model), "--bind", bind, "--keys", str(keys), *extra]


def _flat(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


def test_dry_run_checks_everything_without_loading_the_model(world):
    _, _, keys = world
    res = runner.invoke(app, [*_serve(world, "--allow", str(keys / "client.key")), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "1 client key(s)" in res.stdout and "6 blocks" in res.stdout and "designs     online, gradfree" in res.stdout


def test_a_bad_allow_key_fails_before_the_model_loads(world, tmp_path):
    res = runner.invoke(app, _serve(world, "--allow", str(tmp_path / "missing.key")))
    assert res.exit_code == 2 and "missing.key" in _flat(res.output)
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, _serve(world, "--allow-dir", str(empty)))
    assert res.exit_code == 2 and "no client is allowed" in _flat(res.output)


def test_a_port_in_use_fails_before_the_model_loads(world):
    _, _, keys = world
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = runner.invoke(app, _serve(world, "--allow", str(keys / "client.key"), port=port))
    assert res.exit_code == 4 and "already in use" in _flat(res.output)


def test_a_split_deeper_than_the_model_fails_before_loading(world):
    _, _, keys = world
    res = runner.invoke(
        app, _serve(world, "--allow", str(keys / "client.key"), "--bottom-layers", "3", "--top-layers", "3")
    )
    assert res.exit_code == 2 and "no block of the model's 6" in _flat(res.output)
