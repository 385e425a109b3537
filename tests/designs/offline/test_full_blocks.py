"""Full-block adapters (offsite-tuning's adapters, arXiv 2302.04870): the client trains its bottom/top blocks
themselves on the emulator; the signed bundle carries exactly those blocks; the provider verifies it and plugs
them into the full model; anything else in the bundle is refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from guardedp2p.crypto.keys import generate_keypair, load_signing_key
from guardedp2p.crypto.manifest import DigestMismatchError
from guardedp2p.designs.offline.emulator import EmulatorConfig, build_emulator, load_emulator, save_emulator
from guardedp2p.designs.offline.plugin import (
    ADAPTER_FILES,
    BundleMismatchError,
    adapter_type_of,
    enable_full_blocks,
    export_merged,
    export_peft,
    full_block_parameters,
    make_full_block_bundle,
    plug_in,
    save_full_blocks,
    verify_adapter_bundle,
)
from guardedp2p.engine.split import loss_fn
from guardedp2p.errors import ConfigError
from guardedp2p.train.config import TrainConfig
from guardedp2p.train.trainer import SplitTrainer
from tests.tiny_models import tiny_batch, tiny_model


def _keys(tmp_path):
    for name in ("provider", "client"):
        if not (tmp_path / "keys" / f"{name}.sign.key").exists():
            generate_keypair(tmp_path / "keys", name)


def _trained_emulator(model, tmp_path, steps=3, cfg=None):
    """Provider signs an emulator (``cfg``; default: one middle block kept); the client loads it and trains its
    blocks for a few steps."""
    _keys(tmp_path)
    emu = build_emulator(model, cfg or EmulatorConfig(emulator_layers=1))
    save_emulator(emu, tmp_path / "emu", load_signing_key(tmp_path / "keys", "provider"))
    loaded = load_emulator(tmp_path / "emu", tmp_path / "keys" / "provider.sign.pub")
    e = loaded.emulator
    n = enable_full_blocks(e.bottom, e.top)
    assert n == sum(p.numel() for p in full_block_parameters(e.bottom, e.top).values()) > 0
    trainer = SplitTrainer(
        e.bottom, e.top, e.trunk_fn(), TrainConfig(steps=steps, lr=1e-2, warmup_steps=0), loss_fn=loss_fn
    )
    ids, mask, labels = tiny_batch()
    for _ in range(steps):
        trainer.train_step([{"input_ids": ids, "attention_mask": mask, "labels": labels}])
    return loaded, trainer


def test_training_full_blocks_changes_only_the_client_blocks(tmp_path):
    model = tiny_model("llama")
    loaded, _ = _trained_emulator(model, tmp_path)
    e = loaded.emulator
    full = model.state_dict()
    blocks = set(full_block_parameters(e.bottom, e.top))
    changed = {k for k, v in e.model.state_dict().items() if not torch.equal(v, full[k])}
    assert changed and changed <= blocks, "embedding, norm, head and the middle stay frozen"
    assert len({k.split(".")[2] for k in changed}) == 4, "every client block (0, 1, 4, 5) is trained"


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_full_block_bundle_round_trips_and_plugs_in(arch, tmp_path):
    model = tiny_model(arch)
    loaded, trainer = _trained_emulator(model, tmp_path)
    e = loaded.emulator
    save_full_blocks(e.bottom, e.top, tmp_path / "adapter", base_model_name_or_path="tiny")
    assert adapter_type_of(tmp_path / "adapter") == "full"
    cfg = json.loads((tmp_path / "adapter" / ADAPTER_FILES[0]).read_text())
    assert cfg["blocks"] == [0, 1, 4, 5] and cfg["adapter_type"] == "full-blocks"
    m = make_full_block_bundle(
        tmp_path / "adapter",
        tmp_path / "bundle",
        load_signing_key(tmp_path / "keys", "client"),
        emulator_manifest=loaded.manifest,
    )
    assert m["adapter"]["format"] == "full-blocks" and sorted(m.files) == sorted(ADAPTER_FILES)
    vb = verify_adapter_bundle(
        tmp_path / "bundle",
        tmp_path / "keys" / "client.sign.pub",
        emulator_manifest_sha256=loaded.manifest.sha256,
        fingerprint=loaded.manifest["fingerprint"],
    )
    assert vb.signer_pinned

    plugged = plug_in(copy.deepcopy(model), tmp_path / "bundle", tmp_path / "keys" / "client.sign.pub")
    assert plugged.loaded["bottom"] > 0 and plugged.loaded["top"] > 0
    trained = {k: v for k, v in e.model.state_dict().items()}
    blocks = set(full_block_parameters(e.bottom, e.top))
    for k, v in plugged.model.state_dict().items():
        if k in blocks:
            assert torch.equal(v, trained[k]), k
        else:
            assert torch.equal(v, model.state_dict()[k]), f"{k} is not a client block and must stay as it was"
    # the plugged model computes the trained client blocks around the *full* middle
    ids, mask, _ = tiny_batch()
    with torch.no_grad():
        out = plugged.model(input_ids=ids, attention_mask=mask).logits
        base = model(input_ids=ids, attention_mask=mask).logits
    assert (out - base)[mask.bool()].abs().max() > 1e-4

    merged = export_merged(copy.deepcopy(model), tmp_path / "bundle", tmp_path / "merged")
    assert (merged / "config.json").is_file()
    with pytest.raises(ConfigError, match="not a PEFT adapter"):
        export_peft(tmp_path / "bundle", tmp_path / "peft")


def test_an_emulator_that_keeps_every_block_plugs_in_as_exactly_the_tuned_emulator(tmp_path):
    """The fixed point of the Offline path: with no middle block dropped, the emulator *is* the full model, so
    the plugged model must compute what the client's tuned emulator computes. A failure here (block indices,
    rotary, masks, the bundle's tensor names) would show as a plug-in at chance whatever the compression; the
    measured non-transfer of docs/results/offline.md is therefore the compression's, not the plumbing's."""
    model = tiny_model("llama")
    everything = EmulatorConfig(keep_fraction=1.0)
    ids, mask, _ = tiny_batch()
    valid = mask.bool()
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        fresh = build_emulator(model, everything)
        assert len(fresh.layer_map.middle_kept) == len(fresh.layer_map.middle)
        torch.testing.assert_close(fresh.logits(ids, mask)[valid], base[valid], rtol=0, atol=0)
    loaded, _ = _trained_emulator(model, tmp_path, cfg=everything)
    e = loaded.emulator
    save_full_blocks(e.bottom, e.top, tmp_path / "adapter", base_model_name_or_path="tiny")
    make_full_block_bundle(
        tmp_path / "adapter",
        tmp_path / "bundle",
        load_signing_key(tmp_path / "keys", "client"),
        emulator_manifest=loaded.manifest,
    )
    plugged = plug_in(copy.deepcopy(model), tmp_path / "bundle", tmp_path / "keys" / "client.sign.pub")
    e.bottom.train(False)
    e.top.train(False)
    with torch.no_grad():
        tuned = e.logits(ids, mask)[valid]
        out = plugged.model(input_ids=ids, attention_mask=mask).logits[valid]
    assert (tuned - base[valid]).abs().max() > 1e-2, "the tuning must change the model"
    torch.testing.assert_close(out, tuned, rtol=1e-5, atol=1e-5)


def test_full_block_bundle_with_a_middle_block_or_a_missing_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model("llama")
    loaded, _ = _trained_emulator(model, tmp_path, steps=1)
    e = loaded.emulator
    sk = load_signing_key(tmp_path / "keys", "client")
    save_full_blocks(e.bottom, e.top, tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / ADAPTER_FILES[1]))

    extra = dict(tensors)
    extra["model.layers.3.mlp.up_proj.weight"] = torch.zeros_like(tensors["model.layers.4.mlp.up_proj.weight"])
    save_file(extra, str(tmp_path / "a" / ADAPTER_FILES[1]))
    make_full_block_bundle(tmp_path / "a", tmp_path / "b1", sk, emulator_manifest=loaded.manifest)
    with pytest.raises(BundleMismatchError, match="outside the client blocks"):
        plug_in(copy.deepcopy(model), tmp_path / "b1")

    missing = {k: v for k, v in tensors.items() if "layers.5." not in k}
    save_file(missing, str(tmp_path / "a" / ADAPTER_FILES[1]))
    make_full_block_bundle(tmp_path / "a", tmp_path / "b2", sk, emulator_manifest=loaded.manifest)
    with pytest.raises(BundleMismatchError, match="lacks"):
        plug_in(copy.deepcopy(model), tmp_path / "b2")

    # a bundle changed after signing fails its digests before any tensor is read
    save_file(tensors, str(tmp_path / "a" / ADAPTER_FILES[1]))
    make_full_block_bundle(tmp_path / "a", tmp_path / "b3", sk, emulator_manifest=loaded.manifest)
    t = load_file(str(tmp_path / "b3" / ADAPTER_FILES[1]))
    t["model.layers.0.mlp.up_proj.weight"] += 1
    save_file(t, str(tmp_path / "b3" / ADAPTER_FILES[1]))
    with pytest.raises(DigestMismatchError):
        plug_in(copy.deepcopy(model), tmp_path / "b3")

    # another base model (fingerprint) is refused too
    save_file(tensors, str(tmp_path / "a" / ADAPTER_FILES[1]))
    make_full_block_bundle(tmp_path / "a", tmp_path / "b4", sk, emulator_manifest=loaded.manifest)
    with pytest.raises(BundleMismatchError, match="fingerprint"):
        plug_in(tiny_model("llama", seed=5), tmp_path / "b4")


def test_full_blocks_refuse_lora_on_the_same_blocks():
    from guardedp2p.engine.lora import LoraSettings, attach_lora

    emu = build_emulator(tiny_model("llama"), EmulatorConfig(emulator_layers=1))
    attach_lora(emu.bottom, emu.top, LoraSettings(r=2, alpha=4))
    with pytest.raises(ConfigError, match="do not attach LoRA"):
        enable_full_blocks(emu.bottom, emu.top)


def test_offline_run_with_full_block_adapters_uploads_and_plugs_them_in(tmp_path):
    """The whole Offline run (in-process channel) with ``OfflineOptions(adapter="full")``."""
    from pathlib import Path

    from guardedp2p.designs.offline.provider import offline_session
    from guardedp2p.designs.offline.run import OfflineOptions, tune_offline
    from guardedp2p.protocol.provider import ProviderApp, ProviderResources
    from guardedp2p.service.client import TuneOptions
    from guardedp2p.transport.inproc import InProcClientChannel
    from guardedp2p.wire.handshake import ProviderPolicy
    from tests.tiny_tokenizer import tiny_tokenizer, write_text_records

    _keys(tmp_path)
    model = tiny_model("llama")
    emu = build_emulator(model, EmulatorConfig(emulator_layers=1))
    save_emulator(emu, tmp_path / "emu", load_signing_key(tmp_path / "keys", "provider"), tokenizer=tiny_tokenizer())
    res = ProviderResources(emulator_dir=str(tmp_path / "emu"), upload_dir=str(tmp_path / "uploads"))
    app = ProviderApp(ProviderPolicy(protocols=("offline",)), {"offline": offline_session}, resources=res)
    train = TrainConfig(steps=4, batch_size=4, lr=1e-2, warmup_steps=1, checkpoint_every=2, max_length=16)
    opts = TuneOptions(
        protocol="offline",
        model="tiny",
        data=str(write_text_records(tmp_path / "train.jsonl")),
        out=str(tmp_path / "run"),
        train=train,
        progress=False,
        timeout=1.0,
        retries=0,
        eval_batch_size=8,
    )
    off = OfflineOptions(
        provider_verify_key=tmp_path / "keys" / "provider.sign.pub",
        client_keys=str(tmp_path / "keys"),
        adapter="full",
        block_lr=3e-3,
    )
    s = tune_offline(
        opts,
        lambda: InProcClientChannel(app),
        offline=off,
        base_model=copy.deepcopy(model),
        base_tokenizer=tiny_tokenizer(),
    )
    assert s["upload_ack"]["verified"] is True
    stored = tmp_path / "uploads" / f"bundle-{s['upload_ack']['bundle_id']}"
    assert adapter_type_of(stored) == "full"
    assert verify_adapter_bundle(stored).manifest["adapter"]["format"] == "full-blocks"
    assert s["train_config"]["lr"] == 3e-3
    for k in ("zero_shot_full", "full_finetune", "emulator_zero_shot", "emulator_finetune", "plug_in"):
        assert s[k] == s[k], k  # computed, not NaN
    assert Path(s["bundle_dir"]).is_dir()
