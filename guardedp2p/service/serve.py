"""Serve loop: moves frames between a server channel and the sans-I/O :class:`ProviderApp`.

It never imports zmq (the channel does), so the same loop serves tests over any ServerChannel. The loop
wakes at least every ``poll_s`` to expire idle sessions, and stops cleanly when ``stop`` is set (Ctrl-C),
telling nothing to clients explicitly: their next request gets an ERROR or times out and they checkpoint.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger("guardedp2p.serve")


def serve_forever(app: Any, channel: Any, stop: threading.Event, *, poll_s: float = 0.5, max_messages: int | None = None) -> int:
    """Serve until ``stop`` is set (or ``max_messages`` handled). Returns the number of messages handled."""
    handled = 0
    while not stop.is_set():
        incoming = channel.recv(timeout=poll_s)
        if incoming is None:
            app.expire()
            continue
        reply = app.handle(incoming.peer, incoming.frames)
        try:
            channel.send(incoming.route, reply)
        except Exception as exc:  # noqa: BLE001 - a vanished peer must not stop the provider
            log.warning("could not reply to %s: %s", incoming.peer[:12], exc)
        handled += 1
        if max_messages is not None and handled >= max_messages:
            break
    app.shutdown()
    return handled
