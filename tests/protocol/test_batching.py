"""Provider-side batching of forward-only requests (issue #6): one trunk call for several gradfree clients, the
same outputs as one call each, and per-session isolation of data, errors and replay checks."""

from __future__ import annotations

import threading

import pytest
import torch

from guardedp2p.designs.online.client import RemoteTrunk
from guardedp2p.errors import ConfigError
from guardedp2p.protocol.client import ClientSession
from guardedp2p.protocol.provider import ProviderApp, ProviderConfig
from guardedp2p.service.serve import serve_forever
from guardedp2p.transport.inproc import InProcServerChannel
from guardedp2p.wire.framing import Message, decode, encode
from guardedp2p.wire.handshake import Hello
from guardedp2p.wire.messages import MsgType
from tests.protocol_helpers import SPLIT, client_parts, open_session, provider_app
from tests.tiny_models import tiny_model

GF = {"up": "fp32", "down": "fp32"}
FP32 = {d: "fp32" for d in ("up", "down", "grad_up", "grad_down")}


class CountingTrunk(torch.nn.Module):
    """Wraps the provider's trunk to count its calls (and optionally fail on large batches)."""

    def __init__(self, inner: torch.nn.Module, *, fail_above_rows: int | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.rows: list[int] = []
        self.fail_above_rows = fail_above_rows

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.rows.append(int(h.shape[0]))
        if self.fail_above_rows is not None and h.shape[0] > self.fail_above_rows:
            raise RuntimeError("simulated out of memory")
        return self.inner(h, mask)


def _app(
    model, *, config: ProviderConfig | None = None, fail_above_rows: int | None = None
) -> tuple[ProviderApp, CountingTrunk]:
    app = provider_app(model, config=config)
    assert app.resources.trunk is not None
    counting = CountingTrunk(app.resources.trunk, fail_above_rows=fail_above_rows)
    app.resources.trunk = counting  # sessions opened from now on use it
    return app, counting


def _inputs(hidden: int, *, seed: int, b: int, length: int, pads: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, length, hidden, generator=g)
    mask = torch.ones(b, length, dtype=torch.int8)
    for row in range(1, b):
        mask[row, max(1, length - pads * row) :] = 0
    return h, mask


def _act_up(sid: str, step: int, h: torch.Tensor, mask: torch.Tensor, *, train: bool = False) -> list:
    return encode(
        Message(
            MsgType.ACT_UP,
            session=sid,
            step=step,
            meta={"train": train},
            tensors={"h": h, "mask": mask},
            codecs={"h": "fp32"},
        )
    )


def _reference(model, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The trunk output for one request on its own (a fresh provider: the per-request path)."""
    app = provider_app(model)
    assert app.resources.trunk is not None
    return app.resources.trunk(h, mask.to(torch.long)).detach()


def _sessions(app: ProviderApp, fp: str, n: int, protocol: str = "gradfree") -> list[ClientSession]:
    return [open_session(app, fp, protocol=protocol, peer=f"inproc:client{i}") for i in range(n)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2"])
def test_batched_outputs_equal_per_request_outputs_and_the_trunk_runs_once(arch):
    model = tiny_model(arch)
    app, trunk = _app(model)
    _, fp = client_parts(model, lora=False)
    hidden = model.config.hidden_size
    sessions = _sessions(app, fp, 4)
    # different batch sizes, lengths and padding: the batch is padded along the sequence to the longest
    shapes = [(2, 9, 2), (1, 5, 0), (3, 12, 3), (2, 7, 1)]
    inputs = [_inputs(hidden, seed=i, b=b, length=n, pads=p) for i, (b, n, p) in enumerate(shapes)]
    items = [(s.channel.peer, _act_up(s.sid, 1, h, m)) for s, (h, m) in zip(sessions, inputs)]
    replies = [decode(r) for r in app.handle_many(items)]
    assert trunk.calls == 1 and trunk.rows == [8]
    assert app.stats["batched_calls"] == 1 and app.stats["batched_requests"] == 4
    for s, (h, m), reply in zip(sessions, inputs, replies):
        assert reply.type == MsgType.ACT_DOWN and reply.session == s.sid and reply.step == 1
        assert "batched" not in reply.meta  # a reply never tells a client that others were active
        out = reply.tensors["h"]
        assert out.shape == h.shape
        torch.testing.assert_close(out, _reference(model, h, m), rtol=1e-5, atol=1e-5)


def test_max_batch_bounds_the_calls_and_one_disables_batching():
    model = tiny_model("llama")
    _, fp = client_parts(model, lora=False)
    for max_batch, calls in ((8, 1), (2, 3), (1, 5)):
        app, trunk = _app(model, config=ProviderConfig(max_batch=max_batch))
        sessions = _sessions(app, fp, 5)
        items = [
            (s.channel.peer, _act_up(s.sid, 1, *_inputs(model.config.hidden_size, seed=i, b=1, length=6)))
            for i, s in enumerate(sessions)
        ]
        replies = [decode(r) for r in app.handle_many(items)]
        assert all(r.type == MsgType.ACT_DOWN for r in replies)
        assert trunk.calls == calls, (max_batch, trunk.rows)


def test_token_limit_splits_a_batch_into_bounded_calls():
    model = tiny_model("llama")
    app, trunk = _app(model, config=ProviderConfig(max_tokens_per_step=40))
    _, fp = client_parts(model, lora=False)
    sessions = _sessions(app, fp, 4)
    inputs = [_inputs(model.config.hidden_size, seed=i, b=2, length=10) for i in range(4)]  # 20 tokens each
    replies = [
        decode(r)
        for r in app.handle_many([(s.channel.peer, _act_up(s.sid, 1, h, m)) for s, (h, m) in zip(sessions, inputs)])
    ]
    assert trunk.rows == [4, 4], "two requests (40 padded tokens) per call"
    for (h, m), reply in zip(inputs, replies):
        torch.testing.assert_close(reply.tensors["h"], _reference(model, h, m), rtol=1e-5, atol=1e-5)


def test_bad_or_replayed_messages_in_a_batch_get_their_error_and_the_others_succeed():
    model = tiny_model("llama")
    app, trunk = _app(model)
    _, fp = client_parts(model, lora=False)
    hidden = model.config.hidden_size
    a, b, c = _sessions(app, fp, 3)
    # b has already sent step 3
    decode(app.handle(b.channel.peer, _act_up(b.sid, 3, *_inputs(hidden, seed=9, b=1, length=4))))
    ha, ma = _inputs(hidden, seed=1, b=2, length=6, pads=2)
    hc, mc = _inputs(hidden, seed=2, b=1, length=8)
    nan = torch.full((1, 4, hidden), float("nan"))
    items = [
        (a.channel.peer, _act_up(a.sid, 1, ha, ma)),  # good
        (b.channel.peer, [b"\xc1"]),  # not msgpack
        (b.channel.peer, _act_up(b.sid, 2, *_inputs(hidden, seed=3, b=1, length=4))),  # replayed (2 <= 3)
        (c.channel.peer, _act_up(c.sid, 1, hc, mc)),  # good
        (c.channel.peer, _act_up(c.sid, 1, hc, mc)),  # the same step again, in the same batch
        (a.channel.peer, _act_up(a.sid, 2, nan, torch.ones(1, 4, dtype=torch.int8))),  # NaN
        (a.channel.peer, _act_up(a.sid, 3, torch.zeros(1, 4, 7), torch.ones(1, 4, dtype=torch.int8))),  # wrong width
        ("inproc:intruder", _act_up(a.sid, 9, ha, ma)),  # another key using a's session
        (a.channel.peer, _act_up("nope", 1, ha, ma)),  # unknown session
    ]
    replies = [decode(r) for r in app.handle_many(items)]
    codes = [r.meta.get("code") if r.type == MsgType.ERROR else r.type.value for r in replies]
    assert codes == [
        "ACT_DOWN",
        "malformed-header",
        "replayed-step",
        "ACT_DOWN",
        "replayed-step",
        "bad-activation",
        "bad-activation",
        "not-your-session",
        "unknown-session",
    ]
    assert trunk.calls == 1 + 1, "one call for b's earlier step, one shared by a and c"
    torch.testing.assert_close(replies[0].tensors["h"], _reference(model, ha, ma), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(replies[3].tensors["h"], _reference(model, hc, mc), rtol=1e-5, atol=1e-5)
    assert replies[4].session == c.sid and replies[4].step == 1
    # every client keeps working afterwards
    for i, s in enumerate((a, b, c)):
        remote = RemoteTrunk(s, GF, gradients=False)
        remote.step = 10
        h, m = _inputs(hidden, seed=20 + i, b=1, length=5)
        torch.testing.assert_close(remote(h, m, train=False), _reference(model, h, m), rtol=1e-5, atol=1e-5)


def test_sessions_never_see_each_others_outputs():
    model = tiny_model("llama")
    app, _ = _app(model)
    _, fp = client_parts(model, lora=False)
    hidden = model.config.hidden_size
    sessions = _sessions(app, fp, 3)
    # same shapes, different data: a mix-up of rows would go unnoticed by shape checks
    inputs = [_inputs(hidden, seed=100 + i, b=2, length=6) for i in range(3)]
    items = [(s.channel.peer, _act_up(s.sid, 1, h, m)) for s, (h, m) in zip(sessions, inputs)]
    replies = [decode(r) for r in app.handle_many(list(reversed(items)))][::-1]
    refs = [_reference(model, h, m) for h, m in inputs]
    for i, (s, reply) in enumerate(zip(sessions, replies)):
        assert reply.session == s.sid
        torch.testing.assert_close(reply.tensors["h"], refs[i], rtol=1e-5, atol=1e-5)
        for j, ref in enumerate(refs):
            if j != i:
                assert not torch.allclose(reply.tensors["h"], ref, atol=1e-3)


def test_recorder_still_records_per_session():
    class Recorder:
        def __init__(self) -> None:
            self.seen: list[tuple[str, int, tuple[int, ...]]] = []

        def record(self, sid, step, kind, tensors, meta=None):
            self.seen.append((sid, step, tuple(tensors["h2"].shape)))

    model = tiny_model("llama")
    rec = Recorder()
    app = provider_app(model, recorder=rec)
    _, fp = client_parts(model, lora=False)
    sessions = _sessions(app, fp, 2)
    shapes = [(1, 5), (2, 9)]
    items = [
        (s.channel.peer, _act_up(s.sid, 4, *_inputs(model.config.hidden_size, seed=i, b=b, length=n)))
        for i, (s, (b, n)) in enumerate(zip(sessions, shapes))
    ]
    app.handle_many(items)
    hidden = model.config.hidden_size
    assert rec.seen == [(sessions[0].sid, 4, (1, 5, hidden)), (sessions[1].sid, 4, (2, 9, hidden))]


def test_online_training_steps_stay_per_request_and_keep_their_graph():
    model = tiny_model("llama")
    app, trunk = _app(model)
    _, fp = client_parts(model, lora=False)
    hidden = model.config.hidden_size
    online = open_session(app, fp, protocol="online", peer="inproc:online")
    gradfree = _sessions(app, fp, 2)
    ho, mo = _inputs(hidden, seed=5, b=1, length=6)
    items = [(online.channel.peer, _act_up(online.sid, 1, ho, mo, train=True))]
    items += [
        (s.channel.peer, _act_up(s.sid, 1, *_inputs(hidden, seed=i, b=1, length=4))) for i, s in enumerate(gradfree)
    ]
    replies = [decode(r) for r in app.handle_many(items)]
    assert [r.type for r in replies] == [MsgType.ACT_DOWN] * 3
    assert trunk.rows == [1, 2], "the training step alone (with its graph), the gradfree pair together"
    handler = app.sessions[online.sid].handler
    assert 1 in handler.pending
    grad = encode(
        Message(
            MsgType.GRAD_UP, session=online.sid, step=1, tensors={"g": torch.ones(1, 6, hidden)}, codecs={"g": "fp32"}
        )
    )
    assert decode(app.handle(online.channel.peer, grad)).type == MsgType.GRAD_DOWN


def test_a_failing_batched_call_is_retried_one_by_one():
    model = tiny_model("llama")
    app, trunk = _app(model, fail_above_rows=1)
    _, fp = client_parts(model, lora=False)
    sessions = _sessions(app, fp, 3)
    inputs = [_inputs(model.config.hidden_size, seed=i, b=1, length=5) for i in range(3)]
    replies = [
        decode(r)
        for r in app.handle_many([(s.channel.peer, _act_up(s.sid, 1, h, m)) for s, (h, m) in zip(sessions, inputs)])
    ]
    assert trunk.rows == [3, 1, 1, 1]
    for (h, m), reply in zip(inputs, replies):
        assert reply.type == MsgType.ACT_DOWN
        torch.testing.assert_close(reply.tensors["h"], _reference(model, h, m), rtol=1e-5, atol=1e-5)


def test_bye_after_a_deferred_request_of_the_same_peer_is_answered_in_order():
    model = tiny_model("llama")
    app, trunk = _app(model)
    _, fp = client_parts(model, lora=False)
    a, b = _sessions(app, fp, 2)
    items = [
        (a.channel.peer, _act_up(a.sid, 1, *_inputs(model.config.hidden_size, seed=0, b=1, length=4))),
        (b.channel.peer, _act_up(b.sid, 1, *_inputs(model.config.hidden_size, seed=1, b=1, length=4))),
        (a.channel.peer, encode(Message(MsgType.BYE, session=a.sid, step=2))),
    ]
    replies = [decode(r) for r in app.handle_many(items)]
    assert [r.type for r in replies] == [MsgType.ACT_DOWN, MsgType.ACT_DOWN, MsgType.BYE_ACK]
    assert a.sid not in app.sessions and b.sid in app.sessions


def test_config_refuses_unusable_batch_settings():
    with pytest.raises(ConfigError, match="max_batch"):
        ProviderConfig(max_batch=0)
    with pytest.raises(ConfigError, match="batch_wait_s"):
        ProviderConfig(batch_wait_s=-1.0)


def test_serve_loop_batches_concurrent_clients_end_to_end():
    """The real serve loop over the in-process server channel, four client threads, each its own data."""
    model = tiny_model("llama")
    n_clients, rounds = 4, 5
    app, trunk = _app(model, config=ProviderConfig(max_batch=n_clients, batch_wait_s=0.5))
    _, fp = client_parts(model, lora=False)
    hidden = model.config.hidden_size
    server = InProcServerChannel()
    stop = threading.Event()
    serving = threading.Thread(target=serve_forever, args=(app, server, stop), kwargs={"poll_s": 0.05}, daemon=True)
    serving.start()
    inputs = [
        [_inputs(hidden, seed=10 * i + r, b=2, length=4 + i + r, pads=1) for r in range(rounds)]
        for i in range(n_clients)
    ]
    outputs: list[list[torch.Tensor]] = [[] for _ in range(n_clients)]
    errors: list[BaseException] = []
    opened = threading.Barrier(n_clients)

    def client(i: int) -> None:
        try:
            session = ClientSession(server.connect(f"client{i}"), timeout=30)
            session.open(Hello("gradfree", fp, (SPLIT.bottom_layers, SPLIT.top_layers), GF))
            remote = RemoteTrunk(session, GF, gradients=False)
            opened.wait(timeout=30)
            for h, m in inputs[i]:
                outputs[i].append(remote(h, m, train=False))
            session.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    stop.set()
    serving.join(timeout=10)
    assert not errors, errors
    for i in range(n_clients):
        assert len(outputs[i]) == rounds
        for (h, m), out in zip(inputs[i], outputs[i]):
            torch.testing.assert_close(out, _reference(model, h, m), rtol=1e-5, atol=1e-5)
    assert app.stats["batched_calls"] >= 1, "concurrent clients should have shared trunk calls"
    assert trunk.calls < n_clients * rounds
    assert not app.sessions, "every client said BYE"


def test_gather_takes_queued_messages_and_stops_waiting_once_every_active_peer_is_in():
    import time

    from guardedp2p.service.serve import gather

    server = InProcServerChannel()
    a, b = server.connect("a"), server.connect("b")
    for ch in (a, b, a):
        ch.send([b"x"])
    first = server.recv(timeout=1)
    t0 = time.monotonic()
    got = gather(server, first, limit=8, wait_s=5.0, expected_peers={"a", "b"})
    assert [m.peer for m in got] == ["a", "b", "a"] and time.monotonic() - t0 < 1.0, "no wait once a and b are in"
    a.send([b"y"])
    first = server.recv(timeout=1)
    t0 = time.monotonic()
    got = gather(server, first, limit=8, wait_s=0.2, expected_peers={"a", "b"})
    assert len(got) == 1 and time.monotonic() - t0 >= 0.19, "waits for b up to wait_s"
    for _ in range(5):
        a.send([b"z"])
    first = server.recv(timeout=1)
    assert len(gather(server, first, limit=3, wait_s=0.0)) == 3, "never more than limit"
