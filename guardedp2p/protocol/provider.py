"""The provider as a sans-I/O application: it consumes (peer, frames) and returns reply frames.

Drivers (the in-process channel in tests, the ZeroMQ serve loop in deployment) only move frames; all
session logic, validation and error handling live here, so both run the same code (the Flower idea). A bad
message from one peer becomes an ERROR reply to that peer and never an exception in the serve loop.

Batching (issue #6): :meth:`ProviderApp.handle_many` answers several messages that arrived together. Each is
decoded and checked exactly as :meth:`ProviderApp.handle` would; requests a session handler can *defer*
(forward-only trunk passes) are then computed in one call per group, and each session answers its own.

Per-client byte rate (issue #9): with ``max_bytes_per_s`` set, each peer (authenticated key) has its own token
bucket over the bytes it sends; a message over the limit is refused *before it is decoded* with ERROR
"rate-limited" and a ``retry_after_s`` hint, so a flooding client costs little and never slows another's
bucket. Shutdown: after :meth:`ProviderApp.begin_shutdown` every request but BYE is answered with ERROR
"provider-shutting-down" and its session is closed.

Two phases (issue 20): :meth:`ProviderApp.triage` runs on the driver's receive thread. It parses only the header
(:func:`guardedp2p.wire.framing.parse_header`), checks the session, the message type, the tensors' names, codecs,
dtypes and shapes and the budgets against what the session expects, and answers control messages (PING, HELLO,
BYE, every refusal) at once; what needs compute comes back as :class:`Work`, which :meth:`ProviderApp.run` decodes
and computes, on the driver's worker thread. So no tensor is decoded before its message is known to be wanted, and
one client's long computation never delays another client's PING. :meth:`handle` and :meth:`handle_many` are both
phases in one call (the in-process channel, tests). Every session handler call happens under ``work_lock``; the
receive thread only *tries* that lock, so freeing a session's state never waits for another client's compute
(it is done by the worker right after, see :meth:`ProviderApp.reap`).

Budgets (issue 20, SECURITY.md): tokens per step, decoded bytes per message, kept training graphs per key and in
total, by count and by bytes (measured from the tensors autograd saves). A request over a budget is refused with
ERROR ``over-budget`` before it is decoded or computed. A connection that goes away frees the sessions last used
over it (:meth:`ProviderApp.drop_connection`), a revoked key all of its sessions (:meth:`ProviderApp.drop_peer`).

Plugged trunks (issue 18): session factories get the peer, so a trunk session of a key listed in
``ProviderResources.peer_trunks`` runs that key's own trunk (its Offline adapters plugged in) and ACCEPT tells that
key, and no other, which bundle it carries (:class:`PeerTrunk`).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from guardedp2p.designs import DESIGNS
from guardedp2p.errors import ConfigError, GuardedP2PError, HandshakeRejected, ProtocolError, WireError
from guardedp2p.wire.codes import ErrorCode
from guardedp2p.wire.framing import (
    DEFAULT_LIMITS,
    Frame,
    Header,
    Message,
    MessageTooLarge,
    TensorSpec,
    WireLimits,
    decode_body,
    encode,
    error_message,
    parse_header,
)
from guardedp2p.wire.handshake import CODEC_DIRECTIONS, Hello, ProviderPolicy, negotiate
from guardedp2p.wire.messages import MsgType

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from torch import nn
    from transformers import PretrainedConfig

    from guardedp2p.designs.offline.plugin import VerifiedBundle

log = logging.getLogger("guardedp2p.provider")


class SessionOwnershipError(ProtocolError):
    code = ErrorCode.NOT_YOUR_SESSION


class UnknownSession(ProtocolError):
    code = ErrorCode.UNKNOWN_SESSION


class MessageNotAllowed(ProtocolError):
    code = ErrorCode.NOT_ALLOWED


class RateLimitExceeded(ProtocolError):
    """This peer sent more bytes than its share; it may send the same message again after ``retry_after_s``."""

    code = ErrorCode.RATE_LIMITED

    def __init__(self, message: str, retry_after_s: float, limit_bytes_per_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.limit_bytes_per_s = limit_bytes_per_s


class ShuttingDown(ProtocolError):
    code = ErrorCode.PROVIDER_SHUTTING_DOWN


class OverBudget(ProtocolError):
    """A request the provider will not take on: over a per-key or provider-wide budget (SECURITY.md)."""

    code = ErrorCode.OVER_BUDGET


class UnexpectedTensors(ProtocolError):
    """A message's tensors (names, dtypes, shapes) are not what its type and session expect (checked undecoded)."""

    code = ErrorCode.BAD_ACTIVATION


class UnexpectedCodec(ProtocolError):
    code = ErrorCode.CODEC_MISMATCH


class StaleStep(ProtocolError):
    code = ErrorCode.REPLAYED_STEP


class NoKeptGraph(ProtocolError):
    code = ErrorCode.NO_PENDING_STEP


REFUSAL_LOG_EVERY_S = 10.0
"""At most one "refused a message" log line per client key in this many seconds (the others are counted into it)."""


@dataclass
class TokenBucket:
    """Bytes a peer may send: refills at ``rate`` per second up to ``capacity``.

    A message is admitted when the bucket holds its size, or is full if the message is larger than the whole
    bucket (it then goes into debt, which later messages wait out): so no message size is refused for ever and
    the long-run rate still holds. A refused message takes nothing, so a client that waits the hinted time and
    sends it again gets through.
    """

    rate: float
    capacity: float
    tokens: float
    updated: float

    def take(self, nbytes: int, now: float) -> float:
        """Admit ``nbytes`` (returns 0.0) or return the seconds until they would be admitted."""
        self.tokens = min(self.capacity, self.tokens + max(0.0, now - self.updated) * self.rate)
        self.updated = now
        need = min(float(nbytes), self.capacity)
        if self.tokens >= need:
            self.tokens -= nbytes
            return 0.0
        return (need - self.tokens) / self.rate

    def full(self, now: float) -> bool:
        """A full bucket is the same as a new one, so it can be forgotten (peers come and go)."""
        return self.tokens + max(0.0, now - self.updated) * self.rate >= self.capacity


@dataclass
class ProviderConfig:
    """Operational limits of one provider process."""

    session_idle_timeout: float = 600.0  # a session silent this long is dropped with everything it holds
    step_timeout: float = 300.0  # a kept forward graph older than this is freed
    max_sessions_per_peer: int = 4
    max_inflight_steps: int = 4
    max_tokens_per_step: int = 1024  # batch x sequence of one ACT_UP/GRAD_UP; also bounds a batched trunk call
    limits: WireLimits = field(default_factory=lambda: DEFAULT_LIMITS)
    max_batch: int = 8  # most messages answered together (forward-only ones share a trunk call); 1 disables
    batch_wait_s: float = 0.002  # how long the serve loop waits for more messages to join a batch
    max_bytes_per_s: float | None = None  # per peer (client key): bytes it may send per second; None: no limit
    burst_bytes: float | None = None  # per peer: bytes it may send at once; None: one second's worth
    shutdown_grace_s: float = 2.0  # on Ctrl-C: how long to tell clients "provider-shutting-down" before closing
    max_kv_bytes_per_session: int = 256 << 20  # generation: the most trunk KV-cache bytes one session may hold
    # budgets (issue 20; SECURITY.md "Budgets"): refused with ERROR over-budget before decoding or computing
    max_decoded_bytes: int = 128 << 20  # one message's tensors once decoded (a lossy codec expands up to 8x)
    max_graphs_per_peer: int = 4  # training graphs one client key may keep waiting for GRAD_UP (all its sessions)
    max_graphs: int = 16  # ... all keys together
    max_graph_bytes_per_peer: int = 1 << 30  # bytes of those graphs (measured) per key
    max_graph_bytes: int = 4 << 30  # ... all keys together

    def __post_init__(self) -> None:
        for name in (
            "max_tokens_per_step",
            "max_decoded_bytes",
            "max_graphs_per_peer",
            "max_graphs",
            "max_graph_bytes_per_peer",
            "max_graph_bytes",
            "max_sessions_per_peer",
            "max_inflight_steps",
        ):
            value = getattr(self, name)  # our own field names, never received strings
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_bytes_per_s is not None and not self.max_bytes_per_s > 0:
            raise ConfigError(f"max_bytes_per_s must be positive (or None for no limit), got {self.max_bytes_per_s}")
        if self.burst_bytes is not None and not self.burst_bytes > 0:
            raise ConfigError(f"burst_bytes must be positive (or None for one second's worth), got {self.burst_bytes}")
        if not 0.0 <= self.shutdown_grace_s <= 600.0:
            raise ConfigError(f"shutdown_grace_s must be between 0 and 600 seconds, got {self.shutdown_grace_s}")
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1 (1 disables batching), got {self.max_batch}")
        if not 0.0 <= self.batch_wait_s <= 1.0:
            raise ConfigError(
                f"batch_wait_s must be between 0 and 1 second (a few ms is typical), got {self.batch_wait_s}"
            )


@dataclass
class Deferred:
    """A checked request whose computation may share one call with other sessions' requests.

    A session handler returns it from one of its ``batch_handlers`` after validating the message and updating
    its own state (e.g. claiming the step), so only the pure computation is postponed. Requests with equal
    ``key`` (e.g. the same trunk module) are run together by ``run(items)``, which returns, in order, each
    item's reply or the exception to turn into that item's ERROR reply.
    """

    key: Hashable
    run: Callable[[list[Deferred]], list[Message | BaseException]]
    data: Any


class SessionHandler(Protocol):
    """One protocol's provider side for one session.

    A handler may also have ``batch_handlers: dict[MsgType, Callable[[Message], Message | Deferred]]``, used
    by :meth:`ProviderApp.handle_many` instead of ``handlers`` for the types it lists.
    """

    handlers: dict[MsgType, Callable[[Message], Message]]

    def close(self) -> None: ...

    def expire(self, now: float) -> None: ...


@dataclass(frozen=True)
class KeptGraph:
    """The provider's ledger entry for one training graph a session keeps until GRAD_UP."""

    shape: tuple[int, ...]  # the trunk output's shape, which the GRAD_UP must carry
    nbytes: int  # what autograd saved for it (measured while computing; parameters not counted)


@dataclass
class SessionState:
    sid: str
    peer: str
    protocol: str
    terms: dict[str, Any]
    handler: SessionHandler
    last_seen: float
    messages: int = 0
    conn: Hashable | None = None  # the connection the session's last message came over (driver's opaque tag)
    graphs: dict[int, KeptGraph] = field(default_factory=dict)  # kept training graphs by step
    last_act_step: int = -1  # the last ACT_UP step taken (a replay is refused before decoding)
    closed: bool = False


@dataclass
class Work:
    """A message that passed :meth:`ProviderApp.triage` and needs the worker: decoding and compute.

    ``tokens`` (batch x sequence of its activations, 0 if none) is what the driver's scheduler weighs it by."""

    peer: str
    frames: Sequence[Frame]
    header: Header
    conn: Hashable | None = None
    tokens: int = 0


class SessionFactory(Protocol):
    """Builds one session's handler: ``factory(app, sid, terms, peer=peer)``; ``peer`` is the client key the app
    names the session's owner by (a trunk session picks that key's plugged trunk, :class:`PeerTrunk`)."""

    def __call__(self, app: ProviderApp, sid: str, terms: dict[str, Any], *, peer: str = "") -> SessionHandler: ...


@dataclass(frozen=True)
class PeerTrunk:
    """A trunk served to one client key only: the provider's trunk with that client's Offline adapter bundle plugged
    into the blocks it changes (``provider serve --serve-plugged``; docs/architecture.md).

    ``announce`` is told to the owner, and only to it, in ACCEPT's ``plugged`` (which bundle, which trunk blocks), so
    its client can check that the trunk it talks to carries the adapters its own blocks were tuned with."""

    trunk: nn.Module
    announce: Mapping[str, Any] = field(default_factory=dict)


class TranscriptSink(Protocol):
    """Where a recording provider writes what it observes (``guardedp2p.attacks.transcript.TranscriptRecorder``).

    A protocol, not that class, so this layer does not depend on the attack code that reads the transcripts.
    """

    def record(
        self, sid: str, step: int, kind: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None
    ) -> object: ...


@dataclass
class ProviderResources:
    """What the provider process lends to the sessions of every design.

    Written by whoever assembles the app (``guardedp2p.service.provider.build_provider_app``, the evaluation
    grid, tests), read by the design session factories in ``guardedp2p.designs.*.provider``. A field a design
    does not use keeps its default; a design that needs a missing one refuses the session with an actionable
    error (e.g. Offline without ``emulator_dir``).
    """

    # Online and Gradfree: the frozen trunk, called as ``trunk(h, attention_mask)``, and its hidden width.
    trunk: nn.Module | None = None
    hidden_size: int | None = None
    model_config: PretrainedConfig | None = None
    # ``--record DIR``: every activation / gradient the provider sees, for the attack benches.
    recorder: TranscriptSink | None = None
    # Offline: the signed emulator folder served to clients.
    emulator_dir: str | os.PathLike[str] | None = None
    # Offline: where accepted adapter bundles land; None makes the first upload pick a temporary folder.
    upload_dir: str | os.PathLike[str] | None = None
    # Offline: the clients' verify keys (objects or NAME.sign.pub paths); None checks integrity only.
    client_verify_keys: Sequence[Ed25519PublicKey | str | os.PathLike[str]] | None = None
    # Offline: the largest adapter bundle accepted; None is the design's default.
    max_upload_bytes: int | None = None
    # Offline: which client signing keys may sign the bundles a client CURVE key uploads: key z85 -> verify keys
    # (objects or NAME.sign.pub paths); "*" applies to every uploader (and to --insecure peers). Empty: see
    # accept_unpinned.
    client_sign_keys: Mapping[str, Sequence[Ed25519PublicKey | str | os.PathLike[str]]] = field(default_factory=dict)
    # Offline: a bundle whose signer is pinned nowhere (integrity only, signer_pinned false): True accepts it, False
    # refuses it (``provider serve`` unless --accept-unpinned), None accepts it with a warning (library default).
    accept_unpinned: bool | None = None
    # Offline: upload quotas. Staged (incomplete) bytes per key and in total; accepted bundles per key; the bytes
    # of every accepted bundle in upload_dir together.
    max_staged_upload_bytes_per_peer: int = 512 << 20
    max_staged_upload_bytes: int = 2 << 30
    max_uploads_per_peer: int = 16
    max_upload_dir_bytes: int = 8 << 30
    # Offline: called with (bundle folder, verification result) after each accepted bundle.
    on_adapter_bundle: Callable[[Path, VerifiedBundle], None] | None = None
    # Online and Gradfree: trunks served to one client key only, keyed by that key as the driver names the peer (the
    # z85 CURVE public key); every other key gets ``trunk``. Built by guardedp2p.service.provider (--serve-plugged).
    peer_trunks: Mapping[str, PeerTrunk] = field(default_factory=dict)
    # Design-private caches keyed by design name (e.g. the parsed emulator catalog); not configuration.
    caches: dict[str, object] = field(default_factory=dict)


class ProviderApp:
    """Holds the sessions of all peers and routes each message through a fixed handler table."""

    def __init__(
        self,
        policy: ProviderPolicy,
        factories: dict[str, SessionFactory],
        config: ProviderConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        resources: ProviderResources | None = None,
    ) -> None:
        self.policy = policy
        self.factories = dict(factories)
        self.config = config or ProviderConfig()
        self.clock = clock
        self.resources = resources if resources is not None else ProviderResources()
        self.sessions: dict[str, SessionState] = {}
        self.stats = {
            "messages": 0,
            "errors": 0,
            "sessions_opened": 0,
            "batched_calls": 0,
            "batched_requests": 0,
            "rate_limited": 0,
            "over_budget": 0,
        }
        self.buckets: dict[str, TokenBucket] = {}
        self._rate_warned: dict[str, float] = {}
        self._refusals_logged: dict[str, tuple[float, int]] = {}  # peer -> (last line's time, refusals held back)
        self._driver_limits: dict[str, int] = {}  # limits the driver enforces, announced in ACCEPT
        self.draining = False
        # every call into a session handler holds it; the receive thread only ever tries it (never waits)
        self.work_lock = threading.RLock()
        self._stats_lock = threading.Lock()
        self._to_close: list[tuple[SessionState, str]] = []  # closed sessions whose handler still holds state
        self._graph_bytes_per_token = self._graph_prior()
        trunks = [self.resources.trunk] if self.resources.trunk is not None else []
        trunks += [pt.trunk for pt in self.resources.peer_trunks.values()]
        self._param_storages = frozenset(p.untyped_storage().data_ptr() for t in trunks for p in t.parameters())

    # ------------------------------------------------------------------ frames in, frames out
    def handle(self, peer: str, frames: Sequence[Frame], conn: Hashable | None = None) -> list[Frame]:
        """Both phases at once: every failure becomes an ERROR reply for this peer only."""
        out = self.triage(peer, frames, conn)
        if isinstance(out, Work):
            return self.run([out])[0]
        return out

    def handle_many(self, items: Sequence[tuple[str, Sequence[Frame]]]) -> list[list[Frame]]:
        """Answer several messages that arrived together; replies come back in the same order.

        Each message is checked and routed exactly as :meth:`handle` would (in arrival order, so the replay and
        step checks see the same sequence); a bad one gets its ERROR and nothing else changes. Requests a session
        defers (forward-only trunk passes) are computed in groups of at most ``config.max_batch`` sharing one
        call. Why: with several gradfree clients the trunk is called with a larger batch instead of N small ones,
        which is what an accelerator (and even a CPU) does best.
        """
        if self.config.max_batch <= 1 or len(items) <= 1:
            return [self.handle(peer, frames) for peer, frames in items]
        replies: list[list[Frame] | None] = [None] * len(items)
        work: list[tuple[int, Work]] = []
        for i, (peer, frames) in enumerate(items):
            # a peer with work in this batch keeps its order: its control messages run after that work
            out = self.triage(peer, frames, immediate=not any(w.peer == peer for _, w in work))
            if isinstance(out, Work):
                work.append((i, out))
            else:
                replies[i] = out
        for (i, _), reply in zip(work, self.run([w for _, w in work])):
            replies[i] = reply
        return [
            r if r is not None else encode(error_message(ProtocolError("internal provider error"))) for r in replies
        ]

    # ------------------------------------------------------------------ phase 1: receive thread
    def triage(
        self, peer: str, frames: Sequence[Frame], conn: Hashable | None = None, *, immediate: bool = True
    ) -> list[Frame] | Work:
        """Charge, parse the header, check, and either answer now or hand back :class:`Work` (decode + compute).

        Nothing here decodes a tensor or calls a session handler's compute, so it is cheap whatever the message
        holds. PING, BYE and HELLO are answered here when ``immediate`` (the driver passes False while the peer
        still has work queued, to keep the peer's order); every refusal is answered here."""
        self._count("messages")
        sid, step = "", 0
        try:
            self.expire()
            # the header first (bounded work: one frame of at most 64 KiB, no tensor decoded), so that a refusal
            # for the byte rate names the session, step and type it refused: a client with several requests in
            # flight can then tell which one to send again (docs/wire.md section 7); a message whose header is
            # malformed is charged too, so a flood of garbage is rate-limited like any other
            try:
                header: Header | None = parse_header(frames, self.config.limits)
                malformed: Exception | None = None
            except Exception as exc:  # noqa: BLE001 - raised below, after the byte rate is charged
                header, malformed = None, exc
            if header is not None:
                sid, step = header.session, header.step
            self._admit(peer, frames, header)
            if header is None:
                assert malformed is not None
                raise malformed
            state = self._precheck(peer, header, conn)
            if immediate and header.type in (MsgType.PING, MsgType.BYE, MsgType.HELLO):
                return encode(self._control(peer, header, state, conn))
            tokens = _tokens(header)
            return Work(peer, frames, header, conn, tokens)
        except Exception as exc:  # noqa: BLE001 - keep serving other peers whatever happens
            return encode(self._error_reply(peer, exc, sid, step))

    def _precheck(self, peer: str, header: Header, conn: Hashable | None) -> SessionState | None:
        """Every check that needs no tensor decoded: budgets, the session, the message type, the tensor specs."""
        if header.decoded_nbytes > self.config.max_decoded_bytes:
            raise MessageTooLarge(
                f"the message's tensors would take {header.decoded_nbytes / 2**20:.1f} MiB decoded, over this "
                f"provider's limit of {self.config.max_decoded_bytes / 2**20:.1f} MiB per message"
            )
        if self.draining and header.type != MsgType.BYE:
            state = self.sessions.get(header.session)
            if state is not None and state.peer == peer:
                self.close_session(state.sid, "provider shutting down (client told)")
            raise ShuttingDown(
                "the provider is shutting down (its operator stopped it); no new work is accepted. Resume later."
            )
        if header.type == MsgType.HELLO:
            if header.tensors:
                raise UnexpectedTensors("HELLO carries no tensors")
            return None
        state = self.sessions.get(header.session)
        if state is None:
            raise UnknownSession(f"session {header.session[:16]!r} is unknown or expired; start a new session (HELLO)")
        if state.peer != peer:
            raise SessionOwnershipError("this session belongs to another client key")
        if header.type.name not in DESIGNS[state.protocol].session_types:
            raise MessageNotAllowed(f"{header.type.value} is not part of the {state.protocol} protocol")
        state.last_seen = self.clock()
        state.conn = conn
        self._check_tensors(state, header)
        return state

    def _check_tensors(self, state: SessionState, header: Header) -> None:
        """The tensors a message type carries (docs/wire.md section 4) against the session's terms and the limits."""
        t = header.type
        names = sorted(s.name for s in header.tensors)
        if t in (MsgType.PING, MsgType.BYE, MsgType.MANIFEST_REQ, MsgType.CHUNK_REQ):
            if names:
                raise UnexpectedTensors(f"{t.value} carries no tensors, got {', '.join(n[:20] for n in names)}")
        elif t == MsgType.ACT_UP:
            if names != ["h", "mask"]:
                raise UnexpectedTensors("ACT_UP must carry exactly the tensors 'h' (activations) and 'mask'")
            h, mask = header.spec("h"), header.spec("mask")
            assert h is not None and mask is not None
            self._check_activations(state, h, "up")
            if mask.codec != "raw" or mask.dtype not in _MASK_DTYPES or mask.shape != h.shape[:2]:
                raise UnexpectedTensors(f"mask must be [batch, seq] of 0/1 (raw), got {list(mask.shape)} {mask.dtype}")
        elif t == MsgType.GRAD_UP:
            if names != ["g"]:
                raise UnexpectedTensors("GRAD_UP must carry exactly the tensor 'g'")
            g = header.spec("g")
            assert g is not None
            self._check_activations(state, g, "grad_up")
        elif t == MsgType.UPLOAD:
            data = header.spec("data")
            if names != ["data"] or data is None or data.codec != "raw" or data.dtype != torch.uint8:
                raise UnexpectedTensors("UPLOAD must carry exactly the tensor 'data' (uint8, raw)")
            if len(data.shape) != 1:
                raise UnexpectedTensors("UPLOAD data must be 1-D")

    def _check_activations(self, state: SessionState, spec: TensorSpec, direction: str) -> None:
        codec = state.terms.get("codecs", {}).get(direction)
        if spec.codec != codec:
            raise UnexpectedCodec(f"tensor {spec.name!r} arrived as {spec.codec!r}, the session negotiated {codec!r}")
        if spec.dtype not in _FLOAT_DTYPES:
            raise UnexpectedTensors(f"tensor {spec.name!r} must be floating point, got {spec.dtype}")
        hidden = self.resources.hidden_size
        if len(spec.shape) != 3 or (hidden is not None and spec.shape[2] != hidden):
            raise UnexpectedTensors(
                f"tensor {spec.name!r} must have shape [batch, seq, {hidden}], got {list(spec.shape)}"
            )
        if spec.shape[0] == 0 or spec.shape[1] == 0:
            raise UnexpectedTensors(f"tensor {spec.name!r} must hold at least one token, got {list(spec.shape)}")
        tokens = spec.shape[0] * spec.shape[1]
        if tokens > self.config.max_tokens_per_step:
            raise OverBudget(
                f"{tokens} tokens (batch x sequence) exceed this provider's limit of {self.config.max_tokens_per_step} "
                "per step (provider serve --max-tokens-per-step); send smaller batches or shorter sequences"
            )

    def _control(self, peer: str, header: Header, state: SessionState | None, conn: Hashable | None) -> Message:
        """PING, BYE and HELLO: state changes only, no tensor and no compute."""
        if header.type == MsgType.HELLO:
            return self._open(peer, header.meta, conn)
        assert state is not None
        state.messages += 1
        if header.type == MsgType.PING:
            return Message(MsgType.PONG, session=state.sid, step=header.step)
        self.close_session(state.sid, "client said BYE")
        return Message(MsgType.BYE_ACK, session=state.sid, step=header.step)

    def cancel(self, work: Work) -> list[Frame]:
        """The reply to queued work that will not run (the provider is shutting down): refused as :meth:`triage`
        refuses it now (a BYE is still acknowledged). Never waits for ``work_lock``."""
        header = work.header
        try:
            state = self._precheck(work.peer, header, work.conn)
            if header.type == MsgType.BYE:
                return encode(self._control(work.peer, header, state, work.conn))
            raise ShuttingDown("the provider is shutting down (its operator stopped it); no new work is accepted.")
        except Exception as exc:  # noqa: BLE001
            return encode(self._error_reply(work.peer, exc, header.session, header.step))

    # ------------------------------------------------------------------ phase 2: worker thread
    def run(self, work: Sequence[Work]) -> list[list[Frame]]:
        """Decode and compute checked messages (from :meth:`triage`, in the order given); return their replies.

        Forward-only requests that a session defers share trunk calls (groups of at most ``config.max_batch``);
        a peer's later message runs after its deferred one. Holds ``work_lock`` throughout."""
        replies: list[list[Frame] | None] = [None] * len(work)
        pending: list[tuple[int, Deferred, str, str, int]] = []  # (index, deferred, peer, sid, step)
        with self.work_lock:
            try:
                for i, w in enumerate(work):
                    if w.header.type != MsgType.ACT_UP and any(p[2] == w.peer for p in pending):
                        self._run_deferred(pending, replies)
                        pending.clear()
                    out = self._execute(w)
                    if isinstance(out, Deferred):
                        pending.append((i, out, w.peer, w.header.session, w.header.step))
                    else:
                        replies[i] = encode(out)
                self._run_deferred(pending, replies)
            finally:
                self.reap()
        return [
            r if r is not None else encode(error_message(ProtocolError("internal provider error: no reply")))
            for r in replies
        ]

    def _execute(self, w: Work) -> Message | Deferred:
        """One message of :meth:`run`: re-check against the current state, then decode and dispatch."""
        header = w.header
        try:
            if header.type == MsgType.HELLO or self.draining:
                state = self._precheck(w.peer, header, w.conn)
            else:
                state = self.sessions.get(header.session)
                if state is None or state.peer != w.peer:  # closed meanwhile (BYE, disconnect, revocation, idle)
                    state = self._precheck(w.peer, header, w.conn)
            if header.type in (MsgType.PING, MsgType.BYE, MsgType.HELLO):
                return self._control(w.peer, header, state, w.conn)
            assert state is not None
            train = self._check_state(w.peer, state, header)
            msg = decode_body(header, w.frames)
            state.messages += 1
            if train:
                return self._dispatch_training(state, msg)
            out = self._dispatch(state, msg, defer=True)
            if header.type == MsgType.ACT_UP:
                state.last_act_step = header.step
            return out
        except Exception as exc:  # noqa: BLE001 - keep serving other peers whatever happens
            return self._error_reply(w.peer, exc, header.session, header.step)

    def _check_state(self, peer: str, state: SessionState, header: Header) -> bool:
        """Checks against the session's state and the graph budgets, still before decoding. True for an ACT_UP
        that will keep a training graph."""
        if header.type == MsgType.GRAD_UP:
            if not isinstance(getattr(state.handler, "pending", None), Mapping):  # constant name, our own object
                return False  # a handler that keeps no ledgered graphs checks its GRAD_UP itself
            kept = state.graphs.get(header.step)
            g = header.spec("g")
            if kept is None:
                raise NoKeptGraph(
                    f"no forward pass is waiting for a gradient at step {header.step} (expired or never sent)"
                )
            if g is not None and g.shape != kept.shape:
                raise UnexpectedTensors(
                    f"gradient shape {list(g.shape)} does not match the trunk output {list(kept.shape)}"
                )
            return False
        if header.type != MsgType.ACT_UP:
            return False
        if header.step <= state.last_act_step:
            raise StaleStep(
                f"step {header.step} is not after the last step {state.last_act_step} (replayed or out of order)"
            )
        keeps = DESIGNS[state.protocol].gradients_on_wire
        if not (keeps and header.meta.get("train", False) is True and header.meta.get("generate", False) is not True):
            return False
        tokens = _tokens(header)
        estimate = int(tokens * self._graph_bytes_per_token)
        # a snapshot (the receive thread may open or close sessions); closed sessions whose handler still holds its
        # graphs (freed after the running computation) count until they are freed
        states = list(self.sessions.values()) + [st for st, _ in list(self._to_close)]
        mine = [g for s in states if s.peer == peer for g in list(s.graphs.values())]
        every = [g for s in states for g in list(s.graphs.values())]
        cfg = self.config
        if len(mine) + 1 > cfg.max_graphs_per_peer:
            raise OverBudget(
                f"this client key already keeps {len(mine)} training graph(s), the provider's limit "
                f"(--max-graphs-per-key {cfg.max_graphs_per_peer}); send GRAD_UP for them first"
            )
        if sum(g.nbytes for g in mine) + estimate > cfg.max_graph_bytes_per_peer:
            raise OverBudget(
                f"this training step would keep about {estimate / 2**20:.0f} MiB, over this client key's budget of "
                f"{cfg.max_graph_bytes_per_peer / 2**20:.0f} MiB of kept graphs (--max-graph-mib-per-key); send "
                "GRAD_UP for kept steps first, or smaller batches or shorter sequences"
            )
        if len(every) + 1 > cfg.max_graphs or sum(g.nbytes for g in every) + estimate > cfg.max_graph_bytes:
            raise OverBudget(
                "the provider keeps as many training graphs as it has memory for (--max-graphs, --max-graph-mib); "
                "try again shortly"
            )
        return True

    def _dispatch_training(self, state: SessionState, msg: Message) -> Message | Deferred:
        """A training ACT_UP: dispatched alone, measuring the bytes autograd saves for the kept graph."""
        kept: Mapping[int, object] | None = getattr(state.handler, "pending", None)  # our own handler's attribute
        before = set(kept) if isinstance(kept, Mapping) else set()
        counter = _SavedBytes(self._param_storages)
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            out = self._dispatch(state, msg, defer=False)
        state.last_act_step = msg.step
        if isinstance(kept, Mapping) and isinstance(out, Message) and out.type == MsgType.ACT_DOWN:
            for step in set(kept) - before:
                shape = tuple(out.tensors["h"].shape) if "h" in out.tensors else ()
                state.graphs[step] = KeptGraph(shape, counter.nbytes)
                tokens = _tokens_of_shape(shape)
                if tokens:
                    self._graph_bytes_per_token = max(self._graph_bytes_per_token, counter.nbytes / tokens)
        return out

    def _run_deferred(
        self, pending: list[tuple[int, Deferred, str, str, int]], replies: list[list[Frame] | None]
    ) -> None:
        """Run postponed requests, grouped by key in chunks of ``max_batch``; fill in their replies."""
        groups: dict[Hashable, list[tuple[int, Deferred, str, str, int]]] = {}
        for entry in pending:
            groups.setdefault(entry[1].key, []).append(entry)
        size = self.config.max_batch
        for group in groups.values():
            for start in range(0, len(group), size):
                chunk = group[start : start + size]
                results = self._run_chunk([e[1] for e in chunk])
                if len(chunk) > 1:
                    self._count("batched_calls")
                    self._count("batched_requests", len(chunk))
                for (i, _, peer, sid, step), res in zip(chunk, results):
                    replies[i] = encode(res if isinstance(res, Message) else self._error_reply(peer, res, sid, step))

    def _run_chunk(self, chunk: list[Deferred]) -> list[Message | BaseException]:
        """One shared computation; if it fails as a whole, retry each request alone so that whatever is wrong
        (one odd request, memory) costs only the request that causes it."""
        try:
            results = chunk[0].run(chunk)
            if len(results) != len(chunk):
                raise RuntimeError(f"a batch runner returned {len(results)} results for {len(chunk)} requests")
            return results
        except Exception as exc:  # noqa: BLE001
            if len(chunk) == 1:
                return [exc]
            log.warning(
                "a batched computation of %d requests failed (%s: %s); running them one by one",
                len(chunk),
                type(exc).__name__,
                printable(exc),
            )
        singles: list[Message | BaseException] = []
        for d in chunk:
            try:
                singles.extend(d.run([d]))
            except Exception as exc:  # noqa: BLE001
                singles.append(exc)
        return singles

    def _admit(self, peer: str, frames: Sequence[Frame], header: Header | None = None) -> None:
        """Charge the peer's byte bucket; raise :class:`RateLimitExceeded` (nothing charged) when it is empty. The
        refusal names ``header``'s message type and step when the header could be read."""
        rate = self.config.max_bytes_per_s
        if rate is None:
            return
        now = self.clock()
        bucket = self.buckets.get(peer)
        if bucket is None:
            capacity = float(self.config.burst_bytes or rate)
            bucket = self.buckets[peer] = TokenBucket(rate, capacity, capacity, now)
        wait = bucket.take(sum(len(f) for f in frames), now)
        if wait > 0.0:
            what = f"{header.type.value} (step {header.step})" if header is not None else "a message"
            raise RateLimitExceeded(
                f"{what} refused: this client sends more than the provider's limit of {rate / 1e6:g} MB/s; send it "
                f"again in {wait:.3f} s (the client does this by itself)",
                retry_after_s=wait,
                limit_bytes_per_s=rate,
            )

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    def _error_reply(self, peer: str, exc: BaseException, sid: str, step: int) -> Message:
        """The reply to a refused or failed message: our errors say why; anything else stays an internal error."""
        self._count("errors")
        if isinstance(exc, RateLimitExceeded):
            self._count("rate_limited")
            now = self.clock()
            if now - self._rate_warned.get(peer, -1e9) >= 10.0:  # a flood must not flood the log too
                self._rate_warned[peer] = now
                log.warning("rate-limiting %s (over %g MB/s)", _short(peer), exc.limit_bytes_per_s / 1e6)
            reply = error_message(exc, sid, step)
            reply.meta["retry_after_s"] = round(exc.retry_after_s, 6)
            reply.meta["limit_bytes_per_s"] = exc.limit_bytes_per_s
            return reply
        if isinstance(exc, OverBudget):
            self._count("over_budget")
        if isinstance(exc, GuardedP2PError):
            held = self._refusal_log_due(peer)
            if held is not None:
                more = f" ({held} more refused since the last report)" if held else ""
                log.warning("refused a message from %s: %s%s", _short(peer), printable(exc), more)
            return _reject_or_error(exc, sid, step)
        held = self._refusal_log_due(peer)
        if held is not None:  # a traceback (a provider bug), but not one per message of a client that triggers it
            more = f" ({held} more refused since the last report)" if held else ""
            log.error("internal error while handling a message from %s%s", _short(peer), more, exc_info=exc)
        return error_message(ProtocolError(f"internal provider error: {type(exc).__name__}"), sid, step)

    def _refusal_log_due(self, peer: str) -> int | None:
        """Whether a refusal of ``peer``'s message gets a log line now: at most one per peer every
        ``REFUSAL_LOG_EVERY_S`` (a client sending malformed messages in a loop must not flood the operator's log).
        None: stay silent (counted); else log, with the number held back since the last line."""
        now = self.clock()
        with self._stats_lock:
            last, held = self._refusals_logged.get(peer, (-1e18, 0))
            if now - last < REFUSAL_LOG_EVERY_S:
                self._refusals_logged[peer] = (last, held + 1)
                return None
            if peer not in self._refusals_logged and len(self._refusals_logged) >= 1024:  # bounded memory
                for p in [p for p, (t, _) in self._refusals_logged.items() if now - t >= REFUSAL_LOG_EVERY_S]:
                    del self._refusals_logged[p]
                if len(self._refusals_logged) >= 1024:
                    del self._refusals_logged[min(self._refusals_logged, key=lambda p: self._refusals_logged[p][0])]
            self._refusals_logged[peer] = (now, 0)
            return held

    def _dispatch(self, state: SessionState, msg: Message, *, defer: bool) -> Message | Deferred:
        if defer:
            batch_handler = getattr(state.handler, "batch_handlers", {}).get(msg.type)  # constant name, our own object
            if batch_handler is not None:
                return batch_handler(msg)
        handler = state.handler.handlers.get(msg.type)
        if handler is None:
            raise MessageNotAllowed(f"{msg.type.value} has no handler in a {state.protocol} session")
        return handler(msg)

    # ------------------------------------------------------------------ sessions
    def _open(self, peer: str, meta: dict[str, Any], conn: Hashable | None = None) -> Message:
        hello = Hello.from_meta(meta)
        terms = negotiate(hello, self.policy)
        # keep only what the session needs: a client's extra codec directions or a large privacy map are not
        # stored per session, and never echoed (ACCEPT would otherwise return whatever the client sent)
        terms["codecs"] = {d: c for d, c in terms.get("codecs", {}).items() if d in CODEC_DIRECTIONS}
        terms.pop("privacy", None)
        owned = [s for s in list(self.sessions.values()) if s.peer == peer]
        if len(owned) >= self.config.max_sessions_per_peer:
            oldest = min(owned, key=lambda s: s.last_seen)
            self.close_session(oldest.sid, "too many sessions for this key; closing the oldest")
        factory = self.factories.get(hello.protocol)
        if factory is None:
            raise HandshakeRejected(f"protocol {hello.protocol!r} is not available on this provider")
        sid = secrets.token_hex(16)
        handler = factory(self, sid, terms, peer=peer)
        self.sessions[sid] = SessionState(sid, peer, hello.protocol, terms, handler, self.clock(), conn=conn)
        self._count("sessions_opened")
        plugged = getattr(handler, "plugged", None)  # constant name, our own handler object
        log.info(
            "session %s opened: %s for %s (%s)%s",
            sid[:8],
            hello.protocol,
            _short(peer),
            printable(hello.software),
            f", its own plugged trunk (bundle {str(plugged.get('bundle', ''))[:16]})"
            if isinstance(plugged, Mapping)
            else "",
        )
        meta_out = dict(terms)
        meta_out["session"] = sid
        meta_out["limits"] = self.announced_limits()
        if isinstance(plugged, Mapping):  # this peer's own trunk: said to it alone (another key never sees it)
            meta_out["plugged"] = dict(plugged)
        return Message(MsgType.ACCEPT, session=sid, meta=meta_out)

    def announced_limits(self) -> dict[str, int | float]:
        """What ACCEPT's ``limits`` tells a client (docs/wire.md section 5): the bounds an honest client must stay
        within, so it sizes its requests and its pipeline (issue 19: micro-batches in flight) to them instead of
        finding them by refusal. Budgets shared with other clients (totals over every key) are not announced: they
        would tell a client about the others."""
        cfg = self.config
        limits: dict[str, int | float] = {
            "max_tokens_per_step": cfg.max_tokens_per_step,
            "step_timeout": cfg.step_timeout,
            "session_idle_timeout": cfg.session_idle_timeout,
            "max_inflight_steps": cfg.max_inflight_steps,
            "max_graphs_per_peer": cfg.max_graphs_per_peer,
        }
        limits.update(self._driver_limits)
        return limits

    def announce_limit(self, name: str, value: int) -> None:
        """Add a bound that the driver enforces to what ACCEPT announces (the serve loop: ``max_unanswered``)."""
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"an announced limit must be a positive integer, got {name}={value!r}")
        self._driver_limits[name] = value

    def close_session(self, sid: str, reason: str) -> None:
        """Forget the session at once (its next message is unknown-session) and free what its handler holds: now
        if no computation is running, else right after it (:meth:`reap`)."""
        state = self.sessions.pop(sid, None)
        if state is None:
            return
        state.closed = True
        self._to_close.append((state, reason))
        if self.work_lock.acquire(blocking=False):
            try:
                self.reap()
            finally:
                self.work_lock.release()

    def reap(self) -> None:
        """Free the state of closed sessions and sync the graph ledger with the handlers (under ``work_lock``)."""
        while self._to_close:
            state, reason = self._to_close.pop(0)
            try:
                state.handler.close()
            except Exception:  # noqa: BLE001 - one handler's failure must not keep others' state alive
                log.exception("closing session %s failed", state.sid[:8])
            state.graphs.clear()
            log.info("session %s closed: %s (%d messages)", state.sid[:8], reason, state.messages)
        for state in list(self.sessions.values()):
            kept = getattr(state.handler, "pending", None)  # constant name, our own handler object
            if isinstance(kept, Mapping):
                for step in [s for s in state.graphs if s not in kept]:
                    del state.graphs[step]

    def expire(self) -> None:
        now = self.clock()
        for sid, state in list(self.sessions.items()):
            if now - state.last_seen > self.config.session_idle_timeout:
                self.close_session(sid, "idle timeout")
        if self.work_lock.acquire(blocking=False):  # never wait for a computation: the worker expires after it
            try:
                for state in list(self.sessions.values()):
                    state.handler.expire(now)
                self.reap()
            finally:
                self.work_lock.release()
        for peer in [p for p, b in self.buckets.items() if b.full(now)]:
            del self.buckets[peer]
            self._rate_warned.pop(peer, None)

    def active_peers(self) -> set[str]:
        """Peers holding at least one open session (the serve loop waits for these to join a batch)."""
        return {s.peer for s in list(self.sessions.values())}

    def drop_peer(self, peer: str, reason: str) -> int:
        """Free every session of a peer (its key was revoked, or it was cut off); returns how many."""
        sids = [sid for sid, state in list(self.sessions.items()) if state.peer == peer]
        for sid in sids:
            self.close_session(sid, reason)
        return len(sids)

    def drop_connection(self, conn: Hashable, reason: str) -> int:
        """Free the sessions whose last message came over ``conn`` (the connection went away); returns how many."""
        sids = [sid for sid, state in list(self.sessions.items()) if state.conn == conn]
        for sid in sids:
            self.close_session(sid, reason)
        return len(sids)

    def held(self, peer: str | None = None) -> dict[str, int]:
        """What the sessions (of ``peer``, or all) keep: open sessions, kept graphs and their bytes (graphs of closed
        sessions count until a running computation ends and they are freed)."""
        states = [s for s in list(self.sessions.values()) if peer is None or s.peer == peer]
        closing = [st for st, _ in list(self._to_close) if peer is None or st.peer == peer]
        graphs = [g for s in states + closing for g in list(s.graphs.values())]
        return {"sessions": len(states), "graphs": len(graphs), "graph_bytes": sum(g.nbytes for g in graphs)}

    def begin_shutdown(self) -> None:
        """From now on answer every request but BYE with ERROR "provider-shutting-down" (and close its session),
        so clients learn at once why the provider goes away instead of timing out."""
        if not self.draining:
            self.draining = True
            log.info("shutting down: telling the clients of %d open session(s)", len(self.sessions))

    def shutdown(self) -> None:
        for sid in list(self.sessions):
            self.close_session(sid, "provider shutting down")

    def _graph_prior(self) -> float:
        """Bytes a kept training graph takes per token before any was measured: a deliberately high guess
        (about 24 hidden-size fp32 vectors per trunk block), replaced by the largest measured ratio."""
        cfg = self.resources.model_config
        hidden = self.resources.hidden_size or 0
        layers = int(getattr(cfg, "num_hidden_layers", 0) or 0) - sum(self.policy.split)
        return float(max(layers, 1) * hidden * 4 * 24)


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MASK_DTYPES = (torch.bool, torch.int8, torch.uint8, torch.int64)


def _tokens_of_shape(shape: Sequence[int]) -> int:
    return int(shape[0]) * int(shape[1]) if len(shape) >= 2 else 0


def _tokens(header: Header) -> int:
    """Batch x sequence of a message's activations or gradient (0 when it carries none)."""
    spec = header.spec("h") or header.spec("g")
    return _tokens_of_shape(spec.shape) if spec is not None else 0


class _SavedBytes:
    """A saved-tensors hook pair that counts the bytes autograd keeps for backward (each storage once; the
    model's own parameters are not counted: they are held anyway)."""

    def __init__(self, exclude: frozenset[int]) -> None:
        self.exclude = exclude
        self.seen: set[int] = set()
        self.nbytes = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.exclude and ptr not in self.seen:
            self.seen.add(ptr)
            self.nbytes += storage.nbytes()
        # detached: the same memory, without a reference back to the graph (returning ``t`` itself would tie a
        # saved output to its own grad_fn, a cycle that keeps the whole graph alive after it is dropped)
        return t.detach()

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        return t


def _reject_or_error(exc: GuardedP2PError, sid: str, step: int) -> Message:
    if isinstance(exc, HandshakeRejected):
        return Message(MsgType.REJECT, session=sid, step=step, meta={"code": str(exc.code), "message": str(exc)[:2000]})
    if isinstance(exc, (WireError, ProtocolError)):
        return error_message(exc, sid, step)
    return error_message(exc, sid, step)


def _short(peer: str) -> str:
    return peer[:12] + "…" if len(peer) > 12 else peer


def printable(text: object, limit: int = 200) -> str:
    """``text`` safe for one log line: control characters (newlines, ANSI escapes) escaped, length capped.

    Client-chosen strings (``software``, error details quoting a request) reach the provider's log; unescaped, a
    client could forge log lines or clear the operator's terminal.
    """
    s = str(text)
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s[:limit])
    return out + "…" if len(s) > limit else out
