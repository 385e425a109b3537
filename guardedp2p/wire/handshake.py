"""HELLO / ACCEPT / REJECT negotiation.

The client proposes everything that both sides must agree on; the provider checks it against what it
serves and either accepts (and binds a fresh session id to the client's authenticated key) or rejects with a
reason both CLIs print. Keeping this pure (no I/O) lets the same checks run in tests and in deployment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from guardedp2p import __version__
from guardedp2p.designs import DESIGN_NAMES, DESIGNS
from guardedp2p.errors import HandshakeRejected
from guardedp2p.wire.messages import WIRE_VERSION

CODEC_DIRECTIONS = ("up", "down", "grad_up", "grad_down")
FLOAT_CODECS = ("fp32", "fp16", "bf16", "int8", "int8-block", "nf4", "fp4")


@dataclass
class Hello:
    """What a client proposes. ``codecs`` maps a direction (up, down, grad_up, grad_down) to a codec name."""

    protocol: str
    fingerprint: str = ""
    split: tuple[int, int] = (2, 2)
    codecs: dict[str, str] = field(default_factory=lambda: {d: "fp32" for d in CODEC_DIRECTIONS})
    privacy: dict[str, Any] = field(default_factory=dict)
    software: str = f"guardedp2p/{__version__}"
    resume_from_step: int = 0

    def to_meta(self) -> dict[str, Any]:
        return {
            "wire_version": WIRE_VERSION,
            "protocol": self.protocol,
            "fingerprint": self.fingerprint,
            "split": list(self.split),
            "codecs": dict(self.codecs),
            "privacy": self.privacy,
            "software": self.software,
            "resume_from_step": int(self.resume_from_step),
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Hello:
        """Parse a received HELLO; every field is type-checked because it comes from the network."""

        def need(key: str, kind: type | tuple[type, ...]) -> Any:
            value = meta.get(key)
            if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
                raise HandshakeRejected(f"HELLO field {key!r} is missing or has the wrong type")
            return value

        version = need("wire_version", int)
        if version != WIRE_VERSION:
            raise HandshakeRejected(
                f"wire version mismatch: client speaks {version}, provider speaks {WIRE_VERSION}; upgrade the older side"
            )
        split = need("split", list)
        if len(split) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in split):
            raise HandshakeRejected("HELLO field 'split' must be [bottom_layers, top_layers]")
        codecs = need("codecs", dict)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in codecs.items()):
            raise HandshakeRejected("HELLO field 'codecs' must map directions to codec names")
        return cls(
            protocol=need("protocol", str),
            fingerprint=need("fingerprint", str),
            split=(split[0], split[1]),
            codecs=dict(codecs),
            privacy=need("privacy", dict),
            software=str(meta.get("software", "unknown"))[:100],
            resume_from_step=int(meta.get("resume_from_step", 0))
            if isinstance(meta.get("resume_from_step", 0), int)
            else 0,
        )


@dataclass
class ProviderPolicy:
    """What a provider serves. ``fingerprint`` is over the weights the client side must share."""

    protocols: tuple[str, ...] = DESIGN_NAMES
    fingerprint: str = ""
    split: tuple[int, int] = (2, 2)
    codecs: tuple[str, ...] = FLOAT_CODECS
    record: bool = False
    model_name: str = ""


def negotiate(hello: Hello, policy: ProviderPolicy) -> dict[str, Any]:
    """Check a HELLO against the provider's policy; return the agreed terms or raise HandshakeRejected."""
    design = DESIGNS.get(hello.protocol)
    if design is None:
        raise HandshakeRejected(
            f"unknown protocol {hello.protocol[:40]!r}; this provider knows {', '.join(DESIGN_NAMES)}"
        )
    if hello.protocol not in policy.protocols:
        raise HandshakeRejected(
            f"protocol {hello.protocol!r} is not offered by this provider (it serves: {', '.join(policy.protocols)})"
        )
    if design.per_step_traffic:
        if tuple(hello.split) != tuple(policy.split):
            raise HandshakeRejected(
                f"split mismatch: client uses {hello.split[0]} bottom / {hello.split[1]} top blocks, "
                f"provider serves {policy.split[0]} / {policy.split[1]}; pass --bottom-layers/--top-layers to match"
            )
        if hello.fingerprint != policy.fingerprint:
            raise HandshakeRejected(
                "model fingerprint mismatch: the client's copy of the shared layers "
                f"({hello.fingerprint[:12] or 'none'}…) differs from the provider's model ({policy.fingerprint[:12]}…, "
                f"{policy.model_name or 'unnamed'}); load the same base model and split on both sides"
            )
        wanted = CODEC_DIRECTIONS if design.gradients_on_wire else ("up", "down")
        for direction in wanted:
            codec = hello.codecs.get(direction)
            if codec not in policy.codecs:
                raise HandshakeRejected(
                    f"codec {str(codec)[:20]!r} for direction {direction!r} is not accepted (accepted: {', '.join(policy.codecs)})"
                )
        if not design.gradients_on_wire and any(k.startswith("grad") for k in hello.codecs):
            raise HandshakeRejected("a gradfree session carries no gradients: do not propose gradient codecs")
    codecs = {k: v for k, v in hello.codecs.items()}
    return {
        "protocol": hello.protocol,
        "codecs": codecs,
        "split": list(policy.split),
        "fingerprint": policy.fingerprint,
        "record": policy.record,
        "privacy": hello.privacy,
    }
