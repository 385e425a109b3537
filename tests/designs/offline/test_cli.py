"""``guardedp2p provider emulator build / verify`` on a tiny local model folder (layer drop + distillation + int8)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from guardedp2p.cli.emulator import emulator_app
from guardedp2p.crypto.keys import generate_keypair
from tests.tiny_models import tiny_model
from tests.tiny_tokenizer import tiny_tokenizer


@pytest.mark.parametrize("fill", ["drop", "share"])
def test_build_then_verify_a_distilled_int8_emulator(tmp_path, fill):
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(str(model_dir))
    tiny_tokenizer().save_pretrained(str(model_dir))
    generate_keypair(tmp_path / "keys", "provider")
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(" ".join(f"w{(i + k) % 100}" for k in range(8)) for i in range(20)))
    runner = CliRunner()
    res = runner.invoke(
        emulator_app,
        [
            "build",
            "--model",
            str(model_dir),
            "--out",
            str(tmp_path / "emu"),
            "--keys",
            str(tmp_path / "keys"),
            "--emulator-layers",
            "1",
            "--distill-data",
            str(text),
            "--distill-steps",
            "2",
            "--distill-max-length",
            "16",
            "--distill-cache",
            str(tmp_path / "cache"),
            "--quantize",
            "int8",
            "--fill",
            fill,
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["middle_kept"] == [2] and summary["compression"]["quantize"] == "int8"
    assert summary["compression"]["distillation"]["steps"] == 2
    assert summary["compression"].get("fill", "drop") == fill
    ok = runner.invoke(
        emulator_app, ["verify", str(tmp_path / "emu"), "--key", str(tmp_path / "keys" / "provider.sign.pub")]
    )
    assert ok.exit_code == 0 and "OK: emulator" in ok.output
    (tmp_path / "emu" / "config.json").write_text("{}")
    bad = runner.invoke(
        emulator_app, ["verify", str(tmp_path / "emu"), "--key", str(tmp_path / "keys" / "provider.sign.pub")]
    )
    assert bad.exit_code == 8 and "DigestMismatchError" in bad.output


def test_build_refuses_to_run_unsigned(tmp_path):
    res = CliRunner().invoke(
        emulator_app, ["build", "--model", "default", "--out", str(tmp_path / "e"), "--keys", str(tmp_path / "nokeys")]
    )
    assert res.exit_code != 0


def test_demo_emulator_is_signed_by_the_demo_provider_key(tmp_path, monkeypatch):
    from guardedp2p.crypto.manifest import verify_artifact
    from guardedp2p.designs.offline.build import build_demo_emulator

    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(str(model_dir))
    tiny_tokenizer().save_pretrained(str(model_dir))
    generate_keypair(tmp_path / "keys", "provider")
    monkeypatch.setenv("GUARDEDP2P_CACHE", str(tmp_path / "cache"))  # the distillation cache
    out = build_demo_emulator(str(model_dir), tmp_path / "emu", tmp_path / "keys", distill_steps=2)
    m = verify_artifact(out, tmp_path / "keys" / "provider.sign.pub", kind="emulator")
    assert m["compression"]["quantize"] == "int8" and m["layers"]["middle_kept"] == [2]
    d = m["compression"]["distillation"]
    assert d["steps"] == 2 and d["data"] == "builtin:python-docs"
    assert any((tmp_path / "cache" / "emulators").iterdir())


def test_build_drops_the_blocks_it_is_told_to(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(str(model_dir))
    tiny_tokenizer().save_pretrained(str(model_dir))
    generate_keypair(tmp_path / "keys", "provider")
    args = ["build", "--model", str(model_dir), "--keys", str(tmp_path / "keys"), "--device", "cpu", "--json"]
    runner = CliRunner()
    res = runner.invoke(emulator_app, [*args, "--out", str(tmp_path / "emu"), "--drop-blocks", "3"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["middle_kept"] == [2]
    bad = runner.invoke(emulator_app, [*args, "--out", str(tmp_path / "e2"), "--drop-blocks", "three"])
    assert bad.exit_code == 2 and "block indices" in bad.output
    outside = runner.invoke(emulator_app, [*args, "--out", str(tmp_path / "e3"), "--drop-blocks", "0"])
    assert outside.exit_code == 2 and "middle blocks" in outside.output
