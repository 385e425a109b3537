"""Endpoint strings (``tcp://HOST:PORT``, ``ipc://PATH``): checked before a socket exists, with errors that say
what is wrong (scheme, host name, port, port in use) instead of libzmq's bare "Invalid argument".
"""

from __future__ import annotations

import errno
import socket
from typing import Literal

from guardedp2p.errors import ConfigError, TransportError

Role = Literal["bind", "connect"]
SCHEMES = ("tcp://", "ipc://", "inproc://")


class EndpointError(ConfigError):
    """An endpoint string is malformed or names a host or port that cannot be used."""


def check_endpoint(endpoint: str, role: Role, *, resolve: bool = False) -> str:
    """Return ``endpoint`` if it is usable for ``role``; raise :class:`EndpointError` saying what to fix.

    ``resolve=True`` (clients) looks the host name up, so a typo fails here as a DNS error, not as a timeout.
    """
    flag = "--bind" if role == "bind" else "--connect"
    example = "tcp://0.0.0.0:5555" if role == "bind" else "tcp://10.0.0.5:5555"
    if not isinstance(endpoint, str) or not endpoint:
        raise EndpointError(f"{flag} is empty: give an address such as {example}.")
    if not endpoint.startswith(SCHEMES):
        hint = f" (did you mean tcp://{endpoint}?)" if "://" not in endpoint else ""
        raise EndpointError(
            f"{flag} {endpoint!r} has no supported scheme{hint}: use tcp://HOST:PORT (e.g. {example}) or ipc://PATH."
        )
    if not endpoint.startswith("tcp://"):
        return endpoint
    rest = endpoint[len("tcp://") :]
    host, sep, port_text = rest.rpartition(":")
    if not sep or not host:
        raise EndpointError(f"{flag} {endpoint!r} has no port: use tcp://HOST:PORT (e.g. {example}).")
    if not port_text.isdigit() and not (role == "bind" and port_text == "*"):
        raise EndpointError(f"{flag} {endpoint!r}: port {port_text!r} is not a number (1-65535).")
    if port_text.isdigit() and not 0 < int(port_text) < 65536:
        raise EndpointError(f"{flag} {endpoint!r}: port {port_text} is outside 1-65535.")
    if resolve and host not in ("*",):
        name = host.strip("[]")
        try:
            socket.getaddrinfo(name, None)
        except OSError:
            raise EndpointError(
                f"{flag} {endpoint!r}: the host name {name!r} does not resolve (DNS); check the spelling or use an IP "
                "address."
            ) from None
    return endpoint


def bind_error(endpoint: str, exc_errno: int | None, strerror: str) -> TransportError:
    """The readable error for a failed bind, by cause."""
    if exc_errno == errno.EADDRINUSE:
        why = "the port is already in use: stop the process using it or pick another port"
    elif exc_errno == errno.EADDRNOTAVAIL:
        why = "that address is not one of this machine's: use 0.0.0.0 (all interfaces) or one of its IPs"
    elif exc_errno in (errno.EACCES, errno.EPERM):
        why = "permission denied: ports below 1024 need privileges, pick a port above 1024"
    else:
        why = f"{strerror}; check the address (e.g. tcp://0.0.0.0:5555)"
    return TransportError(f"Cannot listen on {endpoint}: {why}.")
