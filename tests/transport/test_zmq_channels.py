"""Real CURVE/ZAP over tcp://127.0.0.1: who may talk, how fast failures surface, and exact bytes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from guardedp2p.crypto.keys import generate_keypair, load_keypair, load_public_key
from guardedp2p.errors import ConfigError, TransportError
from guardedp2p.transport.base import (
    ChannelClosed,
    Incoming,
    MechanismMismatch,
    PeerRejected,
    PeerTimeout,
    ProviderKeyMismatch,
)
from guardedp2p.transport.zmq_client import ClientConfig, ZmqClientChannel
from guardedp2p.transport.zmq_server import InsecureTransportWarning, ServerConfig, ZmqServerChannel

FAST = 2.0  # every handshake failure must surface within this many seconds


@pytest.fixture(scope="module")
def keydir(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    for name in ("provider", "alice", "mallory", "other_provider"):
        generate_keypair(d, name)
    return d


@pytest.fixture
def server(keydir):
    srv = ZmqServerChannel(
        ServerConfig(
            bind="tcp://127.0.0.1:*", secret_key_file=keydir / "provider.key_secret", allow=[keydir / "alice.key"]
        )
    )
    yield srv
    srv.close()


def client_cfg(keydir, endpoint, who="alice", provider="provider", **kw) -> ClientConfig:
    return ClientConfig(
        connect=endpoint,
        provider_public_key=keydir / f"{provider}.key",
        secret_key_file=keydir / f"{who}.key_secret",
        **kw,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def round_trip(server: ZmqServerChannel, client: ZmqClientChannel, frames: list[bytes]) -> tuple[Incoming, list]:
    client.send(frames)
    msg = server.recv(timeout=5.0)
    assert msg is not None, "server heard nothing"
    server.send(msg.route, [bytes(f)[::-1] for f in msg.frames])
    reply = client.recv(timeout=5.0)
    return msg, reply


def assert_good_client_still_served(keydir, server):
    with ZmqClientChannel.open(client_cfg(keydir, server.endpoint)) as c:
        msg, reply = round_trip(server, c, [b"still there?"])
        assert msg.peer == load_public_key(keydir / "alice.key")
        assert bytes(reply[0]) == b"?ereht llits"


# --------------------------------------------------------------------------------------------------------------
# happy path
# --------------------------------------------------------------------------------------------------------------


def test_allowed_client_round_trips_exact_bytes(keydir, server):
    alice_pub, _ = load_keypair(keydir / "alice.key_secret")
    sizes = [0, 1, 1000, 65_537, 3 * 1024 * 1024 + 7]
    rng = __import__("random").Random(1234)
    with ZmqClientChannel.open(client_cfg(keydir, server.endpoint)) as c:
        assert c.connected
        expect_sent = 0
        for n in sizes:
            payload = rng.randbytes(n)
            header = f"size={n}".encode()
            msg, reply = round_trip(server, c, [header, memoryview(payload)])
            expect_sent += len(header) + n
            assert msg.peer == alice_pub  # the authenticated CURVE key, not a routing id
            assert msg.authenticated
            assert [bytes(f) for f in msg.frames] == [header, payload]
            assert [bytes(f) for f in reply] == [header[::-1], payload[::-1]]
        assert c.bytes_sent == expect_sent
        assert c.bytes_received == expect_sent
        assert server.bytes_received == expect_sent


def test_many_frames_and_received_buffers_are_writable(keydir, server):
    frames = [os.urandom(k) for k in (5, 0, 17, 300_000)]
    with ZmqClientChannel.open(client_cfg(keydir, server.endpoint)) as c:
        msg, _ = round_trip(server, c, frames)
        assert [bytes(f) for f in msg.frames] == frames
        big = msg.frames[3]
        assert isinstance(big, memoryview) and not big.readonly  # torch.frombuffer works without a copy


def test_two_clients_are_told_apart(keydir, server):
    server.allow(keydir / "mallory.key")
    with (
        ZmqClientChannel.open(client_cfg(keydir, server.endpoint)) as a,
        ZmqClientChannel.open(client_cfg(keydir, server.endpoint, who="mallory")) as m,
    ):
        a.send([b"from a"])
        m.send([b"from m"])
        got = {}
        for _ in range(2):
            inc = server.recv(5.0)
            got[bytes(inc.frames[0])] = inc
        assert got[b"from a"].peer == load_public_key(keydir / "alice.key")
        assert got[b"from m"].peer == load_public_key(keydir / "mallory.key")
        server.send(got[b"from m"].route, [b"for m"])
        server.send(got[b"from a"].route, [b"for a"])
        assert bytes(a.recv(5.0)[0]) == b"for a"
        assert bytes(m.recv(5.0)[0]) == b"for m"


def test_serving_thread_and_client_thread(keydir, server):
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            inc = server.recv(0.05)
            if inc is not None:
                server.send(inc.route, [b"ack", inc.frames[0]])

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with ZmqClientChannel.open(client_cfg(keydir, server.endpoint)) as c:
            for i in range(30):
                c.send([str(i).encode()])
                assert [bytes(f) for f in c.recv(5.0)] == [b"ack", str(i).encode()]
    finally:
        stop.set()
        t.join(5)
    assert not t.is_alive()


# --------------------------------------------------------------------------------------------------------------
# failures: fast, typed, actionable; the server keeps serving
# --------------------------------------------------------------------------------------------------------------


def test_unknown_client_key_is_rejected_fast(keydir, server):
    t0 = time.monotonic()
    with pytest.raises(PeerRejected) as ei:
        ZmqClientChannel.open(client_cfg(keydir, server.endpoint, who="mallory"))
    assert time.monotonic() - t0 < FAST
    text = str(ei.value)
    assert "refused this client's key" in text and "ZAP 400" in text
    assert "--allow" in text
    assert str(keydir / "mallory.key") in text  # tells the user which file to send
    assert server.endpoint in text
    assert_good_client_still_served(keydir, server)


def test_wrong_pinned_provider_key_fails_fast(keydir, server):
    t0 = time.monotonic()
    with pytest.raises(ProviderKeyMismatch) as ei:
        ZmqClientChannel.open(client_cfg(keydir, server.endpoint, provider="other_provider"))
    assert time.monotonic() - t0 < FAST
    text = str(ei.value)
    assert "does not match" in text and "--provider-key" in text
    assert load_public_key(keydir / "other_provider.key") in text
    assert "wrong server" in text
    assert_good_client_still_served(keydir, server)


def test_nobody_listening_times_out_within_default_handshake_timeout(keydir):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cfg = client_cfg(keydir, endpoint)
    assert cfg.handshake_timeout == 2.0
    t0 = time.monotonic()
    with pytest.raises(PeerTimeout) as ei:
        ZmqClientChannel.open(cfg)
    elapsed = time.monotonic() - t0
    assert 1.9 <= elapsed < 2.5
    assert f"No provider answered at {endpoint}" in str(ei.value)
    assert "provider is running" in str(ei.value)


def test_server_keeps_serving_after_a_timeout_elsewhere(keydir, server):
    with pytest.raises(PeerTimeout):
        ZmqClientChannel.open(client_cfg(keydir, f"tcp://127.0.0.1:{free_port()}", handshake_timeout=0.3))
    assert_good_client_still_served(keydir, server)


def test_failed_client_stops_reconnecting(keydir):
    """After ProviderKeyMismatch the socket is closed, so the server sees no retry storm."""
    spub, ssec = load_keypair(keydir / "provider.key_secret")
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.ROUTER)
        s.linger = 0
        s.curve_secretkey, s.curve_publickey, s.curve_server = ssec.encode(), spub.encode(), True
        addr = f"inproc://mon-{uuid.uuid4().hex}"
        s.monitor(addr, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        mon = ctx.socket(zmq.PAIR)
        mon.linger = 0
        mon.connect(addr)
        port = s.bind_to_random_port("tcp://127.0.0.1")
        ch = ZmqClientChannel(client_cfg(keydir, f"tcp://127.0.0.1:{port}", provider="other_provider"))
        with pytest.raises(ProviderKeyMismatch):
            ch.connect()
        time.sleep(0.6)  # libzmq would retry every 100 ms+ here if the socket were still open
        failures = 0
        while mon.poll(50):
            recv_monitor_message(mon)
            failures += 1
        ch.close()
        assert 1 <= failures <= 2, f"{failures} handshake attempts: the failed client kept reconnecting"
    finally:
        ctx.destroy(linger=0)


def test_runtime_allow_and_revoke(keydir, server):
    cfg = client_cfg(keydir, server.endpoint, who="mallory")
    with pytest.raises(PeerRejected):
        ZmqClientChannel.open(cfg)
    key = server.allow(keydir / "mallory.key")
    assert key in server.allowed
    with ZmqClientChannel.open(cfg) as c:
        msg, _ = round_trip(server, c, [b"hello"])
        assert msg.peer == key
    server.revoke(key)
    assert key not in server.allowed
    with pytest.raises(PeerRejected):
        ZmqClientChannel.open(cfg)


def test_recv_timeouts_never_block(keydir, server):
    t0 = time.monotonic()
    assert server.recv(timeout=0.2) is None
    assert 0.15 < time.monotonic() - t0 < 1.0
    with ZmqClientChannel.open(client_cfg(keydir, server.endpoint)) as c:
        t0 = time.monotonic()
        with pytest.raises(PeerTimeout, match="No reply from the provider"):
            c.recv(timeout=0.2)
        assert time.monotonic() - t0 < 1.0


def test_oversized_message_is_dropped_by_max_message_bytes(keydir):
    cfg = ServerConfig(
        bind="tcp://127.0.0.1:*",
        secret_key_file=keydir / "provider.key_secret",
        allow=[keydir / "alice.key"],
        max_message_bytes=4096,
    )
    with ZmqServerChannel(cfg) as srv, ZmqClientChannel.open(client_cfg(keydir, srv.endpoint)) as c:
        c.send([b"x" * 10_000])
        assert srv.recv(0.5) is None


def test_closed_channels_raise_and_close_is_idempotent(keydir, server):
    c = ZmqClientChannel.open(client_cfg(keydir, server.endpoint))
    c.close()
    c.close()
    with pytest.raises(ChannelClosed):
        c.send([b"x"])
    with pytest.raises(ChannelClosed):
        c.recv(0.1)
    server.close()
    server.close()
    with pytest.raises(ChannelClosed):
        server.recv(0.1)


def test_send_to_vanished_client_raises_channel_closed(keydir, server):
    with ZmqClientChannel.open(client_cfg(keydir, server.endpoint)) as c:
        c.send([b"hi"])
        route = server.recv(5.0).route
    time.sleep(0.2)
    with pytest.raises(ChannelClosed, match="disconnected"):
        server.send(route, [b"late"])
    assert_good_client_still_served(keydir, server)


# --------------------------------------------------------------------------------------------------------------
# insecure (plaintext) mode
# --------------------------------------------------------------------------------------------------------------


def test_insecure_works_when_both_sides_say_so(keydir, caplog):
    with pytest.warns(InsecureTransportWarning, match="PLAINTEXT"):
        srv = ZmqServerChannel(ServerConfig(bind="tcp://127.0.0.1:*", insecure=True))
    try:
        with pytest.warns(InsecureTransportWarning):
            c = ZmqClientChannel.open(ClientConfig(connect=srv.endpoint, insecure=True))
        with c:
            msg, reply = round_trip(srv, c, [b"plain", b"text"])
            assert msg.peer == "insecure:" + msg.route.hex()
            assert not msg.authenticated
            assert [bytes(f) for f in reply] == [b"nialp", b"txet"]
    finally:
        srv.close()
    assert "INSECURE TRANSPORT" in caplog.text


def test_plaintext_client_against_curve_server_fails_fast(keydir, server):
    t0 = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureTransportWarning)
        with pytest.raises(MechanismMismatch) as ei:
            ZmqClientChannel.open(ClientConfig(connect=server.endpoint, insecure=True))
    assert time.monotonic() - t0 < FAST
    assert "requires CURVE" in str(ei.value) and "Drop --insecure" in str(ei.value)
    assert_good_client_still_served(keydir, server)


def test_curve_client_against_insecure_server_fails_fast(keydir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureTransportWarning)
        srv = ZmqServerChannel(ServerConfig(bind="tcp://127.0.0.1:*", insecure=True))
    with srv:
        t0 = time.monotonic()
        # libzmq reports MECHANISM_MISMATCH, or under load sometimes only NO_DETAIL: both must be fast and say so
        with pytest.raises((MechanismMismatch, ProviderKeyMismatch), match="WITHOUT encryption|--insecure"):
            ZmqClientChannel.open(client_cfg(keydir, srv.endpoint))
        assert time.monotonic() - t0 < FAST


# --------------------------------------------------------------------------------------------------------------
# configuration and hygiene
# --------------------------------------------------------------------------------------------------------------


def test_missing_keys_are_config_errors(keydir):
    with pytest.raises(ConfigError, match="--provider-key"):
        ZmqClientChannel(ClientConfig(connect="tcp://127.0.0.1:5555", secret_key_file=keydir / "alice.key_secret"))
    with pytest.raises(ConfigError, match="secret key"):
        ZmqServerChannel(ServerConfig(bind="tcp://127.0.0.1:*"))
    with pytest.raises(ConfigError, match="tcp://HOST:PORT"):
        ZmqClientChannel(client_cfg(keydir, "127.0.0.1:5555"))


def test_bind_conflict_is_a_transport_error(keydir, server):
    with pytest.raises(TransportError, match="Cannot listen"):
        ZmqServerChannel(
            ServerConfig(
                bind=server.endpoint, secret_key_file=keydir / "provider.key_secret", allow=[keydir / "alice.key"]
            )
        )


def test_secrets_never_appear_in_repr_logs_or_errors(keydir, caplog):
    caplog.set_level("DEBUG")
    _, provider_secret = load_keypair(keydir / "provider.key_secret")
    _, alice_secret = load_keypair(keydir / "alice.key_secret")
    _, mallory_secret = load_keypair(keydir / "mallory.key_secret")
    scfg = ServerConfig(
        bind="tcp://127.0.0.1:*", keys=load_keypair(keydir / "provider.key_secret"), allow=[keydir / "alice.key"]
    )
    assert provider_secret not in repr(scfg)
    with ZmqServerChannel(scfg) as srv:
        ccfg = ClientConfig(
            connect=srv.endpoint,
            provider_public_key=keydir / "provider.key",
            keys=load_keypair(keydir / "alice.key_secret"),
        )
        assert alice_secret not in repr(ccfg)
        with ZmqClientChannel.open(ccfg) as c:
            round_trip(srv, c, [b"x"])
        with pytest.raises(PeerRejected) as ei:
            ZmqClientChannel.open(client_cfg(keydir, srv.endpoint, who="mallory"))
    for secret in (provider_secret, alice_secret, mallory_secret):
        assert secret not in caplog.text
        assert secret not in str(ei.value)


def test_protocol_layer_can_import_transport_without_zmq():
    code = "import sys, guardedp2p.transport as t; t.Incoming; t.PeerTimeout; assert 'zmq' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_provider_replaced_by_one_with_another_key_is_detected_mid_session(keydir):
    """A reconnect to a server holding a different key surfaces as ProviderKeyMismatch from recv, not a timeout."""

    def make(key_name, bind):
        return ZmqServerChannel(
            ServerConfig(bind=bind, secret_key_file=keydir / f"{key_name}.key_secret", allow=[keydir / "alice.key"])
        )

    first = make("provider", "tcp://127.0.0.1:*")
    endpoint = first.endpoint
    c = ZmqClientChannel.open(client_cfg(keydir, endpoint))
    try:
        round_trip(first, c, [b"one"])
        first.close()
        impostor = make("other_provider", endpoint)
        try:
            t0 = time.monotonic()
            with pytest.raises(ProviderKeyMismatch):
                c.recv(timeout=5.0)
            assert time.monotonic() - t0 < FAST
            with pytest.raises(ChannelClosed, match="fatal error"):
                c.send([b"two"])
            assert impostor.recv(0.2) is None
        finally:
            impostor.close()
    finally:
        c.close()


_KILLED_PROVIDER = """
import sys, time
from guardedp2p.transport.zmq_server import ServerConfig, ZmqServerChannel
srv = ZmqServerChannel(ServerConfig(bind="tcp://127.0.0.1:*", secret_key_file=sys.argv[1], allow=[sys.argv[2]]))
print(srv.endpoint, flush=True)
while srv.recv(60.0) is None:  # reads one request, never answers it, and waits to be killed
    pass
print("got it", flush=True)
time.sleep(120)
"""


def test_a_client_notices_at_once_that_its_provider_was_killed(keydir):
    """SIGKILL closes the provider's sockets: the client's socket sees the disconnect, so an awaited reply fails with
    PeerDisconnected at once instead of after the reply timeout (issue 20); a request sent after the drop is not
    given up for it."""
    from guardedp2p.transport.base import PeerDisconnected

    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_PROVIDER, str(keydir / "provider.key_secret"), str(keydir / "alice.key")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        endpoint = proc.stdout.readline().strip()
        with ZmqClientChannel.open(client_cfg(keydir, endpoint, handshake_timeout=30.0)) as c:
            c.send([b"question"])
            assert proc.stdout.readline().strip() == "got it"
            proc.kill()
            proc.wait(timeout=30)
            t0 = time.monotonic()
            with pytest.raises(PeerDisconnected, match="dropped while 1 reply was awaited"):
                c.recv(timeout=60.0)
            assert time.monotonic() - t0 < 5.0
            c.send([b"asked after the drop"])  # nobody listens: it waits out its timeout as before
            with pytest.raises(PeerTimeout):
                c.recv(timeout=0.5)
    finally:
        proc.kill()
        proc.wait(timeout=30)
