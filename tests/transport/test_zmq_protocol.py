"""The same protocol code over real CURVE ZeroMQ on 127.0.0.1: equivalence, refusals, and a provider that
keeps serving a good client while another sends garbage."""

from __future__ import annotations

import threading

import pytest
import torch

from guardedp2p.crypto.keys import generate_keypair
from guardedp2p.designs.online.client import RemoteTrunk
from guardedp2p.engine.split import loss_fn
from guardedp2p.protocol.client import ClientSession
from guardedp2p.service.serve import serve_forever
from guardedp2p.transport.zmq_client import ClientConfig, ZmqClientChannel
from guardedp2p.transport.zmq_server import ServerConfig, ZmqServerChannel
from guardedp2p.wire.handshake import Hello
from tests.designs.online.test_online import FP32, _unsplit_reference
from tests.protocol_helpers import SPLIT, batch, client_parts, provider_app
from tests.tiny_models import tiny_model


@pytest.fixture(scope="module")
def keydir(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    for name in ("provider", "alice", "bob"):
        generate_keypair(d, name)
    return d


@pytest.fixture
def served(keydir):
    model = tiny_model("llama")
    app = provider_app(model)
    server = ZmqServerChannel(
        ServerConfig(
            bind="tcp://127.0.0.1:*",
            secret_key_file=keydir / "provider.key_secret",
            allow=[keydir / "alice.key", keydir / "bob.key"],
        )
    )
    stop = threading.Event()
    thread = threading.Thread(target=serve_forever, args=(app, server, stop), kwargs={"poll_s": 0.05}, daemon=True)
    thread.start()
    yield model, app, server
    stop.set()
    thread.join(timeout=5)
    server.close()


def _channel(keydir, server, who="alice") -> ZmqClientChannel:
    return ZmqClientChannel.open(
        ClientConfig(
            connect=server.endpoint,
            provider_public_key=keydir / "provider.key",
            secret_key_file=keydir / f"{who}.key_secret",
        )
    )


def test_online_over_curve_equals_unsplit(served, keydir, tmp_path):
    model, app, server = served
    parts, fp = client_parts(model)
    session = ClientSession(_channel(keydir, server), timeout=10)
    session.open(Hello("online", fp, (SPLIT.bottom_layers, SPLIT.top_layers), FP32))
    remote = RemoteTrunk(session, FP32, gradients=True)
    b = batch(model.config.vocab_size)
    h1 = parts.bottom(b["input_ids"], b["attention_mask"])
    loss = loss_fn(parts.top(remote(h1, b["attention_mask"], train=True), b["attention_mask"]), b["labels"])
    loss.backward()
    ref = _unsplit_reference(model, parts, tmp_path)
    out = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    out.loss.backward()
    torch.testing.assert_close(loss.detach(), out.loss.detach(), rtol=1e-5, atol=1e-6)
    ref_grads = {n.removeprefix("base_model.model."): p.grad for n, p in ref.named_parameters() if p.requires_grad}
    for part in (parts.bottom, parts.top):
        for n, p in part.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-7)
    # the session is bound to alice's key: bob cannot use it
    other = ClientSession(_channel(keydir, server, "bob"), timeout=10)
    other.sid = session.sid
    from guardedp2p.errors import RemoteError

    with pytest.raises(RemoteError, match="not-your-session"):
        other.ping()
    session.close()
    assert not app.sessions or session.sid not in app.sessions


def test_garbage_from_one_client_does_not_disturb_another(served, keydir):
    model, app, server = served
    parts, fp = client_parts(model)
    good = ClientSession(_channel(keydir, server), timeout=10)
    good.open(Hello("online", fp, (2, 2), FP32))
    bad = _channel(keydir, server, "bob")
    import random

    rng = random.Random(0)
    for _ in range(200):
        frames = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))) for _ in range(rng.randint(1, 3))]
        bad.send(frames)
        reply = bad.recv(timeout=5)
        assert reply, "the provider must answer garbage with an ERROR"
    remote = RemoteTrunk(good, FP32, gradients=True)
    b = batch(model.config.vocab_size)
    h1 = parts.bottom(b["input_ids"], b["attention_mask"])
    loss_fn(parts.top(remote(h1, b["attention_mask"], train=True), b["attention_mask"]), b["labels"]).backward()
    assert app.stats["errors"] >= 200
