"""What a client can make the provider write to its log (issue 20, "Low"): client strings escaped, refusals
throttled per key, and malformed-but-parsable requests refused with their own code, never a traceback."""

from __future__ import annotations

import logging

import pytest
import torch

from guardedp2p.protocol.provider import REFUSAL_LOG_EVERY_S
from guardedp2p.wire.framing import Message, decode, encode
from guardedp2p.wire.handshake import Hello
from guardedp2p.wire.messages import MsgType
from tests.protocol_helpers import SPLIT, client_parts, provider_app
from tests.tiny_models import tiny_model

GF = {"up": "fp32", "down": "fp32"}
FP32 = {d: "fp32" for d in ("up", "down", "grad_up", "grad_down")}
EVIL = "evil\x1b[2J\nFAKE provider line"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def fp(model: torch.nn.Module) -> str:
    return client_parts(model, lora=False)[1]


def _hello(fp: str, protocol: str = "gradfree", codecs: dict[str, str] | None = None) -> Hello:
    return Hello(protocol, fp, (SPLIT.bottom_layers, SPLIT.top_layers), codecs or GF)


def _send(app, peer: str, msg: Message) -> Message:  # type: ignore[no-untyped-def]
    return decode(app.handle(peer, encode(msg)))


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("guardedp2p")]


def test_client_strings_reach_the_log_escaped(model, fp, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="guardedp2p")
    app = provider_app(model)
    hello = _hello(fp)
    hello.software = EVIL
    assert _send(app, "inproc:a", Message(MsgType.HELLO, meta=hello.to_meta())).type == MsgType.ACCEPT
    refused = _hello(fp, protocol=EVIL)  # its name is quoted in the refusal, which is logged
    assert _send(app, "inproc:b", Message(MsgType.HELLO, meta=refused.to_meta())).type == MsgType.REJECT
    lines = _lines(caplog)
    assert any("opened" in line and "evil\\x1b[2J\\nFAKE" in line for line in lines), lines
    assert any(line.startswith("refused a message from inproc:b") for line in lines), lines
    assert not any("\x1b" in line or "\n" in line for line in lines), lines


def test_refusals_are_logged_once_per_key_and_interval_with_a_count(model, fp, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.WARNING, logger="guardedp2p")
    now = [1000.0]
    app = provider_app(model, clock=lambda: now[0])
    for _ in range(20):  # a client sending messages for a session that does not exist, in a loop
        assert _send(app, "inproc:a", Message(MsgType.PING, session="0" * 32)).meta["code"] == "unknown-session"
    _send(app, "inproc:b", Message(MsgType.PING, session="0" * 32))  # another key has its own allowance
    refusals = [line for line in _lines(caplog) if line.startswith("refused a message")]
    assert [line[: len("refused a message from inproc:a")] for line in refusals] == [
        "refused a message from inproc:a",
        "refused a message from inproc:b",
    ]
    now[0] += REFUSAL_LOG_EVERY_S
    _send(app, "inproc:a", Message(MsgType.PING, session="0" * 32))
    last = [line for line in _lines(caplog) if line.startswith("refused a message from inproc:a")][-1]
    assert "(19 more refused since the last report)" in last
    assert app.stats["errors"] == 22  # every refusal is still counted and answered


@pytest.mark.parametrize("protocol", ["online", "gradfree"])
@pytest.mark.parametrize("shape", [(0, 4), (1, 0), (0, 0)])
@pytest.mark.parametrize("generate", [False, True])
def test_empty_activations_are_bad_activation_without_a_traceback(model, fp, caplog, protocol, shape, generate) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="guardedp2p")
    app = provider_app(model)
    codecs = FP32 if protocol == "online" else GF
    sid = _send(app, "inproc:a", Message(MsgType.HELLO, meta=_hello(fp, protocol, codecs).to_meta())).session
    d = model.config.hidden_size
    meta = {"generate": True, "cache": "new", "past_len": 0} if generate else {"train": protocol == "online"}
    msg = Message(
        MsgType.ACT_UP,
        session=sid,
        step=1,
        meta=meta,
        tensors={"h": torch.zeros(*shape, d), "mask": torch.ones(shape, dtype=torch.int8)},
        codecs={"h": "fp32"},
    )
    reply = _send(app, "inproc:a", msg)
    assert reply.type == MsgType.ERROR and reply.meta["code"] == "bad-activation", reply.meta
    assert "internal" not in reply.meta["message"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
