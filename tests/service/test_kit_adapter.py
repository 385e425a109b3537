"""An adapter tuned from a client kit names the kit's model, not ``--model`` (which a kit client never passes), and
says how to use it with the kit (guardedp2p/service/export.py ``kit_base``; issue 18)."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from guardedp2p.designs.kit import build_kit
from guardedp2p.engine.fingerprint import model_fingerprint
from guardedp2p.engine.split import SplitConfig
from guardedp2p.service.export import DEFAULT_NOTE, kit_base, point_adapter_at, portable_base
from tests.tiny_models import tiny_model
from tests.tiny_tokenizer import tiny_tokenizer

SPLIT = SplitConfig(bottom_layers=2, top_layers=2)


@pytest.fixture
def key():
    return Ed25519PrivateKey.generate()


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GUARDEDP2P_CACHE", str(tmp_path / "cache"))  # no recorded export of the default model


def test_adapter_from_a_kit_names_the_kits_model_and_how_to_use_it(tmp_path, key):
    model = tiny_model("llama")
    kit = tmp_path / "kit"
    build_kit(model, tiny_tokenizer(), SPLIT, key, kit, model_name="acme/secret-7b")
    base = portable_base("default", kit=kit)  # --model keeps its default in a kit run
    assert base == kit_base(kit) and base != DEFAULT_NOTE
    assert str(kit.resolve()) in base and "acme/secret-7b" in base
    assert model_fingerprint(model, SPLIT)[:16] in base
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "default"}))
    point_adapter_at(adapter, base, kit=kit)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    readme = (adapter / "README.md").read_text()
    assert f"client generate --kit {kit.resolve()}" in readme and "--adapter THIS_FOLDER" in readme
    assert "model export default" not in readme  # the default model's instructions would be wrong here


def test_a_kit_of_the_default_model_names_the_default_models_portable_base(tmp_path, key):
    kit = tmp_path / "kit"
    build_kit(tiny_model("llama"), None, SPLIT, key, kit, model_name="default")
    assert portable_base("default", kit=kit) == portable_base("default") == DEFAULT_NOTE


def test_an_unreadable_kit_manifest_still_names_the_kit(tmp_path):
    base = kit_base(tmp_path / "gone")
    assert str((tmp_path / "gone").resolve()) in base and "the provider's model" in base


def test_an_adapter_tuned_from_the_kit_generates_with_the_kit_alone(tmp_path, key):
    """The adapter a kit client saves (its parts' LoRA), pointed at the kit, loads back into a kit client."""
    import torch

    from guardedp2p.designs.kit import load_kit
    from guardedp2p.designs.online.generate import load_generation_client
    from guardedp2p.engine.lora import LoraSettings, attach_lora, save_adapter
    from guardedp2p.engine.split import build_client_parts

    kit = tmp_path / "kit"
    build_kit(tiny_model("llama"), tiny_tokenizer(), SPLIT, key, kit, model_name="acme/secret-7b")
    pub = key.public_key()
    parts = build_client_parts(load_kit(kit, pub).model, SPLIT)
    torch.manual_seed(0)
    for p in attach_lora(parts.bottom, parts.top, LoraSettings(r=4, alpha=8), bottom=True, top=True):
        torch.nn.init.normal_(p, std=0.1)  # B starts at zero: make the adapter change something
    adapter = save_adapter(parts.bottom, parts.top, tmp_path / "adapter")
    point_adapter_at(adapter, portable_base("default", kit=kit), kit=kit)
    pem = tmp_path / "p.sign.pub"
    pem.write_bytes(pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    client = load_generation_client(split=SPLIT, adapter=adapter, device="cpu", kit=kit, kit_verify_key=pem)
    ids = torch.tensor([[5, 17, 33, 8]])
    with torch.no_grad():
        torch.testing.assert_close(client.bottom(ids, torch.ones_like(ids)), parts.bottom(ids, torch.ones_like(ids)))
