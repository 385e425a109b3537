"""Gradfree design, provider side: the Online trunk session with no graph kept and no gradient handler.

A Gradfree session's handler table has no GRAD_UP at all, so the provider never runs a backward pass and a
gradient message is refused with ``not-allowed``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from guardedp2p.designs.online.provider import TrunkSession

if TYPE_CHECKING:
    from guardedp2p.protocol.provider import ProviderApp


def gradfree_session(app: ProviderApp, sid: str, terms: dict[str, Any], *, peer: str = "") -> TrunkSession:
    return TrunkSession(app, sid, terms, keep_graph=False, peer=peer)
