"""Issue 20: validate, then decode (nothing of a refused message is decoded), the provider's budgets (tokens per
step, decoded bytes, kept training graphs by count and measured bytes), ACCEPT echoing only what the client needs,
and sessions freed when their connection goes away (docs/wire.md section 7, SECURITY.md "Budgets")."""

from __future__ import annotations

import pytest
import torch

from guardedp2p.errors import ConfigError
from guardedp2p.protocol.provider import ProviderConfig, Work
from guardedp2p.wire.codecs import get_codec
from guardedp2p.wire.framing import Message, decode, encode
from guardedp2p.wire.handshake import Hello
from guardedp2p.wire.messages import MsgType
from tests.protocol_helpers import SPLIT, client_parts, open_session, provider_app
from tests.tiny_models import tiny_model

FP32 = {d: "fp32" for d in ("up", "down", "grad_up", "grad_down")}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def fp(model):
    return client_parts(model, lora=False)[1]


def _act_up(sid: str, step: int, b: int, length: int, hidden: int, *, train: bool = False, codec: str = "fp32"):
    return encode(
        Message(
            MsgType.ACT_UP,
            session=sid,
            step=step,
            meta={"train": train},
            tensors={"h": torch.randn(b, length, hidden), "mask": torch.ones(b, length, dtype=torch.int8)},
            codecs={"h": codec},
        )
    )


def _grad_up(sid: str, step: int, b: int, length: int, hidden: int):
    g = torch.randn(b, length, hidden)
    return encode(Message(MsgType.GRAD_UP, session=sid, step=step, tensors={"g": g}, codecs={"g": "fp32"}))


def _code(frames) -> str:
    reply = decode(frames)
    assert reply.type == MsgType.ERROR, reply.type
    return reply.meta["code"]


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if any tensor is decoded (the nf4 codec, and the raw frame-to-tensor step)."""
    from guardedp2p.wire import framing

    def boom(*args, **kwargs):
        raise AssertionError("a tensor was decoded before the message was validated")

    monkeypatch.setattr(type(get_codec("nf4")), "decode", boom)
    monkeypatch.setattr(framing, "_frame_to_tensor", boom)
    monkeypatch.setattr(framing, "_chunks_to_tensor", boom)


def test_unknown_session_is_refused_without_decoding(model, no_decoding):
    app = provider_app(model)
    frames = _act_up("0" * 32, 1, 2, 64, model.config.hidden_size, codec="nf4")
    assert _code(app.handle("inproc:x", frames)) == "unknown-session"


def test_session_checks_codec_and_shapes_refuse_without_decoding(model, fp, monkeypatch):
    app = provider_app(model)
    hidden = model.config.hidden_size
    alice = open_session(app, fp, protocol="online", peer="inproc:alice")
    step0 = _act_up(alice.sid, 1, 1, 4, hidden)
    assert decode(app.handle("inproc:alice", step0)).type == MsgType.ACT_DOWN
    from guardedp2p.wire import framing

    def boom(*args, **kwargs):
        raise AssertionError("decoded before validation")

    monkeypatch.setattr(type(get_codec("nf4")), "decode", boom)
    monkeypatch.setattr(framing, "_frame_to_tensor", boom)
    cases = {
        "not-your-session": ("inproc:mallory", _act_up(alice.sid, 2, 1, 4, hidden)),
        "codec-mismatch": ("inproc:alice", _act_up(alice.sid, 2, 1, 64, hidden, codec="nf4")),
        "bad-activation": ("inproc:alice", _act_up(alice.sid, 2, 1, 4, hidden + 1)),
        "replayed-step": ("inproc:alice", _act_up(alice.sid, 1, 1, 4, hidden)),
        "no-pending-step": ("inproc:alice", _grad_up(alice.sid, 9, 1, 4, hidden)),
    }
    for code, (peer, frames) in cases.items():
        assert _code(app.handle(peer, frames)) == code, code
    ping_with_tensor = encode(Message(MsgType.PING, session=alice.sid, tensors={"x": torch.zeros(3)}))
    assert _code(app.handle("inproc:alice", ping_with_tensor)) == "bad-activation"


def test_decoded_bytes_and_tokens_per_step_are_budgets(model, fp, no_decoding):
    hidden = model.config.hidden_size
    app = provider_app(model, config=ProviderConfig(max_decoded_bytes=4096, max_tokens_per_step=64))
    s = open_session(app, fp, protocol="gradfree", peer="inproc:a")
    # nf4 travels at ~0.56 bytes per value but decodes to 4: the decoded size is what counts
    frames = _act_up(s.sid, 1, 1, 64, hidden, codec="nf4")
    assert _code(app.handle("inproc:a", frames)) == "too-large"
    app = provider_app(model, config=ProviderConfig(max_tokens_per_step=64))
    s = open_session(app, fp, protocol="gradfree", peer="inproc:a")
    assert _code(app.handle("inproc:a", _act_up(s.sid, 1, 5, 13, hidden))) == "over-budget"
    assert app.stats["over_budget"] == 1


def test_kept_graphs_are_measured_and_budgeted_per_key_and_in_total(model, fp):
    hidden = model.config.hidden_size
    app = provider_app(model, config=ProviderConfig(max_graphs_per_peer=2, max_graphs=3))
    a = open_session(app, fp, protocol="online", peer="inproc:a")
    a2 = open_session(app, fp, protocol="online", peer="inproc:a")
    b = open_session(app, fp, protocol="online", peer="inproc:b")
    for sid, step in ((a.sid, 1), (a2.sid, 1)):
        assert decode(app.handle("inproc:a", _act_up(sid, step, 2, 8, hidden, train=True))).type == MsgType.ACT_DOWN
    held = app.held("inproc:a")
    assert held["graphs"] == 2 and held["graph_bytes"] > 2 * 8 * hidden * 4, held  # activations of every block
    # a third graph of the same key (in either session) is over its budget; another key may keep one
    assert _code(app.handle("inproc:a", _act_up(a.sid, 2, 2, 8, hidden, train=True))) == "over-budget"
    assert decode(app.handle("inproc:b", _act_up(b.sid, 1, 2, 8, hidden, train=True))).type == MsgType.ACT_DOWN
    c = open_session(app, fp, protocol="online", peer="inproc:c")
    assert _code(app.handle("inproc:c", _act_up(c.sid, 1, 2, 8, hidden, train=True))) == "over-budget", "total"
    # forward-only requests keep nothing and are not limited by the graph budget
    assert decode(app.handle("inproc:c", _act_up(c.sid, 2, 2, 8, hidden))).type == MsgType.ACT_DOWN
    # GRAD_UP frees a graph: the key may keep another
    assert decode(app.handle("inproc:a", _grad_up(a.sid, 1, 2, 8, hidden))).type == MsgType.GRAD_DOWN
    assert app.held("inproc:a")["graphs"] == 1
    assert decode(app.handle("inproc:a", _act_up(a.sid, 3, 2, 8, hidden, train=True))).type == MsgType.ACT_DOWN
    # a GRAD_UP of the wrong shape is refused undecoded and keeps the graph
    assert _code(app.handle("inproc:a", _grad_up(a.sid, 3, 1, 8, hidden))) == "bad-activation"
    assert app.held("inproc:a")["graphs"] == 2


def test_graph_bytes_budget_uses_the_measured_size(model, fp):
    hidden = model.config.hidden_size
    probe = provider_app(model)
    s = open_session(probe, fp, protocol="online", peer="inproc:a")
    probe.handle("inproc:a", _act_up(s.sid, 1, 2, 8, hidden, train=True))
    one = probe.held()["graph_bytes"]
    app = provider_app(model, config=ProviderConfig(max_graph_bytes_per_peer=int(one * 1.5)))
    s = open_session(app, fp, protocol="online", peer="inproc:a")
    assert decode(app.handle("inproc:a", _act_up(s.sid, 1, 2, 8, hidden, train=True))).type == MsgType.ACT_DOWN
    assert _code(app.handle("inproc:a", _act_up(s.sid, 2, 2, 8, hidden, train=True))) == "over-budget"


def test_accept_echoes_only_what_the_client_needs(model, fp):
    app = provider_app(model)
    hello = Hello("online", fp, (SPLIT.bottom_layers, SPLIT.top_layers), {**FP32, "junk": "x" * 8000})
    hello.privacy = {f"k{i}": "p" * 400 for i in range(120)}  # ~50 KB, under the 64 KiB header limit
    frames = app.handle("inproc:a", encode(Message(MsgType.HELLO, meta=hello.to_meta())))
    reply = decode(frames)
    assert reply.type == MsgType.ACCEPT
    assert "privacy" not in reply.meta and set(reply.meta["codecs"]) == set(FP32)
    assert sum(len(f) for f in frames) < 2000
    assert "privacy" not in app.sessions[reply.session].terms


def test_drop_connection_frees_the_sessions_last_used_over_it(model, fp):
    hidden = model.config.hidden_size
    app = provider_app(model)
    hello = encode(Message(MsgType.HELLO, meta=Hello("online", fp, (2, 2), FP32).to_meta()))
    sid_a = decode(app.handle("k", hello, conn=b"route-a")).session
    sid_b = decode(app.handle("k", hello, conn=b"route-b")).session
    app.handle("k", _act_up(sid_a, 1, 1, 4, hidden, train=True), conn=b"route-a")
    assert app.held()["graphs"] == 1
    assert app.drop_connection(b"route-a", "gone") == 1
    assert sid_a not in app.sessions and sid_b in app.sessions and app.held()["graphs"] == 0


def test_a_dropped_graph_is_really_freed(model, fp):
    """The byte-measuring hooks must not tie a saved output to its own graph (a cycle would keep it alive)."""
    import gc
    import weakref

    hidden = model.config.hidden_size
    app = provider_app(model)
    s = open_session(app, fp, protocol="online", peer="inproc:a")
    app.handle("inproc:a", _act_up(s.sid, 1, 2, 8, hidden, train=True), conn=b"r")
    pending = app.sessions[s.sid].handler.pending[1]
    refs = [weakref.ref(pending.outputs), weakref.ref(pending.inputs)]
    del pending
    app.drop_connection(b"r", "gone")
    gc.collect()
    assert all(r() is None for r in refs), "the kept graph outlived its session"


def test_triage_answers_control_messages_and_hands_compute_to_the_worker(model, fp):
    hidden = model.config.hidden_size
    app = provider_app(model)
    s = open_session(app, fp, protocol="gradfree", peer="inproc:a")
    ping = app.triage("inproc:a", encode(Message(MsgType.PING, session=s.sid, step=1)))
    assert isinstance(ping, list) and decode(ping).type == MsgType.PONG
    work = app.triage("inproc:a", _act_up(s.sid, 1, 2, 5, hidden))
    assert isinstance(work, Work) and work.tokens == 10
    # queued behind that work, a PING is work too (the peer's order is kept)
    later = app.triage("inproc:a", encode(Message(MsgType.PING, session=s.sid, step=2)), immediate=False)
    assert isinstance(later, Work)
    assert [decode(r).type for r in app.run([work, later])] == [MsgType.ACT_DOWN, MsgType.PONG]


def test_budget_config_is_checked():
    with pytest.raises(ConfigError, match="max_graphs_per_peer"):
        ProviderConfig(max_graphs_per_peer=0)
    with pytest.raises(ConfigError, match="max_decoded_bytes"):
        ProviderConfig(max_decoded_bytes=-1)
