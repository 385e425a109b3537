"""Endpoint errors say what is wrong: scheme, port, host name, port in use (issue 21)."""

from __future__ import annotations

import errno

import pytest
import zmq

from guardedp2p.transport.endpoints import EndpointError, bind_error, check_endpoint
from guardedp2p.transport.zmq_server import ServerConfig, ZmqServerChannel


@pytest.mark.parametrize(
    ("endpoint", "role", "needle"),
    [
        ("0.0.0.0:5556", "bind", "did you mean tcp://0.0.0.0:5556"),
        ("http://host:5555", "connect", "no supported scheme"),
        ("tcp://127.0.0.1", "connect", "has no port"),
        ("tcp://127.0.0.1:abc", "connect", "is not a number"),
        ("tcp://127.0.0.1:70000", "bind", "outside 1-65535"),
        ("", "connect", "is empty"),
    ],
)
def test_malformed_endpoints_name_the_problem(endpoint: str, role: str, needle: str) -> None:
    with pytest.raises(EndpointError, match=needle):
        check_endpoint(endpoint, role)  # type: ignore[arg-type]


def test_good_endpoints_pass() -> None:
    assert check_endpoint("tcp://127.0.0.1:5555", "connect", resolve=True) == "tcp://127.0.0.1:5555"
    assert check_endpoint("tcp://0.0.0.0:*", "bind") == "tcp://0.0.0.0:*"
    assert check_endpoint("ipc:///tmp/x.sock", "bind") == "ipc:///tmp/x.sock"


def test_unresolvable_host_is_a_dns_error() -> None:
    with pytest.raises(EndpointError, match="does not resolve"):
        check_endpoint("tcp://no-such-host.invalid:5555", "connect", resolve=True)


def test_bind_errors_by_cause() -> None:
    assert "already in use" in str(bind_error("tcp://0.0.0.0:1", errno.EADDRINUSE, "x"))
    assert "not one of this machine's" in str(bind_error("tcp://10.9.9.9:1", errno.EADDRNOTAVAIL, "x"))


def test_server_refuses_a_bind_without_scheme_before_creating_a_socket() -> None:
    with pytest.raises(EndpointError, match="did you mean tcp://0.0.0.0:5556"):
        ZmqServerChannel(ServerConfig(bind="0.0.0.0:5556", insecure=True))


def test_port_in_use_is_reported_as_such() -> None:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.ROUTER)
    try:
        port = s.bind_to_random_port("tcp://127.0.0.1")
        with pytest.raises(Exception, match="already in use"):
            ZmqServerChannel(ServerConfig(bind=f"tcp://127.0.0.1:{port}", insecure=True))
    finally:
        s.close(linger=0)
