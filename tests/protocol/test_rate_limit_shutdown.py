"""Issue #9: a per-client byte rate on the provider (the client waits and sends again; one client's flood never
slows another) and a graceful shutdown that tells clients, which then stop with their checkpoint."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from guardedp2p.designs.online.client import RemoteTrunk
from guardedp2p.errors import ConfigError, ProviderShuttingDown, RateLimited
from guardedp2p.protocol.client import ClientSession
from guardedp2p.protocol.provider import ProviderConfig, TokenBucket
from guardedp2p.service.client import TrainingInterrupted, tune
from guardedp2p.service.serve import serve_forever
from guardedp2p.transport.inproc import InProcClientChannel, InProcServerChannel
from guardedp2p.wire.framing import Message, decode, encode
from guardedp2p.wire.handshake import Hello
from guardedp2p.wire.messages import ERROR_RATE_LIMITED, ERROR_SHUTTING_DOWN, MsgType
from tests.protocol_helpers import SPLIT, client_parts, open_session, provider_app
from tests.service.test_tune import _client, _opts
from tests.tiny_models import tiny_model

GF = {"up": "fp32", "down": "fp32"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _act_up(sid: str, step: int, hidden: int, *, rows: int = 1, length: int = 8) -> list:
    h = torch.randn(rows, length, hidden)
    return encode(
        Message(
            MsgType.ACT_UP,
            session=sid,
            step=step,
            meta={"train": False},
            tensors={"h": h, "mask": torch.ones(rows, length, dtype=torch.int8)},
            codecs={"h": "fp32"},
        )
    )


def _nbytes(frames: list) -> int:
    return sum(len(f) for f in frames)


# ---------------------------------------------------------------------------------------------- rate limit
def test_token_bucket_admits_refuses_with_an_exact_hint_and_lets_a_big_message_into_debt():
    b = TokenBucket(rate=100.0, capacity=200.0, tokens=200.0, updated=0.0)
    assert b.take(150, 0.0) == 0.0  # 50 left
    assert b.take(100, 0.0) == pytest.approx(0.5)  # needs 50 more bytes at 100 B/s
    assert b.take(100, 0.0) == pytest.approx(0.5), "a refused message takes nothing"
    assert b.take(100, 0.5) == 0.0, "sending again after the hint is admitted"
    assert b.take(1000, 2.0) == pytest.approx(0.5), "larger than the bucket: waits until the bucket is full"
    assert b.take(1000, 2.5) == 0.0, "then admitted, into debt"
    assert b.take(1, 2.5) == pytest.approx((1 + 800) / 100)
    assert not b.full(12.0) and b.full(12.5)


def test_a_flooding_client_is_rate_limited_and_another_is_not_slowed():
    model = tiny_model("llama")
    clock = FakeClock()
    hidden = model.config.hidden_size
    app = provider_app(model, config=ProviderConfig(max_bytes_per_s=20_000, burst_bytes=20_000), clock=clock)
    _, fp = client_parts(model, lora=False)
    flood, calm = (
        open_session(app, fp, protocol="gradfree", peer="inproc:flood"),
        open_session(app, fp, protocol="gradfree", peer="inproc:calm"),
    )
    frames = _act_up(flood.sid, 1, hidden)
    size = _nbytes(frames)  # ~2.3 kB
    codes = []
    for step in range(1, 40):  # ~90 kB at once from one key
        reply = decode(app.handle("inproc:flood", _act_up(flood.sid, step, hidden)))
        codes.append(reply.meta.get("code", reply.type.value))
        if reply.type == MsgType.ERROR:
            assert reply.meta["code"] == ERROR_RATE_LIMITED
            assert 0 < reply.meta["retry_after_s"] <= size / 20_000 + 1e-6
            assert reply.meta["limit_bytes_per_s"] == 20_000
        # the calm client, interleaved, sends a little and is always served
        if step % 10 == 0:
            assert decode(app.handle("inproc:calm", _act_up(calm.sid, step, hidden))).type == MsgType.ACT_DOWN
    admitted = codes.count("ACT_DOWN")
    assert ERROR_RATE_LIMITED in codes and admitted * size <= 20_000 + size
    assert app.stats["rate_limited"] == codes.count(ERROR_RATE_LIMITED)
    # in a batch too: the flood's excess is refused, the calm request is answered
    items = [("inproc:flood", _act_up(flood.sid, 100 + i, hidden)) for i in range(5)] + [
        ("inproc:calm", _act_up(calm.sid, 100, hidden))
    ]
    replies = [decode(r) for r in app.handle_many(items)]
    assert replies[-1].type == MsgType.ACT_DOWN
    assert all(r.meta.get("code") == ERROR_RATE_LIMITED for r in replies[:-1])
    # time heals: after the hinted wait the flooder is served again
    clock.now += 1.0
    assert decode(app.handle("inproc:flood", _act_up(flood.sid, 200, hidden))).type == MsgType.ACT_DOWN


def test_the_client_waits_out_the_limit_and_every_request_succeeds():
    model = tiny_model("llama")
    clock = FakeClock()
    hidden = model.config.hidden_size
    app = provider_app(model, config=ProviderConfig(max_bytes_per_s=10_000), clock=clock)
    _, fp = client_parts(model, lora=False)
    session = ClientSession(InProcClientChannel(app, peer="inproc:c"), timeout=5, sleep=clock.sleep)
    session.open(Hello("gradfree", fp, (SPLIT.bottom_layers, SPLIT.top_layers), GF))
    remote = RemoteTrunk(session, GF, gradients=False)
    h, mask = torch.randn(2, 8, hidden), torch.ones(2, 8, dtype=torch.long)
    outs = [remote(h, mask, train=False) for _ in range(10)]  # ~4.3 kB each: 43 kB at 10 kB/s
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert session.stats.rate_limited > 0
    assert 2.5 < clock.now < 6.0, f"the client waited {clock.now:.2f} s (about what the limit implies)"
    assert session.stats.as_dict()["rate_limited_wait_s"] == pytest.approx(clock.now, rel=1e-3)


def test_the_client_waits_a_bounded_time_then_fails_with_an_actionable_error():
    model = tiny_model("llama")
    app = provider_app(
        model, config=ProviderConfig(max_bytes_per_s=100.0, burst_bytes=100.0), clock=lambda: 0.0
    )  # time never passes
    _, fp = client_parts(model, lora=False)
    waits: list[float] = []
    session = ClientSession(
        InProcClientChannel(app, peer="inproc:c"), timeout=5, sleep=waits.append, rate_limit_wait_s=3.0
    )
    session.open(
        Hello("gradfree", fp, (SPLIT.bottom_layers, SPLIT.top_layers), GF)
    )  # a full bucket admits it, into debt
    with pytest.raises(RateLimited, match="max-mb-per-s") as info:
        session.ping()
    assert info.value.remote_code == ERROR_RATE_LIMITED
    assert sum(waits) == pytest.approx(3.0) and all(w <= 60.0 for w in waits)


def test_rate_limit_config_is_checked():
    with pytest.raises(ConfigError, match="max_bytes_per_s"):
        ProviderConfig(max_bytes_per_s=0)
    with pytest.raises(ConfigError, match="burst_bytes"):
        ProviderConfig(max_bytes_per_s=10.0, burst_bytes=-1)
    with pytest.raises(ConfigError, match="shutdown_grace_s"):
        ProviderConfig(shutdown_grace_s=-1)


# ---------------------------------------------------------------------------------------------- shutdown
def test_a_shutting_down_provider_answers_every_request_with_its_code_and_acknowledges_bye():
    model = tiny_model("llama")
    app = provider_app(model)
    _, fp = client_parts(model, lora=False)
    a, b = (
        open_session(app, fp, protocol="gradfree", peer="inproc:a"),
        open_session(app, fp, protocol="gradfree", peer="inproc:b"),
    )
    app.begin_shutdown()
    reply = decode(app.handle("inproc:a", _act_up(a.sid, 1, model.config.hidden_size)))
    assert reply.type == MsgType.ERROR and reply.meta["code"] == ERROR_SHUTTING_DOWN and reply.session == a.sid
    assert a.sid not in app.sessions, "the told session is closed"
    assert (
        decode(
            app.handle("inproc:x", encode(Message(MsgType.HELLO, meta=Hello("gradfree", fp, (2, 2), GF).to_meta())))
        ).meta["code"]
        == ERROR_SHUTTING_DOWN
    )
    with pytest.raises(ProviderShuttingDown, match="shutting down"):
        ClientSession(InProcClientChannel(app, peer="inproc:y"), timeout=5).open(Hello("gradfree", fp, (2, 2), GF))
    assert decode(app.handle("inproc:b", encode(Message(MsgType.BYE, session=b.sid, step=1)))).type == MsgType.BYE_ACK
    assert not app.sessions


def _serve(app, server, stop, abort=None):
    t = threading.Thread(
        target=serve_forever, args=(app, server, stop), kwargs={"poll_s": 0.05, "abort": abort}, daemon=True
    )
    t.start()
    return t


def test_serve_loop_tells_clients_and_ends_early_once_every_session_is_told():
    model = tiny_model("llama")
    app = provider_app(model, config=ProviderConfig(shutdown_grace_s=30.0))
    _, fp = client_parts(model, lora=False)
    hidden = model.config.hidden_size
    server, stop = InProcServerChannel(), threading.Event()
    serving = _serve(app, server, stop)
    sessions = [ClientSession(server.connect(f"c{i}"), timeout=10) for i in range(3)]
    for s in sessions:
        s.open(Hello("gradfree", fp, (SPLIT.bottom_layers, SPLIT.top_layers), GF))
    remotes = [RemoteTrunk(s, GF, gradients=False) for s in sessions]
    h, mask = torch.randn(1, 6, hidden), torch.ones(1, 6, dtype=torch.long)
    for r in remotes:
        r(h, mask, train=False)
    t0 = time.monotonic()
    stop.set()
    time.sleep(0.2)  # the loop has left its main phase
    for r in remotes:
        with pytest.raises(ProviderShuttingDown):
            r(h, mask, train=False)
    serving.join(timeout=10)
    assert not serving.is_alive() and time.monotonic() - t0 < 10, "ended early: every session was told"
    assert not app.sessions


def test_the_grace_period_ends_on_time_when_a_client_stays_silent_and_at_once_on_abort():
    model = tiny_model("llama")
    _, fp = client_parts(model, lora=False)
    for abort_now in (False, True):
        app = provider_app(model, config=ProviderConfig(shutdown_grace_s=0.5 if not abort_now else 30.0))
        server, stop, abort = InProcServerChannel(), threading.Event(), threading.Event()
        serving = _serve(app, server, stop, abort)
        ClientSession(server.connect("silent"), timeout=10).open(Hello("gradfree", fp, (2, 2), GF))
        t0 = time.monotonic()
        stop.set()
        if abort_now:
            abort.set()
        serving.join(timeout=10)
        took = time.monotonic() - t0
        assert not serving.is_alive() and not app.sessions
        assert (took < 0.4) if abort_now else (0.4 <= took < 3.0), took


class _StopsAfter(InProcClientChannel):
    """An in-process channel whose provider starts shutting down after ``n`` requests."""

    def __init__(self, app, n: int) -> None:
        super().__init__(app)
        self.n = n
        self.hellos = 0

    def send(self, frames) -> None:
        if decode([bytes(f) for f in frames]).type == MsgType.HELLO:
            self.hellos += 1
        self.n -= 1
        if self.n < 0:
            self.app.begin_shutdown()
        super().send(frames)


def test_tune_stops_at_once_with_a_readable_message_and_its_checkpoint_then_resumes(tmp_path):
    model = tiny_model("llama")
    opts = _opts(tmp_path, protocol="gradfree", steps=6, skip_eval=True, cache=False)
    opts.retries = 3  # would be used up (with back-off) on a dead provider
    channel = _StopsAfter(provider_app(model), 1 + 3)  # HELLO and 3 gradfree steps, then the operator presses Ctrl-C
    t0 = time.monotonic()
    with pytest.raises(TrainingInterrupted) as info:
        tune(opts, lambda: channel, client=_client(model, opts))
    text = str(info.value)
    ckpt = tmp_path / "run-gradfree" / "checkpoint"
    assert "shutting down" in text and str(ckpt) in text and "--resume" in text and "step 3" in text
    assert channel.hellos == 1 and time.monotonic() - t0 < 30, "no reconnect attempts, no back-off sleeps"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 3
    assert info.value.exit_code == 4
    opts.resume = True
    s = tune(opts, lambda: InProcClientChannel(provider_app(model)), client=_client(model, opts))
    assert s["resumed_from"] == 3 and s["steps"] == 6


def test_tune_before_any_step_says_there_is_nothing_to_resume(tmp_path):
    model = tiny_model("llama")
    opts = _opts(tmp_path, protocol="gradfree", steps=2, skip_eval=True, cache=False)
    app = provider_app(model)
    app.begin_shutdown()
    with pytest.raises(TrainingInterrupted, match="no checkpoint"):
        tune(opts, lambda: InProcClientChannel(app), client=_client(model, opts))


def test_over_curve_zeromq_the_last_shutting_down_reply_reaches_the_client(tmp_path):
    """The ZeroMQ server must not drop the final replies when it closes right after the grace period."""
    from guardedp2p.crypto.keys import generate_keypair
    from guardedp2p.transport.zmq_client import ClientConfig, ZmqClientChannel
    from guardedp2p.transport.zmq_server import ServerConfig, ZmqServerChannel

    for name in ("provider", "alice"):
        generate_keypair(tmp_path, name)
    model = tiny_model("llama")
    app = provider_app(model, config=ProviderConfig(shutdown_grace_s=10.0))
    _, fp = client_parts(model, lora=False)
    server = ZmqServerChannel(
        ServerConfig(
            bind="tcp://127.0.0.1:*", secret_key_file=tmp_path / "provider.key_secret", allow=[tmp_path / "alice.key"]
        )
    )
    stop = threading.Event()

    def run() -> None:
        try:
            serve_forever(app, server, stop, poll_s=0.05)
        finally:
            server.close(linger_s=1.0)

    serving = threading.Thread(target=run, daemon=True)
    serving.start()
    channel = ZmqClientChannel.open(
        ClientConfig(
            connect=server.endpoint,
            provider_public_key=tmp_path / "provider.key",
            secret_key_file=tmp_path / "alice.key_secret",
        )
    )
    session = ClientSession(channel, timeout=10)
    session.open(Hello("gradfree", fp, (SPLIT.bottom_layers, SPLIT.top_layers), GF))
    stop.set()
    time.sleep(0.2)
    with pytest.raises(ProviderShuttingDown):
        session.ping()
    serving.join(timeout=10)
    assert not serving.is_alive()
    channel.close()
