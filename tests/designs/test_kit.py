"""Client kit (guardedp2p/designs/kit.py): what it holds (never a trunk tensor), that a client built from it has
the full model's fingerprint and outputs, and that tampered, foreign-signed or mismatched kits are refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors import safe_open

from guardedp2p.crypto.manifest import BadSignatureError, DigestMismatchError
from guardedp2p.designs.kit import (
    KIT_KIND,
    WEIGHTS_FILE,
    KitError,
    KitMismatchError,
    block_index,
    build_kit,
    load_kit,
)
from guardedp2p.engine.fingerprint import model_fingerprint
from guardedp2p.engine.split import SplitConfig, build_client_parts
from guardedp2p.errors import ArtifactError, ConfigError
from tests.tiny_models import N_LAYERS, tiny_batch, tiny_model
from tests.tiny_tokenizer import tiny_tokenizer

SPLIT = SplitConfig(bottom_layers=2, top_layers=2)


@pytest.fixture
def key():
    return Ed25519PrivateKey.generate()


def _kit(tmp_path, key, arch="llama", split=SPLIT, seed=0):
    model = tiny_model(arch, seed=seed)
    out = tmp_path / f"kit-{arch}-{seed}-{split.bottom_layers}-{split.top_layers}"
    manifest = build_kit(model, tiny_tokenizer(), split, key, out)
    return model, out, manifest


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2"])
def test_kit_holds_no_trunk_tensor_and_every_client_tensor(tmp_path, key, arch):
    from guardedp2p.engine.arch import get_arch

    model, out, manifest = _kit(tmp_path, key, arch)
    assert manifest.kind == KIT_KIND
    trunk = set(SPLIT.trunk_range(N_LAYERS))
    assert manifest["trunk_layers"] == sorted(trunk)
    blocks_path = get_arch(model).blocks_path
    with safe_open(str(out / WEIGHTS_FILE), framework="pt") as fh:
        names = list(fh.keys())
    indices = {block_index(n, blocks_path) for n in names} - {None}
    assert indices == set(SPLIT.client_layers(N_LAYERS))
    assert not indices & trunk
    # every trunk tensor of the full model is absent
    trunk_names = [n for n in model.state_dict() if block_index(n, blocks_path) in trunk]
    assert trunk_names and not set(trunk_names) & set(names)
    assert manifest["params"]["client"] < manifest["params"]["full_model"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2"])
def test_kit_client_has_the_full_models_fingerprint_and_outputs(tmp_path, key, arch):
    model, out, _ = _kit(tmp_path, key, arch)
    kit = load_kit(out, key.public_key(), split=SPLIT)
    assert model_fingerprint(kit.model, SPLIT) == model_fingerprint(model, SPLIT) == kit.fingerprint
    assert kit.tokenizer is not None and kit.tokenizer.pad_token == "[PAD]"
    full = build_client_parts(copy.deepcopy(model), SPLIT)
    mine = build_client_parts(kit.model, SPLIT)
    ids, mask, _ = tiny_batch()
    with torch.no_grad():
        h_full, h_kit = full.bottom(ids, mask), mine.bottom(ids, mask)
        torch.testing.assert_close(h_kit, h_full)
        torch.testing.assert_close(mine.top(h_full, mask), full.top(h_full, mask))
    # the trunk slots are parameter-free placeholders
    assert sum(p.numel() for p in kit.model.parameters()) < sum(p.numel() for p in model.parameters())


class _CpuWrites:
    """Bytes written on the CPU by random initialisation or fills while active (a TorchDispatchMode)."""

    OPS = ("aten.normal_", "aten.uniform_", "aten.fill_", "aten.zero_", "aten.random_", "aten.copy_")

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if str(func).startswith(outer.OPS) and args and args[0].device.type == "cpu":
                    outer.bytes += args[0].numel() * args[0].element_size()
                return out

        self.bytes = 0
        self.mode = Mode()


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_kit_client_never_materialises_a_block_it_does_not_load(tmp_path, key, arch):
    """The skeleton is built on the meta device: no block (the trunk's least of all) is ever given memory or
    random weights, the client holds exactly the kit's tensors, and tied weights stay one parameter."""
    from guardedp2p.designs.kit import kit_skeleton
    from guardedp2p.engine.arch import get_arch, get_path

    model, out, _ = _kit(tmp_path, key, arch, split=SplitConfig(bottom_layers=1, top_layers=1))
    blocks_path = get_arch(model).blocks_path
    block_bytes = sum(p.numel() * p.element_size() for p in get_path(model, blocks_path)[0].parameters())
    skeleton = kit_skeleton(model.config, SplitConfig(bottom_layers=1, top_layers=1))
    assert all(p.is_meta for p in skeleton.parameters())
    writes = _CpuWrites()
    with writes.mode:
        kit = load_kit(out, key.public_key(), load_tokenizer=False)
    assert writes.bytes < block_bytes / 4, f"{writes.bytes} bytes initialised on the CPU while loading the kit"
    assert not any(p.is_meta for p in kit.model.parameters())
    blocks = get_path(kit.model, blocks_path)
    assert [i for i, b in enumerate(blocks) if any(True for _ in b.parameters())] == [0, N_LAYERS - 1]
    with safe_open(str(out / WEIGHTS_FILE), framework="pt") as fh:
        kit_bytes = sum(fh.get_tensor(k).numel() * fh.get_tensor(k).element_size() for k in fh.keys())
    unique = {p.data_ptr(): p.numel() * p.element_size() for p in kit.model.parameters()}
    persistent = {b.data_ptr(): b.numel() * b.element_size() for b in kit.model.state_dict().values()}
    assert sum({**unique, **persistent}.values()) == kit_bytes
    if model.config.tie_word_embeddings:
        assert kit.model.get_input_embeddings().weight is kit.model.get_output_embeddings().weight


def test_tampered_kit_is_refused(tmp_path, key):
    _, out, _ = _kit(tmp_path, key)
    data = bytearray((out / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0x01
    (out / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError, match="SHA-256"):
        load_kit(out, key.public_key(), split=SPLIT)


def test_kit_signed_by_another_key_is_refused(tmp_path, key):
    _, out, _ = _kit(tmp_path, key)
    with pytest.raises(BadSignatureError, match="does not verify"):
        load_kit(out, Ed25519PrivateKey.generate().public_key(), split=SPLIT)


def test_edited_manifest_is_refused(tmp_path, key):
    _, out, _ = _kit(tmp_path, key)
    m = json.loads((out / "manifest.json").read_text())
    m["split"]["bottom_layers"] = 1
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError):
        load_kit(out, key.public_key())


def test_kit_for_another_split_is_refused(tmp_path, key):
    _, out, _ = _kit(tmp_path, key)
    with pytest.raises(KitMismatchError, match="--bottom-layers 2 --top-layers 2"):
        load_kit(out, key.public_key(), split=SplitConfig(bottom_layers=1, top_layers=1))
    assert issubclass(KitMismatchError, ConfigError)


def test_kit_for_another_model_is_refused(tmp_path, key):
    _, out, _ = _kit(tmp_path, key)
    other = model_fingerprint(tiny_model("llama", seed=1), SPLIT)
    with pytest.raises(KitMismatchError, match="another model"):
        load_kit(out, key.public_key(), split=SPLIT, expect_fingerprint=other)


def test_kit_signed_over_wrong_weights_is_refused(tmp_path, key):
    """A kit whose weights come from one model but whose signed fingerprint is another's (a signer's mistake)."""
    from guardedp2p.crypto.manifest import sign_folder

    _, out, manifest = _kit(tmp_path, key)
    body = {k: v for k, v in manifest.data.items() if k not in ("format", "version", "files", "signer")}
    body["fingerprint"] = model_fingerprint(tiny_model("llama", seed=1), SPLIT)
    sign_folder(out, body, list(manifest.files), key)
    with pytest.raises(KitError, match="fingerprint"):
        load_kit(out, key.public_key(), split=SPLIT)


def test_cli_provider_kit_build_and_verify(tmp_path):
    from typer.testing import CliRunner

    from guardedp2p.cli.main import app
    from guardedp2p.crypto.keys import generate_keypair

    generate_keypair(tmp_path / "keys", "provider")
    generate_keypair(tmp_path / "keys", "stranger")
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    runner = CliRunner()
    args = ["provider", "kit", "build", "--model", str(tmp_path / "model"), "--keys", str(tmp_path / "keys")]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "kit"), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["kind"] == KIT_KIND and summary["split"] == {"bottom_layers": 2, "top_layers": 2}
    assert summary["fingerprint"] == model_fingerprint(model, SPLIT)
    ok = runner.invoke(
        app, ["provider", "kit", "verify", str(tmp_path / "kit"), "--key", str(tmp_path / "keys" / "provider.sign.pub")]
    )
    assert ok.exit_code == 0 and "OK: client kit" in ok.stdout
    bad = runner.invoke(
        app, ["provider", "kit", "verify", str(tmp_path / "kit"), "--key", str(tmp_path / "keys" / "stranger.sign.pub")]
    )
    assert bad.exit_code != 0 and "does not verify" in bad.output


@pytest.mark.parametrize("protocol", ["online", "gradfree"])
def test_client_with_only_the_kit_trains_to_the_same_loss(tmp_path, key, protocol):
    from guardedp2p.service.client import TuneOptions, prepare_client, tune
    from guardedp2p.train.config import TrainConfig
    from guardedp2p.transport.inproc import InProcClientChannel
    from tests.protocol_helpers import provider_app
    from tests.tiny_tokenizer import write_text_records

    model, kit_dir, _ = _kit(tmp_path, key)
    pub = tmp_path / "provider.sign.pub"
    from cryptography.hazmat.primitives import serialization

    pub.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    data = write_text_records(tmp_path / "train.jsonl", distinct=3)

    def opts(name, **kw):
        train = TrainConfig(steps=6, batch_size=4, lr=1e-2, warmup_steps=1, max_length=16, lora_r=4, lora_alpha=8)
        return TuneOptions(
            protocol=protocol, model="tiny", data=str(data), out=str(tmp_path / name), train=train,
            progress=False, timeout=1.0, retries=0, device="cpu", skip_eval=True, **kw,
        )  # fmt: skip

    full_opts = opts("full")
    full = tune(
        full_opts,
        lambda: InProcClientChannel(provider_app(model)),
        client=prepare_client(full_opts, model=copy.deepcopy(model), tokenizer=tiny_tokenizer()),
    )
    kit_opts = opts("kit", kit=str(kit_dir), kit_verify_key=str(pub))
    client = prepare_client(kit_opts)
    assert client.fingerprint == model_fingerprint(model, SPLIT)
    got = tune(kit_opts, lambda: InProcClientChannel(provider_app(model)), client=client)
    assert [h["loss"] for h in got["history"]] == pytest.approx([h["loss"] for h in full["history"]], rel=1e-5)
    assert got["loss_last"] < got["loss_first"]


def test_tune_with_a_kit_needs_the_verify_key_and_the_kits_split(tmp_path, key):
    from guardedp2p.service.client import TuneOptions, prepare_client

    _, kit_dir, _ = _kit(tmp_path, key)
    with pytest.raises(ConfigError, match="--provider-sign-key"):
        prepare_client(TuneOptions(kit=str(kit_dir), device="cpu"))
    pub = tmp_path / "p.sign.pub"
    from cryptography.hazmat.primitives import serialization

    pub.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(KitMismatchError, match="split"):
        prepare_client(TuneOptions(kit=str(kit_dir), kit_verify_key=str(pub), bottom_layers=1, device="cpu"))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generation_client_from_the_kit_gives_the_full_models_tokens(tmp_path, key, arch):
    from guardedp2p.designs.online.generate import (
        GenerateConfig,
        SplitGenerator,
        load_generation_client,
        open_generation_session,
    )
    from guardedp2p.engine.lora import save_adapter
    from guardedp2p.transport.inproc import InProcClientChannel
    from tests.protocol_helpers import client_parts, provider_app

    model, kit_dir, _ = _kit(tmp_path, key, arch)
    parts, _ = client_parts(model)
    adapter = save_adapter(parts.bottom, parts.top, tmp_path / "adapter")
    app = provider_app(model)
    prompts = [[5, 17, 33, 8, 91, 40, 12], [44, 9, 120, 61]]
    cfg = GenerateConfig(max_new_tokens=12, eos_token_ids=())
    tokens = []
    for client in (
        load_generation_client(
            full_model=copy.deepcopy(model), tokenizer=tiny_tokenizer(), split=SPLIT, adapter=adapter, device="cpu"
        ),
        load_generation_client(
            split=SPLIT, adapter=adapter, device="cpu", kit=kit_dir, kit_verify_key=key.public_key()
        ),
    ):
        gs = open_generation_session(lambda: InProcClientChannel(app), client, timeout=5.0)
        gen = SplitGenerator(client.bottom, client.top, client.tokenizer, gs.trunk)
        tokens.append([g.tokens for g in gen.generate(prompts, cfg)])
        gs.close()
    assert tokens[0] == tokens[1] and all(len(t) == 12 for t in tokens[1])
    with pytest.raises(ConfigError, match="--provider-sign-key"):
        load_generation_client(split=SPLIT, device="cpu", kit=kit_dir)


@pytest.mark.parametrize("command", ["tune", "generate"])
def test_cli_kit_without_the_providers_sign_key_is_refused_before_loading(tmp_path, command):
    from typer.testing import CliRunner

    from guardedp2p.cli.main import app

    args = ["client", command, "--kit", str(tmp_path / "kit"), "--insecure", "--out", str(tmp_path / "o")]
    if command == "generate":
        args = ["client", command, "--kit", str(tmp_path / "kit"), "--insecure", "--prompt", "hi"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code != 0 and "--provider-sign-key" in res.output, res.output
