"""Plug-in: adapters trained on the emulator load into the full model exactly as stock PEFT loads them, the
merged export computes the same, and bundles for another model, emulator or signer are refused."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from guardedp2p.crypto.keys import generate_keypair, load_signing_key
from guardedp2p.crypto.manifest import BadSignatureError, DigestMismatchError
from guardedp2p.designs.offline.emulator import EmulatorConfig, build_emulator, load_emulator, save_emulator
from guardedp2p.designs.offline.plugin import (
    BundleMismatchError,
    export_merged,
    export_peft,
    plug_in,
    verify_adapter_bundle,
)
from guardedp2p.designs.offline.transfer import make_adapter_bundle
from guardedp2p.engine.lora import LoraSettings, attach_lora, save_adapter
from tests.tiny_models import tiny_batch, tiny_model


def _trained_bundle(model, tmp_path, *, signer="client"):
    """Provider builds + signs the emulator; client loads it, gets non-trivial LoRA weights, bundles them."""
    for name in ("provider", "client", "stranger"):
        if not (tmp_path / "keys" / f"{name}.sign.key").exists():
            generate_keypair(tmp_path / "keys", name)
    emu = build_emulator(model, EmulatorConfig(emulator_layers=1))
    save_emulator(emu, tmp_path / "emu", load_signing_key(tmp_path / "keys", "provider"))
    loaded = load_emulator(tmp_path / "emu", tmp_path / "keys" / "provider.sign.pub")
    e = loaded.emulator
    torch.manual_seed(0)
    attach_lora(e.bottom, e.top, LoraSettings(r=4, alpha=8))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in list(e.bottom.named_parameters()) + list(e.top.named_parameters()):
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)  # as if trained
    save_adapter(e.bottom, e.top, tmp_path / "adapter")
    bundle = tmp_path / f"bundle-{signer}"
    make_adapter_bundle(
        tmp_path / "adapter", bundle, load_signing_key(tmp_path / "keys", signer), emulator_manifest=loaded.manifest
    )
    return bundle, loaded


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_plug_in_equals_stock_peft_loading_of_the_same_adapter(arch, tmp_path):
    from peft import PeftModel

    model = tiny_model(arch)
    bundle, _ = _trained_bundle(model, tmp_path)
    ids, mask, _ = tiny_batch()
    valid = mask.bool()
    plugged = plug_in(copy.deepcopy(model), bundle, tmp_path / "keys" / "client.sign.pub")
    assert plugged.bundle.signer_pinned and sum(plugged.loaded.values()) > 0
    stock = PeftModel.from_pretrained(copy.deepcopy(model), str(bundle)).eval()
    with torch.no_grad():
        mine = plugged.model(input_ids=ids, attention_mask=mask).logits
        ref = stock(input_ids=ids, attention_mask=mask).logits
        base = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(mine[valid], ref[valid], rtol=1e-5, atol=1e-5)
    assert (mine[valid] - base[valid]).abs().max() > 1e-3, "the adapter must change the model"


def test_merged_and_peft_exports_compute_the_plugged_model(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    bundle, _ = _trained_bundle(model, tmp_path)
    ids, mask, _ = tiny_batch()
    valid = mask.bool()
    plugged = plug_in(copy.deepcopy(model), bundle, None)
    assert plugged.bundle.signer_pinned is False
    out = export_merged(copy.deepcopy(model), bundle, tmp_path / "merged", tmp_path / "keys" / "client.sign.pub")
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    peft_dir = export_peft(bundle, tmp_path / "peft")
    again = PeftModel.from_pretrained(copy.deepcopy(model), str(peft_dir)).eval()
    with torch.no_grad():
        ref = plugged.model(input_ids=ids, attention_mask=mask).logits[valid]
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits[valid], ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).logits[valid], ref, rtol=1e-5, atol=1e-5)


def test_bundles_for_another_model_emulator_or_signer_are_refused(tmp_path):
    model = tiny_model("llama")
    bundle, loaded = _trained_bundle(model, tmp_path)
    with pytest.raises(BundleMismatchError, match="fingerprint"):
        plug_in(tiny_model("llama", seed=1), bundle)
    with pytest.raises(BundleMismatchError, match="another emulator"):
        verify_adapter_bundle(bundle, emulator_manifest_sha256="0" * 64)
    assert verify_adapter_bundle(bundle, emulator_manifest_sha256=loaded.manifest.sha256).signer_pinned is False
    with pytest.raises(BadSignatureError, match="does not trust"):
        plug_in(copy.deepcopy(model), bundle, tmp_path / "keys" / "stranger.sign.pub")
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    (bad / "adapter_config.json").write_text((bad / "adapter_config.json").read_text().replace('"r": 4', '"r": 5'))
    with pytest.raises(DigestMismatchError):
        plug_in(copy.deepcopy(model), bad)
