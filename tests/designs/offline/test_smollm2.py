"""The Offline design on the embedded SmolLM2 (slow): a signed int8 emulator round-trips, its fingerprint is the
full model's, nothing dropped means nothing changed, and a plug-in equals stock PEFT on the real model."""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.slow


def test_smollm2_emulator_round_trip_and_plug_in(smollm2, tmp_path):
    from peft import PeftModel

    from guardedp2p.crypto.keys import generate_keypair, load_signing_key
    from guardedp2p.designs.offline.emulator import EmulatorConfig, build_emulator, load_emulator, save_emulator
    from guardedp2p.designs.offline.plugin import plug_in
    from guardedp2p.designs.offline.transfer import make_adapter_bundle
    from guardedp2p.engine.fingerprint import model_fingerprint
    from guardedp2p.engine.lora import LoraSettings, attach_lora, save_adapter
    from guardedp2p.engine.split import SplitConfig

    model, tok = smollm2
    generate_keypair(tmp_path / "k", "provider")
    generate_keypair(tmp_path / "k", "client")
    batch = tok(
        ["Patient Maria Kovacs, born 1970-01-02; diagnosis: asthma", "The river runs"],
        return_tensors="pt",
        padding=True,
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    valid = mask.bool()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        same = build_emulator(model, EmulatorConfig(emulator_layers=26)).logits(ids, mask)
    torch.testing.assert_close(same[valid], full[valid], rtol=1e-4, atol=1e-4)

    emu = build_emulator(model, EmulatorConfig(emulator_layers=18, quantize="int8"))
    m = save_emulator(emu, tmp_path / "emu", load_signing_key(tmp_path / "k", "provider"), tokenizer=tok)
    assert m["fingerprint"] == model_fingerprint(model, SplitConfig(2, 2))
    assert m.total_bytes < 0.6 * sum(p.numel() for p in model.parameters()) * 4
    loaded = load_emulator(tmp_path / "emu", tmp_path / "k" / "provider.sign.pub")
    assert loaded.tokenizer("hello")["input_ids"] == tok("hello")["input_ids"]
    e = loaded.emulator
    torch.manual_seed(0)
    attach_lora(e.bottom, e.top, LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for n, p in list(e.bottom.named_parameters()) + list(e.top.named_parameters()):
            if "lora_B" in n:
                p.normal_(0, 0.02)
    save_adapter(e.bottom, e.top, tmp_path / "adapter")
    make_adapter_bundle(
        tmp_path / "adapter",
        tmp_path / "bundle",
        load_signing_key(tmp_path / "k", "client"),
        emulator_manifest=loaded.manifest,
    )
    plugged = plug_in(copy.deepcopy(model), tmp_path / "bundle", tmp_path / "k" / "client.sign.pub")
    stock = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "bundle")).eval()
    with torch.no_grad():
        a = plugged.model(input_ids=ids, attention_mask=mask).logits
        b = stock(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a[valid], b[valid], rtol=1e-4, atol=1e-4)
    assert (a[valid] - full[valid]).abs().max() > 1e-3
