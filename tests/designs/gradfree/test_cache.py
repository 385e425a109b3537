"""The Gradfree trunk-output cache (guardedp2p/designs/gradfree/client.py).

With the bottom and the trunk frozen, an example's trunk output is a fixed function of (model, codec, tokens),
so the cache is keyed by exactly those, bounded in bytes with the least recently used entries evicted first,
and a damaged entry is only a miss. :class:`CachedRemoteTrunk` asks the provider for the missing rows only.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from guardedp2p.designs.gradfree.client import CachedRemoteTrunk, TrunkOutputCache

H = 16


def out_for(seed: int, length: int = 12) -> torch.Tensor:
    return torch.randn(length, H, generator=torch.Generator().manual_seed(seed))


def ids_for(seed: int, length: int = 12) -> torch.Tensor:
    return torch.randint(3, 160, (length,), generator=torch.Generator().manual_seed(1000 + seed))


def entries(cache: TrunkOutputCache) -> set[Path]:
    return set(cache.dir.glob("*/*.safetensors"))


def total_bytes(cache: TrunkOutputCache) -> int:
    return sum(p.stat().st_size for p in entries(cache))


def age(cache: TrunkOutputCache, key: str, t: float) -> None:
    """Set an entry's last-use time explicitly (file times are too coarse to order back-to-back writes)."""
    os.utime(cache._path(key), (t, t))


# ---------------------------------------------------------------------------------------------- keys


def test_key_depends_on_fingerprint_codec_and_every_token(tmp_path):
    c = TrunkOutputCache(tmp_path, "fp-a", "fp32")
    ids = ids_for(0)
    k = c.key(ids)
    assert len(k) == 64 and int(k, 16) >= 0
    assert c.key(ids.clone()) == k
    assert c.key(ids.to(torch.int32)) == k  # the dtype of the ids is not part of the content
    assert TrunkOutputCache(tmp_path, "fp-b", "fp32").key(ids) != k
    assert TrunkOutputCache(tmp_path, "fp-a", "fp16").key(ids) != k
    changed = ids.clone()
    changed[-1] += 1
    assert c.key(changed) != k
    assert c.key(ids[:-1]) != k  # a prefix is another example
    assert c._path(k) == tmp_path / k[:2] / f"{k}.safetensors"


def test_another_model_or_codec_never_reads_an_entry(tmp_path):
    mine = TrunkOutputCache(tmp_path, "fp-a", "fp32")
    ids = ids_for(0)
    mine.put(mine.key(ids), out_for(0))
    for other in (TrunkOutputCache(tmp_path, "fp-b", "fp32"), TrunkOutputCache(tmp_path, "fp-a", "fp16")):
        assert other.get(other.key(ids)) is None
    assert mine.get(mine.key(ids)) is not None


# ---------------------------------------------------------------------------------------------- round trip


def test_put_get_round_trip_fp32_is_exact(tmp_path):
    c = TrunkOutputCache(tmp_path, "fp", "fp32")
    value = out_for(1)
    key = c.key(ids_for(1))
    assert c.get(key) is None
    c.put(key, value)
    got = c.get(key)
    assert got is not None and got.dtype == torch.float32 and torch.equal(got, value)


def test_put_get_through_a_lossy_codec(tmp_path):
    c = TrunkOutputCache(tmp_path, "fp", "fp16")
    value = out_for(2)
    key = c.key(ids_for(2))
    c.put(key, value)
    got = c.get(key)
    assert got is not None and got.shape == value.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, value, rtol=1e-3, atol=1e-3)
    assert c._path(key).stat().st_size < 12 * H * 4  # stored encoded (2 bytes a value), not as fp32


# ---------------------------------------------------------------------------------------------- size bound


def test_the_cache_is_owner_only(tmp_path):
    """An entry is the trunk output of a private text: folders 0700, files 0600, whatever the umask."""
    old = os.umask(0o022)
    try:
        (tmp_path / "c").mkdir(mode=0o755)
        c = TrunkOutputCache(tmp_path / "c", "fp", "fp32")
        c.put(c.key(ids_for(0)), out_for(0))
    finally:
        os.umask(old)
    assert c.dir.stat().st_mode & 0o777 == 0o700
    (entry,) = entries(c)
    assert entry.parent.stat().st_mode & 0o777 == 0o700 and entry.stat().st_mode & 0o777 == 0o600


def test_the_cache_stays_under_its_byte_bound_dropping_the_oldest_first(tmp_path):
    c = TrunkOutputCache(tmp_path, "fp", "fp32", max_bytes=1 << 30)
    keys = [c.key(ids_for(i)) for i in range(6)]
    c.put(keys[0], out_for(0))
    size = total_bytes(c)
    c.max_bytes = int(size * 3.5)  # room for three entries
    age(c, keys[0], 1000)
    for i in range(1, 6):
        c.put(keys[i], out_for(i))
        age(c, keys[i], 1000 + 1000 * i)
        assert total_bytes(c) <= c.max_bytes
    assert entries(c) == {c._path(k) for k in keys[3:]}  # the three newest survive
    assert all(c.get(k) is None for k in keys[:3])


def test_a_read_refreshes_an_entry_so_the_least_recently_used_goes_first(tmp_path):
    c = TrunkOutputCache(tmp_path, "fp", "fp32", max_bytes=1 << 30)
    keys = [c.key(ids_for(i)) for i in range(4)]
    for i in range(3):
        c.put(keys[i], out_for(i))
        age(c, keys[i], 1000 + 1000 * i)
    assert c.get(keys[0]) is not None  # the oldest write, but just used
    c.max_bytes = int(total_bytes(c) / 3 * 3.5)
    c.put(keys[3], out_for(3))
    assert not c._path(keys[1]).exists()  # the least recently used
    assert c._path(keys[0]).exists() and c._path(keys[2]).exists() and c._path(keys[3]).exists()


def test_under_the_bound_nothing_is_evicted(tmp_path):
    c = TrunkOutputCache(tmp_path, "fp", "fp32", max_bytes=1 << 30)
    for i in range(5):
        c.put(c.key(ids_for(i)), out_for(i))
    assert len(entries(c)) == 5


# ---------------------------------------------------------------------------------------------- damage


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "wrong metadata"])
def test_a_damaged_entry_is_a_miss_and_is_removed(tmp_path, damage):
    c = TrunkOutputCache(tmp_path, "fp", "fp32")
    key = c.key(ids_for(0))
    c.put(key, out_for(0))
    path = c._path(key)
    if damage == "garbage":
        path.write_bytes(b"\x00\xffnot a safetensors file" * 10)
    elif damage == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        from safetensors.torch import save_file

        save_file({"p0": torch.zeros(3)}, str(path), metadata={"codec": "no-such-codec", "nparts": "1"})
    assert c.get(key) is None
    assert not path.exists()
    c.put(key, out_for(0))  # and it can be filled again
    got = c.get(key)
    assert got is not None and torch.equal(got, out_for(0))


# ---------------------------------------------------------------------------------------------- the cached trunk


class FakeRemote:
    """Forward-only remote trunk: a fixed per-row function of h1, recording which rows it was asked for."""

    gradients = False

    def __init__(self) -> None:
        self.calls: list[torch.Tensor] = []

    def __call__(self, h1: torch.Tensor, mask: torch.Tensor, *, train: bool) -> torch.Tensor:
        assert train is False
        self.calls.append(h1[:, 0, 0].clone())
        return torch.tanh(h1) * 2 + 1


def rows(seeds: list[int], length: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, mask, h1) for examples given by seed; example s has length 3 + s % 5 and h1 a function of it."""
    ids = torch.zeros(len(seeds), length, dtype=torch.long)
    mask = torch.zeros(len(seeds), length, dtype=torch.long)
    for r, s in enumerate(seeds):
        n = 3 + s % 5
        ids[r, :n] = ids_for(s, n)
        mask[r, :n] = 1
    h1 = (ids.float().unsqueeze(-1) / 160 + torch.arange(H) / H) * mask.unsqueeze(-1)
    return ids, mask, h1


def test_the_cached_trunk_asks_only_for_missing_rows_and_rebatches_hits(tmp_path):
    remote = FakeRemote()
    cache = TrunkOutputCache(tmp_path, "fp", "fp32")
    trunk = CachedRemoteTrunk(remote, cache)  # type: ignore[arg-type]
    ids, mask, h1 = rows([0, 1, 2])
    first = trunk(h1, mask, train=True, input_ids=ids)
    assert len(remote.calls) == 1 and remote.calls[0].shape[0] == 3
    assert (cache.hits, cache.misses) == (0, 3)

    ids2, mask2, h12 = rows([2, 0, 4])  # two seen examples in another order and batch, one new
    second = trunk(h12, mask2, train=True, input_ids=ids2)
    assert len(remote.calls) == 2 and remote.calls[1].shape[0] == 1  # only the new row went out
    assert (cache.hits, cache.misses) == (2, 4)
    real = mask2.bool()
    expect = torch.tanh(h12) * 2 + 1
    assert torch.equal(second[real], expect[real])
    assert torch.equal(second[1][mask2[1].bool()], first[0][mask[0].bool()])
    assert cache.stats() == {"cache_hits": 2, "cache_misses": 4}


def test_a_cached_entry_of_the_wrong_length_is_refetched(tmp_path):
    remote = FakeRemote()
    cache = TrunkOutputCache(tmp_path, "fp", "fp32")
    trunk = CachedRemoteTrunk(remote, cache)  # type: ignore[arg-type]
    ids, mask, h1 = rows([1])
    cache.put(cache.key(ids[0, : int(mask[0].sum())]), torch.zeros(2, H))  # stale: wrong number of positions
    trunk(h1, mask, train=True, input_ids=ids)
    assert len(remote.calls) == 1 and cache.misses == 1


def test_a_cached_trunk_must_be_forward_only(tmp_path):
    remote = FakeRemote()
    remote.gradients = True
    with pytest.raises(ValueError, match="forward-only"):
        CachedRemoteTrunk(remote, TrunkOutputCache(tmp_path, "fp", "fp32"))  # type: ignore[arg-type]
