"""Online (and, with ``keep_graph=False``, Gradfree) trunk protocol.

Provider side: :class:`TrunkSession` answers ACT_UP with the trunk output and, in Online, keeps the
step's autograd graph until GRAD_UP arrives, then answers with the gradient w.r.t. the activations.

Client side: :func:`remote_trunk` is an ``autograd.Function`` whose forward sends ACT_UP and whose backward
sends GRAD_UP. The client's training code is therefore ordinary PyTorch (``loss.backward()``), and the
quantized uplink is straight-through by construction: the received dL/dh1 is applied to h1 as if the codec
were the identity.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from guardedp2p.errors import ProtocolError
from guardedp2p.messages import MsgType
from guardedp2p.wire import Message


class ReplayedStep(ProtocolError):
    code = "replayed-step"


class NoPendingStep(ProtocolError):
    code = "no-pending-step"


class BadActivation(ProtocolError):
    code = "bad-activation"


class CodecMismatch(ProtocolError):
    code = "codec-mismatch"


@dataclass
class _Pending:
    inputs: torch.Tensor
    outputs: torch.Tensor
    created: float


def _lossy(codec: str) -> bool:
    return codec not in ("fp32", "raw")


class TrunkSession:
    """Provider side of one Online or Gradfree session."""

    def __init__(self, app: Any, sid: str, terms: dict[str, Any], *, keep_graph: bool) -> None:
        self.app = app
        self.sid = sid
        self.trunk: torch.nn.Module = app.resources["trunk"]
        self.hidden_size: int = app.resources["hidden_size"]
        self.recorder = app.resources.get("recorder")
        self.codecs: dict[str, str] = terms["codecs"]
        self.keep_graph = keep_graph
        self.pending: dict[int, _Pending] = {}
        self.last_step = -1
        self.handlers = {MsgType.ACT_UP: self.on_act_up}
        if keep_graph:
            self.handlers[MsgType.GRAD_UP] = self.on_grad_up
        param = next(self.trunk.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32

    # ------------------------------------------------------------------ ACT_UP
    def on_act_up(self, msg: Message) -> Message:
        if msg.step <= self.last_step:
            raise ReplayedStep(f"step {msg.step} is not after the last step {self.last_step} (replayed or out of order)")
        h = msg.tensors.get("h")
        mask = msg.tensors.get("mask")
        if h is None or mask is None:
            raise BadActivation("ACT_UP must carry tensors 'h' (activations) and 'mask' (attention mask)")
        if msg.codec_of("h") != self.codecs["up"]:
            raise CodecMismatch(f"activations arrived as {msg.codec_of('h')!r}, the session negotiated {self.codecs['up']!r}")
        if h.dim() != 3 or h.shape[-1] != self.hidden_size:
            raise BadActivation(f"activations must have shape [batch, seq, {self.hidden_size}], got {list(h.shape)}")
        if tuple(mask.shape) != tuple(h.shape[:2]) or mask.dtype not in (torch.bool, torch.int8, torch.uint8, torch.int64):
            raise BadActivation(f"mask must be [batch, seq] of 0/1, got {list(mask.shape)} {mask.dtype}")
        if h.shape[0] * h.shape[1] > self.app.config.max_tokens_per_step:
            raise BadActivation(f"{h.shape[0] * h.shape[1]} tokens exceed this provider's limit per step")
        if not torch.isfinite(h).all():
            raise BadActivation("activations contain NaN or Inf")
        mask = mask.to(torch.long)
        if ((mask != 0) & (mask != 1)).any():
            raise BadActivation("mask values must be 0 or 1")
        train = bool(msg.meta.get("train", False)) and self.keep_graph
        if train and len(self.pending) >= self.app.config.max_inflight_steps:
            raise ProtocolError(f"too many steps in flight (limit {self.app.config.max_inflight_steps}); send GRAD_UP first")
        self.last_step = msg.step
        t0 = time.perf_counter()
        x = h.to(self.device, self.dtype)
        m = mask.to(self.device)
        if train:
            x.requires_grad_(True)
            with torch.enable_grad():
                out = self.trunk(x, m)
            self.pending[msg.step] = _Pending(x, out, self.app.clock())
        else:
            with torch.inference_mode():
                out = self.trunk(x, m)
        out_cpu = out.detach().to("cpu", torch.float32)
        if self.recorder is not None:
            self.recorder.record(self.sid, msg.step, "forward", {"h1": h, "mask": mask, "h2": out_cpu}, msg.meta)
        return Message(
            MsgType.ACT_DOWN,
            session=self.sid,
            step=msg.step,
            meta={"compute_s": time.perf_counter() - t0},
            tensors={"h": out_cpu},
            codecs={"h": self.codecs["down"]},
        )

    # ------------------------------------------------------------------ GRAD_UP (Online only)
    def on_grad_up(self, msg: Message) -> Message:
        pending = self.pending.pop(msg.step, None)
        if pending is None:
            raise NoPendingStep(f"no forward pass is waiting for a gradient at step {msg.step} (expired or never sent)")
        g = msg.tensors.get("g")
        if g is None:
            raise BadActivation("GRAD_UP must carry tensor 'g'")
        if msg.codec_of("g") != self.codecs["grad_up"]:
            raise CodecMismatch(f"gradient arrived as {msg.codec_of('g')!r}, the session negotiated {self.codecs['grad_up']!r}")
        if tuple(g.shape) != tuple(pending.outputs.shape):
            raise BadActivation(f"gradient shape {list(g.shape)} does not match the trunk output {list(pending.outputs.shape)}")
        if not torch.isfinite(g).all():
            raise BadActivation("gradient contains NaN or Inf")
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

    def close(self) -> None:
        self.pending.clear()


def online_session(app: Any, sid: str, terms: dict[str, Any]) -> TrunkSession:
    return TrunkSession(app, sid, terms, keep_graph=True)


def gradfree_session(app: Any, sid: str, terms: dict[str, Any]) -> TrunkSession:
    return TrunkSession(app, sid, terms, keep_graph=False)


# ====================================================================== client side
class RemoteTrunk:
    """Runs the provider's trunk through a session; usable as ``h2 = remote(h1, mask)`` inside autograd."""

    def __init__(self, session: Any, codecs: dict[str, str], *, gradients: bool) -> None:
        self.session = session
        self.codecs = codecs
        self.gradients = gradients
        self.step = 0
        self.gradient_bytes_sent = 0

    def next_step(self) -> int:
        self.step += 1
        return self.step

    def __call__(self, h1: torch.Tensor, mask: torch.Tensor, *, train: bool) -> torch.Tensor:
        if train and self.gradients and h1.requires_grad:
            return _RemoteTrunkFn.apply(h1, mask, self)
        return self.forward(h1, mask, train=False, step=self.next_step())

    def forward(self, h1: torch.Tensor, mask: torch.Tensor, *, train: bool, step: int) -> torch.Tensor:
        msg = Message(
            MsgType.ACT_UP,
            step=step,
            meta={"train": train},
            tensors={"h": h1.detach(), "mask": mask.to(torch.int8)},
            codecs={"h": self.codecs["up"]},
        )
        reply = self.session.request(msg, expect=MsgType.ACT_DOWN)
        out = reply.tensors.get("h")
        if out is None or tuple(out.shape) != tuple(h1.shape):
            raise ProtocolError(f"ACT_DOWN carries no trunk output of shape {list(h1.shape)}")
        if reply.codec_of("h") != self.codecs["down"]:
            raise CodecMismatch(f"trunk output arrived as {reply.codec_of('h')!r}, negotiated {self.codecs['down']!r}")
        return out.to(h1.device, h1.dtype)

    def backward(self, grad_out: torch.Tensor, step: int, like: torch.Tensor) -> torch.Tensor:
        codec = self.codecs["grad_up"]
        msg = Message(
            MsgType.GRAD_UP,
            step=step,
            tensors={"g": grad_out.detach().contiguous()},
            codecs={"g": codec},
            stochastic=("g",) if _lossy(codec) else (),
        )
        reply = self.session.request(msg, expect=MsgType.GRAD_DOWN)
        g1 = reply.tensors.get("g")
        if g1 is None or tuple(g1.shape) != tuple(like.shape):
            raise ProtocolError("GRAD_DOWN carries no gradient of the activation's shape")
        return g1.to(like.device, like.dtype)


class _RemoteTrunkFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h1: torch.Tensor, mask: torch.Tensor, remote: RemoteTrunk) -> torch.Tensor:  # type: ignore[override]
        step = remote.next_step()
        ctx.remote = remote
        ctx.step = step
        ctx.save_for_backward(h1)
        return remote.forward(h1, mask, train=True, step=step)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (h1,) = ctx.saved_tensors
        return ctx.remote.backward(grad_out, ctx.step, h1), None, None
