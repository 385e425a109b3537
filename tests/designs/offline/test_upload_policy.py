"""Issue 20, Offline uploads: a bundle is tied to the client key that uploads it (pinned signers; unpinned bundles
refused unless accepted), quotas on staged bytes and bundles per key, the index of who uploaded what, and staged
uploads deleted when their session ends (SECURITY.md "Budgets")."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from guardedp2p.crypto.keys import generate_keypair, load_public_key
from guardedp2p.designs.offline.provider import UPLOAD_INDEX, SignerPins
from guardedp2p.designs.offline.transfer import upload_bundle
from guardedp2p.errors import ConfigError, RemoteError
from guardedp2p.wire.framing import Message
from guardedp2p.wire.messages import MsgType
from tests.designs.offline.test_protocol import _app, _bundle, _session, world  # noqa: F401 - world is a fixture


def _peer(tmp, name: str) -> str:
    return load_public_key(tmp / "keys" / f"{name}.key")


def test_a_bundle_must_be_signed_by_the_key_pinned_for_its_uploader(world):  # noqa: F811
    _, _, tmp = world
    generate_keypair(tmp / "keys", "stranger")
    alice = _peer(tmp, "client")
    pins = SignerPins(allow=[tmp / "keys" / "client.key"])  # client.sign.pub lies beside it: pinned
    assert pins[alice] == [tmp / "keys" / "client.sign.pub"]
    app = _app(tmp, client_sign_keys=pins, accept_unpinned=False)
    ack = upload_bundle(_session(app, peer=alice), _bundle(tmp))
    assert ack["signer_pinned"] is True
    # signed by another key (even a real one): refused
    with pytest.raises(RemoteError, match="does not trust"):
        upload_bundle(_session(app, peer=alice), _bundle(tmp, signer="stranger"))
    # a client with no pinned signing key cannot upload at all, from the first chunk on
    with pytest.raises(RemoteError, match="no signing key is pinned"):
        upload_bundle(_session(app, peer=_peer(tmp, "stranger")), _bundle(tmp, signer="stranger"))
    index = [json.loads(line) for line in (tmp / "uploads" / UPLOAD_INDEX).read_text().splitlines()]
    assert [(r["uploader"], r["signer_pinned"]) for r in index] == [(alice, True)]
    assert index[0]["folder"].endswith(f"bundle-{ack['bundle_id']}")


def test_unpinned_bundles_only_with_accept_unpinned(world):  # noqa: F811
    _, _, tmp = world
    ack = upload_bundle(_session(_app(tmp, accept_unpinned=True)), _bundle(tmp))
    assert ack["signer_pinned"] is False


def test_explicit_client_sign_keys(world, tmp_path):  # noqa: F811
    _, _, tmp = world
    generate_keypair(tmp_path, "elsewhere")
    spec = f"{tmp_path / 'elsewhere.sign.pub'}={tmp / 'keys' / 'client.key'}"
    pins = SignerPins(sign_keys=[spec, f"{tmp / 'keys' / 'client.sign.pub'}"])
    assert sorted(pins[_peer(tmp, "client")]) == sorted(
        [tmp_path / "elsewhere.sign.pub", tmp / "keys" / "client.sign.pub"]
    )
    assert SignerPins(sign_keys=[f"{tmp_path / 'elsewhere.sign.pub'}=*"])["*"] == [tmp_path / "elsewhere.sign.pub"]
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(tmp_path / "elsewhere.sign.pub", lonely / "x.sign.pub")
    with pytest.raises(ConfigError, match="client key it is tied to"):
        SignerPins(sign_keys=[str(lonely / "x.sign.pub")])
    with pytest.raises(ConfigError, match="client-sign-key"):
        SignerPins(sign_keys=[str(tmp / "keys" / "client.key")])  # a CURVE key is not a signing key


def test_upload_quotas_per_key(world):  # noqa: F811
    _, _, tmp = world
    bundle = _bundle(tmp)
    size = sum(p.stat().st_size for p in bundle.iterdir())
    staged = _app(tmp, accept_unpinned=True, max_staged_upload_bytes_per_peer=size // 2)
    with pytest.raises(RemoteError, match="over-budget"):
        upload_bundle(_session(staged), bundle, chunk_size=1000)
    counted = _app(tmp, accept_unpinned=True, max_uploads_per_peer=1)
    upload_bundle(_session(counted, peer="k1"), bundle)
    with pytest.raises(RemoteError, match="already uploaded 1"):
        upload_bundle(_session(counted, peer="k1"), bundle)
    upload_bundle(_session(counted, peer="k2"), bundle)  # another key has its own count
    full = _app(tmp, accept_unpinned=True, max_upload_dir_bytes=size)
    with pytest.raises(RemoteError, match="upload folder is full"):
        upload_bundle(_session(full, peer="k3"), bundle)


def test_a_staged_upload_is_deleted_when_its_session_ends(world):  # noqa: F811
    _, _, tmp = world
    app = _app(tmp, accept_unpinned=True)
    s = _session(app, peer="k")
    data = (_bundle(tmp) / "adapter_config.json").read_bytes()
    part = data[: len(data) // 2]
    s.request(
        Message(
            MsgType.UPLOAD,
            step=1,
            meta={
                "file": "adapter_config.json",
                "offset": 0,
                "total": len(data),
                "sha256": hashlib.sha256(part).hexdigest(),
            },
            tensors={"data": torch.frombuffer(bytearray(part), dtype=torch.uint8)},
        ),
        expect=MsgType.UPLOAD_ACK,
    )
    assert list((tmp / "uploads").glob("incoming-*"))
    assert app.drop_connection(None, "gone") == 1  # the in-process channel has no connection tag
    assert not list((tmp / "uploads").glob("incoming-*"))
