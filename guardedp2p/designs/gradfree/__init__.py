"""Gradfree design: the client trains only its top; the provider runs the trunk forward and never sees a gradient.

:mod:`~guardedp2p.designs.gradfree.provider` is the trunk session without a gradient handler;
:mod:`~guardedp2p.designs.gradfree.client` the forward-only remote trunk with its trunk-output cache.
"""

from guardedp2p.designs.gradfree.client import CachedRemoteTrunk, TrunkOutputCache
from guardedp2p.designs.gradfree.provider import gradfree_session

__all__ = ["CachedRemoteTrunk", "TrunkOutputCache", "gradfree_session"]
