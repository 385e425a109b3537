"""The Online protocol computes exactly what local training of the unsplit model computes, and the provider
refuses every out-of-protocol message while it keeps serving."""

from __future__ import annotations

import copy

import pytest
import torch

from guardedp2p.designs.online.client import RemoteTrunk
from guardedp2p.engine.lora import save_adapter
from guardedp2p.engine.split import loss_fn
from guardedp2p.errors import HandshakeRejected, RemoteError
from guardedp2p.protocol.client import ClientSession
from guardedp2p.protocol.provider import ProviderConfig
from guardedp2p.transport.inproc import InProcClientChannel
from guardedp2p.wire.framing import Message, encode
from guardedp2p.wire.handshake import Hello
from guardedp2p.wire.messages import MsgType
from tests.protocol_helpers import batch, client_parts, open_session, provider_app
from tests.tiny_models import tiny_model

FP32 = {d: "fp32" for d in ("up", "down", "grad_up", "grad_down")}


def _unsplit_reference(model, parts, tmp_path):
    from peft import PeftModel

    save_adapter(parts.bottom, parts.top, tmp_path / "adapter")
    ref = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "adapter"), is_trainable=True)
    return ref


def _split_loss_and_grads(parts, session, b):
    remote = RemoteTrunk(session, FP32, gradients=True)
    h1 = parts.bottom(b["input_ids"], b["attention_mask"])
    h2 = remote(h1, b["attention_mask"], train=True)
    loss = loss_fn(parts.top(h2, b["attention_mask"]), b["labels"])
    loss.backward()
    grads = {}
    for part in (parts.bottom, parts.top):
        for n, p in part.named_parameters():
            if p.requires_grad:
                grads[n] = p.grad.detach().clone()
    return loss.detach(), grads


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2"])
def test_split_online_equals_unsplit_loss_and_every_lora_gradient(arch, tmp_path):
    model = tiny_model(arch)
    app = provider_app(model)
    parts, fp = client_parts(model)
    session = open_session(app, fp)
    b = batch(model.config.vocab_size)
    loss, grads = _split_loss_and_grads(parts, session, b)

    ref = _unsplit_reference(model, parts, tmp_path)
    out = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    out.loss.backward()
    ref_grads = {n.removeprefix("base_model.model."): p.grad for n, p in ref.named_parameters() if p.requires_grad}

    torch.testing.assert_close(loss, out.loss.detach(), rtol=1e-5, atol=1e-6)
    assert grads and set(grads) == set(ref_grads), "the split and unsplit models must train the same LoRA tensors"
    for name, g in grads.items():
        assert g.abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-7, msg=f"gradient of {name}")
    assert not app.sessions[session.sid].handler.pending, "the provider must free the step's graph after GRAD_UP"


def test_eval_forward_keeps_no_graph_and_matches_train_forward():
    model = tiny_model("llama")
    app = provider_app(model)
    parts, fp = client_parts(model)
    session = open_session(app, fp)
    remote = RemoteTrunk(session, FP32, gradients=True)
    b = batch(model.config.vocab_size)
    with torch.no_grad():
        h1 = parts.bottom(b["input_ids"], b["attention_mask"])
        h2 = remote(h1, b["attention_mask"], train=False)
    assert not app.sessions[session.sid].handler.pending
    full = copy.deepcopy(model)
    from guardedp2p.engine.split import split_model

    ref_parts = split_model(full)
    with torch.no_grad():
        torch.testing.assert_close(h2, ref_parts.trunk(h1, b["attention_mask"]))


def test_many_steps_leave_no_pending_graph_and_expired_graphs_are_freed():
    model = tiny_model("llama")
    now = [0.0]
    app = provider_app(model, config=ProviderConfig(step_timeout=10.0), clock=lambda: now[0])
    parts, fp = client_parts(model)
    session = open_session(app, fp)
    remote = RemoteTrunk(session, FP32, gradients=True)
    b = batch(model.config.vocab_size, b=1, length=4)
    for _ in range(20):
        h1 = parts.bottom(b["input_ids"], b["attention_mask"])
        loss_fn(parts.top(remote(h1, b["attention_mask"], train=True), b["attention_mask"]), b["labels"]).backward()
    handler = app.sessions[session.sid].handler
    assert not handler.pending
    # a forward whose gradient never comes is freed after the step timeout
    h1 = parts.bottom(b["input_ids"], b["attention_mask"])
    remote(h1, b["attention_mask"], train=True)
    assert len(handler.pending) == 1
    now[0] = 11.0
    session.ping()
    assert not handler.pending


def _raw_request(app, peer, msg):
    from guardedp2p.wire.framing import decode

    return decode(app.handle(peer, encode(msg)))


def test_provider_refuses_bad_messages_and_keeps_serving():
    model = tiny_model("llama")
    app = provider_app(model)
    parts, fp = client_parts(model)
    good = open_session(app, fp)
    sid = good.sid
    h = torch.zeros(1, 4, model.config.hidden_size)
    mask = torch.ones(1, 4, dtype=torch.int8)
    cases = {
        "unknown-session": Message(
            MsgType.ACT_UP, session="nope", step=1, tensors={"h": h, "mask": mask}, codecs={"h": "fp32"}
        ),
        "bad-activation": Message(
            MsgType.ACT_UP, session=sid, step=1, tensors={"h": torch.zeros(1, 4, 7), "mask": mask}, codecs={"h": "fp32"}
        ),
        "codec-mismatch": Message(
            MsgType.ACT_UP, session=sid, step=2, tensors={"h": h, "mask": mask}, codecs={"h": "fp16"}
        ),
        "no-pending-step": Message(MsgType.GRAD_UP, session=sid, step=99, tensors={"g": h}, codecs={"g": "fp32"}),
        "not-allowed": Message(MsgType.CHUNK_REQ, session=sid, step=3),
    }
    for code, msg in cases.items():
        reply = _raw_request(app, "inproc:client", msg)
        assert reply.type == MsgType.ERROR and reply.meta["code"] == code, (code, reply.meta)
    nan = Message(
        MsgType.ACT_UP,
        session=sid,
        step=5,
        tensors={"h": torch.full_like(h, float("nan")), "mask": mask},
        codecs={"h": "fp32"},
    )
    assert _raw_request(app, "inproc:client", nan).meta["code"] == "bad-activation"
    # another authenticated key cannot use this session
    reply = _raw_request(app, "inproc:intruder", Message(MsgType.PING, session=sid, step=1))
    assert reply.meta["code"] == "not-your-session"
    # garbage frames
    for frames in ([b"\xc1"], [], [b"\x80", b"extra"]):
        assert app.handle("inproc:client", frames)
    # the good client still trains
    remote = RemoteTrunk(good, FP32, gradients=True)
    b = batch(model.config.vocab_size)
    remote.step = 10
    h1 = parts.bottom(b["input_ids"], b["attention_mask"])
    loss_fn(parts.top(remote(h1, b["attention_mask"], train=True), b["attention_mask"]), b["labels"]).backward()


def test_replayed_step_is_refused():
    model = tiny_model("llama")
    app = provider_app(model)
    parts, fp = client_parts(model)
    session = open_session(app, fp)
    remote = RemoteTrunk(session, FP32, gradients=True)
    b = batch(model.config.vocab_size)
    with torch.no_grad():
        h1 = parts.bottom(b["input_ids"], b["attention_mask"])
    remote.forward(h1, b["attention_mask"], train=False, step=5)
    with pytest.raises(RemoteError, match="replayed-step"):
        remote.forward(h1, b["attention_mask"], train=False, step=5)


@pytest.mark.parametrize(
    "hello, reason",
    [
        (Hello("online", "0" * 64, (2, 2)), "fingerprint mismatch"),
        (Hello("online", None, (3, 2)), "split mismatch"),
        (Hello("teleport", None, (2, 2)), "unknown protocol"),
        (
            Hello("online", None, (2, 2), codecs={"up": "zip", "down": "fp32", "grad_up": "fp32", "grad_down": "fp32"}),
            "codec",
        ),
    ],
)
def test_handshake_mismatch_is_rejected_with_reason(hello, reason):
    model = tiny_model("llama")
    app = provider_app(model)
    _, fp = client_parts(model, lora=False)
    if hello.fingerprint is None:
        hello.fingerprint = fp
    session = ClientSession(InProcClientChannel(app), timeout=5)
    with pytest.raises(HandshakeRejected, match=reason):
        session.open(hello)
    assert not app.sessions


def test_wire_version_mismatch_is_rejected():
    model = tiny_model("llama")
    app = provider_app(model)
    _, fp = client_parts(model, lora=False)
    meta = Hello("online", fp).to_meta()
    meta["wire_version"] = 99
    reply = _raw_request(app, "inproc:client", Message(MsgType.HELLO, meta=meta))
    assert reply.type == MsgType.REJECT and "wire version" in reply.meta["message"]


def test_empty_activation_and_wrong_gradient_shape_are_clean_errors_and_keep_the_graph():
    model = tiny_model("llama")
    app = provider_app(model)
    parts, fp = client_parts(model)
    session = open_session(app, fp)
    d = model.config.hidden_size
    for shape in ((0, 4, d), (1, 0, d)):
        empty = Message(
            MsgType.ACT_UP,
            session=session.sid,
            step=1,
            tensors={"h": torch.zeros(shape), "mask": torch.ones(shape[:2], dtype=torch.int8)},
            codecs={"h": "fp32"},
        )
        assert _raw_request(app, "inproc:client", empty).meta["code"] == "bad-activation"
    h = torch.randn(1, 4, d)
    fwd = Message(
        MsgType.ACT_UP,
        session=session.sid,
        step=2,
        meta={"train": True},
        tensors={"h": h, "mask": torch.ones(1, 4, dtype=torch.int8)},
        codecs={"h": "fp32"},
    )
    out = _raw_request(app, "inproc:client", fwd)
    assert out.type == MsgType.ACT_DOWN
    wrong = Message(
        MsgType.GRAD_UP, session=session.sid, step=2, tensors={"g": torch.ones(1, 3, d)}, codecs={"g": "fp32"}
    )
    assert _raw_request(app, "inproc:client", wrong).meta["code"] == "bad-activation"
    assert 2 in app.sessions[session.sid].handler.pending, "a malformed GRAD_UP must not discard the kept graph"
    right = Message(
        MsgType.GRAD_UP, session=session.sid, step=2, tensors={"g": torch.ones(1, 4, d)}, codecs={"g": "fp32"}
    )
    reply = _raw_request(app, "inproc:client", right)
    assert reply.type == MsgType.GRAD_DOWN and tuple(reply.tensors["g"].shape) == (1, 4, d)
    assert not app.sessions[session.sid].handler.pending


def test_client_strings_are_escaped_in_the_provider_log():
    from guardedp2p.protocol.provider import printable

    assert printable("evil\x1b[2J\nFAKE LINE") == "evil\\x1b[2J\\nFAKE LINE"
    assert printable("x" * 500, limit=10) == "x" * 10 + "…"
