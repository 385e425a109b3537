"""ACCEPT announces the provider's bounds (issue 19 backpressure; docs/wire.md section 5): every key with the
configured value, the serve loop's cap on unanswered requests included, and the documented table says the same."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from guardedp2p.errors import ConfigError
from guardedp2p.protocol.client import announced_limit
from guardedp2p.protocol.provider import ProviderConfig
from guardedp2p.service.serve import ServeConfig, Server
from guardedp2p.transport.inproc import InProcServerChannel
from guardedp2p.wire.framing import Message, decode, encode
from guardedp2p.wire.handshake import Hello
from guardedp2p.wire.messages import MsgType
from tests.protocol_helpers import SPLIT, client_parts, provider_app
from tests.tiny_models import tiny_model

WIRE_MD = Path(__file__).resolve().parents[2] / "docs" / "wire.md"
GF = {"up": "fp32", "down": "fp32"}


def _documented() -> dict[str, str]:
    """key -> default cell of the ACCEPT ``limits`` table in docs/wire.md section 5."""
    text = WIRE_MD.read_text(encoding="utf-8")
    start = text.index("\n## 5. Handshake")
    section = text[start : text.index("\n## ", start + 1)]
    return {m[0]: m[1].strip() for m in re.findall(r"^\| `([a-z_]+)` \| [^|]+ \| ([^|]+) \|$", section, re.M)}


def _accept(app) -> Message:  # type: ignore[no-untyped-def]
    fp = client_parts(tiny_model("llama"), lora=False)[1]
    hello = Hello("gradfree", fp, (SPLIT.bottom_layers, SPLIT.top_layers), GF)
    return decode(app.handle("inproc:a", encode(Message(MsgType.HELLO, meta=hello.to_meta()))))


def test_accept_announces_the_configured_limits_and_the_serve_loops_cap() -> None:
    config = ProviderConfig(max_tokens_per_step=300, max_inflight_steps=3, max_graphs_per_peer=2)
    app = provider_app(tiny_model("llama"), config=config)
    limits = _accept(app).meta["limits"]
    assert limits == {
        "max_tokens_per_step": 300,
        "step_timeout": config.step_timeout,
        "session_idle_timeout": config.session_idle_timeout,
        "max_inflight_steps": 3,
        "max_graphs_per_peer": 2,
    }
    server = Server(app, InProcServerChannel(), ServeConfig(max_unanswered=5))  # what serve_forever builds
    try:
        assert _accept(app).meta["limits"]["max_unanswered"] == 5
    finally:
        server.stop_worker()


def test_the_documented_limits_are_the_announced_ones_with_their_defaults() -> None:
    app = provider_app(tiny_model("llama"))
    app.announce_limit("max_unanswered", ServeConfig().max_unanswered)
    announced = _accept(app).meta["limits"]
    documented = _documented()
    assert set(documented) == set(announced)
    for key, value in announced.items():
        assert documented[key] == f"{value:g}", key  # the defaults of ProviderConfig and ServeConfig


def test_announced_limits_are_read_defensively() -> None:
    terms = {"limits": {"a": 3, "b": 0, "c": True, "d": "4", "e": 2.5}}
    assert [announced_limit(terms, k) for k in "abcdef"] == [3, None, None, None, None, None]
    assert announced_limit({}, "a") is None and announced_limit({"limits": [1]}, "a") is None
    assert announced_limit(None, "a") is None
    app = provider_app(tiny_model("llama"))
    with pytest.raises(ConfigError):
        app.announce_limit("max_unanswered", 0)
