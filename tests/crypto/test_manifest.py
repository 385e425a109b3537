"""Signed emulator folders: a good one verifies and loads; a tampered byte, a foreign signature or a missing file
is refused with its own error, and nothing (no tensor, no config) is read before verification passed."""

from __future__ import annotations

import json

import pytest

import guardedp2p.designs.offline.emulator as E
from guardedp2p.crypto.keys import generate_keypair, load_signing_key
from guardedp2p.crypto.manifest import (
    BadSignatureError,
    DigestMismatchError,
    ManifestFormatError,
    MissingFileError,
    resolve_in,
    safe_name,
    sign_folder,
    verify_artifact,
)
from guardedp2p.designs.offline.emulator import EmulatorConfig, build_emulator, load_emulator, save_emulator
from tests.tiny_models import tiny_model
from tests.tiny_tokenizer import tiny_tokenizer


@pytest.fixture
def signed(tmp_path):
    generate_keypair(tmp_path / "keys", "provider")
    generate_keypair(tmp_path / "keys", "mallory")
    emu = build_emulator(tiny_model("llama"), EmulatorConfig(emulator_layers=1))
    folder = tmp_path / "emu"
    save_emulator(emu, folder, load_signing_key(tmp_path / "keys", "provider"), tokenizer=tiny_tokenizer())
    return folder, tmp_path / "keys" / "provider.sign.pub", tmp_path / "keys"


@pytest.fixture
def reads(monkeypatch):
    """Record every tensor / config read of a received emulator."""
    seen: list[str] = []
    real_t, real_c = E._read_tensors, E._read_config
    monkeypatch.setattr(E, "_read_tensors", lambda p: seen.append(str(p)) or real_t(p))
    monkeypatch.setattr(E, "_read_config", lambda f: seen.append("config") or real_c(f))
    return seen


def test_good_emulator_verifies_and_loads(signed, reads):
    folder, pub, _ = signed
    m = verify_artifact(folder, pub, kind="emulator")
    assert {"config.json", "adapters.safetensors", "emulator.safetensors"} <= set(m.files)
    assert any(n.startswith("tokenizer/") for n in m.files)
    assert m["layers"]["middle_kept"] == [2] and m["compression"]["quantize"] == "none"
    assert len(m["fingerprint"]) == 64 and m["params"]["fraction_of_full"] < 1
    loaded = load_emulator(folder, pub)
    assert loaded.tokenizer is not None and loaded.manifest.sha256 == m.sha256
    assert len(reads) == 3  # config + the two tensor files, after verification


def test_tampered_tensor_byte_is_refused_before_any_read(signed, reads):
    folder, pub, _ = signed
    path = folder / "emulator.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError, match="emulator.safetensors"):
        load_emulator(folder, pub)
    assert reads == []


def test_tampered_manifest_or_foreign_signature_is_refused(signed, reads):
    folder, pub, keys = signed
    with pytest.raises(BadSignatureError):
        load_emulator(folder, keys / "mallory.sign.pub")  # valid folder, but not signed by the pinned key
    raw = (folder / "manifest.json").read_bytes()
    doctored = json.loads(raw)
    doctored["layers"]["middle_kept"] = [3]
    (folder / "manifest.json").write_bytes(json.dumps(doctored, sort_keys=True, separators=(",", ":")).encode())
    with pytest.raises(BadSignatureError):
        load_emulator(folder, pub)
    # re-signed by another key with its own embedded public key: still refused, the pinned key decides
    (folder / "manifest.json").write_bytes(raw)
    body = {k: v for k, v in json.loads(raw).items() if k not in ("files", "signer", "format", "version")}
    sign_folder(folder, body, json.loads(raw)["files"].keys(), load_signing_key(keys, "mallory"))
    with pytest.raises(BadSignatureError):
        load_emulator(folder, pub)
    (folder / "manifest.sig").write_text("zz")
    with pytest.raises(BadSignatureError):
        verify_artifact(folder, pub)
    assert reads == []


def test_missing_file_or_signature_is_refused(signed, reads):
    folder, pub, _ = signed
    (folder / "adapters.safetensors").unlink()
    with pytest.raises(MissingFileError, match="adapters.safetensors"):
        load_emulator(folder, pub)
    (folder / "manifest.sig").unlink()
    with pytest.raises(MissingFileError, match="manifest.sig"):
        load_emulator(folder, pub)
    assert reads == []


def test_file_names_cannot_leave_the_folder(tmp_path):
    for bad in (
        "../x",
        "/etc/passwd",
        "a/../../b",
        "a\\b",
        "",
        ".hidden",
        "manifest.json",
        "a//b",
        "x\x00y",
        "a/b/c/d",
    ):
        with pytest.raises(ManifestFormatError):
            safe_name(bad)
    assert safe_name("tokenizer/tokenizer.json") == "tokenizer/tokenizer.json"
    (tmp_path / "inside").mkdir()
    (tmp_path / "inside" / "link").symlink_to(tmp_path)
    with pytest.raises(ManifestFormatError):
        resolve_in(tmp_path / "inside", "link/secret")


def test_manifest_with_an_unsafe_name_is_refused_even_when_signed(tmp_path):
    generate_keypair(tmp_path / "k", "p")
    sk = load_signing_key(tmp_path / "k", "p")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"123")
    m = sign_folder(tmp_path / "a", {"kind": "emulator"}, ["x.bin"], sk)
    data = dict(m.data)
    data["files"] = {"../x.bin": data["files"]["x.bin"]}
    from guardedp2p.crypto.manifest import canonical_json

    raw = canonical_json(data)
    (tmp_path / "a" / "manifest.json").write_bytes(raw)
    (tmp_path / "a" / "manifest.sig").write_text(sk.sign(raw).hex())
    with pytest.raises(ManifestFormatError):
        verify_artifact(tmp_path / "a", tmp_path / "k" / "p.sign.pub")
