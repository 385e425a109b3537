"""Issue 18 item 5: a provider serves a client's returned Offline adapters, plugged into the trunk, to that client's
key only (``provider serve --serve-plugged``), through the same split generation.

The bundles here are cut at split 3/2 while the provider serves 2/2, so their adapters change trunk block 2 as well
as the client's own blocks: the owner's tokens must be exactly the unsplit plugged model's, another key's the base
model's, the base trunk must stay untouched, and a wrong bundle must be refused with a message naming the option.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from guardedp2p.crypto.manifest import BadSignatureError, DigestMismatchError, read_manifest, sign_folder
from guardedp2p.designs.offline.plugin import (
    ADAPTER_FILES,
    BUNDLE_KIND,
    BundleMismatchError,
    NothingToPlug,
    full_block_parameters,
    save_full_blocks,
)
from guardedp2p.designs.online.generate import (
    GenerateConfig,
    LocalCachedTrunk,
    PluggedTrunkMismatch,
    SplitGenerator,
    load_generation_client,
    open_generation_session,
)
from guardedp2p.engine.fingerprint import model_fingerprint
from guardedp2p.engine.lora import save_adapter
from guardedp2p.engine.split import SplitConfig, build_client_parts, build_trunk
from guardedp2p.errors import ConfigError
from guardedp2p.service.provider import (
    ProviderOptions,
    UploadOptions,
    build_provider_app,
    check_plugged,
    parse_serve_plugged,
)
from guardedp2p.transport.inproc import InProcClientChannel
from tests.protocol_helpers import client_parts
from tests.tiny_models import N_LAYERS, tiny_model
from tests.tiny_tokenizer import tiny_tokenizer

SERVED = SplitConfig(2, 2)  # the provider's trunk: blocks [2, 4)
WIDE = SplitConfig(3, 2)  # the bundles' split: blocks 0, 1, 2 and 4, 5; block 2 is in the served trunk
OWNER = "owner-curve-key"
OTHER = "other-curve-key"
PROMPTS = [[5, 17, 33, 8, 91, 40, 12, 77, 3], [44, 9, 120, 61], [7, 7, 19, 150, 2, 88]]
CFG = GenerateConfig(max_new_tokens=12, eos_token_ids=())


def _sign_bundle(folder, tmp_path, name, key, split, fingerprint):
    bundle = tmp_path / name
    bundle.mkdir()
    for f in ADAPTER_FILES:
        shutil.copyfile(folder / f, bundle / f)
    body = {
        "kind": BUNDLE_KIND,
        "base_fingerprint": fingerprint,
        "split": {"bottom_layers": split.bottom_layers, "top_layers": split.top_layers},
        "emulator_manifest_sha256": "0" * 64,
        "adapter": {"format": "test", "client_layers": split.client_layers(N_LAYERS)},
    }
    sign_folder(bundle, body, ADAPTER_FILES, key)
    return bundle


def _lora_bundle(model, tmp_path, key, split=WIDE, name="bundle"):
    """A LoRA bundle (random B, so every adapted block matters) and the unsplit model with it loaded by PEFT."""
    from peft import PeftModel

    parts, fp = client_parts(model, split)
    adapter = save_adapter(parts.bottom, parts.top, tmp_path / f"{name}-adapter")
    reference = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)).eval()
    return _sign_bundle(adapter, tmp_path, name, key, split, fp), reference


def _full_bundle(model, tmp_path, key, split=WIDE, name="bundle"):
    """A full-block bundle (the client blocks themselves perturbed) and the tuned unsplit model."""
    tuned = copy.deepcopy(model)
    parts = build_client_parts(tuned, split)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in full_block_parameters(parts.bottom, parts.top).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    folder = save_full_blocks(parts.bottom, parts.top, tmp_path / f"{name}-full")
    return _sign_bundle(folder, tmp_path, name, key, split, model_fingerprint(model, split)), tuned.eval()


def _app(model, plugged, pins, *, accept_unpinned=None):
    opts = ProviderOptions(
        bottom_layers=SERVED.bottom_layers,
        top_layers=SERVED.top_layers,
        protocols=("online", "gradfree"),
        device="cpu",
        uploads=UploadOptions(client_sign_keys=pins, accept_unpinned=accept_unpinned),
        plugged={k: str(v) for k, v in plugged.items()},
    )
    return build_provider_app(opts, model=model)


def _reference_tokens(model, prompts, max_new):
    """``transformers``' greedy ``generate`` on the unsplit model, prompts left-padded in one batch."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    cfg = copy.deepcopy(model.generation_config)
    cfg.eos_token_id, cfg.pad_token_id, cfg.do_sample = model.config.vocab_size, 0, False
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg, max_new_tokens=max_new)
    return out[:, width:].tolist()


def _client(model, adapter=None, *, kit=None):
    if kit is not None:
        folder, key = kit
        return load_generation_client(
            split=SERVED, adapter=adapter, device="cpu", dtype=None, kit=folder, kit_verify_key=key.public_key()
        )
    return load_generation_client(
        full_model=copy.deepcopy(model),
        tokenizer=tiny_tokenizer(),
        split=SERVED,
        adapter=adapter,
        device="cpu",
        dtype=None,
    )


def _generate(app, peer, client):
    gs = open_generation_session(lambda: InProcClientChannel(app, peer=peer), client, timeout=5.0)
    try:
        out = SplitGenerator(client.bottom, client.top, client.tokenizer, gs.trunk).generate(PROMPTS, CFG)
        return [g.tokens for g in out], gs.terms
    finally:
        gs.close()


@pytest.mark.parametrize("kind", ["lora", "full"])
@pytest.mark.parametrize("source", ["model", "kit"])
def test_owner_generates_through_its_plugged_trunk_exactly_the_plugged_models_tokens(tmp_path, kind, source):
    model = tiny_model("llama")
    signer = Ed25519PrivateKey.generate()
    bundle, plugged_model = (_lora_bundle if kind == "lora" else _full_bundle)(model, tmp_path, signer)
    app = _app(model, {OWNER: bundle}, {OWNER: [signer.public_key()]})
    kit = None
    if source == "kit":  # the client holds only the kit: no trunk block, so only its own blocks are loaded
        from guardedp2p.designs.kit import build_kit

        provider_key = Ed25519PrivateKey.generate()
        build_kit(model, tiny_tokenizer(), SERVED, provider_key, tmp_path / "kit")
        kit = (tmp_path / "kit", provider_key)
    client = _client(model, bundle, kit=kit)
    sha = read_manifest(bundle, None, kind=BUNDLE_KIND).sha256
    assert client.trunk_bundle == {"bundle": sha, "blocks": [2]}
    tokens, terms = _generate(app, OWNER, client)
    assert terms["plugged"]["bundle"] == sha and terms["plugged"]["blocks"] == [2]
    assert tokens == _reference_tokens(plugged_model, PROMPTS, CFG.max_new_tokens)
    # the plugged trunk block matters: the same client parts through the base trunk give other tokens
    base = LocalCachedTrunk(build_trunk(copy.deepcopy(model), SERVED))
    through_base = SplitGenerator(client.bottom, client.top, client.tokenizer, base).generate(PROMPTS, CFG)
    assert [g.tokens for g in through_base] != tokens


def test_another_key_gets_the_untouched_base_trunk_and_the_owners_bundle_is_refused_there(tmp_path):
    model = tiny_model("llama")
    pristine = copy.deepcopy(model)
    signer = Ed25519PrivateKey.generate()
    bundle, _ = _lora_bundle(model, tmp_path, signer)
    app = _app(model, {OWNER: bundle}, {OWNER: [signer.public_key()]})
    base = app.resources.trunk
    own = app.resources.peer_trunks[OWNER].trunk
    # only the changed block is the owner's own copy; the others are the base trunk's, which is untouched
    assert own.blocks[2] is not base.blocks[2] and own.blocks[3] is base.blocks[3]
    assert any("lora_" in n for n, _ in own.named_parameters())
    assert not any("lora_" in n for n, _ in base.named_parameters())
    expected = build_trunk(pristine, SERVED).state_dict()
    assert all(torch.equal(t, expected[n]) for n, t in base.state_dict().items())
    # another key: no "plugged" in its ACCEPT, the base model's tokens
    tokens, terms = _generate(app, OTHER, _client(model))
    assert "plugged" not in terms
    assert tokens == _reference_tokens(pristine, PROMPTS, CFG.max_new_tokens)
    # the owner's bundle through another key's session: refused before any token, with what to do
    with pytest.raises(PluggedTrunkMismatch, match="--serve-plugged") as err:
        _generate(app, OTHER, _client(model, bundle))
    assert "base trunk" in str(err.value)
    assert not app.sessions  # the refused session was closed


def test_wrong_bundles_and_keys_are_refused_with_a_readable_message(tmp_path):
    model = tiny_model("llama")
    signer = Ed25519PrivateKey.generate()
    pins = {OWNER: [signer.public_key()]}
    # made for another model: the base fingerprint of its split does not match
    foreign, _ = _lora_bundle(tiny_model("llama", seed=1), tmp_path, signer, name="foreign")
    with pytest.raises(BundleMismatchError, match="--serve-plugged .*fingerprint"):
        _app(model, {OWNER: foreign}, pins)
    # cut at the served split: it changes no trunk block, so the base trunk already serves it
    narrow, _ = _lora_bundle(model, tmp_path, signer, split=SERVED, name="narrow")
    with pytest.raises(NothingToPlug, match="base trunk already serves it"):
        _app(model, {OWNER: narrow}, pins)
    # signed by a key that is not pinned for that client, or no key pinned at all
    bundle, _ = _lora_bundle(model, tmp_path, Ed25519PrivateKey.generate())
    with pytest.raises(BadSignatureError, match="--serve-plugged"):
        _app(model, {OWNER: bundle}, pins)
    with pytest.raises(ConfigError, match="no signing key is pinned for that client"):
        _app(model, {OWNER: bundle}, {OTHER: [signer.public_key()]})
    # a damaged bundle is refused before any model is loaded
    good, _ = _lora_bundle(model, tmp_path, signer, name="good")
    data = bytearray((good / ADAPTER_FILES[1]).read_bytes())
    data[-1] ^= 1
    (good / ADAPTER_FILES[1]).write_bytes(bytes(data))
    opts = ProviderOptions(uploads=UploadOptions(client_sign_keys=pins), plugged={OWNER: str(good)})
    with pytest.raises(DigestMismatchError, match="--serve-plugged"):
        check_plugged(opts)


def test_serve_plugged_option_parsing(tmp_path):
    from guardedp2p.crypto.keys import generate_keypair, load_public_key

    pub, _ = generate_keypair(tmp_path / "keys", "alice")
    (tmp_path / "b").mkdir()
    assert parse_serve_plugged([f"{pub}={tmp_path / 'b'}"]) == {load_public_key(pub): str(tmp_path / "b")}
    with pytest.raises(ConfigError, match="cannot read the client key"):
        parse_serve_plugged([f"{tmp_path / 'nobody.key'}={tmp_path / 'b'}"])
    with pytest.raises(ConfigError, match="not a folder"):
        parse_serve_plugged([f"{pub}={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match="CLIENT.key=BUNDLE_DIR"):
        parse_serve_plugged([str(pub)])
    with pytest.raises(ConfigError, match="one bundle per key"):
        parse_serve_plugged([f"{pub}={tmp_path / 'b'}", f"{pub}={tmp_path / 'b'}"])


def test_cli_serve_plugged_is_checked_before_the_model_loads(tmp_path):
    from typer.testing import CliRunner

    from guardedp2p.cli.main import app

    (tmp_path / "b").mkdir()
    run = CliRunner().invoke
    res = run(app, ["provider", "serve", "--insecure", "--serve-plugged", f"alice.key={tmp_path / 'b'}"])
    assert res.exit_code != 0 and "--insecure has none" in res.output, res.output
    args = ["provider", "serve", "--keys", str(tmp_path), "--allow", str(tmp_path / "a.key"), "--serve-plugged"]
    res = run(app, [*args, f"{tmp_path / 'nobody.key'}={tmp_path / 'b'}"])
    assert res.exit_code != 0 and "cannot read the client key" in res.output, res.output


def test_tuning_against_a_plugged_trunk_is_said_and_recorded(tmp_path, caplog):
    """The owner's Online run goes through its plugged trunk: the adapter it saves builds on that trunk, so the
    client warns and the summary names the bundle (another key's run says ``base``)."""
    import logging

    from guardedp2p.service.client import TuneOptions, prepare_client, tune
    from guardedp2p.train.config import TrainConfig
    from tests.tiny_tokenizer import write_text_records

    model = tiny_model("llama")
    signer = Ed25519PrivateKey.generate()
    bundle, _ = _lora_bundle(model, tmp_path, signer)
    app = _app(model, {OWNER: bundle}, {OWNER: [signer.public_key()]})
    data = write_text_records(tmp_path / "train.jsonl", distinct=8)
    caplog.set_level(logging.WARNING)
    summaries = {}
    for peer in (OWNER, OTHER):
        opts = TuneOptions(
            protocol="online",
            model="tiny",
            data=str(data),
            out=str(tmp_path / peer),
            train=TrainConfig(steps=2, batch_size=2, lr=1e-3, warmup_steps=0, checkpoint_every=0, max_length=16),
            bottom_layers=SERVED.bottom_layers,
            top_layers=SERVED.top_layers,
            progress=False,
            timeout=5.0,
            retries=0,
            skip_eval=True,
        )
        client = prepare_client(opts, model=copy.deepcopy(model), tokenizer=tiny_tokenizer())
        summaries[peer] = tune(opts, lambda p=peer: InProcClientChannel(app, peer=p), client=client)
    sha = read_manifest(bundle, None, kind=BUNDLE_KIND).sha256
    assert summaries[OWNER]["provider_trunk"] == {"plugged": {"bundle": sha, "blocks": [2]}}
    assert summaries[OTHER]["provider_trunk"] == "base"
    said = [r.getMessage() for r in caplog.records if "the adapter this run saves" in r.getMessage()]
    assert len(said) == 1, said
