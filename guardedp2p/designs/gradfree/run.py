"""The Gradfree run: Online's split loop with a forward-only trunk and a trunk-output cache.

The client trains only its top adapters, so nothing it sends depends on a gradient and no gradient crosses the
wire (GuardedTuning, arXiv 2501.04323, Gradfree design); with the bottom frozen, the trunk output of an example
never changes, and from the second epoch on the cache answers instead of the provider.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guardedp2p.designs.gradfree.client import CachedRemoteTrunk, TrunkOutputCache
from guardedp2p.designs.online.client import RemoteTrunk
from guardedp2p.designs.online.run import SplitDesign, SplitTrunk, run_split
from guardedp2p.protocol.client import ClientSession
from guardedp2p.service.client import ChannelFactory, ClientModel, TuneOptions

if TYPE_CHECKING:
    from rich.console import Console

GRADFREE_CODECS = ("up", "down")


def gradfree_trunk(opts: TuneOptions, session: ClientSession, client: ClientModel) -> SplitTrunk:
    """The forward-only remote trunk with its output cache (``opts.noise``: the run's effective noise).

    With noise on, the cache keeps the trunk output of each record's first (noised) forward: later epochs reuse
    it, so the provider sees every training record once, and the accountant counts one release of its activation
    (:func:`guardedp2p.privacy.accounting.plan_run`, ``cached``). The noise settings salt the cache's keys."""
    remote = RemoteTrunk(session, {k: v for k, v in opts.codecs.items() if k in GRADFREE_CODECS}, gradients=False)
    cache = None
    if opts.cache:
        noisy = bool(opts.noise) and opts.noise.get("kind", "none") != "none"
        salt = hashlib.sha256(json.dumps(opts.noise, sort_keys=True, default=str).encode()).hexdigest() if noisy else ""
        cache = TrunkOutputCache(Path(opts.out) / "trunk_cache", client.fingerprint, opts.codecs["down"], salt=salt)
    from guardedp2p.designs.online.pipeline import pipelined_step

    trunk = CachedRemoteTrunk(remote, cache)
    step = pipelined_step(remote, opts.micro_batches, cache=cache)
    return SplitTrunk(trunk, cache.stats if cache is not None else dict, step=step)


GRADFREE = SplitDesign("gradfree", GRADFREE_CODECS, train_bottom=False, build_trunk=gradfree_trunk)


def tune_gradfree(
    opts: TuneOptions, connect: ChannelFactory, *, client: ClientModel | None = None, console: Console | None = None
) -> dict[str, Any]:
    """Run the Gradfree design; return the run summary (also written to ``OUT/summary.json``)."""
    return run_split(GRADFREE, opts, connect, client=client, console=console)


__all__ = ["GRADFREE", "gradfree_trunk", "tune_gradfree"]
