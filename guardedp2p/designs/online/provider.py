"""Online design, provider side: the trunk session (Gradfree reuses it with ``keep_graph=False``).

:class:`TrunkSession` answers ACT_UP with the trunk output and, in Online, keeps the
step's autograd graph until GRAD_UP arrives, then answers with the gradient w.r.t. the activations.

Generation (issue 18): an ACT_UP with ``meta.generate`` runs the trunk incrementally. ``cache: "new"`` starts the
session's one generation cache (a KV cache of the trunk's blocks, :mod:`guardedp2p.engine.kv`) with the prompt's
positions; ``cache: "extend"`` with ``past_len`` equal to the positions cached so far feeds only the new positions
(one per generated token). The cache is bounded by ``ProviderConfig.max_kv_bytes_per_session`` and freed at
session end, at the step timeout, or when a request is refused for the budget (docs/wire.md, section 6).

A client key listed in ``ProviderResources.peer_trunks`` gets its own trunk in every session (its Offline adapters
plugged into the trunk blocks they change, ``provider serve --serve-plugged``); every other key gets the base trunk.

The client side is :class:`guardedp2p.designs.online.client.RemoteTrunk`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from guardedp2p.errors import ConfigError, ProtocolError
from guardedp2p.protocol.provider import Deferred

if TYPE_CHECKING:
    from guardedp2p.engine.kv import KvCache
    from guardedp2p.engine.split import ProviderTrunk
    from guardedp2p.protocol.provider import ProviderApp
from guardedp2p.wire.codes import ErrorCode
from guardedp2p.wire.framing import Message
from guardedp2p.wire.messages import MsgType


class ReplayedStep(ProtocolError):
    code = ErrorCode.REPLAYED_STEP


class NoPendingStep(ProtocolError):
    code = ErrorCode.NO_PENDING_STEP


class BadActivation(ProtocolError):
    code = ErrorCode.BAD_ACTIVATION


class CodecMismatch(ProtocolError):
    code = ErrorCode.CODEC_MISMATCH


class CacheMismatch(ProtocolError):
    """A generation ACT_UP extends a cache this session does not hold (freed, never started, out of step)."""

    code = ErrorCode.CACHE_MISMATCH


class CacheBudgetExceeded(ProtocolError):
    """A generation ACT_UP would grow the session's trunk KV cache beyond the provider's per-session budget."""

    code = ErrorCode.CACHE_BUDGET


@dataclass
class _Pending:
    inputs: torch.Tensor
    outputs: torch.Tensor
    created: float


@dataclass
class ActRequest:
    """An ACT_UP that passed every check and owns its step: all that computing and answering it needs."""

    session: TrunkSession
    step: int
    h: torch.Tensor  # as received (this is what the recorder stores)
    mask: torch.Tensor  # int64, 0/1
    meta: dict[str, Any]
    train: bool  # keep the graph for GRAD_UP (Online training step)
    generate: bool = False  # incremental generation step: runs against the session's KV cache (issue 18)


def _lossy(codec: str) -> bool:
    return codec not in ("fp32", "raw")


class TrunkSession:
    """Provider side of one Online or Gradfree session."""

    def __init__(self, app: ProviderApp, sid: str, terms: dict[str, Any], *, keep_graph: bool, peer: str = "") -> None:
        res = app.resources
        if res.trunk is None or res.hidden_size is None:
            raise ConfigError(
                "this provider app has no trunk: set ProviderResources.trunk and hidden_size "
                "(guardedp2p.service.provider.build_provider_app does)"
            )
        self.app = app
        self.sid = sid
        # a key with its own plugged trunk (provider serve --serve-plugged) gets it, every other key the base trunk;
        # the lookup is by the authenticated key only, so no message can name another key's trunk
        own = res.peer_trunks.get(peer) if peer else None
        self.trunk: torch.nn.Module = own.trunk if own is not None else res.trunk
        self.plugged: dict[str, Any] | None = dict(own.announce) if own is not None else None
        self.hidden_size: int = res.hidden_size
        self.recorder = res.recorder
        self.codecs: dict[str, str] = terms["codecs"]
        self.keep_graph = keep_graph
        self.pending: dict[int, _Pending] = {}
        self.last_step = -1
        self.handlers = {MsgType.ACT_UP: self.on_act_up}
        # used by ProviderApp.handle_many: forward-only ACT_UPs of several sessions share one trunk call
        self.batch_handlers = {MsgType.ACT_UP: self.defer_act_up}
        if keep_graph:
            self.handlers[MsgType.GRAD_UP] = self.on_grad_up
        param = next(self.trunk.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        self.kv: KvCache | None = None  # the generation cache of this session (at most one)
        self.kv_used = 0.0  # when it was last used (freed after the step timeout)

    # ------------------------------------------------------------------ ACT_UP
    def on_act_up(self, msg: Message) -> Message:
        """Answer one ACT_UP on its own: validate, run the trunk on it alone, reply."""
        return self.answer(self.accept_act_up(msg))

    def answer(self, req: ActRequest) -> Message:
        """Run the trunk on one accepted request alone and reply."""
        t0 = time.perf_counter()
        out = self.compute(req)
        return self.reply_act_up(req, out, time.perf_counter() - t0)

    def defer_act_up(self, msg: Message) -> Message | Deferred:
        """Batched entry point (issue #6): a forward-only request is validated now and computed later, in one
        trunk call together with other sessions' forward-only requests; a training step (which keeps its graph
        for GRAD_UP) is answered at once, on its own."""
        req = self.accept_act_up(msg)
        if req.train or req.generate:  # a generation step runs against this session's own cache
            return self.answer(req)
        return Deferred(key=self.trunk, run=run_deferred_forwards, data=req)

    def accept_act_up(self, msg: Message) -> ActRequest:
        """Check an ACT_UP completely and claim its step; raise a :class:`ProtocolError` for the peer otherwise.

        Everything that can be refused is refused here, before any compute, so that a batch of requests can only
        fail as a whole for reasons that are the provider's, never one peer's."""
        if msg.step <= self.last_step:
            raise ReplayedStep(
                f"step {msg.step} is not after the last step {self.last_step} (replayed or out of order)"
            )
        h = msg.tensors.get("h")
        mask = msg.tensors.get("mask")
        if h is None or mask is None:
            raise BadActivation("ACT_UP must carry tensors 'h' (activations) and 'mask' (attention mask)")
        if msg.codec_of("h") != self.codecs["up"]:
            raise CodecMismatch(
                f"activations arrived as {msg.codec_of('h')!r}, the session negotiated {self.codecs['up']!r}"
            )
        if h.dim() != 3 or h.shape[-1] != self.hidden_size:
            raise BadActivation(f"activations must have shape [batch, seq, {self.hidden_size}], got {list(h.shape)}")
        if tuple(mask.shape) != tuple(h.shape[:2]) or mask.dtype not in (
            torch.bool,
            torch.int8,
            torch.uint8,
            torch.int64,
        ):
            raise BadActivation(f"mask must be [batch, seq] of 0/1, got {list(mask.shape)} {mask.dtype}")
        if h.shape[0] == 0 or h.shape[1] == 0:
            raise BadActivation(f"activations must hold at least one token, got shape {list(h.shape)}")
        if h.shape[0] * h.shape[1] > self.app.config.max_tokens_per_step:
            raise BadActivation(f"{h.shape[0] * h.shape[1]} tokens exceed this provider's limit per step")
        if not torch.isfinite(h).all():
            raise BadActivation("activations contain NaN or Inf")
        mask = mask.to(torch.long)
        if ((mask != 0) & (mask != 1)).any():
            raise BadActivation("mask values must be 0 or 1")
        generate = msg.meta.get("generate", False) is True
        train = bool(msg.meta.get("train", False)) and self.keep_graph and not generate
        if train and len(self.pending) >= self.app.config.max_inflight_steps:
            raise ProtocolError(
                f"too many steps in flight (limit {self.app.config.max_inflight_steps}); send GRAD_UP first"
            )
        if generate:
            self.accept_generation(msg.meta, h.shape[0], h.shape[1])
        self.last_step = msg.step
        return ActRequest(self, msg.step, h, mask, msg.meta, train, generate)

    def accept_generation(self, meta: dict[str, Any], batch: int, new: int) -> None:
        """Check a generation step against the session's cache and budget (before any compute); a ``new`` cache
        replaces the previous one, a refused budget frees it (the generation cannot go on)."""
        from guardedp2p.engine.kv import check_generation_support, kv_bytes_per_position

        if meta.get("train", False):
            raise BadActivation("a generation step cannot be a training step (meta train and generate both set)")
        cache, past = meta.get("cache"), meta.get("past_len")
        if cache not in ("new", "extend"):
            raise BadActivation(f"generation meta 'cache' must be 'new' or 'extend', got {str(cache)[:20]!r}")
        if not isinstance(past, int) or isinstance(past, bool) or past < 0:
            raise BadActivation("generation meta 'past_len' must be a non-negative integer")
        trunk = self.generation_trunk()
        try:
            check_generation_support(trunk.config)
        except ConfigError as exc:
            raise ProtocolError(f"this provider cannot serve generation: {exc}") from None
        if cache == "new":
            self.free_kv()
            if past != 0:
                raise CacheMismatch(f"a new generation cache starts at past_len 0, got {past}")
        else:
            held = self.kv
            if held is None:
                raise CacheMismatch(
                    "this session holds no generation cache (never started, or freed at the step timeout): "
                    "start again with cache 'new'"
                )
            if held.length != past or held.batch != batch:
                raise CacheMismatch(
                    f"the session's generation cache holds {held.batch} x {held.length} positions; the request "
                    f"extends {batch} x {past}"
                )
        per_position = kv_bytes_per_position(trunk.config, len(trunk.layer_range), self.dtype)
        held_bytes = self.kv.nbytes() if self.kv is not None else 0
        budget = self.app.config.max_kv_bytes_per_session
        need = held_bytes + batch * new * per_position
        if need > budget:
            self.free_kv()
            raise CacheBudgetExceeded(
                f"the trunk's KV cache for this generation would need {need / 2**20:.1f} MiB, over this provider's "
                f"budget of {budget / 2**20:.1f} MiB per session ({batch} sequence(s) x {past + new} positions); the "
                "cache is freed: use shorter prompts, fewer new tokens or fewer prompts at once"
            )

    def compute(self, req: ActRequest) -> torch.Tensor:
        """Run the trunk on one request; a training step keeps its graph until GRAD_UP (or the step timeout)."""
        x = req.h.to(self.device, self.dtype)
        m = req.mask.to(self.device)
        if req.generate:
            return self.compute_generation(req, x, m)
        if req.train:
            x.requires_grad_(True)
            with torch.enable_grad():
                out = self.trunk(x, m)
            self.pending[req.step] = _Pending(x, out, self.app.clock())
        else:
            with torch.inference_mode():
                out = self.trunk(x, m)
        return out.detach().to("cpu", torch.float32)

    def compute_generation(self, req: ActRequest, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The trunk on the new positions only, against (and extending) the session's KV cache."""
        from guardedp2p.engine.kv import cached_blocks, new_cache

        trunk = self.generation_trunk()
        if self.kv is None:  # cache "new" (accept_generation checked that "extend" has one)
            self.kv = new_cache(trunk)
        try:
            with torch.inference_mode():
                out = cached_blocks(trunk, x, self.kv, m)
        except Exception:
            self.free_kv()  # a half-updated cache cannot be extended correctly
            raise
        self.kv_used = self.app.clock()
        return out.detach().to("cpu", torch.float32)

    def generation_trunk(self) -> ProviderTrunk:
        """The trunk as a split part (what the cached forward runs); any other trunk module cannot generate."""
        from guardedp2p.engine.split import ProviderTrunk

        if not isinstance(self.trunk, ProviderTrunk):
            raise ProtocolError("this provider's trunk is not a split ProviderTrunk: it cannot serve generation")
        return self.trunk

    def free_kv(self) -> None:
        if self.kv is not None:
            self.kv.clear()
            self.kv = None

    def reply_act_up(self, req: ActRequest, out_cpu: torch.Tensor, compute_s: float, batched: int = 1) -> Message:
        """Record what this session's provider observed (per session, also when batched) and build ACT_DOWN."""
        if self.recorder is not None:
            self.recorder.record(
                self.sid, req.step, "forward", {"h1": req.h, "mask": req.mask, "h2": out_cpu}, req.meta
            )
        # compute_s of a batched call is the shared call's time; how many other clients shared it is not said
        # (it would tell this client that another client is active)
        meta: dict[str, Any] = {"compute_s": compute_s}
        if req.generate and self.kv is not None:
            meta["cache_len"] = self.kv.length
            meta["kv_bytes"] = self.kv.nbytes()
            meta["kv_budget"] = self.app.config.max_kv_bytes_per_session
        return Message(
            MsgType.ACT_DOWN,
            session=self.sid,
            step=req.step,
            meta=meta,
            tensors={"h": out_cpu},
            codecs={"h": self.codecs["down"]},
        )

    # ------------------------------------------------------------------ GRAD_UP (Online only)
    def on_grad_up(self, msg: Message) -> Message:
        # check the message before taking the kept graph: a malformed GRAD_UP leaves it for a corrected retry
        pending = self.pending.get(msg.step)
        if pending is None:
            raise NoPendingStep(f"no forward pass is waiting for a gradient at step {msg.step} (expired or never sent)")
        g = msg.tensors.get("g")
        if g is None:
            raise BadActivation("GRAD_UP must carry tensor 'g'")
        if msg.codec_of("g") != self.codecs["grad_up"]:
            raise CodecMismatch(
                f"gradient arrived as {msg.codec_of('g')!r}, the session negotiated {self.codecs['grad_up']!r}"
            )
        if tuple(g.shape) != tuple(pending.outputs.shape):
            raise BadActivation(
                f"gradient shape {list(g.shape)} does not match the trunk output {list(pending.outputs.shape)}"
            )
        if not torch.isfinite(g).all():
            raise BadActivation("gradient contains NaN or Inf")
        del self.pending[msg.step]
        t0 = time.perf_counter()
        pending.outputs.backward(g.to(pending.outputs.device, pending.outputs.dtype))
        grad_in = pending.inputs.grad
        if grad_in is None:
            grad_in = torch.zeros_like(pending.inputs)
        grad_cpu = grad_in.detach().to("cpu", torch.float32)
        del pending
        if self.recorder is not None:
            self.recorder.record(self.sid, msg.step, "backward", {"g2": g, "g1": grad_cpu}, msg.meta)
        codec = self.codecs["grad_down"]
        return Message(
            MsgType.GRAD_DOWN,
            session=self.sid,
            step=msg.step,
            meta={"compute_s": time.perf_counter() - t0},
            tensors={"g": grad_cpu},
            codecs={"g": codec},
            stochastic=("g",) if _lossy(codec) else (),
        )

    # ------------------------------------------------------------------ lifecycle
    def expire(self, now: float) -> None:
        timeout = self.app.config.step_timeout
        for step in [s for s, p in self.pending.items() if now - p.created > timeout]:
            del self.pending[step]
        if self.kv is not None and now - self.kv_used > timeout:
            self.free_kv()

    def close(self) -> None:
        self.pending.clear()
        self.free_kv()


# ---------------------------------------------------------------------- batched forward (issue #6)
def run_deferred_forwards(items: list[Deferred]) -> list[Message | BaseException]:
    """Compute the deferred forward-only ACT_UPs of several sessions (same trunk) and answer each in its session.

    A failure of the shared trunk call propagates (the app then retries the requests one by one); a failure
    while answering one request (e.g. its transcript cannot be written) is returned for that request only.
    """
    reqs: list[ActRequest] = [d.data for d in items]
    first = reqs[0].session
    t0 = time.perf_counter()
    outs = forward_batch(
        first.trunk, reqs, device=first.device, dtype=first.dtype, max_tokens=first.app.config.max_tokens_per_step
    )
    compute_s = time.perf_counter() - t0
    results: list[Message | BaseException] = []
    for req, out in zip(reqs, outs):
        try:
            results.append(req.session.reply_act_up(req, out, compute_s, len(reqs)))
        except Exception as exc:  # noqa: BLE001 - becomes an ERROR reply for this request only
            results.append(exc)
    return results


def forward_batch(
    trunk: torch.nn.Module, reqs: list[ActRequest], *, device: torch.device, dtype: torch.dtype, max_tokens: int
) -> list[torch.Tensor]:
    """Trunk outputs of forward-only requests, in as few calls as ``max_tokens`` (padded tokens per call) allows.

    Requests are stacked along the batch axis and right-padded along the sequence to the longest, with mask 0
    on the padding. Why this is exact: with a causal mask the appended positions come after every real one, so
    they cannot change the outputs at the positions a request sent (positions are index-based or a prefix sum
    of the mask); each request gets back exactly its own ``[batch, seq]`` slice.
    """
    outs: list[torch.Tensor] = []
    for chunk in _token_chunks(reqs, max_tokens):
        outs.extend(_forward_padded(trunk, chunk, device, dtype))
    return outs


def _token_chunks(reqs: list[ActRequest], max_tokens: int) -> list[list[ActRequest]]:
    """Greedy split in arrival order so that no call exceeds ``max_tokens`` padded tokens (a single request never
    does: it was checked against the same limit), which bounds a batched call's memory like a single request's."""
    chunks: list[list[ActRequest]] = []
    cur: list[ActRequest] = []
    rows = longest = 0
    for r in reqs:
        b, n = int(r.h.shape[0]), int(r.h.shape[1])
        if cur and (rows + b) * max(longest, n) > max_tokens:
            chunks.append(cur)
            cur, rows, longest = [], 0, 0
        cur.append(r)
        rows += b
        longest = max(longest, n)
    if cur:
        chunks.append(cur)
    return chunks


def _forward_padded(
    trunk: torch.nn.Module, chunk: list[ActRequest], device: torch.device, dtype: torch.dtype
) -> list[torch.Tensor]:
    with torch.inference_mode():
        if len(chunk) == 1:
            return [chunk[0].session.compute(chunk[0])]  # forward-only: the unbatched path, no padding
        rows = sum(int(r.h.shape[0]) for r in chunk)
        longest = max(int(r.h.shape[1]) for r in chunk)
        hidden = int(chunk[0].h.shape[2])
        x = torch.zeros(rows, longest, hidden, device=device, dtype=dtype)
        m = torch.zeros(rows, longest, device=device, dtype=torch.long)
        r0 = 0
        for r in chunk:
            b, n = int(r.h.shape[0]), int(r.h.shape[1])
            x[r0 : r0 + b, :n] = r.h.to(device, dtype)
            m[r0 : r0 + b, :n] = r.mask.to(device)
            r0 += b
        out = trunk(x, m).detach().to("cpu", torch.float32)
        parts: list[torch.Tensor] = []
        r0 = 0
        for r in chunk:
            b, n = int(r.h.shape[0]), int(r.h.shape[1])
            parts.append(out[r0 : r0 + b, :n].clone())  # its own memory: no reply keeps the whole batch alive
            r0 += b
        return parts


def online_session(app: ProviderApp, sid: str, terms: dict[str, Any], *, peer: str = "") -> TrunkSession:
    return TrunkSession(app, sid, terms, keep_graph=True, peer=peer)
