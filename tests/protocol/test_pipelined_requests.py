"""Several requests in flight on one session (issue 19): ClientSession.send / receive match replies in order."""

from __future__ import annotations

import pytest
import torch

from guardedp2p.errors import ProtocolError, RemoteError
from guardedp2p.protocol.client import ClientSession
from guardedp2p.protocol.provider import ProviderConfig
from guardedp2p.transport.inproc import InProcClientChannel
from guardedp2p.wire.framing import Message, decode, encode
from guardedp2p.wire.handshake import Hello
from guardedp2p.wire.messages import MsgType
from tests.protocol_helpers import SPLIT, client_parts, open_session, provider_app
from tests.tiny_models import tiny_model

GF = {"up": "fp32", "down": "fp32"}


def _act(step: int, hidden: int, rows: int = 1) -> Message:
    h = torch.full((rows, 4, hidden), float(step))
    return Message(
        MsgType.ACT_UP,
        step=step,
        meta={"train": False},
        tensors={"h": h, "mask": torch.ones(rows, 4, dtype=torch.int8)},
        codecs={"h": "fp32"},
    )


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama")


def test_replies_taken_in_any_order(model: torch.nn.Module) -> None:
    app = provider_app(model)
    _, fp = client_parts(model, lora=False)
    s = open_session(app, fp, protocol="gradfree", codecs=GF)
    hidden = model.config.hidden_size
    pending = [s.send(_act(k, hidden, rows=k), expect=MsgType.ACT_DOWN) for k in (1, 2, 3)]
    assert s.in_flight == 3
    third = s.receive(pending[2])  # reads (and keeps) the two replies before it
    assert third.step == 3 and third.tensors["h"].shape[0] == 3 and s.in_flight == 0
    assert s.receive(pending[0]).tensors["h"].shape[0] == 1
    assert s.receive(pending[1]).step == 2
    assert s.stats.messages == 1 + 3 and s.stats.bytes_down["ACT_DOWN"] > 0
    assert s.receive(pending[1]).step == 2  # a reply stays with its request
    fresh = ClientSession(InProcClientChannel(app), timeout=1.0)  # a request sent on another session
    with pytest.raises(ProtocolError, match="no reply is awaited"):
        fresh.receive(s.send(_act(10, hidden), expect=MsgType.ACT_DOWN))


def test_an_error_reply_belongs_to_its_request_only(model: torch.nn.Module) -> None:
    app = provider_app(model)
    _, fp = client_parts(model, lora=False)
    s = open_session(app, fp, protocol="gradfree", codecs=GF)
    hidden = model.config.hidden_size
    a = s.send(_act(5, hidden), expect=MsgType.ACT_DOWN)
    replayed = s.send(_act(5, hidden), expect=MsgType.ACT_DOWN)  # same step again: refused by the provider
    b = s.send(_act(6, hidden), expect=MsgType.ACT_DOWN)
    with pytest.raises(RemoteError, match="replayed"):
        s.receive(replayed)
    assert s.receive(a).step == 5 and s.receive(b).step == 6


class _Swapping:
    """A channel that hands over the replies of each two requests in reverse order (a provider refuses a request
    as soon as it reads it, so a refusal can overtake an earlier request's reply)."""

    def __init__(self, inner: InProcClientChannel) -> None:
        self.inner = inner
        self.held: list = []

    def send(self, frames: list) -> None:
        self.inner.send(frames)

    def recv(self, timeout: float) -> list:
        if not self.held:
            first = self.inner.recv(timeout)
            self.held = [first, self.inner.recv(timeout)]
        return self.held.pop()


def test_replies_are_matched_by_step_not_by_arrival(model: torch.nn.Module) -> None:
    app = provider_app(model)
    _, fp = client_parts(model, lora=False)
    s = ClientSession(InProcClientChannel(app), timeout=1.0)
    s.open(Hello("gradfree", fp, (SPLIT.bottom_layers, SPLIT.top_layers), GF))
    s.channel = _Swapping(s.channel)  # type: ignore[assignment]
    hidden = model.config.hidden_size
    a = s.send(_act(1, hidden, rows=1), expect=MsgType.ACT_DOWN)
    b = s.send(_act(2, hidden, rows=2), expect=MsgType.ACT_DOWN)
    assert s.receive(a).tensors["h"].shape[0] == 1  # the reply to b came first and waited
    assert s.receive(b).tensors["h"].shape[0] == 2


class _Garbling:
    """A channel that replaces the header of the ``nth`` message sent with bytes the provider cannot parse."""

    def __init__(self, inner: InProcClientChannel, nth: int) -> None:
        self.inner, self.nth = inner, nth

    def send(self, frames: list) -> None:
        self.nth -= 1
        self.inner.send([b"\xc1 not msgpack", *frames[1:]] if self.nth == 0 else frames)

    def recv(self, timeout: float) -> list:
        return self.inner.recv(timeout)


def test_a_stepless_refusal_with_several_in_flight_ends_the_session(model: torch.nn.Module) -> None:
    """A header the provider cannot read gets an ERROR naming no step: with several requests in flight it cannot be
    matched, and the session is given up (the run's ladder opens a new one)."""
    app = provider_app(model)
    _, fp = client_parts(model, lora=False)
    s = open_session(app, fp, protocol="gradfree", codecs=GF)
    s.channel = _Garbling(s.channel, nth=2)  # type: ignore[assignment]
    hidden = model.config.hidden_size
    first = s.send(_act(1, hidden), expect=MsgType.ACT_DOWN)
    second = s.send(_act(2, hidden), expect=MsgType.ACT_DOWN)  # its header arrives garbled
    s.send(_act(3, hidden), expect=MsgType.ACT_DOWN)
    assert s.receive(first).step == 1
    with pytest.raises(RemoteError, match="without naming its step"):
        s.receive(second)
    assert s.in_flight == 0


def test_rate_limited_requests_among_several_in_flight_are_each_sent_again(model: torch.nn.Module) -> None:
    """The provider reads the header before charging the byte rate, so its rate-limited ERROR names the refused
    request's step: each refused request is matched and sent again, and every one is answered."""
    now = [0.0]
    hidden = model.config.hidden_size
    one = sum(len(f) for f in encode(_act(1, hidden)))
    app = provider_app(
        model, config=ProviderConfig(max_bytes_per_s=one * 1.5, burst_bytes=one * 1.5), clock=lambda: now[0]
    )
    _, fp = client_parts(model, lora=False)
    s = ClientSession(InProcClientChannel(app), timeout=1.0, sleep=lambda d: now.__setitem__(0, now[0] + d))
    now[0] = 100.0
    s.open(Hello("gradfree", fp, (SPLIT.bottom_layers, SPLIT.top_layers), GF))
    now[0] = 200.0
    pending = [s.send(_act(k, hidden, rows=1), expect=MsgType.ACT_DOWN) for k in (1, 2, 3)]  # 2 and 3 over the rate
    assert [s.receive(p).step for p in pending] == [1, 2, 3]
    assert s.stats.rate_limited >= 2 and app.stats["rate_limited"] == s.stats.rate_limited


def test_a_rate_limited_error_names_the_refused_message(model: torch.nn.Module) -> None:
    hidden = model.config.hidden_size
    one = sum(len(f) for f in encode(_act(1, hidden)))
    app = provider_app(
        model, config=ProviderConfig(max_bytes_per_s=one * 1.5, burst_bytes=one * 1.5), clock=lambda: 0.0
    )
    _, fp = client_parts(model, lora=False)
    hello = Message(MsgType.HELLO, meta=Hello("gradfree", fp, (SPLIT.bottom_layers, SPLIT.top_layers), GF).to_meta())
    sid = decode(app.handle("inproc:client", encode(hello))).session
    act = _act(7, hidden)
    act.session = sid
    decode(app.handle("inproc:client", encode(act)))  # takes what is left of the bucket
    act.step = 8
    refused = decode(app.handle("inproc:client", encode(act)))
    assert refused.type == MsgType.ERROR and refused.meta["code"] == "rate-limited"
    assert (refused.session, refused.step) == (sid, 8)
    assert refused.meta["message"].startswith("ACT_UP (step 8) refused")
    garbage = decode(app.handle("inproc:client", [b"\xc1" * one]))  # no header to name: still charged and refused
    assert garbage.meta["code"] == "rate-limited" and (garbage.session, garbage.step) == ("", 0)


def test_send_never_exceeds_the_announced_unanswered_requests(model: torch.nn.Module) -> None:
    app = provider_app(model)
    app.announce_limit("max_unanswered", 2)  # as the serve loop does
    _, fp = client_parts(model, lora=False)
    s = open_session(app, fp, protocol="gradfree", codecs=GF)
    assert s.terms["limits"]["max_unanswered"] == 2 and s.max_in_flight == 2
    hidden = model.config.hidden_size
    pending = []
    for k in range(1, 6):
        pending.append(s.send(_act(k, hidden, rows=k), expect=MsgType.ACT_DOWN))
        assert s.in_flight <= 2  # the oldest replies were read (and kept) to make room
    assert [s.receive(p).tensors["h"].shape[0] for p in pending] == [1, 2, 3, 4, 5]
    del s.terms["limits"]  # a provider that announces no cap: none here
    more = [s.send(_act(k, hidden), expect=MsgType.ACT_DOWN) for k in range(6, 10)]
    assert s.in_flight == 4 and s.max_in_flight is None
    assert [s.receive(p).step for p in more] == [6, 7, 8, 9]


def test_rate_limited_request_alone_in_flight_is_sent_again(model: torch.nn.Module) -> None:
    """With one request in flight a step-less refusal is its own: sent again after the hint, as request() does."""
    now = [0.0]
    hidden = model.config.hidden_size
    one = sum(len(f) for f in encode(_act(1, hidden)))
    app = provider_app(
        model, config=ProviderConfig(max_bytes_per_s=one * 1.5, burst_bytes=one * 1.5), clock=lambda: now[0]
    )
    _, fp = client_parts(model, lora=False)
    s = ClientSession(InProcClientChannel(app), timeout=1.0, sleep=lambda d: now.__setitem__(0, now[0] + d))
    now[0] = 100.0  # the HELLO's bucket has refilled
    s.open(Hello("gradfree", fp, (SPLIT.bottom_layers, SPLIT.top_layers), GF))
    now[0] = 200.0
    first = s.send(_act(1, hidden), expect=MsgType.ACT_DOWN)
    assert s.receive(first).step == 1
    second = s.send(_act(2, hidden), expect=MsgType.ACT_DOWN)  # over the rate: refused, not processed
    assert s.receive(second).step == 2  # sent again after the hint, then answered
    assert s.stats.rate_limited == 1 and s.stats.rate_limited_wait_s > 0
