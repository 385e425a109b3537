"""Serve loop: moves frames between a server channel and the sans-I/O :class:`ProviderApp`.

It never imports zmq (the channel does), so the same loop serves tests over any ServerChannel. The loop
wakes at least every ``poll_s`` to expire idle sessions.

Shutdown (Ctrl-C sets ``stop``): the loop finishes the messages it is handling, then, for up to
``config.shutdown_grace_s`` (ending early once no session is left, or when ``abort`` is set by a second
Ctrl-C), answers every request with ERROR "provider-shutting-down" (BYE is still acknowledged, HELLO is
refused) and closes each session it answers. So clients are told, rather than left to time out: they save
their checkpoint and say how to resume. A client that sends nothing during the grace period learns it from
its next request's timeout, as before.

Batching (issue #6): after a message arrives, the loop also takes the messages that are already waiting or
arrive within ``config.batch_wait_s``, up to ``config.max_batch``, and hands them to
:meth:`ProviderApp.handle_many`, which runs forward-only requests of several sessions in one trunk call.
It stops waiting as soon as every peer with an open session has a message in the batch (a client waits for
each reply, so nobody else is coming): a lone client never pays the wait, and two clients pay it only while
one of them is busy elsewhere.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger("guardedp2p.serve")


def serve_forever(
    app: Any,
    channel: Any,
    stop: threading.Event,
    *,
    poll_s: float = 0.5,
    max_messages: int | None = None,
    abort: threading.Event | None = None,
) -> int:
    """Serve until ``stop`` is set (then wind down, see the module docstring) or ``max_messages`` are handled.
    Returns the number of messages handled."""
    handled = 0
    while not stop.is_set():
        incoming = channel.recv(timeout=poll_s)
        if incoming is None:
            app.expire()
            continue
        limit = (
            app.config.max_batch if max_messages is None else max(1, min(app.config.max_batch, max_messages - handled))
        )
        batch = gather(channel, incoming, limit, app.config.batch_wait_s, app.active_peers())
        replies = app.handle_many([(m.peer, m.frames) for m in batch])
        for m, reply in zip(batch, replies):
            _reply(channel, m, reply)
        handled += len(batch)
        if max_messages is not None and handled >= max_messages:
            break
    if stop.is_set():
        handled += wind_down(app, channel, poll_s=poll_s, abort=abort)
    app.shutdown()
    return handled


def wind_down(app: Any, channel: Any, *, poll_s: float = 0.5, abort: threading.Event | None = None) -> int:
    """Tell clients that the provider is going away, for at most ``config.shutdown_grace_s`` seconds."""
    grace = app.config.shutdown_grace_s
    if grace <= 0 or not app.sessions:
        return 0
    app.begin_shutdown()
    deadline = time.monotonic() + grace
    handled = 0
    while app.sessions and not (abort is not None and abort.is_set()):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        incoming = channel.recv(timeout=min(poll_s, remaining))
        if incoming is None:
            continue
        _reply(channel, incoming, app.handle(incoming.peer, incoming.frames))
        handled += 1
    left = len(app.sessions)
    log.info("shutdown grace over: %s", f"{left} session(s) never heard from" if left else "every session was told")
    return handled


def _reply(channel: Any, incoming: Any, frames: Any) -> None:
    try:
        channel.send(incoming.route, frames)
    except Exception as exc:  # noqa: BLE001 - a vanished peer must not stop the provider
        log.warning("could not reply to %s: %s", incoming.peer[:12], exc)


def gather(
    channel: Any, first: Any, limit: int, wait_s: float, expected_peers: set[str] | frozenset[str] = frozenset()
) -> list[Any]:
    """``first`` plus what the channel delivers within ``wait_s``, up to ``limit`` messages in all.

    Messages already queued are always taken; the wait ends early once every peer in ``expected_peers`` has
    a message in the batch."""
    batch = [first]
    seen = {first.peer}
    now = time.monotonic()
    deadline = now if expected_peers <= seen else now + wait_s
    while len(batch) < limit:
        nxt = channel.recv(timeout=max(0.0, deadline - time.monotonic()))
        if nxt is None:
            break
        batch.append(nxt)
        seen.add(nxt.peer)
        if expected_peers <= seen:
            deadline = min(deadline, time.monotonic())
    return batch
