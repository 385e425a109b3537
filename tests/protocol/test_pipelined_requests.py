"""Several requests in flight on one session (issue 19): ClientSession.send / receive match replies in order."""

from __future__ import annotations

import pytest
import torch

from guardedp2p.errors import ProtocolError, RemoteError
from guardedp2p.protocol.client import ClientSession
from guardedp2p.protocol.provider import ProviderConfig
from guardedp2p.transport.inproc import InProcClientChannel
from guardedp2p.wire.framing import Message, encode
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


def test_a_stepless_refusal_with_several_in_flight_ends_the_session(model: torch.nn.Module) -> None:
    """Over its byte rate the provider refuses before reading the header, so its ERROR names no step: with several
    requests in flight it cannot be matched, and the session is given up (the run's ladder opens a new one)."""
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
    first = s.send(_act(1, hidden), expect=MsgType.ACT_DOWN)  # admitted
    second = s.send(_act(2, hidden), expect=MsgType.ACT_DOWN)  # over the rate: refused before its header is read
    s.send(_act(3, hidden), expect=MsgType.ACT_DOWN)  # refused too
    assert s.receive(first).step == 1
    with pytest.raises(RemoteError, match="without naming its step"):
        s.receive(second)
    assert s.in_flight == 0


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
