"""A raw ZeroMQ CURVE DEALER speaking the wire format directly, for adversarial tests: it can pipeline requests,
never read replies, shrink its receive buffer, or vanish without BYE (what ``ZmqClientChannel`` never does)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import zmq

from guardedp2p.crypto.keys import load_keypair, load_public_key
from guardedp2p.wire.framing import Message, decode, encode
from guardedp2p.wire.handshake import Hello
from guardedp2p.wire.messages import MsgType


class RawClient:
    def __init__(
        self,
        endpoint: str,
        keydir: str | os.PathLike[str],
        name: str,
        *,
        provider: str = "provider",
        rcvbuf: int | None = None,
        rcvhwm: int = 1000,
    ) -> None:
        keydir = Path(keydir)
        public, secret = load_keypair(keydir / f"{name}.key_secret")
        self.ctx = zmq.Context()
        s = self.ctx.socket(zmq.DEALER)
        s.linger = 0
        s.rcvhwm = rcvhwm
        if rcvbuf is not None:
            s.setsockopt(zmq.RCVBUF, rcvbuf)
        s.curve_publickey = public.encode()
        s.curve_secretkey = secret.encode()
        s.curve_serverkey = load_public_key(keydir / f"{provider}.key").encode()
        s.connect(endpoint)
        self.sock = s
        self.key = public
        self.sid = ""

    def send(self, msg: Message) -> None:
        self.sock.send_multipart(encode(msg), copy=False)

    def recv(self, timeout: float) -> Message | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return decode(self.sock.recv_multipart())

    def request(self, msg: Message, timeout: float = 10.0) -> Message | None:
        self.send(msg)
        return self.recv(timeout)

    def hello(self, protocol: str, fp: str, codecs: dict[str, str], timeout: float = 10.0) -> str:
        reply = self.request(Message(MsgType.HELLO, meta=Hello(protocol, fp, (2, 2), codecs).to_meta()), timeout)
        assert reply is not None and reply.type == MsgType.ACCEPT, reply
        self.sid = reply.session
        return self.sid

    def ping_latency(self, step: int, timeout: float = 10.0) -> float:
        t0 = time.perf_counter()
        reply = self.request(Message(MsgType.PING, session=self.sid, step=step), timeout)
        assert reply is not None and reply.type == MsgType.PONG, reply
        return time.perf_counter() - t0

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()
