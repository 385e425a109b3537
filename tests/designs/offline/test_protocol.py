"""The Offline design over the in-process channel: a whole run (where the only data-derived client->provider
message is the adapter UPLOAD), resuming a cut download, and the provider refusing everything outside the
protocol while it keeps serving."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch

from guardedp2p.crypto.keys import generate_keypair, load_signing_key
from guardedp2p.crypto.manifest import BadSignatureError, verify_artifact
from guardedp2p.designs.offline.emulator import EmulatorConfig, build_emulator, save_emulator
from guardedp2p.designs.offline.provider import MAX_CHUNK, offline_session
from guardedp2p.designs.offline.run import OfflineOptions, tune_offline
from guardedp2p.designs.offline.transfer import TransferStats, download_emulator, make_adapter_bundle, upload_bundle
from guardedp2p.errors import RemoteError
from guardedp2p.protocol.client import ClientSession
from guardedp2p.protocol.provider import ProviderApp, ProviderResources
from guardedp2p.service.client import TuneOptions
from guardedp2p.train.config import TrainConfig
from guardedp2p.transport.base import PeerTimeout
from guardedp2p.transport.inproc import InProcClientChannel
from guardedp2p.wire.framing import Message, decode
from guardedp2p.wire.handshake import Hello, ProviderPolicy
from guardedp2p.wire.messages import MsgType
from tests.tiny_models import tiny_model
from tests.tiny_tokenizer import tiny_tokenizer, write_text_records


@pytest.fixture
def world(tmp_path):
    generate_keypair(tmp_path / "keys", "provider")
    generate_keypair(tmp_path / "keys", "client")
    model = tiny_model("llama")
    emu = build_emulator(model, EmulatorConfig(emulator_layers=1))
    save_emulator(emu, tmp_path / "emu", load_signing_key(tmp_path / "keys", "provider"), tokenizer=tiny_tokenizer())
    app = _app(tmp_path)
    return model, app, tmp_path


def _app(tmp_path, **resources):
    res = ProviderResources(emulator_dir=str(tmp_path / "emu"), upload_dir=str(tmp_path / "uploads"), **resources)
    return ProviderApp(ProviderPolicy(protocols=("offline",)), {"offline": offline_session}, resources=res)


def _session(app, peer="inproc:client"):
    s = ClientSession(InProcClientChannel(app, peer=peer), timeout=1.0)
    s.open(Hello("offline", "", (2, 2), {}, {}))
    return s


class RecordingChannel(InProcClientChannel):
    """Decodes every message the client sends, as the provider would receive it."""

    sent: list[Message] = []

    def send(self, frames):
        RecordingChannel.sent.append(decode([bytes(f) for f in frames]))
        super().send(frames)


def test_full_offline_run_only_the_adapter_upload_carries_data(world):
    model, app, tmp = world
    RecordingChannel.sent = []
    data = write_text_records(tmp / "train.jsonl")
    train = TrainConfig(
        steps=6, batch_size=4, lr=1e-2, warmup_steps=1, checkpoint_every=3, max_length=16, lora_r=4, lora_alpha=8
    )
    opts = TuneOptions(
        protocol="offline",
        model="tiny",
        data=str(data),
        out=str(tmp / "run"),
        train=train,
        progress=False,
        timeout=1.0,
        retries=0,
        eval_batch_size=8,
    )
    off = OfflineOptions(
        provider_verify_key=tmp / "keys" / "provider.sign.pub", client_keys=str(tmp / "keys"), chunk_size=64 * 1024
    )
    s = tune_offline(
        opts,
        lambda: RecordingChannel(app),
        offline=off,
        base_model=copy.deepcopy(model),
        base_tokenizer=tiny_tokenizer(),
    )

    sent_types = [m.type for m in RecordingChannel.sent]
    assert set(sent_types) <= {MsgType.HELLO, MsgType.MANIFEST_REQ, MsgType.CHUNK_REQ, MsgType.UPLOAD, MsgType.BYE}
    assert MsgType.ACT_UP not in sent_types and MsgType.GRAD_UP not in sent_types
    with_tensors = {m.type for m in RecordingChannel.sent if m.tensors}
    assert with_tensors == {MsgType.UPLOAD}, "only the adapter bundle upload may carry tensors from the client"
    for m in RecordingChannel.sent:
        if m.type == MsgType.CHUNK_REQ:
            assert set(m.meta) == {"file", "offset", "length"}
    # what was uploaded is exactly the signed bundle the client wrote, and the provider kept a verified copy
    bundle_dir = Path(s["bundle_dir"])
    uploaded = b"".join(m.tensors["data"].numpy().tobytes() for m in RecordingChannel.sent if m.type == MsgType.UPLOAD)
    assert len(uploaded) == sum(p.stat().st_size for p in bundle_dir.iterdir())
    stored = tmp / "uploads" / f"bundle-{s['upload_ack']['bundle_id']}"
    verify_artifact(stored, tmp / "keys" / "client.sign.pub", kind="adapter-bundle")
    assert s["upload_ack"]["verified"] is True and s["upload_ack"]["signer_pinned"] is False

    assert s["protocol"] == "offline" and s["steps"] == 6 and s["gradient_bytes"] == 0 and s["bytes_per_step"] == 0
    for k in (
        "zero_shot_full",
        "full_finetune",
        "emulator_zero_shot",
        "emulator_finetune",
        "plug_in",
        "loss_first",
        "loss_last",
        "eval_before",
        "eval_after",
        "bytes_up",
        "bytes_down",
        "wall_s",
    ):
        assert isinstance(s[k], (int, float)) and s[k] == s[k], k  # present and not NaN
    assert s["eval_before"] == s["emulator_zero_shot"] and s["eval_after"] == s["emulator_finetune"]
    assert s["bytes_down"] > s["emulator_bytes"] > s["adapter_upload_bytes"] > 0
    assert 0 < s["param_fraction"] < 1
    assert s["bytes_by_type"]["up"].keys() <= {"HELLO", "MANIFEST_REQ", "CHUNK_REQ", "UPLOAD", "BYE"}
    assert "provider computes" in s["five_numbers_note"]
    assert json.loads((tmp / "run" / "summary.json").read_text())["plug_in"] == s["plug_in"]
    assert not app.sessions


def test_cut_download_resumes_without_refetching_what_arrived(world):
    _, app, tmp = world
    total = verify_artifact(tmp / "emu", tmp / "keys" / "provider.sign.pub").total_bytes
    chunk = 8 * 1024
    ch = InProcClientChannel(app)
    s = ClientSession(ch, timeout=0.5)
    s.open(Hello("offline", "", (2, 2), {}, {}))
    ch.fail_after = 1 + 10  # the manifest, then 10 chunks, then the "provider" dies
    first = TransferStats()
    with pytest.raises(PeerTimeout):
        download_emulator(s, tmp / "dl", tmp / "keys" / "provider.sign.pub", chunk_size=chunk, stats=first)
    assert first.chunks == 10 and 0 < first.bytes_fetched < total
    assert list((tmp / "dl").rglob("*.part")), "the interrupted file is kept as .part"
    s2 = _session(app)
    m, second = download_emulator(s2, tmp / "dl", tmp / "keys" / "provider.sign.pub", chunk_size=chunk)
    assert second.bytes_resumed == first.bytes_fetched
    assert second.bytes_fetched == total - first.bytes_fetched
    assert not list((tmp / "dl").rglob("*.part"))
    verify_artifact(tmp / "dl", tmp / "keys" / "provider.sign.pub")
    for name in m.files:
        assert (tmp / "dl" / name).read_bytes() == (tmp / "emu" / name).read_bytes()
    # a third call finds everything in place and fetches nothing
    _, third = download_emulator(_session(app), tmp / "dl", tmp / "keys" / "provider.sign.pub", chunk_size=chunk)
    assert third.bytes_fetched == 0 and third.bytes_resumed == total


def test_corrupted_partial_file_is_detected_and_fetched_again(world):
    _, app, tmp = world
    pub = tmp / "keys" / "provider.sign.pub"
    ch = InProcClientChannel(app)
    s = ClientSession(ch, timeout=0.5)
    s.open(Hello("offline", "", (2, 2), {}, {}))
    ch.fail_after = 1 + 3
    with pytest.raises(PeerTimeout):
        download_emulator(s, tmp / "dl", pub, chunk_size=4096)
    part = next((tmp / "dl").rglob("*.part"))
    data = bytearray(part.read_bytes())
    data[0] ^= 0xFF
    part.write_bytes(bytes(data))
    from guardedp2p.crypto.manifest import DigestMismatchError

    with pytest.raises(DigestMismatchError):
        download_emulator(_session(app), tmp / "dl", pub, chunk_size=4096)
    download_emulator(_session(app), tmp / "dl", pub, chunk_size=4096)  # starts that file over
    verify_artifact(tmp / "dl", pub)


def test_wrong_pinned_key_stops_before_any_chunk(world):
    _, app, tmp = world
    RecordingChannel.sent = []
    s = ClientSession(RecordingChannel(app), timeout=1.0)
    s.open(Hello("offline", "", (2, 2), {}, {}))
    generate_keypair(tmp / "other", "provider")
    with pytest.raises(BadSignatureError):
        download_emulator(s, tmp / "dl", tmp / "other" / "provider.sign.pub")
    assert MsgType.CHUNK_REQ not in [m.type for m in RecordingChannel.sent]
    assert not (tmp / "dl").exists() or not any((tmp / "dl").iterdir())


def _chunk_req(s, step, **meta):
    return s.request(Message(MsgType.CHUNK_REQ, step=step, meta=meta), expect=MsgType.CHUNK)


def test_provider_serves_only_manifest_files_and_valid_ranges(world):
    _, app, tmp = world
    (tmp / "secret.txt").write_text("provider secret")
    s = _session(app)
    good = _chunk_req(s, 1, file="config.json", offset=0, length=10)
    assert (
        good.tensors["data"].numel() == 10
        and good.meta["sha256"] == hashlib.sha256(good.tensors["data"].numpy().tobytes()).hexdigest()
    )
    bad_requests = [
        {"file": "../secret.txt", "offset": 0, "length": 10},
        {"file": str(tmp / "secret.txt"), "offset": 0, "length": 10},
        {"file": "manifest.sig", "offset": 0, "length": 10},
        {"file": "config.json.part", "offset": 0, "length": 10},
        {"file": "config.json", "offset": -1, "length": 10},
        {"file": "config.json", "offset": 10**9, "length": 10},
        {"file": "config.json", "offset": 0, "length": MAX_CHUNK + 1},
        {"file": "config.json", "offset": 0, "length": 0},
        {"file": "config.json", "offset": 0, "length": True},
        {"file": 5, "offset": 0, "length": 10},
    ]
    for i, meta in enumerate(bad_requests, start=2):
        with pytest.raises(RemoteError):
            _chunk_req(s, i, **meta)
    # out-of-protocol messages are refused, and the session still works afterwards
    for j, mtype in enumerate((MsgType.ACT_UP, MsgType.GRAD_UP), start=50):
        with pytest.raises(RemoteError, match="not part of the offline protocol"):
            s.request(Message(mtype, step=j, tensors={"h": torch.zeros(1, 2, 64)}), expect=MsgType.ACT_DOWN)
    assert _chunk_req(s, 99, file="config.json", offset=5, length=5).tensors["data"].numel() == 5


def _upload(s, step, name, data: bytes, offset=0, total=None, commit=False, sha=None):
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    meta = {
        "file": name,
        "offset": offset,
        "total": len(data) if total is None else total,
        "sha256": sha or hashlib.sha256(data).hexdigest(),
        "commit": commit,
    }
    return s.request(Message(MsgType.UPLOAD, step=step, tensors={"data": t}, meta=meta), expect=MsgType.UPLOAD_ACK)


def _bundle(tmp, signer="client"):
    """A real adapter bundle for the served emulator (LoRA saved from the emulator's client parts)."""
    from guardedp2p.designs.offline.emulator import load_emulator
    from guardedp2p.engine.lora import LoraSettings, attach_lora, save_adapter

    loaded = load_emulator(tmp / "emu", tmp / "keys" / "provider.sign.pub")
    torch.manual_seed(0)
    attach_lora(loaded.emulator.bottom, loaded.emulator.top, LoraSettings(r=2, alpha=4))
    save_adapter(loaded.emulator.bottom, loaded.emulator.top, tmp / "adapter")
    make_adapter_bundle(
        tmp / "adapter",
        tmp / f"bundle-{signer}",
        load_signing_key(tmp / "keys", signer),
        emulator_manifest=loaded.manifest,
    )
    return tmp / f"bundle-{signer}"


def test_upload_limits_names_hashes_and_verification(world):
    _, app, tmp = world
    bundle = _bundle(tmp)
    s = _session(app)
    with pytest.raises(RemoteError, match="upload-refused"):
        _upload(s, 1, "../evil.py", b"x")
    with pytest.raises(RemoteError, match="upload-refused"):
        _upload(s, 2, "adapter_config.json", b"abc", sha="0" * 64)  # damaged chunk
    with pytest.raises(RemoteError, match="upload-refused"):
        _upload(s, 3, "adapter_config.json", b"abc", offset=5, total=10)  # gap
    with pytest.raises(RemoteError, match="upload limit"):
        _upload(s, 4, "adapter_config.json", b"abc", total=10**12)  # over the limit
    # a tampered bundle is refused at commit and nothing is kept
    tampered = tmp / "tampered"
    import shutil

    shutil.copytree(bundle, tampered)
    w = tampered / "adapter_model.safetensors"
    b = bytearray(w.read_bytes())
    b[-1] ^= 1
    w.write_bytes(bytes(b))
    with pytest.raises(RemoteError, match="failed verification"):
        upload_bundle(s, tampered, chunk_size=1000)
    assert not [p for p in (tmp / "uploads").glob("bundle-*")]
    # the real one passes, even when a chunk is re-sent (lost reply) before the next one
    ack = upload_bundle(s, bundle, chunk_size=1000)
    assert ack["committed"] and ack["verified"] and ack["signer_pinned"] is False
    stored = tmp / "uploads" / f"bundle-{ack['bundle_id']}"
    assert sorted(p.name for p in stored.iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", "manifest.json", "manifest.sig"]
    )


def test_upload_size_limit_and_pinned_client_keys(world):
    _, _, tmp = world
    bundle = _bundle(tmp)
    small = _app(tmp, max_upload_bytes=2000)
    with pytest.raises(RemoteError, match="upload limit"):
        upload_bundle(_session(small), bundle, chunk_size=1000)
    pinned = _app(tmp, client_verify_keys=[tmp / "keys" / "client.sign.pub"])
    ack = upload_bundle(_session(pinned), bundle)
    assert ack["signer_pinned"] is True
    generate_keypair(tmp / "keys", "stranger")
    with pytest.raises(RemoteError, match="does not trust"):
        upload_bundle(_session(pinned), _bundle(tmp, signer="stranger"))


def test_resent_chunk_overwrites_instead_of_duplicating(world):
    _, app, tmp = world
    s = _session(app)
    data = b"0123456789"
    _upload(s, 1, "adapter_config.json", data[:6], total=10)
    _upload(s, 2, "adapter_config.json", data[:6], total=10)  # the reply was lost: same chunk again
    ack = _upload(s, 3, "adapter_config.json", data[6:], offset=6, total=10)
    assert ack.meta["received"] == 10


def test_runner_reconnects_and_resumes_a_cut_download(world):
    _, app, tmp = world
    data = write_text_records(tmp / "train.jsonl")
    train = TrainConfig(steps=1, batch_size=4, max_length=16, lora_r=2, lora_alpha=4, checkpoint_every=0)
    opts = TuneOptions(
        protocol="offline",
        model="tiny",
        data=str(data),
        out=str(tmp / "run"),
        train=train,
        progress=False,
        timeout=0.2,
        retries=2,
        skip_eval=True,
    )
    channels = []

    def connect():
        ch = InProcClientChannel(app)
        if not channels:
            ch.fail_after = 1 + 1 + 5  # HELLO, MANIFEST_REQ, 5 chunks, then silence
        channels.append(ch)
        return ch

    off = OfflineOptions(provider_verify_key=tmp / "keys" / "provider.sign.pub", chunk_size=16 * 1024, baselines=False)
    s = tune_offline(opts, connect, offline=off)
    assert len(channels) == 3  # cut download, resumed download, upload
    assert s["download"]["bytes_resumed"] == 5 * 16 * 1024
    assert s["download"]["bytes_fetched"] == s["emulator_bytes"], "over both connections, no byte was fetched twice"
    assert s["upload_ack"]["verified"] and s["client_signer_persistent"] is False


def test_runner_needs_the_pinned_provider_key(world):
    _, app, tmp = world
    from guardedp2p.errors import ConfigError

    with pytest.raises(ConfigError, match="provider's public signing key"):
        tune_offline(
            TuneOptions(protocol="offline", out=str(tmp / "r"), progress=False), lambda: InProcClientChannel(app)
        )


def test_multiple_choice_eval_also_reports_heldout_loss_and_ppl_gap(world):
    model, app, tmp = world
    data = write_text_records(tmp / "train.jsonl")
    mc = tmp / "mc.jsonl"
    mc.write_text(
        "\n".join(
            json.dumps({"question": f"w{i} w{i + 1}", "choices": [f"w{i + 2}", f"w{i + 7}"], "label": 0})
            for i in range(6)
        )
    )
    train = TrainConfig(steps=2, batch_size=4, max_length=16, lora_r=2, lora_alpha=4, checkpoint_every=0)
    opts = TuneOptions(
        protocol="offline",
        model="tiny",
        data=str(data),
        eval_data=str(mc),
        out=str(tmp / "run"),
        train=train,
        progress=False,
        timeout=1.0,
        retries=0,
    )
    off = OfflineOptions(provider_verify_key=tmp / "keys" / "provider.sign.pub")
    s = tune_offline(
        opts,
        lambda: InProcClientChannel(app),
        offline=off,
        base_model=copy.deepcopy(model),
        base_tokenizer=tiny_tokenizer(),
    )
    assert s["eval_metric"] == "acc" and 0 <= s["plug_in"] <= 1
    assert all(isinstance(v, float) for v in s["heldout_loss"].values()) and len(s["heldout_loss"]) == 5
    assert s["ppl_gap"] == s["ppl_gap"]
