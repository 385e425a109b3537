"""Online design: the client trains its bottom and top, the provider runs the frozen trunk forward and backward.

:mod:`~guardedp2p.designs.online.provider` answers ACT_UP / GRAD_UP; :mod:`~guardedp2p.designs.online.client`
is the remote trunk as an ``autograd.Function``. The run loop is shared with Gradfree
(:func:`guardedp2p.service.client.tune`).
"""

from guardedp2p.designs.online.client import RemoteTrunk
from guardedp2p.designs.online.provider import TrunkSession, online_session

__all__ = ["RemoteTrunk", "TrunkSession", "online_session"]
