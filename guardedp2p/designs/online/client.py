"""Online design, client side: the provider's trunk as an ``autograd.Function``.

Its forward sends ACT_UP and its backward sends GRAD_UP, so the client's training code is ordinary PyTorch
(``loss.backward()``), and a quantized uplink is straight-through by construction: the received dL/dh1 is
applied to h1 as if the codec were the identity (GuardedTuning, arXiv 2501.04323, Online design).

The pipelined step (issue 19, :mod:`guardedp2p.designs.online.pipeline`) uses the same messages split in halves:
:meth:`RemoteTrunk.send_forward` / :meth:`RemoteTrunk.take_forward` and :meth:`RemoteTrunk.send_backward` /
:meth:`RemoteTrunk.take_backward`, so several micro-batches can be in flight on one session.
"""

from __future__ import annotations

from typing import Any

import torch

from guardedp2p.designs.online.provider import CodecMismatch, _lossy
from guardedp2p.errors import ProtocolError
from guardedp2p.protocol.client import PendingRequest
from guardedp2p.wire.framing import Message
from guardedp2p.wire.messages import MsgType


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
        return self.take_forward(self.send_forward(h1, mask, train=train, step=step), h1)

    def send_forward(self, h1: torch.Tensor, mask: torch.Tensor, *, train: bool, step: int) -> PendingRequest:
        """Send ACT_UP without waiting; :meth:`take_forward` gives the trunk output. ``h1`` must not change
        until then (its memory is sent without a copy)."""
        msg = Message(
            MsgType.ACT_UP,
            step=step,
            meta={"train": train},
            tensors={"h": h1.detach(), "mask": mask.to(torch.int8)},
            codecs={"h": self.codecs["up"]},
        )
        pending: PendingRequest = self.session.send(msg, expect=MsgType.ACT_DOWN)
        return pending

    def take_forward(self, pending: PendingRequest, like: torch.Tensor) -> torch.Tensor:
        """The trunk output of a sent ACT_UP (shape checked against ``like``, the activation sent)."""
        reply = self.session.receive(pending)
        out = reply.tensors.get("h")
        if out is None or tuple(out.shape) != tuple(like.shape):
            raise ProtocolError(f"ACT_DOWN carries no trunk output of shape {list(like.shape)}")
        if reply.codec_of("h") != self.codecs["down"]:
            raise CodecMismatch(f"trunk output arrived as {reply.codec_of('h')!r}, negotiated {self.codecs['down']!r}")
        return out.to(like.device, like.dtype)

    def backward(self, grad_out: torch.Tensor, step: int, like: torch.Tensor) -> torch.Tensor:
        return self.take_backward(self.send_backward(grad_out, step), like)

    def send_backward(self, grad_out: torch.Tensor, step: int) -> PendingRequest:
        """Send GRAD_UP (dL/dh2 of the ACT_UP of ``step``) without waiting; :meth:`take_backward` gives dL/dh1."""
        codec = self.codecs["grad_up"]
        msg = Message(
            MsgType.GRAD_UP,
            step=step,
            tensors={"g": grad_out.detach().contiguous()},
            codecs={"g": codec},
            stochastic=("g",) if _lossy(codec) else (),
        )
        pending: PendingRequest = self.session.send(msg, expect=MsgType.GRAD_DOWN)
        return pending

    def take_backward(self, pending: PendingRequest, like: torch.Tensor) -> torch.Tensor:
        """dL/dh1 of a sent GRAD_UP (shape checked against ``like``, the activation sent)."""
        reply = self.session.receive(pending)
        g1 = reply.tensors.get("g")
        if g1 is None or tuple(g1.shape) != tuple(like.shape):
            raise ProtocolError("GRAD_DOWN carries no gradient of the activation's shape")
        return g1.to(like.device, like.dtype)


class _RemoteTrunkFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h1: torch.Tensor, mask: torch.Tensor, remote: RemoteTrunk) -> torch.Tensor:
        step = remote.next_step()
        ctx.remote = remote
        ctx.step = step
        ctx.save_for_backward(h1)
        return remote.forward(h1, mask, train=True, step=step)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (h1,) = ctx.saved_tensors
        return ctx.remote.backward(grad_out, ctx.step, h1), None, None
