"""The three GuardedTuning designs (Shi, Ouyang, Wang, arXiv 2501.04323), one folder each, in one registry.

A design is a folder ``designs/NAME/`` with its provider side (a session factory the sans-I/O
:class:`~guardedp2p.protocol.provider.ProviderApp` dispatches to), its client side and its run function (built
from :mod:`guardedp2p.service.runner`), plus one line in :data:`DESIGNS`. The handshake, the CLI and
``guardedp2p evaluate`` read the names from here, so adding a fourth design is a folder and a line (the
registry style of peft's tuners).

This module is a plain table with no imports of design code, so the wire layer (the handshake) may read it:
session factories and run functions are imported lazily, by a fixed "module:function" string from this table.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Design:
    """What the rest of the package needs to know about a design."""

    name: str
    summary: str
    session_factory: str  # "module:function" returning the provider's session handler
    run: str  # "module:function": the client's whole run, (opts, connect, *, console, ...) -> summary dict
    gradients_on_wire: bool  # whether any gradient crosses the wire (Online only)
    per_step_traffic: bool  # whether training exchanges tensors every step (not Offline)
    session_types: tuple[str, ...]  # MsgType names a client may send inside an established session

    def load_session_factory(self) -> Callable[..., Any]:
        return _load(self.session_factory)

    def load_run(self) -> Callable[..., dict[str, Any]]:
        """The client's run function (``tune_online``, ``tune_gradfree``, ``tune_offline``), imported on demand."""
        return _load(self.run)


def _load(ref: str) -> Callable[..., Any]:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)  # names from this table only, never from the wire


DESIGNS: dict[str, Design] = {
    d.name: d
    for d in (
        Design(
            "online",
            "client trains bottom + top through the provider's frozen trunk; activations and gradients cross",
            "guardedp2p.designs.online.provider:online_session",
            run="guardedp2p.designs.online.run:tune_online",
            gradients_on_wire=True,
            per_step_traffic=True,
            session_types=("PING", "BYE", "ACT_UP", "GRAD_UP"),
        ),
        Design(
            "gradfree",
            "client trains only its top; the provider's trunk runs forward only and never sees a gradient",
            "guardedp2p.designs.gradfree.provider:gradfree_session",
            run="guardedp2p.designs.gradfree.run:tune_gradfree",
            gradients_on_wire=False,
            per_step_traffic=True,
            session_types=("PING", "BYE", "ACT_UP"),
        ),
        Design(
            "offline",
            "provider ships a signed emulator; the client tunes locally and returns signed adapters",
            "guardedp2p.designs.offline.provider:offline_session",
            run="guardedp2p.designs.offline.run:tune_offline",
            gradients_on_wire=False,
            per_step_traffic=False,
            session_types=("PING", "BYE", "MANIFEST_REQ", "CHUNK_REQ", "UPLOAD"),
        ),
    )
}

DESIGN_NAMES: tuple[str, ...] = tuple(DESIGNS)


def get_design(name: str) -> Design:
    """The registered design called ``name``; a :class:`~guardedp2p.errors.ConfigError` naming the valid ones."""
    from guardedp2p.errors import ConfigError

    try:
        return DESIGNS[name]
    except KeyError:
        raise ConfigError(f"unknown design {name[:40]!r}; choose one of: {', '.join(DESIGN_NAMES)}") from None


__all__ = ["DESIGNS", "DESIGN_NAMES", "Design", "get_design"]
