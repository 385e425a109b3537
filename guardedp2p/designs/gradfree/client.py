"""Gradfree design, client side: forward-only remote trunk with a content-addressed trunk-output cache.

With the client's bottom and the provider's trunk both frozen, the trunk output of an example is a fixed
function of its tokens, so after the first epoch the client can answer from its cache: no traffic, no
provider compute. The provider side is :func:`guardedp2p.designs.gradfree.provider.gradfree_session`, whose handler
table has no gradient message type at all.

Why per example rather than per batch: with right padding and a causal mask, the outputs at an example's
real tokens do not depend on what else is in the batch, so cached rows can be re-batched freely.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from guardedp2p.designs.gradfree.provider import gradfree_session
from guardedp2p.designs.online.client import RemoteTrunk

__all__ = ["TrunkOutputCache", "CachedRemoteTrunk", "gradfree_session"]


class TrunkOutputCache:
    """On-disk cache of trunk outputs, keyed by SHA-256(model fingerprint, codec, token ids), size-bounded.

    Owner-only, like checkpoints (issue 20): an entry is the trunk's output for one private training text, which
    an inversion attack can read back towards that text, so the folders are 0700 and the files 0600."""

    def __init__(
        self, directory: str | Path, fingerprint: str, codec: str, *, max_bytes: int = 2 << 30, salt: str = ""
    ) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.dir.chmod(0o700)  # mkdir's mode obeys the umask, and an existing folder keeps its own
        self.fingerprint = fingerprint
        self.codec = codec
        self.salt = salt  # what else decides the output (the client's noise settings): another salt, another entry
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0

    def key(self, ids: torch.Tensor) -> str:
        h = hashlib.sha256()
        h.update(self.fingerprint.encode())
        h.update(b"\0" + self.codec.encode() + b"\0")
        if self.salt:
            h.update(self.salt.encode() + b"\0")
        h.update(ids.to(torch.int64).cpu().numpy().tobytes())
        return h.hexdigest()

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        path = self._path(key)
        if not path.is_file():
            return None
        from guardedp2p.wire.codecs import Encoded, get_codec

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
                parts = [f.get_tensor(f"p{i}") for i in range(int(meta["nparts"]))]
            shape = tuple(json.loads(meta["shape"]))
            params = json.loads(meta["params"])
            out = get_codec(meta["codec"]).decode(
                Encoded(parts=parts, params=params), shape, torch.float32, torch.device("cpu")
            )
        except Exception:  # noqa: BLE001 - a damaged cache entry is just a miss
            path.unlink(missing_ok=True)
            return None
        os.utime(path)
        return out

    def put(self, key: str, value: torch.Tensor) -> None:
        from guardedp2p.wire.codecs import get_codec

        enc = get_codec(self.codec).encode(value.detach().cpu().float().contiguous())
        path = self._path(key)
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.parent.chmod(0o700)
        meta = {
            "codec": self.codec,
            "shape": json.dumps(list(value.shape)),
            "params": json.dumps(enc.params),
            "nparts": str(len(enc.parts)),
        }
        tmp = path.with_suffix(".tmp")
        save_file({f"p{i}": p.contiguous() for i, p in enumerate(enc.parts)}, str(tmp), metadata=meta)
        tmp.chmod(0o600)
        os.replace(tmp, path)
        self._evict()

    def _evict(self) -> None:
        if self.salt:  # noise on: an evicted record would be sent again with fresh noise, a release the
            return  # accountant did not count (each record is sent once); the cache grows instead
        files = [p for p in self.dir.glob("*/*.safetensors")]
        total = sum(p.stat().st_size for p in files)
        if total <= self.max_bytes:
            return
        for p in sorted(files, key=lambda p: p.stat().st_mtime):
            total -= p.stat().st_size
            p.unlink(missing_ok=True)
            if total <= self.max_bytes:
                break

    def stats(self) -> dict[str, Any]:
        return {"cache_hits": self.hits, "cache_misses": self.misses}


class CachedRemoteTrunk:
    """Forward-only remote trunk that asks the provider only for the examples not in the cache."""

    def __init__(self, remote: RemoteTrunk, cache: TrunkOutputCache | None) -> None:
        if remote.gradients:
            raise ValueError("a cached trunk must be forward-only (gradfree)")
        self.remote = remote
        self.cache = cache

    def __call__(self, h1: torch.Tensor, mask: torch.Tensor, *, train: bool, input_ids: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            return self.remote(h1, mask, train=False)
        lengths = mask.to(torch.long).sum(dim=1).tolist()
        keys = [self.cache.key(input_ids[i, :n]) for i, n in enumerate(lengths)]
        out = torch.zeros(h1.shape, dtype=h1.dtype, device=h1.device)
        missing: list[int] = []
        for i, key in enumerate(keys):
            cached = self.cache.get(key)
            if cached is None or cached.shape[0] != lengths[i]:
                missing.append(i)
                continue
            out[i, : lengths[i]] = cached.to(h1.device, h1.dtype)
        self.cache.hits += len(keys) - len(missing)
        self.cache.misses += len(missing)
        if missing:
            idx = torch.tensor(missing, device=h1.device)
            fresh = self.remote(h1.index_select(0, idx), mask.index_select(0, idx), train=False)
            for j, i in enumerate(missing):
                out[i] = fresh[j]
                self.cache.put(keys[i], fresh[j, : lengths[i]])
        return out
