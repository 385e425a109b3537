"""Serve loop: moves frames between a server channel and the sans-I/O :class:`ProviderApp`.

It never imports zmq (the channel does), so the same loop serves tests over any ServerChannel.

Two threads (issue 20). The **receive thread** (the caller of :func:`serve_forever`) reads every message, runs
:meth:`ProviderApp.triage` on it (header only: checks, budgets, and the answers to PING, HELLO, BYE and every
refusal), sends replies and watches the connections. What needs compute goes to one **worker thread** through
per-client queues served round robin, so control messages are answered within milliseconds while another client's
long forward pass runs, and no client's queue of requests can starve another's. The worker batches: it takes the
next request of each client that has one (up to ``config.max_batch``; forward-only requests share one trunk call,
issue #6), waiting up to ``config.batch_wait_s`` for clients with an open session that have none yet.

Fairness under long work: a forward pass cannot be interrupted, but it can be paused between two transformer
blocks. The worker hooks the trunk's blocks and their attention and MLP parts (``forward_pre_hook``); once the running request has had
``preempt_after_s``, the hook runs a *smaller* queued request of another client right there (one at a time), then
lets the long one go on. So one client's 4096-token sequence delays another client's step by about one attention
or MLP of one block, not by the whole pass. (Backward passes are not split; their size is bounded by the kept-graph budgets.)

No client can stall or exhaust the loop (issue 20, SECURITY.md "Budgets"):

* replies are never sent blocking: a channel with ``try_send`` (ZeroMQ) says when a client's queue is full; the
  reply then waits in the loop's own per-client queue, capped in messages and bytes (``ServeConfig``);
* a client may have at most ``max_unanswered`` requests whose reply has not left (a client waits for each
  reply, so an honest one has one);
* over either cap the client is **cut off**: its queued replies and requests are dropped, its sessions closed, its
  connections closed (``channel.disconnect``), a line is logged once, and its messages are dropped for
  ``quarantine_s``;
* a connection that goes away (``channel.pop_disconnects``, the ZeroMQ socket monitor) frees the sessions last
  used over it at once, so a client that vanishes without BYE leaves no kept graph or staged upload behind;
* the allow-list is re-read every ``allow_poll_s`` when its files change and on ``reload`` (SIGHUP); a removed key's
  connections and sessions are closed at once.

Shutdown (Ctrl-C sets ``stop``): for up to ``config.shutdown_grace_s`` (ending early once no session is left, or
when ``abort`` is set by a second Ctrl-C) the loop answers every request with ERROR "provider-shutting-down" (BYE
is still acknowledged, HELLO is refused) and closes each session it answers, so clients are told rather than left
to time out. A computation still running is not waited for: its reply is dropped and the worker is a daemon.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from guardedp2p.errors import ConfigError
from guardedp2p.protocol.provider import ProviderApp, Work
from guardedp2p.transport.base import ChannelClosed, Frames, Incoming, ServerChannel, frames_nbytes

log = logging.getLogger("guardedp2p.serve")


@dataclass
class ServeConfig:
    """What the serve loop allows one client (key) before it cuts it off (``provider serve`` flags)."""

    max_unanswered: int = 8  # requests received whose reply has not left yet
    max_queued_replies: int = 8  # replies waiting in the loop because the client does not read them
    max_queued_reply_bytes: int = 64 << 20  # ... their bytes
    quarantine_s: float = 10.0  # after a cut-off, the client's messages are dropped this long
    allow_poll_s: float = 1.0  # how often the allow-list files are checked for changes
    preempt_after_s: float | None = 0.02  # a longer computation runs smaller ones between its blocks; None: never

    def __post_init__(self) -> None:
        for name in ("max_unanswered", "max_queued_replies", "max_queued_reply_bytes"):
            value = getattr(self, name)  # our own field names
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.quarantine_s < 0 or self.allow_poll_s <= 0:
            raise ConfigError("quarantine_s must be >= 0 and allow_poll_s > 0")


@runtime_checkable
class NonBlockingChannel(Protocol):
    """A server channel that can say "this client's queue is full" instead of blocking (ZeroMQ)."""

    def try_send(self, route: bytes, frames: Frames) -> bool: ...


@runtime_checkable
class Wakeable(Protocol):
    """A server channel whose waiting ``recv`` another thread can end at once (ZeroMQ)."""

    def wake(self) -> None: ...


@runtime_checkable
class ConnectionAware(Protocol):
    """A server channel that reports vanished connections and can close one (ZeroMQ)."""

    def pop_disconnects(self) -> list[tuple[str, bytes]]: ...

    def disconnect(self, route: bytes) -> bool: ...


@runtime_checkable
class ReloadableAllowList(Protocol):
    """A server channel with an allow-list that can be re-read (ZeroMQ with CURVE)."""

    def refresh_allow_list(self, force: bool = False) -> set[str]: ...


@dataclass
class _Job:
    work: Work
    route: bytes


@dataclass
class _Client:
    """The loop's bookkeeping for one peer (client key)."""

    routes: set[bytes] = field(default_factory=set)
    unanswered: int = 0
    queued_bytes: int = 0
    queued_replies: int = 0


class Server:
    """The receive thread's state and the worker thread: see the module docstring."""

    def __init__(
        self, app: ProviderApp, channel: ServerChannel, config: ServeConfig | None = None, *, poll_s: float = 0.5
    ) -> None:
        self.app = app
        self.channel = channel
        self.config = config or ServeConfig()
        # every ACCEPT tells the client this cap, so a pipelining client keeps under it (docs/wire.md section 5)
        app.announce_limit("max_unanswered", self.config.max_unanswered)
        self.poll_s = poll_s
        self.clients: dict[str, _Client] = {}
        self.outq: dict[bytes, deque[tuple[str, Frames, int]]] = {}
        self.quarantine: dict[str, float] = {}
        self.stats = {"cut_off": 0, "dropped_replies": 0, "disconnects": 0, "revoked": 0}
        self.handled = 0
        # shared with the worker, under _cv
        self._cv = threading.Condition()
        self._queues: dict[str, deque[_Job]] = {}
        self._rr: deque[str] = deque()  # peers with queued jobs, in round-robin order
        self._busy: set[str] = set()  # peers whose job the worker is computing
        self._done: deque[tuple[_Job, Frames]] = deque()
        self._stopping = False
        # preemption between trunk blocks (worker thread only)
        self._job_started = 0.0
        self._job_tokens = 0
        self._nested = False
        self._hooks: list[Any] = []
        self._wakeable = isinstance(channel, Wakeable)
        self._worker = threading.Thread(target=self._work, name="guardedp2p-worker", daemon=True)
        self._install_preemption()
        self._worker.start()
        self._next_allow_check = time.monotonic() + self.config.allow_poll_s
        self._next_expire = time.monotonic() + poll_s

    # ------------------------------------------------------------------ receive thread
    def step(self, timeout: float) -> None:
        """One turn of the receive thread: receive (up to ``timeout``), send what is ready, housekeeping."""
        incoming = self.channel.recv(timeout=timeout)
        if incoming is not None:
            self._receive(incoming)
        self._collect()
        self._flush()
        self._housekeeping()

    def busy(self) -> bool:
        with self._cv:
            work = bool(self._rr or self._busy or self._done)
        return work or any(self.outq.values())

    def tick(self) -> float:
        """How long the next receive may wait. A wakeable channel is woken by the worker when a reply is ready,
        so the receive thread sleeps (polling every 2 ms cost a busy provider half again its CPU: the receive thread
        kept taking the GIL from the worker); only replies a client does not read are retried every 20 ms. Other
        channels are polled every 2 ms while anything is outstanding."""
        if self._wakeable:
            return 0.02 if any(self.outq.values()) else min(self.poll_s, 0.05)
        return 0.002 if self.busy() else min(self.poll_s, 0.05)

    def _wake(self) -> None:
        if isinstance(self.channel, Wakeable):
            self.channel.wake()

    def _receive(self, m: Incoming) -> None:
        peer, route = m.peer, m.route
        until = self.quarantine.get(peer)
        if until is not None:
            if time.monotonic() < until:
                self._close_route(route)
                return
            del self.quarantine[peer]
        client = self.clients.setdefault(peer, _Client())
        client.routes.add(route)
        client.unanswered += 1
        if client.unanswered > self.config.max_unanswered:
            self.cut_off(peer, f"more than {self.config.max_unanswered} requests without reading the replies")
            return
        with self._cv:
            immediate = peer not in self._busy and not self._queues.get(peer)
        out = self.app.triage(peer, m.frames, route, immediate=immediate)
        if isinstance(out, Work):
            with self._cv:
                q = self._queues.setdefault(peer, deque())
                if not q and peer not in self._rr:
                    self._rr.append(peer)
                q.append(_Job(out, route))
                self._cv.notify_all()
        else:
            self._queue_reply(peer, route, out)

    def _collect(self) -> None:
        while True:
            with self._cv:
                if not self._done:
                    return
                job, reply = self._done.popleft()
            self._queue_reply(job.work.peer, job.route, reply)

    def _queue_reply(self, peer: str, route: bytes, frames: Frames) -> None:
        self.handled += 1
        client = self.clients.get(peer)
        if client is None:  # cut off meanwhile
            return
        nbytes = frames_nbytes(frames)
        self.outq.setdefault(route, deque()).append((peer, frames, nbytes))
        client.queued_bytes += nbytes
        client.queued_replies += 1
        self._flush_route(route)
        if client.queued_replies > self.config.max_queued_replies:
            self.cut_off(peer, f"more than {self.config.max_queued_replies} replies waiting for it to read")
        elif client.queued_bytes > self.config.max_queued_reply_bytes:
            self.cut_off(
                peer,
                f"more than {self.config.max_queued_reply_bytes / 2**20:.0f} MiB of replies waiting for it to read",
            )

    def _flush(self) -> None:
        for route in [r for r, q in self.outq.items() if q]:
            self._flush_route(route)

    def _flush_route(self, route: bytes) -> None:
        q = self.outq.get(route)
        while q:
            peer, frames, nbytes = q[0]
            try:
                if isinstance(self.channel, NonBlockingChannel):
                    if not self.channel.try_send(route, frames):
                        return  # the client is not reading: keep it queued (capped in _queue_reply)
                else:
                    self.channel.send(route, frames)
            except ChannelClosed:
                log.info("client %s is gone; %d queued repl(ies) dropped", _short(peer), len(q))
                self._drop_route_queue(route)
                return
            except Exception as exc:  # noqa: BLE001 - a vanished peer must not stop the provider
                log.warning("could not reply to %s: %s", _short(peer), exc)
                self.stats["dropped_replies"] += 1
            q.popleft()
            client = self.clients.get(peer)
            if client is not None:
                client.queued_bytes -= nbytes
                client.queued_replies -= 1
                client.unanswered = max(0, client.unanswered - 1)
        self.outq.pop(route, None)

    def _drop_route_queue(self, route: bytes) -> None:
        for peer, _, nbytes in self.outq.pop(route, deque()):
            self.stats["dropped_replies"] += 1
            client = self.clients.get(peer)
            if client is not None:
                client.queued_bytes -= nbytes
                client.queued_replies -= 1
                client.unanswered = max(0, client.unanswered - 1)

    def cut_off(self, peer: str, reason: str) -> None:
        """Drop everything of a client that broke a cap, close its sessions and connections, quarantine it."""
        self.stats["cut_off"] += 1
        client = self.clients.pop(peer, None)
        routes = client.routes if client is not None else set()
        with self._cv:
            dropped = len(self._queues.pop(peer, ()))
            if peer in self._rr:
                self._rr.remove(peer)
        for route in routes:
            self._drop_route_queue(route)
            self._close_route(route)
        sessions = self.app.drop_peer(peer, f"cut off: {reason}")
        self.quarantine[peer] = time.monotonic() + self.config.quarantine_s
        log.warning(
            "cut off client %s: %s (%d session(s) closed, %d queued request(s) dropped; its messages are ignored "
            "for %g s)",
            _short(peer),
            reason,
            sessions,
            dropped,
            self.config.quarantine_s,
        )

    def _close_route(self, route: bytes) -> None:
        if isinstance(self.channel, ConnectionAware):
            self.channel.disconnect(route)

    def _housekeeping(self, reload: bool = False) -> None:
        now = time.monotonic()
        if isinstance(self.channel, ConnectionAware):
            for peer, route in self.channel.pop_disconnects():
                self._on_disconnect(peer, route)
        if reload or now >= self._next_allow_check:
            self._next_allow_check = now + self.config.allow_poll_s
            if isinstance(self.channel, ReloadableAllowList):
                for key in self.channel.refresh_allow_list(force=reload):
                    self.stats["revoked"] += 1
                    self._forget(key)
                    n = self.app.drop_peer(key, "client key revoked")
                    log.warning("client key %s revoked: %d session(s) closed", _short(key), n)
        if now >= self._next_expire:
            self._next_expire = now + self.poll_s
            self.app.expire()
            for peer in [p for p, t in self.quarantine.items() if t <= now]:
                del self.quarantine[peer]

    def reload(self) -> None:
        """Re-read the allow-list now (SIGHUP)."""
        self._housekeeping(reload=True)

    def _on_disconnect(self, peer: str, route: bytes) -> None:
        self.stats["disconnects"] += 1
        self._drop_route_queue(route)
        with self._cv:
            q = self._queues.get(peer)
            if q:
                kept = deque(j for j in q if j.route != route)
                self._queues[peer] = kept
                if not kept and peer in self._rr:
                    self._rr.remove(peer)
        client = self.clients.get(peer)
        if client is not None:
            client.routes.discard(route)
            if not client.routes:
                self.clients.pop(peer, None)
        n = self.app.drop_connection(route, "client disconnected")
        if n:
            log.info("client %s disconnected: %d session(s) freed", _short(peer), n)

    def _forget(self, peer: str) -> None:
        client = self.clients.pop(peer, None)
        with self._cv:
            self._queues.pop(peer, None)
            if peer in self._rr:
                self._rr.remove(peer)
        for route in client.routes if client is not None else ():
            self._drop_route_queue(route)

    # ------------------------------------------------------------------ worker thread
    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._rr and not self._stopping:
                    self._cv.wait(timeout=0.5)
                if self._stopping:
                    return
                jobs = self._take_batch()
            self._job_started = time.perf_counter()
            self._job_tokens = max(j.work.tokens for j in jobs) if jobs else 0
            replies: Sequence[Frames | None]
            try:
                replies = self.app.run([j.work for j in jobs])
            except Exception:  # noqa: BLE001 - run answers errors itself; this is a last resort
                log.exception("the worker failed on %d request(s)", len(jobs))
                replies = [None] * len(jobs)
            with self._cv:
                for job, reply in zip(jobs, replies):
                    self._busy.discard(job.work.peer)
                    if reply is not None:
                        self._done.append((job, reply))
            self._wake()

    def _take_batch(self) -> list[_Job]:
        """Under ``_cv``: the next request of each client that has one, round robin, up to ``max_batch``; waits
        up to ``batch_wait_s`` for active clients that have none queued yet."""
        limit = max(1, self.app.config.max_batch)
        wait = self.app.config.batch_wait_s
        if limit > 1 and wait > 0:
            deadline = time.monotonic() + wait
            while not self._stopping:
                expected = self.app.active_peers() - self._busy
                if expected <= set(self._rr) or len(self._rr) >= limit:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cv.wait(timeout=remaining)
        jobs: list[_Job] = []
        again: list[str] = []
        while self._rr and len(jobs) < limit:
            peer = self._rr.popleft()
            q = self._queues.get(peer)
            if not q:
                continue
            jobs.append(q.popleft())
            self._busy.add(peer)
            if q:
                again.append(peer)  # one request per client per batch; its next one goes to the back
            else:
                self._queues.pop(peer, None)
        self._rr.extend(again)
        return jobs

    # ------------------------------------------------------------------ preemption between trunk blocks
    def _install_preemption(self) -> None:
        if self.config.preempt_after_s is None:
            return
        import torch

        trunk = self.app.resources.trunk
        blocks = getattr(trunk, "blocks", None)  # ProviderTrunk.blocks: constant name, the provider's own module
        if not isinstance(blocks, torch.nn.ModuleList):
            return
        for block in blocks:
            if isinstance(block, torch.nn.Identity):  # placeholders of the blocks the client holds
                continue
            # before the block and before each of its parts that holds weights (attention, MLP): a pause point
            # every few percent of a block's time
            for part in (block, *block.children()):
                if part is block or any(True for _ in part.parameters()):
                    self._hooks.append(part.register_forward_pre_hook(self._between_blocks))

    def _between_blocks(self, module: object, args: object) -> None:
        """Forward pre-hook of every trunk block: on the worker, inside a long computation, run one smaller request
        of another client now (see the module docstring)."""
        after = self.config.preempt_after_s
        if (
            after is None
            or self._nested
            or threading.current_thread() is not self._worker
            or time.perf_counter() - self._job_started < after
        ):
            return
        with self._cv:
            job = self._take_smaller(self._job_tokens)
        if job is None:
            return
        import torch

        self._nested = True
        try:
            with torch.inference_mode(False):  # the running pass may be forward-only; the nested one may train
                replies = self.app.run([job.work])
        except Exception:  # noqa: BLE001 - run answers errors itself; this is a last resort
            log.exception("a request run between two trunk blocks failed")
            replies = []
        finally:
            self._nested = False
        with self._cv:
            self._busy.discard(job.work.peer)
            for reply in replies[:1]:
                self._done.append((job, reply))
        self._wake()

    def _take_smaller(self, tokens: int) -> _Job | None:
        """Under ``_cv``: the next queued request (round robin) of a client not being served that is smaller than
        ``tokens``; it is taken out of its queue and its client marked busy."""
        for _ in range(len(self._rr)):
            peer = self._rr[0]
            self._rr.rotate(-1)
            q = self._queues.get(peer)
            if not q or peer in self._busy or q[0].work.tokens >= tokens:
                continue
            job = q.popleft()
            if not q:
                self._queues.pop(peer, None)
                self._rr.remove(peer)
            self._busy.add(peer)
            return job
        return None

    def stop_worker(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def computing(self) -> bool:
        with self._cv:
            return bool(self._busy)

    def cancel_queued(self) -> None:
        """Shutdown: answer every request still queued (not started) through triage, which now refuses it."""
        with self._cv:
            jobs = [j for q in self._queues.values() for j in q]
            self._queues.clear()
            self._rr.clear()
        for job in jobs:
            self._queue_reply(job.work.peer, job.route, self.app.cancel(job.work))


def serve_forever(
    app: ProviderApp,
    channel: ServerChannel,
    stop: threading.Event,
    *,
    poll_s: float = 0.5,
    max_messages: int | None = None,
    abort: threading.Event | None = None,
    config: ServeConfig | None = None,
    reload: threading.Event | None = None,
    server_out: list[Server] | None = None,
) -> int:
    """Serve until ``stop`` is set (then wind down, see the module docstring) or ``max_messages`` are answered.
    ``reload`` (set by SIGHUP) re-reads the allow-list. Returns the number of messages answered."""
    server = Server(app, channel, config, poll_s=poll_s)
    if server_out is not None:
        server_out.append(server)
    try:
        while not stop.is_set():
            if reload is not None and reload.is_set():
                reload.clear()
                server.reload()
            server.step(server.tick())
            if max_messages is not None and server.handled >= max_messages and not server.busy():
                break
        if stop.is_set():
            _wind_down(server, abort)
    finally:
        server.stop_worker()
        app.shutdown()
    return server.handled


def _wind_down(server: Server, abort: threading.Event | None) -> None:
    """Tell clients that the provider is going away, for at most ``config.shutdown_grace_s`` seconds."""
    app = server.app
    grace = app.config.shutdown_grace_s
    if grace <= 0 or not (app.sessions or server.busy()):
        return
    app.begin_shutdown()
    server.cancel_queued()
    deadline = time.monotonic() + grace
    while not (abort is not None and abort.is_set()):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        if not app.sessions and not any(server.outq.values()):
            break
        server.step(min(server.tick(), remaining))
    left = len(app.sessions)
    if server.computing():
        log.info("shutdown: a computation still running is not waited for (its reply is dropped)")
    log.info("shutdown grace over: %s", f"{left} session(s) never heard from" if left else "every session was told")


def gather(
    channel: Any, first: Any, limit: int, wait_s: float, expected_peers: set[str] | frozenset[str] = frozenset()
) -> list[Any]:
    """``first`` plus what the channel delivers within ``wait_s``, up to ``limit`` messages in all.

    Messages already queued are always taken; the wait ends early once every peer in ``expected_peers`` has
    a message in the batch. (The serve loop now batches in its worker, ``Server._take_batch``; this helper
    stays for callers that batch straight from a channel.)"""
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


def _short(peer: str) -> str:
    return peer[:12] + "…" if len(peer) > 12 else peer


__all__ = ["ServeConfig", "Server", "serve_forever", "gather"]
