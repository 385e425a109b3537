"""Old module paths, kept for one release after the layout consolidation (issue 14), with a DeprecationWarning.

``import guardedp2p.codecs`` (and the other paths below) still works and returns the module at its new home, so
code written against 0.1 keeps running while it moves. The table is fixed; nothing is looked up from input.
Remove in 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

#: old dotted path -> new dotted path
MOVED: dict[str, str] = {
    "guardedp2p.codecs": "guardedp2p.wire.codecs",
    "guardedp2p.messages": "guardedp2p.wire.messages",
    "guardedp2p.handshake": "guardedp2p.wire.handshake",
    "guardedp2p.keys": "guardedp2p.crypto.keys",
    "guardedp2p.protocols": "guardedp2p.protocol",
    "guardedp2p.protocols.provider": "guardedp2p.protocol.provider",
    "guardedp2p.protocols.client_session": "guardedp2p.protocol.client",
    "guardedp2p.protocols.online": "guardedp2p.designs.online",
    "guardedp2p.protocols.gradfree": "guardedp2p.designs.gradfree.client",
    "guardedp2p.protocols.offline": "guardedp2p.designs.offline.provider",
    "guardedp2p.offline": "guardedp2p.designs.offline",
    "guardedp2p.offline.emulator": "guardedp2p.designs.offline.emulator",
    "guardedp2p.offline.plugin": "guardedp2p.designs.offline.plugin",
    "guardedp2p.offline.quantize": "guardedp2p.designs.offline.quantize",
    "guardedp2p.offline.transfer": "guardedp2p.designs.offline.transfer",
    "guardedp2p.offline.manifest": "guardedp2p.crypto.manifest",
    "guardedp2p.service.offline_client": "guardedp2p.designs.offline.run",
    "guardedp2p.service.offline_provider": "guardedp2p.designs.offline.build",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} moved to {self.new}; the old path goes away in 0.3", DeprecationWarning, stacklevel=3
        )
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:  # the real module is already executed
        return None


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new), is_package=fullname in _PACKAGES)


_PACKAGES = {"guardedp2p.protocols", "guardedp2p.offline"}


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` once (idempotent)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
